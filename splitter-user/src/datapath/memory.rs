//! A datapath in memory: the same books as the BPF one ([`Layout`]), no maps. Tests of the
//! controller drive it: they set counters as traffic would, mark targets unreachable, and
//! make a chosen gateway's next map write fail.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use splitter_common::conntrack::Timeouts;

use super::{
    layout::{gateway_key, Layout, LiveGateway},
    Dataplane, Limits, Placement,
};
use crate::{
    api::{GatewayStats, TargetStats},
    gateway::{Gateway, Mode, Target},
};

/// Counters of one target, as the kernel program would count them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub new_flows: u64,
    pub resets: u64,
    pub connects: u64,
    pub connect_ns_total: u64,
    /// Established flows now (what `flush_flows` would end).
    pub established: u64,
    pub failed_connects: u64,
    /// HTTP responses by class, `[1xx, 2xx, 3xx, 4xx, 5xx]`.
    pub http: [u64; 5],
}

pub struct MemoryDataplane {
    layout: Layout,
    /// Per (gateway, target) counters; they live as long as the target's counter slot.
    traffic: BTreeMap<(String, Target), Traffic>,
    /// Targets with no route from this node (a full-NAT gateway sending them flows fails).
    pub unreachable: BTreeSet<Target>,
    /// Map writes of these gateways fail (as a full or broken map would), until removed.
    pub failing: BTreeSet<String>,
    /// Successful table switches so far, over all gateways.
    pub switches: u64,
}

impl MemoryDataplane {
    pub fn new(limits: Limits) -> Self {
        Self { layout: Layout::new(limits), traffic: BTreeMap::new(), unreachable: BTreeSet::new(), failing: BTreeSet::new(), switches: 0 }
    }

    /// Traffic of a target of a live gateway, to change as packets would.
    pub fn traffic(&mut self, gateway: &str, target: Target) -> &mut Traffic {
        self.traffic.entry((gateway.to_string(), target)).or_default()
    }

    /// The live gateway as the datapath holds it (configured shares, generation).
    pub fn live(&self, name: &str) -> Option<(&Gateway, u64)> {
        self.layout.gateways.get(name).map(|g| (&g.config, g.generation))
    }

    /// Names of the live gateways.
    pub fn names(&self) -> Vec<String> {
        self.layout.gateways.keys().cloned().collect()
    }

    fn reachable(&self, gateway: &Gateway, shares: &[(Target, u32)]) -> Result<()> {
        if gateway.mode == Mode::FullNat || (gateway.mode == Mode::Dsr && gateway.source.prefix.is_none()) {
            if let Some((t, _)) = shares.iter().find(|(t, share)| *share > 0 && self.unreachable.contains(t)) {
                bail!("no route to target {t}");
            }
        }
        Ok(())
    }
}

impl Dataplane for MemoryDataplane {
    fn check(&self, gateway: &Gateway, shares: &[(Target, u32)], batch: &[Gateway]) -> Result<()> {
        self.layout.check_fits(gateway, shares.len(), batch)?;
        self.reachable(gateway, shares)
    }

    fn apply(&mut self, gateway: &Gateway, shares: &[(Target, u32)]) -> Result<u64> {
        self.layout.check_fits(gateway, shares.len(), &[])?;
        self.reachable(gateway, shares)?;
        let id = self.layout.id_for(&gateway.name)?;
        let targets: Vec<Target> = shares.iter().map(|(t, _)| *t).collect();
        let slots = self.layout.counter_slots_for(&gateway.name, &targets)?;
        if self.failing.contains(&gateway.name) {
            bail!("writing GATEWAYS: injected failure for gateway {}", gateway.name);
        }
        let generation = self.layout.gateways.get(&gateway.name).map_or(1, |g| g.generation + 1);
        for (target, (_, new)) in targets.iter().zip(&slots) {
            if *new {
                self.traffic.insert((gateway.name.clone(), *target), Traffic::default());
            }
        }
        self.layout.record(LiveGateway {
            id,
            key: gateway_key(gateway),
            generation,
            last_switch: None,
            config: gateway.clone(),
            targets: targets.iter().copied().zip(slots.iter().map(|(s, _)| *s)).collect(),
            shares: shares.to_vec(),
            fingerprint: super::layout::table_of(shares).1,
        });
        self.traffic.retain(|(g, t), _| g != &gateway.name || targets.contains(t));
        self.switches += 1;
        Ok(generation)
    }

    fn adopt(&mut self, gateway: &Gateway, shares: &[(Target, u32)], placement: &Placement) -> bool {
        // Nothing outlives an in-memory datapath: there is never anything to adopt.
        let _ = (gateway, shares, placement);
        false
    }

    fn remove(&mut self, name: &str) -> Result<()> {
        if self.failing.contains(name) {
            bail!("removing from GATEWAYS: injected failure for gateway {name}");
        }
        self.layout.forget(name).with_context(|| format!("no gateway {name}"))?;
        self.traffic.retain(|(g, _), _| g != name);
        Ok(())
    }

    fn placements(&self) -> BTreeMap<String, Placement> {
        self.layout.placements()
    }

    fn shares(&self, name: &str) -> Vec<(Target, u32)> {
        self.layout.shares(name)
    }

    fn flush_flows(&mut self, name: &str, targets: &[Target]) -> Result<usize> {
        self.layout.gateways.get(name).with_context(|| format!("no gateway {name}"))?;
        let mut flushed = 0;
        for ((g, t), traffic) in &mut self.traffic {
            if g == name && targets.contains(t) {
                flushed += traffic.established as usize;
                traffic.established = 0;
            }
        }
        Ok(flushed)
    }

    fn stats(&self) -> Result<Vec<GatewayStats>> {
        let mut out = Vec::new();
        for (name, live) in &self.layout.gateways {
            let mut stats = GatewayStats {
                name: name.clone(),
                generation: live.generation,
                table_fingerprint: super::layout::describe_fingerprint(live.fingerprint),
                ..GatewayStats::default()
            };
            for (route, target, share) in live.routed_targets() {
                let traffic = self.traffic.get(&(name.clone(), target)).copied().unwrap_or_default();
                stats.new_flows += traffic.new_flows;
                stats.targets.push(TargetStats {
                    route,
                    target: target.to_string(),
                    configured_share: share,
                    new_flows: traffic.new_flows,
                    resets_from_target: traffic.resets,
                    connects: traffic.connects,
                    connect_ns_total: traffic.connect_ns_total,
                    failed_connects: traffic.failed_connects,
                    http_responses: traffic.http,
                    ..TargetStats::default()
                });
            }
            out.push(stats);
        }
        Ok(out)
    }

    fn packet_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(Vec::new())
    }

    fn conntrack_entries(&self) -> usize {
        self.traffic.values().map(|t| 2 * t.established as usize).sum()
    }

    fn half_open_entries(&self) -> usize {
        0
    }

    fn half_open_capacity(&self) -> u32 {
        self.layout.limits.half_open_entries
    }

    fn flow_events(&self) -> Result<Vec<(&'static str, u64)>> {
        Ok(splitter_common::FlowEvent::ALL.iter().map(|e| (e.name(), 0)).collect())
    }

    fn conntrack_capacity(&self) -> u32 {
        self.layout.limits.conntrack_entries
    }

    fn sweep_conntrack(&mut self, _timeouts: &Timeouts) -> Result<usize> {
        Ok(0)
    }
}
