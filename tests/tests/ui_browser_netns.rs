//! `splitter ui` end to end in a real headless browser (Debian's Chromium, driven through
//! ChromeDriver), against a real agent with real traffic in namespaces: the page lists the
//! gateway with observed shares, moving a route's slider (and confirming) changes the
//! weights `splitter get` reports, a rollout started from the page shows its steps as they
//! happen, and requests from another origin or for another host are refused.

use std::time::Duration;

use splitter_tests::{
    browser::Browser,
    privileged, splitter_bin,
    testbed::{Testbed, SAVA_CANARY as CANARY, SAVA_STABLE as STABLE},
    traffic::HttpTraffic,
};

const UI_PORT: u16 = 8080;
const DRIVER_PORT: u16 = 9515;
/// WebDriver key codes.
const ARROW_RIGHT: &str = "\u{E014}";

/// The weight `get -o json` shows for `route`.
fn weight(bed: &Testbed, route: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(&bed.cli_ok(&["get", "sava", "-o", "json"]).unwrap()).unwrap();
    json["routes"][route]["weight"].as_str().unwrap_or_default().to_string()
}

/// `curl` inside the splitter's namespace; returns the HTTP status.
fn status_of(bed: &Testbed, args: &[&str]) -> u16 {
    let out = bed.splitter.command("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}"]).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap()
}

