//! BPF_PROG_TEST_RUN on the connection benchmark's stateless TCP endpoints
//! (`bench_tcp_server`, `bench_tcp_client`): a whole connection played between them frame
//! by frame, a kernel-made SYN-ACK with options (the frame grows), and frames that are not
//! theirs. The connection-rate figures of docs/BENCHMARKS.md rest on these replies being
//! TCP a kernel accepts: right flags, sequence numbers and checksums.

use std::net::Ipv4Addr;

use aya::{
    maps::{Array, PerCpuArray, PerCpuValues},
    programs::Xdp,
    util::nr_cpus,
    Ebpf,
};
use splitter_common::bench_tcp::{
    generated_tuple, server_isn, ConnectionCounts, GeneratorState, CLIENT_PORT_MIN, REQUEST, RESPONSE, TCP_PSH,
};
use splitter_tests::{
    frames::{self, Ipv4Packet, ETH_LEN, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    pin_to_cpu, privileged, run_xdp,
    testbed::helper_object,
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_DROP: u32 = 1;

fn load() -> Ebpf {
    let mut ebpf = helper_object().expect("loading the eBPF object");
    for name in ["bench_tcp_server", "bench_tcp_client", "bench_syn_gen"] {
        let prog: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load().unwrap_or_else(|e| panic!("the verifier accepts {name}: {e}"));
    }
    ebpf
}

/// Runs `program` on `frame`: the action and the frame as the program left it.
fn run(ebpf: &Ebpf, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let prog: &Xdp = ebpf.program(program).unwrap().try_into().unwrap();
    run_xdp(prog, frame).expect("BPF_PROG_TEST_RUN")
}

/// The TCP fields of a frame without IP options: (src, dst, sport, dport, seq, ack,
/// flags, payload).
fn tcp_of(f: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16, u32, u32, u8, Vec<u8>) {
    let ip = &f[ETH_LEN..];
    assert_eq!(ip[0], 0x45, "IPv4 without options");
    assert_eq!(ip[9], PROTO_TCP);
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(f.len(), ETH_LEN + total, "the frame is exactly the IP packet");
    let t = &ip[20..];
    let doff = usize::from(t[12] >> 4) * 4;
    (
        Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        u16::from_be_bytes([t[0], t[1]]),
        u16::from_be_bytes([t[2], t[3]]),
        u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        t[13],
        t[doff..total - 20].to_vec(),
    )
}

fn client() -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 1, 2)
}
fn server() -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 2, 11)
}

fn completed(ebpf: &Ebpf) -> ConnectionCounts {
    let map: PerCpuArray<_, ConnectionCounts> = PerCpuArray::try_from(ebpf.map("BENCH_CONNECTIONS").unwrap()).unwrap();
    map.get(&0, 0).unwrap().iter().fold(ConnectionCounts::default(), |sum, c| sum.plus(c))
}

#[test]
fn a_connection_between_the_endpoints_is_valid_tcp_to_the_end() {
    if !privileged("a_connection_between_the_endpoints_is_valid_tcp_to_the_end") {
        return;
    }
    let ebpf = load();
    let syn = Ipv4Packet::new(client(), server(), PROTO_TCP, frames::tcp(40000, 8080, TCP_SYN, b"")).build();

    let (action, syn_ack) = run(&ebpf, "bench_tcp_server", &syn);
    assert_eq!(action, XDP_TX);
    assert!(frames::checksums_valid(&syn_ack), "SYN-ACK checksums");
    assert_eq!((&syn_ack[0..6], &syn_ack[6..12]), (&syn[6..12], &syn[0..6]), "MACs swapped");
    let (src, dst, sport, dport, seq, ack, flags, payload) = tcp_of(&syn_ack);
    assert_eq!((src, dst, sport, dport), (server(), client(), 8080, 40000));
    assert_eq!((seq, ack, flags, payload.len()), (server_isn(1000), 1001, TCP_SYN | TCP_ACK, 0));

    let (action, request) = run(&ebpf, "bench_tcp_client", &syn_ack);
    assert_eq!(action, XDP_TX);
    assert!(frames::checksums_valid(&request), "request checksums");
    let (src, dst, sport, dport, seq, ack, flags, payload) = tcp_of(&request);
    assert_eq!((src, dst, sport, dport), (client(), server(), 40000, 8080));
    assert_eq!((seq, ack, flags), (1001, server_isn(1000) + 1, TCP_ACK | TCP_PSH));
    assert_eq!(payload, REQUEST);

    let (action, response) = run(&ebpf, "bench_tcp_server", &request);
    assert_eq!(action, XDP_TX);
    assert!(frames::checksums_valid(&response), "response checksums");
    let (_, _, _, _, seq, ack, flags, payload) = tcp_of(&response);
    assert_eq!((seq, ack, flags), (server_isn(1000) + 1, 1001 + REQUEST.len() as u32, TCP_ACK | TCP_PSH | TCP_FIN));
    assert_eq!(payload, RESPONSE);

    let before = completed(&ebpf);
    let (action, reset) = run(&ebpf, "bench_tcp_client", &response);
    assert_eq!(action, XDP_TX);
    assert!(frames::checksums_valid(&reset), "RST checksums");
    let (src, dst, _, _, seq, _, flags, payload) = tcp_of(&reset);
    assert_eq!((src, dst, seq, flags, payload.len()), (client(), server(), 1001 + REQUEST.len() as u32, TCP_RST, 0));
    assert_eq!(completed(&ebpf).completed, before.completed + 1, "the response is counted once");

    // Nobody answers the RST or a pure ACK.
    assert_eq!(run(&ebpf, "bench_tcp_server", &reset).0, XDP_DROP);
    let ack = Ipv4Packet::new(server(), client(), PROTO_TCP, frames::tcp(8080, 40000, TCP_ACK, b"")).build();
    assert_eq!(run(&ebpf, "bench_tcp_client", &ack).0, XDP_DROP);
}

