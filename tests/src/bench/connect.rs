//! TCP connection rate and latency: short connections (connect, one request, one response,
//! close) from many client addresses through each system to four weighted backends
//! (40/30/20/10), on the standard testbed (client, splitter, backends namespaces).
//!
//! The client is an epoll loop per CPU holding a fixed number of connections in flight;
//! the backends are accept loops (SO_REUSEPORT, TCP_DEFER_ACCEPT) that read the request,
//! answer and close. Both are in this process, on threads that entered their namespaces.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    group, percentile, say,
    topo::{spawn_in, wait_until},
    Options, TargetCheck,
};
use splitter_tests::{
    process::Process,
    testbed::{Testbed, VIP},
};

pub(super) const BACKENDS: [&str; 4] = ["10.10.2.11", "10.10.2.12", "10.10.2.13", "10.10.2.14"];
const WEIGHTS: [u32; 4] = [40, 30, 20, 10];
pub(super) const BACKEND_PORT: u16 = 8080;
pub(super) const VIP_PORT: u16 = 80;
pub(super) const CLIENTS: usize = 8;
const REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    Direct,
    SplitterFullNat,
    SplitterDnat,
    Nftables,
    Haproxy,
}

impl System {
    pub const ALL: [System; 5] = [System::Direct, System::SplitterFullNat, System::SplitterDnat, System::Nftables, System::Haproxy];

    pub fn label(self) -> &'static str {
        match self {
            System::Direct => "no balancer: client to one backend, kernel routing",
            System::SplitterFullNat => "**splitter, full NAT** (native XDP)",
            System::SplitterDnat => "**splitter, DNAT** (native XDP)",
            System::Nftables => "nftables weighted DNAT (numgen + conntrack)",
            System::Haproxy => "HAProxy, TCP mode, weighted servers",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            System::Direct => "direct (no balancer)",
            System::SplitterFullNat => "splitter fullnat",
            System::SplitterDnat => "splitter dnat",
            System::Nftables => "nftables DNAT",
            System::Haproxy => "HAProxy",
        }
    }
}

/// What one load run measured.
#[derive(Clone, Debug, Default)]
pub struct Load {
    pub completed: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Latency of each counted connection (µs), sorted.
    pub latencies_us: Vec<u32>,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
    pub fn p(&self, percent: f64) -> f64 {
        percentile(&self.latencies_us, percent).map_or(f64::NAN, f64::from)
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    pub system: System,
    pub loaded: Load,
    pub unloaded: Load,
    /// CPU per completed connection under load (µs): client and backend threads, the
    /// balancer's process (agent, HAProxy) and ksoftirqd.
    pub cpu_us: f64,
}

pub struct ConnectResults {
    pub rows: Vec<Row>,
    pub seconds: f64,
    pub concurrency: usize,
    pub threads: usize,
}

impl ConnectResults {
    pub fn row(&self, system: System) -> Option<&Row> {
        self.rows.iter().find(|r| r.system == system)
    }