#[test]
fn the_dashboard_shows_the_split_moves_weights_and_runs_a_rollout_live() {
    if !privileged("the_dashboard_shows_the_split_moves_weights_and_runs_a_rollout_live") {
        return;
    }
    let bed = Testbed::sava(&[], "90%", "10%").unwrap();
    let traffic = HttpTraffic::start(&bed.client);
    let socket = bed.socket().display().to_string();
    let listen = format!("127.0.0.1:{UI_PORT}");
    let ui = bed.splitter.spawn(splitter_bin(), &["ui", "--listen", &listen, "--socket", &socket]).unwrap();
    let line = ui.wait_for_line("splitter ui: open ", Duration::from_secs(20)).unwrap();
    let url = line.split_whitespace().last().unwrap().to_string();
    assert!(ui.lines().iter().any(|l| l.contains("loopback only")), "it says where it serves: {:?}", ui.lines());
    let token = url.split("token=").nth(1).unwrap().to_string();

    // Refusals: no token, another Host (DNS rebinding), another Origin, even with the token.
    let api = format!("http://{listen}/api/v1/gateways");
    assert_eq!(status_of(&bed, &[&api]), 403, "no token");
    let with_token = format!("x-splitter-token: {token}");
    assert_eq!(status_of(&bed, &["-H", &with_token, &api]), 200);
    assert_eq!(status_of(&bed, &["-H", &with_token, "-H", &format!("Host: rebound.example:{UI_PORT}"), &api]), 403, "another Host");
    let promote = format!("http://{listen}/api/v1/promote/sava?route={CANARY}");
    assert_eq!(status_of(&bed, &["-X", "POST", "-H", &with_token, "-H", "Origin: http://evil.example", &promote]), 403, "another Origin");
    assert_eq!(weight(&bed, CANARY), "10%", "nothing refused changed anything");

    let browser = Browser::start(&bed.splitter, DRIVER_PORT).unwrap();
    // A cross-site form post from a page of another origin (here a data: URL, Origin
    // `null`): refused, nothing moves.
    let form = format!(
        "data:text/html,<form method=post action='http://{listen}/api/v1/promote/sava?route={}'></form><script>document.forms[0].submit()</script>",
        CANARY.replace('/', "%2F")
    );
    browser.goto(&form).unwrap();
    let refused = browser
        .find("body", Duration::from_secs(10))
        .and_then(|b| browser.wait_text("body", Duration::from_secs(10), |t| t.contains("refused")).map(|_| b));
    assert!(refused.is_ok(), "the cross-site post was not refused: {refused:?}");
    assert_eq!(weight(&bed, CANARY), "10%", "a cross-site form post moved traffic");

    // The page lists the gateway, its routes and live observed shares.
    browser.goto(&url).unwrap();
    browser.find("section[data-gateway='sava']", Duration::from_secs(20)).unwrap();
    let canary_row = format!("section[data-gateway='sava'] tr[data-route='{CANARY}']");
    let observed = browser.wait_text(&format!("{canary_row} .observed"), Duration::from_secs(30), |t| t.ends_with('%')).unwrap();
    let observed: f64 = observed.trim_end_matches('%').parse().unwrap();
    assert!((0.0..=30.0).contains(&observed), "canary observed at {observed}% with weight 10%");
    browser.find(&format!("section[data-gateway='sava'] tr[data-route='{STABLE}']"), Duration::from_secs(5)).unwrap();
    browser.find("section[data-gateway='sava'] svg.chart polyline", Duration::from_secs(30)).unwrap();
    // The chart fills as seconds pass (one point per second with new flows).
    let points = || {
        browser.script("const p = document.querySelector('svg.chart polyline'); return p ? p.getAttribute('points').split(' ').length : 0;")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while points().unwrap().as_u64().unwrap_or(0) < 8 {
        assert!(std::time::Instant::now() < deadline, "the chart did not fill");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Moving the canary's slider 20 steps right and confirming sets it to 30%.
    let slider = browser.find(&format!("{canary_row} input.weight-slider"), Duration::from_secs(5)).unwrap();
    browser.send_keys(&slider, &ARROW_RIGHT.repeat(20)).unwrap();
    let prompt = browser.wait_text("#confirm-text", Duration::from_secs(5), |t| t.contains("30%")).unwrap();
    assert!(prompt.contains(CANARY), "{prompt}");
    assert_eq!(weight(&bed, CANARY), "10%", "nothing moves before the confirmation");
    browser.click(&browser.find("#confirm-yes", Duration::from_secs(5)).unwrap()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while weight(&bed, CANARY) != "30%" {
        assert!(std::time::Instant::now() < deadline, "the slider did not move the weight: {}", weight(&bed, CANARY));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(weight(&bed, STABLE), "70%");
    browser.wait_text(&format!("{canary_row} .weight"), Duration::from_secs(10), |t| t == "30%").unwrap();

    // A rollout started from the page: its steps appear as they happen.
    browser.type_into("section[data-gateway='sava'] input.canary-steps", "40%,70%,100%", Duration::from_secs(10)).unwrap();
    browser.type_into("section[data-gateway='sava'] input.canary-interval", "2s", Duration::from_secs(10)).unwrap();
    browser.click(&browser.find("section[data-gateway='sava'] button[data-action='start']", Duration::from_secs(5)).unwrap()).unwrap();
    browser.click(&browser.find("#confirm-yes", Duration::from_secs(5)).unwrap()).unwrap();
    browser.wait_text(".rollout-state", Duration::from_secs(20), |t| t.contains("step 1/3")).unwrap();
    browser.wait_text(".rollout-state", Duration::from_secs(60), |t| t.contains("step 2/3")).unwrap();
    let screenshot = browser.screenshot().unwrap();
    assert_eq!(&screenshot[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let path = std::env::var("SPLITTER_UI_SCREENSHOT").unwrap_or_else(|_| bed.run_dir.path().join("dashboard.png").display().to_string());
    std::fs::write(&path, &screenshot).unwrap();
    eprintln!("screenshot of the dashboard: {path}");
    browser.wait_text(".rollout-state", Duration::from_secs(60), |t| t.starts_with("promoted")).unwrap();
    assert_eq!(weight(&bed, CANARY), "100%", "the rollout promoted the canary");
    let events = browser.wait_text("#events", Duration::from_secs(10), |t| t.contains("promoted")).unwrap();
    assert!(events.contains("rollout"), "{events}");

    let (ok, failures) = traffic.finish();
    assert!(ok > 100 && failures.is_empty(), "{ok} requests, failures: {failures:?}");
}
