//! `cargo xtask demo`: the Vamp "sava" canary, live, in network namespaces.
//!
//! A client namespace, the splitter namespace (the agent attached in native XDP mode to
//! both of its interfaces) and a backends namespace running sava 1.0.0 and sava 1.1.0 as
//! real HTTP servers. The client asks 100 times per round, like DC/OS's canary-check.sh,
//! and prints which version answered while an operator moves the weights with the CLI:
//! 90/10 -> `weight` 50% -> `promote` -> `rollback` -> `rollback`; then the agent rolls
//! the canary out by itself (`splitter canary start`); then a canary answering HTTP 500 is
//! rolled back by the agent on its own (the Vamp tutorial's "force a rollback").
//! Everything is removed when the demo ends (Ctrl-C too).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::Result;
use splitter_tests::{
    privileged,
    testbed::{http_get, Testbed, VIP},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

const GATEWAY: &str = "sava";

const CANARY: &str = "sava/sava/sava:1.1.0/port";

fn gateway_yaml() -> String {
    format!(
        "# The Vamp tutorial's sava gateway, with this demo's backends as targets.
name: {GATEWAY}
port: 9050/http
virtual_address: {VIP}
routes:
  sava/sava/sava:1.0.0/port:
    weight: 90%
    targets: [10.10.2.11:8080]
  {CANARY}:
    weight: 10%
    targets: [10.10.2.21:8080]
"
    )
}

/// The canary again, this time rolled out by the agent itself, step by step, while the
/// client keeps asking.
fn automated_rollout(bed: &Testbed) -> Result<()> {
    let start = ["canary", "start", GATEWAY, "--route", CANARY, "--steps", "10,25,50,100", "--interval", "2s", "--min-flows", "10"];
    println!("== an automated rollout: the agent moves the canary itself, judging every step");
    println!("   $ splitter {}", start.join(" "));
    bed.cli_ok(&start)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline && !STOP.load(Ordering::Relaxed) {
        let (v1, v2) = bed.client.enter(|| {
            let answers: Vec<String> = (0..100).filter_map(|_| http_get(&format!("{VIP}:9050"), None).ok()).collect();
            (answers.iter().filter(|a| a.starts_with("1.0.0")).count(), answers.iter().filter(|a| a.starts_with("1.1.0")).count())
        })?;
        let status = bed.cli_ok(&["canary", "status", GATEWAY])?;
        let state = status.lines().next().unwrap_or("").split(": ").nth(1).unwrap_or("").to_string();
        println!("   Out of 100 clients {v1} saw 1.0.0 and {v2} saw 1.1.0   [{}]", state.split(';').next().unwrap_or(""));
        if status.contains("promoted") || status.contains("rolled-back") {
            break;
        }
        thread::sleep(Duration::from_millis(300));
    }
    println!("== $ splitter events {GATEWAY}");
    for line in bed.cli_ok(&["events", GATEWAY])?.lines().filter(|l| l.contains("rollout:")) {
        println!("   {line}");
    }
    Ok(())
}

/// The Vamp tutorial's "force a rollback": a new canary answers HTTP 500 to every request
/// (its health check still passes); the agent sees the 500s in the datapath and rolls it
/// back by itself.
fn forced_rollback(bed: &mut Testbed) -> Result<()> {
    println!("== force a rollback: sava 1.1.0 redeployed answering HTTP 500 (its /health still says 200)");
    bed.stop_backend("10.10.2.21:8080")?;
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &["--status", "500"])?;
    println!("   $ splitter weight {GATEWAY} {CANARY}=0%");
    bed.cli_ok(&["weight", GATEWAY, &format!("{CANARY}=0%")])?;
    let start = ["canary", "start", GATEWAY, "--route", CANARY, "--steps", "20,50,100", "--interval", "2s", "--min-flows", "10"];
    println!("   $ splitter {}", start.join(" "));
    bed.cli_ok(&start)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline && !STOP.load(Ordering::Relaxed) {
        let (v1, v2, errors) = bed.client.enter(|| {
            let mut counts = (0, 0, 0);
            for _ in 0..100 {
                match http_get(&format!("{VIP}:9050"), None) {
                    Ok(body) if body.starts_with("1.0.0") => counts.0 += 1,
                    Ok(_) => counts.1 += 1,
                    Err(_) => counts.2 += 1,
                }
            }
            counts
        })?;
        let status = bed.cli_ok(&["canary", "status", GATEWAY])?;
        let state = status.lines().next().unwrap_or("").split(": ").nth(1).unwrap_or("").to_string();
        println!(
            "   Out of 100 clients {v1} saw 1.0.0, {v2} saw 1.1.0 and {errors} got an HTTP error   [{}]",
            state.split(';').next().unwrap_or("")
        );
        if status.contains("rolled-back") || status.contains("promoted") {
            break;
        }
        thread::sleep(Duration::from_millis(300));
    }
    println!("== $ splitter events {GATEWAY}   (the rollback and its evidence)");
    for line in bed.cli_ok(&["events", GATEWAY])?.lines().filter(|l| l.contains("rolled back")) {
        println!("   {line}");
    }
    let (v1, v2, errors) = bed.client.enter(|| {
        let mut counts = (0, 0, 0);
        for _ in 0..100 {
            match http_get(&format!("{VIP}:9050"), None) {
                Ok(body) if body.starts_with("1.0.0") => counts.0 += 1,
                Ok(_) => counts.1 += 1,
                Err(_) => counts.2 += 1,
            }
        }
        counts
    })?;
    println!("   after the rollback: out of 100 clients {v1} saw 1.0.0, {v2} saw 1.1.0, {errors} got an error");
    Ok(())
}

