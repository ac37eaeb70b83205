//! The kernel datapath's maps: owns every map handle, turns gateways into tables,
//! switches tables atomically, reads counters and sweeps conntrack.
//!
//! One thread (the controller's) owns the [`Datapath`], so map writes never interleave.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, IterableMap, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
    Ebpf,
};
use log::{debug, info, warn};
use splitter_common::{
    conntrack::{flow_expired, Timeouts},
    map_names,
    maps::{
        ipv6_words, port_choice_entries, Address, AddressFilter, BucketTable, DatapathInfo, DnatReply, DnatReply6, DsrSource, FlowEntry,
        FlowEntry6, FlowEntryOf, FlowKey, FlowKey6, FlowKeyOf, GatewayCounters, GatewayKey, GatewayKey6, GatewayState, SourcePool,
        TargetCounters, TargetEntry, TargetEntry6, TargetOutcomes, FLOW_FIN_SEEN, FLOW_TO_TARGET, GATEWAY_DNAT, GATEWAY_DSR, GATEWAY_HTTP,
        GATEWAY_STICKY_CLIENT, MAX_TARGETS_PER_GATEWAY, PROTO_TCP,
    },
    FlowEvent, ForwardEvent, PacketClass,
};

use super::{
    describe_weights,
    layout::{gateway_key, target_fold, Layout, LiveGateway, LiveKey},
    Dataplane, Limits, Placement,
};
use crate::{
    api::{GatewayStats, TargetStats},
    gateway::{Gateway, Mode, Sticky, Target},
};

/// Minimum time between two table switches of one gateway. The buffer a switch writes
/// was live two switches ago; an XDP program that read the old gateway state finishes
/// within microseconds, so this wait guarantees nobody still reads the buffer.
const TABLE_REUSE_GRACE: Duration = Duration::from_millis(10);

/// The datapath's maps, from a freshly loaded object or from pins.
pub struct Maps {
    pub gateways: HashMap<MapData, GatewayKey, GatewayState>,
    pub tables: Array<MapData, BucketTable>,
    pub targets: Array<MapData, TargetEntry>,
    pub conntrack: HashMap<MapData, FlowKey, FlowEntry>,
    pub half_open: HashMap<MapData, FlowKey, FlowEntry>,
    pub target_counters: PerCpuArray<MapData, TargetCounters>,
    pub gateway_counters: PerCpuArray<MapData, GatewayCounters>,
    pub packet_counters: PerCpuArray<MapData, u64>,
    pub forward_events: PerCpuArray<MapData, u64>,
    pub flow_events: PerCpuArray<MapData, u64>,
    pub target_outcomes: PerCpuArray<MapData, TargetOutcomes>,
    pub source_pools: Array<MapData, SourcePool>,
    pub dsr_sources: Array<MapData, DsrSource>,
    pub dnat_replies: HashMap<MapData, GatewayKey, DnatReply>,
    pub dnat_replies6: HashMap<MapData, GatewayKey6, DnatReply6>,
    pub datapath_info: Array<MapData, DatapathInfo>,
    pub address_filter: Array<MapData, AddressFilter>,
    pub gateways6: HashMap<MapData, GatewayKey6, GatewayState>,
    pub targets6: Array<MapData, TargetEntry6>,
    pub conntrack6: HashMap<MapData, FlowKey6, FlowEntry6>,
    pub half_open6: HashMap<MapData, FlowKey6, FlowEntry6>,
}

