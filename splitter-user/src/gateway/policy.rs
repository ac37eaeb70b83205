//! A gateway's optional policies: health checks of its targets and an automated canary
//! rollout (Vamp's canary workflow, built in).
//!
//! ```yaml
//! health_check:
//!   protocol: http          # tcp (connect) or http (GET, expects a status)
//!   path: /health
//!   expected_status: 200
//!   port: 8080              # default: the target's own port
//!   interval: 1s
//!   timeout: 500ms
//!   unhealthy_threshold: 2  # failures in a row before a target leaves the table
//!   healthy_threshold: 2    # successes in a row before it comes back
//! canary:
//!   route: sava/sava/sava:1.1.0/port
//!   steps: [5, 10, 25, 50, 100]
//!   interval: 30s
//!   max_error_rate: 5%       # TCP resets from canary targets per new canary flow
//!   max_failed_checks: 1     # failed health checks of canary targets per window
//!   max_connect_latency: 2x  # SYN to SYN-ACK: absolute (50ms) or relative to stable
//!   min_flows: 20            # fewer new canary flows in a window: wait, do not judge
//!   flush_on_rollback: false
//! ```

use std::{fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use super::FULL_WEIGHT;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckProtocol {
    Tcp,
    Http,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub protocol: CheckProtocol,
    /// HTTP path (http only).
    pub path: String,
    /// Expected HTTP status (http only).
    pub expected_status: u16,
    /// Port to check; `None`: the target's own port.
    pub port: Option<u16>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            protocol: CheckProtocol::Tcp,
            path: "/".into(),
            expected_status: 200,
            port: None,
            interval_ms: 1000,
            timeout_ms: 500,
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        }
    }
}

/// The connect-latency limit of a canary route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LatencyLimit {
    /// Microseconds.
    Absolute(u64),
    /// Hundredths of the stable routes' latency (`2x` = 200).
    Relative(u32),
}

impl fmt::Display for LatencyLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Absolute(us) => write!(f, "{}", format_duration_us(*us)),
            Self::Relative(h) if h % 100 == 0 => write!(f, "{}x", h / 100),
            Self::Relative(h) => write!(f, "{}.{:02}x", h / 100, h % 100),
        }
    }
}

/// When an automated rollout rolls back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Resets of established flows plus failed connects of canary targets per new canary
    /// flow, hundredths of a percent.
    pub max_error_rate: u32,
    /// HTTP 5xx responses of canary targets per response, hundredths of a percent (on by
    /// default at 5% for HTTP gateways).
    #[serde(default)]
    pub max_http_error_rate: Option<u32>,
    /// Failed health checks of canary targets tolerated per window.
    pub max_failed_checks: u32,
    pub max_connect_latency: Option<LatencyLimit>,
    /// New canary flows a window needs before it is judged.
    pub min_flows: u32,
    /// On rollback, also end the canary's established flows.
    pub flush_on_rollback: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            max_error_rate: 500,
            max_http_error_rate: None,
            max_failed_checks: 1,
            max_connect_latency: None,
            min_flows: 20,
            flush_on_rollback: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanarySpec {
    pub route: String,
    /// Canary weights, hundredths of a percent, increasing, the last one 100%.
    pub steps: Vec<u32>,
    pub interval_ms: u64,
    pub thresholds: Thresholds,
    /// External metrics and webhooks (none by default).
    #[serde(default)]
    pub analysis: Analysis,
}

/// What a rollout asks outside the splitter, like Flagger's metric templates and webhooks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    /// Prometheus queries judged at the end of every window.
    #[serde(default)]
    pub metrics: Vec<MetricCheck>,
    /// Windows in a row whose metrics could not all be judged (query failed or empty)
    /// before the rollout rolls back; until then it waits at its step.
    #[serde(default = "default_max_inconclusive")]
    pub max_inconclusive: u32,
    #[serde(default)]
    pub webhooks: Vec<Webhook>,
}

fn default_max_inconclusive() -> u32 {
    3
}

/// A bound of a metric; its text as written (the comparison parses it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bound(pub f64);

// Bounds are parsed from finite numbers only, so equality is an equivalence.
impl Eq for Bound {}

/// A Prometheus query whose single value must stay within bounds. The query may use
/// `{{gateway}}`, `{{route}}`, `{{targets}}` (the canary targets' `ADDR:PORT`, escaped as
/// regex literals and joined by `|`) and `{{interval}}` (the window, like `30s`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricCheck {
    pub name: String,
    /// Base address of the Prometheus server, `http://HOST:PORT`.
    pub prometheus: String,
    pub query: String,
    #[serde(default)]
    pub min: Option<Bound>,
    #[serde(default)]
    pub max: Option<Bound>,
}

