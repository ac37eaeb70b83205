//! The splitter's XDP program.
//!
//! A packet to a gateway's VIP:port starts a flow: its 5-tuple (or client address, for
//! sticky gateways) hashes into the gateway's live bucket table, which names a target;
//! conntrack then remembers the flow's translation in both directions, so the flow keeps
//! its target whatever the weights do later. Translated packets go out through the
//! kernel's FIB (`XDP_TX` or redirect). Everything else, and anything that does not parse,
//! is passed to the kernel untouched.
#![no_std]

use core::mem;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_ANY, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST},
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
    EbpfContext,
};
#[cfg(feature = "log")]
use aya_log_ebpf::debug;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use splitter_common::{
    conntrack::{tcp_verdict, TcpVerdict, TCP_ACK, TCP_SYN},
    csum::CsumDelta,
    flow::{bucket_slot, client_hash, flow_hash, snat_port, SNAT_PORT_TRIES},
    maps::{
        BucketTable, FlowEntry, FlowKey, GatewayCounters, GatewayKey, GatewayState, TargetCounters, TargetEntry,
        DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_GATEWAYS, FLOW_FROM_TARGET, FLOW_TO_TARGET, GATEWAY_DNAT,
        GATEWAY_STICKY_CLIENT, MAX_TARGETS_PER_GATEWAY, MAX_TARGET_COUNTERS, PROTO_TCP,
    },
    ForwardEvent, PacketClass,
};

/// Packets seen, per CPU, indexed by [`PacketClass`].
/// Written by: this program. Read by: the agent (stats, metrics, tests).
#[map]
static PACKET_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PacketClass::COUNT, 0);

/// What happened to translated packets, per CPU, indexed by [`ForwardEvent`].
/// Written by: this program. Read by: the agent.
#[map]
static FORWARD_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ForwardEvent::COUNT, 0);

/// Gateways by VIP, port and protocol, each naming its live table.
/// Written by: the agent (whole value, after the table it names is complete). Read by: this program.
#[map]
static GATEWAYS: HashMap<GatewayKey, GatewayState> = HashMap::with_max_entries(DEFAULT_MAX_GATEWAYS, 0);

/// Bucket tables, two per gateway (live and next), indexed by `GatewayState.table_index`.
/// Written by: the agent (only the table no gateway names). Read by: this program.
#[map]
static BUCKET_TABLES: Array<BucketTable> = Array::with_max_entries(2 * DEFAULT_MAX_GATEWAYS, 0);

/// Targets of each table, at `table_index * MAX_TARGETS_PER_GATEWAY + slot value`.
/// Written by: the agent (with their table). Read by: this program.
#[map]
static TARGETS: Array<TargetEntry> = Array::with_max_entries(2 * DEFAULT_MAX_GATEWAYS * MAX_TARGETS_PER_GATEWAY, 0);

/// Connection tracking: a flow's translation in each direction, keyed by the 5-tuple
/// packets arrive with. Written by: this program (new flows, TCP state), the agent
/// (expiry sweep, flush). Read by: both.
#[map]
static CONNTRACK: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Per-target counters, per CPU, at `TargetEntry.counter_index`.
/// Written by: this program. Read by: the agent.
#[map]
static TARGET_COUNTERS: PerCpuArray<TargetCounters> = PerCpuArray::with_max_entries(MAX_TARGET_COUNTERS, 0);

/// Per-gateway counters, per CPU, at `GatewayState.gateway_id`.
/// Written by: this program. Read by: the agent.
#[map]
static GATEWAY_COUNTERS: PerCpuArray<GatewayCounters> = PerCpuArray::with_max_entries(DEFAULT_MAX_GATEWAYS, 0);

const AF_INET: u8 = 2;
/// IPv4 "more fragments" flag and fragment offset, as stored (network order).
const IP_FRAGMENT_MASK: u16 = 0x3fffu16.to_be();

enum Error {
    /// The packet is not one this program handles (or is malformed): pass it.
    Pass,
    /// A map did not hold what the agent must have written: a bug, abort.
    Inconsistent,
}