impl Maps {
    /// Takes the datapath maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            gateways: take(ebpf, map_names::GATEWAYS)?,
            tables: take(ebpf, map_names::BUCKET_TABLES)?,
            targets: take(ebpf, map_names::TARGETS)?,
            conntrack: take(ebpf, map_names::CONNTRACK)?,
            half_open: take(ebpf, map_names::HALF_OPEN)?,
            target_counters: take(ebpf, map_names::TARGET_COUNTERS)?,
            gateway_counters: take(ebpf, map_names::GATEWAY_COUNTERS)?,
            packet_counters: take(ebpf, map_names::PACKET_COUNTERS)?,
            forward_events: take(ebpf, map_names::FORWARD_EVENTS)?,
            flow_events: take(ebpf, map_names::FLOW_EVENTS)?,
            target_outcomes: take(ebpf, map_names::TARGET_OUTCOMES)?,
            source_pools: take(ebpf, map_names::SOURCE_POOLS)?,
            dsr_sources: take(ebpf, map_names::DSR_SOURCES)?,
            dnat_replies: take(ebpf, map_names::DNAT_REPLIES)?,
            dnat_replies6: take(ebpf, map_names::DNAT_REPLIES6)?,
            datapath_info: take(ebpf, map_names::DATAPATH_INFO)?,
            address_filter: take(ebpf, map_names::ADDRESS_FILTER)?,
            gateways6: take(ebpf, map_names::GATEWAYS6)?,
            targets6: take(ebpf, map_names::TARGETS6)?,
            conntrack6: take(ebpf, map_names::CONNTRACK6)?,
            half_open6: take(ebpf, map_names::HALF_OPEN6)?,
        })
    }

    /// Records what runs, for the next agent.
    pub fn record_datapath(&mut self, info: DatapathInfo) -> Result<()> {
        self.datapath_info.set(0, info, 0).context("writing DATAPATH_INFO")
    }
}

pub struct Datapath {
    gateways_map: HashMap<MapData, GatewayKey, GatewayState>,
    tables: Array<MapData, BucketTable>,
    targets_map: Array<MapData, TargetEntry>,
    conntrack: HashMap<MapData, FlowKey, FlowEntry>,
    half_open: HashMap<MapData, FlowKey, FlowEntry>,
    target_counters: PerCpuArray<MapData, TargetCounters>,
    gateway_counters: PerCpuArray<MapData, GatewayCounters>,
    packet_counters: PerCpuArray<MapData, u64>,
    forward_events: PerCpuArray<MapData, u64>,
    flow_events: PerCpuArray<MapData, u64>,
    target_outcomes: PerCpuArray<MapData, TargetOutcomes>,
    source_pools: Array<MapData, SourcePool>,
    dsr_sources: Array<MapData, DsrSource>,
    dnat_replies: HashMap<MapData, GatewayKey, DnatReply>,
    dnat_replies6: HashMap<MapData, GatewayKey6, DnatReply6>,
    address_filter: Array<MapData, AddressFilter>,
    gateways6: HashMap<MapData, GatewayKey6, GatewayState>,
    targets6: Array<MapData, TargetEntry6>,
    conntrack6: HashMap<MapData, FlowKey6, FlowEntry6>,
    half_open6: HashMap<MapData, FlowKey6, FlowEntry6>,
    /// What `address_filter` holds (written only when it changes).
    filter: Box<AddressFilter>,
    layout: Layout,
}

/// Loads the eBPF object (maps created, programs not yet loaded) with maps sized for
/// `limits`; `kernel_log_level` is the highest aya-log level the kernel side emits. With
/// `pins`, every datapath map is the one pinned there if there is one (a running
/// datapath's, whatever the sizes asked), else created and pinned there.
pub fn load_object(object: &[u8], limits: Limits, kernel_log_level: u8, pins: Option<&crate::pin::Pins>) -> Result<Ebpf> {
    let mut loader = aya::EbpfLoader::new();
    loader
        .override_global("AYA_LOG_LEVEL", &kernel_log_level, false)
        .override_global("HALF_OPEN_TIMEOUT_NS", &limits.half_open_timeout_ns, false)
        .override_global("CONNECT_TIMEOUT_NS", &limits.connect_timeout_ns, false)
        .map_max_entries(map_names::GATEWAYS, limits.max_gateways)
        .map_max_entries(map_names::GATEWAY_COUNTERS, limits.max_gateways)
        .map_max_entries(map_names::SOURCE_POOLS, limits.max_gateways)
        .map_max_entries(map_names::DSR_SOURCES, limits.max_gateways)
        .map_max_entries(map_names::BUCKET_TABLES, 2 * limits.max_gateways)
        .map_max_entries(map_names::TARGETS, 2 * limits.max_gateways * MAX_TARGETS_PER_GATEWAY)
        .map_max_entries(map_names::CONNTRACK, limits.conntrack_entries)
        .map_max_entries(map_names::HALF_OPEN, limits.half_open_entries)
        .map_max_entries(map_names::GATEWAYS6, limits.max_gateways)
        .map_max_entries(map_names::DSR_SOURCES6, limits.max_gateways)
        .map_max_entries(map_names::TARGETS6, 2 * limits.max_gateways * MAX_TARGETS_PER_GATEWAY)
        .map_max_entries(map_names::CONNTRACK6, limits.conntrack_entries)
        .map_max_entries(map_names::HALF_OPEN6, limits.half_open_entries)
        .map_max_entries(map_names::PORT_CHOICES, port_choice_entries(limits.conntrack_entries))
        .map_max_entries(map_names::PORT_CHOICES6, port_choice_entries(limits.conntrack_entries));
    if let Some(pins) = pins {
        for name in map_names::PINNED {
            loader.map_pin_path(name, pins.map(name));
        }
    }
    loader.load(object).context("loading the eBPF object")
}