/// When a webhook is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookKind {
    /// Before the first step; a failure stops the rollout before any weight moves.
    PreRollout,
    /// Before every later step; a failure rolls back.
    Step,
    /// Before the last step (promotion); a failure waits there (`splitter canary approve`
    /// promotes by hand), while the analysis goes on.
    ConfirmPromotion,
    /// After promotion (informational).
    PostRollout,
    /// After a rollback (informational).
    Rollback,
}

impl HookKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::PreRollout => "pre-rollout",
            Self::Step => "step",
            Self::ConfirmPromotion => "confirm-promotion",
            Self::PostRollout => "post-rollout",
            Self::Rollback => "rollback",
        }
    }

    pub const ALL: [Self; 5] = [Self::PreRollout, Self::Step, Self::ConfirmPromotion, Self::PostRollout, Self::Rollback];
}

/// A webhook: POSTed JSON (gateway, route, step, weights, last verdict); 2xx passes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    #[serde(rename = "type")]
    pub kind: HookKind,
    /// `http://HOST:PORT/PATH`.
    pub url: String,
    #[serde(default = "default_hook_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub retries: u32,
}

fn default_hook_timeout_ms() -> u64 {
    5000
}

/// Checks an `http://HOST:PORT[/PATH]` address (the only kind the agent calls).
pub fn check_http_url(url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("`{url}`: only http:// addresses are supported"))?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err(format!("`{url}`: no host"));
    }
    Ok(())
}

/// Where full NAT takes its source addresses and ports (`source:`): capacity is
/// addresses x ports per target. No address: the node's own address towards each target;
/// no ports: the default range, clear of the node's ephemeral ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceSpec {
    pub addresses: Vec<Ipv4Addr>,
    /// First and last port.
    pub ports: Option<(u16, u16)>,
    /// Direct server return only: the prefix (address with its host bits zero, length)
    /// whose addresses the outer headers' sources are picked from, per flow.
    pub prefix: Option<(Ipv4Addr, u8)>,
}

impl SourceSpec {
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.ports.is_none() && self.prefix.is_none()
    }
}

/// Parses an IPv4 prefix `A.B.C.D/LEN` (8 to 32 bits) whose host bits are zero.
pub fn parse_prefix(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = text.trim().split_once('/').ok_or_else(|| format!("`{text}` is not a prefix like 10.100.0.0/24"))?;
    let addr: Ipv4Addr = addr.trim().parse().map_err(|_| format!("`{addr}` is not an IPv4 address"))?;
    let len: u8 =
        len.trim().parse().ok().filter(|l| (8..=32).contains(l)).ok_or_else(|| format!("`/{len}`: the length must be 8 to 32"))?;
    let host_bits = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
    if u32::from(addr) & host_bits != 0 {
        let network = Ipv4Addr::from(u32::from(addr) & !host_bits);
        return Err(format!("`{text}` has host bits set (the prefix is {network}/{len})"));
    }
    Ok((addr, len))
}

/// Lowest full-NAT source port a gateway may configure (below are well-known services).
pub const MIN_SOURCE_PORT: u16 = 1024;

/// Parses a port range `A-B`.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (a, b) = text.trim().split_once('-').ok_or_else(|| format!("`{text}` is not a port range like 20000-29999"))?;
    let port = |t: &str| t.trim().parse::<u16>().map_err(|_| format!("`{t}` is not a port number"));
    let (a, b) = (port(a)?, port(b)?);
    if a < MIN_SOURCE_PORT || a > b {
        return Err(format!("`{text}`: the range must start at {MIN_SOURCE_PORT} or above and not end before it starts"));
    }
    Ok((a, b))
}

/// Largest `min_flows` and `max_failed_checks` a canary may ask for.
pub const MAX_MIN_FLOWS: u32 = 1_000_000;
pub const MAX_FAILED_CHECKS: u32 = 1000;
/// Longest analysis interval (a day).
pub const MAX_INTERVAL_MS: u64 = 86_400_000;

/// What is wrong with a canary specification: the field (`steps[2]`, `interval`, ...) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecProblem {
    pub field: String,
    pub message: String,
}