#[xdp]
pub fn splitter(ctx: XdpContext) -> u32 {
    match try_splitter(&ctx) {
        Ok(action) => action,
        Err(Error::Pass) => xdp_action::XDP_PASS,
        Err(Error::Inconsistent) => xdp_action::XDP_ABORTED,
    }
}

/// A program that passes every packet: attached to the peers of interfaces the splitter
/// redirects into (veth delivers redirected frames promptly only to a peer with XDP).
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A program that drops every packet: the sink of forwarding benchmarks.
#[xdp]
pub fn xdp_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[inline(always)]
fn count(class: PacketClass) {
    if let Some(counter) = PACKET_COUNTERS.get_ptr_mut(class.0) {
        // SAFETY: a per-CPU slot of this CPU; nothing else writes it while we run here.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn count_event(event: ForwardEvent) {
    if let Some(counter) = FORWARD_EVENTS.get_ptr_mut(event.0) {
        // SAFETY: as in `count`.
        unsafe { *counter += 1 };
    }
}

/// Bumps one field of a gateway's per-CPU counters.
#[inline(always)]
fn count_gateway(gateway_id: u32, field: impl FnOnce(&mut GatewayCounters) -> &mut u64) {
    if let Some(counters) = GATEWAY_COUNTERS.get_ptr_mut(gateway_id) {
        // SAFETY: a per-CPU slot of this CPU; nothing else writes it while we run here.
        unsafe { *field(&mut *counters) += 1 };
    }
}

/// Returns a pointer to a `T` at `offset` bytes into the packet, or `Error::Pass` if the
/// packet is too short. The only place packet bounds are checked.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Error> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(Error::Pass);
    }
    Ok((start + offset) as *mut T)
}

/// The parsed headers of a TCP or UDP packet over IPv4.
struct Packet {
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    /// Offset of the TCP or UDP header (its full fixed size is in bounds).
    l4_offset: usize,
    key: FlowKey,
    /// TCP flags byte (0 for UDP).
    tcp_flags: u8,
    /// IP total length (host order), for byte counters and the FIB's MTU check.
    ip_len: u16,
}

#[inline(always)]
fn try_splitter(ctx: &XdpContext) -> Result<u32, Error> {
    let packet = match parse(ctx) {
        Ok(packet) => packet,
        Err(class) => {
            count(class);
            return Err(Error::Pass);
        }
    };
    count(if packet.key.proto == PROTO_TCP { PacketClass::TCP } else { PacketClass::UDP });

    if let Some(entry) = CONNTRACK.get_ptr_mut(&packet.key) {
        if let Some(action) = established(ctx, &packet, entry)? {
            return Ok(action);
        }
        // A new SYN reusing a closed flow's 5-tuple: start a new flow below.
    }
    let gateway_key = GatewayKey {
        vip: packet.key.dst_addr,
        port: packet.key.dst_port,
        proto: packet.key.proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the agent replaces values whole.
    let Some(gateway) = (unsafe { GATEWAYS.get(&gateway_key) }).copied() else {
        return Err(Error::Pass);
    };
    new_flow(ctx, &packet, &gateway)
}

/// Parses Ethernet, IPv4 (respecting IHL) and the TCP or UDP header. Anything else is
/// reported by the class it is counted in, and passed.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Packet, PacketClass> {
    let malformed = |_| PacketClass::MALFORMED;
    let eth: *mut EthHdr = ptr_at(ctx, 0).map_err(malformed)?;
    // SAFETY: `ptr_at` checked that a whole EthHdr lies inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Err(PacketClass::NON_IPV4);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).map_err(malformed)?;
    // SAFETY: `ptr_at` checked that a whole Ipv4Hdr lies inside the packet.
    let (vihl, proto, frags, tot_len) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).frags, (*ip).tot_len) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(PacketClass::MALFORMED);
    }
    let l4_offset = EthHdr::LEN + ihl;
    let (ports_at, tcp_flags): (*mut u8, u8) = if proto == IpProto::Tcp as u8 {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4_offset).map_err(malformed)?;
        // SAFETY: the whole TcpHdr is in bounds; byte 13 holds the flags.
        (tcp.cast(), unsafe { *tcp.cast::<u8>().add(13) })
    } else if proto == IpProto::Udp as u8 {
        let udp: *mut UdpHdr = ptr_at(ctx, l4_offset).map_err(malformed)?;
        (udp.cast(), 0)
    } else if proto == IpProto::Icmp as u8 {
        return Err(PacketClass::ICMP);
    } else {
        return Err(PacketClass::IPV4_OTHER);
    };
    // Fragments carry no (or only part of the) L4 header: the kernel reassembles them.
    if u16::from_ne_bytes(frags) & IP_FRAGMENT_MASK != 0 {
        return Err(if proto == PROTO_TCP { PacketClass::TCP } else { PacketClass::UDP });
    }
    // SAFETY: the TCP/UDP header is in bounds and both start with the two ports; the IP
    // header is in bounds.
    let key = unsafe {
        FlowKey {
            src_addr: u32::from_ne_bytes((*ip).src_addr),
            dst_addr: u32::from_ne_bytes((*ip).dst_addr),
            src_port: ports_at.cast::<u16>().read_unaligned(),
            dst_port: ports_at.add(2).cast::<u16>().read_unaligned(),
            proto,
            _pad: [0; 3],
        }
    };
    Ok(Packet { eth, ip, l4_offset, key, tcp_flags, ip_len: u16::from_be_bytes(tot_len) })
}