/// Makes `map` hold exactly `wanted`: keys not in it are removed, values that differ
/// written.
fn sync_hash_map<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    wanted: Vec<(K, V)>,
    name: &str,
) -> Result<()> {
    let keys: std::collections::HashSet<K> = wanted.iter().map(|(key, _)| *key).collect();
    let stale: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| !keys.contains(k)).collect();
    for key in stale {
        let _ = map.remove(&key);
    }
    for (key, value) in wanted {
        if map.get(&key, 0).ok() != Some(value) {
            map.insert(key, value, 0).with_context(|| format!("writing {name}"))?;
        }
    }
    Ok(())
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &str) -> Result<T> {
    let map = ebpf.take_map(name).with_context(|| format!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    pub fn new(maps: Maps, limits: Limits) -> Self {
        Self {
            gateways_map: maps.gateways,
            tables: maps.tables,
            targets_map: maps.targets,
            conntrack: maps.conntrack,
            half_open: maps.half_open,
            target_counters: maps.target_counters,
            gateway_counters: maps.gateway_counters,
            packet_counters: maps.packet_counters,
            forward_events: maps.forward_events,
            flow_events: maps.flow_events,
            target_outcomes: maps.target_outcomes,
            // A pinned filter goes on as it was; a new one is zeroed: it filters nothing
            // until the first sweep.
            filter: Box::new(maps.address_filter.get(&0, 0).unwrap_or_else(|_| bytemuck::Zeroable::zeroed())),
            address_filter: maps.address_filter,
            source_pools: maps.source_pools,
            dsr_sources: maps.dsr_sources,
            dnat_replies: maps.dnat_replies,
            dnat_replies6: maps.dnat_replies6,
            gateways6: maps.gateways6,
            targets6: maps.targets6,
            conntrack6: maps.conntrack6,
            half_open6: maps.half_open6,
            layout: Layout::new(limits),
        }
    }

    /// Writes the address filter if `next` differs from what it holds.
    fn write_filter(&mut self, next: AddressFilter) -> Result<()> {
        if next != *self.filter {
            self.address_filter.set(0, next, 0).context("writing ADDRESS_FILTER")?;
            *self.filter = next;
        }
        Ok(())
    }

    /// The addresses of the live gateways: packets to a VIP or from a target.
    fn live_addresses(&self) -> Vec<u32> {
        self.layout
            .gateways
            .values()
            .flat_map(|live| std::iter::once(live.key.vip_fold()).chain(live.targets.iter().map(|(t, _)| target_fold(t))))
            .collect()
    }

    /// The state `GATEWAYS` (or `GATEWAYS6`) holds for `key`.
    fn gateway_state(&self, key: &LiveKey) -> Option<GatewayState> {
        match key {
            LiveKey::V4(key) => self.gateways_map.get(key, 0).ok(),
            LiveKey::V6(key) => self.gateways6.get(key, 0).ok(),
        }
    }

    /// The switch of a gateway: one update of its value in its family's map.
    fn write_gateway_state(&mut self, key: &LiveKey, state: GatewayState) -> Result<()> {
        match key {
            LiveKey::V4(key) => self.gateways_map.insert(key, state, 0).context("writing GATEWAYS"),
            LiveKey::V6(key) => self.gateways6.insert(key, state, 0).context("writing GATEWAYS6"),
        }
    }

    fn remove_gateway_state(&mut self, key: &LiveKey) -> Result<()> {
        match key {
            LiveKey::V4(key) => self.gateways_map.remove(key).context("removing from GATEWAYS"),
            LiveKey::V6(key) => self.gateways6.remove(key).context("removing from GATEWAYS6"),
        }
    }

    /// Brings `DNAT_REPLIES` and `DNAT_REPLIES6` in line with the live gateways (entries
    /// of gateways and targets gone are removed, also those an earlier agent left).
    fn write_dnat_replies(&mut self) -> Result<()> {
        let replies = super::layout::dnat_replies(self.layout.gateways.values());
        for target in &replies.shared {
            warn!(
                "target {target} belongs to more than one dnat gateway: its answers are translated only by the node that saw \
                 the flow start (through ECMP, a flow moved to another node loses its answers)"
            );
        }
        sync_hash_map(&mut self.dnat_replies, replies.v4, map_names::DNAT_REPLIES)?;
        sync_hash_map(&mut self.dnat_replies6, replies.v6, map_names::DNAT_REPLIES6)
    }

    fn zero_target_counters(&mut self, slot: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        self.target_counters
            .set(slot, PerCpuValues::try_from(vec![TargetCounters::default(); cpus])?, 0)
            .context("zeroing TARGET_COUNTERS")?;
        self.target_outcomes.set(slot, PerCpuValues::try_from(vec![TargetOutcomes::default(); cpus])?, 0).context("zeroing TARGET_OUTCOMES")
    }

    fn reset_gateway_counters(&mut self, id: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![GatewayCounters::default(); nr_cpus().map_err(|(_, e)| e)?])?;
        self.gateway_counters.set(id, zeros, 0).context("zeroing GATEWAY_COUNTERS")?;
        Ok(())
    }
}

