//! The forwarding testbed, in three namespaces this process owns:
//!
//! ```text
//!  gen (trafgen, CPU 0)       mid (the system under test)          sink (XDP_DROP)
//!  cli0 10.10.1.2  ---------  spl-c 10.10.1.1 | spl-b 10.10.2.1  ---------  bk0 10.10.2.2
//!  2001:db8:1::2              2001:db8:1::1 | 2001:db8:2::1             2001:db8:2::11, ::21
//! ```
//!
//! The sink drops every frame in XDP (its stack is not counted) and counts them; the
//! middle namespace has static neighbour entries for the backends (no ARP answer comes back
//! through XDP_DROP). The generator writes raw frames (trafgen, PF_PACKET), so it needs no
//! route. Everything is removed on drop.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{CpuDelta, CpuSample};
use splitter_tests::{
    process::Process,
    splitter_bin,
    testbed::{TempDir, XdpAttachment},
    Netns, Veth,
};

pub const VIP: &str = "10.0.0.10";
pub const GEN_ADDR: &str = "10.10.1.2";
/// Backend addresses (on the sink's veth, which drops everything).
pub const BACKENDS: [&str; 2] = ["10.10.2.11", "10.10.2.21"];
pub const UDP_PORT: u16 = 9000;
/// The IPv6 side of the testbed: the VIP, the generator, the backends.
pub const VIP6: &str = "2001:db8::10";
pub const GEN_ADDR6: &str = "2001:db8:1::2";
pub const BACKENDS6: [&str; 2] = ["2001:db8:2::11", "2001:db8:2::21"];

pub struct ForwardBed {
    pub gen: Netns,
    pub mid: Netns,
    pub sink: Netns,
    pub gen_mac: String,
    pub mid_in_mac: String,
    pub run: TempDir,
    _sink_drop: XdpAttachment,
}