impl CanarySpec {
    /// The rules of a canary specification, wherever it comes from (a gateway file, the
    /// CLI, a request on the socket): steps that increase from above 0% and end at 100%,
    /// an interval from 1 ms to a day, thresholds within their ranges.
    pub fn check(&self) -> Result<(), SpecProblem> {
        let problem = |field: String, message: &str| Err(SpecProblem { field, message: message.to_string() });
        if self.steps.is_empty() {
            return problem("steps".into(), "no steps: the canary weights, like [5, 10, 25, 50, 100]");
        }
        for (i, step) in self.steps.iter().enumerate() {
            if *step > FULL_WEIGHT {
                return problem(format!("steps[{i}]"), "a step above 100%");
            }
            if *step == 0 || (i > 0 && *step <= self.steps[i - 1]) {
                return problem(format!("steps[{i}]"), "steps must increase from above 0%");
            }
        }
        if self.steps.last() != Some(&FULL_WEIGHT) {
            return problem("steps".into(), "the last step must be 100% (the canary promoted)");
        }
        if self.route.is_empty() {
            return problem("route".into(), "missing: the route to roll out");
        }
        if self.interval_ms == 0 || self.interval_ms > MAX_INTERVAL_MS {
            return problem("interval".into(), "the interval must be from 1ms to 24h");
        }
        let t = &self.thresholds;
        if t.max_error_rate > FULL_WEIGHT {
            return problem("max_error_rate".into(), "above 100%");
        }
        if t.max_http_error_rate.is_some_and(|r| r > FULL_WEIGHT) {
            return problem("max_http_error_rate".into(), "above 100%");
        }
        if t.max_failed_checks > MAX_FAILED_CHECKS {
            return problem("max_failed_checks".into(), "at most 1000");
        }
        if t.min_flows > MAX_MIN_FLOWS {
            return problem("min_flows".into(), "at most 1000000");
        }
        for (i, m) in self.analysis.metrics.iter().enumerate() {
            if m.name.is_empty() || m.query.is_empty() {
                return problem(format!("metrics[{i}]"), "a metric needs a name and a query");
            }
            if let Err(why) = check_http_url(&m.prometheus) {
                return problem(format!("metrics[{i}].prometheus"), &why);
            }
            if m.min.is_none() && m.max.is_none() {
                return problem(format!("metrics[{i}]"), "a metric needs a min or a max");
            }
            if [m.min, m.max].iter().flatten().any(|b| !b.0.is_finite()) {
                return problem(format!("metrics[{i}]"), "bounds must be finite numbers");
            }
        }
        for (i, w) in self.analysis.webhooks.iter().enumerate() {
            if let Err(why) = check_http_url(&w.url) {
                return problem(format!("webhooks[{i}].url"), &why);
            }
            if w.timeout_ms == 0 || w.timeout_ms > 60_000 || w.retries > 10 {
                return problem(format!("webhooks[{i}]"), "timeout from 1ms to 60s, at most 10 retries");
            }
        }
        Ok(())
    }
}

/// Parses `500ms`, `30s`, `1.5s`, `2m`, `100us`; returns microseconds.
pub fn parse_duration_us(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: f64 = match unit.trim() {
        "us" | "µs" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "" => return Err(format!("`{t}` has no unit: write e.g. 500ms, 30s or 2m")),
        other => return Err(format!("unknown unit `{other}` in `{t}`: use us, ms, s or m")),
    };
    let value: f64 = number.parse().map_err(|_| format!("`{t}` is not a duration like 500ms, 30s or 2m"))?;
    let us = value * scale;
    if !(1.0..=86_400e6).contains(&us) {
        return Err(format!("`{t}` is out of range (1us to 24h)"));
    }
    Ok(us.round() as u64)
}

/// Writes microseconds back the way `parse_duration_us` reads them.
pub fn format_duration_us(us: u64) -> String {
    if us.is_multiple_of(60_000_000) {
        format!("{}m", us / 60_000_000)
    } else if us.is_multiple_of(1_000_000) {
        format!("{}s", us / 1_000_000)
    } else if us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

/// Parses `2x`, `1.5x` (relative to stable) or a duration (absolute).
pub fn parse_latency_limit(text: &str) -> Result<LatencyLimit, String> {
    let t = text.trim();
    if let Some(factor) = t.strip_suffix('x') {
        let f: f64 = factor.trim().parse().map_err(|_| format!("`{t}` is not a factor like 2x or 1.5x"))?;
        if !(1.0..=100.0).contains(&f) {
            return Err(format!("`{t}`: a relative limit is between 1x and 100x"));
        }
        return Ok(LatencyLimit::Relative((f * 100.0).round() as u32));
    }
    parse_duration_us(t).map(LatencyLimit::Absolute)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_us("500ms"), Ok(500_000));
        assert_eq!(parse_duration_us("1.5s"), Ok(1_500_000));
        assert_eq!(parse_duration_us("2m"), Ok(120_000_000));
        assert!(parse_duration_us("30").is_err());
        assert!(parse_duration_us("fast").is_err());
        assert!(parse_duration_us("3h").is_err());
        for us in [1_000, 250_000, 30_000_000, 120_000_000, 1_500_000] {
            assert_eq!(parse_duration_us(&format_duration_us(us)), Ok(us));
        }
    }

    #[test]
    fn latency_limits() {
        assert_eq!(parse_latency_limit("2x"), Ok(LatencyLimit::Relative(200)));
        assert_eq!(parse_latency_limit("1.5x"), Ok(LatencyLimit::Relative(150)));
        assert_eq!(parse_latency_limit("50ms"), Ok(LatencyLimit::Absolute(50_000)));
        assert!(parse_latency_limit("0.5x").is_err());
        assert_eq!(LatencyLimit::Relative(150).to_string(), "1.50x");
        assert_eq!(LatencyLimit::Absolute(50_000).to_string(), "50ms");
    }
}
