//! Three splitter nodes sharing one etcd (Debian's etcd-server, in a namespace of its
//! own): a change made on one node is live on the others, two operators' conflicting
//! changes cannot both win, and with etcd stopped the nodes keep forwarding, refuse
//! changes, and converge once it is back.
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

use std::{
    collections::BTreeMap,
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use splitter_tests::{
    netns::Netns,
    privileged, splitter_bin,
    testbed::{http_get, sibling_bin, TempDir, XdpAttachment},
    Process,
};

const VIP: &str = "10.0.0.90";
const VIP_PORT: &str = "10.0.0.90:80";
const ETCD: &str = "10.10.4.5:2379";
const NODES: [&str; 3] = ["10.10.4.11", "10.10.4.12", "10.10.4.13"];

fn gateway(v1: &str, v2: &str) -> String {
    format!(
        "name: web\nport: 80/tcp\nvirtual_address: {VIP}\nroutes:\n  v1:\n    weight: {v1}\n    targets: [10.10.4.21:80]\n  v2:\n    \
         weight: {v2}\n    targets: [10.10.4.22:80]\n"
    )
}

/// Plugs `dev` of `ns` (addressed `addr`) into the fabric's bridge as `fabric_end`.
fn port(fabric: &Netns, ns: &Netns, dev: &str, addr: &str, fabric_end: &str) -> Result<()> {
    ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", fabric_end, "netns", fabric.name()])?;
    ns.ip(&["addr", "add", addr, "dev", dev])?;
    ns.ip(&["link", "set", dev, "up"])?;
    fabric.ip(&["link", "set", fabric_end, "master", "br0"])?;
    fabric.ip(&["link", "set", fabric_end, "up"])?;
    // Whole checksums in what XDP sees (veth would hand it partial ones).
    ns.set_tx_checksum(dev, false)
}

struct ClusterBed {
    fabric: Netns,
    client: Netns,
    etcd_ns: Netns,
    nodes: Vec<Netns>,
    _backends: Netns,
    run: TempDir,
    etcd_data: TempDir,
    /// A prefix of this bed's own under the store.
    store: String,
    etcd: Option<Process>,
    agents: Vec<Option<Process>>,
    processes: Vec<Process>,
    _pass: Vec<XdpAttachment>,
}

impl ClusterBed {
    fn new() -> Result<Self> {
        let fabric = Netns::new("cl-fabric")?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::new("cl-client")?;
        port(&fabric, &client, "cli0", "10.10.4.2/24", "f-cli")?;
        let etcd_ns = Netns::new("cl-etcd")?;
        port(&fabric, &etcd_ns, "e0", "10.10.4.5/24", "f-etcd")?;
        let backends = Netns::new("cl-backends")?;
        port(&fabric, &backends, "b0", "10.10.4.21/24", "f-b")?;
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
            port(&fabric, &node, &format!("n{i}"), &format!("{addr}/24"), &format!("f-n{i}"))?;
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
            _backends: backends,
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

    fn start_etcd(&mut self) -> Result<()> {
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

    fn stop_etcd(&mut self) -> Result<()> {
        let etcd = self.etcd.take().context("etcd is not running")?;
        etcd.signal(libc::SIGTERM)?;
        etcd.wait(Duration::from_secs(10))?;
        Ok(())
    }

    fn socket(&self, node: usize) -> PathBuf {
        self.run.path().join(format!("n{node}.sock"))
    }

    fn start_agent(&mut self, node: usize) -> Result<()> {
        let socket = self.socket(node).display().to_string();
        let store = format!("etcd://{ETCD}/{}", self.store);
        let agent = self.nodes[node].spawn(
            splitter_bin(),
            &[
                "agent",
                "--iface",
                &format!("n{node}"),
                "--socket",
                &socket,
                "--ephemeral",
                "--store",
                &store,
                "--node-name",
                &format!("n{node}"),
            ],
        )?;
        agent.wait_for_line("ready", Duration::from_secs(30))?;
        // The node's neighbours, so that the first packets need no resolution.
        for peer in ["10.10.4.2", "10.10.4.21", "10.10.4.22"] {
            self.nodes[node].run("ping", &["-c", "1", "-W", "1", peer])?;
        }
        self.agents[node] = Some(agent);
        self.wait_info(node, |info| info["store"]["reachable"] == true, "reach the store")?;
        Ok(())
    }

    /// `splitter ARGS --socket <node's socket>`: exit code, stdout, stderr.
    fn cli(&self, node: usize, args: &[&str]) -> Result<(i32, String, String)> {
        let out = Command::new(splitter_bin()).args(args).arg("--socket").arg(self.socket(node)).output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn cli_ok(&self, node: usize, args: &[&str]) -> Result<String> {
        let (code, out, err) = self.cli(node, args)?;
        let agent = self.agents[node].as_ref().map(|a| a.lines().join("\n")).unwrap_or_default();
        anyhow::ensure!(code == 0, "node {node}: splitter {args:?}: {err}\nthe agent said:\n{agent}");
        Ok(out)
    }

    fn info(&self, node: usize) -> Result<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "--unix-socket"])
            .arg(self.socket(node))
            .arg("http://splitter/api/v1/info?output=json")
            .output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn wait_info(&self, node: usize, done: impl Fn(&serde_json::Value) -> bool, what: &str) -> Result<()> {
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
    fn v2_weight(&self, node: usize) -> Result<Option<String>> {
        let (code, out, _) = self.cli(node, &["get", "web", "-o", "json"])?;
        if code != 0 {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_str(&out)?;
        Ok(value["routes"]["v2"]["weight"].as_str().map(str::to_string))
    }

    fn wait_v2_weight(&self, node: usize, weight: &str) -> Result<()> {
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
    fn sample(&self, node: usize, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
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
    fn rollout(&self, node: usize) -> Result<serde_json::Value> {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "5", "--unix-socket"])
            .arg(self.socket(node))
            .arg("http://splitter/api/v1/canary/web?output=json")
            .output()?;
        let value: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(value.as_array().and_then(|a| a.first()).cloned().unwrap_or(value))
    }

    /// The node driving the rollouts, among `alive`.
    fn driver(&self, alive: &[usize]) -> Option<usize> {
        alive.iter().copied().find(|n| self.info(*n).is_ok_and(|i| i["store"]["driving"] == true))
    }

    /// Connections through `node`, ten at a time, until `done` (or 30 s).
    fn traffic_until(&self, node: usize, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 30 s");
            let _ = self.sample(node, 10);
        }
    }

    fn fingerprint(&self, node: usize) -> Result<String> {
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
        self.processes.clear();
        let _ = &self.fabric;
    }
}

fn share(counts: &BTreeMap<String, usize>, version: &str) -> f64 {
    let n: usize = counts.values().sum();
    counts.get(version).copied().unwrap_or(0) as f64 * 100.0 / n.max(1) as f64
}

#[test]
fn a_change_made_on_one_node_is_live_on_all_and_of_two_conflicting_changes_one_wins() {
    if !privileged("a_change_made_on_one_node_is_live_on_all_and_of_two_conflicting_changes_one_wins") {
        return;
    }
    let mut bed = ClusterBed::new().unwrap();
    bed.start_etcd().unwrap();
    for node in 0..3 {
        bed.start_agent(node).unwrap();
    }
    let file = bed.run.path().join("web.yaml");
    std::fs::write(&file, gateway("80%", "20%")).unwrap();
    bed.cli_ok(0, &["apply", "-f", &file.display().to_string()]).unwrap();
    for node in 1..3 {
        bed.wait_v2_weight(node, "20%").unwrap();
    }
    let fingerprints: Vec<String> = (0..3).map(|n| bed.fingerprint(n).unwrap()).collect();
    assert!(fingerprints.iter().all(|f| f == &fingerprints[0] && !f.is_empty()), "every node built the same table: {fingerprints:?}");
    for node in 0..3 {
        let (counts, failed) = bed.sample(node, 300);
        assert!(failed.is_empty(), "{failed:?}");
        let v2 = share(&counts, "v2");
        assert!((v2 - 20.0).abs() <= 6.0, "node {node} splits 80/20: v2 {v2:.1}% ({counts:?})");
    }

    // Changed on node 0: new connections through nodes 1 and 2 follow.
    bed.cli_ok(0, &["weight", "web", "v1=0%", "v2=100%"]).unwrap();
    for node in 1..3 {
        bed.wait_v2_weight(node, "100%").unwrap();
        let (counts, failed) = bed.sample(node, 50);
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(counts.get("v2"), Some(&50), "node {node} follows node 0's 0/100: {counts:?}");
    }

    // Two operators read the same revision and change it at once on two nodes.
    let got = bed.cli_ok(1, &["get", "web"]).unwrap();
    let revision = got.lines().find_map(|l| l.strip_prefix("# store revision: ")).expect("get shows the store revision").to_string();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| bed.cli(1, &["weight", "web", "v1=70%", "v2=30%", "--if-revision", &revision]).unwrap());
        let b = s.spawn(|| bed.cli(2, &["weight", "web", "v1=40%", "v2=60%", "--if-revision", &revision]).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let winners: Vec<&str> = [(&a, "30%"), (&b, "60%")].iter().filter(|((code, _, _), _)| *code == 0).map(|(_, w)| *w).collect();
    assert_eq!(winners.len(), 1, "exactly one wins: {a:?} {b:?}");
    let loser = if a.0 == 0 { &b } else { &a };
    assert!(
        loser.2.contains("is no longer at store revision") || loser.2.contains("was changed on another node"),
        "the loser is told of the conflict: {loser:?}"
    );
    assert_eq!(loser.2.trim().lines().count(), 1, "in one line: {loser:?}");
    for node in 0..3 {
        bed.wait_v2_weight(node, winners[0]).unwrap();
    }
}

#[test]
fn with_etcd_stopped_nodes_forward_and_refuse_changes_then_converge_when_it_returns() {
    if !privileged("with_etcd_stopped_nodes_forward_and_refuse_changes_then_converge_when_it_returns") {
        return;
    }
    let mut bed = ClusterBed::new().unwrap();
    bed.start_etcd().unwrap();
    for node in 0..3 {
        bed.start_agent(node).unwrap();
    }
    let file = bed.run.path().join("web.yaml");
    std::fs::write(&file, gateway("50%", "50%")).unwrap();
    bed.cli_ok(2, &["apply", "-f", &file.display().to_string()]).unwrap();
    for node in 0..3 {
        bed.wait_v2_weight(node, "50%").unwrap();
    }

    bed.stop_etcd().unwrap();
    for node in 0..3 {
        bed.wait_info(node, |info| info["store"]["reachable"] == false, "notice that etcd is gone").unwrap();
        let (counts, failed) = bed.sample(node, 100);
        assert!(failed.is_empty(), "forwarding goes on without the store: {failed:?}");
        let v2 = share(&counts, "v2");
        assert!((v2 - 50.0).abs() <= 20.0, "node {node} still splits 50/50: {counts:?}");
    }
    let (code, out, err) = bed.cli(1, &["weight", "web", "v1=10%", "v2=90%"]).unwrap();
    assert_ne!(code, 0, "a change without the store is refused: {out}");
    assert_eq!(err.trim().lines().count(), 1, "in one line: {err}");
    assert!(err.contains("cannot be reached") && err.contains("changes are refused until it is back"), "{err}");
    assert_eq!(bed.v2_weight(1).unwrap().as_deref(), Some("50%"), "and changes nothing");

    bed.start_etcd().unwrap();
    bed.wait_info(1, |info| info["store"]["reachable"] == true, "reach etcd again").unwrap();
    bed.cli_ok(1, &["weight", "web", "v1=10%", "v2=90%"]).unwrap();
    for node in 0..3 {
        bed.wait_v2_weight(node, "90%").unwrap();
    }
}

#[test]
fn one_node_drives_a_rollout_on_the_traffic_of_all_another_takes_over_and_a_failure_rolls_back_everywhere() {
    if !privileged("one_node_drives_a_rollout_on_the_traffic_of_all_another_takes_over_and_a_failure_rolls_back_everywhere") {
        return;
    }
    let mut bed = ClusterBed::new().unwrap();
    bed.start_etcd().unwrap();
    for node in 0..3 {
        bed.start_agent(node).unwrap();
    }
    let driver = bed.driver(&[0, 1, 2]).expect("a node drives");
    let others: Vec<usize> = (0..3).filter(|n| *n != driver).collect();
    let file = bed.run.path().join("web.yaml");
    let canary = "canary:\n  route: v2\n  steps: [20, 40, 60, 100]\n  interval: 3s\n  min_flows: 5\n";
    std::fs::write(&file, format!("{}{canary}", gateway("100%", "0%"))).unwrap();
    // Started on a node that does not drive; driven on the traffic of the others only.
    bed.cli_ok(others[0], &["apply", "-f", &file.display().to_string()]).unwrap();
    for node in 0..3 {
        bed.wait_v2_weight(node, "20%").unwrap();
    }
    bed.traffic_until(others[1], "step 2 on another node's traffic", || bed.v2_weight(driver).unwrap().as_deref() == Some("40%"));
    for node in 0..3 {
        bed.wait_v2_weight(node, "40%").unwrap();
        assert_eq!(bed.rollout(node).unwrap()["step"], 1, "node {node} at step 2");
    }

    // The driver killed mid-rollout: another takes over within 5 s, at the same step.
    let killed_at = Instant::now();
    bed.agents[driver].take().unwrap().signal(libc::SIGKILL).unwrap();
    let next = loop {
        if let Some(n) = bed.driver(&others) {
            break n;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(10), "nobody took over");
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed_at.elapsed();
    println!("node {next} drives the rollout {} ms after node {driver} was killed", took.as_millis());
    assert!(took <= Duration::from_secs(5), "taken over in {took:?}");
    let rollout = bed.rollout(next).unwrap();
    assert_eq!((rollout["state"].as_str(), rollout["step"].as_u64()), (Some("progressing"), Some(1)), "at the same step: {rollout}");

    // The canary fails: its connections, seen on the node that does not drive, roll it back on all.
    let watcher = others.iter().copied().find(|n| *n != next).unwrap();
    bed.processes.remove(1);
    bed.traffic_until(watcher, "rolled back on failed connects", || bed.rollout(next).unwrap()["state"] == "rolled-back");
    for node in others {
        let deadline = Instant::now() + Duration::from_secs(5);
        while bed.rollout(node).unwrap()["state"] != "rolled-back" {
            assert!(Instant::now() < deadline, "node {node} did not hear of the rollback");
            std::thread::sleep(Duration::from_millis(20));
        }
        bed.wait_v2_weight(node, "0%").unwrap();
        let events = bed.cli_ok(node, &["events", "web"]).unwrap();
        assert_eq!(events.matches("rolled back: ").count(), 1, "node {node} records the one decision:\n{events}");
        let (counts, failed) = bed.sample(node, 20);
        assert!(failed.is_empty() && counts.get("v1") == Some(&20), "node {node} sends everything to v1: {counts:?} {failed:?}");
    }
}