fn main() -> Result<()> {
    if !privileged("demo") {
        anyhow::bail!("the demo creates network namespaces and loads XDP: run it as root");
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let rounds_per_step: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);

    println!("== building the topology: client | splitter (XDP) | backends, in network namespaces");
    let mut bed = Testbed::new()?;
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[])?;
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[])?;
    println!("   backends: sava 1.0.0 at 10.10.2.11:8080, sava 1.1.0 at 10.10.2.21:8080");
    bed.write_config("sava.yaml", &gateway_yaml())?;
    bed.start_agent(&[])?;
    println!("   agent: {}", bed.agent().wait_for_line("ready", Duration::from_secs(1))?);
    println!("   gateway {GATEWAY}: {VIP}:9050, sava:1.0.0 90% / sava:1.1.0 10%");

    let canary_50 = format!("{CANARY}=50%");
    let steps: [(&str, Vec<&str>); 5] = [
        ("the canary at 10%, from the gateway file", vec![]),
        ("an operator moves the canary to 50%", vec!["weight", GATEWAY, &canary_50]),
        ("the canary looks good: promote it", vec!["promote", GATEWAY, CANARY]),
        ("second thoughts: roll back", vec!["rollback", GATEWAY]),
        ("and back to where we started", vec!["rollback", GATEWAY]),
    ];
    'steps: for (what, command) in &steps {
        println!("== {what}");
        if !command.is_empty() {
            println!("   $ splitter {}", command.join(" "));
            bed.cli_ok(command)?;
        }
        for _ in 0..rounds_per_step {
            if STOP.load(Ordering::Relaxed) {
                break 'steps;
            }
            let (v1, v2, failed) = bed.client.enter(|| {
                let mut counts = (0, 0, 0);
                for _ in 0..100 {
                    match http_get(&format!("{VIP}:9050"), None) {
                        Ok(body) if body.starts_with("1.0.0") => counts.0 += 1,
                        Ok(_) => counts.1 += 1,
                        Err(_) => counts.2 += 1,
                    }
                }
                counts
            })?;
            let failures = if failed > 0 { format!(" ({failed} failed)") } else { String::new() };
            println!("   Out of 100 clients {v1} saw 1.0.0 and {v2} saw 1.1.0{failures}");
            thread::sleep(Duration::from_millis(300));
        }
    }

    if !STOP.load(Ordering::Relaxed) {
        automated_rollout(&bed)?;
    }
    if !STOP.load(Ordering::Relaxed) {
        forced_rollback(&mut bed)?;
    }

    println!("== $ splitter stats {GATEWAY}");
    for line in bed.cli_ok(&["stats", GATEWAY])?.lines() {
        println!("   {line}");
    }
    bed.stop_agent()?;
    println!("== done; namespaces and XDP programs removed");
    Ok(())
}
