//! BPF_PROG_TEST_RUN of the datapath on crafted frames, with maps written the way the
//! agent writes them: translation both ways with valid checksums, conntrack, stickiness,
//! established flows surviving a table switch, and untouched non-matching packets.
//!
//! Runs inside a namespace of its own (the program's FIB lookups then see only the routes
//! and static neighbours made here): targets are reachable through `tr0`, so translated
//! packets come out redirected with the neighbour's MAC.

use std::net::Ipv4Addr;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use splitter_common::{
    flow::{bucket_slot, client_hash, flow_hash, snat_port, SNAT_PORT_MAX, SNAT_PORT_MIN, SNAT_PORT_TRIES},
    maps::{
        address_bucket, AddressFilter, BucketTable, DnatReply, DsrSource, FlowEntry, FlowKey, GatewayKey, GatewayState, TargetEntry,
        TargetOutcomes, FLOW_DSR, FLOW_ESTABLISHED, FLOW_FIN_SEEN, FLOW_FROM_TARGET, FLOW_TO_TARGET, GATEWAY_DNAT, GATEWAY_DSR,
        GATEWAY_HTTP, GATEWAY_STICKY_CLIENT, MAX_TARGETS_PER_GATEWAY, PROTO_TCP, PROTO_UDP,
    },
    table::{build_bucket_table, TableTarget, BUCKET_TABLE_SIZE},
    FlowEvent, ForwardEvent, DECAP_PROGRAM_NAME, PROGRAM_NAME,
};
use splitter_tests::{
    ebpf_object,
    frames::{self, flow_key, ipv4_word, Ipv4Packet, ETH_LEN, TCP_ACK, TCP_RST, TCP_SYN},
    privileged, run_xdp, Netns, Veth,
};

const XDP_ABORTED: u32 = 0;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
const SNAT: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 1);
const TARGETS: [(Ipv4Addr, u16); 2] = [(Ipv4Addr::new(10, 10, 2, 11), 8080), (Ipv4Addr::new(10, 10, 2, 21), 8080)];
const NEIGH_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01];

struct Bench {
    ns: Netns,
    _peer: Netns,
    ebpf: Ebpf,
}

impl Bench {
    fn new() -> Self {
        let ns = Netns::new("testrun").unwrap();
        let peer = Netns::new("testrun-peer").unwrap();
        Veth::create(&ns, "tr0", "10.10.2.1/24", &peer, "tr1", "10.10.2.2/24").unwrap();
        ns.ip(&["addr", "add", "10.10.1.1/24", "dev", "tr0"]).unwrap();
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        let mac = NEIGH_MAC.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        for addr in ["10.10.2.11", "10.10.2.21", "10.10.1.2"] {
            ns.ip(&["neigh", "replace", addr, "lladdr", &mac, "dev", "tr0", "nud", "permanent"]).unwrap();
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("GATEWAYS", 4)
            .map_max_entries("GATEWAY_COUNTERS", 4)
            .map_max_entries("BUCKET_TABLES", 8)
            .map_max_entries("TARGETS", 8 * MAX_TARGETS_PER_GATEWAY)
            .map_max_entries("CONNTRACK", 4096)
            .load_file(ebpf_object())
            .unwrap();
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
        prog.load().expect("the verifier accepts the datapath");
        let decap: &mut Xdp = ebpf.program_mut(DECAP_PROGRAM_NAME).unwrap().try_into().unwrap();
        decap.load().expect("the verifier accepts the decapsulation program");
        Self { ns, _peer: peer, ebpf }
    }

    /// Installs gateway `id` on VIP:port/proto with `weights` (ppm) over `TARGETS`, in
    /// table buffer `table_index`.
    fn gateway(&mut self, id: u32, port: u16, proto: u8, flags: u32, table_index: u32, weights: [u32; 2]) {
        let mut targets: Array<&mut MapData, TargetEntry> = Array::try_from(self.ebpf.map_mut("TARGETS").unwrap()).unwrap();
        for (i, (addr, tport)) in TARGETS.iter().enumerate() {
            let entry =
                TargetEntry { addr: ipv4_word(*addr), snat_addr: ipv4_word(SNAT), port: tport.to_be(), _pad: 0, counter_index: i as u32 };
            targets.set(table_index * MAX_TARGETS_PER_GATEWAY + i as u32, entry, 0).unwrap();
        }
        let table_targets: Vec<TableTarget> = TARGETS
            .iter()
            .zip(weights)
            .map(|((a, p), w)| TableTarget { key: (u64::from(u32::from(*a)) << 16) | u64::from(*p), weight: w })
            .collect();
        let slots = build_bucket_table(&table_targets);
        let mut table = BucketTable { slots: [0; BUCKET_TABLE_SIZE], _pad: 0 };
        table.slots.copy_from_slice(&slots);
        let mut tables: Array<&mut MapData, BucketTable> = Array::try_from(self.ebpf.map_mut("BUCKET_TABLES").unwrap()).unwrap();
        tables.set(table_index, table, 0).unwrap();
        let mut gateways: HashMap<&mut MapData, GatewayKey, GatewayState> =
            HashMap::try_from(self.ebpf.map_mut("GATEWAYS").unwrap()).unwrap();
        let key = GatewayKey { vip: ipv4_word(VIP), port: port.to_be(), proto, _pad: 0 };
        let state = GatewayState { gateway_id: id, table_index, target_count: 2, flags, generation: table_index, connect_timeout_ms: 0 };
        gateways.insert(key, state, 0).unwrap();
    }

    /// Writes the address filter: every bucket foreign but those of `kept`.
    fn address_filter(&mut self, kept: &[Ipv4Addr]) {
        let mut filter = AddressFilter::ALL_FOREIGN;
        for addr in kept {
            filter.keep(ipv4_word(*addr));
        }
        let mut map: Array<&mut MapData, AddressFilter> = Array::try_from(self.ebpf.map_mut("ADDRESS_FILTER").unwrap()).unwrap();
        map.set(0, filter, 0).unwrap();
    }

    fn table_slots(&self, table_index: u32) -> Vec<u16> {
        let tables: Array<&MapData, BucketTable> = Array::try_from(self.ebpf.map("BUCKET_TABLES").unwrap()).unwrap();
        tables.get(&table_index, 0).unwrap().slots.to_vec()
    }

    fn conntrack_insert(&mut self, key: FlowKey, entry: FlowEntry) {
        let mut ct: HashMap<&mut MapData, FlowKey, FlowEntry> = HashMap::try_from(self.ebpf.map_mut("CONNTRACK").unwrap()).unwrap();
        ct.insert(key, entry, 0).unwrap();
    }

    fn conntrack_remove(&mut self, key: &FlowKey) {
        let mut ct: HashMap<&mut MapData, FlowKey, FlowEntry> = HashMap::try_from(self.ebpf.map_mut("CONNTRACK").unwrap()).unwrap();
        ct.remove(key).unwrap();
    }

    fn conntrack_has(&self, key: &FlowKey) -> bool {
        let ct: HashMap<&MapData, FlowKey, FlowEntry> = HashMap::try_from(self.ebpf.map("CONNTRACK").unwrap()).unwrap();
        ct.get(key, 0).is_ok()
    }

    /// A full-NAT flow from `client` to TARGETS[0] on source port `port`, closed both ways
    /// `closed_ago_ns` before `now` (the clock of `bpf_ktime_get_ns`).
    fn closed_flow(&mut self, client: FlowKey, port: u16, now: u64, closed_ago_ns: u64) -> (FlowKey, FlowKey) {
        let (taddr, tport) = TARGETS[0];
        let reply_key = flow_key(taddr, tport, SNAT, port, PROTO_TCP);
        let closed = |rewritten, flags| FlowEntry {
            rewritten,
            counter_index: 0,
            flags: flags | FLOW_FIN_SEEN | FLOW_ESTABLISHED,
            last_seen_ns: now - closed_ago_ns,
            created_ns: now - closed_ago_ns - 1_000_000_000,
        };
        self.conntrack_insert(reply_key, closed(client.reversed(), FLOW_FROM_TARGET));
        self.conntrack_insert(client, closed(reply_key.reversed(), FLOW_TO_TARGET));
        (reply_key, client)
    }

    /// The candidate index `PORT_CHOICES` records for a full-NAT flow from `client`.
    fn port_choice(&self, client: &FlowKey) -> Option<u32> {
        let m: HashMap<&MapData, FlowKey, u32> = HashMap::try_from(self.ebpf.map("PORT_CHOICES").unwrap()).unwrap();
        m.get(client, 0).ok()
    }

    fn conntrack_len(&self) -> usize {
        self.len_of("CONNTRACK")
    }

    fn half_open_len(&self) -> usize {
        self.len_of("HALF_OPEN")
    }

    fn len_of(&self, map: &str) -> usize {
        let m: HashMap<&MapData, FlowKey, FlowEntry> = HashMap::try_from(self.ebpf.map(map).unwrap()).unwrap();
        m.keys().count()
    }

    fn half_open_has(&self, key: &FlowKey) -> bool {
        let m: HashMap<&MapData, FlowKey, FlowEntry> = HashMap::try_from(self.ebpf.map("HALF_OPEN").unwrap()).unwrap();
        m.get(key, 0).is_ok()
    }

    fn half_open_insert(&mut self, key: FlowKey, entry: FlowEntry) {
        let mut m: HashMap<&mut MapData, FlowKey, FlowEntry> = HashMap::try_from(self.ebpf.map_mut("HALF_OPEN").unwrap()).unwrap();
        m.insert(key, entry, 0).unwrap();
    }

    /// The failed connects and HTTP classes of counter slot `slot` (summed over CPUs).
    fn outcomes(&self, slot: u32) -> TargetOutcomes {
        let m: PerCpuArray<&MapData, TargetOutcomes> = PerCpuArray::try_from(self.ebpf.map("TARGET_OUTCOMES").unwrap()).unwrap();
        let mut sum = TargetOutcomes::default();
        for o in m.get(&slot, 0).unwrap().iter() {
            sum.failed_connects += o.failed_connects;
            for (total, n) in sum.http.iter_mut().zip(o.http) {
                *total += n;
            }
        }
        sum
    }

    /// A flow-state event's count (summed over CPUs).
    fn flow_event(&self, event: FlowEvent) -> u64 {
        let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.ebpf.map("FLOW_EVENTS").unwrap()).unwrap();
        m.get(&event.0, 0).unwrap().iter().sum()
    }

