//! Connection-tracking decisions: what a TCP packet does to its flow, and when the agent
//! may forget a flow. Pure functions over `FlowEntry` flags, shared by kernel and agent.

use crate::maps::{FlowEntryOf, FLOW_ESTABLISHED, FLOW_FIN_SEEN, FLOW_FROM_TARGET, PROTO_TCP};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the datapath does with a flow after forwarding one TCP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpVerdict {
    /// Nothing changes.
    Keep,
    /// Write these flags into the entry (and its timestamp when a FIN is first seen).
    Update { flags: u32, fin_now: bool, connected_now: bool },
    /// The flow is over (RST): remove both entries after forwarding.
    Close,
    /// A fresh SYN on a 5-tuple whose previous flow was closing: forget the old flow and
    /// treat the packet as a new flow.
    Reopen,
}

/// Decides the effect of a TCP packet with `tcp_flags` on the entry of its direction.
#[inline(always)]
pub const fn tcp_verdict(entry_flags: u32, tcp_flags: u8) -> TcpVerdict {
    if tcp_flags & TCP_RST != 0 {
        return TcpVerdict::Close;
    }
    let from_target = entry_flags & FLOW_FROM_TARGET != 0;
    if !from_target && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && entry_flags & FLOW_FIN_SEEN != 0 {
        return TcpVerdict::Reopen;
    }
    let mut flags = entry_flags;
    let fin_now = tcp_flags & TCP_FIN != 0 && entry_flags & FLOW_FIN_SEEN == 0;
    if fin_now {
        flags |= FLOW_FIN_SEEN;
    }
    let connected_now = from_target && tcp_flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) && entry_flags & FLOW_ESTABLISHED == 0;
    if connected_now {
        flags |= FLOW_ESTABLISHED;
    }
    if flags == entry_flags {
        TcpVerdict::Keep
    } else {
        TcpVerdict::Update { flags, fin_now, connected_now }
    }
}

/// How long after its FINs a closed TCP flow's full-NAT source port may be taken by a new
/// flow (time for the last ACK and a few retransmissions), instead of waiting for the
/// agent's sweep: at high connection rates the ports would otherwise run out.
pub const PORT_REUSE_AFTER_NS: u64 = 1_000_000_000;

/// From this age on a closed flow belongs to the agent's sweep, and the datapath leaves
/// its port alone. The sweep reads an entry, checks it, then deletes it: two system calls
/// that a reuse in between would turn into the deletion of a live flow's entry (the soak
/// found that race). Keeping the ages apart (reuse below 8 s, sweep from
/// [`Timeouts::DEFAULT`]'s 10 s) means both never touch the same entry.
pub const PORT_REUSE_BEFORE_NS: u64 = 8_000_000_000;

/// ...unless the flow is this old: the sweep would have removed it long ago, so no agent is
/// sweeping (stopped or restarting), and its ports must not run out meanwhile.
pub const PORT_REUSE_ABANDONED_NS: u64 = 60_000_000_000;

const _: () = assert!(PORT_REUSE_BEFORE_NS < Timeouts::DEFAULT.tcp_closed_ns);
const _: () = assert!(PORT_REUSE_ABANDONED_NS > 2 * Timeouts::DEFAULT.tcp_closed_ns);

/// True when a new flow may take over the source port held by a TCP flow whose reply
/// entry is `reply` and forward entry `forward` (`None`: already gone): both directions
/// have sent their FIN, the target's between `PORT_REUSE_AFTER_NS` and
/// `PORT_REUSE_BEFORE_NS` ago (or `PORT_REUSE_ABANDONED_NS` and more).
pub const fn port_reusable<A>(reply: &FlowEntryOf<A>, forward: Option<&FlowEntryOf<A>>, now_ns: u64) -> bool {
    if reply.rewritten.proto != PROTO_TCP || reply.flags & FLOW_FIN_SEEN == 0 {
        return false;
    }
    if let Some(f) = forward {
        if f.flags & FLOW_FIN_SEEN == 0 {
            return false;
        }
    }
    let age = now_ns.saturating_sub(reply.last_seen_ns);
    (age >= PORT_REUSE_AFTER_NS && age < PORT_REUSE_BEFORE_NS) || age >= PORT_REUSE_ABANDONED_NS
}

/// How long a TCP flow whose handshake has not completed keeps its state and its full-NAT
/// source port, unless the agent is told otherwise (`--half-open-timeout`): long enough
/// for a SYN retransmitted twice (1 s, then 2 s), short enough that a SYN flood's spoofed
/// flows give their ports back within seconds.
pub const DEFAULT_HALF_OPEN_TIMEOUT_NS: u64 = 3_000_000_000;

