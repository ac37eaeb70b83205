//! Three splitter nodes sharing one etcd (Debian's etcd-server, in a namespace of its
//! own), for the cluster tests and the propagation benchmark.
//!
//! ```text
//!   client 10.10.4.2 ───────┐
//!   etcd 10.10.4.5 ─────────┤ br0 (namespace "fabric")
//!   node i 10.10.4.1i ──────┤   each node one-arm, full NAT, its own agent
//!   backends .21 (v1), .22 (v2)
//! ```
//!
//! The client reaches the VIP through one node at a time (its route to the VIP names the
//! node), so each node's datapath is tried on its own.
//!
//! With ECMP ([`ClusterBed::ecmp`]), a router in front holds a multipath route to the VIP
//! over the three nodes (hashing on the 5-tuple), and the backends' route back to the
//! client spreads over the nodes the same way:
//!
//! ```text
//!   ecmp client 10.10.5.2 ── router 10.10.5.1 / 10.10.4.1 ── br0 ── nodes ── backends
//! ```

use std::{
    collections::BTreeMap,
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    netns::{bridge_port, Netns},
    splitter_bin,
    testbed::{dsr_target, http_get, sibling_bin, TempDir, XdpAttachment},
    Process,
};

pub const VIP: &str = "10.0.0.90";
pub const VIP_PORT: &str = "10.0.0.90:80";
pub const ETCD: &str = "10.10.4.5:2379";
pub const NODES: [&str; 3] = ["10.10.4.11", "10.10.4.12", "10.10.4.13"];
/// The router in front of the nodes (ECMP beds), on the bridge.
pub const ROUTER: &str = "10.10.4.1";
/// The network of the client behind the router (ECMP beds).
pub const ECMP_CLIENTS: &str = "10.10.5.0/24";

/// How the router spreads flows over the nodes: Linux's multipath hash-threshold (a node
/// removed moves some flows of the others too), or a resilient nexthop group (only the
/// removed node's flows move).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    HashThreshold,
    Resilient,
}

/// The router and the client behind it.
pub struct Ecmp {
    pub router: Netns,
    pub client: Netns,
    pub grouping: Grouping,
}

pub fn gateway(v1: &str, v2: &str) -> String {
    gateway_in_mode("fullnat", v1, v2)
}

pub fn gateway_in_mode(mode: &str, v1: &str, v2: &str) -> String {
    format!(
        "name: web\nport: 80/tcp\nvirtual_address: {VIP}\nmode: {mode}\nroutes:\n  v1:\n    weight: {v1}\n    targets: [10.10.4.21:80]\n  v2:\n    \
         weight: {v2}\n    targets: [10.10.4.22:80]\n"
    )
}

/// The DSR targets of an ECMP bed ([`ClusterBed::add_dsr_targets`]): address, version.
pub const DSR_TARGETS: [(&str, &str); 2] = [("10.10.4.31", "v1"), ("10.10.4.32", "v2")];

/// The gateway over the DSR targets, `v1`/`v2` weights.
pub fn dsr_gateway(v1: &str, v2: &str) -> String {
    format!(
        "name: web\nport: 80/tcp\nvirtual_address: {VIP}\nmode: dsr\nroutes:\n  v1:\n    weight: {v1}\n    targets: [{}:80]\n  v2:\n    \
         weight: {v2}\n    targets: [{}:80]\n",
        DSR_TARGETS[0].0, DSR_TARGETS[1].0
    )
}

pub struct ClusterBed {
    pub fabric: Netns,
    pub client: Netns,
    pub etcd_ns: Netns,
    pub nodes: Vec<Netns>,
    pub backends: Netns,
    pub ecmp: Option<Ecmp>,
    /// Targets of DSR gateways, each in its own namespace with the VIP on its loopback.
    pub dsr_targets: Vec<Netns>,
    pub run: TempDir,
    pub etcd_data: TempDir,
    /// A prefix of this bed's own under the store.
    pub store: String,
    pub etcd: Option<Process>,
    pub agents: Vec<Option<Process>>,
    pub processes: Vec<Process>,
    _pass: Vec<XdpAttachment>,
}

