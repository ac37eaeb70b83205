//! Automated canary end to end: health checks and progressive rollouts against real
//! backends (sava 1.0.0 stable, sava 1.1.0 canary) under client traffic.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use splitter_tests::{
    privileged,
    testbed::{http_get, sava_gateway, Testbed, SAVA_CANARY as CANARY, SAVA_STABLE as STABLE, VIP},
    traffic::Bpffs,
};

const GATEWAY: &str = "sava";

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn gateway(health_check: &str) -> String {
    sava_gateway(GATEWAY, 9050, "100%", "0%", "10.10.2.21:8080", health_check)
}

const TCP_CHECK: &str = "health_check:
  protocol: tcp
  interval: 200ms
  timeout: 150ms
  unhealthy_threshold: 2
  healthy_threshold: 2
";

/// One client request: when it ended, and the version that answered (or the error).
#[derive(Clone, Debug)]
struct Outcome {
    at_ms: u64,
    answer: Result<String, String>,
}

/// Client traffic in the background: one request after another (at most 10 minutes or
/// 300k requests), every outcome kept.
struct Traffic {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(bed: &Testbed, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let ns = bed.client.name().to_string();
        let (s, o) = (stop.clone(), outcomes.clone());
        let handle = thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            // SAFETY: a namespace descriptor; setns moves only this thread.
            assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) }, 0);
            let deadline = Instant::now() + Duration::from_secs(600);
            for _ in 0..300_000 {
                if s.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let answer = http_get(&format!("{VIP}:9050"), None)
                    .map(|body| body.split(' ').next().unwrap_or("").to_string())
                    .map_err(|e| format!("{e:#}"));
                o.lock().unwrap().push(Outcome { at_ms: now_ms(), answer });
                thread::sleep(pause);
            }
        });
        Self { stop, outcomes, handle: Some(handle) }
    }

    fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        self.outcomes()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn events(bed: &Testbed) -> Vec<serde_json::Value> {
    let (body, _) = curl(bed, "/api/v1/events");
    serde_json::from_str::<serde_json::Value>(&body).unwrap().as_array().unwrap().clone()
}

fn curl(bed: &Testbed, path: &str) -> (String, u16) {
    bed.curl(&[&format!("http://splitter{path}")])
}

/// The rollout's state, as `splitter canary status` reports it (null before it starts).
/// Waits until the rollout is in `state` (at most `timeout`); returns when it got there.
fn wait_state(bed: &Testbed, state: &str, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        let r = bed.rollout(GATEWAY);
        if r["state"] == state {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "rollout not {state} after {timeout:?}: {r}\nevents: {:#?}", events(bed));
        thread::sleep(Duration::from_millis(50));
    }
}

/// The window the rollout's verdict names (`over a 1.2s window at step 2`), in seconds.
fn verdict_window_s(r: &serde_json::Value) -> f64 {
    let reason = r["reason"].as_str().unwrap_or_default();
    let after = reason.rsplit_once("over a ").unwrap_or_else(|| panic!("no window in {reason:?}")).1;
    after.split('s').next().unwrap().parse().unwrap_or_else(|_| panic!("no window in {reason:?}"))
}

fn canary_weight(bed: &Testbed) -> String {
    let got = bed.cli_ok(&["get", GATEWAY]).unwrap();
    let mut lines = got.lines().skip_while(|l| !l.contains(CANARY));
    lines.nth(1).unwrap_or_default().trim().to_string()
}

/// The sava gateway (TCP health checks) under client traffic, with a rollout through
/// 10/25/50/100% every `interval`, judging windows of at least `min_flows` new canary
/// flows, that has reached its second step (within `timeout`); the agent started with
/// `agent_args`.
fn rollout_in_its_second_step(interval: &str, min_flows: &str, timeout: Duration, agent_args: &[&str]) -> (Testbed, Traffic) {
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.write_config("sava.yaml", &gateway(TCP_CHECK)).unwrap();
    bed.start_agent(agent_args).unwrap();
    let traffic = Traffic::start(&bed, Duration::from_millis(2));
    bed.cli_ok(&[
        "canary",
        "start",
        GATEWAY,
        "--route",
        CANARY,
        "--steps",
        "10,25,50,100",
        "--interval",
        interval,
        "--min-flows",
        min_flows,
    ])
    .unwrap();
    let deadline = Instant::now() + timeout;
    while bed.rollout(GATEWAY)["step"] != 1 {
        assert!(Instant::now() < deadline, "no second step: {}", bed.rollout(GATEWAY));
        thread::sleep(Duration::from_millis(50));
    }
    (bed, traffic)
}

