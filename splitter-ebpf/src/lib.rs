//! The splitter's XDP program.
//!
//! A packet to a gateway's VIP:port starts a flow: its 5-tuple (or client address, for
//! sticky gateways) hashes into the gateway's live bucket table, which names a target;
//! conntrack then remembers the flow's translation in both directions, so the flow keeps
//! its target whatever the weights do later. Translated packets go out through the
//! kernel's FIB (`XDP_TX` or redirect). Everything else, and anything that does not parse,
//! is passed to the kernel untouched.
//!
//! IPv4 and IPv6 take the same code, generic over a [`Family`] that names the family's
//! maps and how its headers are read and written; IPv6 packets with extension headers
//! and ICMPv6 (neighbour discovery among it) are the kernel's.
#![no_std]

#[cfg(feature = "test-programs")]
mod bench;
#[cfg(feature = "test-programs")]
mod helpers;

use core::{marker::PhantomData, mem};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_ANY, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST,
    },
    helpers::{bpf_fib_lookup, bpf_jiffies64, bpf_ktime_get_ns, bpf_loop, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
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
    conntrack::{
        connect_timed_out, half_open_expired, half_open_port_takeable, half_open_verdict, http_status_class, port_reusable, tcp_verdict,
        HalfOpenVerdict, TcpVerdict, DEFAULT_CONNECT_TIMEOUT_NS, DEFAULT_HALF_OPEN_TIMEOUT_NS, TCP_ACK, TCP_SYN,
    },
    csum::{fold, sum_words, CsumDelta},
    flow::{bucket_slot, client_hash, flow_hash, snat_address_index, snat_port_in, SNAT_PORT_MAX, SNAT_PORT_MIN, SNAT_PORT_TRIES},
    maps::{
        port_choice_entries, Address, AddressFilter, BucketTable, DatapathInfo, DnatReply, DnatReply6, DnatReplyOf, DsrSource, DsrSource6,
        DsrSourceOf, FlowEntry, FlowEntry6, FlowEntryOf, FlowKey, FlowKey6, FlowKeyOf, GatewayCounters, GatewayKey, GatewayKey6,
        GatewayKeyOf, GatewayState, Ipv6Words, SourcePool, TargetCounters, TargetEntry, TargetEntry6, TargetEntryOf, TargetOutcomes,
        DEFAULT_CONNTRACK_ENTRIES, DEFAULT_HALF_OPEN_ENTRIES, DEFAULT_MAX_GATEWAYS, FLOW_CONNECT_FAILED, FLOW_DSR, FLOW_ESTABLISHED,
        FLOW_FROM_TARGET, FLOW_HTTP, FLOW_TO_TARGET, GATEWAY_DNAT, GATEWAY_DSR, GATEWAY_HTTP, GATEWAY_STICKY_CLIENT, MAX_SOURCE_ADDRESSES,
        MAX_TARGETS_PER_GATEWAY, MAX_TARGET_COUNTERS, PROTO_TCP,
    },
    FlowEvent, ForwardEvent, PacketClass,
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

/// TCP flows whose handshake has not completed, keyed like `CONNTRACK` (both directions).
/// A SYN flood fills and evicts only this map; the client's ACK moves a flow to
/// `CONNTRACK`; an entry past the half-open timeout counts as gone (its full-NAT port is
/// free). Written by: this program. Read by: this program (the agent only counts it).
#[map]
static HALF_OPEN: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(DEFAULT_HALF_OPEN_ENTRIES, 0);

/// The candidate index of each full-NAT flow's source when it was not the first (client
/// key to index): a flow whose conntrack entries were both evicted is re-created on the
/// source its target knows, not on the first one free by then. Written by: this program
/// (new flows). Read by: this program (flows re-created mid-stream).
#[map]
static PORT_CHOICES: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(port_choice_entries(DEFAULT_CONNTRACK_ENTRIES), 0);

/// Flow-state events, per CPU, indexed by [`FlowEvent`].
/// Written by: this program. Read by: the agent.
#[map]
static FLOW_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FlowEvent::COUNT, 0);

/// Failed connects and HTTP status classes per target, per CPU, at `TargetEntry.counter_index`.
/// Written by: this program. Read (and zeroed for a new target) by: the agent.
#[map]
static TARGET_OUTCOMES: PerCpuArray<TargetOutcomes> = PerCpuArray::with_max_entries(MAX_TARGET_COUNTERS, 0);

/// Full-NAT source addresses and port range of each gateway, at `GatewayState.gateway_id`.
/// Written by: the agent (before the gateway's state names it). Read by: this program.
#[map]
static SOURCE_POOLS: Array<SourcePool> = Array::with_max_entries(DEFAULT_MAX_GATEWAYS, 0);

/// The buckets of addresses this program cannot have to translate (see `AddressFilter`).
/// Written by: the agent (a gateway's buckets cleared before it goes live, the rest set
/// from conntrack sweeps). Read by: this program, before any hash lookup.
#[map]
static ADDRESS_FILTER: Array<AddressFilter> = Array::with_max_entries(1, 0);

/// Outer source prefixes of direct-server-return gateways, at `GatewayState.gateway_id`.
/// Written by: the agent (before the gateway's state names it). Read by: this program.
#[map]
static DSR_SOURCES: Array<DsrSource> = Array::with_max_entries(DEFAULT_MAX_GATEWAYS, 0);

/// DNAT gateways' targets (address, port, protocol) to their gateway, for answers no flow
/// state here knows. Written by: the agent (before the gateway's state names the targets).
/// Read by: this program.
#[map]
static DNAT_REPLIES: HashMap<GatewayKey, DnatReply> = HashMap::with_max_entries(MAX_TARGET_COUNTERS, 0);

/// `DNAT_REPLIES` of IPv6 gateways. Written by: the agent. Read by: this program.
#[map]
static DNAT_REPLIES6: HashMap<GatewayKey6, DnatReply6> = HashMap::with_max_entries(MAX_TARGET_COUNTERS, 0);

/// `GATEWAYS` for IPv6 VIPs; their tables are in `BUCKET_TABLES` and their targets in
/// `TARGETS6`, at the same indices. Written by: the agent. Read by: this program.
#[map]
static GATEWAYS6: HashMap<GatewayKey6, GatewayState> = HashMap::with_max_entries(DEFAULT_MAX_GATEWAYS, 0);

/// `TARGETS` of IPv6 gateways. Written by: the agent (with their table). Read by: this program.
#[map]
static TARGETS6: Array<TargetEntry6> = Array::with_max_entries(2 * DEFAULT_MAX_GATEWAYS * MAX_TARGETS_PER_GATEWAY, 0);

/// `CONNTRACK` of IPv6 flows. Written by: this program, the agent (expiry, flush). Read by: both.
#[map]
static CONNTRACK6: LruHashMap<FlowKey6, FlowEntry6> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// `HALF_OPEN` of IPv6 flows. Written by: this program. Read by: this program (the agent counts it).
#[map]
static HALF_OPEN6: LruHashMap<FlowKey6, FlowEntry6> = LruHashMap::with_max_entries(DEFAULT_HALF_OPEN_ENTRIES, 0);

/// `PORT_CHOICES` of IPv6 flows. Written by: this program. Read by: this program.
#[map]
static PORT_CHOICES6: LruHashMap<FlowKey6, u32> = LruHashMap::with_max_entries(port_choice_entries(DEFAULT_CONNTRACK_ENTRIES), 0);

/// `DSR_SOURCES` of IPv6 gateways, at `GatewayState.gateway_id`. Written by: the agent
/// (before the gateway's state names it). Read by: this program.
#[map]
static DSR_SOURCES6: Array<DsrSource6> = Array::with_max_entries(DEFAULT_MAX_GATEWAYS, 0);

/// The layout version and build of what runs, for the next agent.
/// Written by: the agent. Read by: the agent (never this program).
#[map]
static DATAPATH_INFO: Array<DatapathInfo> = Array::with_max_entries(1, 0);

/// How long a target may take to answer a SYN before the connect counts as failed,
/// nanoseconds; set by the agent at load (`--connect-timeout`).
#[unsafe(no_mangle)]
static CONNECT_TIMEOUT_NS: u64 = DEFAULT_CONNECT_TIMEOUT_NS;

/// How long a half-open flow lives, nanoseconds; set by the agent at load
/// (`--half-open-timeout`).
#[unsafe(no_mangle)]
static HALF_OPEN_TIMEOUT_NS: u64 = DEFAULT_HALF_OPEN_TIMEOUT_NS;

/// Per-target counters, per CPU, at `TargetEntry.counter_index`.
/// Written by: this program. Read by: the agent.
#[map]
static TARGET_COUNTERS: PerCpuArray<TargetCounters> = PerCpuArray::with_max_entries(MAX_TARGET_COUNTERS, 0);

/// Per-gateway counters, per CPU, at `GatewayState.gateway_id`.
/// Written by: this program. Read by: the agent.
#[map]
static GATEWAY_COUNTERS: PerCpuArray<GatewayCounters> = PerCpuArray::with_max_entries(DEFAULT_MAX_GATEWAYS, 0);

/// A FIB result kept for reuse: where packets from `src` to `dst` arriving on `ingress`
/// leave, with which MACs, and the egress MTU.
#[repr(C)]
#[derive(Clone, Copy)]
struct NextHop<A> {
    src: A,
    dst: A,
    ingress: u32,
    egress: u32,
    /// `bpf_jiffies64` after which the entry is looked up again.
    expires: u64,
    mtu: u16,
    smac: [u8; 6],
    dmac: [u8; 6],
    _pad: [u8; 2],
}

/// Slots of the per-CPU next-hop cache (a power of two; direct-mapped by address hash).
const NEXT_HOP_SLOTS: u32 = 256;
/// How long a cached FIB result is used (jiffies: 25 = 100 ms at HZ=250, 25 ms at
/// HZ=1000): route and neighbour changes are seen within that time.
const NEXT_HOP_TTL_JIFFIES: u64 = 25;

/// Per-CPU next-hop cache in front of `bpf_fib_lookup`, which costs more than the rest of
/// an established packet's path. Written and read by: this program only.
#[map]
static NEXT_HOPS: PerCpuArray<NextHop<u32>> = PerCpuArray::with_max_entries(NEXT_HOP_SLOTS, 0);

/// `NEXT_HOPS` of IPv6 routes. Written and read by: this program only.
#[map]
static NEXT_HOPS6: PerCpuArray<NextHop<Ipv6Words>> = PerCpuArray::with_max_entries(NEXT_HOP_SLOTS, 0);

/// A coarse per-CPU clock: `bpf_ktime_get_ns` read once per jiffy, for UDP flows'
/// last-seen times (the agent expires idle UDP flows after seconds). Written and read by:
/// this program only.
#[repr(C)]
#[derive(Clone, Copy)]
struct CoarseClock {
    jiffies: u64,
    ns: u64,
}

#[map]
static COARSE_CLOCK: PerCpuArray<CoarseClock> = PerCpuArray::with_max_entries(1, 0);

/// The flow state a packet's path works on (see [`Work`]), one per CPU: kept off the
/// stack, which holds little more than a key and an entry of IPv6 (an XDP program is not
/// re-entered on its CPU while it runs). Written and read by: this program only.
#[map]
static WORK: PerCpuArray<Work<V4>> = PerCpuArray::with_max_entries(1, 0);
#[map]
static WORK6: PerCpuArray<Work<V6>> = PerCpuArray::with_max_entries(1, 0);

