//! BPF_PROG_TEST_RUN on crafted frames: every frame, well-formed or not, is passed and
//! lands in the expected counter class.

use std::net::Ipv4Addr;

use aya::{
    maps::PerCpuArray,
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use splitter_common::{PacketClass, DECAP_PROGRAM_NAME, PROGRAM_NAME};
use splitter_tests::{
    ebpf_object,
    frames::{self, Ipv4Packet, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TCP_SYN},
    privileged, run_xdp,
};

const XDP_PASS: u32 = 2;

fn load() -> Ebpf {
    let mut ebpf = Ebpf::load_file(ebpf_object()).expect("loading the eBPF object");
    let prog: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into().unwrap();
    prog.load().expect("the verifier accepts the program");
    ebpf
}

fn counters(ebpf: &Ebpf) -> Vec<u64> {
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(ebpf.map("PACKET_COUNTERS").unwrap()).unwrap();
    PacketClass::ALL.iter().map(|c| map.get(&c.0, 0).unwrap().iter().sum()).collect()
}

/// Runs one frame; returns the action and the frame as the program left it.
fn run(ebpf: &Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
    let prog: &Xdp = ebpf.program(PROGRAM_NAME).unwrap().try_into().unwrap();
    run_xdp(prog, frame).expect("BPF_PROG_TEST_RUN")
}

fn a() -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 1)
}
fn b() -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 2)
}

/// Frames and the class each must be counted in.
fn cases() -> Vec<(&'static str, Vec<u8>, PacketClass)> {
    let tcp = Ipv4Packet::new(a(), b(), PROTO_TCP, frames::tcp(40000, 80, TCP_SYN, b"")).build();
    let udp = Ipv4Packet::new(a(), b(), PROTO_UDP, frames::udp(40000, 53, b"query")).build();
    let icmp = Ipv4Packet::new(a(), b(), PROTO_ICMP, vec![8, 0, 0, 0, 0, 1, 0, 1]).build();
    let gre = Ipv4Packet::new(a(), b(), 47, vec![0; 8]).build();
    let mut with_options = Ipv4Packet::new(a(), b(), PROTO_TCP, frames::tcp(1, 2, TCP_SYN, b""));
    with_options.options = vec![0x01; 12]; // NOPs: IHL 8
    let with_options = with_options.build();
    // IHL says 60 bytes of header but the frame ends inside the options.
    let mut ihl_too_long = tcp.clone();
    ihl_too_long[frames::ETH_LEN] = 0x4f;
    let mut ihl_too_short = tcp.clone();
    ihl_too_short[frames::ETH_LEN] = 0x44;
    let mut not_v4 = tcp.clone();
    not_v4[frames::ETH_LEN] = 0x65;
    let mut tot_len_beyond = tcp.clone();
    tot_len_beyond[frames::ETH_LEN + 2..frames::ETH_LEN + 4].copy_from_slice(&1400u16.to_be_bytes());
    let mut tot_len_short = tcp.clone();
    tot_len_short[frames::ETH_LEN + 2..frames::ETH_LEN + 4].copy_from_slice(&30u16.to_be_bytes());
    let mut later_fragment = tcp.clone();
    later_fragment[frames::ETH_LEN + 6..frames::ETH_LEN + 8].copy_from_slice(&0x0010u16.to_be_bytes());
    let mut padded = tcp.clone();
    padded.extend_from_slice(&[0; 6]);
    let mut vlan = frames::ethernet(frames::ETHERTYPE_VLAN, &[0, 10]);
    vlan.extend_from_slice(&tcp[12..]);
    vec![
        ("tcp syn", tcp.clone(), PacketClass::TCP),
        ("udp", udp.clone(), PacketClass::UDP),
        ("icmp echo", icmp, PacketClass::ICMP),
        ("gre", gre, PacketClass::IPV4_OTHER),
        ("tcp behind ip options", with_options.clone(), PacketClass::TCP),
        ("arp", frames::ethernet(frames::ETHERTYPE_ARP, &[0; 28]), PacketClass::NON_IPV4),
        ("vlan-tagged ipv4", vlan, PacketClass::NON_IPV4),
        ("ipv6 ethertype", frames::ethernet(0x86dd, &[0x60; 40]), PacketClass::NON_IPV4),
        ("ethernet header only, ipv4 ethertype", tcp[..frames::ETH_LEN].to_vec(), PacketClass::MALFORMED),
        ("truncated ipv4 header", tcp[..frames::ETH_LEN + 12].to_vec(), PacketClass::MALFORMED),
        ("truncated tcp header", tcp[..frames::ETH_LEN + 20 + 10].to_vec(), PacketClass::MALFORMED),
        ("truncated udp header", udp[..frames::ETH_LEN + 20 + 4].to_vec(), PacketClass::MALFORMED),
        ("tcp cut inside ip options", with_options[..frames::ETH_LEN + 20 + 8].to_vec(), PacketClass::MALFORMED),
        ("ihl beyond the frame", ihl_too_long, PacketClass::MALFORMED),
        ("ihl below 5", ihl_too_short, PacketClass::MALFORMED),
        ("ip version 6 in an ipv4 ethertype", not_v4, PacketClass::MALFORMED),
        ("ip length beyond the frame", tot_len_beyond, PacketClass::MALFORMED),
        ("ip length shorter than its headers", tot_len_short, PacketClass::MALFORMED),
        ("tcp fragment at an offset", later_fragment, PacketClass::TCP),
        ("tcp followed by ethernet padding", padded, PacketClass::TCP),
    ]
}