impl ClusterBed {
    pub fn new() -> Result<Self> {
        let fabric = Netns::new("cl-fabric")?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::new("cl-client")?;
        bridge_port(&fabric, &client, "cli0", "10.10.4.2/24", "f-cli")?;
        let etcd_ns = Netns::new("cl-etcd")?;
        bridge_port(&fabric, &etcd_ns, "e0", "10.10.4.5/24", "f-etcd")?;
        let backends = Netns::new("cl-backends")?;
        bridge_port(&fabric, &backends, "b0", "10.10.4.21/24", "f-b")?;
        backends.ip(&["addr", "add", "10.10.4.22/24", "dev", "b0"])?;
        let mut processes = Vec::new();
        for (addr, version) in [("10.10.4.21:80", "v1"), ("10.10.4.22:80", "v2")] {
            let backend = backends.spawn(sibling_bin("splitter-backend"), &["--listen", addr, "--version", version])?;
            backend.wait_for_line("listening", Duration::from_secs(10))?;
            processes.push(backend);
        }
        let mut nodes = Vec::new();
        let mut pass = Vec::new();
        for (i, addr) in NODES.iter().enumerate() {
            let node = Netns::new(&format!("cl-n{i}"))?;
            bridge_port(&fabric, &node, &format!("n{i}"), &format!("{addr}/24"), &format!("f-n{i}"))?;
            // The FIB lookup of the datapath answers only where forwarding is on.
            node.sysctl("net.ipv4.ip_forward", "1")?;
            // XDP_TX on a veth reaches its peer promptly only when the peer runs XDP.
            pass.push(XdpAttachment::attach(&fabric, &format!("f-n{i}"), "xdp_pass")?);
            nodes.push(node);
        }
        let run = TempDir::new("cl-run")?;
        let store = format!("splitter-test-{}", std::process::id());
        let bed = Self {
            fabric,
            client,
            etcd_ns,
            nodes,
            backends,
            ecmp: None,
            dsr_targets: Vec::new(),
            run,
            etcd_data: TempDir::new("cl-etcd")?,
            store,
            etcd: None,
            agents: vec![None, None, None],
            processes,
            _pass: pass,
        };
        Ok(bed)
    }

    /// The bed with etcd and the three agents running, each in step with the store.
    pub fn running() -> Result<Self> {
        let mut bed = Self::new()?;
        bed.start_etcd()?;
        for node in 0..NODES.len() {
            bed.start_agent(node)?;
        }
        Ok(bed)
    }

    /// The bed with a router spreading flows to the VIP over the three nodes (and, with
    /// `dsr_targets`, the targets of DSR gateways), and etcd and the agents running.
    pub fn ecmp(grouping: Grouping, dsr_targets: bool) -> Result<Self> {
        let mut bed = Self::new()?;
        let router = Netns::new("cl-router")?;
        bridge_port(&bed.fabric, &router, "r0", &format!("{ROUTER}/24"), "f-r")?;
        let client = Netns::new("cl-eclient")?;
        crate::netns::Veth::create(&router, "r1", "10.10.5.1/24", &client, "c0", "10.10.5.2/24")?;
        client.set_tx_checksum("c0", false)?;
        client.ip(&["route", "add", "default", "via", "10.10.5.1"])?;
        for (ns, forwarding) in [(&router, "1"), (&bed.backends, "0")] {
            ns.sysctl("net.ipv4.ip_forward", forwarding)?;
            // Hash on the 5-tuple, so each connection picks its node.
            ns.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        }
        for (i, addr) in NODES.iter().enumerate() {
            router.ip(&["nexthop", "add", "id", &(i + 1).to_string(), "via", addr, "dev", "r0"])?;
            bed.nodes[i].ip(&["route", "add", ECMP_CLIENTS, "via", ROUTER])?;
        }
        bed.ecmp = Some(Ecmp { router, client, grouping });
        bed.route_through(&[0, 1, 2])?;
        if dsr_targets {
            bed.add_dsr_targets()?;
        }
        bed.start_etcd()?;
        for node in 0..NODES.len() {
            bed.start_agent(node)?;
        }
        Ok(bed)
    }