/// The FIB lookup's parameters, one per CPU, off the stack as `CLAIMS`. Written and read
/// by: this program only.
#[map]
static FIB_PARAMS: PerCpuArray<FibParams> = PerCpuArray::with_max_entries(1, 0);
// `route` zeroes it in 8-byte words.
const _: () = assert!(mem::size_of::<FibParams>() % 8 == 0);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// IP in IP (the outer header's protocol of a direct-server-return packet).
const PROTO_IPIP: u8 = 4;
/// IPv6 in IPv6 (the same for IPv6).
const PROTO_IPV6: u8 = 41;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// The fixed IPv6 header; its addresses' offsets.
const IPV6_HEADER_LEN: usize = 40;
const IPV6_SRC_AT: usize = 8;
const IPV6_DST_AT: usize = 24;
/// IPv4 "don't fragment", as stored.
const IP_DONT_FRAGMENT: [u8; 2] = [0x40, 0];
/// An ICMP error's own header, and how much of the offending packet it quotes beyond its
/// IP header (RFC 792).
const ICMP_HEADER_LEN: usize = 8;
const ICMP_QUOTED_L4_LEN: usize = 8;
/// IPv4 "more fragments" flag and fragment offset, as stored (network order).
const IP_FRAGMENT_MASK: u16 = 0x3fffu16.to_be();

/// What differs between IPv4 and IPv6 on the splitter's path: the maps the family's
/// gateways and flows live in, and how its headers are parsed and written.
trait Family: Sized + 'static {
    type Addr: Address;
    /// A `FlowKeyOf<Addr>` as plain words (see [`Packet::key`]).
    type KeyWords: Copy;
    /// The fixed IP header, which is also what an encapsulation adds.
    const HEADER_LEN: usize;
    const ETHER_TYPE: u16;
    const FIB_FAMILY: u8;
    /// The outer header's protocol of a direct-server-return packet.
    const PROTO_ENCAP: u8;

    fn gateways() -> &'static HashMap<GatewayKeyOf<Self::Addr>, GatewayState>;
    fn targets() -> &'static Array<TargetEntryOf<Self::Addr>>;
    fn conntrack() -> &'static LruHashMap<FlowKeyOf<Self::Addr>, FlowEntryOf<Self::Addr>>;
    fn half_open() -> &'static LruHashMap<FlowKeyOf<Self::Addr>, FlowEntryOf<Self::Addr>>;
    fn port_choices() -> &'static LruHashMap<FlowKeyOf<Self::Addr>, u32>;
    fn dsr_sources() -> &'static Array<DsrSourceOf<Self::Addr>>;
    fn next_hops() -> &'static PerCpuArray<NextHop<Self::Addr>>;
    /// This CPU's `WORK` slot of the family.
    fn work() -> Option<*mut Work<Self>>;
    /// Address `i` of a full-NAT source pool, if the pool holds this family's addresses.
    fn pool_address(pool: &SourcePool, i: usize) -> Option<Self::Addr>;
    /// The gateway address and port a target's answer without flow state is sent from
    /// (DNAT gateways, see `DNAT_REPLIES`).
    fn dnat_reply(target: &GatewayKeyOf<Self::Addr>) -> Option<&'static DnatReplyOf<Self::Addr>>;
    /// Writes `to`'s addresses into the IP header at `l3` (`addresses`: the checksum
    /// change they make, for a header checksum).
    ///
    /// # Safety
    /// `l3` must point at the packet's whole fixed IP header.
    unsafe fn write_addresses(l3: *mut u8, to: &FlowKeyOf<Self::Addr>, addresses: CsumDelta);
    fn set_fib_addresses(fib: &mut FibParams, src: Self::Addr, dst: Self::Addr);
    /// Writes the outer header of a direct-server-return packet at `l3`; `inner_word` is
    /// the first word of the packet's own header (version and traffic class), `len` the
    /// outer packet's length.
    ///
    /// # Safety
    /// `l3` must point at `HEADER_LEN` writable bytes inside the packet.
    unsafe fn write_outer_header(l3: *mut u8, inner_word: u32, len: u16, src: Self::Addr, dst: Self::Addr);
    /// Answers `packet` with the family's ICMP "packet too big" naming `mtu`.
    fn icmp_too_big(ctx: &XdpContext, packet: &Packet<Self>, mtu: u16) -> Result<u32, Error>;
}

struct V4;
struct V6;

impl Family for V4 {
    type Addr = u32;
    type KeyWords = [u32; 4];
    const HEADER_LEN: usize = Ipv4Hdr::LEN;
    const ETHER_TYPE: u16 = EtherType::Ipv4 as u16;
    const FIB_FAMILY: u8 = AF_INET;
    const PROTO_ENCAP: u8 = PROTO_IPIP;

    #[inline(always)]
    fn gateways() -> &'static HashMap<GatewayKey, GatewayState> {
        &GATEWAYS
    }
    #[inline(always)]
    fn targets() -> &'static Array<TargetEntry> {
        &TARGETS
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<FlowKey, FlowEntry> {
        &CONNTRACK
    }
    #[inline(always)]
    fn half_open() -> &'static LruHashMap<FlowKey, FlowEntry> {
        &HALF_OPEN
    }
    #[inline(always)]
    fn port_choices() -> &'static LruHashMap<FlowKey, u32> {
        &PORT_CHOICES
    }
    #[inline(always)]
    fn dsr_sources() -> &'static Array<DsrSource> {
        &DSR_SOURCES
    }
    #[inline(always)]
    fn next_hops() -> &'static PerCpuArray<NextHop<u32>> {
        &NEXT_HOPS
    }
    #[inline(always)]
    fn work() -> Option<*mut Work<Self>> {
        WORK.get_ptr_mut(0)
    }
    #[inline(always)]
    fn pool_address(pool: &SourcePool, i: usize) -> Option<u32> {
        pool.addrs.get(i & (MAX_SOURCE_ADDRESSES - 1)).copied()
    }
    #[inline(always)]
    fn dnat_reply(target: &GatewayKey) -> Option<&'static DnatReply> {
        // SAFETY: the value is read in place; the agent replaces values whole.
        unsafe { DNAT_REPLIES.get(target) }
    }
    #[inline(always)]
    unsafe fn write_addresses(l3: *mut u8, to: &FlowKey, addresses: CsumDelta) {
        let ip = l3.cast::<Ipv4Hdr>();
        // SAFETY: the caller's contract.
        unsafe {
            (*ip).src_addr = to.src_addr.to_ne_bytes();
            (*ip).dst_addr = to.dst_addr.to_ne_bytes();
            (*ip).check = addresses.apply(u16::from_ne_bytes((*ip).check)).to_ne_bytes();
        }
    }
    #[inline(always)]
    fn set_fib_addresses(fib: &mut FibParams, src: u32, dst: u32) {
        fib.__bindgen_anon_3.ipv4_src = src;
        fib.__bindgen_anon_4.ipv4_dst = dst;
    }
    #[inline(always)]
    unsafe fn write_outer_header(l3: *mut u8, inner_word: u32, len: u16, src: u32, dst: u32) {
        // SAFETY: the caller's contract; the TOS is the inner header's second byte.
        unsafe { write_ipv4_header(l3.cast(), inner_word.to_ne_bytes()[1], len, PROTO_IPIP, src, dst) };
    }
    #[inline(always)]
    fn icmp_too_big(ctx: &XdpContext, packet: &Packet<Self>, mtu: u16) -> Result<u32, Error> {
        icmp_too_big(ctx, packet, mtu)
    }
}

impl Family for V6 {
    type Addr = Ipv6Words;
    type KeyWords = [u32; 10];
    const HEADER_LEN: usize = IPV6_HEADER_LEN;
    const ETHER_TYPE: u16 = EtherType::Ipv6 as u16;
    const FIB_FAMILY: u8 = AF_INET6;
    const PROTO_ENCAP: u8 = PROTO_IPV6;

    #[inline(always)]
    fn gateways() -> &'static HashMap<GatewayKey6, GatewayState> {
        &GATEWAYS6
    }
    #[inline(always)]
    fn targets() -> &'static Array<TargetEntry6> {
        &TARGETS6
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<FlowKey6, FlowEntry6> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn half_open() -> &'static LruHashMap<FlowKey6, FlowEntry6> {
        &HALF_OPEN6
    }
    #[inline(always)]
    fn port_choices() -> &'static LruHashMap<FlowKey6, u32> {
        &PORT_CHOICES6
    }
    #[inline(always)]
    fn dsr_sources() -> &'static Array<DsrSource6> {
        &DSR_SOURCES6
    }
    #[inline(always)]
    fn next_hops() -> &'static PerCpuArray<NextHop<Ipv6Words>> {
        &NEXT_HOPS6
    }
    #[inline(always)]
    fn work() -> Option<*mut Work<Self>> {
        WORK6.get_ptr_mut(0)
    }
    /// Source pools hold IPv4 addresses: an IPv6 gateway's flows leave from the node's address.
    #[inline(always)]
    fn pool_address(_pool: &SourcePool, _i: usize) -> Option<Ipv6Words> {
        None
    }
    #[inline(always)]
    fn dnat_reply(target: &GatewayKey6) -> Option<&'static DnatReply6> {
        // SAFETY: the value is read in place; the agent replaces values whole.
        unsafe { DNAT_REPLIES6.get(target) }
    }
    #[inline(always)]
    unsafe fn write_addresses(l3: *mut u8, to: &FlowKey6, _addresses: CsumDelta) {
        // SAFETY: the caller's contract; IPv6 has no header checksum.
        unsafe {
            write_ipv6_address(l3.add(IPV6_SRC_AT), to.src_addr);
            write_ipv6_address(l3.add(IPV6_DST_AT), to.dst_addr);
        }
    }
    #[inline(always)]
    fn set_fib_addresses(fib: &mut FibParams, src: Ipv6Words, dst: Ipv6Words) {
        fib.__bindgen_anon_3.ipv6_src = src;
        fib.__bindgen_anon_4.ipv6_dst = dst;
    }
    #[inline(always)]
    unsafe fn write_outer_header(l3: *mut u8, inner_word: u32, len: u16, src: Ipv6Words, dst: Ipv6Words) {
        // SAFETY: the caller's contract.
        unsafe { write_ipv6_header(l3, inner_word, len - IPV6_HEADER_LEN as u16, PROTO_IPV6, 64, src, dst) };
    }
    #[inline(always)]
    fn icmp_too_big(ctx: &XdpContext, packet: &Packet<Self>, mtu: u16) -> Result<u32, Error> {
        icmp6_too_big(ctx, packet, mtu)
    }
}

const _: () = assert!(mem::size_of::<[u32; 4]>() == mem::size_of::<FlowKey>());
const _: () = assert!(mem::size_of::<[u32; 10]>() == mem::size_of::<FlowKey6>());

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

