//! BPF_PROG_TEST_RUN of the datapath on crafted IPv6 frames, with maps written the way the
//! agent writes them: full NAT and DNAT both ways with valid checksums, direct server
//! return in IPv6-in-IPv6 and its decapsulation, ICMPv6 "packet too big", IPv4 and IPv6
//! gateways side by side, and ICMPv6 and extension headers passed untouched.
//!
//! Runs inside a namespace of its own, as `test_run_datapath` does.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::{
    maps::{Array, HashMap, MapData},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use splitter_common::{
    flow::{bucket_slot, client_hash, flow_hash, SNAT_PORT_MAX, SNAT_PORT_MIN},
    maps::{
        ipv6_words, Address, BucketTable, DnatReply6, FlowEntry6, FlowKey6, GatewayKey, GatewayKey6, GatewayState, TargetEntry,
        TargetEntry6, FLOW_DSR, FLOW_TO_TARGET, GATEWAY_DNAT, GATEWAY_DSR, GATEWAY_STICKY_CLIENT, MAX_TARGETS_PER_GATEWAY, PROTO_TCP,
        PROTO_UDP,
    },
    table::{build_bucket_table, TableTarget, BUCKET_TABLE_SIZE},
    ForwardEvent, DECAP_PROGRAM_NAME, PROGRAM_NAME,
};
use splitter_tests::{
    ebpf_object,
    frames::{self, ip6_dst, ip6_src, Ipv4Packet, Ipv6Packet, ETH_LEN, IPV6_LEN, PROTO_ICMPV6, TCP_ACK, TCP_RST, TCP_SYN},
    privileged, run_xdp, Netns, Veth,
};

const XDP_ABORTED: u32 = 0;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const NEIGH_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x06];

fn vip() -> Ipv6Addr {
    "2001:db8::10".parse().unwrap()
}
fn client() -> Ipv6Addr {
    "2001:db8:1::2".parse().unwrap()
}
fn snat() -> Ipv6Addr {
    "2001:db8:2::1".parse().unwrap()
}
fn targets() -> [(Ipv6Addr, u16); 2] {
    [("2001:db8:2::11".parse().unwrap(), 8080), ("2001:db8:2::21".parse().unwrap(), 8080)]
}

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
const TARGET4: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 11);

fn words(addr: Ipv6Addr) -> [u32; 4] {
    ipv6_words(addr.octets())
}

struct Bench {
    ns: Netns,
    _peer: Netns,
    ebpf: Ebpf,
}