#[test]
fn a_healthy_rollout_follows_every_step_and_ends_promoted() {
    if !privileged("a_healthy_rollout_follows_every_step_and_ends_promoted") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.write_config("sava.yaml", &gateway(TCP_CHECK)).unwrap();
    bed.start_agent(&[]).unwrap();
    let traffic = Traffic::start(&bed, Duration::ZERO);
    thread::sleep(Duration::from_millis(300));
    let out = bed
        .cli_ok(&["canary", "start", GATEWAY, "--route", CANARY, "--steps", "5,10,25,50,100", "--interval", "1500ms", "--min-flows", "10"])
        .unwrap();
    println!("{out}");
    wait_state(&bed, "promoted", Duration::from_secs(30));
    thread::sleep(Duration::from_millis(500));
    let outcomes = traffic.finish();

    // The steps, from the event log: when each weight took effect.
    let steps: Vec<(u64, f64)> = events(&bed)
        .iter()
        .filter(|e| e["kind"] == "rollout")
        .filter_map(|e| {
            let m = e["message"].as_str().unwrap();
            let weight = if m.starts_with("promoted") {
                100.0
            } else {
                let at = m.split(" at ").nth(1)?.split('%').next()?;
                at.parse().ok()?
            };
            (m.starts_with("step") || m.starts_with("promoted")).then_some((e["time_ms"].as_u64().unwrap(), weight))
        })
        .collect();
    println!("steps: {steps:?}");
    assert_eq!(steps.iter().map(|s| s.1).collect::<Vec<_>>(), vec![5.0, 10.0, 25.0, 50.0, 100.0]);
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.answer.is_err()).collect();
    assert!(failures.is_empty(), "{failures:?}");
    for (i, (start, weight)) in steps.iter().enumerate() {
        let end = steps.get(i + 1).map_or(u64::MAX, |s| s.0);
        // Requests that ended well inside the step.
        let window: Vec<&Outcome> = outcomes.iter().filter(|o| o.at_ms > start + 100 && o.at_ms < end).collect();
        let canary = window.iter().filter(|o| o.answer.as_deref() == Ok("1.1.0")).count();
        let share = 100.0 * canary as f64 / window.len().max(1) as f64;
        // Binomial spread of the observed share, plus slack for flows straddling a switch.
        let sigma = (weight * (100.0 - weight) / window.len().max(1) as f64).sqrt();
        println!("step {weight}%: {canary}/{} requests on the canary = {share:.1}% (sigma {sigma:.1})", window.len());
        assert!(window.len() >= 50, "too few requests in step {weight}%");
        assert!((share - weight).abs() <= 4.0 * sigma + 2.0, "step {weight}%: observed {share:.1}%");
    }
    assert_eq!(canary_weight(&bed), "weight: 100%");
}

#[test]
fn a_killed_canary_is_rolled_back_within_two_intervals() {
    if !privileged("a_killed_canary_is_rolled_back_within_two_intervals") {
        return;
    }
    // Into the second step, then kill the canary, as the Vamp tutorial does.
    let (mut bed, traffic) = rollout_in_its_second_step("3s", "5", Duration::from_secs(15), &[]);
    bed.stop_backend("10.10.2.21:8080").unwrap();
    let killed = Instant::now();
    let killed_ms = now_ms();
    let rolled_back = wait_state(&bed, "rolled-back", Duration::from_secs(10));
    let took = rolled_back - killed;
    println!("rolled back {took:?} after the kill: {}", bed.rollout(GATEWAY)["reason"]);
    // Judged on the agent's own clock: the verdict names its window, at most two intervals.
    assert!(verdict_window_s(&bed.rollout(GATEWAY)) <= 6.0, "two intervals are 6 s: {}", bed.rollout(GATEWAY));
    assert_eq!(canary_weight(&bed), "weight: 0%");
    let reasons: Vec<String> = events(&bed).iter().map(|e| e["message"].as_str().unwrap().to_string()).collect();
    assert!(reasons.iter().any(|m| m.starts_with("rolled back:")), "{reasons:#?}");
    let settled_ms = now_ms();
    thread::sleep(Duration::from_secs(2));
    let outcomes = traffic.finish();
    let during = outcomes.iter().filter(|o| o.at_ms > killed_ms && o.at_ms < settled_ms && o.answer.is_err()).count();
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.at_ms > settled_ms).collect();
    println!("{during} requests failed between the kill and the rollback; {} after it", after.len());
    assert!(after.len() > 50);
    assert!(after.iter().all(|o| o.answer.as_deref() == Ok("1.0.0")), "after the rollback every request succeeds on stable");
}