    /// Routes the VIP (at the router) and the clients' network (at the backends) over
    /// `nodes` alone.
    pub fn route_through(&self, nodes: &[usize]) -> Result<()> {
        let ecmp = self.ecmp.as_ref().context("not an ECMP bed")?;
        let group = nodes.iter().map(|n| (n + 1).to_string()).collect::<Vec<_>>().join("/");
        let mut args = vec!["nexthop", "replace", "id", "10", "group", &group];
        if ecmp.grouping == Grouping::Resilient {
            args.extend(["type", "resilient", "buckets", "64"]);
        }
        ecmp.router.ip(&args)?;
        ecmp.router.ip(&["route", "replace", &format!("{VIP}/32"), "nhid", "10"])?;
        let mut back = vec!["route", "replace", ECMP_CLIENTS];
        for n in nodes {
            back.extend(["nexthop", "via", NODES[*n]]);
        }
        self.backends.ip(&back)?;
        Ok(())
    }

    /// Two DSR targets (`DSR_TARGETS`) on the bridge, each holding the VIP on its loopback,
    /// decapsulating with `splitter decap` and answering the clients behind the router
    /// directly.
    pub fn add_dsr_targets(&mut self) -> Result<()> {
        for (i, (addr, version)) in DSR_TARGETS.iter().enumerate() {
            let (target, decap, backend) = dsr_target(&self.fabric, &format!("cl-t{i}"), addr, &format!("f-t{i}"), VIP, version)?;
            target.ip(&["route", "add", ECMP_CLIENTS, "via", ROUTER])?;
            self.processes.push(decap);
            self.processes.push(backend);
            self.dsr_targets.push(target);
        }
        for node in &self.nodes {
            // Encapsulated packets the datapath passes up (next hop not resolved yet) are
            // forwarded by the kernel with the node's own address as their source.
            node.sysctl("net.ipv4.conf.all.accept_local", "1")?;
        }
        Ok(())
    }

