//! Map memory: the agent sized for N gateways (`--max-gateways N`) with N two-target
//! gateways applied, for N = 1, 100, 1000; each map's memory as the kernel reports it
//! (`memlock` in the fdinfo of the agent's map descriptors), named through the map's id.

use std::{collections::BTreeMap, fs, time::Duration};

use anyhow::{bail, Result};

use super::{group, say, topo::ForwardBed, Options};

pub struct MemoryRow {
    pub gateways: u32,
    /// Map name -> (bytes, max_entries).
    pub maps: BTreeMap<String, (u64, u64)>,
    pub apply_time: Duration,
}

pub struct MemoryResults {
    pub rows: Vec<MemoryRow>,
}

fn gateway(i: u32) -> String {
    format!(
        "name: gw{i}\nport: 80/tcp\nvirtual_address: 10.{}.{}.{}\nroutes:\n  gw{i}/stable:\n    weight: 90%\n    \
         targets: [10.10.2.11:8080]\n  gw{i}/canary:\n    weight: 10%\n    targets: [10.10.2.21:8080]\n",
        20 + i / 65536,
        (i / 256) % 256,
        i % 256
    )
}

/// Memory of every BPF map the process `pid` holds a descriptor of.
fn map_memory(pid: u32) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else { continue };
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u64>().unwrap_or(0)));
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else { continue };
        let max_entries = field("max_entries:").unwrap_or(0);
        let name = aya::maps::MapInfo::from_id(id as u32)
            .ok()
            .and_then(|info| info.name_as_str().map(str::to_string))
            .unwrap_or_else(|| format!("map {id}"));
        out.insert(name, (memlock, max_entries));
    }
    Ok(out)
}

pub fn run(opts: Options) -> Result<MemoryResults> {
    let _ = opts;
    let bed = ForwardBed::new()?;
    let mut rows = Vec::new();
    for n in [1u32, 100, 1000] {
        say(format!("memory: {n} gateway(s)"));
        let config = bed.run.path().join("config");
        let _ = fs::remove_dir_all(&config);
        fs::create_dir_all(&config)?;
        for i in 0..n {
            fs::write(config.join(format!("gw{i}.yaml")), gateway(i))?;
        }
        let socket = bed.socket().display().to_string();
        let state = bed.run.path().join("state").display().to_string();
        let bin = splitter_tests::splitter_bin().display().to_string();
        let max = n.to_string();
        let config_arg = config.display().to_string();
        let start = std::time::Instant::now();
        let agent = bed.mid.spawn(
            "taskset",
            &[
                "-c",
                "1",
                &bin,
                "agent",
                "--iface",
                "spl-c",
                "--iface",
                "spl-b",
                "--config",
                &config_arg,
                "--socket",
                &socket,
                "--state-dir",
                &state,
                "--ephemeral",
                "--max-gateways",
                &max,
            ],
        )?;
        agent.wait_for_line("ready", Duration::from_secs(60))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while agent.lines().iter().filter(|l| l.contains("applied gateway")).count() < n as usize {
            if std::time::Instant::now() > deadline {
                bail!("the agent applied only some of {n} gateways");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let apply_time = start.elapsed();
        let maps = map_memory(agent.pid())?;
        agent.signal(libc::SIGTERM)?;
        // Stopping is not what is measured: a slow exit is killed on drop.
        let _ = agent.wait(Duration::from_secs(30));
        rows.push(MemoryRow { gateways: n, maps, apply_time });
    }
    Ok(MemoryResults { rows })
}

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    }
}

pub fn section(r: &MemoryResults) -> String {
    let mut names: Vec<String> = r.rows.iter().flat_map(|row| row.maps.keys().cloned()).collect();
    names.sort();
    names.dedup();
    let mut header = "| map |".to_string();
    let mut rule = "|---|".to_string();
    for row in &r.rows {
        header.push_str(&format!(" {} gateway(s) |", row.gateways));
        rule.push_str("---:|");
    }
    let mut rows = String::new();
    for name in &names {
        rows.push_str(&format!("| `{name}` |"));
        for row in &r.rows {
            match row.maps.get(name) {
                Some((bytes, entries)) => rows.push_str(&format!(" {} ({} entries) |", mib(*bytes), group(*entries as f64))),
                None => rows.push_str(" — |"),
            }
        }
        rows.push('\n');
    }
    rows.push_str("| **total** |");
    for row in &r.rows {
        rows.push_str(&format!(" **{}** |", mib(row.maps.values().map(|(b, _)| b).sum())));
    }
    rows.push_str("\n| agent start + apply all |");
    for row in &r.rows {
        rows.push_str(&format!(" {:.1} s |", row.apply_time.as_secs_f64()));
    }
    format!(
        "The agent started with `--max-gateways N` and N two-target gateway files (90/10) in its config \
         directory; memory per map is the kernel's own figure (`memlock` in the fdinfo of the agent's map \
         descriptors). Maps are preallocated: their size follows the limits (`--max-gateways`, \
         `--conntrack-size`, default 262 144 entries), not the traffic. Per-CPU maps count every CPU (2 here).\n\n\
         {header}\n{rule}\n{rows}\n"
    )
}