/// A kernel's SYN-ACK carries options and usually no tailroom: the client's answer is
/// longer and must still come out whole.
#[test]
fn client_answers_a_kernel_syn_ack_with_options() {
    if !privileged("client_answers_a_kernel_syn_ack_with_options") {
        return;
    }
    let ebpf = load();
    let mut l4 = frames::tcp(80, 40001, TCP_SYN | TCP_ACK, b"");
    l4[12] = 6 << 4; // one option word: MSS 1460
    l4.extend_from_slice(&[2, 4, 0x05, 0xb4]);
    l4[8..12].copy_from_slice(&5001u32.to_be_bytes());
    let syn_ack = Ipv4Packet::new(Ipv4Addr::new(10, 0, 0, 10), client(), PROTO_TCP, l4).build();
    let (action, request) = run(&ebpf, "bench_tcp_client", &syn_ack);
    assert_eq!(action, XDP_TX);
    assert!(frames::checksums_valid(&request));
    let (src, dst, sport, dport, seq, ack, flags, payload) = tcp_of(&request);
    assert_eq!((src, dst, sport, dport), (client(), Ipv4Addr::new(10, 0, 0, 10), 40001, 80));
    assert_eq!((seq, ack, flags), (5001, 1001, TCP_ACK | TCP_PSH));
    assert_eq!(payload, REQUEST);
}

#[test]
fn frames_that_are_not_tcp_go_to_the_kernel_untouched() {
    if !privileged("frames_that_are_not_tcp_go_to_the_kernel_untouched") {
        return;
    }
    let ebpf = load();
    let udp = Ipv4Packet::new(client(), server(), PROTO_UDP, frames::udp(5353, 53, b"q")).build();
    let arp = frames::ethernet(0x0806, &[0; 28]);
    let mut with_ip_options = Ipv4Packet::new(client(), server(), PROTO_TCP, frames::tcp(1, 2, TCP_SYN, b""));
    with_ip_options.options = vec![1; 4];
    let with_ip_options = with_ip_options.build();
    for program in ["bench_tcp_server", "bench_tcp_client"] {
        for frame in [&udp, &arp, &with_ip_options] {
            let (action, out) = run(&ebpf, program, frame);
            assert_eq!((action, &out), (XDP_PASS, frame), "{program}");
        }
    }
}

/// The generator writes each run's SYN whole (live frames come back modified): the next
/// connection's tuple, valid checksums; with its window full it sends nothing.
#[test]
fn the_generator_writes_each_connection_s_syn_and_keeps_its_window() {
    if !privileged("the_generator_writes_each_connection_s_syn_and_keeps_its_window") {
        return;
    }
    // The state is per CPU: keep every run on one.
    pin_to_cpu(0).unwrap();
    let mut ebpf = load();
    let cpus = nr_cpus().unwrap();
    let state = GeneratorState {
        stride: 1,
        offset: 0,
        client_base: u32::from_ne_bytes(client().octets()),
        clients: 3,
        target_addr: u32::from_ne_bytes(server().octets()),
        target_port: 8080u16.to_be(),
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        _pad: [0; 2],
        window: 2,
    };
    {
        let mut map: PerCpuArray<_, GeneratorState> = PerCpuArray::try_from(ebpf.map_mut("BENCH_GENERATOR").unwrap()).unwrap();
        map.set(0, PerCpuValues::try_from(vec![state; cpus]).unwrap(), 0).unwrap();
    }
    // Garbage in, a longer frame: the program rewrites and resizes it all.
    let garbage = vec![0xa5u8; 80];
    for n in 0..2u64 {
        let prog: &Xdp = ebpf.program("bench_syn_gen").unwrap().try_into().unwrap();
        let (action, syn) = run_xdp(prog, &garbage).expect("BPF_PROG_TEST_RUN");
        assert_eq!(action, XDP_TX);
        assert!(frames::checksums_valid(&syn), "SYN {n} checksums");
        assert_eq!((&syn[0..6], &syn[6..12]), (&[2u8, 0, 0, 0, 0, 2][..], &[2u8, 0, 0, 0, 0, 1][..]));
        let (src, dst, sport, dport, _, ack, flags, payload) = tcp_of(&syn);
        let (client_index, port) = generated_tuple(n, 3);
        let expected_src = Ipv4Addr::from(u32::from(client()) + client_index);
        assert_eq!((src, dst, sport, dport, ack, flags, payload.len()), (expected_src, server(), port, 8080, 0, TCP_SYN, 0));
        assert!(port >= CLIENT_PORT_MIN);
    }
    // Two started, none ended: the window of 2 is full.
    let prog: &Xdp = ebpf.program("bench_syn_gen").unwrap().try_into().unwrap();
    assert_eq!(run_xdp(prog, &garbage).unwrap().0, XDP_DROP, "a full window sends nothing");
    // Given up on by the benchmark: out of the window, so the next SYN goes.
    {
        let mut lost: Array<_, u64> = Array::try_from(ebpf.map_mut("BENCH_LOST").unwrap()).unwrap();
        lost.set(0, 2, 0).unwrap();
    }
    let prog: &Xdp = ebpf.program("bench_syn_gen").unwrap().try_into().unwrap();
    assert_eq!(run_xdp(prog, &garbage).unwrap().0, XDP_TX);
    assert_eq!(completed(&ebpf).started, 3);
}