impl Bench {
    fn new() -> Self {
        let ns = Netns::new_dual_stack("testrun6").unwrap();
        let peer = Netns::new_dual_stack("testrun6-peer").unwrap();
        Veth::create(&ns, "tr0", "10.10.2.1/24", &peer, "tr1", "10.10.2.2/24").unwrap();
        ns.ip(&["addr", "add", "10.10.1.1/24", "dev", "tr0"]).unwrap();
        for net in ["2001:db8:2::1/64", "2001:db8:1::1/64"] {
            ns.ip(&["-6", "addr", "add", net, "dev", "tr0", "nodad"]).unwrap();
        }
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
        let mac = NEIGH_MAC.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        for addr in ["2001:db8:2::11", "2001:db8:2::21", "2001:db8:1::2", "10.10.2.11", "10.10.1.2"] {
            ns.ip(&["neigh", "replace", addr, "lladdr", &mac, "dev", "tr0", "nud", "permanent"]).unwrap();
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("CONNTRACK", 4096)
            .map_max_entries("HALF_OPEN", 4096)
            .map_max_entries("CONNTRACK6", 4096)
            .map_max_entries("HALF_OPEN6", 4096)
            .load_file(ebpf_object())
            .unwrap();
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        prog.load().expect("the verifier accepts the datapath");
        let decap: &mut Xdp = ebpf.program_mut(DECAP_PROGRAM_NAME).unwrap().try_into().unwrap();
        decap.load().expect("the verifier accepts the decapsulation program");
        Self { ns, _peer: peer, ebpf }
    }

    /// Writes a bucket table of `weights` (ppm) over targets with `keys`, at `table_index`.
    fn table(&mut self, table_index: u32, keys: &[u64], weights: &[u32]) {
        let table_targets: Vec<TableTarget> = keys.iter().zip(weights).map(|(k, w)| TableTarget { key: *k, weight: *w }).collect();
        let mut table = BucketTable { slots: [0; BUCKET_TABLE_SIZE], _pad: 0 };
        table.slots.copy_from_slice(&build_bucket_table(&table_targets));
        let mut tables: Array<&mut MapData, BucketTable> = Array::try_from(self.ebpf.map_mut("BUCKET_TABLES").unwrap()).unwrap();
        tables.set(table_index, table, 0).unwrap();
    }

    /// Installs IPv6 gateway `id` on VIP:port/proto with `weights` over `targets()`.
    fn gateway6(&mut self, id: u32, port: u16, proto: u8, flags: u32, table_index: u32, weights: [u32; 2]) {
        let mut map: Array<&mut MapData, TargetEntry6> = Array::try_from(self.ebpf.map_mut("TARGETS6").unwrap()).unwrap();
        for (i, (addr, tport)) in targets().iter().enumerate() {
            let entry =
                TargetEntry6 { addr: words(*addr), snat_addr: words(snat()), port: tport.to_be(), _pad: 0, counter_index: 10 + i as u32 };
            map.set(table_index * MAX_TARGETS_PER_GATEWAY + i as u32, entry, 0).unwrap();
        }
        let keys: Vec<u64> = targets().iter().map(|(a, p)| 1 << 63 | u64::from(words(*a).fold()) << 16 | u64::from(*p)).collect();
        self.table(table_index, &keys, &weights);
        let mut gateways: HashMap<&mut MapData, GatewayKey6, GatewayState> =
            HashMap::try_from(self.ebpf.map_mut("GATEWAYS6").unwrap()).unwrap();
        let key = GatewayKey6 { vip: words(vip()), port: port.to_be(), proto, _pad: 0 };
        let state = GatewayState { gateway_id: id, table_index, target_count: 2, flags, generation: table_index, connect_timeout_ms: 0 };
        gateways.insert(key, state, 0).unwrap();
    }

    /// Installs an IPv4 gateway `id` on VIP4:port/TCP with one target, TARGET4:8080.
    fn gateway4(&mut self, id: u32, port: u16, table_index: u32) {
        let mut map: Array<&mut MapData, TargetEntry> = Array::try_from(self.ebpf.map_mut("TARGETS").unwrap()).unwrap();
        let ne = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        let entry =
            TargetEntry { addr: ne(TARGET4), snat_addr: ne(Ipv4Addr::new(10, 10, 2, 1)), port: 8080u16.to_be(), _pad: 0, counter_index: 1 };
        map.set(table_index * MAX_TARGETS_PER_GATEWAY, entry, 0).unwrap();
        self.table(table_index, &[u64::from(u32::from(TARGET4)) << 16 | 8080], &[1_000_000]);
        let mut gateways: HashMap<&mut MapData, GatewayKey, GatewayState> =
            HashMap::try_from(self.ebpf.map_mut("GATEWAYS").unwrap()).unwrap();
        let key = GatewayKey { vip: ne(VIP4), port: port.to_be(), proto: PROTO_TCP, _pad: 0 };
        let state = GatewayState { gateway_id: id, table_index, target_count: 1, flags: 0, generation: 1, connect_timeout_ms: 0 };
        gateways.insert(key, state, 0).unwrap();
    }

    fn table_slots(&self, table_index: u32) -> Vec<u16> {
        let tables: Array<&MapData, BucketTable> = Array::try_from(self.ebpf.map("BUCKET_TABLES").unwrap()).unwrap();
        tables.get(&table_index, 0).unwrap().slots.to_vec()
    }

    fn len_of(&self, map: &str) -> usize {
        let m: HashMap<&MapData, FlowKey6, FlowEntry6> = HashMap::try_from(self.ebpf.map(map).unwrap()).unwrap();
        m.keys().count()
    }

    fn conntrack6(&self, key: &FlowKey6) -> Option<FlowEntry6> {
        let m: HashMap<&MapData, FlowKey6, FlowEntry6> = HashMap::try_from(self.ebpf.map("CONNTRACK6").unwrap()).unwrap();
        m.get(key, 0).ok()
    }

    fn forward_event(&self, event: ForwardEvent) -> u64 {
        let m: aya::maps::PerCpuArray<&MapData, u64> = aya::maps::PerCpuArray::try_from(self.ebpf.map("FORWARD_EVENTS").unwrap()).unwrap();
        m.get(&event.0, 0).unwrap().iter().sum()
    }

    /// Makes `targets()` answer for IPv6 gateway `id` (VIP:port/proto) without flow state,
    /// as the agent writes `DNAT_REPLIES6` for a DNAT gateway.
    fn dnat_replies6(&mut self, id: u32, port: u16, proto: u8) {
        let mut m: HashMap<&mut MapData, GatewayKey6, DnatReply6> = HashMap::try_from(self.ebpf.map_mut("DNAT_REPLIES6").unwrap()).unwrap();
        for (i, (addr, tport)) in targets().iter().enumerate() {
            let key = GatewayKey6 { vip: words(*addr), port: tport.to_be(), proto, _pad: 0 };
            let reply = DnatReply6 { vip: words(vip()), counter_index: 10 + i as u32, gateway_id: id, port: port.to_be(), flow_flags: 0 };
            m.insert(key, reply, 0).unwrap();
        }
    }

    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_program(PROGRAM_NAME, frame)
    }

