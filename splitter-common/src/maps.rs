//! Keys and values of the datapath's BPF maps.
//!
//! Addresses and ports are kept exactly as they sit in packet headers ("network byte
//! order"): an IPv4 address is the four header bytes read as one native `u32`, an IPv6
//! address the sixteen read as four (`Ipv6Words`). Both sides convert with
//! `u32::from_ne_bytes(ip.octets())` / `u16::to_be()`.
//!
//! The keys and values that hold addresses are generic over the [`Address`] and exist in
//! two forms with the same fields: `FlowKey` (IPv4) and `FlowKey6` (IPv6), and so on. The
//! IPv6 forms live in maps of their own (`CONNTRACK6`, ...), so IPv4 keys stay small.

use bytemuck::{Pod, Zeroable};

use crate::{assert_size, csum::CsumDelta, flow::mix64, table::BUCKET_TABLE_SIZE};

/// An IPv6 address as maps hold it: the header's sixteen bytes as four native words.
pub type Ipv6Words = [u32; 4];

/// An IPv6 address's header bytes as maps hold them.
pub fn ipv6_words(octets: [u8; 16]) -> Ipv6Words {
    core::array::from_fn(|i| u32::from_ne_bytes([octets[4 * i], octets[4 * i + 1], octets[4 * i + 2], octets[4 * i + 3]]))
}

/// The header bytes of an IPv6 address as maps hold it.
pub fn ipv6_octets(words: Ipv6Words) -> [u8; 16] {
    core::array::from_fn(|i| words[i / 4].to_ne_bytes()[i % 4])
}

/// An address as map keys and values hold it (network byte order, see the module docs).
pub trait Address: Copy + Clone + PartialEq + Eq + Default + Pod + core::fmt::Debug + core::hash::Hash {
    /// 32 bits standing for the address in flow hashes and the address filter: an IPv4
    /// address itself, an IPv6 address's four words mixed (the same on every node).
    fn fold(self) -> u32;
    /// The address's last 32 bits (network order, as loaded): a cheap key for caches local
    /// to a node, where a collision costs a miss and nothing else.
    fn low_word(self) -> u32;
    /// True for the all-zero address (none set).
    fn is_zero(self) -> bool;
    /// `self` with the bits of `host_mask` taken from `hash` (a prefix's host part).
    fn with_host_bits(self, hash: u32, host_mask: Self) -> Self;
    /// `delta` with the change of this address to `new` recorded (checksums that cover it).
    fn replace_in(self, new: Self, delta: CsumDelta) -> CsumDelta;
}

impl Address for u32 {
    #[inline(always)]
    fn fold(self) -> u32 {
        self
    }

    #[inline(always)]
    fn low_word(self) -> u32 {
        self
    }

    #[inline(always)]
    fn is_zero(self) -> bool {
        self == 0
    }

    #[inline(always)]
    fn with_host_bits(self, hash: u32, host_mask: Self) -> Self {
        self | (hash & host_mask)
    }

    #[inline(always)]
    fn replace_in(self, new: Self, delta: CsumDelta) -> CsumDelta {
        delta.replace32(self, new)
    }
}

impl Address for Ipv6Words {
    #[inline(always)]
    fn fold(self) -> u32 {
        let high = (u64::from(self[0]) << 32) | u64::from(self[1]);
        let low = (u64::from(self[2]) << 32) | u64::from(self[3]);
        let h = mix64(high ^ mix64(low ^ 0x2545_f491_4f6c_dd1d));
        (h ^ (h >> 32)) as u32
    }

    #[inline(always)]
    fn low_word(self) -> u32 {
        self[3]
    }

    #[inline(always)]
    fn is_zero(self) -> bool {
        self[0] | self[1] | self[2] | self[3] == 0
    }