#[inline(always)]
fn count(class: PacketClass) {
    if let Some(counter) = PACKET_COUNTERS.get_ptr_mut(class.0) {
        // SAFETY: a per-CPU slot of this CPU; nothing else writes it while we run here.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn count_flow_event(event: FlowEvent) {
    if let Some(counter) = FLOW_EVENTS.get_ptr_mut(event.0) {
        // SAFETY: as in `count`.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn connect_timeout_ns() -> u64 {
    // SAFETY: as in `half_open_timeout_ns`.
    unsafe { core::ptr::read_volatile(&CONNECT_TIMEOUT_NS) }
}

/// The connect timeout of the gateway a client's flow (`client_key`, to the VIP) belongs
/// to: its own, or the datapath's default. Looked up only when a client sends its SYN again.
#[inline(always)]
fn gateway_connect_timeout_ns<F: Family>(client_key: &FlowKeyOf<F::Addr>) -> u64 {
    let key = GatewayKeyOf { vip: client_key.dst_addr, port: client_key.dst_port, proto: client_key.proto, _pad: 0 };
    // SAFETY: a copy is taken at once; the agent replaces values whole.
    match unsafe { F::gateways().get(&key) } {
        Some(state) if state.connect_timeout_ms != 0 => u64::from(state.connect_timeout_ms) * 1_000_000,
        _ => connect_timeout_ns(),
    }
}

/// Counts a failed connect of the target at `counter_index`.
#[inline(always)]
fn count_failed_connect(counter_index: u32) {
    if let Some(o) = TARGET_OUTCOMES.get_ptr_mut(counter_index) {
        // SAFETY: a per-CPU slot of this CPU.
        unsafe { (*o).failed_connects += 1 };
    }
}

/// Counts the status class of an HTTP response whose first segment this packet carries, if
/// it starts with a status line (`HTTP/1.x NNN`).
#[inline(always)]
fn count_http_status<F: Family>(ctx: &XdpContext, packet: &Packet<F>, counter_index: u32) {
    let Ok(tcp) = ptr_at::<TcpHdr>(ctx, packet.l4_offset) else { return };
    // SAFETY: the whole TcpHdr is in bounds; byte 12 holds the data offset.
    let data_offset = usize::from(unsafe { *tcp.cast::<u8>().add(12) } >> 4) * 4;
    let Ok(head) = ptr_at::<[u8; 12]>(ctx, packet.l4_offset + data_offset) else { return };
    // SAFETY: `ptr_at` checked that the twelve bytes lie inside the packet.
    let Some(class) = http_status_class(unsafe { &*head }) else { return };
    if let Some(o) = TARGET_OUTCOMES.get_ptr_mut(counter_index) {
        // The compiler knows the class is 1 to 5 and would drop the bounds check; the
        // verifier does not, so hide the index from the compiler.
        let index = core::hint::black_box(usize::from(class) - 1);
        // SAFETY: a per-CPU slot of this CPU.
        unsafe {
            if let Some(slot) = (*o).http.get_mut(index) {
                *slot += 1;
            }
        }
    }
}

#[inline(always)]
fn half_open_timeout_ns() -> u64 {
    // SAFETY: a global the loader may have overridden; read as it is in the object's data.
    unsafe { core::ptr::read_volatile(&HALF_OPEN_TIMEOUT_NS) }
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

/// Copies `*src` over `*dst`. A plain assignment of a value this large may compile to a
/// call to `memmove`, which BPF has only as a byte-at-a-time loop; a non-overlapping copy
/// is expanded into word loads and stores.
///
/// # Safety
/// Both pointers must be valid and aligned for `T`, and the values must not overlap.
#[inline(always)]
unsafe fn copy_value<T: Copy>(dst: *mut T, src: *const T) {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, 1) }
}

/// Writes an IPv6 address at `at` as four 32-bit stores (see [`copy_value`]).
///
/// # Safety
/// `at` must point at 16 writable bytes.
#[inline(always)]
unsafe fn write_ipv6_address(at: *mut u8, address: Ipv6Words) {
    let words = at.cast::<u32>();
    // SAFETY: the caller's contract; the stores are unaligned.
    unsafe {
        words.write_unaligned(address[0]);
        words.add(1).write_unaligned(address[1]);
        words.add(2).write_unaligned(address[2]);
        words.add(3).write_unaligned(address[3]);
    }
}

/// The parsed headers of a TCP or UDP packet over IPv4 or IPv6.
struct Packet<F: Family> {
    eth: *mut EthHdr,
    /// The IP header (its whole fixed size is in bounds).
    l3: *mut u8,
    /// Offset of the TCP or UDP header (its full fixed size is in bounds).
    l4_offset: usize,
    /// The flow key as the words of a `FlowKeyOf` (see [`Packet::key`]).
    key_words: F::KeyWords,
    /// TCP flags byte (0 for UDP).
    tcp_flags: u8,
    /// IP total length, header included (host order), for byte counters and the FIB's
    /// MTU check.
    ip_len: u16,
}

impl<F: Family> Packet<F> {
    /// The packet's 5-tuple, the conntrack key.
    #[inline(always)]
    fn key(&self) -> &FlowKeyOf<F::Addr> {
        // SAFETY: `KeyWords` has the key's size (asserted per family); the key is
        // `repr(C)` without padding, 4-byte aligned like the words, and valid for any bits.
        unsafe { &*(&self.key_words as *const F::KeyWords).cast::<FlowKeyOf<F::Addr>>() }
    }
}

#[inline(always)]
fn try_splitter(ctx: &XdpContext) -> Result<u32, Error> {
    let eth: *mut EthHdr = match ptr_at(ctx, 0) {
        Ok(eth) => eth,
        Err(e) => {
            count(PacketClass::MALFORMED);
            return Err(e);
        }
    };
    // SAFETY: `ptr_at` checked that a whole EthHdr lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    let class = if ether_type == EtherType::Ipv4 as u16 {
        match parse(ctx, eth) {
            Ok(packet) => return family_path(ctx, &packet),
            Err(class) => class,
        }
    } else if ether_type == EtherType::Ipv6 as u16 {
        match parse6(ctx, eth) {
            Ok(packet) => return family_path(ctx, &packet),
            Err(class) => class,
        }
    } else {
        PacketClass::NON_IPV4
    };
    count(class);
    Err(Error::Pass)
}

/// A family's path, a function of its own: the verifier sums the stack frames along a
/// call chain, and IPv6's chain must not include IPv4's frame.
#[inline(never)]
fn family_path<F: Family>(ctx: &XdpContext, packet: &Packet<F>) -> Result<u32, Error> {
    splitter_packet(ctx, packet)
}

/// What a stage of a packet's path decided.
enum Step {
    /// Return this action.
    Done(u32),
    /// Send the packet as `Work::send` says (see [`send_work`]).
    Send,
    /// The flow is not (any more) the stage's: on to the next stage.
    Next,
}

/// A TCP or UDP packet of either family: a known flow's, a new flow's, or not the
/// splitter's. Each stage leaves its flow state in this CPU's [`Work`], and sending runs
/// after the stage returns, so their stack frames are not nested.
#[inline(always)]
fn splitter_packet<F: Family>(ctx: &XdpContext, packet: &Packet<F>) -> Result<u32, Error> {
    count(if packet.key().proto == PROTO_TCP { PacketClass::TCP } else { PacketClass::UDP });
    // Most packets on a shared NIC are not the splitter's: pass them before any hash lookup.
    if let Some(filter) = ADDRESS_FILTER.get(0) {
        if filter.is_foreign(packet.key().dst_addr.fold()) && filter.is_foreign(packet.key().src_addr.fold()) {
            return Err(Error::Pass);
        }
    }
    let work = F::work().ok_or(Error::Inconsistent)?;
    let step = flow_step(ctx, packet, work)?;
    match step {
        Step::Done(action) => Ok(action),
        Step::Send => send_work(ctx, packet, work),
        Step::Next => Err(Error::Pass),
    }
}

/// The stages of a packet's path: a known flow's, a half-open one's, else a new flow's.
#[inline(always)]
fn flow_step<F: Family>(ctx: &XdpContext, packet: &Packet<F>, work: *mut Work<F>) -> Result<Step, Error> {
    if let Some(entry) = F::conntrack().get_ptr_mut(packet.key()) {
        let step = established(ctx, packet, entry, work)?;
        if !matches!(step, Step::Next) {
            return Ok(step);
        }
        // A new SYN reusing a closed flow's 5-tuple: start a new flow below.
    }
    if packet.key().proto == PROTO_TCP {
        if let Some(entry) = F::half_open().get_ptr_mut(packet.key()) {
            let step = half_open(packet, entry, work)?;
            if !matches!(step, Step::Next) {
                return Ok(step);
            }
            // Expired: a new flow below (or a miss, for anything but a SYN).
        }
    }
    let gateway_key = GatewayKeyOf { vip: packet.key().dst_addr, port: packet.key().dst_port, proto: packet.key().proto, _pad: 0 };
    // SAFETY: the value is read in place; the agent replaces values whole.
    let Some(gateway) = (unsafe { F::gateways().get(&gateway_key) }) else {
        return dnat_reply(ctx, packet).map(Step::Done);
    };
    #[cfg(feature = "log")]
    debug!(ctx, "new flow through table {}", gateway.table_index);
    new_flow(packet, gateway, work)
}

/// Sends a packet of a flow as its stage left it in `work`: encapsulated for a
/// direct-server-return flow, else translated and forwarded.
#[inline(always)]
fn send_work<F: Family>(ctx: &XdpContext, packet: &Packet<F>, work: *mut Work<F>) -> Result<u32, Error> {
    // SAFETY: this CPU's slot, which the stage filled; nothing else uses it meanwhile.
    let w = unsafe { &*work };
    if w.send_flags & FLOW_DSR != 0 {
        return encapsulate(ctx, packet, &w.send);
    }
    rewrite(ctx, packet, &w.send)?;
    Ok(forward(ctx, packet, &w.send))
}

/// An answer of a DNAT gateway's target that no flow state here knows: the flow's forward
/// half went through another node (ECMP moved it, or the target's route back names this
/// node). It is sent from the gateway's address like any answer, and its entry kept. One
/// for this host itself (a health check's) is passed untouched.
#[inline(always)]
fn dnat_reply<F: Family>(ctx: &XdpContext, packet: &Packet<F>) -> Result<u32, Error> {
    let key = packet.key();
    // A target opening a connection of its own is not an answer.
    if key.proto == PROTO_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return Err(Error::Pass);
    }
    let source = GatewayKeyOf { vip: key.src_addr, port: key.src_port, proto: key.proto, _pad: 0 };
    let Some(reply) = F::dnat_reply(&source) else {
        return Err(Error::Pass);
    };
    let rewritten = FlowKeyOf {
        src_addr: reply.vip,
        dst_addr: key.dst_addr,
        src_port: reply.port,
        dst_port: key.dst_port,
        proto: key.proto,
        _pad: 0,
        _pad_word: 0,
    };
    let route =
        route::<F>(ctx, rewritten.src_addr, rewritten.dst_addr, rewritten.proto, rewritten.src_port, rewritten.dst_port, packet.ip_len);
    if matches!(route, Route::Pass(_)) {
        return Err(Error::Pass);
    }
    let now = now_ns();
    let entry = FlowEntryOf {
        rewritten,
        counter_index: reply.counter_index,
        flags: FLOW_FROM_TARGET | FLOW_ESTABLISHED | u32::from(reply.flow_flags),
        last_seen_ns: now,
        created_ns: now,
    };
    // Without an entry the next answer takes this path again: nothing lost.
    let _ = F::conntrack().insert(key, &entry, u64::from(BPF_ANY));
    count_gateway(reply.gateway_id, |c| &mut c.conntrack_miss);
    count_flow_event(FlowEvent::ESTABLISHED_MISSED);
    rewrite(ctx, packet, &rewritten)?;
    Ok(send_by(packet.eth, route))
}