impl Dataplane for Datapath {
    fn adopt(&mut self, gateway: &Gateway, shares: &[(Target, u32)], placement: &Placement) -> bool {
        let key = gateway_key(gateway);
        // A pinned state with another connect timeout is not adopted: applying it anew writes it.
        let live = self
            .gateway_state(&key)
            .filter(|state| state.connect_timeout_ms == gateway.connect_timeout_ms.unwrap_or(0))
            .map(|state| (state.gateway_id, u64::from(state.generation)));
        let Some(targets) = self.layout.adoptable(shares, placement, live) else { return false };
        // The pinned filter may come from another build (an older agent leaves it alone):
        // the adopted gateway's buckets pass before anything else.
        let mut filter = *self.filter;
        filter.keep_all(std::iter::once(key.vip_fold()).chain(targets.iter().map(|(t, _)| target_fold(t))));
        if let Err(e) = self.write_filter(filter) {
            warn!("gateway {} not adopted: {e:#}", gateway.name);
            return false;
        }
        self.layout.record(LiveGateway {
            id: placement.id,
            key,
            generation: placement.generation,
            // Unknown when the last switch was: wait the grace before the next one.
            last_switch: Some(Instant::now()),
            config: gateway.clone(),
            targets,
            shares: shares.to_vec(),
            fingerprint: super::layout::table_of(shares).1,
        });
        // A datapath pinned before the map existed has it empty.
        if let Err(e) = self.write_dnat_replies() {
            warn!("gateway {}: {e:#}", gateway.name);
        }
        info!("adopted gateway {} generation {} from the pinned datapath", gateway.name, placement.generation);
        true
    }

    fn placements(&self) -> std::collections::BTreeMap<String, Placement> {
        self.layout.placements()
    }

    fn check(&self, gateway: &Gateway, shares: &[(Target, u32)], batch: &[Gateway]) -> Result<()> {
        self.layout.check_fits(gateway, shares.len(), batch)?;
        if needs_node_source(gateway) {
            for (target, _) in shares {
                source_address_towards(target)?;
            }
        }
        Ok(())
    }

    fn shares(&self, name: &str) -> Vec<(Target, u32)> {
        self.layout.shares(name)
    }

    fn flush_flows(&mut self, name: &str, targets: &[Target]) -> Result<usize> {
        let live = self.layout.gateways.get(name).with_context(|| format!("no gateway {name}"))?;
        let slots: BTreeSet<u32> = live.targets.iter().filter(|(t, _)| targets.contains(t)).map(|(_, slot)| *slot).collect();
        if slots.is_empty() {
            return Ok(0);
        }
        Ok(flush_slots(&mut self.conntrack, &slots) + flush_slots(&mut self.conntrack6, &slots))
    }

    fn conntrack_capacity(&self) -> u32 {
        self.layout.limits.conntrack_entries
    }