    /// A forwarding event's count (summed over CPUs).
    fn forward_event(&self, event: ForwardEvent) -> u64 {
        let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.ebpf.map("FORWARD_EVENTS").unwrap()).unwrap();
        m.get(&event.0, 0).unwrap().iter().sum()
    }

    fn dsr_source(&mut self, gateway_id: u32, source: DsrSource) {
        let mut m: Array<&mut MapData, DsrSource> = Array::try_from(self.ebpf.map_mut("DSR_SOURCES").unwrap()).unwrap();
        m.set(gateway_id, source, 0).unwrap();
    }

    /// Makes TARGETS[i] answer for gateway `id` (VIP:port/proto) without flow state, as
    /// the agent writes it for a DNAT gateway.
    fn dnat_replies(&mut self, id: u32, port: u16, proto: u8) {
        let mut m: HashMap<&mut MapData, GatewayKey, DnatReply> = HashMap::try_from(self.ebpf.map_mut("DNAT_REPLIES").unwrap()).unwrap();
        for (i, (addr, tport)) in TARGETS.iter().enumerate() {
            let key = GatewayKey { vip: ipv4_word(*addr), port: tport.to_be(), proto, _pad: 0 };
            let reply = DnatReply { vip: ipv4_word(VIP), counter_index: i as u32, gateway_id: id, port: port.to_be(), flow_flags: 0 };
            m.insert(key, reply, 0).unwrap();
        }
    }

    /// Runs the program on `frame` inside the namespace.
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_program(PROGRAM_NAME, frame)
    }

    fn run_program(&self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &Xdp = self.ebpf.program(name).unwrap().try_into().unwrap();
        self.ns.enter(|| run_xdp(prog, frame).expect("BPF_PROG_TEST_RUN")).unwrap()
    }
}

fn ip_src(f: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(f[ETH_LEN + 12], f[ETH_LEN + 13], f[ETH_LEN + 14], f[ETH_LEN + 15])
}
fn ip_dst(f: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(f[ETH_LEN + 16], f[ETH_LEN + 17], f[ETH_LEN + 18], f[ETH_LEN + 19])
}
fn sport(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[ETH_LEN + 20], f[ETH_LEN + 21]])
}
fn dport(f: &[u8]) -> u16 {
    u16::from_be_bytes([f[ETH_LEN + 22], f[ETH_LEN + 23]])
}

fn tcp_frame(src: Ipv4Addr, sp: u16, dst: Ipv4Addr, dp: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    Ipv4Packet::new(src, dst, PROTO_TCP, frames::tcp(sp, dp, flags, payload)).build()
}

/// The target the kernel must pick for a flow of `hash`, from the table.
fn expected_target(slots: &[u16], hash: u32) -> (Ipv4Addr, u16) {
    TARGETS[slots[reference_hash_slot(hash)] as usize]
}

/// The flow hash as docs/ARCHITECTURE.md ("Flow hash") defines it, written out here from
/// the frame's bytes instead of taken from `splitter_common::flow`: a change to the shared
/// hash (which would send a flow to another target on nodes of another version) fails
/// these tests.
fn reference_flow_hash(frame: &[u8]) -> u32 {
    let ip = ETH_LEN;
    let le32 = |at: usize| u64::from(u32::from_le_bytes(frame[at..at + 4].try_into().unwrap()));
    let le16 = |at: usize| u64::from(u16::from_le_bytes(frame[at..at + 2].try_into().unwrap()));
    let l4 = ip + usize::from(frame[ip] & 0x0f) * 4;
    let addresses = (le32(ip + 12) << 32) | le32(ip + 16);
    let ports_and_protocol = (le16(l4) << 32) | (le16(l4 + 2) << 16) | u64::from(frame[ip + 9]);
    reference_fold(reference_finalizer(addresses ^ reference_finalizer(ports_and_protocol ^ 0x9e37_79b9_7f4a_7c15)))
}

/// The client hash of a `sticky: client` gateway, as documented, from the client address.
fn reference_client_hash(client: Ipv4Addr) -> u32 {
    reference_fold(reference_finalizer(u64::from(u32::from_le_bytes(client.octets())) ^ 0x5851_f42d_4c95_7f2d))
}

