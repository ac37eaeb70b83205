//! The control API's vocabulary, shared by the server (`control`), the controller and the
//! CLI: the default socket, headers, the answers (serde both ways where the CLI reads
//! them), and the one error type, which only the server turns into an HTTP status.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

use crate::{
    gateway::{format_weight, Gateway, Sticky},
    rollout::Rollout,
};

/// Vamp's `lookup_name`: a stable digest of a gateway's or route's name (informational; the
/// same on every node).
pub fn lookup_name(name: &str) -> String {
    // FNV-1a, 64 bits, twice with different offsets for 128 bits of hex.
    let fnv = |offset: u64| name.bytes().fold(offset, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{:016x}{:016x}", fnv(0xcbf2_9ce4_8422_2325), fnv(0x8422_2325_cbf2_9ce4))
}

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
    /// Too many requests of this kind in a short time (external events); try later.
    TooMany,
    /// The shared store cannot be reached: changes are refused until it is back.
    Unavailable,
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
    pub fn too_many(message: impl fmt::Display) -> Self {
        Self { kind: ErrorKind::TooMany, message: message.to_string() }
    }
    pub fn unavailable(message: impl fmt::Display) -> Self {
        Self { kind: ErrorKind::Unavailable, message: message.to_string() }
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
    /// New flows whose SYN the target refused (RST), answered with anything but a SYN-ACK,
    /// or left unanswered for the connect timeout.
    #[serde(default)]
    pub failed_connects: u64,
    /// HTTP responses by status class, `[1xx, 2xx, 3xx, 4xx, 5xx]` (HTTP gateways only).
    #[serde(default)]
    pub http_responses: [u64; 5],
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
    /// Digest of the live bucket table and its targets (16 hex digits).
    pub table_fingerprint: String,
    pub new_flows: u64,
    pub new_flows_since_change: u64,
    pub no_target: u64,
    pub conntrack_miss: u64,
    pub alloc_failed: u64,
    pub targets: Vec<TargetStats>,
    /// The automated rollout, if any, in one line.
    pub rollout: Option<String>,
}

/// One entry of the event log, with Vamp's event fields beside the splitter's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing from 1; `?since=ID` returns the events after it.
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub gateway: String,
    /// `weights`, `health`, `rollout`, `config`, or `external` (POSTed by a client).
    pub kind: String,
    pub message: String,
    /// Vamp's tags: `gateways:NAME` and `splitter:KIND` for the agent's own events, as
    /// given for external ones.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Vamp's event type (the kind, for the agent's own events).
    #[serde(rename = "type", default)]
    pub event_type: String,
    /// Vamp's value (the message, for the agent's own events).
    #[serde(default)]
    pub value: serde_json::Value,
    /// RFC 3339, as Vamp writes it.
    #[serde(default)]
    pub timestamp: String,
    /// Who recorded it: `agent`, or the client that POSTed it.
    #[serde(default)]
    pub origin: String,
}

/// An event a client records with `POST /api/v1/events` (Vamp's `{tags, value, type}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalEvent {
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub value: serde_json::Value,
    #[serde(rename = "type", default = "default_event_type")]
    pub event_type: String,
    /// Vamp's clients may send the time; the agent records its own.
    #[serde(default, skip_serializing)]
    pub timestamp: Option<serde_json::Value>,
}

fn default_event_type() -> String {
    "event".into()
}

/// Limits of an external event: the log is the operator's, not a store for clients.
pub const MAX_EVENT_TAGS: usize = 32;
pub const MAX_EVENT_TAG_BYTES: usize = 256;
pub const MAX_EVENT_TYPE_BYTES: usize = 128;
pub const MAX_EVENT_VALUE_BYTES: usize = 8 << 10;

impl ExternalEvent {
    /// The event's fields within their limits, or what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.tags.len() > MAX_EVENT_TAGS {
            return Err(format!("tags: {} tags, at most {MAX_EVENT_TAGS}", self.tags.len()));
        }
        if let Some(tag) = self.tags.iter().find(|t| t.len() > MAX_EVENT_TAG_BYTES || t.chars().any(char::is_control)) {
            return Err(format!("tags: a tag of {} bytes or with control characters (at most {MAX_EVENT_TAG_BYTES} bytes)", tag.len()));
        }
        if self.event_type.is_empty() || self.event_type.len() > MAX_EVENT_TYPE_BYTES || self.event_type.chars().any(char::is_control) {
            return Err(format!("type: 1 to {MAX_EVENT_TYPE_BYTES} bytes without control characters"));
        }
        let value = self.value.to_string();
        if value.len() > MAX_EVENT_VALUE_BYTES {
            return Err(format!("value: {} bytes, at most {MAX_EVENT_VALUE_BYTES}", value.len()));
        }
        Ok(())
    }
}

/// `GET /api/v1/info`: what runs, since when.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Info {
    pub name: String,
    pub message: String,
    pub version: String,
    /// RFC 3339.
    pub started: String,
    /// Like `1h 2m 3s`.
    pub uptime: String,
    pub uptime_seconds: u64,
    pub gateways: usize,
    /// The running XDP program's id.
    pub program_id: u32,
    /// The running program's build id and map layout version.
    pub build: String,
    pub layout: u32,
    /// The shared store this agent follows (`--store`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreInfo>,
}

