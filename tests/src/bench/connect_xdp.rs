//! TCP connection rate between stateless XDP endpoints: what each balancer itself costs
//! per connection, and the rate it reaches, when the clients and backends cost almost
//! nothing (the connect section's kernel sockets at both ends cost more than any balancer
//! here, so there every balancer's rate is capped by them).
//!
//! The client is `bench_tcp_client` on the client's interface and a SYN generator
//! (`bench_syn_gen`, `BPF_PROG_TEST_RUN` live frames, one thread per CPU); the backends are
//! `bench_tcp_server` on the backends' interface. Rules: `splitter_common::bench_tcp`.
//! Every connection is real TCP to whatever sits in the middle: SYN, SYN-ACK, ACK with a
//! 32-byte request, a 40-byte response with FIN, the client's RST (HAProxy's kernel
//! sockets go through their whole handshake and close). The generators keep a bounded
//! number of connections in flight; a connection is complete when its response reaches
//! the client.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, MapData, PerCpuArray, PerCpuValues},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    util::nr_cpus,
    Ebpf,
};

use super::{
    connect::{set_up, tear_down, System, BACKENDS, BACKEND_PORT, CLIENTS, VIP_PORT},
    group, say,
    topo::mac_of,
    CpuSample, Options, TargetCheck,
};
use splitter_common::bench_tcp::{ConnectionCounts, GeneratorState};
use splitter_tests::{
    pin_to_cpu,
    testbed::{helper_object, Testbed, XdpAttachment, VIP},
};

/// Connections in flight, all generators together.
const WINDOW: u32 = 512;
/// Runs of the generator per test_run call (frames beyond the window are dropped by the
/// generator itself), and per batch inside the kernel.
const REPEAT: u32 = 1024;
const BATCH: u32 = 32;
/// The generator's frame: Ethernet, IPv4, TCP, no options (rewritten whole each run).
const FRAME_LEN: usize = 54;
/// A connection not ended this long after its SYN is counted lost (out of the window).
const GIVE_UP_AFTER: Duration = Duration::from_millis(200);

/// What one system measured.
#[derive(Clone, Debug)]
pub struct Row {
    pub system: System,
    pub completed: u64,
    /// Connections the middle reset (RST seen by the client).
    pub reset: u64,
    /// Connections that never completed (given up on after `GIVE_UP_AFTER`, or still open
    /// when the run ended).
    pub lost: u64,
    pub elapsed: Duration,
    /// Busy CPU time of the whole machine (all CPUs) per completed connection, µs.
    pub cpu_us: f64,
    /// The balancer's own process (HAProxy, the agent) per completed connection, µs.
    pub process_us: Option<f64>,
    /// The agent's counts for the run (warm-up included): new flows, failed port claims.
    pub agent_flows: Option<(u64, u64)>,
}

impl Row {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
}

pub struct Results {
    pub rows: Vec<Row>,
    pub seconds: f64,
}

impl Results {
    pub fn row(&self, system: System) -> Option<&Row> {
        self.rows.iter().find(|r| r.system == system)
    }

    pub fn checks(&self) -> Vec<TargetCheck> {
        let mut out = Vec::new();
        let Some(h) = self.row(System::Haproxy) else {
            return out;
        };
        for system in [System::SplitterFullNat, System::SplitterDnat] {
            let Some(s) = self.row(system) else { continue };
            let ratio = s.rate() / h.rate();
            out.push(TargetCheck {
                what: format!("connection rate, {} vs HAProxy (XDP endpoints: clients and backends nearly free)", system.short()),
                measured: format!("{}/s vs {}/s = {ratio:.2}x", group(s.rate()), group(h.rate())),
                target: "≥ 3x".into(),
                met: ratio >= 3.0,
                note: if ratio >= 3.0 { String::new() } else { format!("missed by {:.0}%", (1.0 - ratio / 3.0) * 100.0) },
                context: false,
            });
        }
        out
    }
}

