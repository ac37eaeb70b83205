//! The agent's side of the kernel datapath: owns every map handle, turns gateways into
//! tables, switches tables atomically, reads counters and sweeps conntrack.
//!
//! One task owns the [`Datapath`]; everything else asks it through messages, so map
//! writes never interleave.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
    Ebpf,
};
use log::{debug, info, warn};
use splitter_common::{
    conntrack::{flow_expired, Timeouts},
    maps::{
        BucketTable, FlowEntry, FlowKey, GatewayCounters, GatewayKey, GatewayState, TargetCounters, TargetEntry,
        GATEWAY_DNAT, GATEWAY_STICKY_CLIENT, MAX_TARGETS_PER_GATEWAY, MAX_TARGET_COUNTERS, PROTO_TCP, PROTO_UDP,
    },
    table::{build_bucket_table, TableTarget},
    ForwardEvent, PacketClass,
};

use crate::gateway::{Gateway, Mode, Protocol, Sticky, Target};

/// Minimum time between two table switches of one gateway. The buffer a switch writes
/// was live two switches ago; an XDP program that read the old gateway state finishes
/// within microseconds, so this wait guarantees nobody still reads the buffer.
const TABLE_REUSE_GRACE: Duration = Duration::from_millis(10);

/// Sizes of the datapath's maps, fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_gateways: u32,
    pub conntrack_entries: u32,
}

/// A gateway as the datapath holds it.
struct LiveGateway {
    id: u32,
    key: GatewayKey,
    generation: u64,
    last_switch: Option<Instant>,
    config: Gateway,
    /// The live table's targets (index = table slot value) and their counter slots.
    targets: Vec<(Target, u32)>,
    /// Each target's share of new flows in the live table, parts per million.
    shares: Vec<(Target, u32)>,
}

/// Counters of one target, summed over CPUs.
#[derive(Clone, Debug, Default, serde::Serialize)]
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

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GatewayStats {
    pub name: String,
    pub generation: u64,
    pub new_flows: u64,
    pub new_flows_since_change: u64,
    pub no_target: u64,
    pub conntrack_miss: u64,
    pub alloc_failed: u64,
    pub targets: Vec<TargetStats>,
    /// The automated rollout, if any.
    pub rollout: Option<String>,
}

/// Where a gateway lives in the maps; saved with the state so a restarted agent can
/// adopt the pinned maps and keep writing the right buffers and counters.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    pub id: u32,
    pub generation: u64,
    /// `ADDR:PORT` of each target of the live table, in table order, and its counter slot.
    pub targets: Vec<(String, u32)>,
}

/// The datapath's maps, from a freshly loaded object or from pins.
pub struct Maps {
    pub gateways: HashMap<MapData, GatewayKey, GatewayState>,
    pub tables: Array<MapData, BucketTable>,
    pub targets: Array<MapData, TargetEntry>,
    pub conntrack: HashMap<MapData, FlowKey, FlowEntry>,
    pub target_counters: PerCpuArray<MapData, TargetCounters>,
    pub gateway_counters: PerCpuArray<MapData, GatewayCounters>,
    pub packet_counters: PerCpuArray<MapData, u64>,
    pub forward_events: PerCpuArray<MapData, u64>,
}

