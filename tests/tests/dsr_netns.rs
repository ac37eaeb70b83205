//! Direct server return end to end: real TCP from a client through the splitter to target
//! processes that decapsulate with the project's program (`splitter decap`) and answer the
//! client directly.
//!
//! ```text
//!   client 10.10.2.2 ──┐
//!   splitter 10.10.2.1 ─┤ br0 (namespace "fabric")
//!   target i 10.10.2.1x ┘   each target in its own namespace, the VIP 10.0.0.80 on its lo
//! ```
//!
//! and the same in IPv6 (2001:db8:2::/64, the VIP 2001:db8::80, IPv6 in IPv6).
//!
//! The client routes the VIP via the splitter; the splitter (one-arm, on `spl0`)
//! encapsulates each flow's packets to its target; the targets' answers go from the VIP
//! straight to the client over the bridge, never through the splitter.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use splitter_tests::{
    netns::{bridge_port, Netns},
    privileged, splitter_bin,
    testbed::{dsr_target, http_get, LineClient, TempDir, XdpAttachment},
    Process,
};

/// The testbed's addresses in one family: the VIP, the client, the splitter, the targets
/// with the version each answers (three of `v1`, one of `v2`, told apart by an instance
/// suffix), and the prefix length of the fabric.
struct Family {
    vip: &'static str,
    client: &'static str,
    splitter: &'static str,
    targets: [(&'static str, &'static str); 4],
    prefix: u8,
}

const IPV4: Family = Family {
    vip: "10.0.0.80",
    client: "10.10.2.2",
    splitter: "10.10.2.1",
    targets: [("10.10.2.11", "v1-a"), ("10.10.2.12", "v1-b"), ("10.10.2.13", "v1-c"), ("10.10.2.14", "v2-a")],
    prefix: 24,
};

const IPV6: Family = Family {
    vip: "2001:db8::80",
    client: "2001:db8:2::2",
    splitter: "2001:db8:2::1",
    targets: [("2001:db8:2::11", "v1-a"), ("2001:db8:2::12", "v1-b"), ("2001:db8:2::13", "v1-c"), ("2001:db8:2::14", "v2-a")],
    prefix: 64,
};

impl Family {
    fn ipv6(&self) -> bool {
        self.vip.contains(':')
    }

    /// `addr:port` as a socket address is written (`[addr]:port` for IPv6).
    fn at(addr: &str, port: u16) -> String {
        std::net::SocketAddr::new(addr.parse().unwrap(), port).to_string()
    }

    fn vip_port(&self) -> String {
        Self::at(self.vip, 80)
    }

    fn gateway(&self, v1: &str, v2: &str) -> String {
        let target = |i: usize| format!("\"{}\"", Self::at(self.targets[i].0, 80));
        format!(
            "name: web\nport: 80/tcp\nvirtual_address: {}\nmode: dsr\nroutes:\n  v1:\n    weight: {v1}\n    targets: \
             [{}, {}, {}]\n  v2:\n    weight: {v2}\n    targets: [{}]\n",
            self.vip,
            target(0),
            target(1),
            target(2),
            target(3)
        )
    }
}

struct DsrBed {
    family: &'static Family,
    fabric: Netns,
    client: Netns,
    splitter: Netns,
    targets: Vec<Netns>,
    config: TempDir,
    run: TempDir,
    /// Decapsulation programs and backends of the targets.
    processes: Vec<Process>,
    agent: Option<Process>,
    _pass: XdpAttachment,
}

