//! The datapath as the controller sees it: the [`Dataplane`] trait, implemented over the
//! kernel's BPF maps ([`Datapath`]) and in memory ([`MemoryDataplane`], for tests of the
//! control logic without privileges). Both keep their books with the same [`Layout`], so
//! limits, ids, counter slots and key clashes behave alike.

mod batch;
mod bpf;
pub mod layout;
mod memory;

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use splitter_common::conntrack::Timeouts;

pub use bpf::{load_object, monotonic_ns, Datapath, Maps};
pub use layout::Layout;
pub use memory::MemoryDataplane;

use crate::{
    api::GatewayStats,
    gateway::{Gateway, Target},
};

/// Sizes of the datapath's maps and its half-open timeout, fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_gateways: u32,
    pub conntrack_entries: u32,
    pub half_open_entries: u32,
    pub half_open_timeout_ns: u64,
    /// A SYN not answered within this (when the client sends it again) is a failed connect.
    pub connect_timeout_ns: u64,
}

impl Limits {
    pub const DEFAULT: Self = Self {
        max_gateways: splitter_common::maps::DEFAULT_MAX_GATEWAYS,
        conntrack_entries: splitter_common::maps::DEFAULT_CONNTRACK_ENTRIES,
        half_open_entries: splitter_common::maps::DEFAULT_HALF_OPEN_ENTRIES,
        half_open_timeout_ns: splitter_common::conntrack::DEFAULT_HALF_OPEN_TIMEOUT_NS,
        connect_timeout_ns: splitter_common::conntrack::DEFAULT_CONNECT_TIMEOUT_NS,
    };
}

/// Where a gateway lives in the maps; saved with the state so a restarted agent can
/// adopt the pinned maps and keep writing the right buffers and counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub id: u32,
    pub generation: u64,
    /// `ADDR:PORT` of each target of the live table, in table order, and its counter slot.
    pub targets: Vec<(String, u32)>,
    /// Fingerprint of the live table (informational when saved).
    #[serde(default)]
    pub fingerprint: u64,
}

/// What the controller needs of a datapath. `shares` are a gateway's targets (all of them,
/// unhealthy ones at 0) with their share of new flows in parts per million.
pub trait Dataplane {
    /// Checks that `gateway` can be applied, without changing anything; `batch` are the
    /// gateways being applied together with it.
    fn check(&self, gateway: &Gateway, shares: &[(Target, u32)], batch: &[Gateway]) -> Result<()>;
    /// Makes `gateway` live with `shares` in one switch; returns its new generation. On an
    /// error the gateway stays as it was.
    fn apply(&mut self, gateway: &Gateway, shares: &[(Target, u32)]) -> Result<u64>;
    /// Takes over a gateway a previous agent left live exactly as `placement` says, writing
    /// nothing; false (and nothing changed) otherwise.
    fn adopt(&mut self, gateway: &Gateway, shares: &[(Target, u32)], placement: &Placement) -> bool;
    /// Removes a gateway: new flows to it are passed to the kernel, established ones finish.
    fn remove(&mut self, name: &str) -> Result<()>;
    /// Where every gateway lives in the maps.
    fn placements(&self) -> BTreeMap<String, Placement>;
    /// The shares of a live gateway's targets (parts per million).
    fn shares(&self, name: &str) -> Vec<(Target, u32)>;
    /// Forgets the established flows of `name`'s `targets`: their next packets are placed
    /// again by the live table. Returns how many flows.
    fn flush_flows(&mut self, name: &str, targets: &[Target]) -> Result<usize>;
    /// Per-gateway and per-target counters.
    fn stats(&self) -> Result<Vec<GatewayStats>>;
    /// Packets seen per class and forwarding outcomes.
    fn packet_counters(&self) -> Result<Vec<(&'static str, u64)>>;
    /// Conntrack entries in use (each flow has two), and the capacity.
    fn conntrack_entries(&self) -> usize;
    /// Half-open entries in use (each half-open flow has two), and the capacity.
    fn half_open_entries(&self) -> usize;
    fn half_open_capacity(&self) -> u32;
    /// Flow-state events by name.
    fn flow_events(&self) -> Result<Vec<(&'static str, u64)>>;
    fn conntrack_capacity(&self) -> u32;
    /// Forgets flows whose close completed or that sat idle past their timeout.
    fn sweep_conntrack(&mut self, timeouts: &Timeouts) -> Result<usize>;
}

/// Weights for logs: `route=90% route=10%`.
pub fn describe_weights(g: &Gateway) -> String {
    g.routes.iter().map(|r| format!("{}={}", r.name, crate::gateway::format_weight(r.weight))).collect::<Vec<_>>().join(" ")
}
