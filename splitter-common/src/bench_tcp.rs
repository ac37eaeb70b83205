//! Stateless TCP endpoints for the connection-rate benchmark: a client and a server that
//! answer each segment from the segment alone, so thousands of connections per second cost
//! them a packet rewrite each instead of a kernel socket. The benchmark's XDP programs
//! (`bench_tcp_client`, `bench_tcp_server`, `bench_syn_gen`) apply these rules; whatever
//! sits between them (the splitter, nftables, HAProxy's kernel sockets) sees ordinary TCP.
//!
//! One connection: client SYN → server SYN-ACK → client ACK with [`REQUEST`] → server
//! [`RESPONSE`] with FIN → client RST (no TIME_WAIT anywhere). A kernel peer's FIN gets an
//! ACK from the server, so a proxy's server-side socket closes cleanly too.
//!
//! Sequence numbers are host order here; the programs convert.

use crate::{
    conntrack::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    csum::sum_words,
};

/// TCP PSH flag.
pub const TCP_PSH: u8 = 0x08;

/// The request the client sends once connected (even length keeps the checksum sum simple).
pub const REQUEST: [u8; 32] = *b"GET / HTTP/1.0\r\nHost: bench1\r\n\r\n";
/// The response the server sends to any data, with its FIN.
pub const RESPONSE: [u8; 40] = *b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// Client source ports the generator cycles through (host order, inclusive).
pub const CLIENT_PORT_MIN: u16 = 1024;
pub const CLIENT_PORT_MAX: u16 = 65535;

/// What an incoming segment says (host order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload_len: u32,
}

/// The payload a reply carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    Empty,
    Request,
    Response,
}

impl Payload {
    #[inline(always)]
    pub const fn size(self) -> usize {
        match self {
            Payload::Empty => 0,
            Payload::Request => REQUEST.len(),
            Payload::Response => RESPONSE.len(),
        }
    }

    /// The payload's one's-complement sum (native-order 16-bit words, as `csum` takes them).
    #[inline(always)]
    pub const fn sum(self) -> u64 {
        match self {
            Payload::Empty => 0,
            Payload::Request => REQUEST_SUM,
            Payload::Response => RESPONSE_SUM,
        }
    }
}

const REQUEST_SUM: u64 = sum_words(&REQUEST);
const RESPONSE_SUM: u64 = sum_words(&RESPONSE);
const _: () = assert!(REQUEST.len().is_multiple_of(2) && RESPONSE.len().is_multiple_of(2));

/// A segment to send back (host order), with what the incoming one meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nothing to send (a pure ACK, a RST, anything unexpected).
    Drop,
    Send {
        flags: u8,
        seq: u32,
        ack: u32,
        payload: Payload,
    },
}

/// The server's initial sequence number for a SYN: any value works (the server keeps no
/// state: later segments carry it back in their ACK); mixing keeps connections apart.
#[inline(always)]
pub const fn server_isn(client_seq: u32) -> u32 {
    client_seq.wrapping_mul(0x9e37_79b1) ^ 0x5bd1_e995
}

/// The server's answer: SYN → SYN-ACK; data → the response with FIN; a bare FIN → its ACK.
#[inline(always)]
pub const fn server_reply(s: Segment) -> Reply {
    if s.flags & TCP_RST != 0 {
        return Reply::Drop;
    }
    let fin = if s.flags & TCP_FIN != 0 { 1 } else { 0 };
    if s.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return Reply::Send { flags: TCP_SYN | TCP_ACK, seq: server_isn(s.seq), ack: s.seq.wrapping_add(1), payload: Payload::Empty };
    }
    if s.flags & TCP_ACK == 0 {
        return Reply::Drop;
    }
    if s.payload_len > 0 {
        return Reply::Send {
            flags: TCP_ACK | TCP_PSH | TCP_FIN,
            seq: s.ack,
            ack: s.seq.wrapping_add(s.payload_len).wrapping_add(fin),
            payload: Payload::Response,
        };
    }
    if fin == 1 {
        return Reply::Send { flags: TCP_ACK, seq: s.ack, ack: s.seq.wrapping_add(1), payload: Payload::Empty };
    }
    Reply::Drop
}

