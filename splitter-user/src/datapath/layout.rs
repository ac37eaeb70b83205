//! The books of a datapath: which gateway has which id, key, generation and counter slots,
//! and whether one more fits. Pure (no map is touched here), shared by the BPF and the
//! in-memory dataplanes.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use anyhow::{ensure, Context, Result};
use splitter_common::{
    maps::{GatewayKey, MAX_TARGETS_PER_GATEWAY, MAX_TARGET_COUNTERS, PROTO_TCP, PROTO_UDP},
    table::{build_bucket_table, table_fingerprint, TableTarget},
};

use super::{Limits, Placement};
use crate::gateway::{Gateway, Target};

/// A gateway as the datapath holds it.
#[derive(Clone, Debug)]
pub struct LiveGateway {
    pub id: u32,
    pub key: GatewayKey,
    pub generation: u64,
    pub last_switch: Option<Instant>,
    pub config: Gateway,
    /// The live table's targets (index = table slot value) and their counter slots.
    pub targets: Vec<(Target, u32)>,
    /// Each target's share of new flows in the live table, parts per million.
    pub shares: Vec<(Target, u32)>,
    /// [`table_fingerprint`] of the live table.
    pub fingerprint: u64,
}

/// The bucket table of `shares` (targets in table order) and its fingerprint.
pub fn table_of(shares: &[(Target, u32)]) -> (Vec<u16>, u64) {
    let targets: Vec<TableTarget> = shares.iter().map(|(t, share)| TableTarget { key: t.table_key(), weight: *share }).collect();
    let slots = build_bucket_table(&targets);
    let fingerprint = table_fingerprint(&slots, &targets);
    (slots, fingerprint)
}

/// A fingerprint as operators read it.
pub fn describe_fingerprint(fingerprint: u64) -> String {
    format!("{fingerprint:016x}")
}

impl LiveGateway {
    /// Every target by route, with its configured share of new flows in percent.
    pub fn routed_targets(&self) -> Vec<(String, Target, f64)> {
        let shares: BTreeMap<Target, u32> = self.shares.iter().copied().collect();
        let ppm_per_percent = f64::from(crate::gateway::FULL_SHARE_PPM / 100);
        self.config
            .routes
            .iter()
            .flat_map(|route| {
                route.targets.iter().map(|target| {
                    let share = f64::from(shares.get(target).copied().unwrap_or(0)) / ppm_per_percent;
                    (route.name.clone(), *target, share)
                })
            })
            .collect()
    }
}

pub struct Layout {
    pub limits: Limits,
    pub gateways: BTreeMap<String, LiveGateway>,
    /// Counter slot of each (gateway, target), stable across weight changes.
    counter_slots: BTreeMap<(String, Target), u32>,
}

impl Layout {
    pub fn new(limits: Limits) -> Self {
        Self { limits, gateways: BTreeMap::new(), counter_slots: BTreeMap::new() }
    }

    pub fn placements(&self) -> BTreeMap<String, Placement> {
        self.gateways
            .iter()
            .map(|(name, g)| {
                let targets = g.targets.iter().map(|(t, slot)| (t.to_string(), *slot)).collect();
                (name.clone(), Placement { id: g.id, generation: g.generation, targets, fingerprint: g.fingerprint })
            })
            .collect()
    }

    pub fn shares(&self, name: &str) -> Vec<(Target, u32)> {
        self.gateways.get(name).map(|g| g.shares.clone()).unwrap_or_default()
    }

