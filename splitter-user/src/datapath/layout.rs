//! The books of a datapath: which gateway has which id, key, generation and counter slots,
//! and whether one more fits. Pure (no map is touched here), shared by the BPF and the
//! in-memory dataplanes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use anyhow::{ensure, Context, Result};
use splitter_common::{
    maps::{
        ipv6_words, Address, DnatReply, DnatReply6, GatewayKey, GatewayKey6, FLOW_HTTP, MAX_TARGETS_PER_GATEWAY, MAX_TARGET_COUNTERS,
        PROTO_TCP, PROTO_UDP,
    },
    table::{build_bucket_table, table_fingerprint, TableTarget},
};

use super::{Limits, Placement};
use crate::gateway::{Gateway, Mode, Protocol, Target};

/// A gateway as the datapath holds it.
#[derive(Clone, Debug)]
pub struct LiveGateway {
    pub id: u32,
    pub key: LiveKey,
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

/// A gateway's key in its family's map (`GATEWAYS` or `GATEWAYS6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveKey {
    V4(GatewayKey),
    V6(GatewayKey6),
}

impl LiveKey {
    /// The VIP as the address filter sees it ([`Address::fold`]).
    pub fn vip_fold(&self) -> u32 {
        match self {
            Self::V4(key) => key.vip,
            Self::V6(key) => key.vip.fold(),
        }
    }
}

/// The datapath's key of a gateway: VIP, port and protocol as packets carry them.
pub fn gateway_key(gateway: &Gateway) -> LiveKey {
    let port = gateway.port.to_be();
    let proto = if gateway.protocol.is_udp() { PROTO_UDP } else { PROTO_TCP };
    match gateway.virtual_address {
        IpAddr::V4(vip) => LiveKey::V4(GatewayKey { vip: u32::from_ne_bytes(vip.octets()), port, proto, _pad: 0 }),
        IpAddr::V6(vip) => LiveKey::V6(GatewayKey6 { vip: ipv6_words(vip.octets()), port, proto, _pad: 0 }),
    }
}

/// A target's IPv4 address as the datapath's maps hold it (network byte order); none for
/// an IPv6 target.
pub fn target_addr(target: &Target) -> Option<u32> {
    match target.addr {
        IpAddr::V4(addr) => Some(u32::from_ne_bytes(addr.octets())),
        IpAddr::V6(_) => None,
    }
}

/// A target's address as the address filter sees it ([`Address::fold`]).
pub fn target_fold(target: &Target) -> u32 {
    match target.addr {
        IpAddr::V4(addr) => u32::from_ne_bytes(addr.octets()),
        IpAddr::V6(addr) => ipv6_words(addr.octets()).fold(),
    }
}

/// What the `DNAT_REPLIES` and `DNAT_REPLIES6` maps hold for the live gateways: each
/// DNAT gateway's targets (address, port and protocol, as packets from them carry them) to
/// the gateway, so that any node can send a target's answer from the gateway's address
/// without the flow's state.
pub struct DnatReplies {
    pub v4: Vec<(GatewayKey, DnatReply)>,
    pub v6: Vec<(GatewayKey6, DnatReply6)>,
    /// Targets two DNAT gateways share, left out: which gateway's address their answers
    /// should carry cannot be told without the flow's state.
    pub shared: Vec<Target>,
}

/// A target as packets from it carry it: address, port, protocol.
type Endpoint = (IpAddr, u16, u8);

/// One target's entry in either map.
enum DnatReplyEntry {
    V4(GatewayKey, DnatReply),
    V6(GatewayKey6, DnatReply6),
}

