//! Each operator control end to end, with real traffic through the datapath: creating a
//! gateway (`apply -f`, `PUT`), deleting one, rollout pause/resume/abort/promote, a manual
//! weight change taking over from a rollout, an HTTP health check on its own port, rollback
//! more than one change back, `validate` and `events --follow`.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use splitter_common::{
    flow::{flow_hash, snat_port},
    maps::PROTO_TCP,
};
use splitter_tests::{
    frames::flow_key,
    privileged, splitter_bin,
    testbed::{connect_bound, sava_gateway, LineClient, Testbed, CLIENT_ADDR, SAVA_CANARY as CANARY, SAVA_STABLE as STABLE, VIP},
    traffic::HttpTraffic,
    Process,
};

const GATEWAY: &str = "sava";

fn sava_yaml(stable: &str, canary: &str, extra: &str) -> String {
    sava_gateway(GATEWAY, 9050, stable, canary, "10.10.2.21:8080", extra)
}

/// The sava backends, and an agent whose config directory is empty.
fn empty_bed() -> Testbed {
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.start_agent(&[]).unwrap();
    bed
}

/// The weight `get` shows for `route`.
fn weight(bed: &Testbed, route: &str) -> String {
    let got = bed.cli_ok(&["get", GATEWAY]).unwrap();
    let mut lines = got.lines().skip_while(|l| !l.contains(route));
    lines.nth(1).unwrap_or_default().trim().to_string()
}