/// A packet of a known flow. Returns `None` when the packet starts a new flow on the
/// 5-tuple of a closed one.
#[inline(always)]
fn established(ctx: &XdpContext, packet: &Packet, entry: *mut FlowEntry) -> Result<Option<u32>, Error> {
    // SAFETY: `entry` points at a live conntrack value; it is copied, then single fields
    // are written through the pointer (a racing CPU can at worst repeat a flag update).
    let flow = unsafe { *entry };
    let counters = TARGET_COUNTERS.get_ptr_mut(flow.counter_index);
    let to_target = flow.flags & FLOW_TO_TARGET != 0;
    let mut close = false;
    if packet.key.proto == PROTO_TCP {
        match tcp_verdict(flow.flags, packet.tcp_flags) {
            TcpVerdict::Keep => {}
            TcpVerdict::Close => close = true,
            TcpVerdict::Reopen => {
                let _ = CONNTRACK.remove(&flow.rewritten.reversed());
                let _ = CONNTRACK.remove(&packet.key);
                return Ok(None);
            }
            TcpVerdict::Update { flags, fin_now, connected_now } => {
                // SAFETY: see above.
                unsafe {
                    (*entry).flags = flags;
                    if fin_now {
                        (*entry).last_seen_ns = bpf_ktime_get_ns();
                    }
                }
                if let (true, Some(c)) = (connected_now, counters) {
                    // SAFETY: a per-CPU slot of this CPU.
                    unsafe {
                        (*c).connects += 1;
                        (*c).connect_ns_total += bpf_ktime_get_ns().saturating_sub(flow.created_ns);
                    }
                }
            }
        }
    } else {
        // UDP has no close: the agent forgets flows idle for longer than its timeout.
        // SAFETY: see above.
        unsafe { (*entry).last_seen_ns = bpf_ktime_get_ns() };
    }
    if let Some(c) = counters {
        let bytes = u64::from(packet.ip_len);
        // SAFETY: a per-CPU slot of this CPU.
        unsafe {
            if to_target {
                (*c).packets_to_target += 1;
                (*c).bytes_to_target += bytes;
            } else {
                (*c).packets_from_target += 1;
                (*c).bytes_from_target += bytes;
                if close {
                    (*c).resets_from_target += 1;
                }
            }
        }
    }
    if close {
        let _ = CONNTRACK.remove(&flow.rewritten.reversed());
        let _ = CONNTRACK.remove(&packet.key);
    }
    rewrite(ctx, packet, &flow.rewritten)?;
    Ok(Some(forward(ctx, packet, &flow.rewritten)))
}