    fn run_program(&self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &Xdp = self.ebpf.program(name).unwrap().try_into().unwrap();
        self.ns.enter(|| run_xdp(prog, frame).expect("BPF_PROG_TEST_RUN")).unwrap()
    }
}

fn key6(src: Ipv6Addr, sp: u16, dst: Ipv6Addr, dp: u16, proto: u8) -> FlowKey6 {
    FlowKey6 { src_addr: words(src), dst_addr: words(dst), src_port: sp.to_be(), dst_port: dp.to_be(), proto, _pad: 0, _pad_word: 0 }
}

fn tcp6(src: Ipv6Addr, sp: u16, dst: Ipv6Addr, dp: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    Ipv6Packet::new(src, dst, PROTO_TCP, frames::tcp(sp, dp, flags, payload)).build()
}

fn udp6(src: Ipv6Addr, sp: u16, dst: Ipv6Addr, dp: u16, payload: &[u8]) -> Vec<u8> {
    Ipv6Packet::new(src, dst, PROTO_UDP, frames::udp(sp, dp, payload)).build()
}

fn ports(f: &[u8], l4: usize) -> (u16, u16) {
    (u16::from_be_bytes([f[l4], f[l4 + 1]]), u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]))
}

/// The source and destination (address, port) of an Ethernet/IPv6 frame's TCP or UDP header.
fn endpoints(f: &[u8]) -> ((Ipv6Addr, u16), (Ipv6Addr, u16)) {
    let (sp, dp) = ports(f, ETH_LEN + IPV6_LEN);
    ((ip6_src(f), sp), (ip6_dst(f), dp))
}

/// The target the table gives a flow (the shared hash is what the kernel runs; the
/// IPv4 tests pin its formula).
fn expected_target(slots: &[u16], key: &FlowKey6, sticky: bool) -> (Ipv6Addr, u16) {
    let hash = if sticky { client_hash(key.src_addr) } else { flow_hash(key) };
    targets()[slots[bucket_slot(hash) as usize] as usize]
}