/// A rollout lives in the agent's saved state: an agent restarted mid-way (its gateway
/// defined by a configuration file that still says 100/0) takes the rollout up at the step
/// it had reached, with that step's weights, and carries it to the end.
#[test]
fn an_agent_restarted_mid_rollout_takes_it_up_at_its_step() {
    if !privileged("an_agent_restarted_mid_rollout_takes_it_up_at_its_step") {
        return;
    }
    // Windows of 40 flows or more: what is judged here is continuity across the restart,
    // and a single stray reset in a tiny window on a loaded machine would read as 17%.
    // The datapath's pins on a bpffs of the test's: the datapath outlives the agent (with
    // pins private to the agent's process, the restart would take it down and reset the
    // connections in flight).
    let bpffs = Bpffs::mount();
    let pin_dir = bpffs.dir.path().join("splitter").display().to_string();
    let (mut bed, traffic) = rollout_in_its_second_step("4s", "40", Duration::from_secs(20), &["--bpffs", &pin_dir]);
    let before = bed.rollout(GATEWAY);
    let restart = Instant::now();
    let lines = bed.stop_agent().unwrap();
    let stopped = restart.elapsed();
    // The health-check tasks end with the agent (they once held it for its 5 s grace
    // period, reported as an open control connection).
    assert!(!lines.iter().any(|l| l.contains("still open")), "{}", lines.join("\n"));
    bed.start_agent(&["--bpffs", &pin_dir]).unwrap();
    println!("agent stopped in {stopped:?}, ready again {:?} after the stop began", restart.elapsed());
    let restarted_ms = now_ms();

    let after = bed.rollout(GATEWAY);
    println!("before the restart: {before}\nafter it: {after}");
    assert_eq!((&after["state"], &after["step"]), (&serde_json::json!("progressing"), &serde_json::json!(1)), "{after}");
    assert_eq!(after["started_unix"], before["started_unix"], "the same rollout, not a new one");
    assert_eq!(canary_weight(&bed), "weight: 25%", "the step's weights, not the file's 0%");
    let messages: Vec<String> = events(&bed).iter().map(|e| e["message"].as_str().unwrap().to_string()).collect();
    assert!(messages.iter().any(|m| m == "taken up after an agent restart: progressing at step 2/4"), "{messages:#?}");

    wait_state(&bed, "promoted", Duration::from_secs(30));
    assert_eq!(canary_weight(&bed), "weight: 100%");
    let messages: Vec<String> = events(&bed).iter().map(|e| e["message"].as_str().unwrap().to_string()).collect();
    let steps: Vec<&String> = messages.iter().filter(|m| m.starts_with("step ") || m.starts_with("promoted")).collect();
    assert!(steps.len() == 2 && steps[0].starts_with("step 3/4") && steps[1].starts_with("promoted"), "{messages:#?}");
    // The datapath forwarded on while no agent ran: not one request failed, before, during
    // or after the restart.
    let outcomes = traffic.finish();
    let served_after = outcomes.iter().filter(|o| o.at_ms > restarted_ms).count();
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.answer.as_ref().err().map(|e| format!("{} ms from the restart: {e}", o.at_ms as i64 - restarted_ms as i64)))
        .collect();
    assert!(served_after > 50 && failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), outcomes.len());
}