/// Parses IPv4 (respecting IHL) after the Ethernet header and the TCP or UDP header.
/// Anything else is reported by the class it is counted in, and passed.
#[inline(always)]
fn parse(ctx: &XdpContext, eth: *mut EthHdr) -> Result<Packet<V4>, PacketClass> {
    let malformed = |_| PacketClass::MALFORMED;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).map_err(malformed)?;
    // SAFETY: `ptr_at` checked that a whole Ipv4Hdr lies inside the packet.
    let (vihl, proto, frags, tot_len) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).frags, (*ip).tot_len) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(PacketClass::MALFORMED);
    }
    let l4_offset = EthHdr::LEN + ihl;
    let (ports_at, tcp_flags, l4_header_len): (*mut u8, u8, usize) = if proto == IpProto::Tcp as u8 {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4_offset).map_err(malformed)?;
        // SAFETY: the whole TcpHdr is in bounds; byte 13 holds the flags.
        (tcp.cast(), unsafe { *tcp.cast::<u8>().add(13) }, TcpHdr::LEN)
    } else if proto == IpProto::Udp as u8 {
        let udp: *mut UdpHdr = ptr_at(ctx, l4_offset).map_err(malformed)?;
        (udp.cast(), 0, UdpHdr::LEN)
    } else if proto == IpProto::Icmp as u8 {
        return Err(PacketClass::ICMP);
    } else {
        return Err(PacketClass::IPV4_OTHER);
    };
    // Fragments carry no (or only part of the) L4 header: the kernel reassembles them.
    if u16::from_ne_bytes(frags) & IP_FRAGMENT_MASK != 0 {
        return Err(if proto == PROTO_TCP { PacketClass::TCP } else { PacketClass::UDP });
    }
    // The IP length must cover the headers and lie within the frame (Ethernet padding may
    // follow it): a packet that lies about its length is the kernel's to judge.
    let ip_len = usize::from(u16::from_be_bytes(tot_len));
    if ip_len < ihl + l4_header_len || EthHdr::LEN + ip_len > ctx.data_end() - ctx.data() {
        return Err(PacketClass::MALFORMED);
    }
    // SAFETY: the TCP/UDP header is in bounds and both start with the two ports; the IP
    // header is in bounds.
    let key_words = unsafe {
        flow_key(
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
            ports_at.cast::<u16>().read_unaligned(),
            ports_at.add(2).cast::<u16>().read_unaligned(),
            proto,
        )
    };
    Ok(Packet { eth, l3: ip.cast(), l4_offset, key_words, tcp_flags, ip_len: u16::from_be_bytes(tot_len) })
}

/// Parses IPv6 after the Ethernet header and the TCP or UDP header right after it. A
/// packet with extension headers (fragments among them), ICMPv6 and anything else is
/// reported by the class it is counted in, and passed: the kernel handles those.
#[inline(always)]
fn parse6(ctx: &XdpContext, eth: *mut EthHdr) -> Result<Packet<V6>, PacketClass> {
    let malformed = |_| PacketClass::MALFORMED;
    let ip: *mut [u8; IPV6_HEADER_LEN] = ptr_at(ctx, EthHdr::LEN).map_err(malformed)?;
    // SAFETY: `ptr_at` checked that the whole fixed header lies inside the packet.
    let (version, payload_len, next_header) = unsafe { ((*ip)[0] >> 4, u16::from_be_bytes([(*ip)[4], (*ip)[5]]), (*ip)[6]) };
    if version != 6 {
        return Err(PacketClass::MALFORMED);
    }
    let l4_offset = EthHdr::LEN + IPV6_HEADER_LEN;
    let (ports_at, tcp_flags, l4_header_len): (*mut u8, u8, usize) = if next_header == IpProto::Tcp as u8 {
        let tcp: *mut TcpHdr = ptr_at(ctx, l4_offset).map_err(malformed)?;
        // SAFETY: the whole TcpHdr is in bounds; byte 13 holds the flags.
        (tcp.cast(), unsafe { *tcp.cast::<u8>().add(13) }, TcpHdr::LEN)
    } else if next_header == IpProto::Udp as u8 {
        let udp: *mut UdpHdr = ptr_at(ctx, l4_offset).map_err(malformed)?;
        (udp.cast(), 0, UdpHdr::LEN)
    } else if next_header == PROTO_ICMPV6 {
        return Err(PacketClass::ICMP);
    } else {
        return Err(PacketClass::NON_IPV4);
    };
    // The payload length must cover the L4 header and lie within the frame (a jumbogram
    // says 0 and carries a hop-by-hop header, so it never gets here).
    let ip_len = IPV6_HEADER_LEN + usize::from(payload_len);
    if usize::from(payload_len) < l4_header_len || EthHdr::LEN + ip_len > ctx.data_end() - ctx.data() || ip_len > usize::from(u16::MAX) {
        return Err(PacketClass::MALFORMED);
    }
    // SAFETY: the fixed header and the TCP/UDP header are in bounds; both of the latter
    // start with the two ports.
    let key_words = unsafe {
        let src = ip.cast::<u8>().add(IPV6_SRC_AT).cast::<[u32; 4]>().read_unaligned();
        let dst = ip.cast::<u8>().add(IPV6_DST_AT).cast::<[u32; 4]>().read_unaligned();
        let (sp, dp) =
            (ports_at.cast::<u16>().read_unaligned().to_ne_bytes(), ports_at.add(2).cast::<u16>().read_unaligned().to_ne_bytes());
        [
            src[0],
            src[1],
            src[2],
            src[3],
            dst[0],
            dst[1],
            dst[2],
            dst[3],
            u32::from_ne_bytes([sp[0], sp[1], dp[0], dp[1]]),
            u32::from_ne_bytes([next_header, 0, 0, 0]),
        ]
    };
    Ok(Packet { eth, l3: ip.cast(), l4_offset, key_words, tcp_flags, ip_len: ip_len as u16 })
}

/// A `FlowKey`'s four words (a struct literal's zero padding compiles to a call of a
/// byte-wise memset on every packet, and a `FlowKey` value on the stack gets its padding
/// stored as a misaligned word, which the verifier refuses).
#[inline(always)]
fn flow_key(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16, proto: u8) -> [u32; 4] {
    let (sp, dp) = (src_port.to_ne_bytes(), dst_port.to_ne_bytes());
    [src_addr, dst_addr, u32::from_ne_bytes([sp[0], sp[1], dp[0], dp[1]]), u32::from_ne_bytes([proto, 0, 0, 0])]
}

/// Both MAC addresses of an Ethernet header (destination, then source) as six 16-bit
/// words, the form they are written in (copying the arrays compiles to calls of a
/// byte-wise memmove).
#[inline(always)]
fn mac_words(dst: &[u8; 6], src: &[u8; 6]) -> [u16; 6] {
    let w = |a: &[u8; 6], i: usize| u16::from_ne_bytes([a[2 * i], a[2 * i + 1]]);
    [w(dst, 0), w(dst, 1), w(dst, 2), w(src, 0), w(src, 1), w(src, 2)]
}

/// A packet of a known flow. Returns `None` when the packet starts a new flow on the
/// 5-tuple of a closed one.
#[inline(always)]
fn established<F: Family>(
    ctx: &XdpContext,
    packet: &Packet<F>,
    entry: *mut FlowEntryOf<F::Addr>,
    work: *mut Work<F>,
) -> Result<Step, Error> {
    // SAFETY: this CPU's slot; nothing else uses it while we run here.
    let w = unsafe { &mut *work };
    // SAFETY: `entry` points at a live conntrack value; it is copied, then single fields
    // are written through the pointer (a racing CPU can at worst repeat a flag update).
    unsafe { copy_value(&mut w.flow, entry) };
    let flow = &w.flow;
    let counters = TARGET_COUNTERS.get_ptr_mut(flow.counter_index);
    let to_target = flow.flags & FLOW_TO_TARGET != 0;
    let mut close = false;
    if packet.key().proto == PROTO_TCP {
        match tcp_verdict(flow.flags, packet.tcp_flags) {
            TcpVerdict::Keep => {}
            TcpVerdict::Close => close = true,
            TcpVerdict::Reopen => {
                w.reply_key = flow.rewritten.reversed();
                let _ = F::conntrack().remove(&w.reply_key);
                let _ = F::conntrack().remove(packet.key());
                return Ok(Step::Next);
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
        // UDP has no close: the agent forgets flows idle for longer than its timeout
        // (seconds), so a clock read once per jiffy will do; the entry is written only when
        // the time moved.
        let now = coarse_now_ns();
        if flow.last_seen_ns != now {
            // SAFETY: see above.
            unsafe { (*entry).last_seen_ns = now };
        }
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
    if !to_target && flow.flags & FLOW_HTTP != 0 {
        count_http_status(ctx, packet, flow.counter_index);
    }
    let dsr = flow.flags & FLOW_DSR != 0;
    w.send = flow.rewritten;
    w.send_flags = flow.flags;
    w.reply_key = flow.rewritten.reversed();
    if close {
        // A direct-server-return flow has no entry for replies.
        if !dsr {
            let _ = F::conntrack().remove(&w.reply_key);
        }
        let _ = F::conntrack().remove(packet.key());
    } else if to_target && !dsr {
        restore_reply_entry(packet, w);
    }
    Ok(Step::Send)
}

/// Makes sure the target's answers to a client's packet find their entry (`w.reply_key`,
/// of the flow `w.flow`). At capacity the LRU can evict one half of a flow alone; without
/// its reply half, the target's answer would go to the kernel untranslated (and, for full
/// NAT, be reset there). The lookup also marks the reply half used, so a flow in use keeps
/// both halves.
#[inline(always)]
fn restore_reply_entry<F: Family>(packet: &Packet<F>, w: &mut Work<F>) {
    if F::conntrack().get_ptr(&w.reply_key).is_some() {
        return;
    }
    set_established_reply(&mut w.other, packet.key(), &w.flow, w.flow.last_seen_ns);
    if F::conntrack().insert(&w.reply_key, &w.other, u64::from(BPF_NOEXIST)).is_ok() {
        count_flow_event(FlowEvent::ESTABLISHED_MISSED);
    }
}

/// Makes `reply` the target's entry of an established flow, made from the client's:
/// `client_key` and `flow` are the client's key and entry.
#[inline(always)]
fn set_established_reply<A: Address>(reply: &mut FlowEntryOf<A>, client_key: &FlowKeyOf<A>, flow: &FlowEntryOf<A>, last_seen_ns: u64) {
    reply.rewritten = client_key.reversed();
    reply.counter_index = flow.counter_index;
    reply.flags = FLOW_FROM_TARGET | FLOW_ESTABLISHED | (flow.flags & FLOW_HTTP);
    reply.last_seen_ns = last_seen_ns;
    reply.created_ns = flow.created_ns;
}

/// A packet of a half-open TCP flow (in either direction). Returns `None` when the flow
/// expired: the caller treats the packet as the first of a new flow.
#[inline(always)]
fn half_open<F: Family>(packet: &Packet<F>, entry: *mut FlowEntryOf<F::Addr>, work: *mut Work<F>) -> Result<Step, Error> {
    // SAFETY: this CPU's slot; nothing else uses it while we run here.
    let w = unsafe { &mut *work };
    // SAFETY: `entry` points at a live half-open value; it is copied, then single fields
    // are written through the pointer.
    unsafe { copy_value(&mut w.flow, entry) };
    let flow = &w.flow;
    let to_target = flow.flags & FLOW_TO_TARGET != 0;
    // A direct-server-return flow has the client's entry alone: the target answers the
    // client directly.
    let dsr = flow.flags & FLOW_DSR != 0;
    // The client's key and the target's (reply) key of the flow.
    // SAFETY (both copies): the packet's key is on the stack, apart from this CPU's slot.
    if to_target {
        unsafe { copy_value(&mut w.client_key, packet.key()) };
        w.reply_key = flow.rewritten.reversed();
    } else {
        w.client_key = flow.rewritten.reversed();
        unsafe { copy_value(&mut w.reply_key, packet.key()) };
    }
    let (client_key, reply_key) = (&w.client_key, &w.reply_key);
    let now = now_ns();
    if half_open_expired(flow.created_ns, now, half_open_timeout_ns()) {
        let _ = F::half_open().remove(client_key);
        if !dsr {
            let _ = F::half_open().remove(reply_key);
        }
        count_flow_event(FlowEvent::HALF_OPEN_EXPIRED);
        return Ok(Step::Next);
    }
    let counters = TARGET_COUNTERS.get_ptr_mut(flow.counter_index);
    match half_open_verdict(flow.flags, packet.tcp_flags) {
        HalfOpenVerdict::Promote if dsr => {
            if F::conntrack().insert(client_key, flow, u64::from(BPF_ANY)).is_ok() {
                let _ = F::half_open().remove(client_key);
                count_flow_event(FlowEvent::HALF_OPEN_PROMOTED);
            }
        }
        HalfOpenVerdict::Close if dsr => {
            let _ = F::half_open().remove(client_key);
        }
        HalfOpenVerdict::Promote => {
            // The target's entry as the handshake left it (its SYN-ACK marked it), or as it
            // would be, should the LRU have dropped it.
            // SAFETY: the value is copied out at once.
            match unsafe { F::half_open().get(reply_key) } {
                // SAFETY: a map value, apart from this CPU's slot.
                Some(reply) => unsafe { copy_value(&mut w.other, reply) },
                None => set_established_reply(&mut w.other, client_key, flow, now),
            }
            if F::conntrack().insert(reply_key, &w.other, u64::from(BPF_ANY)).is_err()
                || F::conntrack().insert(client_key, flow, u64::from(BPF_ANY)).is_err()
            {
                // Conntrack refused (it cannot be full: it is an LRU): keep it half-open.
                let _ = F::conntrack().remove(reply_key);
            } else {
                let _ = F::half_open().remove(client_key);
                let _ = F::half_open().remove(reply_key);
                count_flow_event(FlowEvent::HALF_OPEN_PROMOTED);
            }
        }
        HalfOpenVerdict::Close => {
            let _ = F::half_open().remove(client_key);
            let _ = F::half_open().remove(reply_key);
            // The target refused the connect (its listener is gone, or it is overloaded).
            if !to_target && flow.flags & FLOW_CONNECT_FAILED == 0 {
                count_failed_connect(flow.counter_index);
            }
        }
        HalfOpenVerdict::Keep => {
            let syn_ack = packet.tcp_flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK);
            if to_target && packet.tcp_flags & TCP_SYN != 0 && flow.flags & FLOW_CONNECT_FAILED == 0 {
                // The client sends its SYN again: if the target has not answered it within the
                // connect timeout, the connect failed (a dead or blackholed target).
                // SAFETY: a map value read in place.
                let answered = unsafe { F::half_open().get(reply_key) }.is_some_and(|r| r.flags & FLOW_ESTABLISHED != 0);
                if !answered && connect_timed_out(now.saturating_sub(flow.created_ns), gateway_connect_timeout_ns::<F>(client_key)) {
                    count_failed_connect(flow.counter_index);
                    // SAFETY: see above.
                    unsafe { (*entry).flags = flow.flags | FLOW_CONNECT_FAILED };
                }
            }
            if !to_target && !syn_ack && flow.flags & (FLOW_ESTABLISHED | FLOW_CONNECT_FAILED) == 0 {
                // Anything but a SYN-ACK to a SYN (an ACK from a TIME_WAIT connection on the
                // same ports, say): the connect failed.
                count_failed_connect(flow.counter_index);
                // SAFETY: see above.
                unsafe { (*entry).flags = flow.flags | FLOW_CONNECT_FAILED };
            }
            if !to_target && syn_ack && flow.flags & FLOW_ESTABLISHED == 0 {
                // SAFETY: see above.
                unsafe { (*entry).flags = flow.flags | FLOW_ESTABLISHED };
                if let Some(c) = counters {
                    // SAFETY: a per-CPU slot of this CPU.
                    unsafe {
                        (*c).connects += 1;
                        (*c).connect_ns_total += now.saturating_sub(flow.created_ns);
                    }
                }
            }
        }
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
            }
        }
    }
    w.send = flow.rewritten;
    w.send_flags = flow.flags;
    Ok(Step::Send)
}