/// The client's answer: SYN-ACK → ACK with the request; data or FIN (the response) → RST.
#[inline(always)]
pub const fn client_reply(s: Segment) -> Reply {
    if s.flags & TCP_RST != 0 || s.flags & TCP_ACK == 0 {
        return Reply::Drop;
    }
    if s.flags & TCP_SYN != 0 {
        return Reply::Send { flags: TCP_ACK | TCP_PSH, seq: s.ack, ack: s.seq.wrapping_add(1), payload: Payload::Request };
    }
    if s.payload_len > 0 || s.flags & TCP_FIN != 0 {
        // A RST needs only a sequence number inside the peer's window: what it acked.
        return Reply::Send { flags: TCP_RST, seq: s.ack, ack: 0, payload: Payload::Empty };
    }
    Reply::Drop
}

/// The `n`-th connection of a generator: client address index (of `clients`) and source
/// port. Consecutive connections change address first, so one address's port comes back
/// only after `clients` × the port range connections.
#[inline(always)]
pub const fn generated_tuple(n: u64, clients: u32) -> (u32, u16) {
    let clients = if clients == 0 { 1 } else { clients as u64 };
    let range = (CLIENT_PORT_MAX - CLIENT_PORT_MIN) as u64 + 1;
    let client = (n % clients) as u32;
    let port = CLIENT_PORT_MIN + ((n / clients) % range) as u16;
    (client, port)
}

/// A generator's state, one per CPU: the connection numbers it hands out are
/// `offset`, `offset + stride`, ... (the k-th is `offset + k * stride`, k this CPU's
/// `ConnectionCounts::started`), so generators on several CPUs never collide. The
/// frame is rewritten whole from it on every run (live frames come back modified by the
/// programs they went through).
/// Written by: the benchmark (before a run). Read and advanced by: `bench_syn_gen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GeneratorState {
    pub stride: u32,
    pub offset: u32,
    /// First client address (network order).
    pub client_base: u32,
    /// Client addresses: `client_base` and the ones after it.
    pub clients: u32,
    /// Where the SYNs go (network order).
    pub target_addr: u32,
    /// Network order.
    pub target_port: u16,
    /// The client interface's MAC, and its peer's.
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// At most this many connections in flight (`ConnectionCounts::in_flight`): a run
    /// beyond it drops its frame instead of sending a SYN.
    pub window: u32,
}
crate::assert_size!(GeneratorState, 40);

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, no padding (size asserted above), valid for any bits.
unsafe impl aya::Pod for GeneratorState {}

/// Connections of a benchmark run, per CPU (their sums are the run's figures).
/// Written by: `bench_syn_gen` (`started`), `bench_tcp_client` (`completed`, `reset`).
/// Read by: the generator (to keep at most `GeneratorState.window` in flight) and the
/// benchmark.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ConnectionCounts {
    pub started: u64,
    /// Responses that reached the client.
    pub completed: u64,
    /// Connections the middle reset (a RST reached the client).
    pub reset: u64,
}
crate::assert_size!(ConnectionCounts, 24);

impl ConnectionCounts {
    /// The sum of two CPUs' counts.
    #[inline(always)]
    pub const fn plus(self, other: &ConnectionCounts) -> Self {
        Self { started: self.started + other.started, completed: self.completed + other.completed, reset: self.reset + other.reset }
    }

    /// Connections started and not ended, besides `lost` ones the benchmark gave up on.
    #[inline(always)]
    pub const fn in_flight(&self, lost: u64) -> u64 {
        self.started.saturating_sub(self.completed + self.reset + lost)
    }
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, no padding (size asserted above), valid for any bits.
unsafe impl aya::Pod for ConnectionCounts {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the other side receives from a reply: its flags, sequence numbers, payload.
    fn delivered(reply: Reply) -> (Segment, Payload) {
        let Reply::Send { flags, seq, ack, payload } = reply else { panic!("nothing sent") };
        (Segment { flags, seq, ack, payload_len: payload.size() as u32 }, payload)
    }