/// MurmurHash3's 64-bit finalizer.
fn reference_finalizer(mut x: u64) -> u64 {
    for multiplier in [0xff51_afd7_ed55_8ccd_u64, 0xc4ce_b9fe_1a85_ec53] {
        x ^= x >> 33;
        x = x.wrapping_mul(multiplier);
    }
    x ^ (x >> 33)
}

fn reference_fold(h: u64) -> u32 {
    ((h >> 32) ^ (h & 0xffff_ffff)) as u32
}

fn reference_hash_slot(hash: u32) -> usize {
    hash as usize % BUCKET_TABLE_SIZE
}

/// The reference agrees with the shared hash the kernel runs, on frames of every shape the
/// tests send (a host check; the kernel's choice is checked against the reference below).
#[test]
fn the_reference_hash_matches_the_shared_one() {
    for (i, (src, sp, dst, dp, proto)) in [
        (CLIENT, 40000, VIP, 9050, PROTO_TCP),
        (Ipv4Addr::new(198, 51, 100, 7), 1, VIP, 65535, PROTO_UDP),
        (Ipv4Addr::new(255, 0, 1, 2), 65535, Ipv4Addr::new(1, 2, 3, 4), 80, PROTO_TCP),
    ]
    .into_iter()
    .enumerate()
    {
        let frame = if proto == PROTO_TCP {
            tcp_frame(src, sp, dst, dp, TCP_SYN, b"")
        } else {
            Ipv4Packet::new(src, dst, PROTO_UDP, frames::udp(sp, dp, b"q")).build()
        };
        let key = flow_key(src, sp, dst, dp, proto);
        assert_eq!(reference_flow_hash(&frame), flow_hash(&key), "case {i}");
        assert_eq!(reference_hash_slot(flow_hash(&key)), bucket_slot(flow_hash(&key)) as usize, "case {i}");
        assert_eq!(reference_client_hash(src), client_hash(ipv4_word(src)), "case {i}");
    }
}

#[test]
fn full_nat_translates_both_ways_with_valid_checksums() {
    if !privileged("full_nat_translates_both_ways_with_valid_checksums") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, 0, 0, [500_000, 500_000]);
    let slots = bench.table_slots(0);

    let syn = tcp_frame(CLIENT, 40000, VIP, 9050, TCP_SYN, b"");
    let (action, out) = bench.run(&syn);
    assert_eq!(action, XDP_REDIRECT, "SYN to the VIP is forwarded");
    let want = expected_target(&slots, reference_flow_hash(&syn));
    assert_eq!((ip_dst(&out), dport(&out)), want, "addressed to the table's target");
    assert_eq!(ip_src(&out), SNAT, "source is the splitter's own address");
    let snat_port = sport(&out);
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat_port));
    assert!(frames::checksums_valid(&out), "IP and TCP checksums recomputed from scratch match");
    assert_eq!(out[0..6], NEIGH_MAC, "next-hop MAC from the FIB");
    assert_eq!((bench.half_open_len(), bench.conntrack_len()), (2, 0), "half-open, one entry per direction, until the client's ACK");

    let syn_ack = tcp_frame(want.0, want.1, SNAT, snat_port, TCP_SYN | TCP_ACK, b"");
    let (action, back) = bench.run(&syn_ack);
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!((ip_src(&back), sport(&back)), (VIP, 9050), "the client sees VIP:port");
    assert_eq!((ip_dst(&back), dport(&back)), (CLIENT, 40000));
    assert!(frames::checksums_valid(&back));

    assert_eq!(bench.half_open_len(), 2, "the target's SYN-ACK does not complete the handshake");

    // Data with a payload of odd length, both ways: the client's ACK promotes the flow.
    let data = tcp_frame(CLIENT, 40000, VIP, 9050, TCP_ACK, b"GET / HTTP/1.0\r\n\r\n!");
    let (_, out2) = bench.run(&data);
    assert_eq!((bench.half_open_len(), bench.conntrack_len()), (0, 2), "established: both entries moved to conntrack");
    assert_eq!((bench.flow_event(FlowEvent::HALF_OPEN_STARTED), bench.flow_event(FlowEvent::HALF_OPEN_PROMOTED)), (1, 1));
    assert_eq!((ip_src(&out2), sport(&out2), ip_dst(&out2), dport(&out2)), (SNAT, snat_port, want.0, want.1));
    assert!(frames::checksums_valid(&out2));

    // A reset from the target ends the flow.
    let rst = tcp_frame(want.0, want.1, SNAT, snat_port, TCP_RST | TCP_ACK, b"");
    let (_, out3) = bench.run(&rst);
    assert_eq!((ip_dst(&out3), dport(&out3)), (CLIENT, 40000));
    assert_eq!(bench.conntrack_len(), 0, "RST removes both entries");
}

#[test]
fn udp_translates_and_keeps_a_zero_checksum_zero() {
    if !privileged("udp_translates_and_keeps_a_zero_checksum_zero") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 5353, PROTO_UDP, 0, 0, [500_000, 500_000]);
    let request = Ipv4Packet::new(CLIENT, VIP, PROTO_UDP, frames::udp(40001, 5353, b"query")).build();
    let (action, out) = bench.run(&request);
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(ip_src(&out), SNAT);
    assert!(frames::checksums_valid(&out));
    let target = (ip_dst(&out), dport(&out));
    assert_eq!(target, expected_target(&bench.table_slots(0), reference_flow_hash(&request)), "the table's target");
    let reply = Ipv4Packet::new(target.0, SNAT, PROTO_UDP, frames::udp(target.1, sport(&out), b"answer")).build();
    let (_, back) = bench.run(&reply);
    assert_eq!((ip_src(&back), sport(&back), ip_dst(&back), dport(&back)), (VIP, 5353, CLIENT, 40001));
    assert!(frames::checksums_valid(&back));

    let mut no_checksum = Ipv4Packet::new(CLIENT, VIP, PROTO_UDP, frames::udp(40002, 5353, b"q")).build();
    let l4 = ETH_LEN + 20;
    no_checksum[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
    let (_, out) = bench.run(&no_checksum);
    assert_eq!(out[l4 + 6..l4 + 8], [0, 0], "UDP without checksum stays without");
    assert!(frames::checksums_valid(&out));
}

#[test]
fn dnat_keeps_the_client_address() {
    if !privileged("dnat_keeps_the_client_address") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, GATEWAY_DNAT, 0, [500_000, 500_000]);
    let (_, out) = bench.run(&tcp_frame(CLIENT, 40000, VIP, 9050, TCP_SYN, b""));
    assert_eq!((ip_src(&out), sport(&out)), (CLIENT, 40000));
    let target = (ip_dst(&out), dport(&out));
    assert!(TARGETS.contains(&target));
    assert!(frames::checksums_valid(&out));
    let (_, back) = bench.run(&tcp_frame(target.0, target.1, CLIENT, 40000, TCP_SYN | TCP_ACK, b""));
    assert_eq!((ip_src(&back), sport(&back), ip_dst(&back), dport(&back)), (VIP, 9050, CLIENT, 40000));
    assert!(frames::checksums_valid(&back));
}