/// The client endpoint and the generator (one object: the generator's and the client's
/// maps), and the server endpoint.
struct Endpoints {
    ebpf: Ebpf,
    /// `BENCH_LOST`, taken out of `ebpf` so it can be written while the generator runs.
    lost_map: Array<MapData, u64>,
    _server: XdpAttachment,
    cli_ifindex: u32,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {text}");
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}

impl Endpoints {
    fn new(bed: &Testbed) -> Result<Self> {
        let mut ebpf = helper_object()?;
        for name in ["bench_tcp_client", "bench_syn_gen"] {
            let prog: &mut Xdp = ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        let server = XdpAttachment::attach(&bed.backends, "bk0", "bench_tcp_server")?;
        let cli_ifindex = bed.client.enter(|| {
            // SAFETY: the name is a NUL-terminated literal.
            unsafe { libc::if_nametoindex(c"cli0".as_ptr()) }
        })?;
        if cli_ifindex == 0 {
            bail!("no cli0 in the client namespace");
        }
        let lost_map = Array::try_from(ebpf.take_map("BENCH_LOST").context("BENCH_LOST")?)?;
        let mut endpoints = Self {
            ebpf,
            lost_map,
            _server: server,
            cli_ifindex,
            src_mac: parse_mac(&mac_of(&bed.client, "cli0")?)?,
            dst_mac: parse_mac(&mac_of(&bed.splitter, "spl-c")?)?,
        };
        endpoints.attach_client(bed)?;
        Ok(endpoints)
    }

    /// Attaches the client endpoint to the client's interface (detached when the object
    /// is dropped).
    fn attach_client(&mut self, bed: &Testbed) -> Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut("bench_tcp_client").context("no client program")?.try_into()?;
        bed.client.enter(|| prog.attach("cli0", XdpMode::Driver))?.context("attaching bench_tcp_client to cli0")?;
        Ok(())
    }

    /// Points every CPU's generator at `target` (connection numbers go on from where
    /// they were, counted in `BENCH_CONNECTIONS`, so no system sees a 5-tuple another one
    /// just used).
    fn aim(&mut self, target: (Ipv4Addr, u16)) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        let mut map: PerCpuArray<_, GeneratorState> =
            PerCpuArray::try_from(self.ebpf.map_mut("BENCH_GENERATOR").context("BENCH_GENERATOR")?)?;
        let values: Vec<GeneratorState> = (0..cpus)
            .map(|cpu| GeneratorState {
                stride: cpus as u32,
                offset: cpu as u32,
                client_base: u32::from_ne_bytes(Ipv4Addr::new(10, 10, 1, 2).octets()),
                clients: CLIENTS as u32,
                target_addr: u32::from_ne_bytes(target.0.octets()),
                target_port: target.1.to_be(),
                src_mac: self.src_mac,
                dst_mac: self.dst_mac,
                _pad: [0; 2],
                window: WINDOW,
            })
            .collect();
        map.set(0, PerCpuValues::try_from(values)?, 0)?;
        Ok(())
    }
}

/// The run's counts so far, all CPUs.
fn counts(ebpf: &Ebpf) -> Result<ConnectionCounts> {
    let map: PerCpuArray<_, ConnectionCounts> = PerCpuArray::try_from(ebpf.map("BENCH_CONNECTIONS").context("BENCH_CONNECTIONS")?)?;
    Ok(map.get(&0, 0)?.iter().fold(ConnectionCounts::default(), |sum, c| sum.plus(c)))
}