impl Maps {
    /// Takes the datapath maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            gateways: take(ebpf, "GATEWAYS")?,
            tables: take(ebpf, "BUCKET_TABLES")?,
            targets: take(ebpf, "TARGETS")?,
            conntrack: take(ebpf, "CONNTRACK")?,
            target_counters: take(ebpf, "TARGET_COUNTERS")?,
            gateway_counters: take(ebpf, "GATEWAY_COUNTERS")?,
            packet_counters: take(ebpf, "PACKET_COUNTERS")?,
            forward_events: take(ebpf, "FORWARD_EVENTS")?,
        })
    }

    /// Opens the maps a previous agent pinned.
    pub fn open_pinned(pins: &crate::pin::Pins) -> Result<Self> {
        use aya::maps::Map;
        fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(m: Map, name: &str) -> Result<T> {
            T::try_from(m).with_context(|| format!("pinned map {name} has an unexpected type"))
        }
        Ok(Self {
            gateways: typed(pins.open_map("GATEWAYS", Map::HashMap)?, "GATEWAYS")?,
            tables: typed(pins.open_map("BUCKET_TABLES", Map::Array)?, "BUCKET_TABLES")?,
            targets: typed(pins.open_map("TARGETS", Map::Array)?, "TARGETS")?,
            conntrack: typed(pins.open_map("CONNTRACK", Map::LruHashMap)?, "CONNTRACK")?,
            target_counters: typed(pins.open_map("TARGET_COUNTERS", Map::PerCpuArray)?, "TARGET_COUNTERS")?,
            gateway_counters: typed(pins.open_map("GATEWAY_COUNTERS", Map::PerCpuArray)?, "GATEWAY_COUNTERS")?,
            packet_counters: typed(pins.open_map("PACKET_COUNTERS", Map::PerCpuArray)?, "PACKET_COUNTERS")?,
            forward_events: typed(pins.open_map("FORWARD_EVENTS", Map::PerCpuArray)?, "FORWARD_EVENTS")?,
        })
    }
}

pub struct Datapath {
    limits: Limits,
    gateways_map: HashMap<MapData, GatewayKey, GatewayState>,
    tables: Array<MapData, BucketTable>,
    targets_map: Array<MapData, TargetEntry>,
    conntrack: HashMap<MapData, FlowKey, FlowEntry>,
    target_counters: PerCpuArray<MapData, TargetCounters>,
    gateway_counters: PerCpuArray<MapData, GatewayCounters>,
    packet_counters: PerCpuArray<MapData, u64>,
    forward_events: PerCpuArray<MapData, u64>,
    gateways: BTreeMap<String, LiveGateway>,
    /// Counter slot of each (gateway, target), stable across weight changes.
    counter_slots: BTreeMap<(String, Target), u32>,
}