#[test]
fn a_dnat_targets_answer_no_state_knows_is_sent_from_the_vip_and_its_own_traffic_passes() {
    if !privileged("a_dnat_targets_answer_no_state_knows_is_sent_from_the_vip_and_its_own_traffic_passes") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, GATEWAY_DNAT, 0, [500_000, 500_000]);
    let (taddr, tport) = TARGETS[1];
    // Before the agent names the target, its answer is not the splitter's.
    let answer = tcp_frame(taddr, tport, CLIENT, 40100, TCP_ACK, b"HTTP/1.1 200 OK\r\n");
    let (action, out) = bench.run(&answer);
    assert_eq!((action, &out), (XDP_PASS, &answer), "no DNAT_REPLIES entry: passed untouched");

    bench.dnat_replies(0, 9050, PROTO_TCP);
    let missed = bench.flow_event(FlowEvent::ESTABLISHED_MISSED);
    let (action, out) = bench.run(&answer);
    assert_eq!(action, XDP_REDIRECT, "sent towards the client");
    assert_eq!((ip_src(&out), sport(&out), ip_dst(&out), dport(&out)), (VIP, 9050, CLIENT, 40100));
    assert!(frames::checksums_valid(&out));
    assert_eq!(&out[ETH_LEN + 40..], b"HTTP/1.1 200 OK\r\n", "payload untouched");
    assert!(bench.conntrack_has(&flow_key(taddr, tport, CLIENT, 40100, PROTO_TCP)), "the answer's entry is kept");
    assert_eq!(bench.flow_event(FlowEvent::ESTABLISHED_MISSED), missed + 1);
    // The next answer of the flow takes the entry.
    let (_, again) = bench.run(&tcp_frame(taddr, tport, CLIENT, 40100, TCP_ACK | TCP_RST, b""));
    assert_eq!((ip_src(&again), sport(&again)), (VIP, 9050));
    assert!(frames::checksums_valid(&again));

    // The target's own connection (a SYN) and an answer to this host (a health check's)
    // are not the gateway's.
    let own_syn = tcp_frame(taddr, tport, CLIENT, 40101, TCP_SYN, b"");
    let to_host = tcp_frame(taddr, tport, Ipv4Addr::new(10, 10, 2, 1), 40102, TCP_SYN | TCP_ACK, b"");
    let other_port = tcp_frame(taddr, tport + 1, CLIENT, 40103, TCP_ACK, b"");
    for frame in [own_syn, to_host, other_port] {
        let (action, out) = bench.run(&frame);
        assert_eq!((action, &out), (XDP_PASS, &frame), "passed untouched");
    }
    assert!(!bench.conntrack_has(&flow_key(taddr, tport, Ipv4Addr::new(10, 10, 2, 1), 40102, PROTO_TCP)));
}

#[test]
fn a_flow_whose_reply_entry_was_evicted_gets_it_back_from_the_clients_next_packet() {
    if !privileged("a_flow_whose_reply_entry_was_evicted_gets_it_back_from_the_clients_next_packet") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, 0, 0, [500_000, 500_000]);
    let (_, out) = bench.run(&tcp_frame(CLIENT, 40200, VIP, 9050, TCP_SYN, b""));
    let (target, snat_port) = ((ip_dst(&out), dport(&out)), sport(&out));
    bench.run(&tcp_frame(target.0, target.1, SNAT, snat_port, TCP_SYN | TCP_ACK, b""));
    bench.run(&tcp_frame(CLIENT, 40200, VIP, 9050, TCP_ACK, b""));
    let reply_key = flow_key(target.0, target.1, SNAT, snat_port, PROTO_TCP);
    assert!(bench.conntrack_has(&reply_key), "established both ways");
    // The LRU evicted the reply half alone (conntrack at capacity).
    bench.conntrack_remove(&reply_key);
    let (_, out) = bench.run(&tcp_frame(CLIENT, 40200, VIP, 9050, TCP_ACK, b"ping\n"));
    assert_eq!((ip_src(&out), sport(&out), ip_dst(&out), dport(&out)), (SNAT, snat_port, target.0, target.1), "same translation");
    assert!(bench.conntrack_has(&reply_key), "the client's packet put the reply half back");
    let (action, back) = bench.run(&tcp_frame(target.0, target.1, SNAT, snat_port, TCP_ACK, b"pong\n"));
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!((ip_src(&back), sport(&back), ip_dst(&back), dport(&back)), (VIP, 9050, CLIENT, 40200), "the answer reaches the client");
    assert!(frames::checksums_valid(&back));
}

#[test]
fn established_flows_keep_their_target_across_a_table_switch() {
    if !privileged("established_flows_keep_their_target_across_a_table_switch") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, 0, 0, [1_000_000, 0]);
    let mut flows = Vec::new();
    for port in 41000..41020 {
        let (_, out) = bench.run(&tcp_frame(CLIENT, port, VIP, 9050, TCP_SYN, b""));
        assert_eq!((ip_dst(&out), dport(&out)), TARGETS[0], "100% to the first target");
        flows.push((port, sport(&out)));
    }
    // The switch: the other buffer, then the gateway names it.
    bench.gateway(0, 9050, PROTO_TCP, 0, 1, [0, 1_000_000]);
    for &(port, snat_port) in &flows {
        let (_, out) = bench.run(&tcp_frame(CLIENT, port, VIP, 9050, TCP_ACK, b"more"));
        assert_eq!((ip_dst(&out), dport(&out)), TARGETS[0], "established flow stays");
        assert_eq!(sport(&out), snat_port, "and keeps its source port");
    }
    let (_, out) = bench.run(&tcp_frame(CLIENT, 42000, VIP, 9050, TCP_SYN, b""));
    assert_eq!((ip_dst(&out), dport(&out)), TARGETS[1], "new flows follow the new table");
    let mut ports: Vec<u16> = flows.iter().map(|f| f.1).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), flows.len(), "no two flows share a source port");
}

#[test]
fn sticky_client_keeps_one_target_across_connections() {
    if !privileged("sticky_client_keeps_one_target_across_connections") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, GATEWAY_STICKY_CLIENT, 0, [500_000, 500_000]);
    let slots = bench.table_slots(0);
    let mut seen = std::collections::BTreeSet::new();
    for c in 0..20u8 {
        let client = Ipv4Addr::new(10, 10, 1, 100 + c);
        let want = expected_target(&slots, reference_client_hash(client));
        for port in 43000..43010 {
            let (_, out) = bench.run(&tcp_frame(client, port, VIP, 9050, TCP_SYN, b""));
            assert_eq!((ip_dst(&out), dport(&out)), want, "client {client} port {port}");
        }
        seen.insert(want);
    }
    assert_eq!(seen.len(), 2, "20 clients at 50/50 use both targets");
}

#[test]
fn non_matching_packets_pass_byte_identical() {
    if !privileged("non_matching_packets_pass_byte_identical") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, 0, 0, [500_000, 500_000]);
    let other_port = tcp_frame(CLIENT, 40000, VIP, 9051, TCP_SYN, b"");
    let other_vip = tcp_frame(CLIENT, 40000, Ipv4Addr::new(10, 0, 0, 11), 9050, TCP_SYN, b"");
    let udp_same_port = Ipv4Packet::new(CLIENT, VIP, PROTO_UDP, frames::udp(40000, 9050, b"x")).build();
    for frame in [other_port, other_vip, udp_same_port] {
        let (action, out) = bench.run(&frame);
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, frame);
    }
    assert_eq!(bench.conntrack_len(), 0);
}