/// The [`DnatReplies`] of `gateways`.
pub fn dnat_replies<'a>(gateways: impl IntoIterator<Item = &'a LiveGateway>) -> DnatReplies {
    // By target: the gateway and the entry.
    let mut replies: BTreeMap<Endpoint, (SocketAddr, DnatReplyEntry)> = BTreeMap::new();
    let mut shared = BTreeSet::new();
    for live in gateways.into_iter().filter(|g| g.config.mode == Mode::Dnat) {
        let flow_flags = if live.config.protocol == Protocol::Http { FLOW_HTTP as u16 } else { 0 };
        let gateway = SocketAddr::new(live.config.virtual_address, live.config.port);
        for (target, slot) in &live.targets {
            let (entry, proto) = match (live.key, target.addr) {
                (LiveKey::V4(key), IpAddr::V4(addr)) => (
                    DnatReplyEntry::V4(
                        GatewayKey { vip: u32::from_ne_bytes(addr.octets()), port: target.port.to_be(), proto: key.proto, _pad: 0 },
                        DnatReply { vip: key.vip, counter_index: *slot, gateway_id: live.id, port: key.port, flow_flags },
                    ),
                    key.proto,
                ),
                (LiveKey::V6(key), IpAddr::V6(addr)) => (
                    DnatReplyEntry::V6(
                        GatewayKey6 { vip: ipv6_words(addr.octets()), port: target.port.to_be(), proto: key.proto, _pad: 0 },
                        DnatReply6 { vip: key.vip, counter_index: *slot, gateway_id: live.id, port: key.port, flow_flags },
                    ),
                    key.proto,
                ),
                // Validation keeps a gateway's targets in its family.
                _ => continue,
            };
            let id = (target.addr, target.port, proto);
            match replies.get(&id) {
                Some((other, _)) if *other != gateway => {
                    shared.insert((id, *target));
                }
                _ => {
                    replies.insert(id, (gateway, entry));
                }
            }
        }
    }
    for (id, _) in &shared {
        replies.remove(id);
    }
    let mut out = DnatReplies { v4: Vec::new(), v6: Vec::new(), shared: shared.into_iter().map(|(_, t)| t).collect() };
    for (_, entry) in replies.into_values() {
        match entry {
            DnatReplyEntry::V4(key, reply) => out.v4.push((key, reply)),
            DnatReplyEntry::V6(key, reply) => out.v6.push((key, reply)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(name: &str, id: u32, yaml_mode: &str, vip: &str, targets: &[&str]) -> LiveGateway {
        let doc = format!(
            "name: {name}\nport: 80/tcp\nvirtual_address: {vip}\nmode: {yaml_mode}\nroutes:\n  v1:\n    weight: 100%\n    targets: [{}]\n",
            targets.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ")
        );
        let Ok([crate::gateway::Document::Gateway(config)]) = <[_; 1]>::try_from(crate::gateway::parse_documents("test", &doc).unwrap())
        else {
            panic!("one gateway: {doc}")
        };
        let key = gateway_key(&config);
        let targets = targets.iter().enumerate().map(|(i, t)| (t.parse().unwrap(), id * 10 + i as u32)).collect();
        LiveGateway { id, key, generation: 1, last_switch: None, config, targets, shares: Vec::new(), fingerprint: 0 }
    }

    #[test]
    fn each_dnat_target_answers_for_its_gateway_and_a_shared_one_for_none() {
        let a = live("a", 1, "dnat", "10.0.0.1", &["10.1.0.1:80", "10.1.0.2:80"]);
        let b = live("b", 2, "dnat", "10.0.0.2", &["10.1.0.2:80", "10.1.0.3:80"]);
        let c = live("c", 3, "fullnat", "10.0.0.3", &["10.1.0.4:80"]);
        let DnatReplies { v4: replies, v6, shared } = dnat_replies([&a, &b, &c]);
        assert!(v6.is_empty());
        let by_target: BTreeMap<String, (u32, u32)> = replies
            .iter()
            .map(|(k, r)| {
                (format!("{}:{}", std::net::Ipv4Addr::from(k.vip.to_ne_bytes()), u16::from_be(k.port)), (r.gateway_id, r.counter_index))
            })
            .collect();
        assert_eq!(by_target.get("10.1.0.1:80"), Some(&(1, 10)));
        assert_eq!(by_target.get("10.1.0.3:80"), Some(&(2, 21)));
        assert!(!by_target.contains_key("10.1.0.2:80"), "a target of two gateways answers for neither: {by_target:?}");
        assert!(!by_target.contains_key("10.1.0.4:80"), "full NAT answers come to the node's own address: {by_target:?}");
        assert_eq!(shared, vec!["10.1.0.2:80".parse::<Target>().unwrap()]);
        let (k, r) = replies.iter().find(|(_, r)| r.gateway_id == 1).unwrap();
        let LiveKey::V4(a_key) = a.key else { panic!("an IPv4 gateway") };
        assert_eq!((r.vip, r.port, k.proto), (a_key.vip, a_key.port, PROTO_TCP));
    }

    #[test]
    fn an_ipv6_dnat_gateways_targets_answer_for_it_in_the_ipv6_map() {
        let v4 = live("a", 1, "dnat", "10.0.0.1", &["10.1.0.1:80"]);
        let v6 = live("b", 2, "dnat", "2001:db8::10", &["[2001:db8:2::11]:8080", "[2001:db8:2::21]:8080"]);
        let both = live("c", 3, "dnat", "2001:db8::20", &["[2001:db8:2::21]:8080"]);
        let DnatReplies { v4: replies4, v6: replies6, shared } = dnat_replies([&v4, &v6, &both]);
        assert_eq!(replies4.len(), 1);
        let LiveKey::V6(key) = v6.key else { panic!("an IPv6 gateway") };
        let target = ipv6_words("2001:db8:2::11".parse::<std::net::Ipv6Addr>().unwrap().octets());
        assert_eq!(replies6.len(), 1, "the target both IPv6 gateways name answers for neither: {replies6:?}");
        let (k, r) = replies6[0];
        assert_eq!((k.vip, u16::from_be(k.port), k.proto), (target, 8080, PROTO_TCP));
        assert_eq!((r.vip, r.port, r.gateway_id, r.counter_index), (key.vip, key.port, 2, 20));
        assert_eq!(shared, vec!["[2001:db8:2::21]:8080".parse::<Target>().unwrap()]);
    }
}