/// Loads the eBPF object (maps created, programs not yet loaded) with maps sized for
/// `limits`; `kernel_log_level` is the highest aya-log level the kernel side emits.
pub fn load_object(object: &[u8], limits: Limits, kernel_log_level: u8) -> Result<Ebpf> {
    aya::EbpfLoader::new()
        .override_global("AYA_LOG_LEVEL", &kernel_log_level, false)
        .map_max_entries("GATEWAYS", limits.max_gateways)
        .map_max_entries("GATEWAY_COUNTERS", limits.max_gateways)
        .map_max_entries("BUCKET_TABLES", 2 * limits.max_gateways)
        .map_max_entries("TARGETS", 2 * limits.max_gateways * MAX_TARGETS_PER_GATEWAY)
        .map_max_entries("CONNTRACK", limits.conntrack_entries)
        .load(object)
        .context("loading the eBPF object")
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf.take_map(name).with_context(|| format!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    pub fn new(maps: Maps, limits: Limits) -> Self {
        Self {
            limits,
            gateways_map: maps.gateways,
            tables: maps.tables,
            targets_map: maps.targets,
            conntrack: maps.conntrack,
            target_counters: maps.target_counters,
            gateway_counters: maps.gateway_counters,
            packet_counters: maps.packet_counters,
            forward_events: maps.forward_events,
            gateways: BTreeMap::new(),
            counter_slots: BTreeMap::new(),
        }
    }

    /// Takes over a gateway that a previous agent left live in pinned maps, without
    /// writing anything, when the maps still hold exactly what `placement` says; returns
    /// false (and changes nothing) otherwise.
    pub fn adopt(&mut self, gateway: &Gateway, shares: &[(Target, u32)], placement: &Placement) -> bool {
        let key = gateway_key(gateway);
        let Ok(state) = self.gateways_map.get(&key, 0) else { return false };
        let targets: Vec<(Target, u32)> = placement
            .targets
            .iter()
            .filter_map(|(t, slot)| t.parse::<Target>().ok().map(|t| (t, *slot)))
            .collect();
        let expected: Vec<Target> = shares.iter().map(|(t, _)| *t).collect();
        if state.gateway_id != placement.id
            || state.generation != placement.generation
            || targets.iter().map(|(t, _)| *t).collect::<Vec<_>>() != expected
            || self.gateways.values().any(|g| g.id == placement.id)
        {
            return false;
        }
        for (t, slot) in &targets {
            self.counter_slots.insert((gateway.name.clone(), *t), *slot);
        }
        self.gateways.insert(
            gateway.name.clone(),
            LiveGateway {
                id: placement.id,
                key,
                generation: placement.generation,
                // Unknown when the last switch was: wait the grace before the next one.
                last_switch: Some(Instant::now()),
                config: gateway.clone(),
                targets,
                shares: shares.to_vec(),
            },
        );
        info!("adopted gateway {} generation {} from the pinned datapath", gateway.name, placement.generation);
        true
    }

    /// Where every gateway lives in the maps.
    pub fn placements(&self) -> BTreeMap<String, Placement> {
        self.gateways
            .iter()
            .map(|(name, g)| {
                let targets = g.targets.iter().map(|(t, slot)| (t.to_string(), *slot)).collect();
                (name.clone(), Placement { id: g.id, generation: g.generation, targets })
            })
            .collect()
    }

    /// Checks that `gateway` can be applied, without changing anything; `batch` are the
    /// gateways being applied together with it.
    pub fn check(&self, gateway: &Gateway, shares: &[(Target, u32)], batch: &[Gateway]) -> Result<()> {
        self.check_fits(gateway, shares.len(), batch)?;
        if gateway.mode == Mode::FullNat {
            for (target, _) in shares {
                source_address_towards(target)?;
            }
        }
        Ok(())
    }

    /// The target count, the VIP:port key and the gateway capacity, against the live
    /// gateways as `batch` will leave them.
    fn check_fits(&self, gateway: &Gateway, count: usize, batch: &[Gateway]) -> Result<()> {
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
        ensure!(
            self.gateways.len() + new_ones <= self.limits.max_gateways as usize,
            "no room for gateway {} (--max-gateways {})",
            gateway.name,
            self.limits.max_gateways
        );
        Ok(())
    }

    /// The shares of a live gateway's targets (parts per million).
    pub fn shares(&self, name: &str) -> Vec<(Target, u32)> {
        self.gateways.get(name).map(|g| g.shares.clone()).unwrap_or_default()
    }

    /// Forgets the established flows of `name`'s `targets` (both conntrack entries): their
    /// next packets are placed again by the live table. Returns how many flows.
    pub fn flush_flows(&mut self, name: &str, targets: &[Target]) -> Result<usize> {
        let live = self.gateways.get(name).with_context(|| format!("no gateway {name}"))?;
        let slots: BTreeSet<u32> =
            live.targets.iter().filter(|(t, _)| targets.contains(t)).map(|(_, slot)| *slot).collect();
        if slots.is_empty() {
            return Ok(0);
        }
        let doomed: Vec<FlowKey> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, entry)| slots.contains(&entry.counter_index))
            .map(|(key, _)| key)
            .collect();
        for key in &doomed {
            let _ = self.conntrack.remove(key);
        }
        Ok(doomed.len() / 2)
    }

    pub fn conntrack_capacity(&self) -> u32 {
        self.limits.conntrack_entries
    }

    /// `shares` are the gateway's targets (all of them, unhealthy ones at 0) with their
    /// share of new flows in parts per million.
    pub fn apply(&mut self, gateway: &Gateway, shares: &[(Target, u32)]) -> Result<u64> {
        let weighted = shares;
        // Against the live gateways only: a map write must never take another's key.
        self.check_fits(gateway, shares.len(), &[])?;
        let key = gateway_key(gateway);
        let id = match self.gateways.get(&gateway.name) {
            Some(live) => live.id,
            None => self.free_gateway_id()?,
        };

        // Counter slots and source addresses before touching any map, so an error
        // leaves the datapath as it was.
        let mut targets = Vec::with_capacity(weighted.len());
        let mut entries = Vec::with_capacity(weighted.len());
        let full_nat = gateway.mode == Mode::FullNat;
        for (target, share) in weighted {
            // A target without share gets no new flow, so it needs no source address: one
            // that became unreachable (and unhealthy) must not keep the others' table from
            // being applied.
            let snat_addr = match (full_nat, *share) {
                (false, _) => Ipv4Addr::UNSPECIFIED,
                (true, 0) => source_address_towards(target).unwrap_or(Ipv4Addr::UNSPECIFIED),
                (true, _) => source_address_towards(target)?,
            };
            targets.push((*target, 0u32));
            entries.push(TargetEntry {
                addr: u32::from_ne_bytes(target.addr.octets()),
                snat_addr: u32::from_ne_bytes(snat_addr.octets()),
                port: target.port.to_be(),
                _pad: 0,
                counter_index: 0,
            });
        }
        for ((target, slot), entry) in targets.iter_mut().zip(entries.iter_mut()) {
            *slot = self.counter_slot(&gateway.name, *target)?;
            entry.counter_index = *slot;
        }
        let table_targets: Vec<TableTarget> =
            weighted.iter().map(|(t, share)| TableTarget { key: t.table_key(), weight: *share }).collect();
        let slots = build_bucket_table(&table_targets);

        let (generation, last_switch) = match self.gateways.get(&gateway.name) {
            Some(live) => (live.generation + 1, live.last_switch),
            None => (1, None),
        };
        if let Some(since) = last_switch.map(|t| t.elapsed()) {
            if since < TABLE_REUSE_GRACE {
                std::thread::sleep(TABLE_REUSE_GRACE - since);
            }
        }
        let table_index = id * 2 + (generation & 1) as u32;
        for (i, entry) in entries.iter().enumerate() {
            self.targets_map
                .set(table_index * MAX_TARGETS_PER_GATEWAY + i as u32, entry, 0)
                .context("writing TARGETS")?;
        }
        let target_count = if slots.is_empty() { 0 } else { entries.len() as u32 };
        if target_count > 0 {
            let mut table = BucketTable { slots: [0; splitter_common::table::BUCKET_TABLE_SIZE], _pad: 0 };
            table.slots.copy_from_slice(&slots);
            self.tables.set(table_index, table, 0).context("writing BUCKET_TABLES")?;
        }
        let mut flags = 0;
        if gateway.mode == Mode::Dnat {
            flags |= GATEWAY_DNAT;
        }
        if gateway.sticky == Sticky::Client {
            flags |= GATEWAY_STICKY_CLIENT;
        }
        let state = GatewayState { gateway_id: id, table_index, target_count, flags, generation };
        // The switch: one update of the gateway's value.
        self.gateways_map.insert(key, state, 0).context("writing GATEWAYS")?;
        if let Some(old) = self.gateways.get(&gateway.name) {
            if old.key != key {
                let _ = self.gateways_map.remove(&old.key);
            }
        }
        if !self.gateways.contains_key(&gateway.name) {
            self.reset_gateway_counters(id)?;
        }
        self.release_counter_slots(&gateway.name, &targets);
        self.gateways.insert(
            gateway.name.clone(),
            LiveGateway {
                id,
                key,
                generation,
                last_switch: Some(Instant::now()),
                config: gateway.clone(),
                targets,
                shares: weighted.to_vec(),
            },
        );
        for (target, _) in weighted {
            prime_neighbour(target);
        }
        info!("applied gateway {} generation {generation}: {}", gateway.name, describe_weights(gateway));
        Ok(generation)
    }

    /// Removes a gateway: new flows to it are passed to the kernel; its established flows
    /// keep their conntrack entries until they end.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let live = self.gateways.remove(name).with_context(|| format!("no gateway {name}"))?;
        self.gateways_map.remove(&live.key).context("removing from GATEWAYS")?;
        self.release_counter_slots(name, &[]);
        info!("removed gateway {name}");
        Ok(())
    }

    fn free_gateway_id(&self) -> Result<u32> {
        let used: BTreeSet<u32> = self.gateways.values().map(|g| g.id).collect();
        (0..self.limits.max_gateways)
            .find(|id| !used.contains(id))
            .with_context(|| format!("no room for another gateway (--max-gateways {})", self.limits.max_gateways))
    }

    /// The counter slot of a gateway's target, allocating (and zeroing) a free one.
    fn counter_slot(&mut self, gateway: &str, target: Target) -> Result<u32> {
        let key = (gateway.to_string(), target);
        if let Some(slot) = self.counter_slots.get(&key) {
            return Ok(*slot);
        }
        let used: BTreeSet<u32> = self.counter_slots.values().copied().collect();
        let slot = (0..MAX_TARGET_COUNTERS)
            .find(|s| !used.contains(s))
            .context("no free per-target counter slot")?;
        let zeros = PerCpuValues::try_from(vec![TargetCounters::default(); nr_cpus().map_err(|(_, e)| e)?])?;
        self.target_counters.set(slot, zeros, 0).context("zeroing TARGET_COUNTERS")?;
        self.counter_slots.insert(key, slot);
        Ok(slot)
    }

    /// Frees the counter slots of `gateway`'s targets that are no longer in `keep`.
    fn release_counter_slots(&mut self, gateway: &str, keep: &[(Target, u32)]) {
        self.counter_slots
            .retain(|(g, t), _| g != gateway || keep.iter().any(|(k, _)| k == t));
    }

    fn reset_gateway_counters(&mut self, id: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![GatewayCounters::default(); nr_cpus().map_err(|(_, e)| e)?])?;
        self.gateway_counters.set(id, zeros, 0).context("zeroing GATEWAY_COUNTERS")?;
        Ok(())
    }

    /// Per-gateway and per-target counters, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<GatewayStats>> {
        let mut out = Vec::new();
        for (name, live) in &self.gateways {
            let g = self.gateway_counters.get(&live.id, 0)?;
            let mut stats = GatewayStats {
                name: name.clone(),
                generation: live.generation,
                new_flows: g.iter().map(|c| c.new_flows).sum(),
                no_target: g.iter().map(|c| c.no_target).sum(),
                conntrack_miss: g.iter().map(|c| c.conntrack_miss).sum(),
                alloc_failed: g.iter().map(|c| c.alloc_failed).sum(),
                targets: Vec::new(),
                ..GatewayStats::default()
            };
            let shares: BTreeMap<Target, u32> = live.shares.iter().copied().collect();
            for route in &live.config.routes {
                for target in &route.targets {
                    let Some((_, slot)) = live.targets.iter().find(|(t, _)| t == target) else { continue };
                    let per_cpu = self.target_counters.get(slot, 0)?;
                    let sum = |f: fn(&TargetCounters) -> u64| per_cpu.iter().map(f).sum::<u64>();
                    stats.targets.push(TargetStats {
                        route: route.name.clone(),
                        target: format!("{}:{}", target.addr, target.port),
                        configured_share: f64::from(shares.get(target).copied().unwrap_or(0))
                            / f64::from(crate::gateway::FULL_SHARE_PPM / 100),
                        new_flows: sum(|c| c.new_flows),
                        packets_to_target: sum(|c| c.packets_to_target),
                        bytes_to_target: sum(|c| c.bytes_to_target),
                        packets_from_target: sum(|c| c.packets_from_target),
                        bytes_from_target: sum(|c| c.bytes_from_target),
                        resets_from_target: sum(|c| c.resets_from_target),
                        connects: sum(|c| c.connects),
                        connect_ns_total: sum(|c| c.connect_ns_total),
                        ..TargetStats::default()
                    });
                }
            }
            out.push(stats);
        }
        Ok(out)
    }

    /// Packets seen per class and forwarding outcomes, summed over CPUs.
    pub fn packet_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::new();
        for class in PacketClass::ALL {
            out.push((class.name(), self.packet_counters.get(&class.0, 0)?.iter().sum()));
        }
        for event in ForwardEvent::ALL {
            out.push((event.name(), self.forward_events.get(&event.0, 0)?.iter().sum()));
        }
        Ok(out)
    }

    /// Conntrack entries in use (each flow has two).
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    /// Forgets flows whose close completed or that sat idle past their timeout.
    pub fn sweep_conntrack(&mut self, timeouts: &Timeouts) -> Result<usize> {
        let now = monotonic_ns();
        // Each expired key with the value it was judged on (None: the peer was missing).
        let mut expired: Vec<(FlowKey, Option<FlowEntry>)> = Vec::new();
        for item in self.conntrack.iter() {
            let Ok((key, entry)) = item else { continue };
            let peer_key = entry.rewritten.reversed();
            let found = self.conntrack.get(&peer_key, 0).ok();
            let peer = found.unwrap_or(entry);
            if flow_expired(&entry, &peer, now, timeouts) {
                expired.push((key, Some(entry)));
                expired.push((peer_key, found));
            }
        }
        expired.sort_unstable_by_key(|(k, _)| bytemuck::bytes_of(k).to_vec());
        expired.dedup_by_key(|(k, _)| *k);
        // The datapath keeps working while we iterate: it may have given an expired key to
        // a new flow since (a closed flow's source port taken over, a client reopening the
        // same 5-tuple). Removing that key would cut the new flow off (its replies would
        // reach no client), so a key is removed only if it still holds the judged value.
        let (mut removed, mut reused) = (0usize, 0usize);
        for (key, judged) in &expired {
            match self.conntrack.get(key, 0) {
                Ok(current) if Some(current) == *judged => {
                    if self.conntrack.remove(key).is_ok() {
                        removed += 1;
                    }
                }
                Ok(_) => reused += 1,
                Err(_) => {}
            }
        }
        if removed > 0 || reused > 0 {
            debug!("conntrack sweep removed {removed} entries, kept {reused} reused by new flows meanwhile");
        }
        Ok(removed)
    }
}

