//! The event log: every weight change, health change and rollout decision, with a time
//! and a reason. Kept in memory (the last [`CAPACITY`]), served by `GET /api/v1/events`
//! and written to the agent's log as it happens.

use std::{
    collections::VecDeque,
    time::{SystemTime, UNIX_EPOCH},
};

use log::info;

pub use crate::api::Event;
use crate::api::ExternalEvent;

pub const CAPACITY: usize = 10_000;

#[derive(Default)]
pub struct EventLog {
    events: VecDeque<Event>,
    last_id: u64,
}

impl EventLog {
    /// One of the agent's own events.
    pub fn push(&mut self, gateway: &str, kind: &str, message: impl Into<String>) {
        let message = message.into();
        info!("event {kind} {gateway}: {message}");
        let mut tags = Vec::new();
        if !gateway.is_empty() {
            tags.push(format!("gateways:{gateway}"));
        }
        tags.push(format!("splitter:{kind}"));
        let value = serde_json::Value::String(message.clone());
        self.record(gateway, kind, message, tags, kind.to_string(), value, "agent");
    }

    /// An event another node's agent recorded for a change it wrote to the shared store.
    pub fn push_from(&mut self, gateway: &str, kind: &str, message: impl Into<String>, node: &str) {
        let message = message.into();
        info!("event {kind} {gateway} (from node {node}): {message}");
        let mut tags = Vec::new();
        if !gateway.is_empty() {
            tags.push(format!("gateways:{gateway}"));
        }
        tags.push(format!("splitter:{kind}"));
        let value = serde_json::Value::String(message.clone());
        self.record(gateway, kind, message, tags, kind.to_string(), value, &format!("agent {node}"));
    }

    /// The newest event's id (0 before the first).
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Forgets the events after `id`: those of a change that was undone. Ids are not
    /// reused (a client that read one of them must not miss the next event).
    pub fn forget_after(&mut self, id: u64) {
        while self.events.back().is_some_and(|e| e.id > id) {
            self.events.pop_back();
        }
    }

    /// An event a client recorded (`POST /api/v1/events`): its gateway is the one its
    /// `gateways:NAME` tag names, if any.
    pub fn push_external(&mut self, event: ExternalEvent, origin: &str) {
        let gateway = event.tags.iter().find_map(|t| t.strip_prefix("gateways:")).unwrap_or("").to_string();
        let value = match &event.value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let message = format!("{}: {value} (tags: {}; from {origin})", event.event_type, event.tags.join(", "));
        info!("event external {gateway}: {message}");
        self.record(&gateway, "external", message, event.tags, event.event_type, event.value, origin);
    }

    #[expect(clippy::too_many_arguments, reason = "every field of an event, filled by the two kinds of push")]
    fn record(
        &mut self,
        gateway: &str,
        kind: &str,
        message: String,
        tags: Vec<String>,
        event_type: String,
        value: serde_json::Value,
        origin: &str,
    ) {
        self.last_id += 1;
        let now = SystemTime::now();
        let time_ms = now.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.events.push_back(Event {
            id: self.last_id,
            time_ms,
            gateway: gateway.to_string(),
            kind: kind.to_string(),
            message,
            tags,
            event_type,
            value,
            timestamp: humantime::format_rfc3339_millis(now).to_string(),
            origin: origin.to_string(),
        });
        while self.events.len() > CAPACITY {
            self.events.pop_front();
        }
    }

    /// Events after `since`, oldest first, that carry every tag of `tags` and, if given,
    /// have the type `event_type` (Vamp's filters).
    pub fn since(&self, since: u64) -> Vec<Event> {
        self.matching(since, &[], None)
    }

    pub fn matching(&self, since: u64, tags: &[String], event_type: Option<&str>) -> Vec<Event> {
        self.events
            .iter()
            .filter(|e| e.id > since && tags.iter().all(|t| e.tags.contains(t)) && event_type.is_none_or(|t| e.event_type == t))
            .cloned()
            .collect()
    }

    /// Every event kept, oldest first (what tests compare).
    pub fn all(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_since_filters() {
        let mut log = EventLog::default();
        log.push("g", "weights", "a=90% b=10%");
        log.push("g", "health", "10.0.0.1:80 unhealthy");
        assert_eq!(log.since(0).len(), 2);
        let after_first: Vec<u64> = log.since(1).iter().map(|e| e.id).collect();
        assert_eq!(after_first, vec![2]);
        assert!(log.since(2).is_empty());
    }

    #[test]
    fn external_events_carry_their_tags_and_filter_by_them() {
        let mut log = EventLog::default();
        log.push("sava", "weights", "a=90% b=10%");
        let event = ExternalEvent {
            tags: vec!["gateways:sava".into(), "canary".into()],
            value: serde_json::json!({"step": 2}),
            event_type: "progress".into(),
            timestamp: None,
        };
        log.push_external(event, "vamp-runner");
        let external = log.matching(0, &["canary".into()], None);
        assert_eq!(external.len(), 1);
        assert_eq!((external[0].gateway.as_str(), external[0].kind.as_str()), ("sava", "external"));
        assert_eq!(external[0].message, r#"progress: {"step":2} (tags: gateways:sava, canary; from vamp-runner)"#);
        assert_eq!(log.matching(0, &["gateways:sava".into()], None).len(), 2);
        assert_eq!(log.matching(0, &[], Some("weights")).len(), 1);
    }
}
