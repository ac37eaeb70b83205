//! Weight changes across nodes: three agents on one etcd (the cluster testbed), 100 weight
//! changes PUT on node 0's socket, one at a time. For each, the time from the request
//! written until node 1 and node 2 each show the new weights (`GET` on their sockets in a
//! tight loop, about 0.3 ms a poll): a node shows a gateway only after its datapath holds
//! the new table, so new connections through it follow from then on.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use splitter_tests::cluster::{gateway, ClusterBed};

use super::{percentile, say, Options};

pub struct Propagation {
    pub changes: usize,
    /// Request written → shown by the other node, per change and node (µs, sorted).
    pub to_others_us: Vec<u64>,
    /// Request written → node 0's answer (µs, sorted).
    pub response_us: Vec<u64>,
}

/// One HTTP/1.0 request on a control socket: status and body.
fn request(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: splitter\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.get(9..12).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

fn v2_weight(socket: &Path) -> Result<Option<String>> {
    let (status, body) = request(socket, "GET", "/api/v1/gateways/web?output=json", "")?;
    if status != 200 {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_str(&body)?;
    Ok(value["routes"]["v2"]["weight"].as_str().map(str::to_string))
}

pub fn run(opts: Options) -> Result<Propagation> {
    let changes = if opts.quick { 30 } else { 100 };
    let bed = ClusterBed::running()?;
    let (status, body) = request(&bed.socket(0), "POST", "/api/v1/gateways", &gateway("90%", "10%"))?;
    if status != 200 {
        bail!("applying the gateway on node 0: {status} {body}");
    }
    for node in 1..3 {
        bed.wait_v2_weight(node, "10%")?;
    }
    say(format!("cluster: {changes} weight changes on node 0, timed until nodes 1 and 2 show them"));
    let (mut to_others_us, mut response_us) = (Vec::new(), Vec::new());
    for i in 0..changes {
        let v2 = 11 + (i % 80);
        let document = format!("name: web\nroutes:\n  v1:\n    weight: {}%\n  v2:\n    weight: {v2}%\n", 100 - v2);
        let expected = format!("{v2}%");
        let started = Instant::now();
        let (status, body) = request(&bed.socket(0), "PUT", "/api/v1/gateways/web", &document)?;
        response_us.push(started.elapsed().as_micros() as u64);
        if status != 200 {
            bail!("change {i} on node 0: {status} {body}");
        }
        let mut waiting = vec![1usize, 2];
        while !waiting.is_empty() {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("change {i}: nodes {waiting:?} did not show v2 at {expected} within 10 s");
            }
            let mut still = Vec::new();
            for node in waiting {
                if v2_weight(&bed.socket(node))?.as_deref() == Some(expected.as_str()) {
                    to_others_us.push(started.elapsed().as_micros() as u64);
                } else {
                    still.push(node);
                }
            }
            waiting = still;
        }
    }
    to_others_us.sort_unstable();
    response_us.sort_unstable();
    Ok(Propagation { changes, to_others_us, response_us })
}

pub fn section(r: &Propagation) -> String {
    let ms = |v: &[u64], p: f64| percentile(v, p).map_or("-".into(), |us| format!("{:.1}", us as f64 / 1000.0));
    format!(
        "Command: `cargo xtask bench -- cluster` (three agents on one etcd 3.4 in namespaces, \
         `tests/src/bench/cluster.rs`). {} weight changes PUT on node 0, one at a time; for \
         each, the time from the request written until node 1 and node 2 each show the new \
         weights (their datapath holds the new table by then; {} node-changes). Target: p99 \
         within 200 ms.\n\n\
         | | p50 | p90 | p99 | max |\n|---|---|---|---|---|\n\
         | request → live on another node (ms) | {} | {} | {} | {} |\n\
         | request → node 0's answer (ms) | {} | {} | {} | {} |\n",
        r.changes,
        r.to_others_us.len(),
        ms(&r.to_others_us, 50.0),
        ms(&r.to_others_us, 90.0),
        ms(&r.to_others_us, 99.0),
        ms(&r.to_others_us, 100.0),
        ms(&r.response_us, 50.0),
        ms(&r.response_us, 90.0),
        ms(&r.response_us, 99.0),
        ms(&r.response_us, 100.0),
    )
}