/// Weights for logs: `route=90% route=10%`.
pub fn describe_weights(g: &Gateway) -> String {
    g.routes
        .iter()
        .map(|r| format!("{}={}", r.name, crate::gateway::format_weight(r.weight)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn gateway_key(gateway: &Gateway) -> GatewayKey {
    GatewayKey {
        vip: u32::from_ne_bytes(gateway.virtual_address.octets()),
        port: gateway.port.to_be(),
        proto: match gateway.protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        },
        _pad: 0,
    }
}

/// The address this node uses as source towards `target` (what the kernel's routing
/// picks), used as the full-NAT source so replies come back here.
fn source_address_towards(target: &Target) -> Result<Ipv4Addr> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket
        .connect(SocketAddr::from((target.addr, target.port)))
        .with_context(|| format!("no route to target {}:{}", target.addr, target.port))?;
    match socket.local_addr()? {
        SocketAddr::V4(a) => Ok(*a.ip()),
        SocketAddr::V6(_) => bail!("target {}: IPv6 source address", target.addr),
    }
}

/// Makes the kernel resolve the target's next hop now, so the XDP fast path finds the
/// neighbour entry for the first flows (one empty datagram to the discard port).
fn prime_neighbour(target: &Target) {
    let sent = UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(&[], (target.addr, 9)));
    if let Err(e) = sent {
        warn!("cannot prime the neighbour entry of {}: {e}", target.addr);
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