    /// One connection played between the two endpoints, nothing in between.
    #[test]
    fn a_connection_runs_to_the_client_reset() {
        let isn = server_isn(1000);
        let syn = Segment { flags: TCP_SYN, seq: 1000, ack: 0, payload_len: 0 };
        let (syn_ack, payload) = delivered(server_reply(syn));
        assert_eq!((syn_ack.flags, syn_ack.seq, syn_ack.ack, payload), (TCP_SYN | TCP_ACK, isn, 1001, Payload::Empty));
        let (request, payload) = delivered(client_reply(syn_ack));
        assert_eq!((request.flags, request.seq, request.ack, payload), (TCP_ACK | TCP_PSH, 1001, isn + 1, Payload::Request));
        let (response, payload) = delivered(server_reply(request));
        let fin = TCP_ACK | TCP_PSH | TCP_FIN;
        assert_eq!((response.flags, response.seq, response.ack, payload), (fin, isn + 1, 1001 + 32, Payload::Response));
        let (reset, payload) = delivered(client_reply(response));
        assert_eq!((reset.flags, reset.seq, reset.ack, payload), (TCP_RST, 1001 + 32, 0, Payload::Empty));
        // The RST and pure ACKs end it: nobody answers.
        assert_eq!(server_reply(reset), Reply::Drop);
        assert_eq!(server_reply(Segment { flags: TCP_ACK, seq: 1033, ack: 5, payload_len: 0 }), Reply::Drop);
        assert_eq!(client_reply(Segment { flags: TCP_ACK, seq: 1, ack: 5, payload_len: 0 }), Reply::Drop);
    }

    /// A proxy's kernel socket closes after the response: its FIN (alone, or after its
    /// ACK of ours) gets an ACK covering it.
    #[test]
    fn server_acks_a_peer_fin() {
        let fin = Segment { flags: TCP_FIN | TCP_ACK, seq: 77, ack: 900, payload_len: 0 };
        assert_eq!(server_reply(fin), Reply::Send { flags: TCP_ACK, seq: 900, ack: 78, payload: Payload::Empty });
        let data_fin = Segment { flags: TCP_FIN | TCP_ACK | TCP_PSH, seq: 77, ack: 900, payload_len: 32 };
        let Reply::Send { ack, .. } = server_reply(data_fin) else { panic!() };
        assert_eq!(ack, 77 + 32 + 1);
    }

    #[test]
    fn client_counts_a_reset_as_nothing_to_answer() {
        assert_eq!(client_reply(Segment { flags: TCP_RST | TCP_ACK, seq: 1, ack: 2, payload_len: 0 }), Reply::Drop);
        assert_eq!(client_reply(Segment { flags: TCP_SYN, seq: 1, ack: 0, payload_len: 0 }), Reply::Drop, "a SYN to a client");
    }

    #[test]
    fn payload_sums_are_word_sums() {
        let manual: u64 = REQUEST.chunks(2).map(|c| u16::from_ne_bytes([c[0], c[1]]) as u64).sum();
        assert_eq!(Payload::Request.sum(), manual);
        assert_eq!(Payload::Response.size(), 40);
    }

    proptest! {
        /// Tuples repeat only after every (address, port) pair was used once.
        #[test]
        fn generated_tuples_cycle_through_all(n in 0u64..1_000_000_000, clients in 1u32..16) {
            let range = (CLIENT_PORT_MAX - CLIENT_PORT_MIN) as u64 + 1;
            let (c, p) = generated_tuple(n, clients);
            prop_assert!(c < clients && (CLIENT_PORT_MIN..=CLIENT_PORT_MAX).contains(&p));
            prop_assert_eq!(generated_tuple(n + clients as u64 * range, clients), (c, p));
            let next = generated_tuple(n + 1, clients);
            prop_assert_ne!(next, (c, p));
        }

        /// Whatever arrives, a reply's sequence numbers follow from the segment alone.
        #[test]
        fn replies_ack_what_they_got(flags in any::<u8>(), seq in any::<u32>(), ack in any::<u32>(), len in 0u32..1500) {
            let s = Segment { flags, seq, ack, payload_len: len };
            if let Reply::Send { flags: f, seq: rs, ack: ra, .. } = server_reply(s) {
                prop_assert!(flags & TCP_RST == 0);
                if f & TCP_SYN == 0 {
                    prop_assert_eq!(rs, ack);
                    prop_assert!(ra == seq.wrapping_add(len) || ra == seq.wrapping_add(len).wrapping_add(1));
                }
            }
            if let Reply::Send { flags: f, seq: rs, .. } = client_reply(s) {
                prop_assert!(flags & TCP_RST == 0 && flags & TCP_ACK != 0);
                prop_assert_eq!(rs, ack);
                prop_assert!(f == TCP_RST || f == TCP_ACK | TCP_PSH);
            }
        }
    }
}