/// Where a many-node agent stands with its shared store.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreInfo {
    /// `etcd://HOST:PORT[,...]/PREFIX`.
    pub url: String,
    /// This agent's name among the nodes.
    pub node: String,
    pub reachable: bool,
    /// This agent drives the rollouts (holds the store's lease).
    pub driving: bool,
    /// The store revision of the last change this agent applied or wrote.
    pub revision: i64,
}

/// What runs for a gateway besides its document.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GatewayStatus {
    /// Health of each checked target (`ADDR:PORT` -> `healthy` / `unhealthy (why)`).
    pub health: BTreeMap<String, String>,
    pub rollout: Option<Rollout>,
    /// The live table's generation.
    pub generation: Option<u64>,
    /// Digest of the live table and its targets (16 hex digits): nodes given the same
    /// documents (and seeing the same health) show the same one.
    pub table_fingerprint: Option<String>,
    /// With a shared store: the store revision of the gateway's record here; a change
    /// sent with `if_revision` set to it is taken only if nobody changed the gateway since.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_revision: Option<i64>,
    /// The running datapath: `program ID build BUILD layout N`.
    pub datapath: String,
}

/// A gateway as `get` shows it.
#[derive(Clone, Debug)]
pub struct GatewayView {
    pub gateway: Gateway,
    pub status: GatewayStatus,
}

impl GatewayView {
    /// The gateway in Vamp's shape, as Vamp's clients read it: `port` as `9050/http`,
    /// `routes` a map by route name, each `weight` a percent string (`"90%"`), and Vamp's
    /// informational `lookup_name` and `deployed`. The splitter's own fields (`mode`,
    /// `health_check`, `canary`, `status`) sit beside them, where Vamp clients ignore them;
    /// the whole object, or it with new weights, can be PUT back as it is.
    pub fn to_json(&self) -> serde_json::Value {
        let g = &self.gateway;
        // The document as written (every field as the parser reads it back), as JSON.
        let mut value: serde_json::Value = serde_yaml::from_str(&g.to_yaml()).unwrap_or_default();
        let mut routes = serde_json::Map::new();
        for route in &g.routes {
            let targets: Vec<String> = route.targets.iter().map(|t| t.to_string()).collect();
            routes.insert(
                route.name.clone(),
                serde_json::json!({
                    "lookup_name": lookup_name(&format!("{}/{}", g.name, route.name)),
                    "weight": format_weight(route.weight),
                    "targets": targets,
                }),
            );
        }
        value["routes"] = serde_json::Value::Object(routes);
        value["lookup_name"] = lookup_name(&g.name).into();
        value["deployed"] = true.into();
        value["sticky"] = match g.sticky {
            Sticky::Flow => serde_json::Value::Null,
            Sticky::Client => "client".into(),
        };
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
        if let (Some(generation), Some(fingerprint)) = (self.status.generation, &self.status.table_fingerprint) {
            doc.push_str(&format!("# table: generation {generation}, fingerprint {fingerprint}\n"));
        }
        if let Some(revision) = self.status.store_revision {
            doc.push_str(&format!("# store revision: {revision}\n"));
        }
        if !self.status.datapath.is_empty() {
            doc.push_str(&format!("# datapath: {}\n", self.status.datapath));
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
    Info(Info),
}

/// How a client wants answers: JSON, YAML, or each answer's natural form (YAML documents
/// for gateways, JSON for the rest, plain text for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Natural,
    Json,
    Yaml,
}

impl ApiError {
    /// The refusal's body: one line of text, or Vamp's `{"message": ...}` in JSON or YAML.
    pub fn render(&self, format: Format, status: u16) -> (&'static str, String) {
        let value = serde_json::json!({ "message": self.message, "status": status });
        match format {
            Format::Natural => ("text/plain", format!("{}\n", self.message)),
            Format::Json => ("application/json", value.to_string()),
            Format::Yaml => ("application/yaml", serde_yaml::to_string(&value).unwrap_or_default()),
        }
    }
}

impl Answer {
    /// Content type and body in the format the client asked for.
    pub fn render(&self, format: Format) -> (&'static str, String) {
        let structured = |json: String, yaml: String| match format {
            Format::Yaml => ("application/yaml", yaml),
            Format::Json | Format::Natural => ("application/json", json),
        };
        match self {
            Self::Gateways(g) if format == Format::Json => {
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
            Self::Text(text) => match format {
                Format::Natural => ("text/plain", text.clone()),
                _ => structured(
                    serde_json::json!({ "message": text.trim_end() }).to_string(),
                    serde_yaml::to_string(&serde_json::json!({ "message": text.trim_end() })).unwrap_or_default(),
                ),
            },
            Self::Metrics(text) => ("text/plain; version=0.0.4", text.clone()),
            Self::Stats(stats) => structured(json_text(stats), yaml_text(stats)),
            Self::Events(events) => structured(json_text(events), yaml_text(events)),
            Self::Rollouts(rollouts) => structured(json_text(rollouts), yaml_text(rollouts)),
            Self::Info(info) => structured(json_text(info), yaml_text(info)),
        }
    }
}

fn yaml_text(value: &impl Serialize) -> String {
    serde_yaml::to_string(value).unwrap_or_default()
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