    fn apply(&mut self, gateway: &Gateway, shares: &[(Target, u32)]) -> Result<u64> {
        // Against the live gateways only: a map write must never take another's key.
        self.layout.check_fits(gateway, shares.len(), &[])?;
        let key = gateway_key(gateway);
        let id = self.layout.id_for(&gateway.name)?;

        // Counter slots and source addresses before touching any map, so an error
        // leaves the datapath as it was.
        let targets_only: Vec<Target> = shares.iter().map(|(t, _)| *t).collect();
        let slots = self.layout.counter_slots_for(&gateway.name, &targets_only)?;
        let full_nat = needs_node_source(gateway);
        let unspecified = if key_is_v6(&key) { IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED) } else { IpAddr::from(Ipv4Addr::UNSPECIFIED) };
        let mut targets = Vec::with_capacity(shares.len());
        let mut entries = Vec::with_capacity(shares.len());
        for ((target, share), (slot, _)) in shares.iter().zip(&slots) {
            // A target without share gets no new flow, so it needs no source address: one
            // that became unreachable (and unhealthy) must not keep the others' table from
            // being applied.
            let snat_addr = match (full_nat, *share) {
                (false, _) => unspecified,
                (true, 0) => source_address_towards(target).unwrap_or(unspecified),
                (true, _) => source_address_towards(target)?,
            };
            targets.push((*target, *slot));
            entries.push(TargetSlot::new(target, snat_addr, *slot)?);
        }
        for (slot, new) in &slots {
            if *new {
                self.zero_target_counters(*slot)?;
            }
        }
        let (table_slots, fingerprint) = super::layout::table_of(shares);