/// The first packet of a flow to a gateway: pick a target, record the translation both
/// ways, then forward like any packet of the flow. A TCP SYN starts a half-open flow (in
/// `HALF_OPEN`, until the client's ACK); anything else goes to `CONNTRACK` at once.
#[inline(always)]
fn new_flow<F: Family>(packet: &Packet<F>, gateway: &GatewayState, work: *mut Work<F>) -> Result<Step, Error> {
    let key = packet.key();
    if gateway.target_count == 0 {
        count_gateway(gateway.gateway_id, |c| &mut c.no_target);
        return Err(Error::Pass);
    }
    let syn = !cfg!(feature = "legacy-syn") && key.proto == PROTO_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if key.proto == PROTO_TCP && packet.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        // Mid-stream packet of a flow we do not know (evicted, or older than the agent):
        // re-create it; the same table gives the same target.
        count_gateway(gateway.gateway_id, |c| &mut c.conntrack_miss);
        count_flow_event(FlowEvent::ESTABLISHED_MISSED);
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
    let target = F::targets().get(gateway.table_index * MAX_TARGETS_PER_GATEWAY + index).ok_or(Error::Inconsistent)?;
    // SAFETY: this CPU's slot; nothing else uses it while we run here.
    let w = unsafe { &mut *work };
    if gateway.flags & GATEWAY_DSR != 0 {
        return Ok(new_dsr_flow(packet, gateway, target, hash, syn, w));
    }

    let now = now_ns();
    let http = if gateway.flags & GATEWAY_HTTP != 0 { FLOW_HTTP } else { 0 };
    let full_nat = gateway.flags & GATEWAY_DNAT == 0;
    let claim = &mut w.claim;
    claim.from_target.rewritten = key.reversed();
    claim.from_target.counter_index = target.counter_index;
    claim.from_target.flags = FLOW_FROM_TARGET | http;
    claim.from_target.last_seen_ns = now;
    claim.from_target.created_ns = now;
    claim.to = FlowKeyOf {
        src_addr: if full_nat { target.snat_addr } else { key.src_addr },
        dst_addr: target.addr,
        src_port: key.src_port,
        dst_port: target.port,
        proto: key.proto,
        _pad: 0,
        _pad_word: 0,
    };
    claim.now = now;
    claim.timeout = half_open_timeout_ns();
    claim.oldest_created = 0;
    claim.node_addr = claim.to.src_addr;
    claim.hash = hash;
    claim.gateway_id = gateway.gateway_id;
    claim.full_nat = u32::from(full_nat);
    claim.claimed = 0;
    claim.reusable = 0;
    claim.oldest = 0;
    claim.recorded = 0;
    let claimed = if syn { claim_half_open(work) } else { claim_conntrack(work, key) };
    // SAFETY: as above; the claim's callbacks are done with the slot.
    let w = unsafe { &mut *work };
    if !claimed {
        // Dropped, not passed: the kernel would answer the VIP with "unreachable", while
        // a dropped SYN is retried by the client a second later.
        count_gateway(gateway.gateway_id, |c| &mut c.alloc_failed);
        return Ok(Step::Done(xdp_action::XDP_DROP));
    }
    w.send = w.claim.to;
    w.send_flags = 0;
    w.flow.rewritten = w.claim.to;
    w.flow.counter_index = target.counter_index;
    w.flow.flags = FLOW_TO_TARGET | http;
    w.flow.last_seen_ns = now;
    w.flow.created_ns = now;
    let table = if syn { F::half_open() } else { F::conntrack() };
    if table.insert(key, &w.flow, u64::from(BPF_ANY)).is_err() {
        w.claim.reply_key = w.claim.to.reversed();
        let _ = table.remove(&w.claim.reply_key);
        count_gateway(gateway.gateway_id, |c| &mut c.alloc_failed);
        return Ok(Step::Done(xdp_action::XDP_DROP));
    }
    if full_nat {
        record_port_choice(key, &w.claim, syn);
    }
    count_new_flow(gateway.gateway_id, target.counter_index, syn, packet.ip_len);
    Ok(Step::Send)
}

/// Records which candidate source a new full-NAT flow got when it was not the first (a
/// re-created flow starts from the first free one, which need not be the one its target
/// knows), and forgets a record left by an earlier flow on the same client key (a new
/// connection, `syn`, or a flow that got its first candidate back) so that it cannot
/// mislead a later re-creation.
#[inline(never)]
fn record_port_choice<F: Family>(key: &FlowKeyOf<F::Addr>, claim: &Claim<F>, syn: bool) {
    let attempt = claim.attempt;
    if attempt != 0 {
        if claim.recorded != attempt + 1 {
            // A full table of records evicts its oldest: that flow is no worse off than
            // with no record at all.
            let _ = F::port_choices().insert(key, &attempt, u64::from(BPF_ANY));
        }
    } else if syn || claim.recorded != 0 {
        let _ = F::port_choices().remove(key);
    }
}

/// Counts a new flow, and its first packet, for its gateway and target (and a handshake
/// started, for a SYN).
#[inline(always)]
fn count_new_flow(gateway_id: u32, counter_index: u32, syn: bool, ip_len: u16) {
    if syn {
        count_flow_event(FlowEvent::HALF_OPEN_STARTED);
    }
    count_gateway(gateway_id, |c| &mut c.new_flows);
    if let Some(c) = TARGET_COUNTERS.get_ptr_mut(counter_index) {
        // SAFETY: a per-CPU slot of this CPU.
        unsafe {
            (*c).new_flows += 1;
            (*c).packets_to_target += 1;
            (*c).bytes_to_target += u64::from(ip_len);
        }
    }
}

/// The first packet of a direct-server-return flow: only the client's entry is recorded
/// (a SYN's in `HALF_OPEN`, anything else's in `CONNTRACK`), naming the outer header's
/// addresses; the packet leaves inside it, unchanged.
#[inline(always)]
fn new_dsr_flow<F: Family>(
    packet: &Packet<F>,
    gateway: &GatewayState,
    target: &TargetEntryOf<F::Addr>,
    hash: u32,
    syn: bool,
    w: &mut Work<F>,
) -> Step {
    let key = packet.key();
    let source = match F::dsr_sources().get(gateway.gateway_id) {
        Some(source) => source.address(hash, target.snat_addr),
        None => target.snat_addr,
    };
    w.send = FlowKeyOf {
        src_addr: source,
        dst_addr: target.addr,
        src_port: key.src_port,
        dst_port: key.dst_port,
        proto: key.proto,
        _pad: 0,
        _pad_word: 0,
    };
    w.send_flags = FLOW_DSR;
    let now = now_ns();
    w.flow.rewritten = w.send;
    w.flow.counter_index = target.counter_index;
    w.flow.flags = FLOW_TO_TARGET | FLOW_DSR;
    w.flow.last_seen_ns = now;
    w.flow.created_ns = now;
    let table = if syn { F::half_open() } else { F::conntrack() };
    if table.insert(key, &w.flow, u64::from(BPF_ANY)).is_err() {
        count_gateway(gateway.gateway_id, |c| &mut c.alloc_failed);
        return Step::Done(xdp_action::XDP_DROP);
    }
    count_new_flow(gateway.gateway_id, target.counter_index, syn, packet.ip_len);
    Step::Send
}

/// The pool of a gateway whose pool slot cannot be read (none is configured then either).
static NO_SOURCE_POOL: SourcePool = SourcePool { addrs: [0; MAX_SOURCE_ADDRESSES], count: 0, port_min: 0, port_count: 0 };

