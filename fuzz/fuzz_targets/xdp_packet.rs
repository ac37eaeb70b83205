//! Frames through the real XDP program with BPF_PROG_TEST_RUN: gateways installed by the
//! agent's own datapath code (fullnat, dnat, UDP, sticky), then sequences of frames built
//! from the input — to the VIPs, replies of flows made earlier, replies of flows never
//! made, unrelated traffic — shaped with VLAN tags, IPv6 and extension headers, IP and
//! TCP options, fragments, lying lengths, bad checksums, truncation and flipped bytes.
//!
//! Invariants checked on every frame:
//! - the program never aborts (XDP_ABORTED) and returns a known action;
//! - the frame keeps its length;
//! - a frame of no gateway (neither to a VIP:port nor from a target) comes out
//!   byte-identical and passed to the stack;
//! - a rewritten frame changes only addresses, ports and checksums; if the frame came in
//!   with valid checksums it leaves with valid ones; it goes to a configured target or a
//!   client known from a translated frame; a translated reply belongs to a flow this
//!   fuzzer made on that tuple, and goes back from its VIP to its client, or comes from a
//!   DNAT gateway's target and goes on from that gateway's VIP to where it was going.
#![no_main]

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{Mutex, OnceLock},
};

use arbitrary::Arbitrary;
use aya::{programs::Xdp, Ebpf};
use libfuzzer_sys::fuzz_target;
use splitter_tests::{
    frames::{checksums_checked, fix_checksums},
    run_xdp,
};
use splitter_user::{
    datapath::{Datapath, Dataplane},
    gateway::{parse_documents, Document},
};

const XDP_ABORTED: u32 = 0;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ETH: usize = 14;

const GATEWAYS: &str = "\
name: fz/web
port: 9050/tcp
virtual_address: 10.0.0.10
mode: fullnat
routes:
  stable: {weight: 80%, targets: [10.10.2.11:8080, 10.10.2.12:8080]}
  canary: {weight: 20%, targets: [10.10.2.21:8080]}
---
name: fz/dnat
port: 9051/tcp
virtual_address: 10.0.0.10
mode: dnat
routes:
  stable: {weight: 50%, targets: [10.10.2.11:8081]}
  canary: {weight: 50%, targets: [10.10.2.21:8081]}
---
name: fz/dns
port: 5353/udp
virtual_address: 10.0.0.10
routes:
  stable: {weight: 90%, targets: [10.10.2.11:5353]}
  canary: {weight: 10%, targets: [10.10.2.21:5353]}
---
name: fz/sticky
port: 80/tcp
virtual_address: 10.0.0.11
sticky: client
routes:
  stable: {weight: 70%, targets: [10.10.2.12:8080]}
  canary: {weight: 30%, targets: [10.10.2.21:8080]}
";

/// The targets of the DNAT gateway (`fz/dnat`) and its VIP:port: their answers are
/// translated without flow state.
const DNAT_TARGETS: [Endpoint; 2] = [(Ipv4Addr::new(10, 10, 2, 11), 8081), (Ipv4Addr::new(10, 10, 2, 21), 8081)];
const DNAT_VIP: Endpoint = (Ipv4Addr::new(10, 0, 0, 10), 9051);

/// The splitter's own addresses towards targets and clients.
const SNAT: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 1);
const NEIGH_MAC: &str = "02:aa:bb:cc:dd:01";
const CLIENTS: u8 = 8;

type Endpoint = (Ipv4Addr, u16);

struct Fuzzer {
    ebpf: Ebpf,
    /// Owns the map handles, for the fuzzer's life.
    _datapath: Mutex<Datapath>,
    /// VIP, port, protocol of every gateway.
    vips: Vec<(Ipv4Addr, u16, u8)>,
    targets: BTreeSet<Endpoint>,
    /// What the fuzzer learned from translated frames.
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Clients whose frames were translated to a target.
    clients: BTreeSet<Endpoint>,
    /// Each translated flow as the target sees it (target, splitter side) -> as the
    /// client sees it (client, VIP), newest last. One reply tuple can have served several
    /// flows: a full-NAT port is reused after its flow closed, and a flow whose reply
    /// entry the LRU evicted may still send on a port given to a new flow since.
    flows: HashMap<(Endpoint, Endpoint), Vec<(Endpoint, Endpoint)>>,
    /// Recent translated flows, for replies.
    recent: Vec<(Endpoint, Endpoint, u8)>,
    /// Frames run, frames translated towards a target, replies translated back.
    frames: u64,
    forwarded: u64,
    replied: u64,
}

