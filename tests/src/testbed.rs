//! The splitter's standard test topology, in three namespaces it owns:
//!
//! ```text
//!  client (10.10.1.2, +extra)  --  splitter (10.10.1.1 | 10.10.2.1)  --  backends (10.10.2.x)
//!  [2001:db8:1::2]                   [2001:db8:1::1 | 2001:db8:2::1]       [2001:db8:2::x]
//!        cli0                     spl-c            spl-b                       bk0
//! ```
//!
//! The client routes everything via the splitter (the VIP 10.0.0.10 included); the
//! backends route replies via the splitter too (needed by `dnat` gateways). The agent runs
//! in the splitter namespace attached to both of its interfaces; the peers get an XDP_PASS
//! program so redirected frames are delivered promptly, and their TX checksum offload is
//! off (veth would otherwise hand XDP partial checksums).

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};

use crate::{splitter_bin, test_object, Netns, Process, Veth};

pub const VIP: &str = "10.0.0.10";
pub const CLIENT_ADDR: &str = "10.10.1.2";
pub const SPLITTER_CLIENT_SIDE: &str = "10.10.1.1";
pub const SPLITTER_BACKEND_SIDE: &str = "10.10.2.1";
/// The IPv6 side of a dual-stack testbed ([`Testbed::dual_stack`]): the VIP, the client,
/// the splitter's two sides; backends sit in 2001:db8:2::/64.
pub const VIP6: &str = "2001:db8::10";
pub const CLIENT_ADDR6: &str = "2001:db8:1::2";
pub const SPLITTER_CLIENT_SIDE6: &str = "2001:db8:1::1";
pub const SPLITTER_BACKEND_SIDE6: &str = "2001:db8:2::1";

/// Routes of the sava gateway (Vamp's canary tutorial) the namespace tests use.
pub const SAVA_STABLE: &str = "sava/sava:1.0.0";
pub const SAVA_CANARY: &str = "sava/sava:1.1.0";

/// A sava gateway document: `name` on the VIP's `port`, the stable route on
/// 10.10.2.11:8080 at weight `stable`, the canary route on `canary_target` at `canary`,
/// then the `extra` lines (health check, canary block, ...).
pub fn sava_gateway(name: &str, port: u16, stable: &str, canary: &str, canary_target: &str, extra: &str) -> String {
    format!(
        "name: {name}
port: {port}/http
virtual_address: {VIP}
routes:
  {SAVA_STABLE}:
    weight: {stable}
    targets: [10.10.2.11:8080]
  {SAVA_CANARY}:
    weight: {canary}
    targets: [{canary_target}]
{extra}"
    )
}

/// An XDP program from the splitter's object (`xdp_pass`, `xdp_drop`) attached to a
/// device in a namespace; detached on drop.
pub struct XdpAttachment {
    _ebpf: Ebpf,
}

impl XdpAttachment {
    pub fn attach(ns: &Netns, dev: &str, program: &str) -> Result<Self> {
        let mut ebpf = helper_object()?;
        let prog: &mut Xdp = ebpf.program_mut(program).with_context(|| format!("no program {program}"))?.try_into()?;
        prog.load()?;
        // Attaching resolves the device in the calling thread's namespace.
        ns.enter(|| prog.attach(dev, XdpMode::Driver).map(drop))?
            .with_context(|| format!("attaching {program} to {dev} in {}", ns.name()))?;
        Ok(Self { _ebpf: ebpf })
    }
}

