//! `cargo xtask demo`: the Vamp "sava" canary, live, in network namespaces.
//!
//! A client namespace, the splitter namespace (the agent attached in native XDP mode to
//! both of its interfaces) and a backends namespace running sava 1.0.0 and sava 1.1.0 as
//! real HTTP servers. The client asks 100 times per round, like DC/OS's canary-check.sh,
//! and prints which version answered while the weights move 90/10 -> 50/50 -> 0/100
//! (promote) -> 90/10 (rollback). Everything is removed when the demo ends (Ctrl-C too).

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

fn gateway_yaml(stable: &str, canary: &str) -> String {
    format!(
        "# The Vamp tutorial's sava gateway, with this demo's backends as targets.
name: {GATEWAY}
port: 9050/http
virtual_address: {VIP}
routes:
  sava/sava/sava:1.0.0/port:
    weight: {stable}
    targets: [10.10.2.11:8080]
  sava/sava/sava:1.1.0/port:
    weight: {canary}
    targets: [10.10.2.21:8080]
"
    )
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
    bed.write_config("sava.yaml", &gateway_yaml("90%", "10%"))?;
    bed.start_agent(&[])?;
    println!("   agent: {}", bed.agent().wait_for_line("ready", Duration::from_secs(1))?);
    println!("   gateway {GATEWAY}: {VIP}:9050, sava:1.0.0 90% / sava:1.1.0 10%");

    let steps = [
        ("90%", "10%", "canary at 10%"),
        ("50%", "50%", "canary at 50%"),
        ("0%", "100%", "promote: canary takes 100%"),
        ("90%", "10%", "rollback to 90/10"),
    ];
    let mut generation = 1;
    'steps: for (i, (stable, canary, what)) in steps.iter().enumerate() {
        if i > 0 {
            generation += 1;
            bed.write_config("sava.yaml", &gateway_yaml(stable, canary))?;
            bed.reload_and_wait(GATEWAY, generation)?;
        }
        println!("== {what} (sava:1.0.0 {stable} / sava:1.1.0 {canary})");
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

    let stats = bed.stats()?;
    println!("== the agent's counters");
    for target in stats[0]["targets"].as_array().into_iter().flatten() {
        println!(
            "   {:<28} {:<18} new flows {:>5}  packets in/out {:>6}/{:<6}",
            target["route"].as_str().unwrap_or(""),
            target["target"].as_str().unwrap_or(""),
            target["new_flows"],
            target["packets_to_target"],
            target["packets_from_target"]
        );
    }
    bed.stop_agent()?;
    println!("== done; namespaces and XDP programs removed");
    Ok(())
}