#[test]
fn malformed_frames_to_the_vip_never_abort() {
    if !privileged("malformed_frames_to_the_vip_never_abort") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, 0, 0, [500_000, 500_000]);
    bench.gateway(1, 9050, PROTO_UDP, 0, 2, [500_000, 500_000]);
    let syn = tcp_frame(CLIENT, 40000, VIP, 9050, TCP_SYN, b"payload");
    let udp = Ipv4Packet::new(CLIENT, VIP, PROTO_UDP, frames::udp(40000, 9050, b"payload")).build();
    for frame in [syn, udp] {
        let state_before = (bench.conntrack_len(), bench.half_open_len());
        // Every prefix lies about its length (or lacks headers): passed untouched, no state.
        for len in ETH_LEN..frame.len() {
            let (action, out) = bench.run(&frame[..len]);
            assert_eq!((action, out.as_slice()), (XDP_PASS, &frame[..len]), "prefix of {len} bytes");
        }
        // An IP length shorter than the headers it carries.
        let mut short = frame.clone();
        short[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&24u16.to_be_bytes());
        assert_eq!(bench.run(&short), (XDP_PASS, short.clone()), "tot_len 24");
        assert_eq!((bench.conntrack_len(), bench.half_open_len()), state_before, "a lying packet left flow state");
        // Ethernet padding after the IP packet is allowed: the frame is still translated.
        let mut padded = frame.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_ne!(bench.run(&padded).1, padded, "a padded frame is still a packet of the flow");
        // Lying IP lengths and IHL values.
        for ihl in [0u8, 4, 6, 15] {
            let mut bad = frame.clone();
            bad[ETH_LEN] = 0x40 | ihl;
            let (action, _) = bench.run(&bad);
            assert_ne!(action, XDP_ABORTED, "ihl {ihl}");
        }
        // Fragments are passed untouched (no L4 header to translate): the first, and one
        // at an offset, whose "ports" are payload bytes.
        let mut fragment = frame.clone();
        fragment[ETH_LEN + 6] = 0x20; // more fragments
        let (action, out) = bench.run(&fragment);
        assert_eq!((action, out), (XDP_PASS, fragment));
        let mut later = frame.clone();
        later[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&0x0010u16.to_be_bytes()); // offset 128 bytes
        assert_eq!(bench.run(&later), (XDP_PASS, later.clone()), "fragment at an offset");
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A new full-NAT flow takes a free source port before one held by a flow closed a
/// couple of seconds ago (its target may still keep that connection in TIME_WAIT and
/// refuse the new one), and takes that closed flow's port over when no candidate is free.
#[test]
fn full_nat_prefers_a_free_port_to_a_recently_closed_flows() {
    if !privileged("full_nat_prefers_a_free_port_to_a_recently_closed_flows") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, 0, 0, [1_000_000, 0]);
    let now = monotonic_ns();
    let (taddr, tport) = TARGETS[0];

    // The first candidate port of the new flow is held by a flow closed 2 s ago.
    let first = flow_key(CLIENT, 40100, VIP, 9050, PROTO_TCP);
    let hash = flow_hash(&first);
    let (held, holder) = bench.closed_flow(flow_key(CLIENT, 50000, VIP, 9050, PROTO_TCP), snat_port(hash, 0), now, 2_000_000_000);
    let (action, out) = bench.run(&tcp_frame(CLIENT, 40100, VIP, 9050, TCP_SYN, b""));
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!((ip_dst(&out), dport(&out)), (taddr, tport));
    assert_eq!(sport(&out), snat_port(hash, 1), "the next candidate, free");
    assert!(bench.conntrack_has(&held) && bench.conntrack_has(&holder), "the closed flow keeps its port");
    assert!(bench.half_open_has(&first), "the new flow is half-open");

    // Every candidate of another flow is held: its first by a flow closed 2 s ago, the
    // rest by live flows. The closed flow's port is taken over.
    let second = flow_key(CLIENT, 40200, VIP, 9050, PROTO_TCP);
    let hash = flow_hash(&second);
    let (held, holder) = bench.closed_flow(flow_key(CLIENT, 50001, VIP, 9050, PROTO_TCP), snat_port(hash, 0), now, 2_000_000_000);
    for attempt in 1..SNAT_PORT_TRIES {
        let live_client = flow_key(CLIENT, 51000 + attempt as u16, VIP, 9050, PROTO_TCP);
        let entry = FlowEntry {
            rewritten: live_client.reversed(),
            counter_index: 0,
            flags: FLOW_FROM_TARGET | FLOW_ESTABLISHED,
            last_seen_ns: now,
            created_ns: now,
        };
        bench.conntrack_insert(flow_key(taddr, tport, SNAT, snat_port(hash, attempt), PROTO_TCP), entry);
    }
    let (action, out) = bench.run(&tcp_frame(CLIENT, 40200, VIP, 9050, TCP_SYN, b""));
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(sport(&out), snat_port(hash, 0), "no candidate free: the closed flow's port");
    assert!(!bench.conntrack_has(&holder), "the closed flow's forward entry is gone");
    assert!(!bench.conntrack_has(&held) && bench.half_open_has(&held), "its reply key now belongs to the new (half-open) flow");
    assert!(bench.half_open_has(&second));
}

/// A full-NAT flow that got its second candidate source (another flow held the first) and
/// then lost both conntrack entries, as did the first candidate's holder, is re-created on
/// the second: the source its target knows the connection on, not the first one free by
/// then. A new connection on the same client tuple that gets its first candidate forgets
/// the record.
#[test]
fn an_evicted_full_nat_flow_is_re_created_on_the_source_its_target_knows() {
    if !privileged("an_evicted_full_nat_flow_is_re_created_on_the_source_its_target_knows") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, 0, 0, [1_000_000, 0]);
    let (taddr, tport) = TARGETS[0];
    let client = flow_key(CLIENT, 40300, VIP, 9050, PROTO_TCP);
    let hash = flow_hash(&client);
    let now = monotonic_ns();
    let first = flow_key(taddr, tport, SNAT, snat_port(hash, 0), PROTO_TCP);
    let holder = FlowEntry {
        rewritten: flow_key(CLIENT, 51000, VIP, 9050, PROTO_TCP).reversed(),
        counter_index: 0,
        flags: FLOW_FROM_TARGET | FLOW_ESTABLISHED,
        last_seen_ns: now,
        created_ns: now,
    };
    bench.conntrack_insert(first, holder);
    let (action, out) = bench.run(&tcp_frame(CLIENT, 40300, VIP, 9050, TCP_SYN, b""));
    let second = snat_port(hash, 1);
    assert_eq!((action, sport(&out)), (XDP_REDIRECT, second), "the first candidate is held: the second");
    let reply = flow_key(taddr, tport, SNAT, second, PROTO_TCP);
    bench.run(&tcp_frame(taddr, tport, SNAT, second, TCP_SYN | TCP_ACK, b""));
    bench.run(&tcp_frame(CLIENT, 40300, VIP, 9050, TCP_ACK, b""));
    assert!(bench.conntrack_has(&client) && bench.conntrack_has(&reply), "established");
    assert_eq!(bench.port_choice(&client), Some(1), "the second candidate is recorded");

    // The LRU evicts both of the flow's entries and the first candidate's holder.
    for key in [client, reply, first] {
        bench.conntrack_remove(&key);
    }
    let missed = bench.flow_event(FlowEvent::ESTABLISHED_MISSED);
    let (action, out) = bench.run(&tcp_frame(CLIENT, 40300, VIP, 9050, TCP_ACK, b"data"));
    assert_eq!((action, ip_dst(&out), dport(&out)), (XDP_REDIRECT, taddr, tport));
    assert_eq!(sport(&out), second, "re-created on the source the target knows, though the first is free");
    assert_eq!(bench.flow_event(FlowEvent::ESTABLISHED_MISSED), missed + 1);
    let (action, out) = bench.run(&tcp_frame(taddr, tport, SNAT, second, TCP_ACK, b"answer"));
    assert_eq!((action, ip_dst(&out), dport(&out)), (XDP_REDIRECT, CLIENT, 40300), "the target's answer finds the flow");

    // The connection ends; a new one on the same client tuple gets the first candidate,
    // and once evicted in turn is re-created there.
    bench.run(&tcp_frame(CLIENT, 40300, VIP, 9050, TCP_RST, b""));
    assert!(!bench.conntrack_has(&client), "reset: forgotten");
    let (_, out) = bench.run(&tcp_frame(CLIENT, 40300, VIP, 9050, TCP_SYN, b""));
    assert_eq!(sport(&out), snat_port(hash, 0));
    assert_eq!(bench.port_choice(&client), None, "the first candidate needs no record; the old one is gone");
    bench.run(&tcp_frame(taddr, tport, SNAT, snat_port(hash, 0), TCP_SYN | TCP_ACK, b""));
    bench.run(&tcp_frame(CLIENT, 40300, VIP, 9050, TCP_ACK, b""));
    bench.conntrack_insert(reply, holder);
    for key in [client, first] {
        bench.conntrack_remove(&key);
    }
    let (_, out) = bench.run(&tcp_frame(CLIENT, 40300, VIP, 9050, TCP_ACK, b"data"));
    assert_eq!(sport(&out), snat_port(hash, 0), "no record: the first free candidate, where it was");
}

