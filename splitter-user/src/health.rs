//! Health checks of targets: TCP connect or HTTP GET, on an interval, with thresholds.
//!
//! The checks run as tasks in the agent's runtime and report every result on their own
//! channel ([`HealthReport`]) to the controller, which keeps the [`HealthBook`]: a target turns unhealthy after
//! `unhealthy_threshold` failures in a row and healthy again after `healthy_threshold`
//! successes in a row, and the controller recomputes the gateway's shares when one does.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, task::JoinHandle};

use crate::gateway::{
    policy::{CheckProtocol, HealthCheck},
    Target,
};

/// One check's result, as reported to the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    pub gateway: String,
    pub target: Target,
    pub result: Result<(), String>,
}

/// Where reports go; false when nobody listens any more (the checks then stop).
pub trait Reporter: Clone + Send + 'static {
    fn report(&self, report: HealthReport) -> bool;
}

/// One check to run: a gateway's target, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub gateway: String,
    pub target: Target,
    pub check: HealthCheck,
    /// A DSR gateway's VIP:port: the check goes to the target inside an IP-in-IP header,
    /// addressed to the VIP, as its traffic does.
    pub through_tunnel_to: Option<SocketAddr>,
}

/// The state of one target's checks.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TargetHealth {
    pub healthy: bool,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
    pub failed_checks: u64,
    pub passed_checks: u64,
    pub last_error: Option<String>,
}

impl Default for TargetHealth {
    /// A new target is healthy until its checks say otherwise.
    fn default() -> Self {
        Self { healthy: true, consecutive_failures: 0, consecutive_successes: 0, failed_checks: 0, passed_checks: 0, last_error: None }
    }
}

/// What one check result changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    BecameUnhealthy,
    BecameHealthy,
}

impl TargetHealth {
    /// Records one result against `(unhealthy_threshold, healthy_threshold)`.
    pub fn record(&mut self, result: Result<(), String>, thresholds: (u32, u32)) -> Transition {
        match result {
            Ok(()) => {
                self.passed_checks += 1;
                self.consecutive_failures = 0;
                self.consecutive_successes = self.consecutive_successes.saturating_add(1);
                if !self.healthy && self.consecutive_successes >= thresholds.1 {
                    self.healthy = true;
                    self.last_error = None;
                    return Transition::BecameHealthy;
                }
            }
            Err(e) => {
                self.failed_checks += 1;
                self.consecutive_successes = 0;
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_error = Some(e);
                if self.healthy && self.consecutive_failures >= thresholds.0 {
                    self.healthy = false;
                    return Transition::BecameUnhealthy;
                }
            }
        }
        Transition::None
    }

    /// `healthy`, or `unhealthy (last error)`.
    pub fn describe(&self) -> String {
        match (&self.healthy, &self.last_error) {
            (true, _) => "healthy".into(),
            (false, Some(e)) => format!("unhealthy ({e})"),
            (false, None) => "unhealthy".into(),
        }
    }
}

/// Health of every checked target, kept by the service thread.
#[derive(Default)]
pub struct HealthBook {
    targets: BTreeMap<(String, Target), TargetHealth>,
}

impl HealthBook {
    /// Keeps the state of targets still checked, adds new ones (healthy).
    pub fn retain(&mut self, specs: &[CheckSpec]) {
        self.targets.retain(|(g, t), _| specs.iter().any(|s| &s.gateway == g && &s.target == t));
        for s in specs {
            self.targets.entry((s.gateway.clone(), s.target)).or_default();
        }
    }

    pub fn record(&mut self, gateway: &str, target: Target, result: Result<(), String>, thresholds: (u32, u32)) -> Transition {
        match self.targets.get_mut(&(gateway.to_string(), target)) {
            Some(h) => h.record(result, thresholds),
            None => Transition::None,
        }
    }

    pub fn get(&self, gateway: &str, target: &Target) -> Option<&TargetHealth> {
        self.targets.get(&(gateway.to_string(), *target))
    }

    /// Unchecked targets count as healthy.
    pub fn is_healthy(&self, gateway: &str, target: &Target) -> bool {
        self.get(gateway, target).is_none_or(|h| h.healthy)
    }

    /// Failed checks of `targets` so far (the canary analysis takes window deltas).
    pub fn failed_checks(&self, gateway: &str, targets: &[Target]) -> u64 {
        targets.iter().filter_map(|t| self.get(gateway, t)).map(|h| h.failed_checks).sum()
    }
}

/// The tasks of the running checks, aborted when dropped: the agent stops by aborting
/// `run_checks`, and a dropped `JoinHandle` alone would leave its task running (holding a
/// reporter, so the controller would never see every sender gone).
#[derive(Default)]
struct RunningChecks(Vec<(CheckSpec, JoinHandle<()>)>);