    pub fn checks(&self) -> Vec<TargetCheck> {
        let mut out = Vec::new();
        let Some(h) = self.row(System::Haproxy) else { return out };
        for system in [System::SplitterFullNat, System::SplitterDnat] {
            let Some(s) = self.row(system) else { continue };
            let ratio = s.loaded.rate() / h.loaded.rate();
            let ceiling = self.row(System::Direct).map_or(f64::NAN, |d| d.loaded.rate() / h.loaded.rate());
            let direct_cpu = self.row(System::Direct).map_or(f64::NAN, |d| d.cpu_us);
            out.push(TargetCheck {
                what: format!("connection rate, {} vs HAProxy, kernel-socket clients and backends on the same 2 CPUs", system.short()),
                measured: format!("{}/s vs {}/s = {ratio:.2}x", group(s.loaded.rate()), group(h.loaded.rate())),
                target: "(≥ 3x with backends that are not the bottleneck)".into(),
                met: ratio >= 3.0,
                note: format!(
                    "here the clients and backends are the bottleneck: no balancer at all reaches only {ceiling:.2}x HAProxy; \
                     CPU per connection added: {:.1} µs vs HAProxy's {:.1} µs; the target's figure is the XDP-endpoint row",
                    s.cpu_us - direct_cpu,
                    h.cpu_us - direct_cpu,
                ),
                context: true,
            });
        }
        out
    }
}

struct Backends {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Backends {
    fn start(bed: &Testbed, threads: usize) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        for _ in 0..threads {
            let stop = stop.clone();
            let ready = ready_tx.clone();
            handles.push(spawn_in(&bed.backends, move || serve(&stop, &ready))?);
        }
        for _ in 0..threads {
            ready_rx.recv_timeout(Duration::from_secs(5))?.map_err(anyhow::Error::msg)?;
        }
        Ok(Self { stop, threads: handles })
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: `value` is a live c_int whose size is passed alongside.
    let rc = unsafe { libc::setsockopt(fd, level, name, (&value as *const i32).cast(), std::mem::size_of::<i32>() as u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One backend accept loop on 0.0.0.0:BACKEND_PORT until `stop`.
fn serve(stop: &AtomicBool, ready: &std::sync::mpsc::Sender<Result<(), String>>) {
    use socket2::{Domain, Socket, Type};
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let listener = (|| -> std::io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        setsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        setsockopt_int(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, 1)?;
        s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, BACKEND_PORT).into())?;
        s.listen(4096)?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(s.into())
    })();
    let listener = match listener {
        Ok(l) => {
            let _ = ready.send(Ok(()));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(format!("backend listener: {e}")));
            return;
        }
    };
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut stream, _)) = listener.accept() else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        if stream.read(&mut buf).is_ok() {
            let _ = stream.write_all(RESPONSE);
        }
    }
}

struct Conn {
    fd: i32,
    start: Instant,
    reading: bool,
}

/// Keeps `concurrency` connections in flight from `sources` to `target` until `end`;
/// counts those that complete after `count_from`.
fn client_loop(sources: &[Ipv4Addr], target: SocketAddrV4, concurrency: usize, count_from: Instant, end: Instant) -> Load {
    // SAFETY: plain epoll/socket syscalls on descriptors owned by this function; every
    // buffer passed lives across its call.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        assert!(ep >= 0);
        let mut conns: Vec<Option<Conn>> = (0..concurrency).map(|_| None).collect();
        let mut load = Load::default();
        let mut next_source = 0usize;
        let target_sa = sockaddr(target);
        let open = |slot: usize, next_source: &mut usize| -> Option<Conn> {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return None;
            }
            let _ = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1);
            let src = sockaddr(SocketAddrV4::new(sources[*next_source % sources.len()], 0));
            *next_source += 1;
            let start = Instant::now();
            if libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32) != 0
                || (libc::connect(fd, (&target_sa as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32)
                    != 0
                    && *libc::__errno_location() != libc::EINPROGRESS)
            {
                libc::close(fd);
                return None;
            }
            let mut ev = libc::epoll_event { events: libc::EPOLLOUT as u32, u64: slot as u64 };
            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev);
            Some(Conn { fd, start, reading: false })
        };
        for (slot, conn) in conns.iter_mut().enumerate().take(concurrency) {
            *conn = open(slot, &mut next_source);
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut buf = [0u8; 512];
        let mut last_sweep = Instant::now();
        while Instant::now() < end {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 20);
            for e in events.iter().take(n.max(0) as usize) {
                let slot = e.u64 as usize;
                let Some(conn) = conns[slot].as_mut() else { continue };
                let mut finished: Option<bool> = None; // Some(true) = completed, Some(false) = failed
                if !conn.reading {
                    let mut err: i32 = 0;
                    let mut len = std::mem::size_of::<i32>() as u32;
                    libc::getsockopt(conn.fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut i32).cast(), &mut len);
                    if err != 0 || libc::send(conn.fd, REQUEST.as_ptr().cast(), REQUEST.len(), libc::MSG_NOSIGNAL) != REQUEST.len() as isize
                    {
                        finished = Some(false);
                    } else {
                        conn.reading = true;
                        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: slot as u64 };
                        libc::epoll_ctl(ep, libc::EPOLL_CTL_MOD, conn.fd, &mut ev);
                    }
                } else {
                    loop {
                        let r = libc::recv(conn.fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                        if r > 0 {
                            continue;
                        }
                        if r == 0 {
                            finished = Some(true);
                        } else if *libc::__errno_location() != libc::EAGAIN {
                            finished = Some(false);
                        }
                        break;
                    }
                }
                if let Some(ok) = finished {
                    let now = Instant::now();
                    if now >= count_from {
                        if ok {
                            load.completed += 1;
                            if conn.start >= count_from {
                                load.latencies_us.push((now - conn.start).as_micros().min(u128::from(u32::MAX)) as u32);
                            }
                        } else {
                            load.errors += 1;
                        }
                    }
                    libc::close(conn.fd);
                    conns[slot] = open(slot, &mut next_source);
                }
            }
            // Connections stuck for 3 s (a lost SYN retried twice) count as errors.
            if last_sweep.elapsed() > Duration::from_millis(200) {
                last_sweep = Instant::now();
                for (slot, conn) in conns.iter_mut().enumerate().take(concurrency) {
                    let stale = match conn {
                        Some(c) => c.start.elapsed() > Duration::from_secs(3),
                        None => true,
                    };
                    if stale {
                        if let Some(c) = conn.take() {
                            libc::close(c.fd);
                            if Instant::now() >= count_from {
                                load.errors += 1;
                            }
                        }
                        *conn = open(slot, &mut next_source);
                    }
                }
            }
        }
        for c in conns.into_iter().flatten() {
            libc::close(c.fd);
        }
        libc::close(ep);
        load.elapsed = end.saturating_duration_since(count_from);
        load
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    }
}