pub fn mac_of(ns: &Netns, dev: &str) -> Result<String> {
    let json = ns.ip_output(&["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    Ok(v[0]["address"].as_str().context("no MAC")?.to_string())
}

impl ForwardBed {
    pub fn new() -> Result<Self> {
        let gen = Netns::new_dual_stack("gen")?;
        let mid = Netns::new_dual_stack("mid")?;
        let sink = Netns::new_dual_stack("sink")?;
        Veth::create(&gen, "cli0", &format!("{GEN_ADDR}/24"), &mid, "spl-c", "10.10.1.1/24")?;
        Veth::create(&sink, "bk0", "10.10.2.2/24", &mid, "spl-b", "10.10.2.1/24")?;
        for addr in BACKENDS {
            sink.ip(&["addr", "add", &format!("{addr}/24"), "dev", "bk0"])?;
        }
        gen.ip(&["route", "add", "default", "via", "10.10.1.1"])?;
        sink.ip(&["route", "add", "default", "via", "10.10.2.1"])?;
        mid.sysctl("net.ipv4.ip_forward", "1")?;
        for dev in ["all", "spl-c", "spl-b"] {
            mid.sysctl(&format!("net.ipv4.conf.{dev}.accept_local"), "1")?;
            mid.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
        }
        let sink_mac = mac_of(&sink, "bk0")?;
        for addr in BACKENDS.iter().chain(&["10.10.2.2"]) {
            mid.ip(&["neigh", "replace", addr, "lladdr", &sink_mac, "dev", "spl-b", "nud", "permanent"])?;
        }
        let gen_mac = mac_of(&gen, "cli0")?;
        mid.ip(&["neigh", "replace", GEN_ADDR, "lladdr", &gen_mac, "dev", "spl-c", "nud", "permanent"])?;
        gen.ip(&["-6", "addr", "add", &format!("{GEN_ADDR6}/64"), "dev", "cli0", "nodad"])?;
        mid.ip(&["-6", "addr", "add", "2001:db8:1::1/64", "dev", "spl-c", "nodad"])?;
        mid.ip(&["-6", "addr", "add", "2001:db8:2::1/64", "dev", "spl-b", "nodad"])?;
        for addr in BACKENDS6 {
            sink.ip(&["-6", "addr", "add", &format!("{addr}/64"), "dev", "bk0", "nodad"])?;
            mid.ip(&["neigh", "replace", addr, "lladdr", &sink_mac, "dev", "spl-b", "nud", "permanent"])?;
        }
        mid.ip(&["neigh", "replace", GEN_ADDR6, "lladdr", &gen_mac, "dev", "spl-c", "nud", "permanent"])?;
        mid.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let sink_drop = XdpAttachment::attach(&sink, "bk0", "xdp_drop")?;
        Ok(Self { mid_in_mac: mac_of(&mid, "spl-c")?, gen, mid, sink, gen_mac, run: TempDir::new("bench")?, _sink_drop: sink_drop })
    }

    /// Frames the sink has dropped in XDP so far (every frame that made it through).
    pub fn sink_count(&self) -> Result<u64> {
        xdp_drops(&self.sink, "bk0")
    }

    /// Frames dropped by an XDP program on the middle's ingress (the floor).
    pub fn mid_ingress_drops(&self) -> Result<u64> {
        xdp_drops(&self.mid, "spl-c")
    }

    pub fn gen_sent(&self) -> Result<u64> {
        self.gen.tx_packets("cli0")
    }

    /// A trafgen config for 64-byte UDP frames (60 bytes without FCS) from the generator to
    /// `dst`:`UDP_PORT`, cycling over `flows` source ports from 10000 (0: random ports).
    pub fn trafgen_config(&self, dst: &str, flows: u32) -> Result<std::path::PathBuf> {
        self.trafgen_config_from(GEN_ADDR, dst, 10000, 10000 + flows.max(1) - 1)
    }

    /// Like [`Self::trafgen_config`], from `src` with source ports `low..=high`.
    pub fn trafgen_config_from(&self, src: &str, dst: &str, low: u32, high: u32) -> Result<std::path::PathBuf> {
        let sport = format!("dinc({low}, {high})");
        let text = format!(
            "{{\n  eth(da={}, sa={}, type=0x0800),\n  ipv4(saddr={src}, daddr={dst}, ttl=64, proto=17, df),\n  \
             udp(sp={sport}, dp={UDP_PORT}),\n  fill(0x00, 18)\n}}\n",
            self.mid_in_mac, self.gen_mac
        );
        let path = self.run.path().join(format!("trafgen-{src}-{dst}-{low}-{high}.cfg"));
        fs::write(&path, text)?;
        Ok(path)
    }

    /// [`Self::trafgen_config`] in IPv6 (62-byte frames: no fill after the UDP header),
    /// from the generator's IPv6 address to `dst`.
    pub fn trafgen_config6(&self, dst: &str, flows: u32) -> Result<std::path::PathBuf> {
        let sport = format!("dinc(10000, {})", 10000 + flows.max(1) - 1);
        let text = format!(
            "{{\n  eth(da={}, sa={}, type=0x86dd),\n  ipv6(sa={GEN_ADDR6}, da={dst}, hl=64, nh=17),\n  \
             udp(sp={sport}, dp={UDP_PORT})\n}}\n",
            self.mid_in_mac, self.gen_mac
        );
        let path = self.run.path().join(format!("trafgen6-{dst}-{flows}.cfg"));
        fs::write(&path, text)?;
        Ok(path)
    }

    /// Starts trafgen pinned to CPU 0 (one worker), optionally at `rate` packets/s.
    pub fn spawn_trafgen(&self, config: &std::path::Path, rate: Option<u64>, count: Option<u64>) -> Result<Process> {
        let config = config.display().to_string();
        let mut args =
            vec!["-c".to_string(), "0".into(), "trafgen".into(), "-o".into(), "cli0".into(), "-i".into(), config, "-P".into(), "1".into()];
        if let Some(rate) = rate {
            args.extend(["-b".into(), format!("{rate}pps")]);
        }
        if let Some(count) = count {
            args.extend(["-n".into(), count.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.gen.spawn("taskset", &args)
    }

    /// Sends `count` packets (warm-up: creates flows, resolves what needs resolving).
    pub fn send(&self, config: &std::path::Path, count: u64) -> Result<()> {
        let p = self.spawn_trafgen(config, None, Some(count))?;
        let (code, lines) = p.wait(Duration::from_secs(30))?;
        if code != 0 {
            bail!("trafgen exited {code}: {}", lines.join("\n"));
        }
        Ok(())
    }

    /// Runs the generator flat out for `duration`; returns packets sent (by the
    /// generator's device), packets counted by `delivered`, and the CPU used.
    pub fn measure(&self, config: &std::path::Path, duration: Duration, delivered: impl Fn() -> Result<u64>) -> Result<Run> {
        let sent0 = self.gen_sent()?;
        let got0 = delivered()?;
        let cpu0 = CpuSample::take();
        let p = self.spawn_trafgen(config, None, None)?;
        std::thread::sleep(duration);
        stop_trafgen(&p)?;
        let (code, lines) = p.wait(Duration::from_secs(20))?;
        let cpu = CpuSample::take().since(&cpu0);
        if code != 0 && !lines.iter().any(|l| l.contains("packets outgoing")) {
            bail!("trafgen exited {code}: {}", lines.join("\n"));
        }
        let sent = self.gen_sent()? - sent0;
        let got = delivered()? - got0;
        Ok(Run { sent, delivered: got, cpu })
    }

    /// Starts the agent in the middle namespace (pinned to CPU 1, away from the path) on
    /// both interfaces, with `gateway` as its only config file; waits until it applied it.
    pub fn start_agent(&self, gateway_yaml: &str, extra: &[&str]) -> Result<Process> {
        self.start_agent_on("1", gateway_yaml, extra)
    }

    /// Like [`Self::start_agent`], on the CPUs of `cpus` (a taskset list).
    pub fn start_agent_on(&self, cpus: &str, gateway_yaml: &str, extra: &[&str]) -> Result<Process> {
        let config = self.run.path().join("config");
        let _ = fs::remove_dir_all(&config);
        fs::create_dir_all(&config)?;
        fs::write(config.join("gateway.yaml"), gateway_yaml)?;
        let socket = self.socket().display().to_string();
        let state = self.run.path().join("state").display().to_string();
        let config = config.display().to_string();
        let bin = splitter_bin().display().to_string();
        let mut args = vec![
            "-c",
            cpus,
            &bin,
            "agent",
            "--iface",
            "spl-c",
            "--iface",
            "spl-b",
            "--config",
            &config,
            "--socket",
            &socket,
            "--state-dir",
            &state,
        ];
        args.extend_from_slice(extra);
        let agent = self.mid.spawn("taskset", &args)?;
        agent.wait_for_line("ready", Duration::from_secs(30))?;
        agent.wait_for_line("applied gateway", Duration::from_secs(10))?;
        Ok(agent)
    }

    pub fn socket(&self) -> std::path::PathBuf {
        self.run.path().join("splitter.sock")
    }

    /// Loads an nftables ruleset into the middle namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        nft(&self.mid, &self.run, ruleset)
    }
}

pub fn nft(ns: &Netns, run: &TempDir, ruleset: &str) -> Result<()> {
    let path = run.path().join("ruleset.nft");
    fs::write(&path, ruleset)?;
    ns.run("nft", &["-f", &path.display().to_string()]).map(drop)
}

/// Stops a trafgen started by [`ForwardBed::spawn_trafgen`]: SIGINT to its workers (it
/// forks one per CPU given) and to itself; it then prints its totals and exits.
pub fn stop_trafgen(p: &Process) -> Result<()> {
    for child in children_of(p.pid()) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child as i32, libc::SIGINT) };
    }
    p.signal(libc::SIGINT)
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let stat = fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// One flat-out generator run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Run {
    pub sent: u64,
    pub delivered: u64,
    pub cpu: CpuDelta,
}

impl Run {
    pub fn pps(&self) -> f64 {
        self.delivered as f64 / self.cpu.wall.as_secs_f64()
    }
    /// CPU per delivered packet (µs): the generator, the path and deferred softirq work.
    pub fn cost_us(&self) -> f64 {
        self.cpu.own.as_secs_f64() * 1e6 / self.delivered.max(1) as f64
    }
    /// CPU 0's busy time per delivered packet (µs), the cross-check.
    pub fn cpu0_cost_us(&self) -> f64 {
        self.cpu.cpu0_busy.as_secs_f64() * 1e6 / self.delivered.max(1) as f64
    }
}

/// The XDP drop counter of a veth (ethtool statistics).
pub fn xdp_drops(ns: &Netns, dev: &str) -> Result<u64> {
    let out = ns.run("ethtool", &["-S", dev])?;
    let mut total = 0;
    let mut found = false;
    for line in out.lines() {
        let line = line.trim();
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().ends_with("xdp_drops") {
                total += value.trim().parse::<u64>().unwrap_or(0);
                found = true;
            }
        }
    }
    if !found {
        bail!("no xdp_drops statistic for {dev}: {out}");
    }
    Ok(total)
}