    pub fn start_etcd(&mut self) -> Result<()> {
        let data = self.etcd_data.path().display().to_string();
        let etcd = self.etcd_ns.spawn(
            "etcd",
            &[
                "--name",
                "cl",
                "--data-dir",
                &data,
                "--listen-client-urls",
                &format!("http://{ETCD}"),
                "--advertise-client-urls",
                &format!("http://{ETCD}"),
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "cl=http://127.0.0.1:2380",
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.etcd_ns.enter(|| TcpStream::connect_timeout(&ETCD.parse().unwrap(), Duration::from_millis(200)).is_err())? {
            if Instant::now() > deadline {
                bail!("etcd did not listen on {ETCD}:\n{}", etcd.lines().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.etcd = Some(etcd);
        Ok(())
    }

    pub fn stop_etcd(&mut self) -> Result<()> {
        let etcd = self.etcd.take().context("etcd is not running")?;
        etcd.signal(libc::SIGTERM)?;
        etcd.wait(Duration::from_secs(10))?;
        Ok(())
    }

    pub fn socket(&self, node: usize) -> PathBuf {
        self.run.path().join(format!("n{node}.sock"))
    }

    pub fn start_agent(&mut self, node: usize) -> Result<()> {
        self.start_agent_with(node, &["--ephemeral"])?;
        self.wait_info(node, |info| info["store"]["reachable"] == true, "reach the store")
    }

    /// Stops `node`'s agent (SIGTERM) and waits until it has exited.
    pub fn stop_agent(&mut self, node: usize) -> Result<()> {
        let agent = self.agents[node].take().context("the agent is not running")?;
        agent.signal(libc::SIGTERM)?;
        agent.wait(Duration::from_secs(10))?;
        Ok(())
    }

    /// Starts `node`'s agent with `extra` arguments (`--ephemeral`, or where it pins and
    /// saves), without waiting for the store.
    pub fn start_agent_with(&mut self, node: usize, extra: &[&str]) -> Result<()> {
        let socket = self.socket(node).display().to_string();
        let store = format!("etcd://{ETCD}/{}", self.store);
        let iface = format!("n{node}");
        let name = format!("n{node}");
        let mut args = vec!["agent", "--iface", &iface, "--socket", &socket, "--store", &store, "--node-name", &name];
        args.extend(extra);
        let agent = self.nodes[node].spawn(splitter_bin(), &args)?;
        agent.wait_for_line("ready", Duration::from_secs(30))?;
        // The node's neighbours, so that the first packets need no resolution.
        let router = self.ecmp.as_ref().map(|_| ROUTER);
        let dsr_targets = DSR_TARGETS.iter().take(self.dsr_targets.len()).map(|(addr, _)| *addr);
        for peer in ["10.10.4.2", "10.10.4.21", "10.10.4.22"].into_iter().chain(router).chain(dsr_targets) {
            self.nodes[node].run("ping", &["-c", "1", "-W", "1", peer])?;
        }
        self.agents[node] = Some(agent);
        Ok(())
    }

    /// `splitter ARGS --socket <node's socket>`: exit code, stdout, stderr.
    pub fn cli(&self, node: usize, args: &[&str]) -> Result<(i32, String, String)> {
        let out = Command::new(splitter_bin()).args(args).arg("--socket").arg(self.socket(node)).output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    pub fn cli_ok(&self, node: usize, args: &[&str]) -> Result<String> {
        let (code, out, err) = self.cli(node, args)?;
        let agent = self.agents[node].as_ref().map(|a| a.lines().join("\n")).unwrap_or_default();
        anyhow::ensure!(code == 0, "node {node}: splitter {args:?}: {err}\nthe agent said:\n{agent}");
        Ok(out)
    }

    pub fn info(&self, node: usize) -> Result<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "--unix-socket"])
            .arg(self.socket(node))
            .arg("http://splitter/api/v1/info?output=json")
            .output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub fn wait_info(&self, node: usize, done: impl Fn(&serde_json::Value) -> bool, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let info = self.info(node)?;
            if done(&info) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {node} did not {what}: {info}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The canary's weight on `node` (`None`: no gateway there).
    pub fn v2_weight(&self, node: usize) -> Result<Option<String>> {
        let (code, out, _) = self.cli(node, &["get", "web", "-o", "json"])?;
        if code != 0 {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_str(&out)?;
        Ok(value["routes"]["v2"]["weight"].as_str().map(str::to_string))
    }

    pub fn wait_v2_weight(&self, node: usize, weight: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.v2_weight(node)?;
            if now.as_deref() == Some(weight) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {node}: v2 at {now:?}, not {weight}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `n` HTTP GETs to the VIP through `node`, counted by the version that answered, and
    /// the connections that failed.
    pub fn sample(&self, node: usize, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
        self.client.ip(&["route", "replace", &format!("{VIP}/32"), "via", NODES[node]]).unwrap();
        self.client
            .enter(|| {
                let (mut counts, mut failed) = (BTreeMap::new(), Vec::new());
                for i in 0..n {
                    match http_get(VIP_PORT, None) {
                        Ok(body) => *counts.entry(body.split_whitespace().next().unwrap_or("").to_string()).or_insert(0) += 1,
                        Err(e) => failed.push(format!("connection {i} through node {node}: {e:#}")),
                    }
                }
                (counts, failed)
            })
            .unwrap()
    }

    /// The gateway's rollout as `node` has it.
    pub fn rollout(&self, node: usize) -> Result<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "--unix-socket"])
            .arg(self.socket(node))
            .arg("http://splitter/api/v1/canary/web?output=json")
            .output()?;
        let value: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(value.as_array().and_then(|a| a.first()).cloned().unwrap_or(value))
    }

    /// The node driving the rollouts, among `alive`.
    pub fn driver(&self, alive: &[usize]) -> Option<usize> {
        alive.iter().copied().find(|n| self.info(*n).is_ok_and(|i| i["store"]["driving"] == true))
    }

    /// Connections through `node`, ten at a time, until `done` (or 30 s).
    pub fn traffic_until(&self, node: usize, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 30 s");
            let _ = self.sample(node, 10);
        }
    }

    pub fn fingerprint(&self, node: usize) -> Result<String> {
        let out = self.cli_ok(node, &["get", "web"])?;
        let line = out.lines().find(|l| l.starts_with("# table: ")).with_context(|| format!("no table line in {out}"))?;
        Ok(line.rsplit_once("fingerprint ").map(|(_, f)| f.to_string()).unwrap_or_default())
    }
}

impl Drop for ClusterBed {
    fn drop(&mut self) {
        // Agents first (they detach), then etcd and the backends, before the namespaces go.
        self.agents.clear();
        self.etcd.take();
        self.ecmp.take();
        self.processes.clear();
    }
}