#[test]
fn a_canary_answering_with_resets_is_rolled_back() {
    if !privileged("a_canary_answering_with_resets_is_rolled_back") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &["--reset"]).unwrap();
    // No health check: the canary accepts connections, only the datapath sees the resets.
    bed.write_config("sava.yaml", &gateway("")).unwrap();
    bed.start_agent(&[]).unwrap();
    let traffic = Traffic::start(&bed, Duration::from_millis(2));
    bed.cli_ok(&[
        "canary",
        "start",
        GATEWAY,
        "--route",
        CANARY,
        "--steps",
        "20,50,100",
        "--interval",
        "2s",
        "--min-flows",
        "10",
        "--max-error-rate",
        "5%",
    ])
    .unwrap();
    wait_state(&bed, "rolled-back", Duration::from_secs(10));
    let r = bed.rollout(GATEWAY);
    println!("{}", r["reason"]);
    assert!(r["reason"].as_str().unwrap().contains("error rate"), "{r}");
    assert_eq!(canary_weight(&bed), "weight: 0%");
    let stats: serde_json::Value = serde_json::from_str(&bed.cli_ok(&["stats", "-o", "json"]).unwrap()).unwrap();
    let canary = stats[0]["targets"].as_array().unwrap().iter().find(|t| t["route"] == CANARY).unwrap().clone();
    assert!(canary["resets_from_target"].as_u64().unwrap() >= 10, "{canary}");
    drop(traffic);
}

#[test]
fn an_unhealthy_target_leaves_the_table_and_rejoins_while_its_route_keeps_its_share() {
    if !privileged("an_unhealthy_target_leaves_the_table_and_rejoins_while_its_route_keeps_its_share") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    for addr in ["10.10.2.11", "10.10.2.12"] {
        bed.start_backend(addr, 8080, "1.0.0", &[]).unwrap();
    }
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    let yaml = gateway(TCP_CHECK)
        .replace("weight: 100%\n    targets: [10.10.2.11:8080]", "weight: 50%\n    targets: [10.10.2.11:8080, 10.10.2.12:8080]")
        .replace("weight: 0%", "weight: 50%");
    bed.write_config("sava.yaml", &yaml).unwrap();
    bed.start_agent(&[]).unwrap();
    let sample = |bed: &Testbed, n: usize| -> Vec<String> {
        bed.client.enter(|| (0..n).map(|_| http_get(&format!("{VIP}:9050"), None).unwrap()).collect()).unwrap()
    };
    let count = |answers: &[String], needle: &str| answers.iter().filter(|a| a.contains(needle)).count();

    bed.stop_backend("10.10.2.12:8080").unwrap();
    bed.agent().wait_for_line("target 10.10.2.12:8080 unhealthy", Duration::from_secs(5)).unwrap();
    let answers = sample(&bed, 300);
    println!("one stable instance down: {} on .11, {} on .21", count(&answers, "10.10.2.11"), count(&answers, "10.10.2.21"));
    assert_eq!(count(&answers, "10.10.2.12"), 0);
    let stable = count(&answers, "1.0.0");
    assert!((105..=195).contains(&stable), "the stable route keeps its 50%: {stable}/300");
    let got = bed.cli_ok(&["get", GATEWAY]).unwrap();
    assert!(got.contains("10.10.2.12:8080 unhealthy"), "get shows health: {got}");
    let stats = bed.cli_ok(&["stats", "-o", "json"]).unwrap();
    assert!(stats.contains("unhealthy"), "{stats}");

    bed.start_backend("10.10.2.12", 8080, "1.0.0", &[]).unwrap();
    bed.agent().wait_for_line("target 10.10.2.12:8080 healthy again", Duration::from_secs(5)).unwrap();
    let answers = sample(&bed, 300);
    let back = count(&answers, "10.10.2.12");
    println!("instance back: {back}/300 on .12");
    assert!((40..=110).contains(&back), "the instance takes its quarter again: {back}/300");
}