        let (generation, last_switch) = match self.layout.gateways.get(&gateway.name) {
            Some(live) => (live.generation + 1, live.last_switch),
            None => (1, None),
        };
        if let Some(since) = last_switch.map(|t| t.elapsed()) {
            if since < TABLE_REUSE_GRACE {
                std::thread::sleep(TABLE_REUSE_GRACE - since);
            }
        }
        // The gateway's buckets pass the filter before anything can send a flow its way.
        let mut filter = *self.filter;
        filter.keep_all(std::iter::once(key.vip_fold()).chain(targets.iter().map(|(t, _)| target_fold(t))));
        self.write_filter(filter)?;
        let table_index = id * 2 + (generation & 1) as u32;
        for (i, entry) in entries.iter().enumerate() {
            let index = table_index * MAX_TARGETS_PER_GATEWAY + i as u32;
            match entry {
                TargetSlot::V4(entry) => self.targets_map.set(index, entry, 0).context("writing TARGETS")?,
                TargetSlot::V6(entry) => self.targets6.set(index, entry, 0).context("writing TARGETS6")?,
            }
        }
        let target_count = if table_slots.is_empty() { 0 } else { entries.len() as u32 };
        if target_count > 0 {
            let mut table = BucketTable { slots: [0; splitter_common::table::BUCKET_TABLE_SIZE], _pad: 0 };
            table.slots.copy_from_slice(&table_slots);
            self.tables.set(table_index, table, 0).context("writing BUCKET_TABLES")?;
        }
        let mut flags = 0;
        match gateway.mode {
            Mode::FullNat => {}
            Mode::Dnat => flags |= GATEWAY_DNAT,
            Mode::Dsr => flags |= GATEWAY_DSR,
        }
        if gateway.sticky == Sticky::Client {
            flags |= GATEWAY_STICKY_CLIENT;
        }
        if gateway.protocol == crate::gateway::Protocol::Http {
            flags |= GATEWAY_HTTP;
        }
        // The gateway's source pool before its state can name a table that uses it.
        self.source_pools.set(id, source_pool(gateway), 0).context("writing SOURCE_POOLS")?;
        self.dsr_sources.set(id, dsr_source(gateway), 0).context("writing DSR_SOURCES")?;
        // The generation is informational in the map: its low 32 bits.
        let state = GatewayState {
            gateway_id: id,
            table_index,
            target_count,
            flags,
            generation: generation as u32,
            connect_timeout_ms: gateway.connect_timeout_ms.unwrap_or(0),
        };
        // The switch: one update of the gateway's value.
        self.write_gateway_state(&key, state)?;
        let previous = self.layout.gateways.get(&gateway.name).map(|old| old.key);
        if let Some(old_key) = previous {
            if old_key != key {
                let _ = self.remove_gateway_state(&old_key);
            }
        } else {
            self.reset_gateway_counters(id)?;
        }
        self.layout.record(LiveGateway {
            id,
            key,
            generation,
            last_switch: Some(Instant::now()),
            config: gateway.clone(),
            targets,
            shares: shares.to_vec(),
            fingerprint,
        });
        self.write_dnat_replies()?;
        for (target, _) in shares {
            prime_neighbour(target);
        }
        info!("applied gateway {} generation {generation}: {}", gateway.name, describe_weights(gateway));
        Ok(generation)
    }

    fn remove(&mut self, name: &str) -> Result<()> {
        let key = self.layout.gateways.get(name).map(|g| g.key).with_context(|| format!("no gateway {name}"))?;
        self.remove_gateway_state(&key)?;
        self.layout.forget(name);
        self.write_dnat_replies()?;
        info!("removed gateway {name}");
        Ok(())
    }

    fn stats(&self) -> Result<Vec<GatewayStats>> {
        let mut out = Vec::new();
        for (name, live) in &self.layout.gateways {
            let g = self.gateway_counters.get(&live.id, 0)?;
            let mut stats = GatewayStats {
                name: name.clone(),
                generation: live.generation,
                table_fingerprint: super::layout::describe_fingerprint(live.fingerprint),
                new_flows: g.iter().map(|c| c.new_flows).sum(),
                no_target: g.iter().map(|c| c.no_target).sum(),
                conntrack_miss: g.iter().map(|c| c.conntrack_miss).sum(),
                alloc_failed: g.iter().map(|c| c.alloc_failed).sum(),
                targets: Vec::new(),
                ..GatewayStats::default()
            };
            for (route, target, share) in live.routed_targets() {
                let Some((_, slot)) = live.targets.iter().find(|(t, _)| *t == target) else { continue };
                let per_cpu = self.target_counters.get(slot, 0)?;
                let sum = |f: fn(&TargetCounters) -> u64| per_cpu.iter().map(f).sum::<u64>();
                let outcomes = self.target_outcomes.get(slot, 0)?;
                let mut http = [0u64; 5];
                for o in outcomes.iter() {
                    for (total, n) in http.iter_mut().zip(o.http) {
                        *total += n;
                    }
                }
                stats.targets.push(TargetStats {
                    route,
                    target: target.to_string(),
                    configured_share: share,
                    new_flows: sum(|c| c.new_flows),
                    packets_to_target: sum(|c| c.packets_to_target),
                    bytes_to_target: sum(|c| c.bytes_to_target),
                    packets_from_target: sum(|c| c.packets_from_target),
                    bytes_from_target: sum(|c| c.bytes_from_target),
                    resets_from_target: sum(|c| c.resets_from_target),
                    connects: sum(|c| c.connects),
                    connect_ns_total: sum(|c| c.connect_ns_total),
                    failed_connects: outcomes.iter().map(|o| o.failed_connects).sum(),
                    http_responses: http,
                    ..TargetStats::default()
                });
            }
            out.push(stats);
        }
        Ok(out)
    }

    fn packet_counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::new();
        for class in PacketClass::ALL {
            out.push((class.name(), self.packet_counters.get(&class.0, 0)?.iter().sum()));
        }
        for event in ForwardEvent::ALL {
            // A datapath adopted from an older agent may have fewer events: those count 0.
            let count = match self.forward_events.get(&event.0, 0) {
                Ok(per_cpu) => per_cpu.iter().sum(),
                Err(_) if event.0 >= self.forward_events.len() => 0,
                Err(e) => return Err(e.into()),
            };
            out.push((event.name(), count));
        }

        Ok(out)
    }

    fn conntrack_entries(&self) -> usize {
        super::batch::count::<FlowKey, FlowEntry>(self.conntrack.map().fd().as_fd()).unwrap_or(0)
            + super::batch::count::<FlowKey6, FlowEntry6>(self.conntrack6.map().fd().as_fd()).unwrap_or(0)
    }

    fn half_open_entries(&self) -> usize {
        super::batch::count::<FlowKey, FlowEntry>(self.half_open.map().fd().as_fd()).unwrap_or(0)
            + super::batch::count::<FlowKey6, FlowEntry6>(self.half_open6.map().fd().as_fd()).unwrap_or(0)
    }

    fn half_open_capacity(&self) -> u32 {
        self.layout.limits.half_open_entries
    }

    fn flow_events(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut out = Vec::new();
        for event in FlowEvent::ALL {
            out.push((event.name(), self.flow_events.get(&event.0, 0)?.iter().sum()));
        }
        Ok(out)
    }

    /// Forgets flows whose close completed or that sat idle past their timeout.
    fn sweep_conntrack(&mut self, timeouts: &Timeouts) -> Result<usize> {
        let now = monotonic_ns();
        // The address filter from what is live: every gateway's addresses and those of
        // every flow still in conntrack (a deleted gateway's, a removed target's).
        let mut filter = AddressFilter::ALL_FOREIGN;
        let candidates = expiry_candidates(&self.conntrack, &self.half_open, &mut filter).context("reading CONNTRACK")?;
        let candidates6 = expiry_candidates(&self.conntrack6, &self.half_open6, &mut filter).context("reading CONNTRACK6")?;
        filter.keep_all(self.live_addresses());
        self.write_filter(filter)?;
        Ok(expire(&mut self.conntrack, &candidates, now, timeouts) + expire(&mut self.conntrack6, &candidates6, now, timeouts))
    }
}