/// The first packet of a flow to a gateway: pick a target, record the translation both
/// ways, then forward like any packet of the flow.
#[inline(always)]
fn new_flow(ctx: &XdpContext, packet: &Packet, gateway: &GatewayState) -> Result<u32, Error> {
    let key = &packet.key;
    if gateway.target_count == 0 {
        count_gateway(gateway.gateway_id, |c| &mut c.no_target);
        return Err(Error::Pass);
    }
    if key.proto == PROTO_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        // Mid-stream packet of a flow we do not know (evicted, or older than the agent):
        // re-create it; the same table gives the same target.
        count_gateway(gateway.gateway_id, |c| &mut c.conntrack_miss);
    }
    let hash = flow_hash(key);
    let slot_hash = if gateway.flags & GATEWAY_STICKY_CLIENT != 0 { client_hash(key.src_addr) } else { hash };
    let table = BUCKET_TABLES.get(gateway.table_index).ok_or(Error::Inconsistent)?;
    // The compiler knows a remainder is below the table size and would drop the bounds
    // check; the verifier does not, so hide the value from the compiler.
    let slot = core::hint::black_box(bucket_slot(slot_hash)) as usize;
    let index = u32::from(*table.slots.get(slot).ok_or(Error::Inconsistent)?);
    if index >= gateway.target_count || index >= MAX_TARGETS_PER_GATEWAY {
        return Err(Error::Inconsistent);
    }
    let target = *TARGETS
        .get(gateway.table_index * MAX_TARGETS_PER_GATEWAY + index)
        .ok_or(Error::Inconsistent)?;

    let now = now_ns();
    let from_target = FlowEntry {
        rewritten: key.reversed(),
        counter_index: target.counter_index,
        flags: FLOW_FROM_TARGET,
        last_seen_ns: now,
        created_ns: now,
    };
    let mut to_target = FlowKey {
        src_addr: key.src_addr,
        dst_addr: target.addr,
        src_port: key.src_port,
        dst_port: target.port,
        proto: key.proto,
        _pad: [0; 3],
    };
    let full_nat = gateway.flags & GATEWAY_DNAT == 0;
    if full_nat {
        to_target.src_addr = target.snat_addr;
    }
    // Claim the reply direction's key atomically: with full NAT, each candidate source
    // port is one attempt, so two CPUs never hand out the same port to two flows.
    let attempts = if full_nat { SNAT_PORT_TRIES } else { 1 };
    let mut claimed = false;
    for attempt in 0..attempts {
        if full_nat {
            to_target.src_port = snat_port(hash, attempt).to_be();
        }
        let reply_key = to_target.reversed();
        if CONNTRACK.insert(&reply_key, &from_target, u64::from(BPF_NOEXIST)).is_ok() {
            claimed = true;
            break;
        }
        // Taken: by this very flow (its forward entry was evicted, or another CPU got
        // its first packet too), or by another flow, then try the next port.
        // SAFETY: the value is copied out at once.
        if let Some(existing) = unsafe { CONNTRACK.get(&reply_key) } {
            if existing.rewritten == from_target.rewritten {
                claimed = true;
                break;
            }
        }
    }
    if !claimed {
        // Dropped, not passed: the kernel would answer the VIP with "unreachable", while
        // a dropped SYN is retried by the client a second later.
        count_gateway(gateway.gateway_id, |c| &mut c.alloc_failed);
        return Ok(xdp_action::XDP_DROP);
    }
    let flow = FlowEntry {
        rewritten: to_target,
        counter_index: target.counter_index,
        flags: FLOW_TO_TARGET,
        last_seen_ns: now,
        created_ns: now,
    };
    if CONNTRACK.insert(key, &flow, u64::from(BPF_ANY)).is_err() {
        let _ = CONNTRACK.remove(&to_target.reversed());
        count_gateway(gateway.gateway_id, |c| &mut c.alloc_failed);
        return Ok(xdp_action::XDP_DROP);
    }
    count_gateway(gateway.gateway_id, |c| &mut c.new_flows);
    if let Some(c) = TARGET_COUNTERS.get_ptr_mut(target.counter_index) {
        // SAFETY: a per-CPU slot of this CPU.
        unsafe {
            (*c).new_flows += 1;
            (*c).packets_to_target += 1;
            (*c).bytes_to_target += u64::from(packet.ip_len);
        }
    }
    #[cfg(feature = "log")]
    debug!(ctx, "new flow to target index {} (table {})", index, gateway.table_index);
    rewrite(ctx, packet, &to_target)?;
    Ok(forward(ctx, packet, &to_target))
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Rewrites addresses and ports to `to`, updating the IPv4 and TCP/UDP checksums
/// incrementally (the L4 checksum covers the addresses through the pseudo-header).
#[inline(always)]
fn rewrite(ctx: &XdpContext, packet: &Packet, to: &FlowKey) -> Result<(), Error> {
    let from = &packet.key;
    let addresses = CsumDelta::new()
        .replace32(from.src_addr, to.src_addr)
        .replace32(from.dst_addr, to.dst_addr);
    let l4 = addresses.replace16(from.src_port, to.src_port).replace16(from.dst_port, to.dst_port);
    // The L4 header is bounds-checked again for its own type: the verifier does not tie
    // the earlier check to the protocol on this path.
    let (ports, check_at, udp) = if from.proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, packet.l4_offset)?;
        (tcp.cast::<u8>(), 16, false)
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, packet.l4_offset)?;
        (udp.cast::<u8>(), 6, true)
    };
    // SAFETY: `parse` checked the IP header and the line above the TCP/UDP header; every
    // offset written lies inside them.
    unsafe {
        let ip = packet.ip;
        (*ip).src_addr = to.src_addr.to_ne_bytes();
        (*ip).dst_addr = to.dst_addr.to_ne_bytes();
        (*ip).check = addresses.apply(u16::from_ne_bytes((*ip).check)).to_ne_bytes();
        ports.cast::<u16>().write_unaligned(to.src_port);
        ports.add(2).cast::<u16>().write_unaligned(to.dst_port);
        let check = ports.add(check_at).cast::<u16>();
        let old = check.read_unaligned();
        check.write_unaligned(if udp { l4.apply_udp(old) } else { l4.apply(old) });
    }
    Ok(())
}

