//! A canary killed mid-rollout, again and again: each run starts a fresh testbed (sava
//! 1.0.0 stable, sava 1.1.0 canary, an http gateway with full NAT and no health check, so
//! only the datapath's own signals can see the death), client requests one after another,
//! `splitter canary start` with the steps 10/25/50/100% every 2 s; at the second step the
//! canary's process is killed (its kernel keeps the TIME_WAIT sockets full NAT's reused
//! ports meet). Per run: time from the kill to the rollback, in intervals; requests failed
//! between the kill and the rollback, and after it (must be none).

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use splitter_tests::{
    testbed::{sava_gateway, Testbed, SAVA_CANARY},
    traffic::HttpTraffic,
};

use super::{say, Options};

const GATEWAY: &str = "sava";
const INTERVAL: Duration = Duration::from_secs(2);

pub struct Run {
    /// From the kill to the rollback.
    pub took: Duration,
    pub failed_before_rollback: usize,
    pub failed_after_rollback: usize,
    pub served_after_rollback: usize,
    pub reason: String,
}

pub struct KilledCanaryResults {
    pub runs: Vec<Result<Run, String>>,
}

fn wait_for(bed: &Testbed, what: &str, timeout: Duration, done: impl Fn(&serde_json::Value) -> bool) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = bed.rollout(GATEWAY);
        if done(&r) {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("no {what} within {timeout:?}: {r}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn one_run() -> Result<Run> {
    let mut bed = Testbed::new()?;
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[])?;
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[])?;
    bed.write_config("sava.yaml", &sava_gateway(GATEWAY, 9050, "100%", "0%", "10.10.2.21:8080", ""))?;
    bed.start_agent(&[])?;
    bed.wait_applied(GATEWAY, 1)?;
    let traffic = HttpTraffic::start(&bed.client);
    bed.cli_ok(&["canary", "start", GATEWAY, "--route", SAVA_CANARY, "--steps", "10,25,50,100", "--interval", "2s"])?;
    wait_for(&bed, "second step", Duration::from_secs(20), |r| r["step"] == 1)?;
    bed.stop_backend("10.10.2.21:8080")?;
    let killed = Instant::now();
    let killed_ms = traffic.started.elapsed().as_millis() as u64;
    let r = wait_for(&bed, "rollback", INTERVAL * 5, |r| r["state"] == "rolled-back" || r["state"] == "promoted")?;
    let took = killed.elapsed();
    let rolled_back_ms = traffic.started.elapsed().as_millis() as u64;
    if r["state"] != "rolled-back" {
        bail!("promoted: {r}");
    }
    let weight = bed.cli_ok(&["get", GATEWAY])?;
    let canary_weight = weight.split(SAVA_CANARY).nth(1).and_then(|after| after.lines().nth(1)).unwrap_or("").trim().to_string();
    if canary_weight != "weight: 0%" {
        bail!("after the rollback the canary has {canary_weight:?}");
    }
    thread::sleep(Duration::from_secs(1));
    let failures = traffic.failures.lock().unwrap().clone();
    let successes = traffic.successes.lock().unwrap().clone();
    drop(traffic);
    Ok(Run {
        took,
        failed_before_rollback: failures.iter().filter(|(at, _)| *at >= killed_ms && *at <= rolled_back_ms).count(),
        failed_after_rollback: failures.iter().filter(|(at, _)| *at > rolled_back_ms).count(),
        served_after_rollback: successes.iter().filter(|at| **at > rolled_back_ms).count(),
        reason: r["reason"].as_str().context("no reason")?.to_string(),
    })
}

pub fn run(opts: Options) -> Result<KilledCanaryResults> {
    let count = if opts.quick { 3 } else { 20 };
    let mut runs = Vec::new();
    for i in 0..count {
        let run = one_run().map_err(|e| format!("{e:#}"));
        match &run {
            Ok(r) => say(format!(
                "killed canary run {}/{count}: rolled back {:.2} s after the kill ({:.2} intervals), {} requests failed before, {} after: {}",
                i + 1,
                r.took.as_secs_f64(),
                r.took.as_secs_f64() / INTERVAL.as_secs_f64(),
                r.failed_before_rollback,
                r.failed_after_rollback,
                r.reason
            )),
            Err(e) => say(format!("killed canary run {}/{count}: FAILED: {e}", i + 1)),
        }
        runs.push(run);
    }
    Ok(KilledCanaryResults { runs })
}

pub fn section(r: &KilledCanaryResults) -> String {
    let ok: Vec<&Run> = r.runs.iter().filter_map(|r| r.as_ref().ok()).collect();
    let within = ok.iter().filter(|run| run.took <= INTERVAL * 2 && run.failed_after_rollback == 0).count();
    let mut secs: Vec<f64> = ok.iter().map(|run| run.took.as_secs_f64()).collect();
    secs.sort_by(f64::total_cmp);
    let median = secs.get(secs.len() / 2).copied().unwrap_or(f64::NAN);
    let max = secs.last().copied().unwrap_or(f64::NAN);
    let mut body = format!(
        "A canary killed at the second step of `splitter canary start sava --steps 10,25,50,100 --interval 2s` \
         (http gateway, full NAT, no health check: only the datapath's failed connects and resets can see it), \
         client requests one after another; a fresh testbed per run.\n\n\
         **{within} of {} runs rolled back within 2 intervals (4 s) with no request failing after the rollback**; \
         from kill to rollback: median {median:.2} s, max {max:.2} s.\n\n\
         | run | kill to rollback | in intervals | failed before rollback | failed after | served after | verdict |\n\
         |---|---|---|---|---|---|---|\n",
        r.runs.len()
    );
    for (i, run) in r.runs.iter().enumerate() {
        match run {
            Ok(run) => body.push_str(&format!(
                "| {} | {:.2} s | {:.2} | {} | {} | {} | {} |\n",
                i + 1,
                run.took.as_secs_f64(),
                run.took.as_secs_f64() / INTERVAL.as_secs_f64(),
                run.failed_before_rollback,
                run.failed_after_rollback,
                run.served_after_rollback,
                run.reason.replace('|', "/")
            )),
            Err(e) => body.push_str(&format!("| {} | failed | | | | | {} |\n", i + 1, e.replace('|', "/").replace('\n', " "))),
        }
    }
    body
}