#[test]
fn a_canary_with_slow_connection_setup_shows_it_and_is_rolled_back() {
    if !privileged("a_canary_with_slow_connection_setup_shows_it_and_is_rolled_back") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    // Latency on the canary's side: its kernel loses half the SYNs it is sent (nftables in
    // the backends' namespace), so clients retry a second later. (This kernel has no
    // netem to delay packets instead.)
    bed.backends
        .run(
            "nft",
            &["add table ip slowcanary; \
                 add chain ip slowcanary input { type filter hook input priority 0; }; \
                 add rule ip slowcanary input ip daddr 10.10.2.21 tcp dport 8080 \
                 tcp flags & (syn | ack) == syn numgen random mod 2 == 0 drop"],
        )
        .unwrap();
    // The gateway's connect timeout, past the clients' first SYN retransmission: the lost
    // SYNs show as latency, not as failed connects (the default 1 s would count them).
    bed.write_config("sava.yaml", &gateway("connect_timeout: 3s\n")).unwrap();
    bed.start_agent(&[]).unwrap();
    assert!(bed.cli_ok(&["get", GATEWAY]).unwrap().contains("connect_timeout: 3s"));
    let traffic: Vec<Traffic> = (0..4).map(|_| Traffic::start(&bed, Duration::ZERO)).collect();
    bed.cli_ok(&[
        "canary",
        "start",
        GATEWAY,
        "--route",
        CANARY,
        "--steps",
        "50,100",
        "--interval",
        "5s",
        "--min-flows",
        "10",
        "--max-connect-latency",
        "2x",
    ])
    .unwrap();
    wait_state(&bed, "rolled-back", Duration::from_secs(20));
    let r = bed.rollout(GATEWAY);
    println!("{}", r["reason"]);
    assert!(r["reason"].as_str().unwrap().contains("connect latency"), "{r}");
    let (metrics, _) = curl(&bed, "/metrics");
    let latency = |route: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with("splitter_target_connect_latency_seconds") && l.contains(&format!("route=\"{route}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no connect latency for {route} in metrics"))
    };
    let (canary, stable) = (latency(CANARY), latency(STABLE));
    println!("connect latency: canary {:.2} ms, stable {:.3} ms", canary * 1e3, stable * 1e3);
    assert!(canary > 2.0 * stable.max(0.0001), "canary {canary} vs stable {stable}");
    let stats = bed.cli_ok(&["stats", GATEWAY]).unwrap();
    println!("{stats}");
    assert!(stats.contains("CONNECT"));
    drop(traffic);
}

#[test]
fn without_traffic_the_rollout_waits_and_says_so() {
    if !privileged("without_traffic_the_rollout_waits_and_says_so") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.write_config("sava.yaml", &gateway("")).unwrap();
    bed.start_agent(&[]).unwrap();
    bed.cli_ok(&["canary", "start", GATEWAY, "--route", CANARY, "--steps", "10,100", "--interval", "500ms", "--min-flows", "20"]).unwrap();
    thread::sleep(Duration::from_millis(1800));
    let r = bed.rollout(GATEWAY);
    assert_eq!((r["state"].as_str(), r["step"].as_u64()), (Some("progressing"), Some(0)), "{r}");
    assert_eq!(canary_weight(&bed), "weight: 10%");
    let out = bed.cli_ok(&["events", GATEWAY]).unwrap();
    println!("{out}");
    assert!(out.contains("waiting at step 1: only 0 new canary flows in the window, 20 needed to judge"), "{out}");
    // Traffic arrives: the rollout moves on.
    let traffic = Traffic::start(&bed, Duration::ZERO);
    wait_state(&bed, "promoted", Duration::from_secs(20));
    drop(traffic);
}

#[test]
fn a_canary_block_in_the_gateway_file_starts_the_rollout() {
    if !privileged("a_canary_block_in_the_gateway_file_starts_the_rollout") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.write_config("sava.yaml", &gateway(TCP_CHECK)).unwrap();
    bed.start_agent(&[]).unwrap();
    let traffic = Traffic::start(&bed, Duration::ZERO);
    let with_canary =
        format!("{}canary:\n  route: {CANARY}\n  steps: [20, 60, 100]\n  interval: 1s\n  min_flows: 10\n", gateway(TCP_CHECK));
    bed.write_config("sava.yaml", &with_canary).unwrap();
    wait_state(&bed, "promoted", Duration::from_secs(20));
    let out = bed.cli_ok(&["events", GATEWAY]).unwrap();
    println!("{out}");
    for needle in ["rollout: started: route sava/sava:1.1.0 through [20%, 60%, 100%] every 1s", "step 1/3", "step 2/3", "promoted"] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    let status = bed.cli_ok(&["canary", "status", GATEWAY]).unwrap();
    assert!(status.contains("promoted at step 3/3"), "{status}");
    let outcomes = traffic.finish();
    assert!(outcomes.iter().all(|o| o.answer.is_ok()), "no request failed during the rollout");
}