fn fuzzer() -> &'static Fuzzer {
    static FUZZER: OnceLock<Fuzzer> = OnceLock::new();
    FUZZER.get_or_init(|| {
        splitter_fuzz::isolate_network();
        splitter_fuzz::ip(&["link", "add", "fz0", "type", "veth", "peer", "name", "fz1"]);
        splitter_fuzz::ip(&["addr", "add", "10.10.2.1/24", "dev", "fz0"]);
        splitter_fuzz::ip(&["addr", "add", "10.10.1.1/24", "dev", "fz0"]);
        splitter_fuzz::ip(&["link", "set", "fz0", "up"]);
        splitter_fuzz::ip(&["link", "set", "fz1", "up"]);
        splitter_fuzz::sysctl("net.ipv4.ip_forward", "1");
        let mut neighbours: Vec<String> = ["10.10.2.11", "10.10.2.12", "10.10.2.21"].map(String::from).to_vec();
        neighbours.extend((0..CLIENTS).map(|c| client(c).to_string()));
        for addr in &neighbours {
            splitter_fuzz::ip(&["neigh", "replace", addr, "lladdr", NEIGH_MAC, "dev", "fz0", "nud", "permanent"]);
        }

        let (mut ebpf, maps) = splitter_fuzz::load();
        let program: &mut Xdp = ebpf
            .program_mut(splitter_common::PROGRAM_NAME)
            .expect("the object has the splitter program")
            .try_into()
            .expect("an XDP program");
        program.load().expect("the verifier accepts the datapath");

        let mut datapath = Datapath::new(maps, splitter_fuzz::LIMITS);
        let mut vips = Vec::new();
        let mut targets = BTreeSet::new();
        for document in parse_documents("fuzz gateways", GATEWAYS).expect("the fuzz gateways parse") {
            let Document::Gateway(gateway) = document else { continue };
            datapath.apply(&gateway, &gateway.weighted_targets()).expect("the fuzz gateways apply");
            let proto = if gateway.protocol.is_udp() { UDP } else { TCP };
            let ipv4 = |addr: IpAddr| match addr {
                IpAddr::V4(addr) => addr,
                IpAddr::V6(_) => panic!("the fuzz gateways are IPv4"),
            };
            vips.push((ipv4(gateway.virtual_address), gateway.port, proto));
            for route in &gateway.routes {
                targets.extend(route.targets.iter().map(|t| (ipv4(t.addr), t.port)));
            }
        }
        Fuzzer { ebpf, _datapath: Mutex::new(datapath), vips, targets, seen: Mutex::new(Seen::default()) }
    })
}

fn client(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 1, 2 + index % CLIENTS)
}

#[derive(Arbitrary, Debug)]
enum Flow {
    /// A client to a gateway's VIP and port.
    ToGateway { gateway: u8, client: u8, port: u16 },
    /// A target answering a flow translated earlier.
    ReplyToRecent { index: u8 },
    /// A target "answering" a flow nobody made.
    ReplyUnknown { target: u8, port: u16, to_splitter: bool },
    /// Anything else.
    Other { src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8 },
}

#[derive(Arbitrary, Debug)]
struct Shape {
    tcp_flags: u8,
    payload: Vec<u8>,
    vlan: Option<u16>,
    /// IPv6 with these extension headers (hop-by-hop 0, routing 43, fragment 44,
    /// destination 60) instead of IPv4.
    ipv6: Option<Vec<u8>>,
    ip_option_words: u8,
    tcp_option_words: u8,
    /// The IPv4 flags and fragment offset field (None: don't fragment).
    fragment: Option<u16>,
    ttl: u8,
    udp_without_checksum: bool,
    /// Added to the IPv4 total length after the checksums are made.
    length_lie: i8,
    bad_ip_checksum: bool,
    bad_l4_checksum: bool,
    truncate_to: Option<u16>,
    flips: Vec<(u16, u8)>,
}

#[derive(Arbitrary, Debug)]
struct Packet {
    flow: Flow,
    shape: Shape,
}

/// Source, destination and protocol a flow gives the frame.
fn endpoints(f: &Fuzzer, flow: &Flow) -> (Endpoint, Endpoint, u8) {
    let targets: Vec<&Endpoint> = f.targets.iter().collect();
    match flow {
        Flow::ToGateway { gateway, client: c, port } => {
            let (vip, vport, proto) = f.vips[usize::from(*gateway) % f.vips.len()];
            ((client(*c), *port), (vip, vport), proto)
        }
        Flow::ReplyToRecent { index } => {
            let seen = f.seen.lock().unwrap();
            match seen.recent.get(usize::from(*index) % seen.recent.len().max(1)) {
                Some(&(target, splitter_side, proto)) => (target, splitter_side, proto),
                None => (*targets[0], (SNAT, 10000), TCP),
            }
        }
        Flow::ReplyUnknown { target, port, to_splitter } => {
            let t = *targets[usize::from(*target) % targets.len()];
            let to = if *to_splitter { SNAT } else { client(*target) };
            (t, (to, *port), if port % 2 == 0 { TCP } else { UDP })
        }
        Flow::Other { src, dst, sport, dport, proto } => ((Ipv4Addr::from(*src), *sport), (Ipv4Addr::from(*dst), *dport), *proto),
    }
}