/// A half-open flow at least this old may lose its source port to a new flow when every
/// candidate port is held (a flood's pressure): a handshake completes within a round
/// trip, so a flow that has waited this long is most likely spoofed.
pub const HALF_OPEN_TAKEOVER_AGE_NS: u64 = 500_000_000;

const _: () = assert!(HALF_OPEN_TAKEOVER_AGE_NS < DEFAULT_HALF_OPEN_TIMEOUT_NS);

/// True when a half-open flow created at `created_ns` has expired at `now_ns`.
#[inline(always)]
pub const fn half_open_expired(created_ns: u64, now_ns: u64, timeout_ns: u64) -> bool {
    now_ns.saturating_sub(created_ns) >= timeout_ns
}

/// True when a new flow may take the source port of a half-open flow created at
/// `created_ns` because no candidate port was free.
#[inline(always)]
pub const fn half_open_port_takeable(created_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(created_ns) >= HALF_OPEN_TAKEOVER_AGE_NS
}

/// What a packet of a half-open TCP flow does to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfOpenVerdict {
    /// Forward it; the flow stays half-open (a retransmitted SYN, the target's SYN-ACK).
    Keep,
    /// The client's ACK (or data) completed the handshake: the flow moves to conntrack.
    Promote,
    /// A reset from either side: forward it and forget the flow.
    Close,
}

/// Decides the effect of a packet with `tcp_flags` on a half-open flow, arriving in the
/// direction of the entry with `entry_flags`.
#[inline(always)]
pub const fn half_open_verdict(entry_flags: u32, tcp_flags: u8) -> HalfOpenVerdict {
    if tcp_flags & TCP_RST != 0 {
        return HalfOpenVerdict::Close;
    }
    let from_client = entry_flags & FLOW_FROM_TARGET == 0;
    if from_client && tcp_flags & TCP_ACK != 0 && tcp_flags & TCP_SYN == 0 {
        return HalfOpenVerdict::Promote;
    }
    HalfOpenVerdict::Keep
}

/// The default connect timeout: a SYN the target has not answered when the client sends it
/// again this long after the first (Linux retransmits after 1 s) is a failed connect.
pub const DEFAULT_CONNECT_TIMEOUT_NS: u64 = 1_000_000_000;

/// True when the client's SYN arriving `age_ns` after the flow's first, with no SYN-ACK seen,
/// means the connect failed (a tenth of slack for the client's own timer).
#[inline(always)]
pub const fn connect_timed_out(age_ns: u64, timeout_ns: u64) -> bool {
    age_ns >= timeout_ns - timeout_ns / 10
}

