//! Weight changes under load: the agent serves a full-NAT UDP gateway on the forwarding
//! testbed while two trafgen streams go through it: 1000 established flows at 49 000
//! packets/s and a stream of new flows at 1 000 per second (so new flows keep reading the
//! live table). 1000 weights-only documents are PUT on the control socket. For each change:
//! - request → live: from the request written to the moment the live gateway entry the
//!   datapath reads (GATEWAYS, looked up by the bench in a tight loop) names the new
//!   generation;
//! - request → response: the agent answers after the switch (and after saving its state,
//!   unless `--ephemeral`);
//! - a probe packet of a new flow that the old and new tables send to different targets
//!   is then run through the live program (BPF_PROG_TEST_RUN on the agent's program, by id)
//!   and must come out to the new table's target.
//!
//! Packets lost = sent by the generators - received by the sink, counted with the
//! generators stopped, over the changes and over a control window without changes.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use splitter_common::{
    flow::{bucket_slot, flow_hash},
    maps::{FlowKey, GatewayKey, GatewayState, PROTO_UDP},
    table::{build_bucket_table, TableTarget},
};

use super::{
    forward::gateway_yaml,
    group, percentile, say,
    topo::{Control, ForwardBed, BACKENDS, UDP_PORT, VIP},
    Options, TargetCheck,
};
use splitter_tests::frames::{flow_key, ipv4_word, udp, Ipv4Packet};

const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 77);
const CYCLE: [u32; 8] = [90, 70, 50, 30, 10, 30, 50, 70];

/// One agent configuration's run.
pub struct Variant {
    pub name: &'static str,
    pub changes: usize,
    /// Request written → live gateway entry names the new generation (µs, sorted).
    pub live_us: Vec<u32>,
    /// Request written → response read (µs, sorted).
    pub response_us: Vec<u32>,
    pub verified: usize,
    pub sent: u64,
    pub received: u64,
    pub control_sent: u64,
    pub control_received: u64,
    pub duration: Duration,
}

impl Variant {
    pub fn lost(&self) -> i64 {
        self.sent as i64 - self.received as i64
    }
    pub fn control_lost(&self) -> i64 {
        self.control_sent as i64 - self.control_received as i64
    }
}

fn ms(sorted: &[u32], percent: f64) -> f64 {
    percentile(sorted, percent).map_or(f64::NAN, f64::from) / 1000.0
}

pub struct WeightResults {
    pub variants: Vec<Variant>,
    pub rate: u64,
    pub new_flow_rate: u64,
    pub min_spacing: Duration,
}

impl WeightResults {
    pub fn checks(&self) -> Vec<TargetCheck> {
        let mut out = Vec::new();
        for v in &self.variants {
            let live = ms(&v.live_us, 99.0);
            let resp = ms(&v.response_us, 99.0);
            out.push(TargetCheck {
                what: format!("weight change p99, request → new table live ({})", v.name),
                measured: format!(
                    "{live:.2} ms (p50 {:.2}); response p99 {resp:.2} ms; probe saw the new table {}/{}",
                    ms(&v.live_us, 50.0),
                    v.verified,
                    v.changes
                ),
                target: "< 5 ms".into(),
                met: live < 5.0 && v.verified == v.changes,
                note: if live < 5.0 { String::new() } else { format!("missed by {:.2} ms", live - 5.0) },
                context: false,
            });
            out.push(TargetCheck {
                what: format!("packets lost during {} weight changes under load ({})", v.changes, v.name),
                measured: format!("{} of {} sent (control window: {})", v.lost(), group(v.sent as f64), v.control_lost()),
                target: "0".into(),
                met: v.lost() <= 0,
                note: String::new(),
                context: false,
            });
        }
        out
    }
}

/// The table the agent builds for weights `a`/`100-a` over the two backends.
fn table_for(a: u32) -> Vec<u16> {
    let targets: Vec<TableTarget> = BACKENDS
        .iter()
        .zip([a, 100 - a])
        .map(|(addr, w)| TableTarget {
            key: u64::from(u32::from(addr.parse::<Ipv4Addr>().unwrap())) << 16 | u64::from(UDP_PORT),
            weight: w * 10_000,
        })
        .collect();
    build_bucket_table(&targets)
}