#[test]
fn ipv6_full_nat_translates_both_ways_with_valid_checksums() {
    if !privileged("ipv6_full_nat_translates_both_ways_with_valid_checksums") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway6(0, 9050, PROTO_TCP, 0, 0, [500_000, 500_000]);
    let slots = bench.table_slots(0);

    let syn = tcp6(client(), 40000, vip(), 9050, TCP_SYN, b"");
    let (action, out) = bench.run(&syn);
    assert_eq!(action, XDP_REDIRECT, "a SYN to the IPv6 VIP is forwarded");
    let want = expected_target(&slots, &key6(client(), 40000, vip(), 9050, PROTO_TCP), false);
    let ((src, snat_port), to) = endpoints(&out);
    assert_eq!(to, want, "addressed to the table's target");
    assert_eq!(src, snat(), "from the node's own address");
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat_port));
    assert!(frames::checksums6_valid(&out), "the TCP checksum, recomputed from scratch, matches");
    assert_eq!(out[0..6], NEIGH_MAC, "next-hop MAC from the IPv6 FIB");
    assert_eq!(out[ETH_LEN..ETH_LEN + 4], syn[ETH_LEN..ETH_LEN + 4], "traffic class and flow label kept");
    assert_eq!((bench.len_of("HALF_OPEN6"), bench.len_of("CONNTRACK6")), (2, 0), "half-open until the client's ACK");

    let syn_ack = tcp6(want.0, want.1, snat(), snat_port, TCP_SYN | TCP_ACK, b"");
    let (action, back) = bench.run(&syn_ack);
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(endpoints(&back), ((vip(), 9050), (client(), 40000)), "the client sees VIP:port");
    assert!(frames::checksums6_valid(&back));

    let data = tcp6(client(), 40000, vip(), 9050, TCP_ACK, b"GET / HTTP/1.0\r\n\r\n!");
    let (_, out2) = bench.run(&data);
    assert_eq!((bench.len_of("HALF_OPEN6"), bench.len_of("CONNTRACK6")), (0, 2), "established: both entries in CONNTRACK6");
    assert_eq!(endpoints(&out2), ((snat(), snat_port), want));
    assert!(frames::checksums6_valid(&out2));

    let rst = tcp6(want.0, want.1, snat(), snat_port, TCP_RST | TCP_ACK, b"");
    let (_, out3) = bench.run(&rst);
    assert_eq!(endpoints(&out3).1, (client(), 40000));
    assert_eq!(bench.len_of("CONNTRACK6"), 0, "a reset removes both entries");
}

#[test]
fn ipv6_dnat_and_udp_keep_the_client_address_and_sticky_clients_keep_their_target() {
    if !privileged("ipv6_dnat_and_udp_keep_the_client_address_and_sticky_clients_keep_their_target") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway6(0, 5353, PROTO_UDP, GATEWAY_DNAT | GATEWAY_STICKY_CLIENT, 0, [500_000, 500_000]);
    let slots = bench.table_slots(0);
    let mut seen = std::collections::BTreeSet::new();
    for port in 30000..30016u16 {
        let request = udp6(client(), port, vip(), 5353, b"query");
        let (action, out) = bench.run(&request);
        assert_eq!(action, XDP_REDIRECT);
        let want = expected_target(&slots, &key6(client(), port, vip(), 5353, PROTO_UDP), true);
        assert_eq!(endpoints(&out), ((client(), port), want), "DNAT keeps the client's address and port");
        assert!(frames::checksums6_valid(&out));
        seen.insert(want);
        let answer = udp6(want.0, want.1, client(), port, b"answer");
        let (action, back) = bench.run(&answer);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(endpoints(&back), ((vip(), 5353), (client(), port)), "the answer comes from VIP:port");
        assert!(frames::checksums6_valid(&back));
    }
    assert_eq!(seen.len(), 1, "one client, one target (sticky: client)");
    assert_eq!(bench.len_of("CONNTRACK6"), 32, "UDP: both entries of each flow at once");
}

#[test]
fn an_ipv6_dnat_targets_answer_no_state_knows_is_sent_from_the_vip_and_its_own_traffic_passes() {
    if !privileged("an_ipv6_dnat_targets_answer_no_state_knows_is_sent_from_the_vip_and_its_own_traffic_passes") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway6(0, 80, PROTO_TCP, GATEWAY_DNAT, 0, [500_000, 500_000]);
    let (taddr, tport) = targets()[1];
    let answer = tcp6(taddr, tport, client(), 40100, TCP_ACK, b"HTTP/1.1 200 OK\r\n");
    let (action, out) = bench.run(&answer);
    assert_eq!((action, &out), (XDP_PASS, &answer), "no DNAT_REPLIES6 entry: passed untouched");

    bench.dnat_replies6(0, 80, PROTO_TCP);
    let (action, out) = bench.run(&answer);
    assert_eq!(action, XDP_REDIRECT, "sent towards the client");
    assert_eq!(endpoints(&out), ((vip(), 80), (client(), 40100)), "the answer comes from VIP:port");
    assert!(frames::checksums6_valid(&out));
    assert_eq!(&out[ETH_LEN + IPV6_LEN + 20..], b"HTTP/1.1 200 OK\r\n", "payload untouched");
    let kept = bench.conntrack6(&key6(taddr, tport, client(), 40100, PROTO_TCP)).expect("the answer's entry is kept");
    assert_eq!(kept.counter_index, 11, "counted for its target");
    let (_, again) = bench.run(&tcp6(taddr, tport, client(), 40100, TCP_ACK | TCP_RST, b""));
    assert_eq!(endpoints(&again).0, (vip(), 80), "the next answer takes the entry");
    assert!(frames::checksums6_valid(&again));

    // The target's own connection (a SYN), an answer to this host (a health check's) and
    // one from another port are not the gateway's.
    for frame in [
        tcp6(taddr, tport, client(), 40101, TCP_SYN, b""),
        tcp6(taddr, tport, snat(), 40102, TCP_SYN | TCP_ACK, b""),
        tcp6(taddr, tport + 1, client(), 40103, TCP_ACK, b""),
    ] {
        let (action, out) = bench.run(&frame);
        assert_eq!((action, &out), (XDP_PASS, &frame), "passed untouched");
    }
    assert!(bench.conntrack6(&key6(taddr, tport, snat(), 40102, PROTO_TCP)).is_none());
}