/// A minimal HTTP/1.1 client on the agent's Unix control socket (one kept-alive
/// connection).
pub struct Control {
    stream: std::os::unix::net::UnixStream,
    buf: Vec<u8>,
}

impl Control {
    pub fn connect(path: &std::path::Path) -> Result<Self> {
        let stream = std::os::unix::net::UnixStream::connect(path).with_context(|| format!("connecting {}", path.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { stream, buf: Vec::new() })
    }

    /// Writes one request.
    pub fn send(&mut self, method: &str, path: &str, body: &str) -> Result<()> {
        use std::io::Write;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: splitter\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut msg = head.into_bytes();
        msg.extend_from_slice(body.as_bytes());
        self.stream.write_all(&msg)?;
        Ok(())
    }

    /// Reads one response: status and body.
    pub fn response(&mut self) -> Result<(u16, String)> {
        use std::io::Read;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("bad status line")?;
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + length {
                    let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + length]).to_string();
                    self.buf.drain(..end + 4 + length);
                    return Ok((status, body));
                }
            }
            if Instant::now() > deadline {
                bail!("no complete response");
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                bail!("control socket closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Starts `f` on a new thread that first enters `ns` (sockets it opens live there).
pub fn spawn_in<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> Result<std::thread::JoinHandle<T>> {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(format!("/run/netns/{}", ns.name()))?;
    Ok(std::thread::spawn(move || {
        // SAFETY: `file` is an open namespace descriptor; setns affects this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        drop(file);
        f()
    }))
}

/// Waits until `f` holds, polling, or fails after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