#[test]
fn every_crafted_frame_passes_untouched_and_is_classified() {
    if !privileged("every_crafted_frame_passes_untouched_and_is_classified") {
        return;
    }
    let ebpf = load();
    for (name, frame, class) in cases() {
        let before = counters(&ebpf);
        let (action, out) = run(&ebpf, &frame);
        assert_eq!(action, XDP_PASS, "{name}: expected XDP_PASS");
        assert_eq!(out, frame, "{name}: frame must be untouched");
        let after = counters(&ebpf);
        for c in PacketClass::ALL {
            let delta = after[c.0 as usize] - before[c.0 as usize];
            let want = u64::from(c == class);
            assert_eq!(delta, want, "{name}: counter {} moved by {delta}, expected {want}", c.name());
        }
        println!("test_run {name}: XDP_PASS, counted as {}", class.name());
    }
}

#[test]
fn kernel_refuses_input_shorter_than_an_ethernet_header() {
    if !privileged("kernel_refuses_input_shorter_than_an_ethernet_header") {
        return;
    }
    // Such a frame can never reach the program: BPF_PROG_TEST_RUN rejects it (EINVAL) and
    // drivers do not deliver it, so the shortest input the program sees is 14 bytes.
    let ebpf = load();
    let prog: &Xdp = ebpf.program(PROGRAM_NAME).unwrap().try_into().unwrap();
    let short = [0u8; frames::ETH_LEN - 1];
    let err = prog.test_run(TestRunOptions { data_in: Some(&short), repeat: 1, ..Default::default() }).expect_err("13-byte input");
    assert!(format!("{err:?}").contains("InvalidInput"), "{err:?}");
}

#[test]
fn every_prefix_of_a_frame_passes() {
    if !privileged("every_prefix_of_a_frame_passes") {
        return;
    }
    let ebpf = load();
    // The kernel refuses XDP test input shorter than an Ethernet header, so start there.
    let frames = [
        Ipv4Packet::new(a(), b(), PROTO_TCP, frames::tcp(1, 2, TCP_SYN, b"payload")).build(),
        Ipv4Packet::new(a(), b(), PROTO_UDP, frames::udp(1, 2, b"payload")).build(),
    ];
    for frame in frames {
        for len in frames::ETH_LEN..=frame.len() {
            let (action, _) = run(&ebpf, &frame[..len]);
            assert_eq!(action, XDP_PASS, "prefix of {len} bytes");
        }
    }
}

/// The agent's object carries the datapath and the decapsulation program alone: test and
/// benchmark programs live in the test object.
#[test]
fn the_agents_object_holds_only_the_product_programs() {
    if !privileged("the_agents_object_holds_only_the_product_programs") {
        return;
    }
    let ebpf = Ebpf::load_file(ebpf_object()).expect("loading the eBPF object");
    let mut names: Vec<&str> = ebpf.programs().map(|(name, _)| name).collect();
    names.sort_unstable();
    assert_eq!(names, [PROGRAM_NAME, DECAP_PROGRAM_NAME], "the datapath and the targets' decapsulation program, nothing else");
    let maps: Vec<&str> = ebpf.maps().map(|(name, _)| name).filter(|n| n.starts_with("BENCH")).collect();
    assert!(maps.is_empty(), "benchmark maps in the agent's object: {maps:?}");
    let helpers = splitter_tests::testbed::helper_object().expect("loading the test object");
    for name in ["xdp_pass", "xdp_drop", "xdp_forward", "bench_tcp_server", "bench_tcp_client", "bench_syn_gen"] {
        assert!(helpers.program(name).is_some(), "{name} missing from the test object");
    }
}