/// Sends SYNs from this thread (in the client namespace, pinned to `cpu`) until `stop`;
/// the generator keeps the window, and this thread sleeps while it is full.
fn generate(prog: &Xdp, ifindex: u32, cpu: usize, window_full: &AtomicBool, stop: &AtomicBool) -> Result<()> {
    // Best effort: an unpinned generator still generates.
    let _ = pin_to_cpu(cpu);
    let frame = [0u8; FRAME_LEN];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: [u32; 6] = [0, FRAME_LEN as u32, 0, ifindex, 0, 0];
    // SAFETY: plain integers viewed as bytes.
    let ctx_bytes = unsafe { std::slice::from_raw_parts(ctx.as_ptr().cast::<u8>(), std::mem::size_of_val(&ctx)) };
    while !stop.load(Ordering::Relaxed) {
        if window_full.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        prog.test_run(TestRunOptions {
            data_in: Some(&frame),
            ctx_in: Some(ctx_bytes),
            repeat: REPEAT,
            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
            ..Default::default()
        })
        .context("test_run (live frames) of bench_syn_gen")?;
    }
    Ok(())
}

/// Runs the generators for `warmup + duration` against the current setup.
fn load(endpoints: &mut Endpoints, bed: &Testbed, system: System, warmup: Duration, duration: Duration) -> Result<Row> {
    let cpus = nr_cpus().map_err(|(_, e)| e)?;
    let ifindex = endpoints.cli_ifindex;
    let Endpoints { ebpf, lost_map, .. } = endpoints;
    let ebpf = &*ebpf;
    // Whatever earlier runs left in flight is written off: out of the window.
    let mut lost = counts(ebpf)?.in_flight(0);
    lost_map.set(0, lost, 0)?;
    let window_full = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let prog: &Xdp = ebpf.program("bench_syn_gen").context("no generator")?.try_into()?;
    let mut row = std::thread::scope(|scope| -> Result<Row> {
        let mut threads = Vec::new();
        for cpu in 0..cpus {
            let (window_full, stop, client) = (&window_full, &stop, &bed.client);
            threads.push(scope.spawn(move || client.enter(|| generate(prog, ifindex, cpu, window_full, stop))?));
        }
        let start = Instant::now();
        // (time, connections started by then), to find those older than GIVE_UP_AFTER.
        let mut history: std::collections::VecDeque<(Instant, u64)> = std::collections::VecDeque::new();
        let mut marks: Option<(Instant, CpuSample, ConnectionCounts, u64)> = None;
        let result = (|| -> Result<Row> {
            loop {
                std::thread::sleep(Duration::from_micros(500));
                let now = counts(ebpf)?;
                history.push_back((Instant::now(), now.started));
                // Connections end about in the order they started: those started before
                // the cut-off and still not ended are lost.
                let mut started_before = None;
                while history.front().is_some_and(|(at, _)| at.elapsed() > GIVE_UP_AFTER) {
                    started_before = history.pop_front().map(|(_, started)| started);
                }
                if let Some(started) = started_before {
                    let overdue = started.saturating_sub(now.completed + now.reset);
                    if overdue > lost {
                        lost = overdue;
                        lost_map.set(0, lost, 0)?;
                    }
                }
                window_full.store(now.in_flight(lost) + u64::from(BATCH) >= u64::from(WINDOW), Ordering::Relaxed);
                let elapsed = start.elapsed();
                if marks.is_none() && elapsed >= warmup {
                    marks = Some((Instant::now(), CpuSample::take(), now, lost));
                }
                if elapsed >= warmup + duration {
                    let (t0, cpu0, c0, l0) = marks.take().context("no measurement start")?;
                    let cpu = CpuSample::take().since(&cpu0);
                    let completed = now.completed - c0.completed;
                    if completed == 0 {
                        bail!("no connection completed");
                    }
                    return Ok(Row {
                        system,
                        completed,
                        reset: now.reset - c0.reset,
                        lost: lost - l0,
                        elapsed: t0.elapsed(),
                        cpu_us: cpu.all_busy.as_secs_f64() * 1e6 / completed as f64,
                        process_us: None,
                        agent_flows: None,
                    });
                }
                if threads.iter().any(|t| t.is_finished()) {
                    bail!("a generator thread stopped early");
                }
            }
        })();
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
        }
        result
    })?;
    // Connections still open when the run ended: given time to finish, the rest is lost.
    std::thread::sleep(Duration::from_millis(300));
    row.lost += counts(ebpf)?.in_flight(lost);
    Ok(row)
}