#[test]
fn ipv4_and_ipv6_gateways_work_side_by_side() {
    if !privileged("ipv4_and_ipv6_gateways_work_side_by_side") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway6(0, 80, PROTO_TCP, 0, 0, [500_000, 500_000]);
    bench.gateway4(1, 80, 2);
    let v4 = Ipv4Packet::new(CLIENT4, VIP4, PROTO_TCP, frames::tcp(40000, 80, TCP_SYN, b"")).build();
    let (action, out) = bench.run(&v4);
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(out[ETH_LEN + 16..ETH_LEN + 20], TARGET4.octets(), "the IPv4 gateway's target");
    assert!(frames::checksums_valid(&out));
    let v6 = tcp6(client(), 40000, vip(), 80, TCP_SYN, b"");
    let (action, out) = bench.run(&v6);
    assert_eq!(action, XDP_REDIRECT);
    assert!(targets().iter().any(|t| endpoints(&out).1 == *t), "the IPv6 gateway's target");
    assert_eq!((bench.len_of("HALF_OPEN6"), bench.len_of("CONNTRACK6")), (2, 0), "each family's flows in its own maps");
}

#[test]
fn icmpv6_extension_headers_and_malformed_ipv6_pass_untouched_and_never_abort() {
    if !privileged("icmpv6_extension_headers_and_malformed_ipv6_pass_untouched_and_never_abort") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway6(0, 9050, PROTO_TCP, 0, 0, [500_000, 500_000]);
    bench.gateway6(1, 5353, PROTO_UDP, 0, 2, [500_000, 500_000]);
    // Neighbour solicitation and an echo request for the VIP, a packet too big about it.
    let solicitation = Ipv6Packet::new(client(), vip(), PROTO_ICMPV6, [&[135u8, 0, 0, 0, 0, 0, 0, 0][..], &vip().octets()].concat());
    let echo = Ipv6Packet::new(client(), vip(), PROTO_ICMPV6, vec![128, 0, 0, 0, 0, 1, 0, 1]);
    let too_big = Ipv6Packet::new(client(), vip(), PROTO_ICMPV6, [&[2u8, 0, 0, 0, 0, 0, 5, 0][..], &[0u8; 48]].concat());
    // TCP behind a hop-by-hop options header, behind a fragment header, a routing header.
    let mut hop_by_hop = Ipv6Packet::new(client(), vip(), PROTO_TCP, frames::tcp(40000, 9050, TCP_SYN, b""));
    hop_by_hop.next_header = 0;
    hop_by_hop.extensions = vec![PROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
    let mut fragment = Ipv6Packet::new(client(), vip(), PROTO_UDP, frames::udp(40001, 5353, b"first fragment"));
    fragment.next_header = 44;
    fragment.extensions = vec![PROTO_UDP, 0, 0, 1, 0, 0, 0, 7];
    let mut routing = hop_by_hop.clone();
    routing.next_header = 43;
    let mut cases: Vec<Vec<u8>> =
        [solicitation, echo, too_big, hop_by_hop.clone(), fragment, routing].iter().map(Ipv6Packet::build).collect();
    // Truncated: an extension header cut short, a TCP header cut short, a payload length
    // past the frame's end, a bare fixed header, half a fixed header.
    let whole_hbh = hop_by_hop.build();
    cases.push(whole_hbh[..ETH_LEN + IPV6_LEN + 4].to_vec());
    let syn = tcp6(client(), 40002, vip(), 9050, TCP_SYN, b"");
    cases.push(syn[..ETH_LEN + IPV6_LEN + 12].to_vec());
    let mut long = syn.clone();
    long[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&400u16.to_be_bytes());
    cases.push(long);
    cases.push(syn[..ETH_LEN + IPV6_LEN].to_vec());
    cases.push(syn[..ETH_LEN + 20].to_vec());
    // Version 4 in an IPv6 EtherType.
    let mut wrong_version = syn.clone();
    wrong_version[ETH_LEN] = 0x40;
    cases.push(wrong_version);
    for (i, frame) in cases.iter().enumerate() {
        let (action, out) = bench.run(frame);
        assert_ne!(action, XDP_ABORTED, "case {i} never aborts");
        assert_eq!((action, &out), (XDP_PASS, frame), "case {i} passes to the kernel untouched");
    }
    assert_eq!((bench.len_of("HALF_OPEN6"), bench.len_of("CONNTRACK6")), (0, 0), "no flow state from any of them");
}

/// An IPv6-in-IPv6 frame's outer header, checked field by field; returns (source,
/// destination).
fn outer_header6(out: &[u8], inner: &[u8]) -> (Ipv6Addr, Ipv6Addr) {
    assert_eq!(out[12..14], [0x86, 0xdd], "IPv6 frame");
    let outer = &out[ETH_LEN..ETH_LEN + IPV6_LEN];
    assert_eq!(outer[0] >> 4, 6, "outer header: version 6");
    assert_eq!(outer[..4], inner[ETH_LEN..ETH_LEN + 4], "the inner header's traffic class and flow label");
    assert_eq!(usize::from(u16::from_be_bytes([outer[4], outer[5]])), inner.len() - ETH_LEN, "payload: the whole inner packet");
    assert_eq!(outer[6], 41, "next header: IPv6");
    assert!(outer[7] > 1, "hop limit");
    (ip6_src(out), ip6_dst(out))
}

#[test]
fn ipv6_dsr_encapsulates_to_the_tables_target_and_decapsulation_restores_the_packet() {
    if !privileged("ipv6_dsr_encapsulates_to_the_tables_target_and_decapsulation_restores_the_packet") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway6(0, 9050, PROTO_TCP, GATEWAY_DSR, 0, [500_000, 500_000]);
    bench.gateway6(1, 5353, PROTO_UDP, GATEWAY_DSR, 2, [500_000, 500_000]);
    let slots = bench.table_slots(0);
    let mut seen = std::collections::BTreeSet::new();
    for port in 41000..41016u16 {
        let syn = tcp6(client(), port, vip(), 9050, TCP_SYN, b"");
        let (action, out) = bench.run(&syn);
        assert_eq!(action, XDP_REDIRECT, "the SYN leaves encapsulated");
        let want = expected_target(&slots, &key6(client(), port, vip(), 9050, PROTO_TCP), false);
        assert_eq!(outer_header6(&out, &syn), (snat(), want.0), "from the node's address to the table's target");
        assert_eq!(out[ETH_LEN + IPV6_LEN..], syn[ETH_LEN..], "the client's packet rides inside unchanged");
        assert_eq!(out[0..6], NEIGH_MAC);
        seen.insert(want.0);
    }
    assert_eq!(seen.len(), 2, "flows spread over both targets");
    assert_eq!((bench.len_of("HALF_OPEN6"), bench.len_of("CONNTRACK6")), (16, 0), "the client's entries alone");

    let syn = tcp6(client(), 41000, vip(), 9050, TCP_SYN, b"");
    let want = expected_target(&slots, &key6(client(), 41000, vip(), 9050, PROTO_TCP), false);
    let ack = tcp6(client(), 41000, vip(), 9050, TCP_ACK, b"GET / HTTP/1.0\r\n\r\n");
    let (_, out) = bench.run(&ack);
    assert_eq!(outer_header6(&out, &ack).1, want.0);
    let entry = bench.conntrack6(&key6(client(), 41000, vip(), 9050, PROTO_TCP)).expect("promoted");
    assert_eq!(entry.flags & (FLOW_DSR | FLOW_TO_TARGET), FLOW_DSR | FLOW_TO_TARGET);
    // All weight to the other target: the established flow stays.
    let other = if want == targets()[0] { [0, 1_000_000] } else { [1_000_000, 0] };
    bench.gateway6(0, 9050, PROTO_TCP, GATEWAY_DSR, 4, other);
    let (_, out) = bench.run(&ack);
    assert_eq!(outer_header6(&out, &ack).1, want.0, "an established flow keeps its target");

    for frame in [syn, ack, udp6(client(), 43001, vip(), 5353, b"query")] {
        let (action, encapsulated) = bench.run(&frame);
        assert_eq!(action, XDP_REDIRECT);
        let (action, decapsulated) = bench.run_program(DECAP_PROGRAM_NAME, &encapsulated);
        assert_eq!(action, XDP_PASS, "up the target's stack");
        assert_eq!(decapsulated[..12], encapsulated[..12], "the frame's MACs as it arrived at the target");
        assert_eq!(decapsulated[12..], frame[12..], "the client's packet, byte for byte");
        assert!(frames::checksums6_valid(&decapsulated));
    }
    // Not IPv6 in IPv6: passed untouched by the decapsulation program.
    let plain = tcp6(client(), 43002, vip(), 9050, TCP_SYN, b"");
    let (action, out) = bench.run_program(DECAP_PROGRAM_NAME, &plain);
    assert_eq!((action, out), (XDP_PASS, plain));
}

#[test]
fn an_ipv6_dsr_packet_too_big_once_encapsulated_gets_an_icmpv6_packet_too_big() {
    if !privileged("an_ipv6_dsr_packet_too_big_once_encapsulated_gets_an_icmpv6_packet_too_big") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway6(0, 9050, PROTO_TCP, GATEWAY_DSR, 0, [500_000, 500_000]);
    bench.gateway6(1, 5353, PROTO_UDP, GATEWAY_DSR, 2, [500_000, 500_000]);
    // 1460 bytes of IPv6 fit a 1500-byte MTU once encapsulated; 1461 do not.
    let fits = tcp6(client(), 44000, vip(), 9050, TCP_ACK, &vec![7u8; 1460 - 60]);
    let (action, out) = bench.run(&fits);
    assert_eq!(action, XDP_REDIRECT);
    outer_header6(&out, &fits);
    for (i, big) in [
        tcp6(client(), 44000, vip(), 9050, TCP_ACK, &vec![7u8; 1461 - 60]),
        tcp6(client(), 44001, vip(), 9050, TCP_SYN, &vec![7u8; 1500 - 60]),
        udp6(client(), 44002, vip(), 5353, &vec![1u8; 1500 - 48]),
    ]
    .iter()
    .enumerate()
    {
        let before = bench.forward_event(ForwardEvent::ICMP_TOO_BIG);
        let (action, icmp) = bench.run(big);
        assert_eq!(action, XDP_TX, "case {i}: answered out of the interface it came in on");
        assert_eq!(icmp.len(), ETH_LEN + IPV6_LEN + 8 + 48, "case {i}: the IPv6 header and 8 bytes quoted");
        assert_eq!(icmp[0..6], big[6..12], "case {i}: to the sender's MAC");
        assert_eq!(icmp[6..12], big[0..6], "case {i}: from the MAC it was sent to");
        assert_eq!((ip6_src(&icmp), ip6_dst(&icmp)), (vip(), client()), "case {i}: from the VIP back to the client");
        assert_eq!(icmp[ETH_LEN + 6], PROTO_ICMPV6, "case {i}: ICMPv6");
        assert!(frames::checksums6_valid(&icmp), "case {i}: the ICMPv6 checksum (with its pseudo-header)");
        let message = &icmp[ETH_LEN + IPV6_LEN..];
        assert_eq!((message[0], message[1]), (2, 0), "case {i}: packet too big");
        assert_eq!(u32::from_be_bytes(message[4..8].try_into().unwrap()), 1460, "case {i}: the MTU left inside the tunnel");
        assert_eq!(message[8..], big[ETH_LEN..ETH_LEN + 48], "case {i}: quotes the packet's header and first 8 bytes");
        assert_eq!(bench.forward_event(ForwardEvent::ICMP_TOO_BIG), before + 1);
    }
}