/// Polls the rollout until `done` (generous deadline: a slow machine only waits longer).
fn wait_rollout(bed: &Testbed, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = bed.rollout(GATEWAY);
        if done(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "no {what}: {r}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A long-lived connection through the VIP answered by `version` (new ones until one is).
fn connection_to(bed: &Testbed, version: &str) -> LineClient {
    bed.client
        .enter(|| {
            for _ in 0..200 {
                let mut c = LineClient::connect(&format!("{VIP}:9050")).unwrap();
                if c.ask().unwrap().starts_with(version) {
                    return c;
                }
            }
            panic!("no connection reached {version} in 200 tries");
        })
        .unwrap()
}

fn ask(bed: &Testbed, c: &mut LineClient) -> String {
    bed.client.enter(|| c.ask().unwrap()).unwrap()
}

#[test]
fn a_gateway_is_created_with_apply_and_with_put_and_serves_at_once() {
    if !privileged("a_gateway_is_created_with_apply_and_with_put_and_serves_at_once") {
        return;
    }
    let bed = empty_bed();
    assert!(bed.sample_answers(9050, 3).keys().all(|k| k.starts_with("error")), "nothing serves before the gateway exists");

    let file = bed.run_dir.path().join("new-gateway.yaml");
    std::fs::write(&file, sava_yaml("100%", "0%", "")).unwrap();
    bed.cli_ok(&["apply", "-f", file.to_str().unwrap()]).unwrap();
    assert_eq!(bed.sample_answers(9050, 30), BTreeMap::from([("1.0.0".to_string(), 30)]));

    let second = sava_gateway("sava-b", 9060, "0%", "100%", "10.10.2.21:8080", "");
    let (body, status) = bed.curl(&["-X", "PUT", "--data-binary", &second, "http://splitter/api/v1/gateways/sava-b"]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(bed.sample_answers(9060, 30), BTreeMap::from([("1.1.0".to_string(), 30)]));
    let names = bed.cli_ok(&["get"]).unwrap();
    assert!(names.contains("name: \"sava\"\n") && names.contains("name: \"sava-b\"\n"), "{names}");
}

#[test]
fn a_deleted_gateway_refuses_new_connections_and_its_established_ones_finish() {
    if !privileged("a_deleted_gateway_refuses_new_connections_and_its_established_ones_finish") {
        return;
    }
    let bed = empty_bed();
    bed.curl(&["-X", "PUT", "--data-binary", &sava_yaml("50%", "50%", ""), "http://splitter/api/v1/gateways/sava"]);
    let mut to_stable = connection_to(&bed, "1.0.0");
    let mut to_canary = connection_to(&bed, "1.1.0");
    bed.cli_ok(&["delete", GATEWAY]).unwrap();
    let after = bed.sample_answers(9050, 10);
    assert!(after.keys().all(|k| k.starts_with("error")), "new connections after the delete: {after:?}");
    for _ in 0..5 {
        assert!(ask(&bed, &mut to_stable).starts_with("1.0.0"));
        assert!(ask(&bed, &mut to_canary).starts_with("1.1.0"));
    }
    let (code, _, err) = bed.cli(&["get", GATEWAY]).unwrap();
    assert!(code != 0 && err.contains(GATEWAY), "{err}");
}

#[test]
fn a_rollout_pauses_resumes_aborts_and_promotes_on_command() {
    if !privileged("a_rollout_pauses_resumes_aborts_and_promotes_on_command") {
        return;
    }
    let bed = empty_bed();
    bed.curl(&["-X", "PUT", "--data-binary", &sava_yaml("100%", "0%", ""), "http://splitter/api/v1/gateways/sava"]);
    let traffic = HttpTraffic::start(&bed.client);
    let start = ["canary", "start", GATEWAY, "--route", CANARY, "--steps", "10,50,100", "--interval", "1s", "--min-flows", "5"];
    bed.cli_ok(&start).unwrap();
    wait_rollout(&bed, "first step", |r| r["step"] == 0 && r["state"] == "progressing");
    bed.cli_ok(&["canary", "pause", GATEWAY]).unwrap();
    let paused = bed.rollout(GATEWAY);
    // Two intervals and more: a paused rollout holds its step and its weights.
    thread::sleep(Duration::from_millis(2500));
    let held = bed.rollout(GATEWAY);
    assert_eq!((held["state"].as_str(), &held["step"]), (Some("paused"), &paused["step"]), "{held}");
    assert_eq!(weight(&bed, CANARY), format!("weight: {}%", [10, 50, 100][paused["step"].as_u64().unwrap() as usize]));

    bed.cli_ok(&["canary", "resume", GATEWAY]).unwrap();
    wait_rollout(&bed, "the 50% step after resume", |r| r["step"] == 1);
    assert_eq!(weight(&bed, CANARY), "weight: 50%");
    let mut on_canary = connection_to(&bed, "1.1.0");
    bed.cli_ok(&["canary", "abort", GATEWAY]).unwrap();
    let aborted = bed.rollout(GATEWAY);
    assert_eq!(
        (aborted["state"].as_str(), aborted["reason"].as_str()),
        (Some("rolled-back"), Some("aborted by the operator")),
        "{aborted}"
    );
    assert_eq!(weight(&bed, CANARY), "weight: 0%", "abort returns to the weights before the rollout");
    for _ in 0..5 {
        assert!(ask(&bed, &mut on_canary).starts_with("1.1.0"), "an established flow keeps its target");
    }
    assert_eq!(bed.sample_answers(9050, 30), BTreeMap::from([("1.0.0".to_string(), 30)]));

    bed.cli_ok(&start).unwrap();
    wait_rollout(&bed, "a second rollout", |r| r["state"] == "progressing");
    bed.cli_ok(&["canary", "promote", GATEWAY]).unwrap();
    assert_eq!(bed.rollout(GATEWAY)["state"], "promoted");
    assert_eq!(weight(&bed, CANARY), "weight: 100%");
    assert_eq!(bed.sample_answers(9050, 30), BTreeMap::from([("1.1.0".to_string(), 30)]));
    let (_, failures) = traffic.finish();
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn a_weight_changed_by_hand_pauses_the_rollout_and_holds() {
    if !privileged("a_weight_changed_by_hand_pauses_the_rollout_and_holds") {
        return;
    }
    let bed = empty_bed();
    bed.curl(&["-X", "PUT", "--data-binary", &sava_yaml("100%", "0%", ""), "http://splitter/api/v1/gateways/sava"]);
    let traffic = HttpTraffic::start(&bed.client);
    bed.cli_ok(&["canary", "start", GATEWAY, "--route", CANARY, "--steps", "10,50,100", "--interval", "1s", "--min-flows", "5"]).unwrap();
    wait_rollout(&bed, "first step", |r| r["state"] == "progressing");
    bed.cli_ok(&["weight", GATEWAY, &format!("{CANARY}=30%")]).unwrap();
    let r = bed.rollout(GATEWAY);
    assert_eq!(r["state"], "paused", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("changed by hand"), "{r}");
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(bed.rollout(GATEWAY)["state"], "paused");
    assert_eq!(weight(&bed, CANARY), "weight: 30%", "the hand-set weight holds");
    drop(traffic);
}

#[test]
fn an_http_health_check_on_its_own_port_takes_out_a_target_answering_503() {
    if !privileged("an_http_health_check_on_its_own_port_takes_out_a_target_answering_503") {
        return;
    }
    let mut bed = empty_bed();
    // Health endpoints on port 8081: the stable target's says 200, the canary's 503 (its
    // port 8080 answers /health with 200, so checking the wrong port keeps it in).
    bed.start_backend("10.10.2.11", 8081, "health", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8081, "health", &["--health-status", "503"]).unwrap();
    let check = "health_check:\n  protocol: http\n  path: /health\n  port: 8081\n  interval: 200ms\n  timeout: 150ms\n  \
                 unhealthy_threshold: 2\n  healthy_threshold: 2\n";
    bed.curl(&["-X", "PUT", "--data-binary", &sava_yaml("50%", "50%", check), "http://splitter/api/v1/gateways/sava"]);
    bed.agent().wait_for_line("target 10.10.2.21:8080 unhealthy", Duration::from_secs(30)).unwrap();
    assert_eq!(bed.sample_answers(9050, 40), BTreeMap::from([("1.0.0".to_string(), 40)]), "the unhealthy target takes no new flow");
    let got = bed.cli_ok(&["get", GATEWAY]).unwrap();
    assert!(got.contains("10.10.2.21:8080 unhealthy"), "{got}");
    assert!(!bed.agent().lines().iter().any(|l| l.contains("target 10.10.2.11:8080 unhealthy")), "the stable target stays in");
}

#[test]
fn rollback_walks_back_more_than_one_change() {
    if !privileged("rollback_walks_back_more_than_one_change") {
        return;
    }
    let bed = empty_bed();
    bed.curl(&["-X", "PUT", "--data-binary", &sava_yaml("100%", "0%", ""), "http://splitter/api/v1/gateways/sava"]);
    bed.cli_ok(&["weight", GATEWAY, &format!("{CANARY}=20%")]).unwrap();
    bed.cli_ok(&["weight", GATEWAY, &format!("{CANARY}=50%")]).unwrap();
    bed.cli_ok(&["weight", GATEWAY, &format!("{CANARY}=100%")]).unwrap();
    assert_eq!(bed.sample_answers(9050, 20), BTreeMap::from([("1.1.0".to_string(), 20)]));
    for expected in ["50%", "20%", "0%"] {
        bed.cli_ok(&["rollback", GATEWAY]).unwrap();
        assert_eq!(weight(&bed, CANARY), format!("weight: {expected}"));
    }
    assert_eq!(weight(&bed, STABLE), "weight: 100%");
    assert_eq!(bed.sample_answers(9050, 20), BTreeMap::from([("1.0.0".to_string(), 20)]));
    let (code, _, err) = bed.cli(&["rollback", GATEWAY]).unwrap();
    assert!(code != 0 && err.contains("no earlier weights"), "{err}");
    assert_eq!(weight(&bed, CANARY), "weight: 0%", "a refused rollback changes nothing");
}

#[test]
fn validate_checks_files_offline_and_events_follow_streams_changes() {
    if !privileged("validate_checks_files_offline_and_events_follow_streams_changes") {
        return;
    }
    let bed = empty_bed();
    let dir = bed.run_dir.path();
    let good = dir.join("good.yaml");
    std::fs::write(&good, sava_yaml("90%", "10%", "")).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, sava_yaml("90%", "20%", "")).unwrap();
    let out = Command::new(splitter_bin()).args(["validate", "-f"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(splitter_bin()).args(["validate", "-f"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.trim().lines().count() == 1 && err.contains(&format!("{}:4:1: routes: the weights add up to 110%", bad.display())),
        "{err}"
    );
    assert!(bed.cli(&["get", GATEWAY]).unwrap().0 != 0, "validate applied nothing");

    let mut follow = Command::new(splitter_bin());
    follow.args(["events", "--follow", "--socket"]).arg(bed.socket());
    let follow = Process::spawn(follow).unwrap();
    thread::sleep(Duration::from_millis(300));
    bed.cli_ok(&["apply", "-f", good.to_str().unwrap()]).unwrap();
    bed.cli_ok(&["weight", GATEWAY, &format!("{CANARY}=35%")]).unwrap();
    follow.wait_for_line(&format!("{CANARY}=35%"), Duration::from_secs(30)).unwrap();
}

/// Lines the process printed after the first `skip`, any of them holding `needle` as whole
/// words (`generation 2` does not match `generation 20`).
fn logged_after(process: &Process, skip: usize, needle: &str) -> bool {
    process.lines().iter().skip(skip).any(|line| {
        line.match_indices(needle).any(|(at, _)| {
            let before = line[..at].chars().next_back();
            let after = line[at + needle.len()..].chars().next();
            !before.is_some_and(|c| c.is_alphanumeric()) && !after.is_some_and(|c| c.is_alphanumeric())
        })
    })
}

fn wait_logged(process: &Process, skip: usize, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logged_after(process, skip, needle) {
        assert!(Instant::now() < deadline, "no {needle:?} after line {skip}: {:#?}", &process.lines()[skip.min(process.lines().len())..]);
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_single_configuration_file_is_followed_and_sighup_reloads_it() {
    if !privileged("a_single_configuration_file_is_followed_and_sighup_reloads_it") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    let file = bed.run_dir.path().join("sava.yaml");
    std::fs::write(&file, sava_yaml("100%", "0%", "")).unwrap();
    let socket = bed.socket().display().to_string();
    let state = bed.run_dir.path().join("state").display().to_string();
    let agent = bed
        .splitter
        .spawn(
            splitter_bin(),
            &[
                "agent",
                "--iface",
                "spl-c",
                "--iface",
                "spl-b",
                "--config",
                file.to_str().unwrap(),
                "--socket",
                &socket,
                "--state-dir",
                &state,
            ],
        )
        .unwrap();
    agent.wait_for_line("ready", Duration::from_secs(30)).unwrap();
    wait_logged(&agent, 0, "applied gateway sava generation 1");
    assert_eq!(bed.sample_answers(9050, 20), BTreeMap::from([("1.0.0".to_string(), 20)]));

    let before = agent.lines().len();
    agent.signal(libc::SIGHUP).unwrap();
    wait_logged(&agent, before, &format!("SIGHUP: configuration reloaded from {}", file.display()));
    assert!(!logged_after(&agent, before, "generation 2"), "an unchanged file changes nothing");

    let before = agent.lines().len();
    let tmp = bed.run_dir.path().join(".sava.yaml.tmp");
    std::fs::write(&tmp, sava_yaml("0%", "100%", "")).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    agent.signal(libc::SIGHUP).unwrap();
    wait_logged(&agent, before, "applied gateway sava generation 2");
    assert_eq!(bed.sample_answers(9050, 20), BTreeMap::from([("1.1.0".to_string(), 20)]));
    assert!(!logged_after(&agent, before, "generation 3"), "one edit, one change: {:#?}", agent.lines());
}

#[test]
fn the_gateway_limit_refuses_one_more_and_changes_nothing() {
    if !privileged("the_gateway_limit_refuses_one_more_and_changes_nothing") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.start_agent(&["--max-gateways", "2"]).unwrap();
    for (name, port) in [("sava", 9050u16), ("sava-b", 9060)] {
        let doc = sava_gateway(name, port, "100%", "0%", "10.10.2.21:8080", "");
        let (body, status) = bed.curl(&["-X", "PUT", "--data-binary", &doc, &format!("http://splitter/api/v1/gateways/{name}")]);
        assert_eq!(status, 200, "{body}");
    }
    let third = sava_gateway("sava-c", 9070, "100%", "0%", "10.10.2.21:8080", "");
    let (body, status) = bed.curl(&["-X", "PUT", "--data-binary", &third, "http://splitter/api/v1/gateways/sava-c"]);
    assert!((400..500).contains(&status), "{status} {body}");
    assert!(body.contains("--max-gateways 2"), "the error names the limit: {body}");
    let (code, _, _) = bed.cli(&["get", "sava-c"]).unwrap();
    assert_ne!(code, 0, "the refused gateway does not exist");
    assert!(bed.sample_answers(9070, 3).keys().all(|k| k.starts_with("error")));
    assert_eq!(bed.sample_answers(9060, 20), BTreeMap::from([("1.0.0".to_string(), 20)]), "the others serve on");
    // Room again after a delete.
    bed.cli_ok(&["delete", "sava-b"]).unwrap();
    let (body, status) = bed.curl(&["-X", "PUT", "--data-binary", &third, "http://splitter/api/v1/gateways/sava-c"]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(bed.sample_answers(9070, 20), BTreeMap::from([("1.0.0".to_string(), 20)]));
}

#[test]
fn idle_udp_flows_expire_after_the_udp_timeout_and_active_ones_stay() {
    if !privileged("idle_udp_flows_expire_after_the_udp_timeout_and_active_ones_stay") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 5353, "1.0.0", &["--udp"]).unwrap();
    bed.write_config(
        "dns.yaml",
        &format!("name: dns\nport: 5353/udp\nvirtual_address: {VIP}\nroutes:\n  dns/v1:\n    targets: [10.10.2.11:5353]\n"),
    )
    .unwrap();
    bed.start_agent(&["--udp-timeout", "1"]).unwrap();
    let ask = |socket: &std::net::UdpSocket| -> String {
        socket.send_to(b"query", (VIP, 5353)).unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let (idle, active) = bed
        .client
        .enter(|| {
            let sockets = [std::net::UdpSocket::bind("0.0.0.0:0").unwrap(), std::net::UdpSocket::bind("0.0.0.0:0").unwrap()];
            for s in &sockets {
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                assert!(ask(s).starts_with("1.0.0"));
            }
            let [a, b] = sockets;
            (a, b)
        })
        .unwrap();
    assert_eq!(bed.metric("splitter_conntrack_entries"), 4.0, "two flows, two entries each");
    // The active flow sends every 300 ms; the idle one nothing. The sweep runs every 2-10 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    while bed.metric("splitter_conntrack_entries") > 2.0 {
        assert!(Instant::now() < deadline, "the idle flow never expired");
        bed.client.enter(|| assert!(ask(&active).starts_with("1.0.0"))).unwrap();
        thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(bed.metric("splitter_conntrack_entries"), 2.0, "the active flow kept its entries");
    let new_flows = bed.metric("splitter_gateway_new_flows_total{gateway=\"dns\"}");
    bed.client.enter(|| assert!(ask(&idle).starts_with("1.0.0"))).unwrap();
    assert_eq!(bed.metric("splitter_gateway_new_flows_total{gateway=\"dns\"}"), new_flows + 1.0, "the idle flow came back as a new one");
}

/// Client ports for `n` connections to the sava gateway whose first full-NAT candidate
/// source ports all differ. A connection whose entries are all evicted while its target
/// still holds it is known by nothing here: a new flow whose first candidate is that port
/// takes it (RELIABILITY.md), and the target's answer resets one connection or the other.
/// Distinct first candidates keep that out of a test of the table's capacity; flows that
/// did not get their first candidate are re-created on theirs (test_run_datapath).
fn ports_with_distinct_first_candidates(n: usize) -> Vec<u16> {
    let (client, vip) = (CLIENT_ADDR.parse::<Ipv4Addr>().unwrap(), VIP.parse::<Ipv4Addr>().unwrap());
    let mut first_candidates = HashSet::new();
    (20_000u16..)
        .filter(|&port| first_candidates.insert(snat_port(flow_hash(&flow_key(client, port, vip, 9050, PROTO_TCP)), 0)))
        .take(n)
        .collect()
}

/// `--conntrack-size` at its limit, for a gateway in `mode`: more long-lived connections
/// than the table holds all connect (the least recently used entries make room) and the
/// table never grows past its capacity; a connection whose entries were evicted is
/// re-created by the table on its next packet (same weights, same target, and for full
/// NAT the same source port), and the agent counts it.
fn conntrack_at_capacity(mode: &str) {
    const CAPACITY: usize = 128;
    const CONNECTIONS: usize = 100;
    let ports = ports_with_distinct_first_candidates(CONNECTIONS);
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.write_config("sava.yaml", &sava_yaml("50%", "50%", &format!("mode: {mode}\n"))).unwrap();
    bed.start_agent(&["--conntrack-size", &CAPACITY.to_string()]).unwrap();
    assert_eq!(bed.metric("splitter_conntrack_capacity"), CAPACITY as f64);
    let mut connections: Vec<(LineClient, String)> = bed
        .client
        .enter(|| {
            ports
                .iter()
                .enumerate()
                .map(|(i, &port)| {
                    let local = SocketAddr::new(IpAddr::V4(CLIENT_ADDR.parse().unwrap()), port);
                    let stream = connect_bound(local, &format!("{VIP}:9050")).unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
                    let mut c = LineClient::over(stream).unwrap();
                    let version = c.ask().unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
                    (c, version)
                })
                .collect()
        })
        .unwrap();
    let entries = bed.metric("splitter_conntrack_entries");
    assert!(entries <= CAPACITY as f64, "{entries} entries in a table of {CAPACITY}");
    let missed_before = bed.metric("splitter_gateway_conntrack_miss_total{gateway=\"sava\"}");
    for (i, (c, version)) in connections.iter_mut().enumerate() {
        let again = bed.client.enter(|| c.ask()).unwrap().unwrap_or_else(|e| panic!("connection {i} after the table filled: {e:#}"));
        assert_eq!(&again, version, "connection {i} kept its target");
    }
    let missed = bed.metric("splitter_gateway_conntrack_miss_total{gateway=\"sava\"}") - missed_before;
    assert!(missed > 0.0, "{CONNECTIONS} flows in a table of {} flows: some were evicted and re-created", CAPACITY / 2);
    assert!(bed.metric("splitter_conntrack_entries") <= CAPACITY as f64);
}

#[test]
fn conntrack_at_capacity_keeps_admitting_and_recreates_evicted_dnat_flows() {
    if !privileged("conntrack_at_capacity_keeps_admitting_and_recreates_evicted_dnat_flows") {
        return;
    }
    conntrack_at_capacity("dnat");
}

#[test]
fn conntrack_at_capacity_keeps_admitting_and_recreates_evicted_fullnat_flows() {
    if !privileged("conntrack_at_capacity_keeps_admitting_and_recreates_evicted_fullnat_flows") {
        return;
    }
    conntrack_at_capacity("fullnat");
}