pub fn run(opts: Options) -> Result<Results> {
    super::ensure_tools(&[("nft", "nftables"), ("haproxy", "haproxy")])?;
    let seconds = if opts.quick { 1.5 } else { 4.0 };
    let cpus = nr_cpus().map_err(|(_, e)| e)?;
    let mut bed = Testbed::with_queues(cpus)?;
    for addr in BACKENDS {
        bed.backends.ip(&["addr", "add", &format!("{addr}/24"), "dev", "bk0"])?;
    }
    for i in 1..CLIENTS {
        bed.add_client_addr(&format!("10.10.1.{}", 2 + i))?;
    }
    bed.splitter.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    bed.detach_peer_programs();
    // Resolve the clients' and backends' addresses now (the endpoints pass ICMP and ARP
    // to their kernels), so no run starts by losing SYNs to neighbour resolution.
    for i in 0..CLIENTS {
        bed.splitter.run("ping", &["-c", "1", "-W", "1", &format!("10.10.1.{}", 2 + i)])?;
    }
    for addr in BACKENDS {
        bed.splitter.run("ping", &["-c", "1", "-W", "1", addr])?;
    }
    let mut endpoints = Endpoints::new(&bed)?;
    let mut rows = Vec::new();
    for system in System::ALL {
        say(format!("connect-xdp: {}", system.short()));
        let target = if system == System::Direct { (BACKENDS[0].parse()?, BACKEND_PORT) } else { (VIP.parse()?, VIP_PORT) };
        endpoints.aim(target)?;
        let setup = set_up(&mut bed, system).with_context(|| format!("setting up {}", system.short()))?;
        if system == System::Nftables {
            // A reset connection stays in the kernel's conntrack for 10 s by default: at
            // these rates that fills its table (262 144 entries, not settable from a
            // namespace) and new connections are dropped. The splitter forgets a reset
            // flow at once; give nftables the same with a 1 s close timeout.
            bed.splitter.sysctl("net.netfilter.nf_conntrack_tcp_timeout_close", "1")?;
        }
        // Without the splitter, the middle's interfaces need an XDP program too: frames
        // sent with XDP_TX into a veth whose peer has none are dropped.
        let passes = if matches!(system, System::SplitterFullNat | System::SplitterDnat) {
            Vec::new()
        } else {
            vec![XdpAttachment::attach(&bed.splitter, "spl-c", "xdp_pass")?, XdpAttachment::attach(&bed.splitter, "spl-b", "xdp_pass")?]
        };
        let middle = setup.pid(&bed, system);
        let middle_before = middle.map(super::process_time);
        let mut result = load(&mut endpoints, &bed, system, Duration::from_millis(500), Duration::from_secs_f64(seconds));
        if let Ok(row) = &mut result {
            if let (Some(pid), Some(t0)) = (middle, middle_before) {
                // Over warm-up and run alike: per connection started in both.
                let spent = super::process_time(pid).saturating_sub(t0);
                let total = row.completed as f64 * (1.0 + 0.5 / seconds);
                row.process_us = Some(spent.as_secs_f64() * 1e6 / total);
            }
            if matches!(system, System::SplitterFullNat | System::SplitterDnat) {
                let stats = bed.stats()?;
                let field = |name: &str| stats[0][name].as_u64().unwrap_or(0);
                row.agent_flows = Some((field("new_flows"), field("alloc_failed")));
            }
            say(format!(
                "  {} conn/s, {:.1} µs CPU/connection (both CPUs), balancer process {:?} µs, reset {}, lost {}, agent (flows, failed claims) {:?}",
                group(row.rate()),
                row.cpu_us,
                row.process_us.map(|p| (p * 10.0).round() / 10.0),
                row.reset,
                row.lost,
                row.agent_flows,
            ));
        }
        drop(passes);
        tear_down(&mut bed, system, setup)?;
        rows.push(result.with_context(|| format!("measuring {}", system.short()))?);
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(Results { rows, seconds })
}

pub fn section(r: &Results) -> String {
    let mut agent = String::new();
    for row in &r.rows {
        if let Some((flows, failed)) = row.agent_flows {
            agent.push_str(&format!(
                "\nThe agent counted {} new flows in the {} run (warm-up included) and {failed} failed source-port claims.",
                group(flows as f64),
                row.system.short()
            ));
        }
    }
    if !agent.is_empty() {
        agent.push('\n');
    }
    let haproxy = r.row(System::Haproxy).map_or(f64::NAN, Row::rate);
    let nft = r.row(System::Nftables).map_or(f64::NAN, Row::rate);
    let direct = r.row(System::Direct).map_or(f64::NAN, |d| d.cpu_us);
    let mut rows = String::new();
    for row in &r.rows {
        let above = if row.system == System::Direct { "—".to_string() } else { format!("{:+.1}", row.cpu_us - direct) };
        rows.push_str(&format!(
            "| {} | {} | {:.2}x | {:.2}x | {:.1} | {} | {} | {} | {} |\n",
            row.system.label(),
            group(row.rate()),
            row.rate() / haproxy,
            row.rate() / nft,
            row.cpu_us,
            above,
            row.process_us.map_or("—".to_string(), |p| format!("{p:.1}")),
            row.reset,
            row.lost,
        ));
    }
    format!(
        "The same systems, gateway and weights as the section above, with both ends replaced by stateless \
         XDP endpoints (`bench_tcp_client`, `bench_tcp_server` in splitter-ebpf/src/bench.rs, rules in \
         `splitter_common::bench_tcp`), so that clients and backends cost next to nothing and each \
         balancer's rate is bounded by its own cost: the target's \"backends fast enough not to be the \
         bottleneck\". Every connection is real TCP to the middle: SYN, SYN-ACK, ACK with a 32-byte request, \
         a 40-byte response with FIN, the client's RST; HAProxy's kernel sockets go through their whole \
         handshake and close (its server side too: the server endpoint ACKs HAProxy's FIN). SYNs come from \
         `bench_syn_gen` run with `BPF_PROG_TEST_RUN` live frames on the client's interface, one thread per \
         CPU, {CLIENTS} client addresses × 64 512 ports; the generator itself keeps at most {WINDOW} \
         connections in flight. The veths have one queue per CPU (with one queue, frames two CPUs send \
         overflow each other's ring). {:.1} s measured after a 0.5 s warm-up; a connection counts when its \
         response reaches the client.\n\n\
         **CPU/conn** is the busy time of both CPUs (/proc/stat: generator, endpoints, balancer, \
         everything) per completed connection; **above direct** is what the balancer adds to kernel \
         routing (negative for the splitter: with XDP at every hop a frame never becomes a socket \
         buffer, while kernel routing builds one per packet); **balancer process** is the CPU time of \
         HAProxy's or the agent's own process (the splitter's work runs in the kernel, in softirq, and is \
         in CPU/conn). **reset**: connections the middle reset; **lost**: connections that never \
         completed (frames the kernel paths dropped at a full veth ring; the generator gives a \
         connection up after 200 ms). nftables runs with a 1 s conntrack timeout for \
         closed connections (`nf_conntrack_tcp_timeout_close`: the default 10 s fills the kernel's \
         conntrack table at these rates; the splitter forgets a reset flow at once).\n\n\
         | system | connections/s | vs HAProxy | vs nftables | CPU µs/conn | above direct | balancer process µs/conn | reset | lost |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n{rows}{agent}",
        r.seconds
    )
}