/// What a packet's path works on, off the stack (see `WORK`).
#[repr(C)]
struct Work<F: Family> {
    claim: Claim<F>,
    /// The tuple a packet leaves with: its translation, or a direct-server-return packet's
    /// outer addresses (then `send_flags` has `FLOW_DSR`).
    send: FlowKeyOf<F::Addr>,
    send_flags: u32,
    _pad: u32,
    /// The flow's entry: a copy of a known flow's, or a new flow's.
    flow: FlowEntryOf<F::Addr>,
    /// The other half of the flow (its reply entry) being written.
    other: FlowEntryOf<F::Addr>,
    /// A half-open flow's client key and target (reply) key; `reply_key` also holds a known
    /// flow's reply key.
    client_key: FlowKeyOf<F::Addr>,
    reply_key: FlowKeyOf<F::Addr>,
}

/// A search for a free source among a new flow's candidates, run by `bpf_loop` one
/// candidate per call (the verifier checks the callback once, not each iteration), with
/// what it found kept here.
#[repr(C)]
struct Claim<F: Family> {
    /// The flow's key towards the target; its source is each candidate in turn, and the
    /// claimed one at the end.
    to: FlowKeyOf<F::Addr>,
    /// `to` reversed: the key the reply entry is claimed under.
    reply_key: FlowKeyOf<F::Addr>,
    /// A holder's other key, while it is examined.
    holder_key: FlowKeyOf<F::Addr>,
    /// The reply direction's entry, claimed under the reply key.
    from_target: FlowEntryOf<F::Addr>,
    now: u64,
    timeout: u64,
    /// `created_ns` of the oldest half-open holder that may lose its port.
    oldest_created: u64,
    node_addr: F::Addr,
    hash: u32,
    gateway_id: u32,
    /// 1 for full NAT (candidates from the pool), 0 for DNAT (the client's own tuple).
    full_nat: u32,
    /// 1 once a candidate is claimed.
    claimed: u32,
    /// Candidate index + 1 of the first port a closed flow may give up (0: none).
    reusable: u32,
    /// Candidate index + 1 of the oldest half-open holder that may lose its port (0: none).
    oldest: u32,
    /// The candidate `to` holds (the claimed one once `claimed`).
    attempt: u32,
    /// Candidate index + 1 that `PORT_CHOICES` records for the flow (0: none, or not
    /// looked up).
    recorded: u32,
    _pad: u32,
    family: PhantomData<F>,
}

impl<F: Family> Claim<F> {
    /// The gateway's pool (read in place; a copy would not fit the stack).
    #[inline(always)]
    fn pool(&self) -> &'static SourcePool {
        SOURCE_POOLS.get(self.gateway_id).unwrap_or(&NO_SOURCE_POOL)
    }

    /// Makes candidate `attempt` the key's source (full NAT only), and `reply_key` its
    /// reverse.
    #[inline(always)]
    fn candidate(&mut self, attempt: u32) {
        self.attempt = attempt;
        if self.full_nat != 0 {
            let pool = self.pool();
            set_source::<F>(&mut self.to, self.hash, attempt, pool, self.node_addr);
        }
        self.reply_key = self.to.reversed();
    }

    fn attempts(&self) -> u32 {
        if self.full_nat != 0 {
            SNAT_PORT_TRIES
        } else {
            1
        }
    }

    /// Whether `held`, the conntrack entry holding `reply_key`, is a flow closed long
    /// enough ago to give its port up (its forward entry is looked up by `holder_key`).
    #[inline(always)]
    fn reusable_holder(&mut self, held: &FlowEntryOf<F::Addr>) -> bool {
        self.holder_key = held.rewritten.reversed();
        // SAFETY: a map value read in place.
        port_reusable(held, unsafe { F::conntrack().get(&self.holder_key) }, self.now)
    }
}

/// Sets the full-NAT source of candidate `attempt` of a flow: a port of the gateway's
/// range and, with a pool, one of its addresses (else the node's address towards the
/// target).
#[inline(always)]
fn set_source<F: Family>(to: &mut FlowKeyOf<F::Addr>, hash: u32, attempt: u32, pool: &SourcePool, node_addr: F::Addr) {
    let (port_min, port_count) =
        if pool.port_count == 0 { (SNAT_PORT_MIN, SNAT_PORT_MAX - SNAT_PORT_MIN + 1) } else { (pool.port_min, pool.port_count) };
    to.src_port = snat_port_in(hash, attempt, port_min, port_count).to_be();
    to.src_addr = node_addr;
    if pool.count > 0 {
        let i = snat_address_index(hash, attempt, pool.count) as usize;
        if let Some(addr) = F::pool_address(pool, i) {
            to.src_addr = addr;
        }
    }
}

/// This CPU's claim in `WORK`, for a `bpf_loop` callback (whose context must be on the
/// stack, so the slot is looked up again).
#[inline(always)]
fn claim_of<F: Family>() -> Option<&'static mut Claim<F>> {
    // SAFETY: this CPU's slot, which `new_flow` filled; nothing else uses it meanwhile
    // (`new_flow` holds no reference into it across `bpf_loop`).
    F::work().map(|w| unsafe { &mut (*w).claim })
}

/// One candidate of a half-open flow's search (a `bpf_loop` callback): claimed in
/// `HALF_OPEN` when no established flow and no live half-open flow holds it; a holder past
/// the half-open timeout gives it up at once; otherwise the best fallbacks are noted.
/// Returns 1 to stop the loop.
extern "C" fn half_open_candidate<F: Family>(index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(claim) = claim_of::<F>() else { return 1 };
    let attempt = index as u32;
    claim.candidate(attempt);
    // SAFETY: a map value read in place.
    if let Some(held) = unsafe { F::conntrack().get(&claim.reply_key) } {
        if claim.reusable == 0 && claim.reusable_holder(held) {
            claim.reusable = attempt + 1;
        }
        return 0;
    }
    if F::half_open().insert(&claim.reply_key, &claim.from_target, u64::from(BPF_NOEXIST)).is_ok() {
        claim.claimed = 1;
        return 1;
    }
    // SAFETY: a map value read in place.
    let Some(holder) = (unsafe { F::half_open().get(&claim.reply_key) }) else { return 0 };
    if holder.rewritten == claim.from_target.rewritten {
        // This very flow: a SYN again, its own entry evicted meanwhile.
        claim.claimed = 1;
        return 1;
    }
    let holder_created = holder.created_ns;
    if half_open_expired(holder_created, claim.now, claim.timeout) {
        claim.holder_key = holder.rewritten.reversed();
        let _ = F::half_open().remove(&claim.holder_key);
        let _ = F::half_open().remove(&claim.reply_key);
        count_flow_event(FlowEvent::HALF_OPEN_EXPIRED);
        if F::half_open().insert(&claim.reply_key, &claim.from_target, u64::from(BPF_NOEXIST)).is_ok() {
            claim.claimed = 1;
            return 1;
        }
        return 0;
    }
    if half_open_port_takeable(holder_created, claim.now) && (claim.oldest == 0 || holder_created < claim.oldest_created) {
        claim.oldest = attempt + 1;
        claim.oldest_created = holder_created;
    }
    0
}

/// Claims the reply key of a new half-open flow in `HALF_OPEN`, atomically across CPUs: a
/// candidate source no established flow holds and no live half-open flow holds. When every
/// candidate is held, a closed flow's port is taken as in [`claim_conntrack`], else the
/// oldest half-open holder old enough ([`half_open_port_takeable`]) loses its port (a SYN
/// flood's pressure). With DNAT there is one candidate, the client's own tuple.
#[inline(always)]
fn claim_half_open<F: Family>(work: *mut Work<F>) -> bool {
    // SAFETY: this CPU's slot; no reference into it is held across the loop, whose
    // callbacks use it.
    let attempts = unsafe { (*work).claim.attempts() };
    // SAFETY: the callback is a static function of this program.
    unsafe { bpf_loop(attempts, half_open_candidate::<F> as *mut _, core::ptr::null_mut(), 0) };
    // SAFETY: as above, the loop is over.
    let claim = unsafe { &mut (*work).claim };
    if claim.claimed != 0 {
        return true;
    }
    if claim.full_nat == 0 {
        return false;
    }
    if claim.reusable != 0 {
        claim.candidate(claim.reusable - 1);
        // SAFETY: a map value read in place.
        if let Some(held) = unsafe { F::conntrack().get(&claim.reply_key) } {
            if claim.reusable_holder(held) {
                let _ = F::conntrack().remove(&claim.holder_key);
                let _ = F::conntrack().remove(&claim.reply_key);
                if F::half_open().insert(&claim.reply_key, &claim.from_target, u64::from(BPF_NOEXIST)).is_ok() {
                    return true;
                }
            }
        }
    }
    if claim.oldest != 0 {
        claim.candidate(claim.oldest - 1);
        // SAFETY: a map value read in place.
        if let Some(holder) = unsafe { F::half_open().get(&claim.reply_key) } {
            if holder.created_ns == claim.oldest_created {
                claim.holder_key = holder.rewritten.reversed();
                let _ = F::half_open().remove(&claim.holder_key);
                let _ = F::half_open().remove(&claim.reply_key);
                count_flow_event(FlowEvent::HALF_OPEN_TAKEN_OVER);
            }
        }
        return F::half_open().insert(&claim.reply_key, &claim.from_target, u64::from(BPF_NOEXIST)).is_ok();
    }
    false
}

/// One candidate of a conntrack flow's search (a `bpf_loop` callback): claimed in
/// `CONNTRACK` unless a live half-open flow or another flow holds it. Returns 1 to stop.
extern "C" fn conntrack_candidate<F: Family>(index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(claim) = claim_of::<F>() else { return 1 };
    let attempt = index as u32;
    claim.candidate(attempt);
    if claim.to.proto == PROTO_TCP {
        // SAFETY: a map value read in place.
        if let Some(holder) = unsafe { F::half_open().get(&claim.reply_key) } {
            if holder.rewritten != claim.from_target.rewritten && !half_open_expired(holder.created_ns, claim.now, claim.timeout) {
                return 0;
            }
        }
    }
    if F::conntrack().insert(&claim.reply_key, &claim.from_target, u64::from(BPF_NOEXIST)).is_ok() {
        claim.claimed = 1;
        return 1;
    }
    // Taken: by this very flow (its forward entry was evicted, or another CPU got its first
    // packet too), or by another flow, then try the next port.
    // SAFETY: a map value read in place.
    let Some(existing) = (unsafe { F::conntrack().get(&claim.reply_key) }) else { return 0 };
    if existing.rewritten == claim.from_target.rewritten {
        claim.claimed = 1;
        return 1;
    }
    if claim.reusable == 0 && claim.reusable_holder(existing) {
        claim.reusable = attempt + 1;
    }
    0
}

/// Claims the source `PORT_CHOICES` records for a full-NAT flow seen mid-stream (one whose
/// conntrack entries were evicted, perhaps): its target knows the connection on that one,
/// which need not be the first free candidate by now. False when there is no record or
/// another flow holds that source.
#[inline(never)]
fn claim_recorded<F: Family>(work: *mut Work<F>, key: &FlowKeyOf<F::Addr>) -> bool {
    // SAFETY: a map value read in place.
    let Some(&attempt) = (unsafe { F::port_choices().get(key) }) else { return false };
    if attempt >= SNAT_PORT_TRIES {
        return false;
    }
    // SAFETY: as in `claim_half_open`; the candidate's callback is done with it when read.
    unsafe { (*work).claim.recorded = attempt + 1 };
    conntrack_candidate::<F>(u64::from(attempt), core::ptr::null_mut());
    // SAFETY: as above.
    unsafe { (*work).claim.claimed != 0 }
}