    /// The hash varies the low 32 bits at most (a prefix of /96 or longer uses all it has).
    #[inline(always)]
    fn with_host_bits(self, hash: u32, host_mask: Self) -> Self {
        [self[0], self[1], self[2], self[3] | (hash & host_mask[3])]
    }

    #[inline(always)]
    fn replace_in(self, new: Self, delta: CsumDelta) -> CsumDelta {
        delta.replace32(self[0], new[0]).replace32(self[1], new[1]).replace32(self[2], new[2]).replace32(self[3], new[3])
    }
}

/// Implements `Pod` for the IPv4 and IPv6 forms of a generic shared type.
macro_rules! pod_forms {
    ($($t:ident),*) => {
        $(
            // SAFETY: `#[repr(C)]`, no padding in either form (the size assertions beside
            // the type), and every field is `Pod`, so every bit pattern is valid.
            unsafe impl Pod for $t<u32> {}
            // SAFETY: as above.
            unsafe impl Pod for $t<Ipv6Words> {}
        )*
    };
}

/// Targets one table generation of a gateway can hold.
pub const MAX_TARGETS_PER_GATEWAY: u32 = 256;
/// Default number of gateways the maps are sized for (`--max-gateways`).
pub const DEFAULT_MAX_GATEWAYS: u32 = 64;
/// Default conntrack capacity in entries; each flow takes two (`--conntrack-size`).
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
/// Default capacity of the half-open table in entries; each flow takes two
/// (`--half-open-size`). A flood evicts the oldest half-open flows first, so the table
/// needs to hold only what arrives within a handshake's round trip.
pub const DEFAULT_HALF_OPEN_ENTRIES: u32 = 262_144;
/// Capacity of `PORT_CHOICES` (and `PORT_CHOICES6`) for a conntrack of `conntrack_entries`:
/// only full-NAT flows whose first candidate source was held have a record, a small share
/// of the flows (two conntrack entries each) unless their targets' ports run short; when
/// more have one, the least recently recorded make room.
pub const fn port_choice_entries(conntrack_entries: u32) -> u32 {
    let entries = conntrack_entries / 8;
    if entries < 1024 {
        1024
    } else {
        entries
    }
}

/// Per-target counter slots (one per gateway target, stable across weight changes).
pub const MAX_TARGET_COUNTERS: u32 = 4096;

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Which gateway a packet addressed to `vip:port` over `proto` belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Zeroable)]
pub struct GatewayKeyOf<A> {
    /// Virtual address, network byte order.
    pub vip: A,
    /// Gateway port, network byte order.
    pub port: u16,
    /// IP protocol (`PROTO_TCP` or `PROTO_UDP`).
    pub proto: u8,
    pub _pad: u8,
}
pub type GatewayKey = GatewayKeyOf<u32>;
pub type GatewayKey6 = GatewayKeyOf<Ipv6Words>;
assert_size!(GatewayKey, 8);
assert_size!(GatewayKey6, 20);

/// `GatewayState.flags`: keep the client's source address (DNAT) instead of full NAT.
pub const GATEWAY_DNAT: u32 = 1;
/// `GatewayState.flags`: hash new flows on the client address alone (`sticky: client`).
pub const GATEWAY_STICKY_CLIENT: u32 = 2;
/// `GatewayState.flags`: the gateway's port speaks HTTP (`9050/http`): the status line of
/// its targets' responses is counted.
pub const GATEWAY_HTTP: u32 = 4;
/// `GatewayState.flags`: direct server return: packets go to targets unchanged inside an
/// outer IPv4 header (IP in IP), and targets answer clients directly.
pub const GATEWAY_DSR: u32 = 8;