/// Runs `threads` client loops in the client namespace for `warmup + duration`.
fn load(bed: &Testbed, target: SocketAddrV4, threads: usize, concurrency: usize, warmup: Duration, duration: Duration) -> Result<Load> {
    let sources: Vec<Ipv4Addr> = (0..CLIENTS).map(|i| Ipv4Addr::new(10, 10, 1, 2 + i as u8)).collect();
    let start = Instant::now();
    let count_from = start + warmup;
    let end = count_from + duration;
    let mut handles = Vec::new();
    for t in 0..threads {
        let mut sources = sources.clone();
        sources.rotate_left(t % CLIENTS);
        handles.push(spawn_in(&bed.client, move || client_loop(&sources, target, concurrency, count_from, end))?);
    }
    let mut total = Load::default();
    for h in handles {
        let l = h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?;
        total.completed += l.completed;
        total.errors += l.errors;
        total.elapsed = total.elapsed.max(l.elapsed);
        total.latencies_us.extend(l.latencies_us);
    }
    total.latencies_us.sort_unstable();
    Ok(total)
}

fn gateway_yaml(mode: &str) -> String {
    let mut routes = String::new();
    for (i, (addr, w)) in BACKENDS.iter().zip(WEIGHTS).enumerate() {
        routes.push_str(&format!("  bench/v{i}:\n    weight: {w}%\n    targets: [{addr}:{BACKEND_PORT}]\n"));
    }
    format!("name: bench\nport: {VIP_PORT}/tcp\nvirtual_address: {VIP}\nmode: {mode}\nroutes:\n{routes}")
}

fn nft_ruleset() -> String {
    let mut map = Vec::new();
    let mut from = 0;
    for (addr, w) in BACKENDS.iter().zip(WEIGHTS) {
        map.push(format!("{from}-{} : {addr}", from + w - 1));
        from += w;
    }
    format!(
        "table ip bench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {VIP} tcp dport {VIP_PORT} dnat to numgen random mod 100 map {{ {} }} : {BACKEND_PORT}\n  }}\n}}\n",
        map.join(", ")
    )
}

fn haproxy_config() -> String {
    let mut servers = String::new();
    for (i, (addr, w)) in BACKENDS.iter().zip(WEIGHTS).enumerate() {
        servers.push_str(&format!("  server s{i} {addr}:{BACKEND_PORT} weight {w}\n"));
    }
    format!(
        "global\n  maxconn 8000\n  nbthread 2\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  \
         timeout server 30s\n\nfrontend fe\n  bind {VIP}:{VIP_PORT} thread 1\n  bind {VIP}:{VIP_PORT} thread 2\n  default_backend be\n\nbackend be\n  balance roundrobin\n{servers}"
    )
}

