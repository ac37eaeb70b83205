//! The control API's vocabulary, shared by the server (`control`), the controller and the
//! CLI: the default socket, headers, the answers (serde both ways where the CLI reads
//! them), and the one error type, which only the server turns into an HTTP status.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

use crate::{gateway::Gateway, rollout::Rollout};

/// Where the agent serves the control API unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/splitter/splitter.sock";
/// A response's warning (one line): the request succeeded, but the operator must know
/// something, e.g. that the change is live but could not be saved.
pub const WARNING_HEADER: &str = "x-splitter-warning";
/// The file a request body came from, so errors name it.
pub const ORIGIN_HEADER: &str = "x-splitter-origin";

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (a document that does not parse, a bad parameter).
    Invalid,
    /// It names a gateway, route or rollout that does not exist.
    NotFound,
    /// It does not fit what is running (a VIP already served, no room, a rollout's state).
    Conflict,
    /// The agent could not do it (a map read or write failed).
    Failed,
}

/// A refusal: one line saying what and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn invalid(message: impl fmt::Display) -> Self {
        Self { kind: ErrorKind::Invalid, message: message.to_string() }
    }
    pub fn not_found(message: impl fmt::Display) -> Self {
        Self { kind: ErrorKind::NotFound, message: message.to_string() }
    }
    pub fn conflict(message: impl fmt::Display) -> Self {
        Self { kind: ErrorKind::Conflict, message: message.to_string() }
    }
    pub fn failed(message: impl fmt::Display) -> Self {
        Self { kind: ErrorKind::Failed, message: message.to_string() }
    }
    pub fn no_gateway(name: &str) -> Self {
        Self::not_found(format!("no gateway {name}"))
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

/// Counters of one target, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetStats {
    pub route: String,
    pub target: String,
    /// Share of the gateway's new flows this target should get (percent).
    pub configured_share: f64,
    pub new_flows: u64,
    pub packets_to_target: u64,
    pub bytes_to_target: u64,
    pub packets_from_target: u64,
    pub bytes_from_target: u64,
    pub resets_from_target: u64,
    pub connects: u64,
    pub connect_ns_total: u64,
    /// New flows since the gateway's current weights took effect.
    pub new_flows_since_change: u64,
    /// This target's share of the gateway's new flows since then (percent).
    pub observed_share: Option<f64>,
    /// `healthy` / `unhealthy (why)`, when the gateway has health checks.
    pub health: Option<String>,
    pub failed_checks: u64,
}

/// Counters of one gateway and its targets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayStats {
    pub name: String,
    pub generation: u64,
    pub new_flows: u64,
    pub new_flows_since_change: u64,
    pub no_target: u64,
    pub conntrack_miss: u64,
    pub alloc_failed: u64,
    pub targets: Vec<TargetStats>,
    /// The automated rollout, if any, in one line.
    pub rollout: Option<String>,
}

/// One entry of the event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing from 1; `?since=ID` returns the events after it.
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub gateway: String,
    /// `weights`, `health`, `rollout`, `config`.
    pub kind: String,
    pub message: String,
}

/// What runs for a gateway besides its document.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GatewayStatus {
    /// Health of each checked target (`ADDR:PORT` -> `healthy` / `unhealthy (why)`).
    pub health: BTreeMap<String, String>,
    pub rollout: Option<Rollout>,
    /// The live table's generation.
    pub generation: Option<u64>,
}

/// A gateway as `get` shows it.
#[derive(Clone, Debug)]
pub struct GatewayView {
    pub gateway: Gateway,
    pub status: GatewayStatus,
}

impl GatewayView {
    fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(&self.gateway).unwrap_or_default();
        value["status"] = serde_json::to_value(&self.status).unwrap_or_default();
        value
    }

    /// The document (it can be applied again), with the live status as comments.
    fn to_yaml(&self) -> String {
        let mut doc = self.gateway.to_yaml();
        let health: Vec<String> = self.status.health.iter().map(|(t, h)| format!("{t} {h}")).collect();
        if !health.is_empty() {
            doc.push_str(&format!("# health: {}\n", health.join("; ")));
        }
        if let Some(r) = &self.status.rollout {
            doc.push_str(&format!("# rollout: {}\n", r.describe()));
        }
        doc
    }
}

/// Gateways in an answer: one (`get NAME`, a change of one gateway) or a list.
#[derive(Clone, Debug, Default)]
pub struct GatewaysAnswer {
    pub views: Vec<GatewayView>,
    /// One gateway: JSON is an object rather than an array.
    pub single: bool,
    /// Lines about the whole answer, shown as comments before the documents in YAML.
    pub notes: Vec<String>,
    /// Lines after the documents in YAML (what a change did besides).
    pub trailer: Vec<String>,
}

/// A successful answer.
#[derive(Clone, Debug)]
pub enum Answer {
    Gateways(GatewaysAnswer),
    Text(String),
    Stats(Vec<GatewayStats>),
    /// Prometheus text exposition.
    Metrics(String),
    Events(Vec<Event>),
    Rollouts(Vec<Rollout>),
}

impl Answer {
    /// Content type and body; `json` when the client asked for JSON.
    pub fn render(&self, json: bool) -> (&'static str, String) {
        match self {
            Self::Gateways(g) if json => {
                let values: Vec<serde_json::Value> = g.views.iter().map(GatewayView::to_json).collect();
                let body = match (g.single, values.first()) {
                    (true, Some(one)) => one.to_string(),
                    _ => serde_json::Value::Array(values).to_string(),
                };
                ("application/json", body)
            }
            Self::Gateways(g) => {
                let mut body: String = g.notes.iter().map(|n| format!("# {n}\n")).collect();
                body.push_str(&g.views.iter().map(GatewayView::to_yaml).collect::<Vec<_>>().join("---\n"));
                body.extend(g.trailer.iter().map(|n| format!("# {n}\n")));
                ("application/yaml", body)
            }
            Self::Text(text) => ("text/plain", text.clone()),
            Self::Metrics(text) => ("text/plain; version=0.0.4", text.clone()),
            Self::Stats(stats) => ("application/json", json_text(stats)),
            Self::Events(events) => ("application/json", json_text(events)),
            Self::Rollouts(rollouts) => ("application/json", json_text(rollouts)),
        }
    }
}

fn json_text(value: &impl Serialize) -> String {
    // The answer types serialize infallibly (string keys, no non-finite floats).
    serde_json::to_string(value).unwrap_or_default()
}

/// A successful answer and, when the change is live but something went wrong besides
/// (the state could not be saved), a warning.
#[derive(Clone, Debug)]
pub struct Reply {
    pub answer: Answer,
    pub warning: Option<String>,
}