impl Drop for RunningChecks {
    fn drop(&mut self) {
        for (_, task) in &self.0 {
            task.abort();
        }
    }
}

/// Runs the checks the controller asks for: each update is the complete set of checks;
/// tasks of checks no longer wanted stop, new ones start.
pub async fn run_checks(mut updates: tokio::sync::mpsc::UnboundedReceiver<Vec<CheckSpec>>, reporter: impl Reporter) {
    let mut running = RunningChecks::default();
    while let Some(specs) = updates.recv().await {
        running.0.retain(|(spec, task)| {
            let keep = specs.contains(spec);
            if !keep {
                task.abort();
            }
            keep
        });
        for spec in specs {
            if !running.0.iter().any(|(s, _)| *s == spec) {
                let task = tokio::spawn(check_loop(spec.clone(), reporter.clone()));
                running.0.push((spec, task));
            }
        }
    }
}

async fn check_loop(spec: CheckSpec, reporter: impl Reporter) {
    let interval = Duration::from_millis(spec.check.interval_ms.max(10));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = match spec.through_tunnel_to {
            Some(vip) => check_through_tunnel(&spec.target, vip, &spec.check).await,
            None => check_once(&spec.target, &spec.check).await,
        };
        if !reporter.report(HealthReport { gateway: spec.gateway.clone(), target: spec.target, result }) {
            return;
        }
    }
}

/// One check: a TCP connect, or an HTTP GET expecting a status, within the timeout.
pub async fn check_once(target: &Target, check: &HealthCheck) -> Result<(), String> {
    let addr = SocketAddr::from((target.addr, check.port.unwrap_or(target.port)));
    let timeout = Duration::from_millis(check.timeout_ms.max(1));
    let attempt = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        if check.protocol == CheckProtocol::Tcp {
            return Ok(());
        }
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("HTTP to {addr}: {e}"))?;
        tokio::spawn(connection);
        let request = hyper::Request::get(check.path.as_str())
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::USER_AGENT, "splitter-health-check")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| format!("HTTP GET {}: {e}", check.path))?;
        let status = response.status().as_u16();
        if status == check.expected_status {
            Ok(())
        } else {
            Err(format!("HTTP GET {} answered {status}, expected {}", check.path, check.expected_status))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer from {addr} within {}ms", check.timeout_ms)),
    }
}

/// One check of a DSR target: a TCP SYN from this node to the VIP, sent to the target
/// inside an IP-in-IP header (as the datapath sends clients' packets); the target passes
/// when the VIP answers with a SYN-ACK (it holds the VIP, decapsulates, and listens), which
/// comes back directly. The half-open connection is then reset through the tunnel. A TCP
/// handshake is all a tunnelled check does: an `http` check of a DSR gateway checks that
/// much too.
pub async fn check_through_tunnel(target: &Target, vip: SocketAddr, check: &HealthCheck) -> Result<(), String> {
    let (target, timeout) = (*target, Duration::from_millis(check.timeout_ms.max(1)));
    tokio::task::spawn_blocking(move || crate::tunnel_probe::tunnel_syn_probe(target.addr, vip, timeout))
        .await
        .map_err(|e| format!("tunnel check of {target}: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_turn_targets_unhealthy_and_back() {
        let mut h = TargetHealth::default();
        assert_eq!(h.record(Err("refused".into()), (2, 3)), Transition::None);
        assert!(h.healthy, "one failure is below the threshold");
        assert_eq!(h.record(Ok(()), (2, 3)), Transition::None);
        assert_eq!(h.record(Err("refused".into()), (2, 3)), Transition::None, "the success broke the streak");
        assert_eq!(h.record(Err("refused".into()), (2, 3)), Transition::BecameUnhealthy);
        assert_eq!(h.describe(), "unhealthy (refused)");
        assert_eq!(h.record(Ok(()), (2, 3)), Transition::None);
        assert_eq!(h.record(Ok(()), (2, 3)), Transition::None);
        assert_eq!(h.record(Ok(()), (2, 3)), Transition::BecameHealthy);
        assert_eq!((h.failed_checks, h.passed_checks), (3, 4));
    }

    #[tokio::test]
    async fn tcp_check_fails_on_a_closed_port_and_passes_on_an_open_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let target: Target = format!("127.0.0.1:{port}").parse().unwrap();
        let check = HealthCheck::default();
        assert_eq!(check_once(&target, &check).await, Ok(()));
        drop(listener);
        assert!(check_once(&target, &check).await.unwrap_err().contains("connect"));
    }
}