pub(super) enum Setup {
    Nothing,
    Nft,
    Haproxy(Process),
}

impl Setup {
    /// The balancer's own process, if it has one in this setup.
    pub(super) fn pid(&self, bed: &Testbed, system: System) -> Option<u32> {
        match (self, system) {
            (Setup::Haproxy(p), _) => Some(p.pid()),
            (_, System::SplitterFullNat | System::SplitterDnat) => Some(bed.agent().pid()),
            _ => None,
        }
    }
}

pub(super) fn set_up(bed: &mut Testbed, system: System) -> Result<Setup> {
    Ok(match system {
        System::Direct => Setup::Nothing,
        System::SplitterFullNat | System::SplitterDnat => {
            let mode = if system == System::SplitterFullNat { "fullnat" } else { "dnat" };
            bed.write_config("bench.yaml", &gateway_yaml(mode))?;
            bed.start_agent(&["--ephemeral"])?;
            bed.wait_applied("bench", 1)?;
            Setup::Nothing
        }
        System::Nftables => {
            super::topo::nft(&bed.splitter, &bed.run_dir, &nft_ruleset())?;
            Setup::Nft
        }
        System::Haproxy => {
            bed.splitter.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            let cfg = bed.run_dir.path().join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_config())?;
            let p = bed.splitter.spawn("haproxy", &["-db", "-f", &cfg.display().to_string()])?;
            // Listening is enough (a test connection would need a kernel client, and the
            // XDP-endpoint benchmark has none).
            let listen = format!("{VIP}:{VIP_PORT}");
            wait_until(Duration::from_secs(10), "HAProxy to listen", || {
                bed.splitter.run("ss", &["-Hltn"]).map(|out| out.contains(&listen)).unwrap_or(false)
            })?;
            Setup::Haproxy(p)
        }
    })
}

pub(super) fn tear_down(bed: &mut Testbed, system: System, setup: Setup) -> Result<()> {
    match system {
        System::SplitterFullNat | System::SplitterDnat => {
            bed.stop_agent()?;
        }
        System::Nftables => {
            bed.splitter.run("nft", &["delete", "table", "ip", "bench"])?;
        }
        System::Haproxy => {
            drop(setup);
            bed.splitter.ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"])?;
        }
        System::Direct => {}
    }
    Ok(())
}

