//! The event log: every weight change, health change and rollout decision, with a time
//! and a reason. Kept in memory (the last [`CAPACITY`]), served by `GET /api/v1/events`
//! and written to the agent's log as it happens.

use std::{
    collections::VecDeque,
    time::{SystemTime, UNIX_EPOCH},
};

use log::info;

pub use crate::api::Event;

pub const CAPACITY: usize = 10_000;

#[derive(Default)]
pub struct EventLog {
    events: VecDeque<Event>,
    last_id: u64,
}

impl EventLog {
    pub fn push(&mut self, gateway: &str, kind: &str, message: impl Into<String>) {
        self.last_id += 1;
        let message = message.into();
        info!("event {kind} {gateway}: {message}");
        let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.events.push_back(Event { id: self.last_id, time_ms, gateway: gateway.to_string(), kind: kind.to_string(), message });
        while self.events.len() > CAPACITY {
            self.events.pop_front();
        }
    }

    /// Events after `since`, oldest first.
    pub fn since(&self, since: u64) -> Vec<Event> {
        self.events.iter().filter(|e| e.id > since).cloned().collect()
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
}