impl DsrBed {
    fn new(family: &'static Family) -> Result<Self> {
        let namespace = if family.ipv6() { Netns::new_dual_stack } else { Netns::new };
        let fabric = namespace("dsr-fabric")?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let client = namespace("dsr-client")?;
        let host = if family.ipv6() { 128 } else { 32 };
        bridge_port(&fabric, &client, "cli0", &format!("{}/{}", family.client, family.prefix), "f-cli")?;
        client.ip(&["route", "add", &format!("{}/{host}", family.vip), "via", family.splitter])?;
        let splitter = namespace("dsr-splitter")?;
        bridge_port(&fabric, &splitter, "spl0", &format!("{}/{}", family.splitter, family.prefix), "f-spl")?;
        // Encapsulated packets the datapath passes up (next hop not resolved yet) are
        // forwarded by the kernel, with this node's own address as their source.
        splitter.sysctl("net.ipv4.ip_forward", "1")?;
        if family.ipv6() {
            splitter.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        for dev in ["all", "spl0"] {
            splitter.sysctl(&format!("net.ipv4.conf.{dev}.accept_local"), "1")?;
        }
        // XDP_TX on a veth reaches its peer promptly only when the peer runs XDP.
        let pass = XdpAttachment::attach(&fabric, "f-spl", "xdp_pass")?;
        let mut bed = Self {
            family,
            fabric,
            client,
            splitter,
            targets: Vec::new(),
            config: TempDir::new("dsr-config")?,
            run: TempDir::new("dsr-run")?,
            processes: Vec::new(),
            agent: None,
            _pass: pass,
        };
        for (i, (addr, version)) in family.targets.iter().enumerate() {
            let (target, decap, backend) = dsr_target(&bed.fabric, &format!("dsr-t{i}"), addr, &format!("f-t{i}"), family.vip, version)?;
            bed.processes.push(decap);
            bed.processes.push(backend);
            bed.targets.push(target);
        }
        Ok(bed)
    }

    fn socket(&self) -> PathBuf {
        self.run.path().join("splitter.sock")
    }

    fn agent(&self) -> &Process {
        self.agent.as_ref().expect("agent started")
    }

    fn start_agent(&mut self, yaml: &str) -> Result<()> {
        std::fs::write(self.config.path().join("web.yaml"), yaml)?;
        let config = self.config.path().display().to_string();
        let socket = self.socket().display().to_string();
        let state = self.run.path().join("state").display().to_string();
        let agent = self.splitter.spawn(
            splitter_bin(),
            &["agent", "--iface", "spl0", "--config", &config, "--socket", &socket, "--state-dir", &state, "--ephemeral"],
        )?;
        agent.wait_for_line("ready", Duration::from_secs(30))?;
        agent.wait_for_line("applied gateway web generation 1", Duration::from_secs(10))?;
        self.agent = Some(agent);
        Ok(())
    }

    /// `splitter ARGS --socket <the agent's socket>`, which must succeed.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new(splitter_bin()).args(args).arg("--socket").arg(self.socket()).output()?;
        anyhow::ensure!(out.status.success(), "splitter {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `n` HTTP GETs to the VIP from the client, counted by the instance that answered;
    /// any failed one fails the test.
    fn sample(&self, n: usize) -> BTreeMap<String, usize> {
        let vip_port = self.family.vip_port();
        self.client
            .enter(|| {
                let mut counts = BTreeMap::new();
                for i in 0..n {
                    let body = http_get(&vip_port, None).unwrap_or_else(|e| panic!("connection {i} to the VIP: {e:#}"));
                    let version = body.split_whitespace().next().unwrap_or("").to_string();
                    *counts.entry(version).or_insert(0) += 1;
                }
                counts
            })
            .unwrap()
    }

    /// Packets the bridge sent towards the splitter, and the targets sent in all.
    fn counters(&self) -> Result<(u64, u64)> {
        let to_splitter = self.fabric.tx_packets("f-spl")?;
        let mut from_targets = 0;
        for target in &self.targets {
            from_targets += target.tx_packets("t0")?;
        }
        Ok((to_splitter, from_targets))
    }
}

impl Drop for DsrBed {
    fn drop(&mut self) {
        // The agent first, then the targets' processes, before the namespaces go.
        self.agent.take();
        self.processes.clear();
    }
}

fn share(counts: &BTreeMap<String, usize>, prefix: &str, n: usize) -> f64 {
    counts.iter().filter(|(v, _)| v.starts_with(prefix)).map(|(_, c)| *c).sum::<usize>() as f64 * 100.0 / n as f64
}

#[test]
fn dsr_splits_2000_connections_80_20_over_3_and_1_instances_and_replies_bypass_the_splitter() {
    if !privileged("dsr_splits_2000_connections_80_20_over_3_and_1_instances_and_replies_bypass_the_splitter") {
        return;
    }
    split_2000_and_replies_bypass_the_splitter(&IPV4);
}

#[test]
fn ipv6_dsr_splits_2000_connections_80_20_over_3_and_1_instances_and_replies_bypass_the_splitter() {
    if !privileged("ipv6_dsr_splits_2000_connections_80_20_over_3_and_1_instances_and_replies_bypass_the_splitter") {
        return;
    }
    split_2000_and_replies_bypass_the_splitter(&IPV6);
}

fn split_2000_and_replies_bypass_the_splitter(family: &'static Family) {
    let mut bed = DsrBed::new(family).unwrap();
    bed.start_agent(&family.gateway("80%", "20%")).unwrap();
    let client_sent = bed.client.tx_packets("cli0").unwrap();
    let (to_splitter, from_targets) = bed.counters().unwrap();

    let n = 2000;
    let counts = bed.sample(n);
    let (v1, v2) = (share(&counts, "v1", n), share(&counts, "v2", n));
    assert!((v1 - 80.0).abs() <= 3.0 && (v2 - 20.0).abs() <= 3.0, "80/20 within 3 points: {v1:.1}/{v2:.1} ({counts:?})");
    for instance in ["v1-a", "v1-b", "v1-c"] {
        let s = share(&counts, instance, n);
        // One standard deviation of an instance's share is 1 point over 2000 connections.
        assert!((s - 80.0 / 3.0).abs() <= 4.0, "{instance} takes a third of v1's 80%: {s:.1}% ({counts:?})");
    }

    let client_sent = bed.client.tx_packets("cli0").unwrap() - client_sent;
    let (to_splitter_after, from_targets_after) = bed.counters().unwrap();
    let (to_splitter, from_targets) = (to_splitter_after - to_splitter, from_targets_after - from_targets);
    println!("DSR 80/20 over 3+1: {counts:?}; client sent {client_sent} packets, the splitter received {to_splitter}, the targets sent {from_targets}");
    // Every connection's answers (SYN-ACK, response, FIN at least) came from the targets...
    assert!(from_targets >= 3 * n as u64, "the targets answered: {from_targets} packets for {n} connections");
    // ...and none of them crossed the splitter: it received what the client sent, and a
    // little flooding (ARP, a frame to a MAC the bridge had not learnt yet) besides.
    assert!(
        to_splitter <= client_sent + 50,
        "the splitter received {to_splitter} packets while the client sent {client_sent}: replies went through it"
    );
    let stats: serde_json::Value = serde_json::from_str(&bed.cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    let text = stats.to_string();
    let first = Family::at(family.targets[0].0, 80);
    assert!(text.contains(&first), "stats name the targets: {text}");
}

#[test]
fn dsr_flows_keep_their_target_across_weight_changes() {
    if !privileged("dsr_flows_keep_their_target_across_weight_changes") {
        return;
    }
    flows_keep_their_target_across_weight_changes(&IPV4);
}

#[test]
fn ipv6_dsr_flows_keep_their_target_across_weight_changes() {
    if !privileged("ipv6_dsr_flows_keep_their_target_across_weight_changes") {
        return;
    }
    flows_keep_their_target_across_weight_changes(&IPV6);
}

fn flows_keep_their_target_across_weight_changes(family: &'static Family) {
    let mut bed = DsrBed::new(family).unwrap();
    bed.start_agent(&family.gateway("90%", "10%")).unwrap();
    let vip_port = family.vip_port();
    let mut connections: Vec<(LineClient, String)> = bed
        .client
        .enter(|| {
            (0..50)
                .map(|i| {
                    let mut c = LineClient::connect(&vip_port).with_context(|| format!("connection {i}"))?;
                    let first = c.ask()?;
                    Ok((c, first))
                })
                .collect::<Result<Vec<_>>>()
        })
        .unwrap()
        .unwrap();
    let on_v1 = connections.iter().filter(|(_, a)| a.starts_with("v1")).count();
    assert!(on_v1 > 30, "most connections start on v1 at 90%: {on_v1} of 50");

    for (weights, label) in [(["v1=0%", "v2=100%"], "0/100"), (["v1=90%", "v2=10%"], "back at 90/10")] {
        bed.cli(&["weight", "web", weights[0], weights[1]]).unwrap();
        let moved: Vec<String> = bed
            .client
            .enter(|| {
                connections
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(i, (c, first))| match c.ask() {
                        Ok(answer) if answer == *first => None,
                        Ok(answer) => Some(format!("connection {i}: {first} then {answer}")),
                        Err(e) => Some(format!("connection {i} ({first}): {e:#}")),
                    })
                    .collect()
            })
            .unwrap();
        assert!(moved.is_empty(), "{label}: established connections moved or broke: {moved:?}");
        if label == "0/100" {
            let counts = bed.sample(50);
            assert_eq!(share(&counts, "v2", 50), 100.0, "new connections follow 0/100: {counts:?}");
        }
    }
}

#[test]
fn dsr_health_checks_go_through_the_tunnel_to_the_vip() {
    if !privileged("dsr_health_checks_go_through_the_tunnel_to_the_vip") {
        return;
    }
    health_checks_go_through_the_tunnel_to_the_vip(&IPV4);
}

#[test]
fn ipv6_dsr_health_checks_go_through_the_tunnel_to_the_vip() {
    if !privileged("ipv6_dsr_health_checks_go_through_the_tunnel_to_the_vip") {
        return;
    }
    health_checks_go_through_the_tunnel_to_the_vip(&IPV6);
}

fn health_checks_go_through_the_tunnel_to_the_vip(family: &'static Family) {
    let mut bed = DsrBed::new(family).unwrap();
    let check = "health_check:\n  protocol: tcp\n  interval: 200ms\n  timeout: 150ms\n  unhealthy_threshold: 2\n  \
                 healthy_threshold: 2\n";
    bed.start_agent(&(family.gateway("80%", "20%") + check)).unwrap();
    let third = Family::at(family.targets[2].0, 80);
    let host = if family.ipv6() { 128 } else { 32 };
    std::thread::sleep(Duration::from_secs(1));
    let got = bed.cli(&["get", "web"]).unwrap();
    assert!(!got.contains(":80 unhealthy"), "every target serves the VIP: {got}");

    // One target stops holding the VIP: its backend still listens on every address, so a
    // check of 10.10.2.13:80 itself would pass, but the tunnelled packets to the VIP are
    // no longer its own.
    bed.targets[2].ip(&["addr", "del", &format!("{}/{host}", family.vip), "dev", "lo"]).unwrap();
    bed.agent().wait_for_line(&format!("target {third} unhealthy"), Duration::from_secs(10)).unwrap();
    let direct = bed.splitter.enter(|| std::net::TcpStream::connect_timeout(&third.parse().unwrap(), Duration::from_secs(2))).unwrap();
    assert!(direct.is_ok(), "the backend itself still answers on its own address");
    let got = bed.cli(&["get", "web"]).unwrap();
    assert!(got.contains(&format!("{third} unhealthy")), "get shows it: {got}");
    // 1000 connections: one standard deviation of v1's share is 1.3 points.
    let counts = bed.sample(1000);
    assert_eq!(counts.get("v1-c"), None, "no new connection goes to the target without the VIP: {counts:?}");
    let v1 = share(&counts, "v1", 1000);
    assert!((v1 - 80.0).abs() <= 6.0, "v1 keeps its 80% on its two other instances: {v1:.1}% ({counts:?})");

    bed.targets[2].ip(&["addr", "add", &format!("{}/{host}", family.vip), "dev", "lo"]).unwrap();
    bed.agent().wait_for_line(&format!("target {third} healthy again"), Duration::from_secs(10)).unwrap();
    let counts = bed.sample(300);
    assert!(counts.get("v1-c").copied().unwrap_or(0) > 40, "the instance takes its share again: {counts:?}");
}