/// Claims the reply key of a flow that goes straight to `CONNTRACK` (UDP, or a TCP flow
/// seen mid-stream), atomically across CPUs: with full NAT, each candidate source is one
/// attempt, so two CPUs never hand out the same one. The first candidate held by a flow
/// closed long enough ago is used only if none is free, since the target may still hold
/// that connection in TIME_WAIT and refuse a new one on the same port.
#[inline(always)]
fn claim_conntrack<F: Family>(work: *mut Work<F>, key: &FlowKeyOf<F::Addr>) -> bool {
    // SAFETY: as in `claim_half_open`.
    if unsafe { (*work).claim.full_nat } != 0 && claim_recorded(work, key) {
        return true;
    }
    // SAFETY: as in `claim_half_open`.
    let attempts = unsafe { (*work).claim.attempts() };
    // SAFETY: the callback is a static function of this program.
    unsafe { bpf_loop(attempts, conntrack_candidate::<F> as *mut _, core::ptr::null_mut(), 0) };
    // SAFETY: as in `claim_half_open`.
    let claim = unsafe { &mut (*work).claim };
    if claim.claimed != 0 {
        return true;
    }
    if claim.full_nat != 0 && claim.reusable != 0 {
        claim.candidate(claim.reusable - 1);
        return take_over_port(claim);
    }
    false
}

/// Takes the source port of `claim.reply_key` over from the flow closed a while ago that
/// holds it, rather than wait for the agent's sweep: that flow's two entries are removed,
/// then the port is claimed again atomically (another CPU may win it). False if the holder
/// is no longer such a flow, or the claim was lost.
#[inline(always)]
fn take_over_port<F: Family>(claim: &mut Claim<F>) -> bool {
    // SAFETY: a map value read in place.
    if let Some(existing) = unsafe { F::conntrack().get(&claim.reply_key) } {
        if !claim.reusable_holder(existing) {
            return false;
        }
        let _ = F::conntrack().remove(&claim.holder_key);
        let _ = F::conntrack().remove(&claim.reply_key);
    }
    F::conntrack().insert(&claim.reply_key, &claim.from_target, u64::from(BPF_NOEXIST)).is_ok()
}

/// `bpf_ktime_get_ns` as of this CPU's last jiffy (at most one jiffy old).
#[inline(always)]
fn coarse_now_ns() -> u64 {
    // SAFETY: bpf_jiffies64 has no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(clock) = COARSE_CLOCK.get_ptr_mut(0) else { return now_ns() };
    // SAFETY: this CPU's slot; nothing else writes it while we run here.
    unsafe {
        if (*clock).jiffies != jiffies {
            (*clock).jiffies = jiffies;
            (*clock).ns = now_ns();
        }
        (*clock).ns
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Rewrites addresses and ports to `to`, updating the IPv4 header's and the TCP/UDP
/// checksums incrementally (the L4 checksum covers the addresses through the
/// pseudo-header, in both families).
#[inline(always)]
fn rewrite<F: Family>(ctx: &XdpContext, packet: &Packet<F>, to: &FlowKeyOf<F::Addr>) -> Result<(), Error> {
    let from = packet.key();
    let addresses = from.dst_addr.replace_in(to.dst_addr, from.src_addr.replace_in(to.src_addr, CsumDelta::new()));
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
        F::write_addresses(packet.l3, to, addresses);
        ports.cast::<u16>().write_unaligned(to.src_port);
        ports.add(2).cast::<u16>().write_unaligned(to.dst_port);
        let check = ports.add(check_at).cast::<u16>();
        let old = check.read_unaligned();
        check.write_unaligned(if udp { l4.apply_udp(old) } else { l4.apply(old) });
    }
    Ok(())
}

/// Where a packet leaves, as the FIB (or its per-CPU cache) says.
enum Route {
    /// Out of `egress` (the packet came in on `ingress`), with these MACs (as
    /// [`mac_words`] gives them).
    Send { egress: u32, ingress: u32, macs: [u16; 6] },
    /// The packet is larger than the egress MTU (which is given).
    TooBig(u16),
    /// No next hop to send to from XDP: the kernel should handle the packet.
    Pass(ForwardEvent),
}

/// The route of a packet of `len` bytes (IP length) from `src` to `dst` (network order),
/// with the L4 fields the FIB may hash on.
#[inline(always)]
fn route<F: Family>(ctx: &XdpContext, src: F::Addr, dst: F::Addr, proto: u8, sport: u16, dport: u16, len: u16) -> Route {
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: bpf_jiffies64 has no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let slot = (src.low_word() ^ dst.low_word().rotate_left(16) ^ ingress).wrapping_mul(0x9e37_79b1) >> 24;
    let cached = F::next_hops().get_ptr_mut(slot & (NEXT_HOP_SLOTS - 1));
    if let Some(hop) = cached {
        // SAFETY: this CPU's slot; nothing else writes it while we run here.
        let h = unsafe { &*hop };
        if h.dst == dst && h.src == src && h.ingress == ingress && jiffies < h.expires && len <= h.mtu {
            return Route::Send { egress: h.egress, ingress, macs: mac_words(&h.dmac, &h.smac) };
        }
    }
    let Some(fib) = FIB_PARAMS.get_ptr_mut(0) else { return Route::Pass(ForwardEvent::PASS_FIB) };
    // Zeroed word by word: `mem::zeroed()` assigned whole becomes a byte-at-a-time memset
    // (see `copy_value`); volatile stores are not merged back into one.
    let words = fib.cast::<u64>();
    for i in 0..mem::size_of::<FibParams>() / 8 {
        // SAFETY: this CPU's slot, 8-byte aligned, `size_of::<FibParams>()` bytes long;
        // all-zero is a valid bpf_fib_lookup (plain integers and unions of integers).
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: this CPU's slot; nothing else uses it while we run here.
    let fib = unsafe { &mut *fib };
    fib.family = F::FIB_FAMILY;
    fib.l4_protocol = proto;
    fib.sport = sport;
    fib.dport = dport;
    fib.__bindgen_anon_1.tot_len = len;
    fib.ifindex = ingress;
    F::set_fib_addresses(fib, src, dst);
    // SAFETY: `fib` is a valid bpf_fib_lookup on our stack, its size passed alongside.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), fib, mem::size_of::<FibParams>() as i32, 0) };
    if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        if let Some(hop) = cached {
            // SAFETY: this CPU's slot; on success the FIB wrote the egress MTU over tot_len.
            unsafe {
                *hop = NextHop {
                    src,
                    dst,
                    ingress,
                    egress: fib.ifindex,
                    expires: jiffies + NEXT_HOP_TTL_JIFFIES,
                    mtu: fib.__bindgen_anon_1.mtu_result,
                    smac: fib.smac,
                    dmac: fib.dmac,
                    _pad: [0; 2],
                };
            }
        }
        return Route::Send { egress: fib.ifindex, ingress, macs: mac_words(&fib.dmac, &fib.smac) };
    }
    if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        // SAFETY: on FRAG_NEEDED the FIB wrote the egress MTU over tot_len.
        return Route::TooBig(unsafe { fib.__bindgen_anon_1.mtu_result });
    }
    Route::Pass(if rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) { ForwardEvent::PASS_NO_NEIGH } else { ForwardEvent::PASS_FIB })
}

/// Writes the route's MACs into the Ethernet header at `eth` and sends the packet, or
/// passes it to the kernel when XDP cannot send it.
#[inline(always)]
fn send_by(eth: *mut EthHdr, route: Route) -> u32 {
    match route {
        Route::Send { egress, ingress, macs } => {
            write_mac_words(eth, macs);
            send(egress, ingress)
        }
        // The kernel sends "fragmentation needed" for a translated packet itself.
        Route::TooBig(_) => {
            count_event(ForwardEvent::PASS_FIB);
            xdp_action::XDP_PASS
        }
        Route::Pass(event) => {
            count_event(event);
            xdp_action::XDP_PASS
        }
    }
}

/// Sends a translated packet on its way: the FIB names the egress interface and next-hop
/// MAC; without a resolved neighbour (or for a local destination) the kernel forwards it.
#[inline(always)]
fn forward<F: Family>(ctx: &XdpContext, packet: &Packet<F>, to: &FlowKeyOf<F::Addr>) -> u32 {
    let route = route::<F>(ctx, to.src_addr, to.dst_addr, to.proto, to.src_port, to.dst_port, packet.ip_len);
    send_by(packet.eth, route)
}

/// Sends a direct-server-return packet to its target inside an outer header of its own
/// family (IP in IP, IPv6 in IPv6) from `outer.src_addr` to `outer.dst_addr`; the packet
/// itself is left as it came. One that would no longer fit the egress MTU is answered with
/// an ICMP "fragmentation needed" (ICMPv6 "packet too big") to the client instead. Without
/// a resolved neighbour the kernel forwards the encapsulated packet.
#[inline(always)]
fn encapsulate<F: Family>(ctx: &XdpContext, packet: &Packet<F>, outer: &FlowKeyOf<F::Addr>) -> Result<u32, Error> {
    let added = F::HEADER_LEN as u16;
    let Some(outer_len) = packet.ip_len.checked_add(added) else {
        return F::icmp_too_big(ctx, packet, u16::MAX - added);
    };
    // Ports hidden from the compiler: two zero stores merged into one 32-bit store land
    // misaligned on the stack, which the verifier refuses.
    let no_port = core::hint::black_box(0u16);
    let route = route::<F>(ctx, outer.src_addr, outer.dst_addr, F::PROTO_ENCAP, no_port, no_port, outer_len);
    if let Route::TooBig(mtu) = route {
        return F::icmp_too_big(ctx, packet, mtu.saturating_sub(added));
    }
    // SAFETY: `parse` checked the IP header; its first word holds the version and the
    // TOS (traffic class and flow label), which the outer header keeps.
    let inner_word = unsafe { packet.l3.cast::<u32>().read_unaligned() };
    let macs = read_macs(packet.eth);
    // SAFETY: the helper moves the packet's start; packet pointers are fetched again below.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), -i32::from(added)) } != 0 {
        count_event(ForwardEvent::ENCAP_FAILED);
        return Ok(xdp_action::XDP_DROP);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let l3: *mut [u8; IPV6_HEADER_LEN] = ptr_at(ctx, EthHdr::LEN)?;
    // The frame as it arrived, for the kernel should it have to forward it.
    write_mac_words(eth, macs);
    // SAFETY: `ptr_at` checked that the Ethernet header and 40 bytes after it (an outer
    // header of either family) lie in the packet.
    unsafe {
        (*eth).ether_type = F::ETHER_TYPE;
        F::write_outer_header(l3.cast(), inner_word, outer_len, outer.src_addr, outer.dst_addr);
    }
    Ok(send_by(eth, route))
}

/// Writes a fixed IPv6 header: `first_word` gives the traffic class and flow label (its
/// version is set to 6), `payload_len` and `next_header` what follows.
///
/// # Safety
/// `ip` must point at 40 writable bytes inside the packet.
#[inline(always)]
unsafe fn write_ipv6_header(
    ip: *mut u8,
    first_word: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    src: Ipv6Words,
    dst: Ipv6Words,
) {
    let mut first = first_word.to_ne_bytes();
    first[0] = 0x60 | (first[0] & 0x0f);
    let len = payload_len.to_be_bytes();
    // SAFETY: the caller's contract.
    unsafe {
        ip.cast::<[u8; 4]>().write_unaligned(first);
        ip.add(4).cast::<[u8; 4]>().write_unaligned([len[0], len[1], next_header, hop_limit]);
        write_ipv6_address(ip.add(IPV6_SRC_AT), src);
        write_ipv6_address(ip.add(IPV6_DST_AT), dst);
    }
}

