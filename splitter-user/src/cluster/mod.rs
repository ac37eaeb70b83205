//! Gateways shared by several agents through a store (etcd), as Vamp's gateway agents
//! shared theirs through ZooKeeper, etcd or Consul.
//!
//! Under the store's prefix:
//! - `gateways/NAME`: a [`GatewayRecord`] (the document with its weights, the weight
//!   history, the rollout, and the decisions of the change that wrote it). Written by the
//!   agent a change was made on, compare-and-swap on the key's revision; read by every agent,
//!   which applies it.
//! - `counters/NODE`: a [`NodeCounters`], the analysis counters of one node's traffic.
//!   Written by that node; read by the agent driving the rollouts, which sums them.
//! - `driver`: the name of the agent driving the rollouts, on its lease. Written by the
//!   agent that wins the election; read by none (each agent knows whether it holds it).
//!
//! The controller sees a store through [`Store`] (the etcd one in [`etcd`], an in-memory
//! one in [`memory`] for tests without etcd) and hears from it through [`StoreUpdate`]s in
//! its inbox.

pub mod etcd;
pub mod memory;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    api::Event,
    rollout::{Rollout, Sample},
    state::WeightHistory,
};

/// One gateway as the store holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatewayRecord {
    /// The gateway document, with the weights in effect.
    pub document: String,
    /// Earlier weight sets, for `rollback`.
    #[serde(default)]
    pub history: WeightHistory,
    /// The gateway's rollout, running or ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<serde_json::Value>,
    /// The events of the change that wrote this record, replayed by every other node.
    #[serde(default)]
    pub decisions: Vec<Decision>,
    /// The node that wrote it.
    pub writer: String,
}

impl GatewayRecord {
    /// The rollout, if it still reads.
    pub fn rollout(&self) -> Option<Rollout> {
        self.rollout.clone().and_then(|v| serde_json::from_value(v).ok())
    }

    /// Whether `self` and `other` describe the same gateway, history and rollout (what
    /// wrote them and the decisions aside).
    pub fn same_state(&self, other: &GatewayRecord) -> bool {
        self.document == other.document && self.history == other.history && self.rollout == other.rollout
    }
}

/// An event that a change made, carried to the other nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub kind: String,
    pub message: String,
}

impl From<&Event> for Decision {
    fn from(e: &Event) -> Self {
        Self { kind: e.kind.clone(), message: e.message.clone() }
    }
}

/// One route's analysis counters on one node (cumulative since that node's agent started
/// counting the gateway).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCounters {
    pub flows: u64,
    pub resets: u64,
    pub failed_connects: u64,
    pub http_responses: u64,
    pub http_5xx: u64,
    pub connects: u64,
    pub connect_ns: u64,
    pub failed_checks: u64,
}

/// A node's counters: gateway -> route -> counters.
pub type NodeCounters = BTreeMap<String, BTreeMap<String, RouteCounters>>;

/// Adds a node's counters of `gateway` to `sample`, with `canary_route` as the canary.
pub fn add_counters(sample: &mut Sample, counters: &NodeCounters, gateway: &str, canary_route: &str) {
    let Some(routes) = counters.get(gateway) else { return };
    for (route, c) in routes {
        if route == canary_route {
            sample.canary_flows += c.flows;
            sample.canary_resets += c.resets;
            sample.canary_failed_connects += c.failed_connects;
            sample.canary_http_responses += c.http_responses;
            sample.canary_http_5xx += c.http_5xx;
            sample.canary_connects += c.connects;
            sample.canary_connect_ns += c.connect_ns;
            sample.canary_failed_checks += c.failed_checks;
        } else {
            sample.stable_connects += c.connects;
            sample.stable_connect_ns += c.connect_ns;
        }
    }
}

/// A change to one gateway's key: written only if the key's revision is still `expected`
/// (0: the key must not exist).
#[derive(Clone, Debug)]
pub struct RecordWrite {
    pub name: String,
    pub expected: i64,
    /// The new record; none deletes the gateway.
    pub record: Option<GatewayRecord>,
}

/// Why a write was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// A gateway was changed by someone else since this node read it (the names).
    Conflict(Vec<String>),
    /// The store cannot be reached, or did not answer in time.
    Unavailable(String),
}