/// The Vamp tutorial's failure: a canary that accepts connections and passes its health
/// check but answers every request with HTTP 500 is rolled back by the datapath's count of
/// its responses (on by default for a `9050/http` gateway), and no request fails after.
#[test]
fn a_canary_answering_http_500_is_rolled_back_with_defaults() {
    if !privileged("a_canary_answering_http_500_is_rolled_back_with_defaults") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &["--status", "500"]).unwrap();
    let http_check = "health_check:\n  protocol: http\n  path: /health\n  interval: 200ms\n  timeout: 150ms\n";
    bed.write_config("sava.yaml", &gateway(http_check)).unwrap();
    bed.start_agent(&[]).unwrap();
    let traffic = Traffic::start(&bed, Duration::from_millis(2));
    bed.cli_ok(&["canary", "start", GATEWAY, "--route", CANARY, "--steps", "20,50,100", "--interval", "2s", "--min-flows", "10"]).unwrap();
    let started = Instant::now();
    wait_state(&bed, "rolled-back", Duration::from_secs(20));
    let took = started.elapsed();
    let r = bed.rollout(GATEWAY);
    println!("rolled back after {took:?}: {}", r["reason"]);
    assert!(r["reason"].as_str().unwrap().starts_with("HTTP 5xx rate 100% ("), "{r}");
    assert!(verdict_window_s(&r) <= 4.0, "within two 2 s intervals, on the agent's clock: {r}");
    assert_eq!(canary_weight(&bed), "weight: 0%", "back to the weights before the rollout");
    let health = bed.cli_ok(&["get", GATEWAY]).unwrap();
    assert!(health.contains("10.10.2.21:8080 healthy"), "the health check kept passing: {health}");
    let stats: serde_json::Value = serde_json::from_str(&bed.cli_ok(&["stats", "-o", "json"]).unwrap()).unwrap();
    let canary = stats[0]["targets"].as_array().unwrap().iter().find(|t| t["route"] == CANARY).unwrap().clone();
    assert!(canary["http_responses"][4].as_u64().unwrap() >= 10, "the datapath counted the 500s: {canary}");
    let settled_ms = now_ms();
    thread::sleep(Duration::from_secs(1));
    let outcomes = traffic.finish();
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.at_ms > settled_ms).collect();
    assert!(after.len() > 20);
    assert!(after.iter().all(|o| o.answer.as_deref() == Ok("1.0.0")), "after the rollback every request succeeds on stable");
}

/// A canary that silently drops every SYN (a blackhole: no RST, nothing) is rolled back by
/// its failed connects: the clients' retransmitted SYNs tell the datapath.
#[test]
fn a_canary_dropping_syns_silently_is_rolled_back() {
    if !privileged("a_canary_dropping_syns_silently_is_rolled_back") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.backends
        .run(
            "nft",
            &["add table ip blackhole; \
                 add chain ip blackhole input { type filter hook input priority 0; }; \
                 add rule ip blackhole input ip daddr 10.10.2.21 tcp dport 8080 tcp flags & (syn | ack) == syn drop"],
        )
        .unwrap();
    bed.write_config("sava.yaml", &gateway("")).unwrap();
    bed.start_agent(&[]).unwrap();
    let traffic: Vec<Traffic> = (0..4).map(|_| Traffic::start(&bed, Duration::ZERO)).collect();
    bed.cli_ok(&["canary", "start", GATEWAY, "--route", CANARY, "--steps", "20,50,100", "--interval", "2s", "--min-flows", "5"]).unwrap();
    let started = Instant::now();
    wait_state(&bed, "rolled-back", Duration::from_secs(20));
    let r = bed.rollout(GATEWAY);
    println!("rolled back after {:?}: {}", started.elapsed(), r["reason"]);
    assert!(r["reason"].as_str().unwrap().contains("failed connects of canary targets"), "{r}");
    assert_eq!(canary_weight(&bed), "weight: 0%");
    drop(traffic);
}
