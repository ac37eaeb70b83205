//! The control API against its OpenAPI description, on a live agent with real traffic:
//! `GET /api/v1/openapi.yaml` serves the description, and schemathesis (PyPI) drives every
//! described operation with generated requests, valid and not, through a TCP bridge to the
//! agent's socket (socat, inside the splitter's namespace). No answer may be a 5xx, every
//! answer must match the description (status, content type, schema), and the requests that
//! only read must change nothing.

use std::{path::PathBuf, time::Duration};

use splitter_tests::{privileged, testbed::Testbed};

/// schemathesis: `SPLITTER_SCHEMATHESIS`, set by `cargo xtask test` (which installs it),
/// or on the PATH.
fn schemathesis() -> PathBuf {
    std::env::var_os("SPLITTER_SCHEMATHESIS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("schemathesis"))
}

/// The event log and gateways as JSON: what a request that only reads must leave as it was.
fn snapshot(bed: &Testbed) -> (String, String) {
    let (events, code) = bed.curl(&["-H", "Accept: application/json", "http://splitter/api/v1/events"]);
    assert_eq!(code, 200, "{events}");
    let (gateways, code) = bed.curl(&["-H", "Accept: application/json", "http://splitter/api/v1/gateways"]);
    assert_eq!(code, 200, "{gateways}");
    let weights: serde_json::Value = serde_json::from_str(&gateways).unwrap();
    let routes: Vec<serde_json::Value> = weights.as_array().unwrap().iter().map(|g| g["routes"].clone()).collect();
    (events, serde_json::to_string(&routes).unwrap())
}

/// Runs schemathesis on the operations `methods` (a regex) in the splitter's namespace;
/// returns the number of requests it made.
fn run_schemathesis(bed: &Testbed, port: u16, methods: &str, report: &std::path::Path) -> usize {
    let base = format!("http://127.0.0.1:{port}");
    let args = [
        "run",
        &format!("{base}/api/v1/openapi.yaml"),
        "--url",
        &base,
        "-H",
        "Accept: application/json",
        "--include-method-regex",
        methods,
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--max-examples",
        "40",
        "--seed",
        "20261201",
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--phases",
        "examples,coverage,fuzzing",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        &report.display().to_string(),
        "--no-color",
    ];
    // Its caches go to the test's run directory, not the source tree.
    let out = bed
        .splitter
        .command(schemathesis())
        .args(args)
        .current_dir(bed.run_dir.path())
        .output()
        .expect("schemathesis (PyPI; `cargo xtask test` installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    let events = std::fs::read_to_string(report).unwrap();
    let requests = events.lines().filter(|l| l.contains("\"request\"")).map(|l| l.matches("\"request\"").count()).sum::<usize>();
    eprintln!("schemathesis ({methods}): {requests} requests\n{}", text.lines().rev().take(12).collect::<Vec<_>>().join("\n"));
    requests
}

#[test]
fn the_live_api_matches_its_openapi_description() {
    if !privileged("the_live_api_matches_its_openapi_description") {
        return;
    }
    let bed = Testbed::sava(&[], "90%", "10%").unwrap();
    for _ in 0..3 {
        assert!(bed.sample(9050, 20).values().sum::<usize>() == 20);
    }
    let (served, code) = bed.curl(&["http://splitter/api/v1/openapi.yaml"]);
    assert_eq!(code, 200);
    let spec: serde_json::Value = serde_yaml::from_str(&served).expect("the served description is YAML");
    assert!(spec["paths"]["/api/v1/gateways/{name}"]["put"].is_object(), "{served}");

    let port = 18_081;
    let listen = format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork");
    let connect = format!("UNIX-CONNECT:{}", bed.socket().display());
    let _bridge = bed.splitter.spawn("socat", &[&listen, &connect]).expect("socat (apt package socat)");
    let reachable = bed
        .splitter
        .enter(|| {
            (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(50));
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            })
        })
        .unwrap();
    assert!(reachable, "the bridge to the socket never listened");

    // Reads change nothing.
    let before = snapshot(&bed);
    let reads = run_schemathesis(&bed, port, "^GET$", &bed.run_dir.path().join("reads.ndjson"));
    assert_eq!(snapshot(&bed), before, "a request that only reads changed the events or the weights");
    // Everything, writes included: no 5xx, every answer as described.
    let all = run_schemathesis(&bed, port, ".*", &bed.run_dir.path().join("all.ndjson"));
    assert!(reads > 50 && all > reads, "{reads} reads, {all} requests in all");
    eprintln!("schemathesis made {reads} read requests and {all} requests in all against the live agent");
    // The agent serves on after all of it.
    let (info, code) = bed.curl(&["http://splitter/api/v1/info"]);
    assert_eq!(code, 200, "{info}");
}
