//! What expiry costs the agent with conntrack full: the agent started with the default
//! table (262 144 entries), the table filled with established flows (two entries each,
//! written straight into the agent's map, found by its id), then the agent's own CPU time
//! (`/proc/PID/stat`, user + system) over a window in which it sweeps every 2 s.

use std::{fs, time::Duration};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, Map, MapData, MapInfo};
use splitter_common::maps::{FlowEntry, FlowKey, DEFAULT_CONNTRACK_ENTRIES, FLOW_ESTABLISHED, FLOW_FROM_TARGET, FLOW_TO_TARGET, PROTO_TCP};

use super::{say, topo::ForwardBed, Options};

pub struct ExpiryResults {
    pub entries: usize,
    pub window: Duration,
    /// Agent CPU over the window, percent of one core: idle (empty table) and full.
    pub idle_percent: f64,
    pub full_percent: f64,
}

const GATEWAY: &str = "name: gw\nport: 80/tcp\nvirtual_address: 10.20.0.1\nroutes:\n  gw/a:\n    targets: [10.10.2.11:8080]\n";

/// User + system CPU ticks of `pid`.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// The agent's CPU over `window`, percent of one core.
fn cpu_percent(pid: u32, window: Duration) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(pid)?;
    std::thread::sleep(window);
    let after = cpu_ticks(pid)?;
    Ok(100.0 * (after - before) as f64 / hz / window.as_secs_f64())
}

/// The agent's CONNTRACK map, through the descriptors it holds.
fn conntrack_of(pid: u32) -> Result<HashMap<MapData, FlowKey, FlowEntry>> {
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else { continue };
        let Some(id) = text.lines().find_map(|l| l.strip_prefix("map_id:").map(|v| v.trim().parse::<u32>().unwrap_or(0))) else { continue };
        let Ok(info) = MapInfo::from_id(id) else { continue };
        if info.name_as_str() == Some("CONNTRACK") {
            return Ok(HashMap::try_from(Map::LruHashMap(MapData::from_id(id)?))?);
        }
    }
    bail!("the agent holds no CONNTRACK map")
}

pub fn run(opts: Options) -> Result<ExpiryResults> {
    let bed = ForwardBed::new()?;
    let agent = bed.start_agent(GATEWAY, &[])?;
    let window = if opts.quick { Duration::from_secs(10) } else { Duration::from_secs(30) };
    say(format!("expiry: agent idle, {window:?}"));
    let idle_percent = cpu_percent(agent.pid(), window)?;
    let mut conntrack = conntrack_of(agent.pid())?;
    let flows = DEFAULT_CONNTRACK_ENTRIES / 2;
    say(format!("expiry: filling conntrack with {flows} established flows"));
    // SAFETY: clock_gettime fills the timespec.
    let now = {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    };
    for i in 0..flows {
        let client = FlowKey {
            src_addr: u32::from_ne_bytes([10, 30 + (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            dst_addr: u32::from_ne_bytes([10, 20, 0, 1]),
            src_port: 40000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: 0,
            _pad_word: 0,
        };
        let to_target = FlowKey {
            src_addr: u32::from_ne_bytes([10, 10, 2, 1]),
            dst_addr: u32::from_ne_bytes([10, 10, 2, 11]),
            src_port: ((10000 + i % 50000) as u16).to_be(),
            dst_port: 8080u16.to_be(),
            ..client
        };
        let entry = |rewritten, flags| FlowEntry {
            rewritten,
            counter_index: 0,
            flags: flags | FLOW_ESTABLISHED,
            last_seen_ns: now,
            created_ns: now,
        };
        // Distinct reply keys: the source port varies with the index, the address with it too.
        let to_target = FlowKey { src_addr: to_target.src_addr.wrapping_add((i / 50000) << 24), ..to_target };
        conntrack.insert(client, entry(to_target, FLOW_TO_TARGET), 0)?;
        conntrack.insert(to_target.reversed(), entry(client.reversed(), FLOW_FROM_TARGET), 0)?;
    }
    let entries = conntrack.keys().filter(Result::is_ok).count();
    say(format!("expiry: {entries} entries; agent CPU over {window:?}"));
    let full_percent = cpu_percent(agent.pid(), window)?;
    agent.signal(libc::SIGTERM)?;
    let _ = agent.wait(Duration::from_secs(30));
    Ok(ExpiryResults { entries, window, idle_percent, full_percent })
}

pub fn section(r: &ExpiryResults) -> String {
    format!(
        "The agent sweeps conntrack every 2 to 10 s, as rarely as keeps the sweep under 1 % of a core (closed TCP flows go 10 s after their FINs, idle UDP flows after their timeout), and counts it \
         for `/metrics`. It reads the whole table with `BPF_MAP_LOOKUP_BATCH` (4096 entries a call) and judges it in memory; \
         only expired entries cost a lookup and a delete each.\n\n\
         | conntrack | agent CPU (% of one core, over {:.0} s) |\n|---|---:|\n| empty | {:.2} % |\n| full: {} entries (established flows) | {:.2} % |\n\n\
         Target: under 2 % of a core with conntrack full. Command: `cargo xtask bench -- expiry`.\n",
        r.window.as_secs_f64(),
        r.idle_percent,
        r.entries,
        r.full_percent
    )
}