pub fn run(opts: Options) -> Result<ConnectResults> {
    super::ensure_tools(&[("nft", "nftables"), ("haproxy", "haproxy")])?;
    let seconds = if opts.quick { 2.0 } else { 5.0 };
    let threads = 2;
    let concurrency = 32;
    let mut bed = Testbed::new()?;
    for addr in BACKENDS {
        bed.backends.ip(&["addr", "add", &format!("{addr}/24"), "dev", "bk0"])?;
    }
    for i in 1..CLIENTS {
        bed.add_client_addr(&format!("10.10.1.{}", 2 + i))?;
    }
    bed.client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    bed.splitter.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    bed.splitter.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    bed.backends.sysctl("net.core.somaxconn", "8192")?;
    bed.backends.sysctl("net.ipv4.tcp_max_syn_backlog", "8192")?;
    let _backends = Backends::start(&bed, 2)?;
    let mut rows = Vec::new();
    for system in System::ALL {
        say(format!("connect: {}", system.short()));
        let target = if system == System::Direct {
            SocketAddrV4::new(BACKENDS[0].parse()?, BACKEND_PORT)
        } else {
            SocketAddrV4::new(VIP.parse()?, VIP_PORT)
        };
        let setup = set_up(&mut bed, system).with_context(|| format!("setting up {}", system.short()))?;
        let result = (|| -> Result<Row> {
            let unloaded = load(&bed, target, 1, 1, Duration::from_millis(200), Duration::from_secs_f64(seconds / 4.0))?;
            // Warm-up at full load (not counted), then the measured run.
            load(&bed, target, threads, concurrency, Duration::ZERO, Duration::from_millis(500))?;
            let middle = setup.pid(&bed, system);
            let cpu_before = (super::CpuSample::take(), middle.map(super::process_time));
            let loaded = load(&bed, target, threads, concurrency, Duration::ZERO, Duration::from_secs_f64(seconds))?;
            let cpu = super::CpuSample::take().since(&cpu_before.0);
            let middle_cpu = match (middle, cpu_before.1) {
                (Some(pid), Some(t0)) => super::process_time(pid).saturating_sub(t0),
                _ => Duration::ZERO,
            };
            if loaded.completed == 0 {
                bail!("no connection completed");
            }
            let cpu_us = (cpu.this_and_softirq + middle_cpu).as_secs_f64() * 1e6 / loaded.completed as f64;
            Ok(Row { system, loaded, unloaded, cpu_us })
        })();
        if let Ok(row) = &result {
            say(format!(
                "  {} conn/s, {:.1} µs CPU/connection, p50 {:.0} µs, p99 {:.0} µs, errors {}; unloaded p50 {:.0} µs",
                group(row.loaded.rate()),
                row.cpu_us,
                row.loaded.p(50.0),
                row.loaded.p(99.0),
                row.loaded.errors,
                row.unloaded.p(50.0)
            ));
            if matches!(system, System::SplitterFullNat | System::SplitterDnat) {
                if let Ok(stats) = bed.stats() {
                    say(format!("  agent stats: {stats}"));
                }
            }
        }
        tear_down(&mut bed, system, setup)?;
        rows.push(result.with_context(|| format!("measuring {}", system.short()))?);
        // Let closing connections finish (TIME_WAIT, conntrack) before the next system.
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(ConnectResults { rows, seconds, concurrency, threads })
}

pub fn section(r: &ConnectResults) -> String {
    let haproxy = r.row(System::Haproxy).map_or(f64::NAN, |h| h.loaded.rate());
    let nft = r.row(System::Nftables).map_or(f64::NAN, |h| h.loaded.rate());
    let direct = r.row(System::Direct).map_or(f64::NAN, |d| d.cpu_us);
    let mut rows = String::new();
    for row in &r.rows {
        let above = if row.system == System::Direct { "—".to_string() } else { format!("{:+.1}", row.cpu_us - direct) };
        rows.push_str(&format!(
            "| {} | {} | {:.2}x | {:.2}x | {:.1} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |\n",
            row.system.label(),
            group(row.loaded.rate()),
            row.loaded.rate() / haproxy,
            row.loaded.rate() / nft,
            row.cpu_us,
            above,
            row.loaded.p(50.0),
            row.loaded.p(90.0),
            row.loaded.p(99.0),
            row.unloaded.p(50.0),
            row.unloaded.p(99.0),
            row.loaded.errors,
        ));
    }
    format!(
        "Short TCP connections (connect, 31-byte request, 40-byte response, the backend closes) from {CLIENTS} \
         client addresses to a VIP balanced over 4 backends weighted 40/30/20/10 (the direct row goes to one \
         backend with no balancer: the ceiling of client and backends on this machine). The client keeps {} \
         connections in flight ({} epoll threads × {}) for {:.0} s after a 0.5 s warm-up; latency is connect \
         to the response's end, per connection. `unloaded` is one connection at a time. Client, balancer and \
         backends share the machine's 2 CPUs, so a balancer's rate is what is left after its own CPU cost; the \
         direct row (no balancer) is therefore the ceiling of every balancer here. **CPU/conn** is the CPU time \
         of the client and backend threads, the balancer's own process (agent or HAProxy) and ksoftirqd, per \
         completed connection; **above direct** is what the balancer adds.\n\n\
         | system | connections/s | vs HAProxy | vs nftables | CPU µs/conn | above direct | p50 µs | p90 µs | p99 µs | unloaded p50 µs | unloaded p99 µs | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n{rows}",
        r.threads * r.concurrency,
        r.threads,
        r.concurrency,
        r.seconds
    )
}