/// A target's entry in its family's `TARGETS` map.
enum TargetSlot {
    V4(TargetEntry),
    V6(TargetEntry6),
}

impl TargetSlot {
    fn new(target: &Target, snat_addr: IpAddr, counter_index: u32) -> Result<Self> {
        let port = target.port.to_be();
        Ok(match (target.addr, snat_addr) {
            (IpAddr::V4(addr), IpAddr::V4(snat)) => Self::V4(TargetEntry {
                addr: u32::from_ne_bytes(addr.octets()),
                snat_addr: u32::from_ne_bytes(snat.octets()),
                port,
                _pad: 0,
                counter_index,
            }),
            (IpAddr::V6(addr), IpAddr::V6(snat)) => Self::V6(TargetEntry6 {
                addr: ipv6_words(addr.octets()),
                snat_addr: ipv6_words(snat.octets()),
                port,
                _pad: 0,
                counter_index,
            }),
            (_, snat) => anyhow::bail!("target {target}: the node's source address towards it, {snat}, is of another family"),
        })
    }
}

fn key_is_v6(key: &LiveKey) -> bool {
    matches!(key, LiveKey::V6(_))
}

/// Removes the flows of the counter slots `slots` from `conntrack`; returns how many flows
/// that was (a flow's client entry counts it: a DSR flow has no other).
fn flush_slots<A: Address>(conntrack: &mut HashMap<MapData, FlowKeyOf<A>, FlowEntryOf<A>>, slots: &BTreeSet<u32>) -> usize
where
    FlowKeyOf<A>: aya::Pod + bytemuck::Pod,
    FlowEntryOf<A>: aya::Pod + bytemuck::Pod,
{
    let doomed: Vec<(FlowKeyOf<A>, FlowEntryOf<A>)> =
        conntrack.iter().filter_map(Result::ok).filter(|(_, entry)| slots.contains(&entry.counter_index)).collect();
    for (key, _) in &doomed {
        let _ = conntrack.remove(key);
    }
    doomed.iter().filter(|(_, entry)| entry.flags & FLOW_TO_TARGET != 0).count()
}

/// The entries of `conntrack` that can expire, with every flow's addresses (and those of
/// `half_open`'s handshakes in progress) kept in `filter`. The whole table in a few system
/// calls. Only entries that can expire are kept: a TCP flow expires after a FIN (so one of
/// its entries carries FIN_SEEN, and that entry finds the other), a UDP flow when idle.
/// Established flows, however many, cost nothing beyond the copy, one batch at a time.
fn expiry_candidates<A: Address>(
    conntrack: &HashMap<MapData, FlowKeyOf<A>, FlowEntryOf<A>>,
    half_open: &HashMap<MapData, FlowKeyOf<A>, FlowEntryOf<A>>,
    filter: &mut AddressFilter,
) -> Result<std::collections::HashMap<FlowKeyOf<A>, FlowEntryOf<A>>>
where
    FlowKeyOf<A>: aya::Pod + bytemuck::Pod,
    FlowEntryOf<A>: aya::Pod + bytemuck::Pod,
{
    let mut candidates = std::collections::HashMap::new();
    super::batch::for_each::<FlowKeyOf<A>, FlowEntryOf<A>>(conntrack.map().fd().as_fd(), |k, e| {
        filter.keep_flow(k, e);
        if e.rewritten.proto != PROTO_TCP || e.flags & FLOW_FIN_SEEN != 0 {
            candidates.insert(*k, *e);
        }
    })?;
    // Handshakes in progress, a deleted gateway's or a removed target's among them.
    super::batch::for_each::<FlowKeyOf<A>, FlowEntryOf<A>>(half_open.map().fd().as_fd(), |k, e| filter.keep_flow(k, e))
        .context("reading the half-open flows")?;
    Ok(candidates)
}