fn l4_segment(proto: u8, src: Endpoint, dst: Endpoint, s: &Shape) -> Vec<u8> {
    let payload = &s.payload[..s.payload.len().min(80)];
    let mut l4 = Vec::new();
    match proto {
        TCP => {
            let option_words = usize::from(s.tcp_option_words % 11);
            l4.extend_from_slice(&src.1.to_be_bytes());
            l4.extend_from_slice(&dst.1.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]);
            l4.push(((5 + option_words) as u8) << 4);
            l4.push(s.tcp_flags);
            l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
            l4.extend(std::iter::repeat_n(1u8, option_words * 4)); // NOP options
        }
        UDP => {
            l4.extend_from_slice(&src.1.to_be_bytes());
            l4.extend_from_slice(&dst.1.to_be_bytes());
            l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
        }
        _ => {}
    }
    l4.extend_from_slice(payload);
    l4
}

fn build(src: Endpoint, dst: Endpoint, proto: u8, s: &Shape) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    if let Some(tag) = s.vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&tag.to_be_bytes());
    }
    let l4 = l4_segment(proto, src, dst, s);
    if let Some(extensions) = &s.ipv6 {
        f.extend_from_slice(&[0x86, 0xdd]);
        let extensions = &extensions[..extensions.len().min(4)];
        let mut headers = Vec::new();
        let chain: Vec<u8> = extensions.iter().map(|e| [0, 43, 44, 60][usize::from(*e) % 4]).collect();
        for (i, _) in chain.iter().enumerate() {
            let next = chain.get(i + 1).copied().unwrap_or(proto);
            headers.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
        }
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((headers.len() + l4.len()) as u16).to_be_bytes());
        f.push(chain.first().copied().unwrap_or(proto));
        f.push(s.ttl);
        for addr in [src.0, dst.0] {
            f.extend_from_slice(&addr.to_ipv6_mapped().octets());
        }
        f.extend_from_slice(&headers);
        f.extend_from_slice(&l4);
    } else {
        f.extend_from_slice(&[0x08, 0x00]);
        let ip_start = f.len();
        let option_words = usize::from(s.ip_option_words % 11);
        let ihl = 20 + option_words * 4;
        let total = ihl + l4.len();
        f.push(0x40 | (ihl / 4) as u8);
        f.push(0);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34]);
        f.extend_from_slice(&s.fragment.unwrap_or(0x4000).to_be_bytes());
        f.extend_from_slice(&[s.ttl, proto, 0, 0]);
        f.extend_from_slice(&src.0.octets());
        f.extend_from_slice(&dst.0.octets());
        f.extend(std::iter::repeat_n(1u8, option_words * 4)); // NOP options
        f.extend_from_slice(&l4);
        if s.vlan.is_none() {
            fix_checksums(&mut f);
            if proto == UDP && s.udp_without_checksum && l4.len() >= 8 {
                f[ip_start + ihl + 6..ip_start + ihl + 8].copy_from_slice(&[0, 0]);
            }
            if s.bad_ip_checksum {
                f[ip_start + 10] ^= 0x5a;
            }
            if s.bad_l4_checksum {
                let at = match proto {
                    TCP => 16,
                    UDP => 6,
                    _ => 0,
                };
                if at > 0 {
                    f[ip_start + ihl + at] ^= 0xa5;
                }
            }
        }
        if s.length_lie != 0 {
            let lied = (total as i32 + i32::from(s.length_lie)).clamp(0, 0xffff) as u16;
            f[ip_start + 2..ip_start + 4].copy_from_slice(&lied.to_be_bytes());
        }
    }
    for (at, mask) in s.flips.iter().take(4) {
        let len = f.len();
        f[usize::from(*at) % len] ^= mask;
    }
    if let Some(to) = s.truncate_to {
        f.truncate(usize::from(to).max(ETH));
    }
    f
}

/// The addresses, ports and protocol an untagged IPv4 frame claims, read at their fixed
/// places (as much as is there); nothing else is trusted.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Claimed {
    ihl: usize,
    proto: u8,
    src: Endpoint,
    dst: Endpoint,
}

fn claimed(f: &[u8]) -> Option<Claimed> {
    if f.len() < ETH + 20 || f[12..14] != [0x08, 0x00] || f[ETH] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(f[ETH] & 0x0f) * 4;
    if ihl < 20 || f.len() < ETH + ihl + 4 {
        return None;
    }
    let addr = |at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
    let port = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    let l4 = ETH + ihl;
    Some(Claimed { ihl, proto: f[ETH + 9], src: (addr(ETH + 12), port(l4)), dst: (addr(ETH + 16), port(l4 + 2)) })
}