/// The live state of a gateway. Written as a whole by the agent after the table it names
/// is complete, so a packet sees either the old table or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct GatewayState {
    /// Index of the gateway in `GATEWAY_COUNTERS` (host order).
    pub gateway_id: u32,
    /// Index in `BUCKET_TABLES` of the live table; its targets start at
    /// `table_index * MAX_TARGETS_PER_GATEWAY` in `TARGETS` (host order).
    pub table_index: u32,
    /// Number of targets in the live table; 0 means no target takes traffic (host order).
    pub target_count: u32,
    /// `GATEWAY_*` bits (host order).
    pub flags: u32,
    /// Table generation, increasing with each change (host order); informational.
    pub generation: u32,
    /// How long a target may leave a SYN unanswered before the connect counts as failed,
    /// in milliseconds; 0 means the datapath's default (`--connect-timeout`) (host order).
    /// Takes what was the high half of a 64-bit generation, so pins of the earlier form
    /// read as 0.
    pub connect_timeout_ms: u32,
}
assert_size!(GatewayState, 24);

/// A flow-hash slot to target table: entries index the gateway's targets.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BucketTable {
    /// Target index (host order) for each hash slot.
    pub slots: [u16; BUCKET_TABLE_SIZE],
    pub _pad: u16,
}
assert_size!(BucketTable, BUCKET_TABLE_SIZE * 2 + 2);

/// One target of one table generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Zeroable)]
pub struct TargetEntryOf<A> {
    /// Target address, network byte order.
    pub addr: A,
    /// Address the splitter uses as source towards this target in full-NAT mode,
    /// network byte order.
    pub snat_addr: A,
    /// Target port, network byte order.
    pub port: u16,
    pub _pad: u16,
    /// Index in `TARGET_COUNTERS` (host order).
    pub counter_index: u32,
}
pub type TargetEntry = TargetEntryOf<u32>;
pub type TargetEntry6 = TargetEntryOf<Ipv6Words>;
assert_size!(TargetEntry, 16);
assert_size!(TargetEntry6, 40);

/// A packet's 5-tuple as it arrives, the conntrack key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Zeroable)]
pub struct FlowKeyOf<A> {
    /// Source address, network byte order.
    pub src_addr: A,
    /// Destination address, network byte order.
    pub dst_addr: A,
    /// Source port, network byte order.
    pub src_port: u16,
    /// Destination port, network byte order.
    pub dst_port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Zero. Two fields rather than `[u8; 3]` so that each is naturally aligned: the
    /// kernel program is built allowing misaligned loads (for packet data), and the
    /// verifier rejects a misaligned access to the stack, where keys are built.
    pub _pad: u8,
    pub _pad_word: u16,
}
pub type FlowKey = FlowKeyOf<u32>;
pub type FlowKey6 = FlowKeyOf<Ipv6Words>;
assert_size!(FlowKey, 16);
assert_size!(FlowKey6, 40);

impl<A: Copy> FlowKeyOf<A> {
    /// The key of packets travelling the other way.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            _pad: 0,
            _pad_word: 0,
        }
    }
}

/// `FlowEntry.flags`: this entry translates client-to-target packets.
pub const FLOW_TO_TARGET: u32 = 1;
/// `FlowEntry.flags`: this entry translates target-to-client packets.
pub const FLOW_FROM_TARGET: u32 = 2;
/// `FlowEntry.flags`: a FIN went through in this entry's direction.
pub const FLOW_FIN_SEEN: u32 = 4;
/// `FlowEntry.flags`: the target answered the SYN (its SYN-ACK went through).
pub const FLOW_ESTABLISHED: u32 = 8;
/// `FlowEntry.flags`: the flow belongs to an HTTP gateway (its responses are counted).
pub const FLOW_HTTP: u32 = 16;
/// `FlowEntry.flags`: the flow's connect was counted as failed (once).
pub const FLOW_CONNECT_FAILED: u32 = 32;
/// `FlowEntry.flags`: a direct-server-return flow: its packets are encapsulated, not
/// rewritten; `rewritten` holds the outer header's source and destination (the target),
/// with the packet's own ports. It has one entry (the client's): replies bypass the splitter.
pub const FLOW_DSR: u32 = 64;