/// A SYN flood's spoofed flows never complete their handshake: they live in the half-open
/// table only (an established flow's entries are never touched), give their port back after
/// the half-open timeout, and under pressure lose it to a new flow once old enough.
#[test]
fn half_open_flows_never_touch_established_ones_and_give_their_ports_back() {
    if !privileged("half_open_flows_never_touch_established_ones_and_give_their_ports_back") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, 0, 0, [1_000_000, 0]);
    let (taddr, tport) = TARGETS[0];
    // An established flow: handshake completed.
    let (_, out) = bench.run(&tcp_frame(CLIENT, 41000, VIP, 9050, TCP_SYN, b""));
    let established_port = sport(&out);
    bench.run(&tcp_frame(taddr, tport, SNAT, established_port, TCP_SYN | TCP_ACK, b""));
    bench.run(&tcp_frame(CLIENT, 41000, VIP, 9050, TCP_ACK, b""));
    assert_eq!(bench.conntrack_len(), 2);

    // 2000 spoofed SYNs from other clients: half-open only.
    for i in 0..2000u32 {
        let spoofed = Ipv4Addr::new(10, 92, (i >> 8) as u8, i as u8);
        let (action, _) = bench.run(&tcp_frame(spoofed, 1024 + (i % 60000) as u16, VIP, 9050, TCP_SYN, b""));
        assert_eq!(action, XDP_REDIRECT, "SYN {i} forwarded");
    }
    assert_eq!(bench.conntrack_len(), 2, "the flood never entered conntrack");
    assert_eq!(bench.half_open_len(), 4000);
    // The established flow still translates its data.
    let (action, out) = bench.run(&tcp_frame(CLIENT, 41000, VIP, 9050, TCP_ACK, b"data"));
    assert_eq!((action, sport(&out)), (XDP_REDIRECT, established_port));

    // A half-open holder past its timeout (3 s) gives its port up to a new flow at once.
    let now = monotonic_ns();
    let newcomer = flow_key(CLIENT, 42000, VIP, 9050, PROTO_TCP);
    let hash = flow_hash(&newcomer);
    let expired_client = flow_key(Ipv4Addr::new(10, 93, 0, 1), 999, VIP, 9050, PROTO_TCP);
    let port0 = flow_key(taddr, tport, SNAT, snat_port(hash, 0), PROTO_TCP);
    let stale =
        |rewritten, flags, age: u64| FlowEntry { rewritten, counter_index: 0, flags, last_seen_ns: now - age, created_ns: now - age };
    bench.half_open_insert(port0, stale(expired_client.reversed(), FLOW_FROM_TARGET, 4_000_000_000));
    bench.half_open_insert(expired_client, stale(port0.reversed(), FLOW_TO_TARGET, 4_000_000_000));
    let expired_before = bench.flow_event(FlowEvent::HALF_OPEN_EXPIRED);
    let (_, out) = bench.run(&tcp_frame(CLIENT, 42000, VIP, 9050, TCP_SYN, b""));
    assert_eq!(sport(&out), snat_port(hash, 0), "the expired flow's port, the first candidate");
    assert!(!bench.half_open_has(&expired_client), "the expired flow is forgotten");
    assert_eq!(bench.flow_event(FlowEvent::HALF_OPEN_EXPIRED), expired_before + 1);

    // Under pressure: every candidate of a new flow held by live half-open flows, one of
    // them 600 ms old (the rest fresh): that one loses its port.
    let pressed = flow_key(CLIENT, 43000, VIP, 9050, PROTO_TCP);
    let hash = flow_hash(&pressed);
    for attempt in 0..SNAT_PORT_TRIES {
        let holder = flow_key(Ipv4Addr::new(10, 94, 0, attempt as u8), 1000, VIP, 9050, PROTO_TCP);
        let reply = flow_key(taddr, tport, SNAT, snat_port(hash, attempt), PROTO_TCP);
        let age = if attempt == 7 { 600_000_000 } else { 0 };
        bench.half_open_insert(reply, stale(holder.reversed(), FLOW_FROM_TARGET, age));
        bench.half_open_insert(holder, stale(reply.reversed(), FLOW_TO_TARGET, age));
    }
    let (action, out) = bench.run(&tcp_frame(CLIENT, 43000, VIP, 9050, TCP_SYN, b""));
    assert_eq!((action, sport(&out)), (XDP_REDIRECT, snat_port(hash, 7)), "the oldest half-open holder's port");
    assert_eq!(bench.flow_event(FlowEvent::HALF_OPEN_TAKEN_OVER), 1);
    assert!(!bench.half_open_has(&flow_key(Ipv4Addr::new(10, 94, 0, 7), 1000, VIP, 9050, PROTO_TCP)));
    assert_eq!(bench.conntrack_len(), 2, "still only the established flow in conntrack");
}

/// On an HTTP gateway the datapath reads the status line at the start of a target's
/// response and counts it by class; a SYN the target answers with a RST is a failed connect.
#[test]
fn http_status_classes_and_failed_connects_are_counted_per_target() {
    if !privileged("http_status_classes_and_failed_connects_are_counted_per_target") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, GATEWAY_HTTP, 0, [1_000_000, 0]);
    let (taddr, tport) = TARGETS[0];
    let (_, out) = bench.run(&tcp_frame(CLIENT, 44000, VIP, 9050, TCP_SYN, b""));
    let port = sport(&out);
    bench.run(&tcp_frame(taddr, tport, SNAT, port, TCP_SYN | TCP_ACK, b""));
    bench.run(&tcp_frame(CLIENT, 44000, VIP, 9050, TCP_ACK, b"GET / HTTP/1.1\r\n\r\n"));
    for response in
        [&b"HTTP/1.1 500 Internal Server Error\r\n\r\n"[..], b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.0 503 x\r\n\r\n", b"body, not a status"]
    {
        let (action, back) = bench.run(&tcp_frame(taddr, tport, SNAT, port, TCP_ACK, response));
        assert_eq!((action, dport(&back)), (XDP_REDIRECT, 44000));
    }
    let outcomes = bench.outcomes(0);
    assert_eq!(outcomes.http, [0, 1, 0, 0, 2], "one 2xx, two 5xx, the body segment not counted");
    // A SYN the target refuses.
    let (_, out) = bench.run(&tcp_frame(CLIENT, 44001, VIP, 9050, TCP_SYN, b""));
    bench.run(&tcp_frame(taddr, tport, SNAT, sport(&out), TCP_RST | TCP_ACK, b""));
    assert_eq!(bench.outcomes(0).failed_connects, 1);
}