    /// The target count, the VIP:port key and the gateway capacity, against the live
    /// gateways as `batch` will leave them.
    pub fn check_fits(&self, gateway: &Gateway, count: usize, batch: &[Gateway]) -> Result<()> {
        ensure!(
            count <= MAX_TARGETS_PER_GATEWAY as usize,
            "gateway {}: {count} targets, at most {MAX_TARGETS_PER_GATEWAY} are supported by the datapath",
            gateway.name
        );
        let key = gateway_key(gateway);
        let clash = |name: &str| {
            format!(
                "gateway {}: {}:{}/{} is already served by gateway {name}",
                gateway.name,
                gateway.virtual_address,
                gateway.port,
                gateway.protocol.name()
            )
        };
        for other in batch.iter().filter(|g| g.name != gateway.name) {
            ensure!(gateway_key(other) != key, clash(&other.name));
        }
        for (name, live) in &self.gateways {
            let replaced = batch.iter().find(|g| &g.name == name);
            let live_key = replaced.map(gateway_key).unwrap_or(live.key);
            ensure!(name == &gateway.name || live_key != key, clash(name));
        }
        let new_ones = batch.iter().filter(|g| !self.gateways.contains_key(&g.name)).count();
        let new_ones = new_ones.max(usize::from(!self.gateways.contains_key(&gateway.name)));
        ensure!(
            self.gateways.len() + new_ones <= self.limits.max_gateways as usize,
            "no room for gateway {} (--max-gateways {})",
            gateway.name,
            self.limits.max_gateways
        );
        Ok(())
    }

    /// The gateway's id: its own when live, else the lowest free one.
    pub fn id_for(&self, name: &str) -> Result<u32> {
        if let Some(live) = self.gateways.get(name) {
            return Ok(live.id);
        }
        let used: BTreeSet<u32> = self.gateways.values().map(|g| g.id).collect();
        (0..self.limits.max_gateways)
            .find(|id| !used.contains(id))
            .with_context(|| format!("no room for another gateway (--max-gateways {})", self.limits.max_gateways))
    }

    /// The counter slots `targets` of `gateway` would get (their own, else free ones), and
    /// which of them are new (to be zeroed before use). Reserves nothing.
    pub fn counter_slots_for(&self, gateway: &str, targets: &[Target]) -> Result<Vec<(u32, bool)>> {
        let mut used: BTreeSet<u32> = self.counter_slots.values().copied().collect();
        let mut out = Vec::with_capacity(targets.len());
        for target in targets {
            if let Some(slot) = self.counter_slots.get(&(gateway.to_string(), *target)) {
                out.push((*slot, false));
                continue;
            }
            let slot = (0..MAX_TARGET_COUNTERS).find(|s| !used.contains(s)).context("no free per-target counter slot")?;
            used.insert(slot);
            out.push((slot, true));
        }
        Ok(out)
    }

    /// Records a switched gateway: its targets keep their counter slots, the slots of
    /// targets it no longer has are freed.
    pub fn record(&mut self, live: LiveGateway) {
        let name = live.config.name.clone();
        self.counter_slots.retain(|(g, t), _| g != &name || live.targets.iter().any(|(k, _)| k == t));
        for (target, slot) in &live.targets {
            self.counter_slots.insert((name.clone(), *target), *slot);
        }
        self.gateways.insert(name, live);
    }

    /// Forgets a gateway and frees its counter slots.
    pub fn forget(&mut self, name: &str) -> Option<LiveGateway> {
        self.counter_slots.retain(|(g, _), _| g != name);
        self.gateways.remove(name)
    }

    /// The targets and counter slots of `placement` when a gateway with `shares` could be
    /// taken over from it as it is (`live` says what the maps hold for the gateway's key:
    /// its id and generation).
    pub fn adoptable(&self, shares: &[(Target, u32)], placement: &Placement, live: Option<(u32, u64)>) -> Option<Vec<(Target, u32)>> {
        let (id, generation) = live?;
        let targets: Vec<(Target, u32)> =
            placement.targets.iter().filter_map(|(t, slot)| t.parse::<Target>().ok().map(|t| (t, *slot))).collect();
        let expected: Vec<Target> = shares.iter().map(|(t, _)| *t).collect();
        let matches = id == placement.id
            && generation == placement.generation
            && targets.iter().map(|(t, _)| *t).collect::<Vec<_>>() == expected
            && !self.gateways.values().any(|g| g.id == placement.id);
        matches.then_some(targets)
    }
}

/// The datapath's key of a gateway: VIP, port and protocol as packets carry them.
pub fn gateway_key(gateway: &Gateway) -> GatewayKey {
    GatewayKey {
        vip: u32::from_ne_bytes(gateway.virtual_address.octets()),
        port: gateway.port.to_be(),
        proto: if gateway.protocol.is_udp() { PROTO_UDP } else { PROTO_TCP },
        _pad: 0,
    }
}