/// The test object, for its helper and benchmark programs (`xdp_pass`,
/// `bench_tcp_client`...), which use none of the datapath's large maps: those are created
/// at their smallest.
pub fn helper_object() -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    for name in splitter_common::map_names::FLOW_TABLES {
        loader.map_max_entries(name, 2);
    }
    loader
        .map_max_entries("GATEWAYS", 1)
        .map_max_entries("GATEWAY_COUNTERS", 1)
        .map_max_entries("BUCKET_TABLES", 1)
        .map_max_entries("TARGETS", 1)
        .load_file(test_object())
        .context("loading the test eBPF object")
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(role: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!("spltest-{}-{}-{role}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A binary of this crate (`splitter-backend`), next to the running test or tool.
pub fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(path.is_file(), "{} not built (cargo build --release -p splitter-tests --bins)", path.display());
    path
}

/// A target of a direct-server-return gateway, in its own namespace `name` on `fabric`'s
/// bridge at `addr/24` (`addr/64` for IPv6; its bridge end named `fabric_end`): the VIP on its loopback, the
/// project's decapsulation program on its port, and a backend answering `version` on
/// port 80 of every address. Returns the namespace, the decapsulation program and the
/// backend.
pub fn dsr_target(fabric: &Netns, name: &str, addr: &str, fabric_end: &str, vip: &str, version: &str) -> Result<(Netns, Process, Process)> {
    let ipv6 = addr.contains(':');
    let target = if ipv6 { Netns::new_dual_stack(name)? } else { Netns::new(name)? };
    let (prefix, host) = if ipv6 { (64, 128) } else { (24, 32) };
    crate::netns::bridge_port(fabric, &target, "t0", &format!("{addr}/{prefix}"), fabric_end)?;
    target.ip(&["addr", "add", &format!("{vip}/{host}"), "dev", "lo"])?;
    let decap = target.spawn(splitter_bin(), &["decap", "--iface", "t0"])?;
    decap.wait_for_line("are decapsulated", Duration::from_secs(10))?;
    // Listening on every address: a check sent to the target's own address would pass
    // whether or not it serves the VIP.
    let any = if ipv6 { "[::]:80" } else { "0.0.0.0:80" };
    let backend = target.spawn(sibling_bin("splitter-backend"), &["--listen", any, "--version", version])?;
    backend.wait_for_line("listening", Duration::from_secs(10))?;
    Ok((target, decap, backend))
}

pub struct Testbed {
    pub client: Netns,
    pub splitter: Netns,
    pub backends: Netns,
    pub config_dir: TempDir,
    /// The agent's control socket, state directory and (for restart tests) bpffs live here.
    pub run_dir: TempDir,
    peer_programs: Vec<XdpAttachment>,
    backend_processes: Vec<(String, Process)>,
    agent: Option<Process>,
}

impl Testbed {
    pub fn new() -> Result<Self> {
        Self::with_queues(1)
    }

    /// A testbed whose veths have `queues` queues at each end (see
    /// [`Veth::create_with_queues`]).
    pub fn with_queues(queues: usize) -> Result<Self> {
        Self::build(queues, false)
    }

    /// A testbed that also speaks IPv6: the client at [`CLIENT_ADDR6`], the splitter at
    /// [`SPLITTER_CLIENT_SIDE6`] and [`SPLITTER_BACKEND_SIDE6`] (forwarding), backends in
    /// 2001:db8:2::/64, each side routing via the splitter as in IPv4.
    pub fn dual_stack() -> Result<Self> {
        Self::build(1, true)
    }

    fn build(queues: usize, ipv6: bool) -> Result<Self> {
        let namespace = if ipv6 { Netns::new_dual_stack } else { Netns::new };
        let client = namespace("client")?;
        let splitter = namespace("splitter")?;
        let backends = namespace("backends")?;
        let (client_cidr, splitter_client_cidr) = (format!("{CLIENT_ADDR}/24"), format!("{SPLITTER_CLIENT_SIDE}/24"));
        Veth::create_with_queues(&client, "cli0", &client_cidr, &splitter, "spl-c", &splitter_client_cidr, queues)?;
        let splitter_backend_cidr = format!("{SPLITTER_BACKEND_SIDE}/24");
        Veth::create_with_queues(&backends, "bk0", "10.10.2.2/24", &splitter, "spl-b", &splitter_backend_cidr, queues)?;
        client.ip(&["route", "add", "default", "via", SPLITTER_CLIENT_SIDE])?;
        backends.ip(&["route", "add", "default", "via", SPLITTER_BACKEND_SIDE])?;
        // Packets the datapath passes up (next hop not resolved yet) are forwarded by the
        // kernel; full-NAT ones carry this node's own source address.
        splitter.sysctl("net.ipv4.ip_forward", "1")?;
        if ipv6 {
            client.ip(&["-6", "addr", "add", &format!("{CLIENT_ADDR6}/64"), "dev", "cli0", "nodad"])?;
            splitter.ip(&["-6", "addr", "add", &format!("{SPLITTER_CLIENT_SIDE6}/64"), "dev", "spl-c", "nodad"])?;
            splitter.ip(&["-6", "addr", "add", &format!("{SPLITTER_BACKEND_SIDE6}/64"), "dev", "spl-b", "nodad"])?;
            backends.ip(&["-6", "addr", "add", "2001:db8:2::2/64", "dev", "bk0", "nodad"])?;
            client.ip(&["-6", "route", "add", "default", "via", SPLITTER_CLIENT_SIDE6])?;
            backends.ip(&["-6", "route", "add", "default", "via", SPLITTER_BACKEND_SIDE6])?;
            splitter.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        for dev in ["all", "spl-c", "spl-b"] {
            splitter.sysctl(&format!("net.ipv4.conf.{dev}.accept_local"), "1")?;
        }
        for (ns, dev) in [(&client, "cli0"), (&backends, "bk0")] {
            ns.set_tx_checksum(dev, false)?;
        }
        let attachments = vec![XdpAttachment::attach(&client, "cli0", "xdp_pass")?, XdpAttachment::attach(&backends, "bk0", "xdp_pass")?];
        Ok(Self {
            client,
            splitter,
            backends,
            config_dir: TempDir::new("config")?,
            run_dir: TempDir::new("run")?,
            peer_programs: attachments,
            backend_processes: Vec::new(),
            agent: None,
        })
    }

    /// A testbed running the sava backends (1.0.0 on 10.10.2.11:8080, 1.1.0 on
    /// 10.10.2.21:8080), gateway `sava` on port 9050 at `stable`/`canary` in `sava.yaml`,
    /// and the agent started with `extra_agent_args`.
    pub fn sava(extra_agent_args: &[&str], stable: &str, canary: &str) -> Result<Self> {
        let mut bed = Self::new()?;
        bed.start_backend("10.10.2.11", 8080, "1.0.0", &[])?;
        bed.start_backend("10.10.2.21", 8080, "1.1.0", &[])?;
        bed.write_config("sava.yaml", &sava_gateway("sava", 9050, stable, canary, "10.10.2.21:8080", ""))?;
        bed.start_agent(extra_agent_args)?;
        Ok(bed)
    }

    /// Removes the `xdp_pass` programs from the client's and backends' interfaces (for
    /// benchmarks that attach their own endpoints there).
    pub fn detach_peer_programs(&mut self) {
        self.peer_programs.clear();
    }

    /// Adds extra client source addresses (`10.10.1.x/24`).
    pub fn add_client_addr(&self, addr: &str) -> Result<()> {
        self.client.ip(&["addr", "add", &format!("{addr}/24"), "dev", "cli0"])
    }

    /// Starts a backend process on `addr:port` (added to the backends' interface if new)
    /// answering `version`; `extra` are more `splitter-backend` flags (`--udp`, `--reset`).
    pub fn start_backend(&mut self, addr: &str, port: u16, version: &str, extra: &[&str]) -> Result<()> {
        let ip: std::net::IpAddr = addr.parse().with_context(|| format!("backend address {addr}"))?;
        if ip.is_ipv4() {
            let have = self.backends.ip_output(&["-4", "addr", "show", "dev", "bk0"])?;
            if !have.contains(&format!("inet {addr}/")) {
                self.backends.ip(&["addr", "add", &format!("{addr}/24"), "dev", "bk0"])?;
            }
        } else {
            let have = self.backends.ip_output(&["-6", "addr", "show", "dev", "bk0"])?;
            if !have.contains(&format!("inet6 {addr}/")) {
                self.backends.ip(&["-6", "addr", "add", &format!("{addr}/64"), "dev", "bk0", "nodad"])?;
            }
        }
        let listen = std::net::SocketAddr::new(ip, port).to_string();
        let mut args = vec!["--listen", &listen, "--version", version];
        args.extend_from_slice(extra);
        let process = self.backends.spawn(sibling_bin("splitter-backend"), &args)?;
        process.wait_for_line("listening", Duration::from_secs(10))?;
        self.backend_processes.push((listen, process));
        Ok(())
    }

    /// Stops (kills) the backend on `addr:port`.
    pub fn stop_backend(&mut self, addr_port: &str) -> Result<()> {
        let before = self.backend_processes.len();
        self.backend_processes.retain(|(listen, _)| listen != addr_port);
        if before == self.backend_processes.len() {
            bail!("no backend on {addr_port}");
        }
        Ok(())
    }

    /// Writes a gateway file into the watched config directory (atomically: the agent
    /// never reads half a file).
    pub fn write_config(&self, file: &str, yaml: &str) -> Result<PathBuf> {
        let path = self.config_dir.path().join(file);
        let tmp = self.config_dir.path().join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The agent's control socket.
    pub fn socket(&self) -> PathBuf {
        self.run_dir.path().join("splitter.sock")
    }

    /// Starts the agent on both splitter interfaces with the config directory, its socket
    /// and state in the run directory. Without `--bpffs` in `extra`, pins go to a bpffs
    /// private to the agent's `ip netns exec` (gone when it exits).
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        let config = self.config_dir.path().display().to_string();
        let socket = self.socket().display().to_string();
        let state = self.run_dir.path().join("state").display().to_string();
        let mut args =
            vec!["agent", "--iface", "spl-c", "--iface", "spl-b", "--config", &config, "--socket", &socket, "--state-dir", &state];
        args.extend_from_slice(extra);
        let agent = self.splitter.spawn(splitter_bin(), &args)?;
        agent.wait_for_line("ready", Duration::from_secs(30))?;
        self.agent = Some(agent);
        Ok(())
    }

    pub fn agent(&self) -> &Process {
        self.agent.as_ref().expect("agent started")
    }

    /// Stops the agent with SIGTERM; returns its output.
    pub fn stop_agent(&mut self) -> Result<Vec<String>> {
        let agent = self.agent.take().context("no agent")?;
        agent.signal(libc::SIGTERM)?;
        let (code, lines) = agent.wait(Duration::from_secs(15))?;
        if code != 0 {
            bail!("agent exited with {code}:\n{}", lines.join("\n"));
        }
        Ok(lines)
    }

    /// Runs `splitter ARGS --socket <the agent's socket>` (a CLI command) to completion;
    /// returns exit code, stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let out = std::process::Command::new(splitter_bin()).args(args).arg("--socket").arg(self.socket()).output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `curl --unix-socket <the agent's socket> ARGS` (the control API as operators call
    /// it); returns the body and the HTTP status.
    pub fn curl(&self, args: &[&str]) -> (String, u16) {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--unix-socket"])
            .arg(self.socket())
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("curl (apt package curl)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("curl printed the status");
        (body.to_string(), code.parse().expect("an HTTP status"))
    }

    /// Like `cli`, failing unless the command succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let (code, out, err) = self.cli(args)?;
        if code != 0 {
            bail!("splitter {args:?} exited {code}: {err}");
        }
        Ok(out)
    }

    /// Waits until the agent logs `applied gateway NAME generation N`.
    pub fn wait_applied(&self, gateway: &str, generation: u64) -> Result<()> {
        self.agent().wait_for_line(&format!("applied gateway {gateway} generation {generation}"), Duration::from_secs(10)).map(drop)
    }

    /// Sends SIGHUP and waits until the agent logs `applied gateway NAME generation N`.
    pub fn reload_and_wait(&self, gateway: &str, generation: u64) -> Result<()> {
        self.agent().signal(libc::SIGHUP)?;
        self.agent().wait_for_line(&format!("applied gateway {gateway} generation {generation}"), Duration::from_secs(10)).map(drop)
    }

    /// The value of one sample of the agent's `/metrics` (`name` or `name{labels}`, as
    /// exported); panics when it is missing.
    pub fn metric(&self, sample: &str) -> f64 {
        let (text, code) = self.curl(&["http://splitter/metrics"]);
        assert_eq!(code, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {sample} in the metrics:\n{text}"))
            .parse()
            .unwrap()
    }

    /// The automated rollout of `gateway` as the API shows it (`GET /api/v1/canary/NAME`),
    /// or null when it has none.
    pub fn rollout(&self, gateway: &str) -> serde_json::Value {
        let (body, code) = self.curl(&[&format!("http://splitter/api/v1/canary/{gateway}")]);
        if code == 404 {
            return serde_json::Value::Null;
        }
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()[0].clone()
    }

    /// `n` sequential HTTP GETs from the client to the VIP on `port`, counted by the
    /// version that answered; panics (naming the connection) on any failed one.
    pub fn sample(&self, port: u16, n: usize) -> std::collections::BTreeMap<String, usize> {
        let seen = self.sample_answers(port, n);
        if let Some(error) = seen.keys().find(|k| k.starts_with("error: ")) {
            panic!("a GET to {VIP}:{port} failed ({error}); answers: {seen:?}");
        }
        seen
    }

    /// Like [`Testbed::sample`], with each failed GET counted under `error: REASON`.
    pub fn sample_answers(&self, port: u16, n: usize) -> std::collections::BTreeMap<String, usize> {
        self.client
            .enter(|| {
                let mut seen = std::collections::BTreeMap::new();
                for _ in 0..n {
                    let answer = match http_get(&format!("{VIP}:{port}"), None) {
                        Ok(body) => body.split(' ').next().unwrap_or("").to_string(),
                        Err(e) => format!("error: {e:#}"),
                    };
                    *seen.entry(answer).or_insert(0) += 1;
                }
                seen
            })
            .expect("entering the client namespace")
    }

    /// The agent's latest stats (SIGUSR1 makes it print them).
    pub fn stats(&self) -> Result<serde_json::Value> {
        let before = self.agent().lines().iter().filter(|l| l.starts_with("splitter stats ")).count();
        self.agent().signal(libc::SIGUSR1)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let lines = self.agent().lines();
            let stats: Vec<&String> = lines.iter().filter(|l| l.starts_with("splitter stats ")).collect();
            if stats.len() > before {
                let json = stats[stats.len() - 1].trim_start_matches("splitter stats ");
                return Ok(serde_json::from_str(json)?);
            }
            if std::time::Instant::now() > deadline {
                bail!("no stats from the agent");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One HTTP/1.0 GET through `addr` (e.g. the VIP); returns the body (`VERSION ADDR:PORT`
/// from a `splitter-backend`). Fails on any error or an incomplete response.
pub fn http_get(addr: &str, local: Option<&str>) -> Result<String> {
    use std::io::{Read, Write};
    let stream = match local {
        None => std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(5))?,
        Some(local) => connect_from(local, addr)?,
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut stream = stream;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: sava\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no end of HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unexpected response {head:?}");
    }
    let length: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).context("no Content-Length")?.parse()?;
    if body.len() != length {
        bail!("incomplete body {body:?} (Content-Length {length})");
    }
    Ok(body.to_string())
}

/// A TCP connection from a chosen local address (the client namespace has several).
pub fn connect_from(local: &str, remote: &str) -> Result<std::net::TcpStream> {
    connect_bound(format!("{local}:0").parse()?, remote)
}

/// A TCP connection from a chosen local address and port.
pub fn connect_bound(local: std::net::SocketAddr, remote: &str) -> Result<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    let remote: std::net::SocketAddr = remote.parse()?;
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&local.into()).with_context(|| format!("bind {local}"))?;
    socket.connect_timeout(&remote.into(), Duration::from_secs(5)).with_context(|| format!("connect {remote} from {local}"))?;
    Ok(socket.into())
}

/// A long-lived connection speaking the backends' line protocol: every line sent gets
/// one line `VERSION ADDR:PORT` back.
pub struct LineClient {
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

impl LineClient {
    pub fn connect(addr: &str) -> Result<Self> {
        Self::over(std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(5))?)
    }

    /// The line protocol over an open connection.
    pub fn over(stream: std::net::TcpStream) -> Result<Self> {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self { reader: std::io::BufReader::new(stream.try_clone()?), writer: stream })
    }

    /// Sends one line; returns the answer (without the newline).
    pub fn ask(&mut self) -> Result<String> {
        self.send(b"ping\n")
    }

    /// Asks where the backend sees the connection come from: the answer is
    /// `VERSION ADDR:PORT PEER_ADDR:PORT`.
    pub fn ask_peer(&mut self) -> Result<String> {
        self.send(b"peer\n")
    }

    fn send(&mut self, line: &[u8]) -> Result<String> {
        use std::io::{BufRead, Write};
        self.writer.write_all(line)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        Ok(line.trim_end().to_string())
    }
}
