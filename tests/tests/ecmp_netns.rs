//! Three splitter nodes behind a router's ECMP (a multipath route to the VIP, hashing on
//! the 5-tuple), as Katran and Cilium's standalone balancer are deployed. A node taken out
//! of the route moves its flows (and, with Linux's hash-threshold multipath, some of the
//! others') to other nodes, which hold no state for them:
//!
//! - dnat: the moved flow's next packet is placed by the same table (every node builds
//!   the same one), so it reaches the same target, and the target's answers are sent from
//!   the VIP by whichever node they reach: no connection breaks.
//! - dsr: the same placement; the targets answer the client directly.
//! - full NAT: the other node would send the flow from its own address, which the target
//!   has no connection for: the flows of the node taken out break, and only those (with a
//!   resilient nexthop group, which moves no other node's flows).
//!
//! The testbed is `splitter_tests::cluster` with its router (`ClusterBed::ecmp`).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use splitter_tests::{
    cluster::{dsr_gateway, gateway_in_mode, ClusterBed, Grouping, NODES, VIP_PORT},
    privileged,
    testbed::{http_get, LineClient},
};

/// Long-lived connections opened through the router.
const LONG_LIVED: usize = 60;

/// Applies the gateway in `mode` on node 0 and waits until every node has it.
fn apply(bed: &ClusterBed, mode: &str) {
    let file = bed.run.path().join("web.yaml");
    let yaml = if mode == "dsr" { dsr_gateway("80%", "20%") } else { gateway_in_mode(mode, "80%", "20%") };
    std::fs::write(&file, yaml).unwrap();
    bed.cli_ok(0, &["apply", "-f", &file.display().to_string()]).unwrap();
    for node in 0..3 {
        bed.wait_v2_weight(node, "20%").unwrap();
    }
}

/// The gateway's new flows and conntrack misses on `node`.
fn flows_and_misses(bed: &ClusterBed, node: usize) -> (u64, u64) {
    let stats: serde_json::Value = serde_json::from_str(&bed.cli_ok(node, &["stats", "-o", "json"]).unwrap()).unwrap();
    let web = stats.as_array().unwrap().iter().find(|g| g["name"] == "web").unwrap().clone();
    (web["new_flows"].as_u64().unwrap(), web["conntrack_miss"].as_u64().unwrap())
}

/// `LONG_LIVED` connections to the VIP from the client behind the router, each with the
/// first answer it got (`VERSION ADDR:PORT PEER`: the backend's view of where it comes from).
fn open_long_lived(bed: &ClusterBed) -> Vec<(LineClient, String)> {
    let client = &bed.ecmp.as_ref().unwrap().client;
    client
        .enter(|| {
            (0..LONG_LIVED)
                .map(|i| {
                    let mut c = LineClient::connect(VIP_PORT).unwrap_or_else(|e| panic!("long-lived connection {i}: {e:#}"));
                    let first = c.ask_peer().unwrap_or_else(|e| panic!("long-lived connection {i}: {e:#}"));
                    (c, first)
                })
                .collect()
        })
        .unwrap()
}

/// Asks every connection again (three rounds): the indexes of those that failed or moved
/// to another instance or source.
fn broken(bed: &ClusterBed, connections: &mut [(LineClient, String)]) -> Vec<(usize, String)> {
    let client = &bed.ecmp.as_ref().unwrap().client;
    client
        .enter(|| {
            let mut broken = BTreeMap::new();
            for _round in 0..3 {
                for (i, (c, first)) in connections.iter_mut().enumerate() {
                    if broken.contains_key(&i) {
                        continue;
                    }
                    match c.ask_peer() {
                        Ok(answer) if &answer == first => {}
                        Ok(answer) => {
                            broken.insert(i, format!("answered {answer:?}, first {first:?}"));
                        }
                        Err(e) => {
                            broken.insert(i, format!("{e:#}"));
                        }
                    }
                }
            }
            broken.into_iter().collect()
        })
        .unwrap()
}

/// Short connections from the client behind the router while `during` runs: how many
/// succeeded, and the failures.
fn short_connections_during(bed: &ClusterBed, during: impl FnOnce()) -> (usize, Vec<String>) {
    let client = &bed.ecmp.as_ref().unwrap().client;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let traffic = s.spawn(|| {
            client
                .enter(|| {
                    let (mut ok, mut failed) = (0, Vec::new());
                    let deadline = Instant::now() + Duration::from_secs(30);
                    // Until the change is made and has settled (at least 100); bounded.
                    for i in 0..20_000 {
                        if (i >= 100 && stop.load(std::sync::atomic::Ordering::Relaxed)) || Instant::now() > deadline {
                            break;
                        }
                        match http_get(VIP_PORT, None) {
                            Ok(_) => ok += 1,
                            Err(e) => failed.push(format!("short connection {i}: {e:#}")),
                        }
                    }
                    (ok, failed)
                })
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        during();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        traffic.join().unwrap()
    })
}