/// Removes the expired flows among `candidates` from `conntrack`; returns how many entries.
fn expire<A: Address>(
    conntrack: &mut HashMap<MapData, FlowKeyOf<A>, FlowEntryOf<A>>,
    candidates: &std::collections::HashMap<FlowKeyOf<A>, FlowEntryOf<A>>,
    now: u64,
    timeouts: &Timeouts,
) -> usize
where
    FlowKeyOf<A>: aya::Pod + bytemuck::Pod,
    FlowEntryOf<A>: aya::Pod + bytemuck::Pod,
{
    // Each expired key with the value it was judged on (None: the peer was missing).
    let mut expired: Vec<(FlowKeyOf<A>, Option<FlowEntryOf<A>>)> = Vec::new();
    for (key, entry) in candidates {
        let peer_key = entry.rewritten.reversed();
        let found = match candidates.get(&peer_key) {
            Some(peer) => Some(*peer),
            // The peer has no FIN (a half-closed flow): read it.
            None => conntrack.get(&peer_key, 0).ok(),
        };
        let peer = found.unwrap_or(*entry);
        if flow_expired(entry, &peer, now, timeouts) {
            expired.push((*key, Some(*entry)));
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
        match conntrack.get(key, 0) {
            Ok(current) if Some(current) == *judged => {
                if conntrack.remove(key).is_ok() {
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
    removed
}

/// A gateway's full-NAT source addresses and ports as the program reads them.
fn source_pool(gateway: &Gateway) -> SourcePool {
    let mut pool = SourcePool::default();
    for (slot, addr) in pool.addrs.iter_mut().zip(&gateway.source.addresses) {
        *slot = u32::from_ne_bytes(addr.octets());
    }
    pool.count = gateway.source.addresses.len().min(pool.addrs.len()) as u32;
    if let Some((first, last)) = gateway.source.ports {
        pool.port_min = first;
        // At most 65535 - first + 1 ports, which fits unless the range is 0-65535 (refused:
        // ranges start at 1024).
        pool.port_count = (u32::from(last) - u32::from(first) + 1).min(u32::from(u16::MAX)) as u16;
    }
    pool
}

/// Whether the gateway's packets leave with the node's own address towards each target
/// as their source: full NAT's rewritten packets, and DSR's outer headers unless a prefix
/// gives them theirs.
fn needs_node_source(gateway: &Gateway) -> bool {
    match gateway.mode {
        Mode::FullNat => true,
        Mode::Dnat => false,
        Mode::Dsr => gateway.source.prefix.is_none(),
    }
}

/// A DSR gateway's outer source prefix as the program reads it (all zero: none).
fn dsr_source(gateway: &Gateway) -> DsrSource {
    match (gateway.mode, gateway.source.prefix) {
        (Mode::Dsr, Some((addr, len))) => {
            let host_mask = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            DsrSource { prefix: u32::from_ne_bytes(addr.octets()), host_mask: host_mask.to_be() }
        }
        _ => DsrSource::default(),
    }
}

/// The address this node uses as source towards `target` (what the kernel's routing
/// picks), used as the full-NAT source so replies come back here.
fn source_address_towards(target: &Target) -> Result<IpAddr> {
    crate::system::source_towards(target.addr).with_context(|| format!("no route to target {target}"))
}

/// Makes the kernel resolve the target's next hop now, so the XDP fast path finds the
/// neighbour entry for the first flows (one empty datagram to the discard port).
fn prime_neighbour(target: &Target) {
    let any = if target.addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sent = UdpSocket::bind(any).and_then(|s| s.send_to(&[], (target.addr, 9)));
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