/// The status class (1 to 5) of an HTTP/1.x response whose first bytes are `head`
/// (`HTTP/1.1 503 ...`), or none when they are not a status line.
#[inline(always)]
pub const fn http_status_class(head: &[u8; 12]) -> Option<u8> {
    let prefix = *b"HTTP/1.";
    let mut i = 0;
    while i < prefix.len() {
        if head[i] != prefix[i] {
            return None;
        }
        i += 1;
    }
    if !head[7].is_ascii_digit() || head[8] != b' ' || !head[9].is_ascii_digit() || !head[10].is_ascii_digit() || !head[11].is_ascii_digit()
    {
        return None;
    }
    match head[9] {
        b'1'..=b'5' => Some(head[9] - b'0'),
        _ => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A UDP flow with no packet in either direction for this long is forgotten.
    pub udp_idle_ns: u64,
    /// A TCP flow closed in both directions is forgotten this long after its last FIN
    /// (time for the final ACK and retransmissions).
    pub tcp_closed_ns: u64,
    /// A TCP flow half-closed for this long is forgotten.
    pub tcp_half_closed_ns: u64,
}

impl Timeouts {
    pub const DEFAULT: Self = Self { udp_idle_ns: 30_000_000_000, tcp_closed_ns: 10_000_000_000, tcp_half_closed_ns: 300_000_000_000 };
}

/// True when a flow (its two entries) may be removed at `now_ns` (CLOCK_MONOTONIC).
pub fn flow_expired<A>(a: &FlowEntryOf<A>, b: &FlowEntryOf<A>, now_ns: u64, t: &Timeouts) -> bool {
    let since = |ts: u64| now_ns.saturating_sub(ts);
    if a.rewritten.proto == PROTO_TCP {
        let (fa, fb) = (a.flags & FLOW_FIN_SEEN != 0, b.flags & FLOW_FIN_SEEN != 0);
        if fa && fb {
            let last = if a.last_seen_ns > b.last_seen_ns { a.last_seen_ns } else { b.last_seen_ns };
            return since(last) >= t.tcp_closed_ns;
        }
        if fa {
            return since(a.last_seen_ns) >= t.tcp_half_closed_ns;
        }
        if fb {
            return since(b.last_seen_ns) >= t.tcp_half_closed_ns;
        }
        return false;
    }
    let last = if a.last_seen_ns > b.last_seen_ns { a.last_seen_ns } else { b.last_seen_ns };
    since(last) >= t.udp_idle_ns
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{FlowEntry, FlowKey, FLOW_TO_TARGET, PROTO_UDP};

    #[test]
    fn http_status_lines_are_classed() {
        assert_eq!(http_status_class(b"HTTP/1.1 500"), Some(5));
        assert_eq!(http_status_class(b"HTTP/1.0 204"), Some(2));
        assert_eq!(http_status_class(b"HTTP/1.1 404"), Some(4));
        assert_eq!(http_status_class(b"HTTP/1.1 600"), None);
        assert_eq!(http_status_class(b"HTTP/2.0 200"), None);
        assert_eq!(http_status_class(b"GET / HTTP/1"), None);
        assert_eq!(http_status_class(b"HTTP/1.1 5x0"), None);
    }

    proptest::proptest! {
        #[test]
        fn a_status_line_is_classed_by_its_first_digit(minor in 0u8..10, code in 100u16..600) {
            let line = std::format!("HTTP/1.{minor} {code}");
            let head: [u8; 12] = line.as_bytes().try_into().unwrap();
            proptest::prop_assert_eq!(http_status_class(&head), Some((code / 100) as u8));
        }

        #[test]
        fn anything_else_is_no_status(head in proptest::array::uniform12(proptest::prelude::any::<u8>())) {
            if http_status_class(&head).is_some() {
                proptest::prop_assert!(head.starts_with(b"HTTP/1.") && (b'1'..=b'5').contains(&head[9]));
            }
        }
    }

    #[test]
    fn connects_time_out_at_the_clients_retransmission() {
        let s = 1_000_000_000;
        assert!(!connect_timed_out(800_000_000, s));
        assert!(connect_timed_out(950_000_000, s), "a retransmission a little early still counts");
        assert!(connect_timed_out(3 * s, s));
    }

    #[test]
    fn half_open_flows_promote_on_the_clients_ack_only() {
        assert_eq!(half_open_verdict(FLOW_TO_TARGET, TCP_ACK), HalfOpenVerdict::Promote);
        assert_eq!(half_open_verdict(FLOW_TO_TARGET, TCP_ACK | 0x08), HalfOpenVerdict::Promote, "ACK with data (PSH)");
        assert_eq!(half_open_verdict(FLOW_TO_TARGET, TCP_SYN), HalfOpenVerdict::Keep, "a retransmitted SYN");
        assert_eq!(half_open_verdict(FLOW_FROM_TARGET, TCP_SYN | TCP_ACK), HalfOpenVerdict::Keep, "the target's SYN-ACK");
        assert_eq!(half_open_verdict(FLOW_FROM_TARGET, TCP_ACK), HalfOpenVerdict::Keep, "only the client's ACK promotes");
        assert_eq!(half_open_verdict(FLOW_FROM_TARGET, TCP_RST), HalfOpenVerdict::Close);
        assert_eq!(half_open_verdict(FLOW_TO_TARGET, TCP_RST | TCP_ACK), HalfOpenVerdict::Close);
    }

    #[test]
    fn half_open_flows_expire_and_give_ports_up_under_pressure() {
        let s = 1_000_000_000u64;
        assert!(!half_open_expired(10 * s, 12 * s, DEFAULT_HALF_OPEN_TIMEOUT_NS));
        assert!(half_open_expired(10 * s, 13 * s, DEFAULT_HALF_OPEN_TIMEOUT_NS));
        assert!(!half_open_port_takeable(10 * s, 10 * s + HALF_OPEN_TAKEOVER_AGE_NS - 1));
        assert!(half_open_port_takeable(10 * s, 10 * s + HALF_OPEN_TAKEOVER_AGE_NS));
    }

    #[test]
    fn rst_closes_from_either_side() {
        assert_eq!(tcp_verdict(FLOW_TO_TARGET, TCP_RST | TCP_ACK), TcpVerdict::Close);
        assert_eq!(tcp_verdict(FLOW_FROM_TARGET, TCP_RST), TcpVerdict::Close);
    }

    #[test]
    fn syn_ack_from_target_marks_connected_once() {
        let v = tcp_verdict(FLOW_FROM_TARGET, TCP_SYN | TCP_ACK);
        assert_eq!(v, TcpVerdict::Update { flags: FLOW_FROM_TARGET | FLOW_ESTABLISHED, fin_now: false, connected_now: true });
        assert_eq!(tcp_verdict(FLOW_FROM_TARGET | FLOW_ESTABLISHED, TCP_SYN | TCP_ACK), TcpVerdict::Keep);
        // A SYN-ACK in the client's direction is not the target connecting.
        assert_eq!(tcp_verdict(FLOW_TO_TARGET, TCP_SYN | TCP_ACK), TcpVerdict::Keep);
    }

    #[test]
    fn first_fin_is_recorded_once() {
        assert_eq!(
            tcp_verdict(FLOW_TO_TARGET, TCP_FIN | TCP_ACK),
            TcpVerdict::Update { flags: FLOW_TO_TARGET | FLOW_FIN_SEEN, fin_now: true, connected_now: false }
        );
        assert_eq!(tcp_verdict(FLOW_TO_TARGET | FLOW_FIN_SEEN, TCP_FIN | TCP_ACK), TcpVerdict::Keep);
    }

    #[test]
    fn new_syn_after_close_reopens() {
        assert_eq!(tcp_verdict(FLOW_TO_TARGET | FLOW_FIN_SEEN, TCP_SYN), TcpVerdict::Reopen);
        assert_eq!(tcp_verdict(FLOW_TO_TARGET, TCP_SYN), TcpVerdict::Keep);
    }

    fn entry(proto: u8, flags: u32, last: u64) -> FlowEntry {
        FlowEntry {
            rewritten: FlowKey { proto, ..bytemuck::Zeroable::zeroed() },
            flags,
            last_seen_ns: last,
            ..bytemuck::Zeroable::zeroed()
        }
    }

    #[test]
    fn ports_of_flows_closed_both_ways_are_reused_after_a_second() {
        let s = 1_000_000_000u64;
        let reply = entry(PROTO_TCP, FLOW_FROM_TARGET | FLOW_FIN_SEEN, 10 * s);
        let closed = entry(PROTO_TCP, FLOW_TO_TARGET | FLOW_FIN_SEEN, 10 * s);
        let open = entry(PROTO_TCP, FLOW_TO_TARGET, 10 * s);
        assert!(port_reusable(&reply, Some(&closed), 11 * s));
        assert!(port_reusable(&reply, None, 11 * s), "forward entry already gone");
        assert!(!port_reusable(&reply, Some(&closed), 10 * s + s / 2), "too recent");
        assert!(port_reusable(&reply, Some(&closed), 17 * s + s / 2), "still the datapath's");
        assert!(!port_reusable(&reply, Some(&closed), 18 * s), "the sweep's from 8 s on");
        assert!(!port_reusable(&reply, Some(&closed), 69 * s), "the sweep's");
        assert!(port_reusable(&reply, Some(&closed), 70 * s), "abandoned: no sweep is running");
        assert!(!port_reusable(&reply, Some(&open), 15 * s), "the client may still send");
        let live = entry(PROTO_TCP, FLOW_FROM_TARGET, 0);
        assert!(!port_reusable(&live, None, 20 * s));
        let udp = entry(PROTO_UDP, FLOW_FROM_TARGET | FLOW_FIN_SEEN, 0);
        assert!(!port_reusable(&udp, None, 20 * s));
    }

    #[test]
    fn expiry_rules() {
        let t = Timeouts::DEFAULT;
        let s = 1_000_000_000u64;
        let open = entry(PROTO_TCP, FLOW_TO_TARGET, 0);
        assert!(!flow_expired(&open, &open, 10_000 * s, &t), "open TCP flows are left to the LRU");
        let fin_a = entry(PROTO_TCP, FLOW_FIN_SEEN, 100 * s);
        let fin_b = entry(PROTO_TCP, FLOW_FIN_SEEN, 101 * s);
        assert!(!flow_expired(&fin_a, &fin_b, 105 * s, &t));
        assert!(flow_expired(&fin_a, &fin_b, 111 * s, &t));
        assert!(!flow_expired(&fin_a, &open, 111 * s, &t), "half-closed waits longer");
        assert!(flow_expired(&fin_a, &open, 400 * s, &t));
        let u1 = entry(PROTO_UDP, 0, 100 * s);
        let u2 = entry(PROTO_UDP, 0, 120 * s);
        assert!(!flow_expired(&u1, &u2, 140 * s, &t), "the newer direction counts");
        assert!(flow_expired(&u1, &u2, 151 * s, &t));
    }
}