/// Node 0 taken out of the route (hash-threshold: flows of the other nodes move too) with
/// long-lived and short connections of a gateway in `mode` going: none may break.
fn no_connection_breaks_when_ecmp_moves_flows(mode: &str) {
    let bed = ClusterBed::ecmp(Grouping::HashThreshold, mode == "dsr").unwrap();
    apply(&bed, mode);
    let mut connections = open_long_lived(&bed);
    for (_, first) in &connections {
        let peer = first.rsplit(' ').next().unwrap();
        assert!(peer.starts_with("10.10.5.2:"), "{mode} keeps the client's address: {first}");
    }
    let before: Vec<(u64, u64)> = (0..3).map(|n| flows_and_misses(&bed, n)).collect();
    assert!(before.iter().all(|(flows, _)| *flows > 0), "the router spreads the connections over all three nodes: {before:?}");
    let answered: usize = connections.iter().filter(|(_, f)| f.starts_with("v2 ")).count();
    eprintln!("{LONG_LIVED} long-lived connections, {answered} on v2; new flows per node {before:?}");

    // Node 0 taken out of the router's route and the backends' route back.
    let (ok, failed) = short_connections_during(&bed, || bed.route_through(&[1, 2]).unwrap());
    assert!(failed.is_empty(), "{ok} short connections succeeded, failed: {failed:?}");

    // What the nodes left miss from here on is the long-lived flows that moved to them.
    let settled: Vec<(u64, u64)> = (0..3).map(|n| flows_and_misses(&bed, n)).collect();
    let broken = broken(&bed, &mut connections);
    let after: Vec<(u64, u64)> = (0..3).map(|n| flows_and_misses(&bed, n)).collect();
    let moved: u64 = (1..3).map(|n| after[n].1 - settled[n].1).sum();
    eprintln!(
        "{mode}, node 0 out: {} of {LONG_LIVED} long-lived connections broken, {moved} of their packets re-placed without state on \
         nodes 1 and 2; {ok} short connections during the change, none failed",
        broken.len()
    );
    assert!(broken.is_empty(), "no long-lived {mode} connection breaks: {broken:?}");
    assert!(moved > 0, "long-lived flows moved to nodes without their state and were re-placed there: {settled:?} -> {after:?}");
}

#[test]
fn a_flow_ecmp_moves_to_another_node_keeps_its_dnat_target_and_no_connection_breaks() {
    if !privileged("a_flow_ecmp_moves_to_another_node_keeps_its_dnat_target_and_no_connection_breaks") {
        return;
    }
    no_connection_breaks_when_ecmp_moves_flows("dnat");
}

#[test]
fn a_flow_ecmp_moves_to_another_node_keeps_its_dsr_target_and_no_connection_breaks() {
    if !privileged("a_flow_ecmp_moves_to_another_node_keeps_its_dsr_target_and_no_connection_breaks") {
        return;
    }
    no_connection_breaks_when_ecmp_moves_flows("dsr");
}

#[test]
fn a_node_failing_breaks_only_its_own_full_nat_flows() {
    if !privileged("a_node_failing_breaks_only_its_own_full_nat_flows") {
        return;
    }
    let bed = ClusterBed::ecmp(Grouping::Resilient, false).unwrap();
    apply(&bed, "fullnat");
    let mut connections = open_long_lived(&bed);
    // Full NAT: the backend sees the node's address.
    let node_of = |first: &str| {
        let peer = first.rsplit(' ').next().unwrap();
        NODES.iter().position(|n| peer.starts_with(&format!("{n}:"))).unwrap_or_else(|| panic!("from a node's address: {first}"))
    };
    let nodes: Vec<usize> = connections.iter().map(|(_, first)| node_of(first)).collect();
    let per_node: Vec<usize> = (0..3).map(|n| nodes.iter().filter(|m| **m == n).count()).collect();
    assert!(per_node.iter().all(|n| *n > 0), "the router spreads the connections over all three nodes: {per_node:?}");

    // Node 1 fails: out of the route, its link down.
    bed.route_through(&[0, 2]).unwrap();
    bed.nodes[1].ip(&["link", "set", "n1", "down"]).unwrap();

    let broken = broken(&bed, &mut connections);
    let broken_on = |node: usize| broken.iter().filter(|(i, _)| nodes[*i] == node).count();
    let (fresh, failed) = bed
        .ecmp
        .as_ref()
        .unwrap()
        .client
        .enter(|| {
            let results: Vec<_> = (0..200).map(|_| http_get(VIP_PORT, None)).collect();
            (
                results.iter().filter(|r| r.is_ok()).count(),
                results.into_iter().filter_map(Result::err).map(|e| format!("{e:#}")).collect::<Vec<_>>(),
            )
        })
        .unwrap();
    eprintln!(
        "node 1 failed: connections per node {per_node:?}; broken on node 1: {} of {}, on nodes 0 and 2: {}; {fresh} of 200 \
         new connections after it succeeded",
        broken_on(1),
        per_node[1],
        broken_on(0) + broken_on(2)
    );
    assert_eq!(broken_on(0) + broken_on(2), 0, "the other nodes' flows keep going: {broken:?}");
    assert_eq!(broken_on(1), per_node[1], "the failed node's full-NAT flows break (another node's address is not theirs)");
    assert!(failed.is_empty(), "new connections go to the other nodes: {failed:?}");
}