#[test]
fn the_address_filter_passes_foreign_packets_and_keeps_the_gateways() {
    if !privileged("the_address_filter_passes_foreign_packets_and_keeps_the_gateways") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, 0, 0, [500_000, 500_000]);
    bench.address_filter(&[VIP, TARGETS[0].0, TARGETS[1].0]);

    // A packet of no gateway, between two foreign addresses: passed as it came, no state.
    let elsewhere = Ipv4Addr::new(192, 0, 2, 77);
    assert!(![VIP, TARGETS[0].0, TARGETS[1].0].iter().any(|a| address_bucket(ipv4_word(*a)) == address_bucket(ipv4_word(elsewhere))));
    let foreign = tcp_frame(CLIENT, 40500, elsewhere, 9050, TCP_SYN, b"");
    let (action, out) = bench.run(&foreign);
    assert_eq!((action, &out), (XDP_PASS, &foreign));
    assert_eq!(bench.conntrack_len() + bench.half_open_len(), 0);

    // The gateway's flows go on both ways through the filter.
    let syn = tcp_frame(CLIENT, 40501, VIP, 9050, TCP_SYN, b"");
    let (action, out) = bench.run(&syn);
    assert_eq!(action, XDP_REDIRECT, "a SYN to the VIP passes the filter");
    let target = (ip_dst(&out), dport(&out));
    let syn_ack = tcp_frame(target.0, target.1, SNAT, sport(&out), TCP_SYN | TCP_ACK, b"");
    let (action, back) = bench.run(&syn_ack);
    assert_eq!(action, XDP_REDIRECT, "the target's answer passes the filter");
    assert_eq!((ip_src(&back), sport(&back), ip_dst(&back), dport(&back)), (VIP, 9050, CLIENT, 40501));

    // The filter is what decides: with the VIP's bucket foreign, the same SYN is passed.
    bench.address_filter(&[TARGETS[0].0, TARGETS[1].0]);
    let (action, out) = bench.run(&tcp_frame(CLIENT, 40502, VIP, 9050, TCP_SYN, b""));
    assert_eq!((action, out), (XDP_PASS, tcp_frame(CLIENT, 40502, VIP, 9050, TCP_SYN, b"")));
}

/// An IP-in-IP frame's outer header, checked field by field; returns (source, destination).
fn outer_header(out: &[u8], inner_len: usize) -> (Ipv4Addr, Ipv4Addr) {
    assert_eq!(out[12..14], [0x08, 0x00], "IPv4 frame");
    let outer = &out[ETH_LEN..ETH_LEN + 20];
    assert_eq!(outer[0], 0x45, "outer header: version 4, no options");
    assert_eq!(usize::from(u16::from_be_bytes([outer[2], outer[3]])), inner_len + 20, "outer total length");
    assert_eq!(outer[6] & 0x40, 0x40, "don't fragment");
    assert_eq!(outer[6] & 0x1f, 0, "not a fragment");
    assert!(outer[8] > 1, "TTL");
    assert_eq!(outer[9], 4, "protocol: IP in IP");
    assert_eq!(frames::ones_complement_sum(outer, 0), 0xffff, "outer header checksum");
    (Ipv4Addr::new(outer[12], outer[13], outer[14], outer[15]), Ipv4Addr::new(outer[16], outer[17], outer[18], outer[19]))
}

#[test]
fn dsr_encapsulates_to_the_tables_target_and_keeps_each_flow_there() {
    if !privileged("dsr_encapsulates_to_the_tables_target_and_keeps_each_flow_there") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, GATEWAY_DSR, 0, [500_000, 500_000]);
    let slots = bench.table_slots(0);
    let mut targets_seen = std::collections::BTreeSet::new();
    for port in 41000..41016u16 {
        let syn = tcp_frame(CLIENT, port, VIP, 9050, TCP_SYN, b"");
        let (action, out) = bench.run(&syn);
        assert_eq!(action, XDP_REDIRECT, "the SYN leaves encapsulated");
        let want = expected_target(&slots, reference_flow_hash(&syn));
        let (outer_src, outer_dst) = outer_header(&out, syn.len() - ETH_LEN);
        assert_eq!((outer_src, outer_dst), (SNAT, want.0), "from the node's address to the table's target");
        assert_eq!(out[ETH_LEN + 20..], syn[ETH_LEN..], "the client's packet rides inside unchanged");
        assert_eq!(out[0..6], NEIGH_MAC, "next-hop MAC of the target");
        targets_seen.insert(want.0);
    }
    assert_eq!(targets_seen.len(), 2, "flows spread over both targets");
    assert_eq!((bench.half_open_len(), bench.conntrack_len()), (16, 0), "one half-open entry per flow: replies bypass the splitter");

    // The client's ACK completes the handshake (the target's SYN-ACK never comes by).
    let syn = tcp_frame(CLIENT, 41000, VIP, 9050, TCP_SYN, b"");
    let want = expected_target(&slots, reference_flow_hash(&syn));
    let ack = tcp_frame(CLIENT, 41000, VIP, 9050, TCP_ACK, b"GET / HTTP/1.0\r\n\r\n");
    let (action, out) = bench.run(&ack);
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(outer_header(&out, ack.len() - ETH_LEN).1, want.0);
    assert_eq!((bench.half_open_len(), bench.conntrack_len()), (15, 1), "promoted: the client's entry alone");
    let entry = {
        let ct: HashMap<&MapData, FlowKey, FlowEntry> = HashMap::try_from(bench.ebpf.map("CONNTRACK").unwrap()).unwrap();
        ct.get(&flow_key(CLIENT, 41000, VIP, 9050, PROTO_TCP), 0).unwrap()
    };
    assert_eq!(entry.flags & (FLOW_DSR | FLOW_TO_TARGET), FLOW_DSR | FLOW_TO_TARGET);

    // All weight to the other target: the established flow stays, a new one follows.
    let other = if want == TARGETS[0] { [0, 1_000_000] } else { [1_000_000, 0] };
    bench.gateway(0, 9050, PROTO_TCP, GATEWAY_DSR, 2, other);
    let (_, out) = bench.run(&ack);
    assert_eq!(outer_header(&out, ack.len() - ETH_LEN).1, want.0, "an established flow keeps its target");
    let new_syn = tcp_frame(CLIENT, 42000, VIP, 9050, TCP_SYN, b"");
    let (_, out) = bench.run(&new_syn);
    assert_ne!(outer_header(&out, new_syn.len() - ETH_LEN).1, want.0, "a new flow follows the new weights");

    // A reset from the client ends the flow.
    let rst = tcp_frame(CLIENT, 41000, VIP, 9050, TCP_RST | TCP_ACK, b"");
    let (action, _) = bench.run(&rst);
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(bench.conntrack_len(), 0);
}

