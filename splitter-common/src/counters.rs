//! Packet classes counted by the kernel program in `PACKET_COUNTERS`.
//!
//! The map is a per-CPU array of `u64` indexed by [`PacketClass`]; the agent sums the
//! CPUs. Indices are host-order `u32` map keys.

/// Index of a packet class in the per-CPU `PACKET_COUNTERS` array.
///
/// A plain newtype over `u32` rather than an enum: the value crosses the kernel/user
/// boundary as a map key, where any `u32` can appear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct PacketClass(pub u32);

impl PacketClass {
    /// Not IPv4 Ethernet: ARP, IPv6, VLAN-tagged (not looked into) and anything else.
    pub const NON_IPV4: Self = Self(0);
    /// IPv4 whose protocol is neither TCP, UDP nor ICMP.
    pub const IPV4_OTHER: Self = Self(1);
    /// IPv4 TCP with a complete TCP header.
    pub const TCP: Self = Self(2);
    /// IPv4 UDP with a complete UDP header.
    pub const UDP: Self = Self(3);
    /// IPv4 ICMP.
    pub const ICMP: Self = Self(4);
    /// Frames too short for the headers they announce, or with an invalid IHL.
    pub const MALFORMED: Self = Self(5);

    /// Number of classes: the size of the counters array.
    pub const COUNT: u32 = 6;

    /// Every class, in index order.
    pub const ALL: [Self; Self::COUNT as usize] = [Self::NON_IPV4, Self::IPV4_OTHER, Self::TCP, Self::UDP, Self::ICMP, Self::MALFORMED];

    /// Stable lower-case name, used in CLI output and metrics labels.
    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "non_ipv4",
            1 => "ipv4_other",
            2 => "tcp",
            3 => "udp",
            4 => "icmp",
            5 => "malformed",
            _ => "unknown",
        }
    }
}

/// Index of a forwarding outcome in the per-CPU `FORWARD_EVENTS` array (host-order
/// `u32` map keys). Counts what happened to translated packets after the FIB lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct ForwardEvent(pub u32);

impl ForwardEvent {
    /// Sent back out of the interface it came in on (`XDP_TX`).
    pub const TX: Self = Self(0);
    /// Redirected to another interface (`bpf_redirect`).
    pub const REDIRECT: Self = Self(1);
    /// Passed to the kernel after translation because the next hop's neighbour entry is
    /// not resolved yet (the kernel resolves it and forwards this packet itself).
    pub const PASS_NO_NEIGH: Self = Self(2);
    /// Passed to the kernel after translation for any other FIB answer (local
    /// destination, forwarding disabled, no route...).
    pub const PASS_FIB: Self = Self(3);
    /// A direct-server-return packet too big for the egress MTU once encapsulated: an ICMP
    /// "fragmentation needed" went back to the client instead.
    pub const ICMP_TOO_BIG: Self = Self(4);
    /// A direct-server-return packet the driver left no room to encapsulate, dropped.
    pub const ENCAP_FAILED: Self = Self(5);

    pub const COUNT: u32 = 6;
    pub const ALL: [Self; Self::COUNT as usize] =
        [Self::TX, Self::REDIRECT, Self::PASS_NO_NEIGH, Self::PASS_FIB, Self::ICMP_TOO_BIG, Self::ENCAP_FAILED];

    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "tx",
            1 => "redirect",
            2 => "pass_no_neigh",
            3 => "pass_fib",
            4 => "icmp_too_big",
            5 => "encap_failed",
            _ => "unknown",
        }
    }
}

/// Index of a flow-state event in the per-CPU `FLOW_EVENTS` array (host-order `u32` map
/// keys): what happened to half-open TCP flows and to flows the datapath lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct FlowEvent(pub u32);

impl FlowEvent {
    /// A SYN started a half-open flow.
    pub const HALF_OPEN_STARTED: Self = Self(0);
    /// The client's ACK completed a handshake: the flow moved to conntrack.
    pub const HALF_OPEN_PROMOTED: Self = Self(1);
    /// A half-open flow was found past its timeout and forgotten (its port given back).
    pub const HALF_OPEN_EXPIRED: Self = Self(2);
    /// A new flow took the source port of a half-open flow because every candidate port
    /// was held (a SYN flood's pressure).
    pub const HALF_OPEN_TAKEN_OVER: Self = Self(3);
    /// A TCP packet other than a SYN found no state: its flow was evicted (or is older than
    /// the datapath) and is placed again by the table.
    pub const ESTABLISHED_MISSED: Self = Self(4);

    pub const COUNT: u32 = 5;
    pub const ALL: [Self; Self::COUNT as usize] =
        [Self::HALF_OPEN_STARTED, Self::HALF_OPEN_PROMOTED, Self::HALF_OPEN_EXPIRED, Self::HALF_OPEN_TAKEN_OVER, Self::ESTABLISHED_MISSED];

    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "half_open_started",
            1 => "half_open_promoted",
            2 => "half_open_expired",
            3 => "half_open_taken_over",
            4 => "established_missed",
            _ => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_classes_are_dense_and_named() {
        for (i, class) in PacketClass::ALL.iter().enumerate() {
            assert_eq!(class.0 as usize, i);
            assert_ne!(class.name(), "unknown");
        }
        assert_eq!(PacketClass(PacketClass::COUNT).name(), "unknown");
        for (i, event) in ForwardEvent::ALL.iter().enumerate() {
            assert_eq!(event.0 as usize, i);
            assert_ne!(event.name(), "unknown");
        }
        for (i, event) in FlowEvent::ALL.iter().enumerate() {
            assert_eq!(event.0 as usize, i);
            assert_ne!(event.name(), "unknown");
        }
    }
}