fn probe_key(sport: u16) -> FlowKey {
    flow_key(PROBE_SOURCE, sport, VIP.parse().unwrap(), UDP_PORT, PROTO_UDP)
}

/// The descriptors of the agent's program and GATEWAYS map (by id, from its fdinfo).
fn agent_objects(pid: u32) -> Result<(OwnedFd, OwnedFd)> {
    let mut prog = None;
    let mut gateways = None;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<u32>().ok()));
        if let Some(id) = field("prog_id:") {
            prog = Some(id);
        }
        if let Some(id) = field("map_id:") {
            let named = aya::maps::MapInfo::from_id(id).ok().and_then(|i| i.name_as_str().map(str::to_string));
            if named.as_deref() == Some("GATEWAYS") {
                gateways = Some(id);
            }
        }
    }
    let (Some(prog), Some(gateways)) = (prog, gateways) else { bail!("the agent holds no program or GATEWAYS map") };
    Ok((fd_by_id(13, prog)?, fd_by_id(14, gateways)?))
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 12]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-padded bpf_attr large enough for the commands used here; the
    // pointers it may hold point at buffers that live across the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr) as u32) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// BPF_PROG_GET_FD_BY_ID (13) or BPF_MAP_GET_FD_BY_ID (14).
fn fd_by_id(cmd: libc::c_long, id: u32) -> Result<OwnedFd> {
    let mut attr = [0u64; 12];
    attr[0] = u64::from(id);
    let fd = bpf(cmd, &mut attr).with_context(|| format!("bpf get fd by id {id}"))?;
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The live generation of the gateway `key` (BPF_MAP_LOOKUP_ELEM).
fn live_generation(map: &OwnedFd, key: &GatewayKey) -> Option<u64> {
    let mut value = GatewayState { gateway_id: 0, table_index: 0, target_count: 0, flags: 0, generation: 0, connect_timeout_ms: 0 };
    let mut attr = [0u64; 12];
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = key as *const GatewayKey as u64;
    attr[2] = &mut value as *mut GatewayState as u64;
    bpf(1, &mut attr).ok().map(|_| u64::from(value.generation))
}

/// BPF_PROG_TEST_RUN of the agent's program: its action and the frame it produced.
fn test_run(program: &OwnedFd, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = [0u64; 12];
    // struct { prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration, ... }
    attr[0] = program.as_raw_fd() as u64;
    attr[1] = frame.len() as u64 | (out.len() as u64) << 32;
    attr[2] = frame.as_ptr() as u64;
    attr[3] = out.as_mut_ptr() as u64;
    attr[4] = 1; // repeat
    bpf(10, &mut attr).context("BPF_PROG_TEST_RUN")?;
    let retval = (attr[0] >> 32) as u32;
    out.truncate((attr[1] >> 32) as usize);
    Ok((retval, out))
}

pub fn run(opts: Options) -> Result<WeightResults> {
    super::ensure_tools(&[("trafgen", "netsniff-ng"), ("ethtool", "ethtool"), ("taskset", "util-linux")])?;
    let changes = if opts.quick { 200 } else { 1000 };
    let rate: u64 = 49_000;
    let new_flow_rate: u64 = 1_000;
    let min_spacing = Duration::from_millis(11);
    let bed = ForwardBed::new()?;
    let mut variants = Vec::new();
    for (name, extra) in
        [("`--ephemeral`: nothing saved", &["--ephemeral"][..]), ("default: state saved (fsync) after each change", &[][..])]
    {
        say(format!("weights: {name}"));
        variants.push(run_variant(&bed, opts, name, extra, changes, rate, new_flow_rate, min_spacing)?);
    }
    Ok(WeightResults { variants, rate, new_flow_rate, min_spacing })
}

#[expect(clippy::too_many_arguments, reason = "one benchmark variant is described by all of these")]
fn run_variant(
    bed: &ForwardBed,
    opts: Options,
    name: &'static str,
    extra: &[&str],
    changes: usize,
    rate: u64,
    new_flow_rate: u64,
    min_spacing: Duration,
) -> Result<Variant> {
    let _ = std::fs::remove_dir_all(bed.run.path().join("state"));
    let agent = bed.start_agent_on("0,1", &gateway_yaml("fullnat"), extra)?;
    let result = (|| -> Result<Variant> {
        let (program, gateways) = agent_objects(agent.pid())?;
        let gateway_key = GatewayKey { vip: ipv4_word(VIP.parse()?), port: UDP_PORT.to_be(), proto: PROTO_UDP, _pad: 0 };
        let mut generation = live_generation(&gateways, &gateway_key).context("no live gateway")?;
        let mut control = Control::connect(&bed.socket())?;
        let established = bed.trafgen_config(VIP, 1000)?;
        let start_load = |new_src: &str| -> Result<(splitter_tests::Process, splitter_tests::Process)> {
            let fresh = bed.trafgen_config_from(new_src, VIP, 20000, 60000)?;
            Ok((bed.spawn_trafgen(&established, Some(rate), None)?, bed.spawn_trafgen(&fresh, Some(new_flow_rate), None)?))
        };
        let stop_load = |(a, b): (splitter_tests::Process, splitter_tests::Process)| -> Result<()> {
            for p in [a, b] {
                super::topo::stop_trafgen(&p)?;
                let _ = p.wait(Duration::from_secs(10))?;
            }
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        };
        // The sink also counts the datagrams the agent sends to prime neighbour entries (one
        // per target per change): the middle namespace's own UDP output, subtracted.
        let counters = || -> Result<(u64, u64)> { Ok((bed.gen_sent()?, bed.sink_count()? - bed.mid.snmp("Udp", "OutDatagrams")?)) };

        // Control window: the same load, no changes.
        let (s0, r0) = counters()?;
        let load = start_load("10.10.1.4")?;
        std::thread::sleep(Duration::from_secs(if opts.quick { 1 } else { 3 }));
        stop_load(load)?;
        let (s1, r1) = counters()?;

        let tables: Vec<Vec<u16>> = CYCLE.iter().map(|&a| table_for(a)).collect();
        let mut live_us = Vec::with_capacity(changes);
        let mut response_us = Vec::with_capacity(changes);
        let mut verified = 0;
        let mut probe_port: u16 = 1024;
        let load = start_load("10.10.1.3")?;
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let mut last = Instant::now();
        let mut current = 0usize; // the config starts at 90/10 = CYCLE[0]
        for i in 0..changes {
            let next = (current + 1) % CYCLE.len();
            let a = CYCLE[next];
            let body = format!("name: bench\nroutes:\n  bench/a:\n    weight: {a}%\n  bench/b:\n    weight: {}%\n", 100 - a);
            let since = last.elapsed();
            if since < min_spacing {
                std::thread::sleep(min_spacing - since);
            }
            let t0 = Instant::now();
            control.send("PUT", "/api/v1/gateways/bench", &body)?;
            // The switch is one update of the gateway's entry: watch it from here.
            let live = loop {
                if live_generation(&gateways, &gateway_key).is_some_and(|g| g > generation) {
                    break Instant::now();
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("change {i}: the live gateway entry did not change within 10 s");
                }
                // Poll, but leave the CPUs to the agent (2 CPUs, the generator on one).
                std::thread::sleep(Duration::from_micros(20));
            };
            let (status, reply) = control.response()?;
            let t1 = Instant::now();
            last = t1;
            if status != 200 {
                bail!("change {i}: status {status}: {reply}");
            }
            generation = live_generation(&gateways, &gateway_key).context("no live gateway")?;
            live_us.push((live - t0).as_micros() as u32);
            response_us.push((t1 - t0).as_micros() as u32);
            // A probe flow the old and new tables send to different targets.
            let (old, new) = (&tables[current], &tables[next]);
            let slot = loop {
                probe_port = probe_port.wrapping_add(1).max(1024);
                let slot = bucket_slot(flow_hash(&probe_key(probe_port))) as usize;
                if old[slot] != new[slot] {
                    break slot;
                }
            };
            let expected: Ipv4Addr = BACKENDS[usize::from(new[slot])].parse()?;
            let frame = Ipv4Packet::new(PROBE_SOURCE, VIP.parse()?, 17, udp(probe_port, UDP_PORT, &[0; 18])).build();
            let (action, out) = bed.mid.enter(|| test_run(&program, &frame))??;
            let got = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
            if got == expected {
                verified += 1;
            } else if i < verified + 5 {
                say(format!("change {i}: probe went to {got} (action {action}), the new table says {expected}"));
            }
            current = next;
        }
        let duration = started.elapsed();
        stop_load(load)?;
        let (s2, r2) = counters()?;
        live_us.sort_unstable();
        response_us.sort_unstable();
        Ok(Variant {
            name,
            changes,
            live_us,
            response_us,
            verified,
            sent: s2 - s1,
            received: r2 - r1,
            control_sent: s1 - s0,
            control_received: r1 - r0,
            duration,
        })
    })();
    agent.signal(libc::SIGTERM)?;
    let _ = agent.wait(Duration::from_secs(15));
    let v = result?;
    say(format!(
        "  live p50 {:.2} ms p99 {:.2} ms, response p50 {:.2} ms p99 {:.2} ms, verified {}/{}, lost {} of {} (control: {} of {})",
        ms(&v.live_us, 50.0),
        ms(&v.live_us, 99.0),
        ms(&v.response_us, 50.0),
        ms(&v.response_us, 99.0),
        v.verified,
        v.changes,
        v.lost(),
        v.sent,
        v.control_lost(),
        v.control_sent
    ));
    Ok(v)
}

pub fn section(r: &WeightResults) -> String {
    let mut lat = String::new();
    let mut loss = String::new();
    for v in &r.variants {
        lat.push_str(&format!(
            "| {} | {} | {:.2} / {:.2} / {:.2} ms | {:.2} / {:.2} / {:.2} ms | {}/{} | {:.1} s |\n",
            v.name,
            v.changes,
            ms(&v.live_us, 50.0),
            ms(&v.live_us, 99.0),
            ms(&v.live_us, 100.0),
            ms(&v.response_us, 50.0),
            ms(&v.response_us, 99.0),
            ms(&v.response_us, 100.0),
            v.verified,
            v.changes,
            v.duration.as_secs_f64()
        ));
        loss.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            v.name,
            group(v.sent as f64),
            group(v.received as f64),
            v.lost(),
            group(v.control_sent as f64),
            group(v.control_received as f64),
            v.control_lost()
        ));
    }
    format!(
        "The agent serves a full-NAT UDP gateway (2 targets) on the forwarding testbed while two trafgen streams \
         go through it: 1000 established flows at {} packets/s and new flows at {} per second, so new flows keep \
         reading the live table. Weights-only documents (`PUT /api/v1/gateways/bench`, 90/10 → 70/30 → 50/50 → \
         30/70 → 10/90 and back) go over one kept-alive connection to the control socket, at least {} ms apart \
         (the agent waits 10 ms between two switches of one gateway before reusing a table buffer). \
         **request → live**: from the request written to the moment the gateway entry the datapath reads \
         (GATEWAYS, looked up by the bench in a tight loop) names the new generation: the switch is that one \
         update. **request → response**: the agent answers after the switch (and, by default, after saving its \
         state with fsync). After each response a probe packet of a new flow that the old and new tables send to \
         different targets is run through the agent's live program (BPF_PROG_TEST_RUN, by program id) and must \
         come out to the new table's target.\n\n\
         | agent | changes | request → live p50 / p99 / max | request → response p50 / p99 / max | probe saw the new table | time |\n\
         |---|---:|---:|---:|---:|---:|\n{lat}\n\
         Packets, counted with the generators stopped (sent by the generator's veth, received = dropped in XDP by \
         the sink, less the datagrams the agent itself sends from the middle namespace to prime neighbour entries):\n\n\
         | agent | sent during the changes | received | lost | control window (no change): sent | received | lost |\n\
         |---|---:|---:|---:|---:|---:|---:|\n{loss}",
        group(r.rate as f64),
        group(r.new_flow_rate as f64),
        r.min_spacing.as_millis(),
    )
}