/// Writes an IPv4 header without options (TTL 64, don't fragment) and its checksum.
///
/// # Safety
/// `ip` must point at 20 writable bytes inside the packet.
#[inline(always)]
unsafe fn write_ipv4_header(ip: *mut Ipv4Hdr, tos: u8, len: u16, proto: u8, src: u32, dst: u32) {
    // SAFETY: the caller's contract.
    unsafe {
        (*ip).vihl = 0x45;
        (*ip).tos = tos;
        (*ip).tot_len = len.to_be_bytes();
        (*ip).id = [0, 0];
        (*ip).frags = IP_DONT_FRAGMENT;
        (*ip).ttl = 64;
        (*ip).proto = proto;
        (*ip).check = [0, 0];
        (*ip).src_addr = src.to_ne_bytes();
        (*ip).dst_addr = dst.to_ne_bytes();
        (*ip).check = (!fold(sum_words(&*ip.cast::<[u8; Ipv4Hdr::LEN]>()))).to_ne_bytes();
    }
}

/// Answers a packet that cannot be sent encapsulated with an ICMP "fragmentation needed"
/// (type 3, code 4) naming `mtu`, back to its sender out of the interface it came in on,
/// quoting its IP header and first 8 bytes (a header with options is dropped instead:
/// TCP and UDP stacks send none).
#[inline(always)]
fn icmp_too_big(ctx: &XdpContext, packet: &Packet<V4>, mtu: u16) -> Result<u32, Error> {
    let ip = packet.l3.cast::<Ipv4Hdr>();
    // SAFETY: `parse` checked the IP header.
    let (vihl, src, dst) = unsafe { ((*ip).vihl, (*ip).src_addr, (*ip).dst_addr) };
    if vihl != 0x45 {
        return Ok(xdp_action::XDP_DROP);
    }
    let macs = read_macs(packet.eth);
    let added = Ipv4Hdr::LEN + ICMP_HEADER_LEN;
    // SAFETY: the helper moves the packet's start; packet pointers are fetched again below.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), -(added as i32)) } != 0 {
        count_event(ForwardEvent::ENCAP_FAILED);
        return Ok(xdp_action::XDP_DROP);
    }
    // Ethernet, the new IP header and ICMP header, then the quoted header and 8 bytes.
    let wanted = EthHdr::LEN + added + Ipv4Hdr::LEN + ICMP_QUOTED_L4_LEN;
    let len = ctx.data_end() - ctx.data();
    if len < wanted {
        return Ok(xdp_action::XDP_DROP);
    }
    // SAFETY: the helper only shortens the packet; packet pointers are fetched again below.
    if len > wanted && unsafe { bpf_xdp_adjust_tail(ctx.as_ptr().cast(), wanted as i32 - len as i32) } != 0 {
        return Ok(xdp_action::XDP_DROP);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    let icmp: *mut [u8; ICMP_HEADER_LEN] = ptr_at(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    let quoted: *mut [u8; ICMP_HEADER_LEN + Ipv4Hdr::LEN + ICMP_QUOTED_L4_LEN] = ptr_at(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    // Back where it came from: the sender's MAC becomes the destination.
    write_mac_words(eth, [macs[3], macs[4], macs[5], macs[0], macs[1], macs[2]]);
    // SAFETY: `ptr_at` checked every header written lies in the packet.
    unsafe {
        (*eth).ether_type = EtherType::Ipv4 as u16;
        write_ipv4_header(ip, 0, (wanted - EthHdr::LEN) as u16, PROTO_ICMP, u32::from_ne_bytes(dst), u32::from_ne_bytes(src));
        let mtu = mtu.to_be_bytes();
        *icmp = [3, 4, 0, 0, 0, 0, mtu[0], mtu[1]];
        let check = (!fold(sum_words(&*quoted))).to_ne_bytes();
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    count_event(ForwardEvent::ICMP_TOO_BIG);
    Ok(xdp_action::XDP_TX)
}

/// Answers an IPv6 packet that cannot be sent encapsulated with an ICMPv6 "packet too big"
/// (type 2) naming `mtu`, back to its sender out of the interface it came in on, from the
/// address it was sent to, quoting its fixed header and first 8 bytes.
#[inline(always)]
fn icmp6_too_big(ctx: &XdpContext, packet: &Packet<V6>, mtu: u16) -> Result<u32, Error> {
    let key = *packet.key();
    let macs = read_macs(packet.eth);
    let added = IPV6_HEADER_LEN + ICMP_HEADER_LEN;
    // SAFETY: the helper moves the packet's start; packet pointers are fetched again below.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), -(added as i32)) } != 0 {
        count_event(ForwardEvent::ENCAP_FAILED);
        return Ok(xdp_action::XDP_DROP);
    }
    // Ethernet, the new IPv6 and ICMPv6 headers, then the quoted header and 8 bytes.
    const MESSAGE_LEN: usize = ICMP_HEADER_LEN + IPV6_HEADER_LEN + ICMP_QUOTED_L4_LEN;
    let wanted = EthHdr::LEN + IPV6_HEADER_LEN + MESSAGE_LEN;
    let len = ctx.data_end() - ctx.data();
    if len < wanted {
        return Ok(xdp_action::XDP_DROP);
    }
    // SAFETY: the helper only shortens the packet; packet pointers are fetched again below.
    if len > wanted && unsafe { bpf_xdp_adjust_tail(ctx.as_ptr().cast(), wanted as i32 - len as i32) } != 0 {
        return Ok(xdp_action::XDP_DROP);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    let ip: *mut [u8; IPV6_HEADER_LEN] = ptr_at(ctx, EthHdr::LEN)?;
    let message: *mut [u8; MESSAGE_LEN] = ptr_at(ctx, EthHdr::LEN + IPV6_HEADER_LEN)?;
    write_mac_words(eth, [macs[3], macs[4], macs[5], macs[0], macs[1], macs[2]]);
    let mtu = u32::from(mtu).to_be_bytes();
    // SAFETY: `ptr_at` checked every header written lies in the packet.
    unsafe {
        (*eth).ether_type = EtherType::Ipv6 as u16;
        write_ipv6_header(ip.cast(), 0, MESSAGE_LEN as u16, PROTO_ICMPV6, 255, key.dst_addr, key.src_addr);
        let icmp = message.cast::<[u8; ICMP_HEADER_LEN]>();
        *icmp = [2, 0, 0, 0, mtu[0], mtu[1], mtu[2], mtu[3]];
        // The checksum covers a pseudo-header: both addresses, the length and the protocol.
        let pseudo = sum_words(&*ip.cast::<u8>().add(IPV6_SRC_AT).cast::<[u8; 32]>())
            + u64::from(u16::from_ne_bytes((MESSAGE_LEN as u16).to_be_bytes()))
            + u64::from(u16::from_ne_bytes(u16::from(PROTO_ICMPV6).to_be_bytes()));
        let check = (!fold(pseudo + sum_words(&*message))).to_ne_bytes();
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    count_event(ForwardEvent::ICMP_TOO_BIG);
    Ok(xdp_action::XDP_TX)
}

/// The Ethernet header's two addresses as six 16-bit words (destination, then source).
#[inline(always)]
fn read_macs(eth: *mut EthHdr) -> [u16; 6] {
    let at = eth.cast::<u16>();
    // SAFETY: the caller checked that a whole EthHdr lies inside the packet.
    unsafe {
        [
            at.read_unaligned(),
            at.add(1).read_unaligned(),
            at.add(2).read_unaligned(),
            at.add(3).read_unaligned(),
            at.add(4).read_unaligned(),
            at.add(5).read_unaligned(),
        ]
    }
}

/// Writes the words [`read_macs`] returns.
#[inline(always)]
fn write_mac_words(eth: *mut EthHdr, words: [u16; 6]) {
    let at = eth.cast::<u16>();
    // SAFETY: the caller checked that a whole EthHdr lies inside the packet.
    unsafe {
        for (i, w) in words.iter().enumerate() {
            at.add(i).write_unaligned(*w);
        }
    }
}

/// Decapsulates IP-in-IP packets (a direct-server-return splitter's) on a target whose
/// kernel has no `ipip` device: the outer IPv4 header is removed and the packet the client
/// sent, addressed to the VIP the target holds on its loopback, goes up the stack.
/// Everything else is passed untouched.
#[xdp]
pub fn splitter_decap(ctx: XdpContext) -> u32 {
    match try_decap(&ctx) {
        Ok(action) => action,
        Err(_) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<u32, Error> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that a whole EthHdr lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv6 as u16 {
        return try_decap6(ctx, eth);
    }
    if ether_type != EtherType::Ipv4 as u16 {
        return Err(Error::Pass);
    }
    let outer: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    let inner: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    // SAFETY: `ptr_at` checked both headers lie inside the packet.
    let (vihl, proto, frags, inner_vihl) = unsafe { ((*outer).vihl, (*outer).proto, (*outer).frags, (*inner).vihl) };
    // Only an outer header without options and not a fragment (the kernel reassembles
    // those), around an IPv4 packet.
    if vihl != 0x45 || proto != PROTO_IPIP || u16::from_ne_bytes(frags) & IP_FRAGMENT_MASK != 0 || inner_vihl >> 4 != 4 {
        return Err(Error::Pass);
    }
    let macs = read_macs(eth);
    // SAFETY: the helper moves the packet's start; the Ethernet header is fetched again.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), Ipv4Hdr::LEN as i32) } != 0 {
        return Err(Error::Pass);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    write_mac_words(eth, macs);
    // SAFETY: `ptr_at` checked that a whole EthHdr lies inside the packet.
    unsafe { (*eth).ether_type = EtherType::Ipv4 as u16 };
    Ok(xdp_action::XDP_PASS)
}

/// Decapsulates IPv6-in-IPv6: an outer fixed header whose next header is IPv6, around an
/// IPv6 packet.
#[inline(always)]
fn try_decap6(ctx: &XdpContext, eth: *mut EthHdr) -> Result<u32, Error> {
    let outer: *mut [u8; IPV6_HEADER_LEN] = ptr_at(ctx, EthHdr::LEN)?;
    let inner: *mut [u8; IPV6_HEADER_LEN] = ptr_at(ctx, EthHdr::LEN + IPV6_HEADER_LEN)?;
    // SAFETY: `ptr_at` checked both headers lie inside the packet.
    let (version, next_header, inner_version) = unsafe { ((*outer)[0] >> 4, (*outer)[6], (*inner)[0] >> 4) };
    if version != 6 || next_header != PROTO_IPV6 || inner_version != 6 {
        return Err(Error::Pass);
    }
    let macs = read_macs(eth);
    // SAFETY: the helper moves the packet's start; the Ethernet header is fetched again.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr().cast(), IPV6_HEADER_LEN as i32) } != 0 {
        return Err(Error::Pass);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    write_mac_words(eth, macs);
    // SAFETY: `ptr_at` checked that a whole EthHdr lies inside the packet.
    unsafe { (*eth).ether_type = EtherType::Ipv6 as u16 };
    Ok(xdp_action::XDP_PASS)
}

/// Sends a forwarded packet out of `egress`: back out of the interface it came in on, or
/// redirected to another.
#[inline(always)]
fn send(egress: u32, ingress: u32) -> u32 {
    if egress == ingress {
        count_event(ForwardEvent::TX);
        return xdp_action::XDP_TX;
    }
    count_event(ForwardEvent::REDIRECT);
    // SAFETY: bpf_redirect only records the target interface for this packet.
    unsafe { bpf_redirect(egress, 0) as u32 }
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
