//! Full-NAT capacity with a pool of source addresses: 200 000 concurrent TCP flows through
//! a gateway of 4 targets, every handshake completed through the real program under
//! BPF_PROG_TEST_RUN, none refused for want of a source port.

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::Xdp,
    Ebpf, EbpfLoader,
};
use splitter_common::{
    maps::{
        BucketTable, FlowEntry, FlowKey, GatewayCounters, GatewayKey, GatewayState, SourcePool, TargetEntry, MAX_SOURCE_ADDRESSES,
        MAX_TARGETS_PER_GATEWAY, PROTO_TCP,
    },
    table::{build_bucket_table, TableTarget, BUCKET_TABLE_SIZE},
    PROGRAM_NAME,
};
use splitter_tests::{
    ebpf_object,
    frames::{Ipv4Packet, TCP_ACK, TCP_SYN},
    privileged, run_xdp, Netns, Veth,
};

const XDP_REDIRECT: u32 = 4;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const FLOWS: u32 = 200_000;
const POOL: [Ipv4Addr; 3] = [Ipv4Addr::new(10, 10, 2, 100), Ipv4Addr::new(10, 10, 2, 101), Ipv4Addr::new(10, 10, 2, 102)];
const PORTS: (u16, u16) = (10000, 59999);

fn ne(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

fn targets() -> Vec<(Ipv4Addr, u16)> {
    (0..4).map(|i| (Ipv4Addr::new(10, 10, 2, 11 + i), 8080)).collect()
}

fn frame(src: Ipv4Addr, sport: u16, flags: u8) -> Vec<u8> {
    Ipv4Packet::new(src, VIP, PROTO_TCP, splitter_tests::frames::tcp(sport, 9050, flags, b"")).build()
}

#[test]
fn a_pool_of_source_addresses_holds_200k_concurrent_flows_over_4_targets() {
    if !privileged("a_pool_of_source_addresses_holds_200k_concurrent_flows_over_4_targets") {
        return;
    }
    let ns = Netns::new("capacity").unwrap();
    let peer = Netns::new("capacity-peer").unwrap();
    Veth::create(&ns, "cp0", "10.10.2.1/24", &peer, "cp1", "10.10.2.2/24").unwrap();
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    for (addr, _) in targets() {
        ns.ip(&["neigh", "replace", &addr.to_string(), "lladdr", "02:aa:bb:cc:dd:01", "dev", "cp0", "nud", "permanent"]).unwrap();
    }
    let mut ebpf: Ebpf = EbpfLoader::new()
        .map_max_entries("GATEWAYS", 4)
        .map_max_entries("GATEWAY_COUNTERS", 4)
        .map_max_entries("SOURCE_POOLS", 4)
        .map_max_entries("BUCKET_TABLES", 8)
        .map_max_entries("TARGETS", 8 * MAX_TARGETS_PER_GATEWAY)
        .map_max_entries("CONNTRACK", 2 * FLOWS + 65536)
        .map_max_entries("HALF_OPEN", 65536)
        .load_file(ebpf_object())
        .unwrap();
    let prog: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
    prog.load().unwrap();

    // Gateway 0: 4 targets at 25% each, full NAT from a pool of 3 addresses.
    {
        let mut targets_map: Array<&mut MapData, TargetEntry> = Array::try_from(ebpf.map_mut("TARGETS").unwrap()).unwrap();
        for (i, (addr, port)) in targets().iter().enumerate() {
            let entry = TargetEntry {
                addr: ne(*addr),
                snat_addr: ne(Ipv4Addr::new(10, 10, 2, 1)),
                port: port.to_be(),
                _pad: 0,
                counter_index: i as u32,
            };
            targets_map.set(i as u32, entry, 0).unwrap();
        }
    }
    let table: Vec<TableTarget> =
        targets().iter().map(|(a, p)| TableTarget { key: (u64::from(u32::from(*a)) << 16) | u64::from(*p), weight: 250_000 }).collect();
    let mut slots = BucketTable { slots: [0; BUCKET_TABLE_SIZE], _pad: 0 };
    slots.slots.copy_from_slice(&build_bucket_table(&table));
    Array::<&mut MapData, BucketTable>::try_from(ebpf.map_mut("BUCKET_TABLES").unwrap()).unwrap().set(0, slots, 0).unwrap();
    let mut pool =
        SourcePool { addrs: [0; MAX_SOURCE_ADDRESSES], count: POOL.len() as u32, port_min: PORTS.0, port_count: PORTS.1 - PORTS.0 + 1 };
    for (slot, addr) in pool.addrs.iter_mut().zip(POOL) {
        *slot = ne(addr);
    }
    Array::<&mut MapData, SourcePool>::try_from(ebpf.map_mut("SOURCE_POOLS").unwrap()).unwrap().set(0, pool, 0).unwrap();
    let key = GatewayKey { vip: ne(VIP), port: 9050u16.to_be(), proto: PROTO_TCP, _pad: 0 };
    let state = GatewayState { gateway_id: 0, table_index: 0, target_count: 4, flags: 0, generation: 1, connect_timeout_ms: 0 };
    HashMap::<&mut MapData, GatewayKey, GatewayState>::try_from(ebpf.map_mut("GATEWAYS").unwrap()).unwrap().insert(key, state, 0).unwrap();

    // 200 000 clients, each completing its handshake (SYN, then its ACK).
    let prog: &Xdp = ebpf.program(PROGRAM_NAME).unwrap().try_into().unwrap();
    let mut sources: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    ns.enter(|| {
        for i in 0..FLOWS {
            let client = Ipv4Addr::new(10, 20 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
            let sport = 1024 + (i % 50_000) as u16;
            let (action, out) = run_xdp(prog, &frame(client, sport, TCP_SYN)).unwrap();
            assert_eq!(action, XDP_REDIRECT, "flow {i}: SYN forwarded");
            let src = Ipv4Addr::new(out[26], out[27], out[28], out[29]);
            let port = u16::from_be_bytes([out[34], out[35]]);
            assert!(POOL.contains(&src) && (PORTS.0..=PORTS.1).contains(&port), "flow {i}: source {src}:{port} from the pool");
            *sources.entry(src).or_default() += 1;
            let (action, _) = run_xdp(prog, &frame(client, sport, TCP_ACK)).unwrap();
            assert_eq!(action, XDP_REDIRECT, "flow {i}: ACK forwarded");
        }
    })
    .unwrap();
    let counters: PerCpuArray<&MapData, GatewayCounters> = PerCpuArray::try_from(ebpf.map("GATEWAY_COUNTERS").unwrap()).unwrap();
    let sum = |f: fn(&GatewayCounters) -> u64| counters.get(&0, 0).unwrap().iter().map(f).sum::<u64>();
    println!("{} new flows, {} port claims failed; sources {sources:?}", sum(|c| c.new_flows), sum(|c| c.alloc_failed));
    assert_eq!(sum(|c| c.alloc_failed), 0, "no flow went without a source port");
    assert_eq!(sum(|c| c.new_flows), u64::from(FLOWS));
    let conntrack: HashMap<&MapData, FlowKey, FlowEntry> = HashMap::try_from(ebpf.map("CONNTRACK").unwrap()).unwrap();
    let entries = conntrack.keys().filter(Result::is_ok).count();
    assert_eq!(entries, 2 * FLOWS as usize, "every flow holds its two conntrack entries at once");
    let half_open: HashMap<&MapData, FlowKey, FlowEntry> = HashMap::try_from(ebpf.map("HALF_OPEN").unwrap()).unwrap();
    assert_eq!(half_open.keys().count(), 0, "every handshake was promoted");
    for (addr, n) in &sources {
        assert!(*n > FLOWS / 4, "source {addr} carries a fair part of the flows ({n})");
    }
    drop(peer);
}