/// Conntrack value: how to rewrite a packet whose 5-tuple is the key. A flow has two
/// entries, one per direction; each entry's `rewritten` tuple reversed is the key of the
/// other, so either can find its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Zeroable)]
pub struct FlowEntryOf<A> {
    /// The 5-tuple the packet leaves with.
    pub rewritten: FlowKeyOf<A>,
    /// Index in `TARGET_COUNTERS` of the flow's target (host order).
    pub counter_index: u32,
    /// `FLOW_*` bits (host order).
    pub flags: u32,
    /// `bpf_ktime_get_ns` of the last packet for UDP, of the first FIN for TCP; 0 if
    /// none (host order, CLOCK_MONOTONIC).
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_ns` when the flow was created (host order).
    pub created_ns: u64,
}
pub type FlowEntry = FlowEntryOf<u32>;
pub type FlowEntry6 = FlowEntryOf<Ipv6Words>;
assert_size!(FlowEntry, 40);
assert_size!(FlowEntry6, 64);

/// Per-target counters, per CPU; the agent sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TargetCounters {
    /// Flows assigned to the target.
    pub new_flows: u64,
    /// Packets and bytes (IP length) forwarded client to target.
    pub packets_to_target: u64,
    pub bytes_to_target: u64,
    /// Packets and bytes forwarded target to client.
    pub packets_from_target: u64,
    pub bytes_from_target: u64,
    /// TCP resets sent by the target.
    pub resets_from_target: u64,
    /// Connection setups completed (SYN-ACK seen) and the sum of their SYN to SYN-ACK
    /// time in nanoseconds.
    pub connects: u64,
    pub connect_ns_total: u64,
}
assert_size!(TargetCounters, 64);

/// Per-gateway counters, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct GatewayCounters {
    /// Packets for the gateway that found no target (no target with weight), passed.
    pub no_target: u64,
    /// Non-SYN TCP packets with no conntrack entry (flow unknown or evicted), passed.
    pub conntrack_miss: u64,
    /// New flows that could not get a conntrack entry or a source port, dropped (the
    /// client retries).
    pub alloc_failed: u64,
    /// New flows assigned to a target.
    pub new_flows: u64,
}
assert_size!(GatewayCounters, 32);

/// What the pinned datapath is, for the next agent: the layout version of its maps and a
/// digest of the program (build id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DatapathInfo {
    /// `LAYOUT_VERSION` of the agent that created the maps (host order).
    pub layout_version: u32,
    pub _pad: u32,
    /// Digest of the eBPF object the running program was loaded from (host order).
    pub build_id: u64,
}
assert_size!(DatapathInfo, 16);

/// What each target's connects and responses came to, per CPU, at `TargetEntry.counter_index`
/// (beside `TargetCounters`, which keeps its layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TargetOutcomes {
    /// New flows whose SYN the target answered with a RST or anything but a SYN-ACK, or
    /// did not answer before the client sent it again after the connect timeout.
    pub failed_connects: u64,
    /// HTTP responses by status class: `[1xx, 2xx, 3xx, 4xx, 5xx]` (HTTP gateways only).
    pub http: [u64; 5],
}
assert_size!(TargetOutcomes, 48);

/// Most source addresses one gateway's full NAT may use.
pub const MAX_SOURCE_ADDRESSES: usize = 16;

/// The full-NAT source addresses and port range of a gateway, at its `gateway_id`; with no
/// address, each target's `snat_addr` (the node's address towards it) is used, and with
/// no port count, the default range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SourcePool {
    /// Source addresses, network byte order; the first `count` are used.
    pub addrs: [u32; MAX_SOURCE_ADDRESSES],
    /// Addresses in use (host order).
    pub count: u32,
    /// First source port (host order).
    pub port_min: u16,
    /// Ports from `port_min` on (host order; 0 means the default range). At most
    /// 65535 - port_min + 1.
    pub port_count: u16,
}
assert_size!(SourcePool, 72);

/// Where the outer source addresses of a direct-server-return gateway's packets come from,
/// at its `gateway_id`: a prefix whose host bits each flow picks from its hash, so the
/// targets' NICs spread the flows over their receive queues. All zero: the node's address
/// towards each target (`TargetEntry.snat_addr`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Zeroable)]
pub struct DsrSourceOf<A> {
    /// The prefix with its host bits zero, network byte order.
    pub prefix: A,
    /// The host bits, network byte order (0 for a full-length prefix; an IPv6 prefix's
    /// host bits beyond the last 32 stay zero).
    pub host_mask: A,
}
pub type DsrSource = DsrSourceOf<u32>;
pub type DsrSource6 = DsrSourceOf<Ipv6Words>;
assert_size!(DsrSource, 8);
assert_size!(DsrSource6, 32);

impl<A: Address> DsrSourceOf<A> {
    /// The outer source address of a flow with `hash`; `node_addr` when no prefix is set.
    #[inline(always)]
    pub fn address(&self, hash: u32, node_addr: A) -> A {
        if self.prefix.is_zero() {
            node_addr
        } else {
            self.prefix.with_host_bits(hash, self.host_mask)
        }
    }
}

pod_forms!(GatewayKeyOf, TargetEntryOf, FlowKeyOf, FlowEntryOf, DsrSourceOf);

/// How a DNAT gateway's target answers are translated back where no flow state knows
/// them, keyed by the target's `GatewayKey` (its address, port and protocol): the forward
/// half of the flow went through another node (ECMP moved it, or the target's route back
/// names this node), so the reply is sent from the gateway's address like any reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Zeroable)]
pub struct DnatReplyOf<A> {
    /// The gateway's virtual address, network byte order.
    pub vip: A,
    /// The target's `TargetEntry.counter_index`.
    pub counter_index: u32,
    /// The gateway's `GatewayState.gateway_id` (host order).
    pub gateway_id: u32,
    /// The gateway's port, network byte order.
    pub port: u16,
    /// `FLOW_HTTP` when the gateway speaks HTTP, else 0 (host order).
    pub flow_flags: u16,
}
pub type DnatReply = DnatReplyOf<u32>;
pub type DnatReply6 = DnatReplyOf<Ipv6Words>;
assert_size!(DnatReply, 16);
assert_size!(DnatReply6, 28);
pod_forms!(DnatReplyOf);

/// Words of the address filter: 65 536 buckets of one bit.
pub const ADDRESS_FILTER_WORDS: usize = 1024;

/// The bucket of an IPv4 address (network byte order, as loaded from the packet) in the
/// address filter: the top 16 bits of a multiplicative hash.
#[inline(always)]
pub const fn address_bucket(addr: u32) -> u32 {
    addr.wrapping_mul(0x9e37_79b1) >> 16
}

/// Which addresses cannot be the splitter's, so that a packet of no gateway is passed at
/// the cost of two array reads instead of three hash lookups: bit `b` of word `w` is set
/// when no address the datapath may have to translate (a gateway's VIP, a target's
/// address) falls in bucket `64 w + b`. A packet whose destination and source both fall in
/// set buckets is passed at once. Zeroed (as created) it filters nothing; clearing bits
/// is always safe, so the agent clears a gateway's buckets before the gateway goes live,
/// and sets bits again only from a conntrack sweep that found no flow of theirs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct AddressFilter {
    /// Host order words.
    pub foreign: [u64; ADDRESS_FILTER_WORDS],
}
assert_size!(AddressFilter, 8192);

impl AddressFilter {
    /// A filter that passes every address except those `keep` will clear.
    pub const ALL_FOREIGN: Self = Self { foreign: [u64::MAX; ADDRESS_FILTER_WORDS] };

    /// True when no address the splitter handles shares `addr`'s bucket.
    #[inline(always)]
    pub fn is_foreign(&self, addr: u32) -> bool {
        let bucket = address_bucket(addr);
        // The mask keeps the index in bounds for the verifier as well as the compiler.
        let word = (bucket >> 6) as usize & (ADDRESS_FILTER_WORDS - 1);
        match self.foreign.get(word) {
            Some(bits) => (bits >> (bucket & 63)) & 1 != 0,
            None => false,
        }
    }

    /// Marks `addr`'s bucket as one the splitter handles.
    pub fn keep(&mut self, addr: u32) {
        let bucket = address_bucket(addr);
        self.foreign[(bucket >> 6) as usize] &= !(1u64 << (bucket & 63));
    }

    /// Marks the buckets of every address of `addrs`.
    pub fn keep_all(&mut self, addrs: impl IntoIterator<Item = u32>) {
        for addr in addrs {
            self.keep(addr);
        }
    }

    /// Marks the bucket a flow's packets are recognised by: the destination (a VIP) of a
    /// client's entry, the source (a target) of a target's entry.
    pub fn keep_flow<A: Address>(&mut self, key: &FlowKeyOf<A>, entry: &FlowEntryOf<A>) {
        self.keep(if entry.flags & FLOW_TO_TARGET != 0 { key.dst_addr.fold() } else { key.src_addr.fold() });
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY (for each): the types are `#[repr(C)]`, have no padding (size assertions
    // above) and every bit pattern is valid, as bytemuck's derived `Pod` checks.
    unsafe impl aya::Pod for super::GatewayKey {}
    unsafe impl aya::Pod for super::GatewayState {}
    unsafe impl aya::Pod for super::BucketTable {}
    unsafe impl aya::Pod for super::TargetEntry {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowEntry {}
    unsafe impl aya::Pod for super::TargetCounters {}
    unsafe impl aya::Pod for super::GatewayCounters {}
    unsafe impl aya::Pod for super::SourcePool {}
    unsafe impl aya::Pod for super::DatapathInfo {}
    unsafe impl aya::Pod for super::TargetOutcomes {}
    unsafe impl aya::Pod for super::AddressFilter {}
    unsafe impl aya::Pod for super::DsrSource {}
    unsafe impl aya::Pod for super::DnatReply {}
    unsafe impl aya::Pod for super::GatewayKey6 {}
    unsafe impl aya::Pod for super::TargetEntry6 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::FlowEntry6 {}
    unsafe impl aya::Pod for super::DsrSource6 {}
    unsafe impl aya::Pod for super::DnatReply6 {}
}

#[cfg(test)]
mod address_filter_tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// No address kept is ever foreign (a packet of a gateway is never passed by the
        /// filter), and an address is foreign exactly when no kept one shares its bucket.
        #[test]
        fn kept_addresses_are_never_foreign(kept in prop::collection::vec(any::<u32>(), 0..200), other in any::<u32>()) {
            let mut filter = AddressFilter::ALL_FOREIGN;
            for a in &kept {
                filter.keep(*a);
            }
            for a in &kept {
                prop_assert!(!filter.is_foreign(*a));
            }
            let shares_a_bucket = kept.iter().any(|a| address_bucket(*a) == address_bucket(other));
            prop_assert_eq!(filter.is_foreign(other), !shares_a_bucket);
        }
    }

    #[test]
    fn a_zeroed_filter_filters_nothing_and_buckets_spread() {
        let zeroed: AddressFilter = Zeroable::zeroed();
        assert!((0..100_000u32).all(|a| !zeroed.is_foreign(a.wrapping_mul(2_654_435_761))));
        // Consecutive addresses of one subnet land in different buckets.
        let buckets: alloc::collections::BTreeSet<u32> =
            (1..=254u8).map(|host| address_bucket(u32::from_ne_bytes([10, 10, 2, host]))).collect();
        assert_eq!(buckets.len(), 254);
    }
}
