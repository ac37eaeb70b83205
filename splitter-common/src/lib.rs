//! Types and pure logic shared by the kernel program (`splitter-ebpf`) and the agent
//! (`splitter-user`).
//!
//! Everything here is `no_std` so the kernel program can use it; host-only helpers sit
//! behind the `alloc`/`user` features. Shared map values are `#[repr(C)]`, `Pod`, without
//! padding, and carry a size assertion.
#![no_std]

#[cfg(any(feature = "alloc", test))]
extern crate alloc;
#[cfg(test)]
extern crate std;

#[cfg(any(feature = "alloc", test))]
pub mod apportion;
pub mod bench_tcp;
pub mod conntrack;
pub mod counters;
pub mod csum;
pub mod flow;
pub mod maps;
pub mod table;

pub use counters::{FlowEvent, ForwardEvent, PacketClass};

/// Name of the XDP program inside the object.
pub const PROGRAM_NAME: &str = "splitter";
/// Name of the decapsulation program (for targets of direct-server-return gateways, on
/// kernels without an `ipip` device) inside the same object.
pub const DECAP_PROGRAM_NAME: &str = "splitter_decap";

/// Version of the maps' layout (their keys, values and sizes): a new agent that finds pins
/// of another layout version must not write into them as if they were its own.
pub const LAYOUT_VERSION: u32 = 1;

