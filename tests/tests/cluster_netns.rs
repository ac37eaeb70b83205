//! Three splitter nodes sharing one etcd (Debian's etcd-server, in a namespace of its
//! own): a change made on one node is live on the others, two operators' conflicting
//! changes cannot both win, and with etcd stopped the nodes keep forwarding, refuse
//! changes, and converge once it is back.
//!
//! The testbed is `splitter_tests::cluster` (a client, an etcd, three nodes, two backends
//! on one bridge).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use splitter_tests::{
    cluster::{gateway, ClusterBed},
    privileged,
    traffic::Bpffs,
};

fn share(counts: &BTreeMap<String, usize>, version: &str) -> f64 {
    let n: usize = counts.values().sum();
    counts.get(version).copied().unwrap_or(0) as f64 * 100.0 / n.max(1) as f64
}

#[test]
fn a_change_made_on_one_node_is_live_on_all_and_of_two_conflicting_changes_one_wins() {
    if !privileged("a_change_made_on_one_node_is_live_on_all_and_of_two_conflicting_changes_one_wins") {
        return;
    }
    let bed = ClusterBed::running().unwrap();
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
fn with_etcd_stopped_nodes_forward_refuse_changes_and_hold_rollouts_then_converge_when_it_returns() {
    if !privileged("with_etcd_stopped_nodes_forward_refuse_changes_and_hold_rollouts_then_converge_when_it_returns") {
        return;
    }
    let mut bed = ClusterBed::running().unwrap();
    // Node 0 pins its datapath and saves its state, as a node in production does.
    let bpffs = Bpffs::mount();
    let pins = bpffs.dir.path().join("splitter").display().to_string();
    let state = bed.run.path().join("n0-state").display().to_string();
    let saving = ["--bpffs", pins.as_str(), "--state-dir", state.as_str()];
    bed.stop_agent(0).unwrap();
    bed.start_agent_with(0, &saving).unwrap();
    bed.wait_info(0, |info| info["store"]["reachable"] == true, "reach the store").unwrap();
    let file = bed.run.path().join("web.yaml");
    // A rollout at its first step (50%), waiting for a window of healthy traffic.
    let canary = "canary:\n  route: v2\n  steps: [50, 100]\n  interval: 2s\n  min_flows: 5\n";
    std::fs::write(&file, format!("{}{canary}", gateway("100%", "0%"))).unwrap();
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
    // Healthy traffic through every node for three intervals: the rollout takes no step.
    let quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(6) {
        for node in 0..3 {
            let (_, failed) = bed.sample(node, 10);
            assert!(failed.is_empty(), "{failed:?}");
        }
    }
    for node in 0..3 {
        let rollout = bed.rollout(node).unwrap();
        assert_eq!(rollout["step"].as_u64(), Some(0), "node {node}: no step without the store: {rollout}");
        assert_eq!(bed.v2_weight(node).unwrap().as_deref(), Some("50%"));
    }
    // Node 0 restarted while etcd is down: it starts from its saved state and forwards.
    bed.stop_agent(0).unwrap();
    bed.start_agent_with(0, &saving).unwrap();
    assert_eq!(bed.v2_weight(0).unwrap().as_deref(), Some("50%"), "node 0 starts with its saved gateway");
    assert_eq!(bed.info(0).unwrap()["store"]["reachable"], false);
    let (_, failed) = bed.sample(0, 50);
    assert!(failed.is_empty(), "node 0 forwards after its restart without the store: {failed:?}");
    let (code, out, err) = bed.cli(1, &["weight", "web", "v1=10%", "v2=90%"]).unwrap();
    assert_ne!(code, 0, "a change without the store is refused: {out}");
    assert_eq!(err.trim().lines().count(), 1, "in one line: {err}");
    assert!(err.contains("cannot be reached") && err.contains("changes are refused until it is back"), "{err}");
    assert_eq!(bed.v2_weight(1).unwrap().as_deref(), Some("50%"), "and changes nothing");

    bed.start_etcd().unwrap();
    bed.wait_info(1, |info| info["store"]["reachable"] == true, "reach etcd again").unwrap();
    // Back: the rollout goes on, on the traffic of all.
    bed.traffic_until(0, "the rollout resumes once etcd is back", || bed.v2_weight(1).unwrap().as_deref() == Some("100%"));
    for node in 0..3 {
        bed.wait_v2_weight(node, "100%").unwrap();
    }
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
    let mut bed = ClusterBed::running().unwrap();
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
