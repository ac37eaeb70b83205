//! The control plane end to end: CLI and `curl --unix-socket` under continuous client
//! traffic, bad requests that change nothing, `kill -9` and adoption of the pinned
//! datapath, configuration files followed, and `/metrics`.

use std::{
    collections::BTreeMap,
    process::Command,
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use splitter_tests::{
    privileged, splitter_bin,
    testbed::{sava_gateway, LineClient, Testbed, SAVA_CANARY as CANARY, SAVA_STABLE as STABLE, VIP},
    traffic::{Bpffs, HttpTraffic},
};

const GATEWAY: &str = "sava";

fn sava_yaml(stable: &str, canary: &str) -> String {
    sava_gateway(GATEWAY, 9050, stable, canary, "10.10.2.21:8080", "")
}

fn sava_bed(extra_agent_args: &[&str]) -> Testbed {
    Testbed::sava(extra_agent_args, "90%", "10%").unwrap()
}

fn count(seen: &BTreeMap<String, usize>, version: &str) -> usize {
    seen.get(version).copied().unwrap_or(0)
}

#[test]
fn cli_and_curl_change_weights_under_traffic_without_failures() {
    if !privileged("cli_and_curl_change_weights_under_traffic_without_failures") {
        return;
    }
    let bed = sava_bed(&[]);
    let traffic = HttpTraffic::start(&bed.client);
    thread::sleep(Duration::from_millis(300));

    // CLI: apply a file (a weights-only update, as in the Vamp tutorial).
    let update = bed.run_dir.path().join("sava-80-20.yaml");
    std::fs::write(
        &update,
        format!("name: {GATEWAY}\nport: 9050/http\nroutes:\n  {STABLE}:\n    weight: 80%\n  {CANARY}:\n    weight: 20%\n"),
    )
    .unwrap();
    bed.cli_ok(&["apply", "-f", update.to_str().unwrap()]).unwrap();
    let seen = bed.sample(9050, 200);
    println!("after apply 80/20: {seen:?}");
    assert!((20..=65).contains(&count(&seen, "1.1.0")), "{seen:?}");

    // CLI: weight, then the other routes share what is left.
    bed.cli_ok(&["weight", GATEWAY, &format!("{CANARY}=50%")]).unwrap();
    let seen = bed.sample(9050, 200);
    println!("after weight 50%: {seen:?}");
    assert!((70..=130).contains(&count(&seen, "1.1.0")), "{seen:?}");
    let got = bed.cli_ok(&["get", GATEWAY]).unwrap();
    assert!(got.contains("weight: 50%"), "{got}");

    // CLI: promote.
    bed.cli_ok(&["promote", GATEWAY, CANARY]).unwrap();
    let seen = bed.sample(9050, 100);
    assert_eq!(count(&seen, "1.1.0"), 100, "after promote: {seen:?}");

    // CLI: rollback to the weights before the promote.
    bed.cli_ok(&["rollback", GATEWAY]).unwrap();
    let seen = bed.sample(9050, 200);
    println!("after rollback: {seen:?}");
    assert!((70..=130).contains(&count(&seen, "1.1.0")), "back to 50/50: {seen:?}");

    // curl: a weights-only PUT, the Vamp tutorial's document.
    let doc = format!("name: {GATEWAY}\nport: 9050/http\nroutes:\n  {STABLE}:\n    weight: 100%\n  {CANARY}:\n    weight: 0%\n");
    let (body, code) = bed.curl(&["-X", "PUT", "--data-binary", &doc, &format!("http://splitter/api/v1/gateways/{GATEWAY}")]);
    assert_eq!(code, 200, "{body}");
    let seen = bed.sample(9050, 100);
    assert_eq!(count(&seen, "1.0.0"), 100, "after curl PUT 100/0: {seen:?}");
    // curl: promote and rollback endpoints.
    let (body, code) = bed.curl(&["-X", "POST", &format!("http://splitter/api/v1/promote/{GATEWAY}?route=sava%2Fsava%3A1.1.0")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(count(&bed.sample(9050, 50), "1.1.0"), 50);
    let (body, code) = bed.curl(&["-X", "POST", &format!("http://splitter/api/v1/rollback/{GATEWAY}")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(count(&bed.sample(9050, 50), "1.0.0"), 50);
    let (json, code) = bed.curl(&["-H", "Accept: application/json", &format!("http://splitter/api/v1/gateways/{GATEWAY}")]);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["name"], GATEWAY);

    let (ok, failures) = traffic.finish();
    println!("background traffic: {ok} requests, {} failures", failures.len());
    assert!(ok > 100, "the background client made {ok} requests");
    assert!(failures.is_empty(), "failed requests during the changes: {failures:?}");
    let stats = bed.cli_ok(&["stats", GATEWAY]).unwrap();
    println!("{stats}");
    assert!(stats.contains(STABLE) && stats.contains("OBSERVED"), "{stats}");
}

#[test]
fn bad_requests_change_nothing() {
    if !privileged("bad_requests_change_nothing") {
        return;
    }
    let bed = sava_bed(&[]);
    let before = bed.cli_ok(&["get"]).unwrap();
    let url = format!("http://splitter/api/v1/gateways/{GATEWAY}");
    let over_100 = sava_yaml("90%", "20%");
    let unknown_route = format!("name: {GATEWAY}\nroutes:\n  sava/nope:\n    weight: 10%\n");
    let oversized_file = bed.run_dir.path().join("oversized.yaml");
    std::fs::write(&oversized_file, format!("name: {GATEWAY}\n# {}\n", "x".repeat(2 << 20))).unwrap();
    let oversized = format!("@{}", oversized_file.display());
    let cases: Vec<(&str, Vec<String>, u16, &str)> = vec![
        (
            "syntax error",
            vec!["-X".into(), "PUT".into(), "--data-binary".into(), "name: [sava\n".into(), url.clone()],
            400,
            "request body:",
        ),
        ("weights over 100", vec!["-X".into(), "PUT".into(), "--data-binary".into(), over_100, url.clone()], 400, "100"),
        (
            "unknown route",
            vec!["-X".into(), "PUT".into(), "--data-binary".into(), unknown_route, url.clone()],
            400,
            "unknown route sava/nope",
        ),
        ("oversized body", vec!["-X".into(), "PUT".into(), "--data-binary".into(), oversized, url.clone()], 413, "larger than the limit"),
        ("unknown gateway", vec!["-X".into(), "DELETE".into(), "http://splitter/api/v1/gateways/nosuch".into()], 404, "no gateway nosuch"),
        (
            "update of an unknown gateway",
            vec![
                "-X".into(),
                "PUT".into(),
                "--data-binary".into(),
                "name: nosuch\nroutes:\n  a:\n    weight: 100%\n".into(),
                "http://splitter/api/v1/gateways/nosuch".into(),
            ],
            404,
            "no gateway nosuch",
        ),
    ];
    for (what, args, status, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (body, code) = bed.curl(&args);
        println!("{what}: {code} {}", body.trim_end());
        assert_eq!(code, status, "{what}: {body}");
        assert_eq!(body.trim_end().lines().count(), 1, "{what}: one line, got {body:?}");
        assert!(body.contains(needle), "{what}: {body}");
        assert_eq!(bed.cli_ok(&["get"]).unwrap(), before, "{what} changed the configuration");
    }
    // The CLI reports the same one-line errors, naming the file.
    let file = bed.run_dir.path().join("bad.yaml");
    std::fs::write(&file, sava_yaml("90%", "20%")).unwrap();
    let (code, _, err) = bed.cli(&["apply", "-f", file.to_str().unwrap()]).unwrap();
    assert_ne!(code, 0);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("bad.yaml") && err.contains("100"), "{err}");
    let (code, _, err) = bed.cli(&["weight", GATEWAY, "sava/nope=10%"]).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("unknown route sava/nope"), "{err}");
    assert_eq!(bed.cli_ok(&["get"]).unwrap(), before);
    // No agent behind a socket: one clear line.
    let out = Command::new(splitter_bin()).args(["get", "--socket", "/nonexistent/splitter.sock"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the agent"), "{err}");
}

#[test]
fn kill_9_keeps_traffic_flowing_and_a_restarted_agent_adopts_it() {
    if !privileged("kill_9_keeps_traffic_flowing_and_a_restarted_agent_adopts_it") {
        return;
    }
    let bpffs = Bpffs::mount();
    let pin_dir = bpffs.dir.path().join("splitter").display().to_string();
    let mut bed = sava_bed(&["--bpffs", &pin_dir]);
    let mut long_lived: Vec<(LineClient, String)> = bed
        .client
        .enter(|| {
            (0..20)
                .map(|_| {
                    let mut c = LineClient::connect(&format!("{VIP}:9050")).unwrap();
                    let first = c.ask().unwrap();
                    (c, first)
                })
                .collect()
        })
        .unwrap();
    let traffic = HttpTraffic::start(&bed.client);
    let traffic_started = Instant::now();
    thread::sleep(Duration::from_millis(500));
    let stats_before: serde_json::Value = serde_json::from_str(&bed.cli_ok(&["stats", "-o", "json"]).unwrap()).unwrap();
    let get_before = bed.cli_ok(&["get"]).unwrap();

    // kill -9: no cleanup at all.
    println!("kill at {:?} after traffic start", traffic_started.elapsed());
    bed.agent().signal(libc::SIGKILL).unwrap();
    let _ = bed.stop_agent();
    let ok_at_kill = traffic.ok.load(Ordering::Relaxed);
    thread::sleep(Duration::from_secs(2));
    let ok_in_gap = traffic.ok.load(Ordering::Relaxed) - ok_at_kill;
    let check = |conns: &mut Vec<(LineClient, String)>, phase: &str| {
        for (i, (c, first)) in conns.iter_mut().enumerate() {
            let answer = c.ask().unwrap_or_else(|e| panic!("{phase}: long-lived connection {i}: {e:#}"));
            assert_eq!(&answer, first, "{phase}: connection {i} moved");
        }
    };
    check(&mut long_lived, "agent dead");
    println!("{ok_in_gap} new connections while the agent was dead");
    assert!(ok_in_gap > 10, "new connections kept working without the agent");

    println!("restart at {:?} after traffic start", traffic_started.elapsed());
    bed.start_agent(&["--bpffs", &pin_dir]).unwrap();
    println!("ready at {:?} after traffic start", traffic_started.elapsed());
    let ready = bed.agent().wait_for_line("ready", Duration::from_secs(1)).unwrap();
    assert!(ready.contains("adopted"), "{ready}");
    thread::sleep(Duration::from_millis(500));
    check(&mut long_lived, "after restart");
    let (ok, failures) = traffic.finish();
    println!("traffic across kill -9 and restart: {ok} requests, {} failed", failures.len());
    println!("{:?}", bed.cli_ok(&["stats", "-o", "json"]));
    let (m, _) = bed.curl(&["http://splitter/metrics"]);
    println!(
        "{}",
        m.lines().filter(|l| l.starts_with("splitter_packets_total") || l.starts_with("splitter_gateway")).collect::<Vec<_>>().join("\n")
    );
    assert!(failures.is_empty(), "{failures:?}");

    assert_eq!(bed.cli_ok(&["get"]).unwrap(), get_before, "the restarted agent reports the same gateways");
    let stats_after: serde_json::Value = serde_json::from_str(&bed.cli_ok(&["stats", "-o", "json"]).unwrap()).unwrap();
    println!("stats after restart: {stats_after}");
    let flows = |s: &serde_json::Value| s[0]["new_flows"].as_u64().unwrap();
    assert!(flows(&stats_after) > flows(&stats_before), "counters kept counting: {} -> {}", flows(&stats_before), flows(&stats_after));
    // And it still takes changes.
    bed.cli_ok(&["promote", GATEWAY, CANARY]).unwrap();
    let seen = bed.sample(9050, 50);
    assert_eq!(count(&seen, "1.1.0"), 50, "{seen:?}");

    bed.stop_agent().unwrap();
    let out = Command::new(splitter_bin()).args(["agent", "--cleanup", "--bpffs", &pin_dir]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let link = bed.splitter.ip_output(&["link", "show", "dev", "spl-c"]).unwrap();
    assert!(!link.contains("xdp"), "cleanup detaches: {link}");
}

#[test]
fn config_file_edits_apply_and_broken_files_change_nothing() {
    if !privileged("config_file_edits_apply_and_broken_files_change_nothing") {
        return;
    }
    let bed = sava_bed(&[]);
    let started = Instant::now();
    bed.write_config("sava.yaml", &sava_yaml("20%", "80%")).unwrap();
    bed.wait_applied(GATEWAY, 2).unwrap();
    let took = started.elapsed();
    println!("file edit live after {took:?}");
    let seen = bed.sample(9050, 100);
    assert!(count(&seen, "1.1.0") >= 60, "{seen:?}");

    let good = bed.cli_ok(&["get"]).unwrap();
    bed.write_config("sava.yaml", "name: sava\nport: 9050/http\nroutes: [\n").unwrap();
    bed.agent().wait_for_line("configuration file not applied", Duration::from_secs(3)).unwrap();
    let get = bed.cli_ok(&["get"]).unwrap();
    assert!(get.contains("not applied"), "get reports the broken file: {get}");
    let body = |s: &str| s.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&get), body(&good), "the live gateway is unchanged");
    assert!(count(&bed.sample(9050, 100), "1.1.0") >= 60, "weights unchanged");

    // Fixed again, then removed: the gateway goes.
    bed.write_config("sava.yaml", &sava_yaml("50%", "50%")).unwrap();
    bed.wait_applied(GATEWAY, 3).unwrap();
    std::fs::remove_file(bed.config_dir.path().join("sava.yaml")).unwrap();
    bed.agent().wait_for_line("removed gateway sava", Duration::from_secs(3)).unwrap();
    assert_eq!(bed.cli_ok(&["get"]).unwrap().trim(), "");
}

#[test]
fn metrics_are_valid_prometheus_text() {
    if !privileged("metrics_are_valid_prometheus_text") {
        return;
    }
    let bed = sava_bed(&[]);
    bed.sample(9050, 50);
    let (text, code) = bed.curl(&["http://splitter/metrics"]);
    assert_eq!(code, 200);
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).expect("parses as Prometheus text");
    for family in [
        "splitter_target_new_flows_total",
        "splitter_route_weight_percent",
        "splitter_target_observed_share_percent",
        "splitter_conntrack_entries",
        "splitter_gateway_table_generation",
        "splitter_program_id",
    ] {
        assert!(scrape.docs.contains_key(family), "no HELP for {family}");
        assert!(scrape.samples.iter().any(|s| s.metric == family), "no sample of {family}");
    }
    // Every family has HELP and TYPE lines, in that order, before its samples.
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(typed.contains(name), "sample before TYPE: {line}");
        }
    }
    let flows: f64 = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "splitter_target_new_flows_total")
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(flows, 50.0, "50 requests, 50 new flows");

    // The shipped Grafana dashboard and alert rules query only series the agent exports.
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for file in ["grafana/splitter.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let mut names: Vec<&str> = text
            .match_indices("splitter_")
            .map(|(at, _)| {
                let rest = &text[at..];
                &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            assert!(typed.contains(name), "{file} uses {name}, which the agent does not export");
        }
    }
    // Prometheus's own linter agrees with the exposition.
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt package prometheus)");
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rollback_with_flush_moves_established_flows_off_the_route_that_lost_its_weight() {
    if !privileged("rollback_with_flush_moves_established_flows_off_the_route_that_lost_its_weight") {
        return;
    }
    let bed = sava_bed(&[]);
    bed.cli_ok(&["weight", GATEWAY, &format!("{CANARY}=0%")]).unwrap();
    bed.cli_ok(&["promote", GATEWAY, CANARY]).unwrap();
    let mut on_canary: Vec<LineClient> = bed
        .client
        .enter(|| {
            (0..5)
                .map(|_| {
                    let mut c = LineClient::connect(&format!("{VIP}:9050")).unwrap();
                    assert!(c.ask().unwrap().starts_with("1.1.0"));
                    c
                })
                .collect()
        })
        .unwrap();
    // A plain rollback leaves them be...
    bed.cli_ok(&["rollback", GATEWAY]).unwrap();
    for c in &mut on_canary {
        assert!(c.ask().unwrap().starts_with("1.1.0"), "established flows stay without --flush");
    }
    // ...while --flush moves them off the canary, which lost its weight (100% -> 0%).
    bed.cli_ok(&["promote", GATEWAY, CANARY]).unwrap();
    let out = bed.cli_ok(&["rollback", GATEWAY, "--flush"]).unwrap();
    println!("{out}");
    assert!(out.contains("flushed 5 established flow(s)"), "{out}");
    let moved = on_canary.iter_mut().map(|c| c.ask()).filter(|a| !matches!(a, Ok(a) if a.starts_with("1.1.0"))).count();
    assert_eq!(moved, 5, "no flushed connection reaches the canary any more");
    assert_eq!(count(&bed.sample(9050, 50), "1.0.0"), 50, "new connections go to stable");
}