/// What the store tells the controller.
#[derive(Clone, Debug)]
pub enum StoreUpdate {
    /// Every gateway and counter under the prefix, at `revision` (on connecting, and after
    /// the store was out of reach).
    Snapshot { revision: i64, gateways: BTreeMap<String, (i64, GatewayRecord)>, counters: BTreeMap<String, NodeCounters> },
    /// A gateway written (some) or deleted (none) at `revision`.
    Gateway { name: String, revision: i64, record: Option<GatewayRecord> },
    /// A node's counters.
    Counters { node: String, counters: NodeCounters },
    /// The store went out of reach (why), or (none) came back.
    Unreachable(Option<String>),
}

/// The controller's side of a shared store.
pub trait Store: Send {
    /// `etcd://HOST:PORT/PREFIX`, for messages.
    fn url(&self) -> String;
    /// This agent's name among the nodes.
    fn node(&self) -> &str;
    /// Writes every change, or none (a conflict or an unreachable store); the revision of
    /// the write.
    fn write(&mut self, writes: &[RecordWrite]) -> Result<i64, StoreError>;
    /// Publishes this node's counters (in the background; a failure is retried with the
    /// next publication).
    fn publish_counters(&mut self, counters: &NodeCounters);
    /// Whether this agent drives the rollouts now.
    fn driving(&self) -> bool;
}

/// `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreUrl {
    pub endpoints: Vec<String>,
    /// Starts and ends with `/`.
    pub prefix: String,
}

impl StoreUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest =
            text.strip_prefix("etcd://").ok_or_else(|| format!("--store {text}: expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX"))?;
        let (hosts, prefix) = rest.split_once('/').ok_or_else(|| format!("--store {text}: no /PREFIX after the endpoints"))?;
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            return Err(format!("--store {text}: the prefix is empty (e.g. etcd://127.0.0.1:2379/splitter)"));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let ok = host.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !ok {
                return Err(format!("--store {text}: endpoint {host:?} is not HOST:PORT"));
            }
            endpoints.push(format!("http://{host}"));
        }
        Ok(Self { endpoints, prefix: format!("/{prefix}/") })
    }

    pub fn gateway_key(&self, name: &str) -> String {
        format!("{}gateways/{name}", self.prefix)
    }

    pub fn gateways_prefix(&self) -> String {
        format!("{}gateways/", self.prefix)
    }

    pub fn counters_key(&self, node: &str) -> String {
        format!("{}counters/{node}", self.prefix)
    }

    pub fn counters_prefix(&self) -> String {
        format!("{}counters/", self.prefix)
    }

    pub fn driver_key(&self) -> String {
        format!("{}driver", self.prefix)
    }

    pub fn display(&self) -> String {
        let hosts: Vec<&str> = self.endpoints.iter().map(|e| e.trim_start_matches("http://")).collect();
        format!("etcd://{}{}", hosts.join(","), self.prefix.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse_or_say_what_is_wrong() {
        let url = StoreUrl::parse("etcd://10.0.0.1:2379,10.0.0.2:2379/splitter/prod").unwrap();
        assert_eq!(url.endpoints, vec!["http://10.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert_eq!(url.gateway_key("sava"), "/splitter/prod/gateways/sava");
        assert_eq!(url.display(), "etcd://10.0.0.1:2379,10.0.0.2:2379/splitter/prod");
        for (text, says) in [
            ("http://h:1/p", "expected etcd://"),
            ("etcd://h:1", "no /PREFIX"),
            ("etcd://h:1/", "the prefix is empty"),
            ("etcd://h/p", "\"h\" is not HOST:PORT"),
            ("etcd://h:0/p", "\"h:0\" is not HOST:PORT"),
        ] {
            let err = StoreUrl::parse(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn counters_of_every_node_sum_into_one_sample() {
        let node = |flows, failed| -> NodeCounters {
            let mut routes = BTreeMap::new();
            routes.insert(
                "v2".to_string(),
                RouteCounters { flows, failed_connects: failed, connects: flows, connect_ns: flows * 10, ..Default::default() },
            );
            routes.insert(
                "v1".to_string(),
                RouteCounters { flows: 9 * flows, connects: 9 * flows, connect_ns: 90 * flows, ..Default::default() },
            );
            BTreeMap::from([("g".to_string(), routes)])
        };
        let mut sample = Sample::default();
        add_counters(&mut sample, &node(10, 1), "g", "v2");
        add_counters(&mut sample, &node(20, 0), "g", "v2");
        add_counters(&mut sample, &node(20, 5), "other", "v2");
        assert_eq!((sample.canary_flows, sample.canary_failed_connects, sample.canary_connects), (30, 1, 30));
        assert_eq!((sample.stable_connects, sample.stable_connect_ns), (270, 2700));
    }
}
