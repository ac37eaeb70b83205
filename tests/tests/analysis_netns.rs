//! Rollouts that ask outside the splitter, against real servers: webhooks (a local HTTP
//! server in the splitter's namespace) and Prometheus (Debian's `prometheus`, started here,
//! scraping the real backends), with real traffic through the splitter.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use splitter_tests::{
    privileged,
    testbed::{sava_gateway, TempDir, Testbed, SAVA_CANARY as CANARY},
    traffic::HttpTraffic,
};

const GATEWAY: &str = "sava";

/// A webhook receiver on 127.0.0.1 in the splitter's namespace: answers each path with the
/// status it is given (200 otherwise) and records every call.
struct Hooks {
    port: u16,
    statuses: Arc<Mutex<Vec<(String, u16)>>>,
    calls: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
    stop: Arc<AtomicBool>,
}

impl Hooks {
    fn start(bed: &Testbed) -> Self {
        let listener = bed.splitter.enter(|| TcpListener::bind("127.0.0.1:0")).unwrap().unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (statuses, calls, stop) =
            (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (s, c, halt) = (statuses.clone(), calls.clone(), stop.clone());
        thread::spawn(move || {
            // Bounded: two minutes at most.
            let deadline = Instant::now() + Duration::from_secs(120);
            while !halt.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((stream, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                        break;
                    }
                    if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).unwrap();
                let status = s.lock().unwrap().iter().find(|(p, _)| *p == path).map_or(200, |(_, st)| *st);
                c.lock().unwrap().push((path, serde_json::from_slice(&body).unwrap_or_default()));
                let mut stream = stream;
                let _ = write!(stream, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        Self { port, statuses, calls, stop }
    }

    fn answer(&self, path: &str, status: u16) {
        let mut s = self.statuses.lock().unwrap();
        s.retain(|(p, _)| p != path);
        s.push((path.to_string(), status));
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn called(&self, path: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|(p, _)| p == path).count()
    }
}

impl Drop for Hooks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn bed(canary_status: &str) -> Testbed {
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    let extra: Vec<&str> = if canary_status.is_empty() { vec![] } else { vec!["--status", canary_status] };
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &extra).unwrap();
    bed
}

/// The sava gateway on `9050/tcp` (so that only the analysis asked for judges it) with a
/// canary block.
fn gateway_with(canary: &str) -> String {
    let block = if canary.is_empty() { String::new() } else { format!("canary:\n  route: {CANARY}\n{canary}") };
    sava_gateway(GATEWAY, 9050, "100%", "0%", "10.10.2.21:8080", &block).replace("9050/http", "9050/tcp")
}

/// Starts traffic once the gateway serves it (the first answers make sure of it).
fn traffic(bed: &Testbed) -> HttpTraffic {
    bed.wait_applied(GATEWAY, 1).unwrap();
    let traffic = HttpTraffic::start(&bed.client);
    let deadline = Instant::now() + Duration::from_secs(5);
    while traffic.ok.load(Ordering::Relaxed) < 20 {
        assert!(Instant::now() < deadline, "the gateway does not serve: {:?}", traffic.failures.lock().unwrap());
        thread::sleep(Duration::from_millis(20));
    }
    traffic
}

fn wait_for(bed: &Testbed, what: &str, timeout: Duration, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = bed.rollout(GATEWAY);
        if done(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "no {what} within {timeout:?}: {r}\n{}", bed.cli_ok(&["events", GATEWAY]).unwrap());
        thread::sleep(Duration::from_millis(100));
    }
}

fn canary_weight(bed: &Testbed) -> String {
    let got = bed.cli_ok(&["get", GATEWAY]).unwrap();
    let after = got.split(CANARY).nth(1).unwrap();
    after.lines().nth(1).unwrap().trim().to_string()
}

#[test]
fn a_pre_rollout_webhook_answering_500_stops_the_rollout_before_any_weight_moves() {
    if !privileged("a_pre_rollout_webhook_answering_500_stops_the_rollout_before_any_weight_moves") {
        return;
    }
    let mut bed = bed("");
    let hooks = Hooks::start(&bed);
    hooks.answer("/pre", 500);
    bed.write_config("sava.yaml", &gateway_with("")).unwrap();
    bed.start_agent(&[]).unwrap();
    let traffic = traffic(&bed);
    let canary = format!(
        "  steps: [20, 100]\n  interval: 1s\n  min_flows: 5\n  webhooks:\n    - type: pre-rollout\n      url: {}\n",
        hooks.url("/pre")
    );
    bed.write_config("sava.yaml", &gateway_with(&canary)).unwrap();
    let r = wait_for(&bed, "rollback", Duration::from_secs(15), |r| r["state"] == "rolled-back");
    println!("{}", r["reason"]);
    assert!(r["reason"].as_str().unwrap().contains(&format!("pre-rollout webhook {} answered 500", hooks.url("/pre"))), "{r}");
    assert_eq!(hooks.called("/pre"), 1);
    let call = hooks.calls.lock().unwrap()[0].1.clone();
    assert_eq!(
        (call["gateway"].as_str(), call["route"].as_str(), call["type"].as_str()),
        (Some(GATEWAY), Some(CANARY), Some("pre-rollout"))
    );
    assert_eq!(canary_weight(&bed), "weight: 0%");
    let (ok, failures) = traffic.finish();
    assert!(ok > 20 && failures.is_empty(), "{ok} ok, {failures:?}");
    let stats: serde_json::Value = serde_json::from_str(&bed.cli_ok(&["stats", "-o", "json"]).unwrap()).unwrap();
    let canary_flows = stats[0]["targets"].as_array().unwrap().iter().find(|t| t["route"] == CANARY).unwrap()["new_flows"].as_u64();
    assert_eq!(canary_flows, Some(0), "no flow ever went to the canary");
}

#[test]
fn confirm_promotion_waits_until_approved() {
    if !privileged("confirm_promotion_waits_until_approved") {
        return;
    }
    let mut bed = bed("");
    let hooks = Hooks::start(&bed);
    hooks.answer("/confirm", 409);
    bed.write_config("sava.yaml", &gateway_with("")).unwrap();
    bed.start_agent(&[]).unwrap();
    let traffic = traffic(&bed);
    let canary = format!(
        "  steps: [30, 100]\n  interval: 1s\n  min_flows: 5\n  webhooks:\n    - type: confirm-promotion\n      url: {}\n    - type: post-rollout\n      url: {}\n",
        hooks.url("/confirm"),
        hooks.url("/post")
    );
    bed.write_config("sava.yaml", &gateway_with(&canary)).unwrap();
    wait_for(&bed, "a refused confirmation", Duration::from_secs(15), |_| hooks.called("/confirm") >= 2);
    let r = bed.rollout(GATEWAY);
    assert_eq!((r["state"].as_str(), r["step"].as_u64()), (Some("progressing"), Some(0)), "waits at the last step but one: {r}");
    assert_eq!(canary_weight(&bed), "weight: 30%");
    bed.cli_ok(&["canary", "approve", GATEWAY]).unwrap();
    let r = wait_for(&bed, "promotion", Duration::from_secs(5), |r| r["state"] == "promoted");
    assert!(r["reason"].as_str().unwrap().contains("approved by the operator"), "{r}");
    assert_eq!(canary_weight(&bed), "weight: 100%");
    wait_for(&bed, "the post-rollout webhook", Duration::from_secs(5), |_| hooks.called("/post") == 1);
    let events = bed.cli_ok(&["events", GATEWAY]).unwrap();
    assert!(events.contains(&format!("webhook confirm-promotion {} answered 409", hooks.url("/confirm"))), "{events}");
    let (_, failures) = traffic.finish();
    assert!(failures.is_empty(), "{failures:?}");
}

/// Debian's Prometheus, in the splitter's namespace on 127.0.0.1, scraping both backends'
/// `/metrics` every second.
struct Prometheus {
    _process: splitter_tests::Process,
    _dir: TempDir,
    url: String,
}

impl Prometheus {
    fn start(bed: &Testbed) -> Self {
        let dir = TempDir::new("prometheus").unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: backends\n    static_configs:\n      \
             - targets: [10.10.2.11:8080, 10.10.2.21:8080]\n",
        )
        .unwrap();
        let port = bed.splitter.enter(|| TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let process = bed
            .splitter
            .spawn(
                "prometheus",
                &[
                    &format!("--config.file={}", config.display()),
                    &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                    &format!("--web.listen-address={listen}"),
                ],
            )
            .unwrap();
        let url = format!("http://{listen}");
        let deadline = Instant::now() + Duration::from_secs(30);
        // Ready once both backends have been scraped twice (a rate has two samples).
        loop {
            let up =
                bed.splitter.run("curl", &["-s", &format!("{url}/api/v1/query?query=count_over_time(up%5B10s%5D)")]).unwrap_or_default();
            let values: Vec<f64> = serde_json::from_str::<serde_json::Value>(&up)
                .ok()
                .and_then(|v| v["data"]["result"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|r| r["value"][1].as_str().and_then(|s| s.parse().ok()))
                .collect();
            if values.len() == 2 && values.iter().all(|v| *v >= 2.0) {
                break;
            }
            assert!(Instant::now() < deadline, "Prometheus not scraping within 30 s: {up}");
            thread::sleep(Duration::from_millis(200));
        }
        Self { _process: process, _dir: dir, url }
    }
}

#[test]
fn a_prometheus_metric_breach_rolls_back() {
    if !privileged("a_prometheus_metric_breach_rolls_back") {
        return;
    }
    let mut bed = bed("500");
    let prometheus = Prometheus::start(&bed);
    bed.write_config("sava.yaml", &gateway_with("")).unwrap();
    bed.start_agent(&[]).unwrap();
    let traffic = traffic(&bed);
    // The canary's 500s per second, as its own metrics say; the splitter's own HTTP
    // analysis is off (a tcp gateway), so only Prometheus can see them.
    let canary = format!(
        "  steps: [30, 100]\n  interval: 3s\n  min_flows: 5\n  metrics:\n    - name: canary-5xx\n      prometheus: {}\n      \
         query: 'sum(rate(backend_responses_total{{status=~\"5..\",instance=~\"{{{{targets}}}}\"}}[3s]))'\n      max: 0.5\n",
        prometheus.url
    );
    bed.write_config("sava.yaml", &gateway_with(&canary)).unwrap();
    let r = wait_for(&bed, "rollback", Duration::from_secs(30), |r| r["state"] == "rolled-back");
    println!("{}", r["reason"]);
    assert!(r["reason"].as_str().unwrap().starts_with("metric canary-5xx = "), "{r}");
    assert!(r["reason"].as_str().unwrap().contains("above its max 0.5"), "{r}");
    assert_eq!(canary_weight(&bed), "weight: 0%");
    drop(traffic);
}

#[test]
fn an_unreachable_prometheus_never_advances_a_step() {
    if !privileged("an_unreachable_prometheus_never_advances_a_step") {
        return;
    }
    let mut bed = bed("");
    bed.write_config("sava.yaml", &gateway_with("")).unwrap();
    bed.start_agent(&[]).unwrap();
    let traffic = traffic(&bed);
    let canary = "  steps: [30, 100]\n  interval: 1s\n  min_flows: 5\n  max_inconclusive: 2\n  metrics:\n    - name: errors\n      \
                  prometheus: http://127.0.0.1:1\n      query: up\n      max: 1\n";
    bed.write_config("sava.yaml", &gateway_with(canary)).unwrap();
    let r = wait_for(&bed, "rollback", Duration::from_secs(20), |r| r["state"] == "rolled-back");
    println!("{}", r["reason"]);
    assert!(
        r["reason"].as_str().unwrap().starts_with("external metrics inconclusive for 3 windows in a row (errors: connect 127.0.0.1:1"),
        "{r}"
    );
    let events = bed.cli_ok(&["events", GATEWAY]).unwrap();
    assert!(!events.contains("step 2/2") && !events.contains("promoted"), "never advanced: {events}");
    assert_eq!(events.matches("external metrics inconclusive").count(), 3, "{events}");
    drop(traffic);
}