/// Names of the datapath's maps in the object and under the pin directory (the kernel
/// program declares its statics with these names). Each map's writer and reader are
/// documented at its declaration in `splitter-ebpf/src/lib.rs`.
pub mod map_names {
    /// Gateway key to live state; written by the agent, read by the program.
    pub const GATEWAYS: &str = "GATEWAYS";
    /// Bucket tables, two generations per gateway; written by the agent, read by the program.
    pub const BUCKET_TABLES: &str = "BUCKET_TABLES";
    /// Targets of each table generation; written by the agent, read by the program.
    pub const TARGETS: &str = "TARGETS";
    /// Flow state; written by the program (and expired by the agent), read by both.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Per-target counters; written by the program, read (and zeroed) by the agent.
    pub const TARGET_COUNTERS: &str = "TARGET_COUNTERS";
    /// Per-gateway counters; written by the program, read (and zeroed) by the agent.
    pub const GATEWAY_COUNTERS: &str = "GATEWAY_COUNTERS";
    /// Packets per class; written by the program, read by the agent.
    pub const PACKET_COUNTERS: &str = "PACKET_COUNTERS";
    /// Forwarding outcomes; written by the program, read by the agent.
    pub const FORWARD_EVENTS: &str = "FORWARD_EVENTS";
    /// Flows whose TCP handshake has not completed; written by the program (the agent
    /// only reads it), promoted to `CONNTRACK` by the client's ACK, forgotten after the
    /// half-open timeout. A flood of SYNs evicts only these, never an established flow.
    pub const HALF_OPEN: &str = "HALF_OPEN";
    /// Flow-state events (half-open flows started, promoted, expired, ports taken over),
    /// per CPU; written by the program, read by the agent.
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    /// Failed connects and HTTP status classes per target, per CPU; written by the program,
    /// read (and zeroed) by the agent.
    pub const TARGET_OUTCOMES: &str = "TARGET_OUTCOMES";
    /// Full-NAT source addresses and ports per gateway; written by the agent, read by the program.
    pub const SOURCE_POOLS: &str = "SOURCE_POOLS";
    /// What runs: layout version and build of the program; written by the agent, read by
    /// the next agent (to adopt, upgrade or refuse).
    pub const DATAPATH_INFO: &str = "DATAPATH_INFO";
    /// The buckets of addresses the splitter cannot have to translate (`AddressFilter`),
    /// one entry; written by the agent, read by the program before any hash lookup.
    pub const ADDRESS_FILTER: &str = "ADDRESS_FILTER";
    /// Outer source prefixes of direct-server-return gateways (`DsrSource`), per gateway;
    /// written by the agent (before the gateway's state names it), read by the program.
    pub const DSR_SOURCES: &str = "DSR_SOURCES";
    /// Target (address, port, protocol) to its DNAT gateway (`DnatReply`), for answers no
    /// flow state on this node knows; written by the agent, read by the program.
    pub const DNAT_REPLIES: &str = "DNAT_REPLIES";
    /// `GATEWAYS` of IPv6 gateways (`GatewayKey6`); written by the agent, read by the program.
    pub const GATEWAYS6: &str = "GATEWAYS6";
    /// `TARGETS` of IPv6 gateways' tables (`TargetEntry6`, at the same indices); written by
    /// the agent, read by the program.
    pub const TARGETS6: &str = "TARGETS6";
    /// `CONNTRACK` of IPv6 flows (`FlowKey6` to `FlowEntry6`); written by the program (and
    /// expired by the agent), read by both.
    pub const CONNTRACK6: &str = "CONNTRACK6";
    /// `HALF_OPEN` of IPv6 flows; written by the program, read by the agent.
    pub const HALF_OPEN6: &str = "HALF_OPEN6";
    /// `DSR_SOURCES` of IPv6 gateways (`DsrSource6`); written by the agent, read by the program.
    pub const DSR_SOURCES6: &str = "DSR_SOURCES6";
    /// `DNAT_REPLIES` of IPv6 gateways (`GatewayKey6` to `DnatReply6`); written by the
    /// agent, read by the program.
    pub const DNAT_REPLIES6: &str = "DNAT_REPLIES6";
    /// Full-NAT flows that did not get their first candidate source (client `FlowKey` to
    /// the candidate's index, a `u32`), so that a flow whose conntrack entries were
    /// evicted is re-created on the source its target knows; written and read by the
    /// program only (an LRU: a lost record costs what having none did).
    pub const PORT_CHOICES: &str = "PORT_CHOICES";
    /// `PORT_CHOICES` of IPv6 flows (`FlowKey6` to `u32`); written and read by the program.
    pub const PORT_CHOICES6: &str = "PORT_CHOICES6";
    /// The maps every datapath of this layout version has had since its first release: pins
    /// holding these (and a program and links) are a datapath to adopt or upgrade; maps
    /// added since are created when missing.
    pub const CORE: [&str; 8] =
        [GATEWAYS, BUCKET_TABLES, TARGETS, CONNTRACK, TARGET_COUNTERS, GATEWAY_COUNTERS, PACKET_COUNTERS, FORWARD_EVENTS];
    /// The flow tables, sized by the conntrack and half-open limits: the maps to create at
    /// their smallest when the object is loaded for a program other than the datapath.
    pub const FLOW_TABLES: [&str; 6] = [CONNTRACK, HALF_OPEN, CONNTRACK6, HALF_OPEN6, PORT_CHOICES, PORT_CHOICES6];
    /// Every map the agent pins and adopts.
    pub const PINNED: [&str; 24] = [
        GATEWAYS,
        BUCKET_TABLES,
        TARGETS,
        CONNTRACK,
        TARGET_COUNTERS,
        GATEWAY_COUNTERS,
        PACKET_COUNTERS,
        FORWARD_EVENTS,
        HALF_OPEN,
        FLOW_EVENTS,
        TARGET_OUTCOMES,
        SOURCE_POOLS,
        DATAPATH_INFO,
        ADDRESS_FILTER,
        DSR_SOURCES,
        DNAT_REPLIES,
        GATEWAYS6,
        TARGETS6,
        CONNTRACK6,
        HALF_OPEN6,
        DSR_SOURCES6,
        DNAT_REPLIES6,
        PORT_CHOICES,
        PORT_CHOICES6,
    ];
}

/// Asserts at compile time that a shared type has the size the other side expects.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