#[test]
fn dsr_sources_come_from_the_gateways_prefix_per_flow_and_udp_goes_straight_to_conntrack() {
    if !privileged("dsr_sources_come_from_the_gateways_prefix_per_flow_and_udp_goes_straight_to_conntrack") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 5353, PROTO_UDP, GATEWAY_DSR, 0, [500_000, 500_000]);
    let prefix = Ipv4Addr::new(10, 10, 2, 128);
    let source = DsrSource { prefix: ipv4_word(prefix), host_mask: ipv4_word(Ipv4Addr::new(0, 0, 0, 127)) };
    bench.dsr_source(0, source);
    let mut sources = std::collections::BTreeSet::new();
    for port in 30000..30064u16 {
        let request = Ipv4Packet::new(CLIENT, VIP, PROTO_UDP, frames::udp(port, 5353, b"query")).build();
        let (action, out) = bench.run(&request);
        assert_eq!(action, XDP_REDIRECT);
        let (src, _) = outer_header(&out, request.len() - ETH_LEN);
        assert_eq!(u32::from(src) & 0xffff_ff80, u32::from(prefix), "{src} lies in 10.10.2.128/25");
        assert_eq!(ipv4_word(src), source.address(reference_flow_hash(&request), ipv4_word(SNAT)), "the flow's hash picks the host part");
        // The same flow again: the same outer source (from conntrack).
        let (_, again) = bench.run(&request);
        assert_eq!(again, out);
        sources.insert(src);
    }
    assert!(sources.len() > 32, "64 flows spread over the prefix's addresses ({} seen)", sources.len());
    assert_eq!((bench.half_open_len(), bench.conntrack_len()), (0, 64), "UDP: one conntrack entry per flow");
}

#[test]
fn the_decapsulation_program_restores_the_clients_packet_byte_for_byte() {
    if !privileged("the_decapsulation_program_restores_the_clients_packet_byte_for_byte") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, GATEWAY_DSR, 0, [500_000, 500_000]);
    bench.gateway(1, 5353, PROTO_UDP, GATEWAY_DSR, 2, [500_000, 500_000]);
    let frames_in = [
        tcp_frame(CLIENT, 43000, VIP, 9050, TCP_SYN, b""),
        tcp_frame(CLIENT, 43000, VIP, 9050, TCP_ACK, b"a payload of odd length"),
        Ipv4Packet::new(CLIENT, VIP, PROTO_UDP, frames::udp(43001, 5353, b"query")).build(),
    ];
    for frame in &frames_in {
        let (action, encapsulated) = bench.run(frame);
        assert_eq!(action, XDP_REDIRECT);
        let (action, decapsulated) = bench.run_program(DECAP_PROGRAM_NAME, &encapsulated);
        assert_eq!(action, XDP_PASS, "up the target's stack");
        assert_eq!(decapsulated[..12], encapsulated[..12], "the frame's MACs as it arrived at the target");
        assert_eq!(decapsulated[12..], frame[12..], "the client's packet, byte for byte");
        assert!(frames::checksums_valid(&decapsulated));
    }
    // Anything else is passed untouched: a plain packet, ICMP, a truncated IP-in-IP frame,
    // an outer header with options.
    let plain = tcp_frame(CLIENT, 43002, VIP, 9050, TCP_SYN, b"");
    let (encapsulated_syn_action, encapsulated) = bench.run(&plain);
    assert_eq!(encapsulated_syn_action, XDP_REDIRECT);
    let mut with_options = encapsulated.clone();
    with_options[ETH_LEN] = 0x46;
    let others = [
        plain.clone(),
        Ipv4Packet::new(CLIENT, VIP, frames::PROTO_ICMP, vec![8, 0, 0, 0, 0, 0, 0, 0]).build(),
        encapsulated[..ETH_LEN + 30].to_vec(),
        with_options,
    ];
    for (i, frame) in others.iter().enumerate() {
        let (action, out) = bench.run_program(DECAP_PROGRAM_NAME, frame);
        assert_eq!((action, &out), (XDP_PASS, frame), "case {i} passes untouched");
    }
}

#[test]
fn a_dsr_packet_too_big_once_encapsulated_gets_an_icmp_fragmentation_needed() {
    if !privileged("a_dsr_packet_too_big_once_encapsulated_gets_an_icmp_fragmentation_needed") {
        return;
    }
    let mut bench = Bench::new();
    bench.gateway(0, 9050, PROTO_TCP, GATEWAY_DSR, 0, [500_000, 500_000]);
    bench.gateway(1, 5353, PROTO_UDP, GATEWAY_DSR, 2, [500_000, 500_000]);
    // 1480 bytes of IP fit a 1500-byte MTU once encapsulated; 1481 do not.
    let fits = tcp_frame(CLIENT, 44000, VIP, 9050, TCP_ACK, &vec![7u8; 1480 - 40]);
    let (action, out) = bench.run(&fits);
    assert_eq!(action, XDP_REDIRECT);
    outer_header(&out, 1480);
    for (i, big) in [
        tcp_frame(CLIENT, 44000, VIP, 9050, TCP_ACK, &vec![7u8; 1481 - 40]),
        tcp_frame(CLIENT, 44001, VIP, 9050, TCP_SYN, &vec![7u8; 1500 - 40]),
        Ipv4Packet::new(CLIENT, VIP, PROTO_UDP, frames::udp(44002, 5353, &vec![1u8; 1500 - 28])).build(),
    ]
    .iter()
    .enumerate()
    {
        let before = bench.forward_event(ForwardEvent::ICMP_TOO_BIG);
        let (action, icmp) = bench.run(big);
        assert_eq!(action, XDP_TX, "case {i}: answered out of the interface it came in on");
        assert_eq!(icmp.len(), ETH_LEN + 20 + 8 + 28, "case {i}: the IP header and 8 bytes quoted");
        assert_eq!(icmp[0..6], big[6..12], "case {i}: to the sender's MAC");
        assert_eq!(icmp[6..12], big[0..6], "case {i}: from the MAC it was sent to");
        assert_eq!(icmp[12..14], [0x08, 0x00]);
        let ip = &icmp[ETH_LEN..ETH_LEN + 20];
        assert_eq!(frames::ones_complement_sum(ip, 0), 0xffff, "case {i}: IP checksum");
        assert_eq!((ip[0], ip[9]), (0x45, 1), "case {i}: IPv4, ICMP");
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), 20 + 8 + 28);
        assert_eq!((ip_src(&icmp), ip_dst(&icmp)), (VIP, CLIENT), "case {i}: from the VIP back to the client");
        let message = &icmp[ETH_LEN + 20..];
        assert_eq!(frames::ones_complement_sum(message, 0), 0xffff, "case {i}: ICMP checksum");
        assert_eq!((message[0], message[1]), (3, 4), "case {i}: destination unreachable, fragmentation needed");
        assert_eq!(u16::from_be_bytes([message[6], message[7]]), 1480, "case {i}: the MTU left inside the tunnel");
        assert_eq!(message[8..], big[ETH_LEN..ETH_LEN + 28], "case {i}: quotes the packet's header and first 8 bytes");
        assert_eq!(bench.forward_event(ForwardEvent::ICMP_TOO_BIG), before + 1);
    }
}