fn run(f: &Fuzzer, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &Xdp = f.ebpf.program(splitter_common::PROGRAM_NAME).expect("the splitter program").try_into().expect("an XDP program");
    run_xdp(program, frame).expect("BPF_PROG_TEST_RUN accepts a frame of 14 bytes or more")
}

fn check(f: &Fuzzer, packet: &Packet, frame: &[u8], action: u32, out: &[u8]) {
    assert_ne!(action, XDP_ABORTED, "the program aborted on {packet:?}");
    assert!(action <= XDP_REDIRECT, "unknown action {action}");
    assert_eq!(out.len(), frame.len(), "the frame keeps its length");
    let input = claimed(frame);
    let to_gateway = input.is_some_and(|c| f.vips.iter().any(|&(vip, port, proto)| c.dst == (vip, port) && c.proto == proto));
    let from_target = input.is_some_and(|c| f.targets.contains(&c.src));
    if !to_gateway && !from_target {
        assert_eq!(action, XDP_PASS, "a frame of no gateway goes to the stack: {packet:?}");
        assert_eq!(out, frame, "a frame of no gateway is untouched: {packet:?}");
        return;
    }
    if out[ETH..] == frame[ETH..] {
        return;
    }
    let c = input.expect("checked above");
    let o = claimed(out).expect("a rewritten frame is still IPv4");
    assert_eq!((o.ihl, o.proto), (c.ihl, c.proto));
    // Only addresses, ports and checksums may differ.
    let l4 = ETH + c.ihl;
    let l4_check = if c.proto == TCP { l4 + 16..l4 + 18 } else { l4 + 6..l4 + 8 };
    for i in ETH..frame.len() {
        let may_change = (ETH + 10..ETH + 20).contains(&i) || (l4..l4 + 4).contains(&i) || l4_check.contains(&i);
        assert!(may_change || frame[i] == out[i], "byte {i} changed: {packet:?}");
    }
    if checksums_checked(frame) == Some(true) {
        assert_eq!(checksums_checked(out), Some(true), "valid checksums in, valid out: {packet:?}");
    }
    let mut seen = f.seen.lock().unwrap();
    if to_gateway {
        seen.forwarded += 1;
        assert!(f.targets.contains(&o.dst), "a frame to a VIP goes to a target, not {:?}", o.dst);
        seen.clients.insert(c.src);
        let holders = seen.flows.entry((o.dst, o.src)).or_default();
        if !holders.contains(&(c.src, c.dst)) {
            if holders.len() >= 16 {
                holders.remove(0);
            }
            holders.push((c.src, c.dst));
        }
        if seen.recent.len() >= 256 {
            seen.recent.remove(0);
        }
        seen.recent.push((o.dst, o.src, c.proto));
        if seen.flows.len() > 1 << 20 {
            seen.flows.clear();
        }
    } else if DNAT_TARGETS.contains(&c.src) && c.proto == TCP && !seen.flows.contains_key(&(c.src, c.dst)) {
        // A DNAT target's answer no state knows (its flow went through another node):
        // sent from the DNAT gateway's VIP:port, to where it was going.
        seen.replied += 1;
        assert_eq!((o.src, o.dst), (DNAT_VIP, c.dst), "a DNAT target's answer without state goes from the VIP: {packet:?}");
        assert_ne!(c.dst.0, SNAT, "an answer to the splitter itself is its own: {packet:?}");
    } else {
        seen.replied += 1;
        assert!(seen.clients.contains(&o.dst), "a reply goes to a known client, not {:?}: {packet:?}", o.dst);
        let holders = seen.flows.get(&(c.src, c.dst));
        assert!(holders.is_some(), "a reply of a flow never made was translated: {packet:?}");
        assert!(
            holders.unwrap().contains(&(o.dst, o.src)),
            "a reply goes from the VIP to a client of a flow with this tuple, not {:?} -> {:?} (flows: {holders:?})",
            o.src,
            o.dst
        );
    }
}

fuzz_target!(|packets: Vec<Packet>| {
    let f = fuzzer();
    for packet in packets.iter().take(16) {
        let (src, dst, proto) = endpoints(f, &packet.flow);
        let frame = build(src, dst, proto, &packet.shape);
        if frame.len() < ETH {
            continue;
        }
        let (action, out) = run(f, &frame);
        check(f, packet, &frame, action, &out);
        let mut seen = f.seen.lock().unwrap();
        seen.frames += 1;
        if seen.frames.is_power_of_two() && seen.frames >= 1 << 16 {
            // Shows the checks bite: how many frames were translated each way.
            eprintln!(
                "xdp_packet: {} frames, {} translated to targets, {} replies translated back, {} flows known",
                seen.frames,
                seen.forwarded,
                seen.replied,
                seen.flows.len()
            );
        }
    }
});