/// Sends a translated packet on its way: the FIB names the egress interface and next-hop
/// MAC; without a resolved neighbour (or for a local destination) the kernel forwards it.
#[inline(always)]
fn forward(ctx: &XdpContext, packet: &Packet, to: &FlowKey) -> u32 {
    // SAFETY: an all-zero bpf_fib_lookup is a valid value (plain integers and unions of
    // integers).
    let mut fib: FibParams = unsafe { mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = to.proto;
    fib.sport = to.src_port;
    fib.dport = to.dst_port;
    fib.__bindgen_anon_1.tot_len = packet.ip_len;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.__bindgen_anon_3.ipv4_src = to.src_addr;
    fib.__bindgen_anon_4.ipv4_dst = to.dst_addr;
    // SAFETY: `fib` is a valid bpf_fib_lookup on our stack, its size passed alongside.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut fib, mem::size_of::<FibParams>() as i32, 0) };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        // SAFETY: the Ethernet header is in bounds (checked by `parse`).
        unsafe {
            (*packet.eth).dst_addr = fib.dmac;
            (*packet.eth).src_addr = fib.smac;
        }
        if fib.ifindex == ctx.ingress_ifindex() as u32 {
            count_event(ForwardEvent::TX);
            return xdp_action::XDP_TX;
        }
        count_event(ForwardEvent::REDIRECT);
        // SAFETY: bpf_redirect only records the target interface for this packet.
        return unsafe { bpf_redirect(fib.ifindex, 0) } as u32;
    }
    count_event(if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        ForwardEvent::PASS_NO_NEIGH
    } else {
        ForwardEvent::PASS_FIB
    });
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic is reachable (the verifier would reject one anyway); the handler is only
    // required by `no_std`.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
