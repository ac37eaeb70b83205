//! Programs of the connection-rate benchmark, not used by the agent: stateless TCP
//! endpoints (a client and a server that answer each segment by rewriting it into the
//! reply, `XDP_TX`) and a SYN generator run with `BPF_PROG_TEST_RUN` live frames. The
//! rules are `splitter_common::bench_tcp`; they let the benchmark measure what a balancer
//! costs per connection without kernel sockets at both ends costing more than it does.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_map_lookup_percpu_elem, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
    EbpfContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
    tcp::TcpHdr,
};
use splitter_common::{
    bench_tcp::{
        client_reply, generated_tuple, server_reply, ConnectionCounts, GeneratorState, Payload, Reply, Segment, REQUEST, RESPONSE,
    },
    conntrack::{TCP_RST, TCP_SYN},
    csum::{fold, sum_words},
};

use crate::{ptr_at, Error};

/// The run's connections, per CPU (see `ConnectionCounts` for who writes what).
#[map]
static BENCH_CONNECTIONS: PerCpuArray<ConnectionCounts> = PerCpuArray::with_max_entries(1, 0);

/// Connections the benchmark gave up on (in flight without progress for a while): out
/// of the generator's window. Written by: the connection benchmark. Read by: `bench_syn_gen`.
#[map]
static BENCH_LOST: Array<u64> = Array::with_max_entries(1, 0);

/// CPUs the generator sums counts over (a bound for the verifier).
const MAX_CPUS: u32 = 64;

/// Each CPU's generator state. Written by: the connection benchmark (before a run).
/// Read and advanced by: `bench_syn_gen`.
#[map]
static BENCH_GENERATOR: PerCpuArray<GeneratorState> = PerCpuArray::with_max_entries(1, 0);

/// Ethernet + IPv4 without options + TCP without options.
const HEADERS_LEN: usize = EthHdr::LEN + Ipv4Hdr::LEN + TcpHdr::LEN;

/// A segment to write over the frame: addresses and ports in network order.
struct Outgoing {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src_addr: [u8; 4],
    dst_addr: [u8; 4],
    src_port: [u8; 2],
    dst_port: [u8; 2],
    flags: u8,
    seq: u32,
    ack: u32,
    payload: Payload,
}

/// The server endpoint: every TCP segment is answered by the rules of `server_reply`.
#[xdp]
pub fn bench_tcp_server(ctx: XdpContext) -> u32 {
    answer(&ctx, false).unwrap_or(xdp_action::XDP_PASS)
}

/// The client endpoint: SYN-ACKs get the request, responses a RST (and are counted).
#[xdp]
pub fn bench_tcp_client(ctx: XdpContext) -> u32 {
    answer(&ctx, true).unwrap_or(xdp_action::XDP_PASS)
}

/// The generator, for `BPF_PROG_TEST_RUN` with live frames on the client's interface:
/// each run turns the frame into the SYN of this CPU's next connection and sends it.
#[xdp]
pub fn bench_syn_gen(ctx: XdpContext) -> u32 {
    generate(&ctx).unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Result<u32, Error> {
    let state = BENCH_GENERATOR.get_ptr(0).ok_or(Error::Inconsistent)?;
    let counts = BENCH_CONNECTIONS.get_ptr_mut(0).ok_or(Error::Inconsistent)?;
    // SAFETY: this CPU's slot, written only by the benchmark between runs.
    let s = unsafe { &*state };
    let lost = BENCH_LOST.get(0).copied().unwrap_or(0);
    if all_cpus().in_flight(lost) >= u64::from(s.window) {
        return Ok(xdp_action::XDP_DROP);
    }
    // SAFETY: this CPU's slot; nothing else writes it while we run here.
    let started = unsafe {
        let started = (*counts).started;
        (*counts).started += 1;
        started
    };
    let n = u64::from(s.offset) + started * u64::from(s.stride);
    let (client, port) = generated_tuple(n, s.clients);
    let src = u32::from_be(s.client_base).wrapping_add(client);
    let out = Outgoing {
        src_mac: s.src_mac,
        dst_mac: s.dst_mac,
        src_addr: src.to_be_bytes(),
        dst_addr: s.target_addr.to_ne_bytes(),
        src_port: port.to_be_bytes(),
        dst_port: s.target_port.to_ne_bytes(),
        flags: TCP_SYN,
        seq: (n as u32).wrapping_mul(0x2545_f491),
        ack: 0,
        payload: Payload::Empty,
    };
    write_segment(ctx, &out)?;
    Ok(xdp_action::XDP_TX)
}

#[inline(always)]
fn answer(ctx: &XdpContext, client: bool) -> Result<u32, Error> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that a whole EthHdr lies inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Err(Error::Pass);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: `ptr_at` checked that a whole Ipv4Hdr lies inside the packet.
    let (vihl, proto, tot_len) = unsafe { ((*ip).vihl, (*ip).proto, u16::from_be_bytes((*ip).tot_len)) };
    // The benchmark's peers send no IP options; anything else is not ours.
    if vihl != 0x45 || proto != IpProto::Tcp as u8 {
        return Err(Error::Pass);
    }
    let tcp: *mut TcpHdr = ptr_at(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    // SAFETY: the whole TcpHdr is in bounds (checked above); bytes 12 and 13 hold the
    // data offset and the flags.
    let (doff, flags, seq, ack, src_port, dst_port) = unsafe {
        let bytes = tcp.cast::<u8>();
        (
            usize::from(*bytes.add(12) >> 4) * 4,
            *bytes.add(13),
            u32::from_be_bytes((*tcp).seq),
            u32::from_be_bytes((*tcp).ack_seq),
            (*tcp).source,
            (*tcp).dest,
        )
    };
    let headers = Ipv4Hdr::LEN + doff;
    if doff < TcpHdr::LEN || usize::from(tot_len) < headers {
        return Err(Error::Pass);
    }
    let segment = Segment { flags, seq, ack, payload_len: (usize::from(tot_len) - headers) as u32 };
    let reply = if client {
        if let Some(counts) = BENCH_CONNECTIONS.get_ptr_mut(0) {
            // SAFETY: this CPU's slot; nothing else writes it while we run here.
            unsafe {
                if flags & TCP_RST != 0 {
                    (*counts).reset += 1;
                } else if segment.payload_len > 0 {
                    (*counts).completed += 1;
                }
            }
        }
        client_reply(segment)
    } else {
        server_reply(segment)
    };
    let Reply::Send { flags, seq, ack, payload } = reply else {
        return Ok(xdp_action::XDP_DROP);
    };
    // SAFETY: both headers are in bounds (checked above).
    let out = unsafe {
        Outgoing {
            src_mac: (*eth).dst_addr,
            dst_mac: (*eth).src_addr,
            src_addr: (*ip).dst_addr,
            dst_addr: (*ip).src_addr,
            src_port: dst_port,
            dst_port: src_port,
            flags,
            seq,
            ack,
            payload,
        }
    };
    write_segment(ctx, &out)?;
    Ok(xdp_action::XDP_TX)
}

/// The run's counts summed over every CPU (other CPUs' slots may be a few updates
/// behind: the window moves by a connection or two).
#[inline(always)]
fn all_cpus() -> ConnectionCounts {
    let mut sum = ConnectionCounts::default();
    let key = 0u32;
    for cpu in 0..MAX_CPUS {
        // SAFETY: the map pointer is the static map's definition, the key a live u32;
        // the helper returns null past the last CPU.
        let value = unsafe {
            bpf_map_lookup_percpu_elem(
                core::ptr::addr_of!(BENCH_CONNECTIONS) as *mut core::ffi::c_void,
                core::ptr::addr_of!(key).cast(),
                cpu,
            )
        };
        if value.is_null() {
            break;
        }
        // SAFETY: a non-null result points to that CPU's ConnectionCounts.
        sum = sum.plus(unsafe { &*value.cast::<ConnectionCounts>() });
    }
    sum
}

/// Sizes the frame to exactly the headers and `out.payload`, and writes the whole
/// segment over it, checksums included.
#[inline(always)]
fn write_segment(ctx: &XdpContext, out: &Outgoing) -> Result<(), Error> {
    let wanted = HEADERS_LEN + out.payload.size();
    let delta = wanted as i32 - (ctx.data_end() - ctx.data()) as i32;
    // Grow at the front (a frame the kernel built has headroom for headers but often no
    // tailroom), shrink at the end; the whole frame is written below anyway.
    // SAFETY: the helpers only move the frame's start or end (the kernel checks the
    // room); every packet pointer is derived again below.
    let rc = unsafe {
        if delta > 0 {
            bpf_xdp_adjust_head(ctx.as_ptr().cast(), -delta)
        } else if delta < 0 {
            bpf_xdp_adjust_tail(ctx.as_ptr().cast(), delta)
        } else {
            0
        }
    };
    if rc != 0 {
        return Err(Error::Pass);
    }
    let headers: *mut [u8; HEADERS_LEN] = ptr_at(ctx, 0)?;
    let ip_len = (wanted - EthHdr::LEN) as u16;
    let tcp_len = (wanted - EthHdr::LEN - Ipv4Hdr::LEN) as u16;
    let mut h = [0u8; HEADERS_LEN];
    h[0..6].copy_from_slice(&out.dst_mac);
    h[6..12].copy_from_slice(&out.src_mac);
    h[12..14].copy_from_slice(&(EtherType::Ipv4 as u16).to_ne_bytes());
    let ip = &mut h[EthHdr::LEN..];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = IpProto::Tcp as u8;
    ip[12..16].copy_from_slice(&out.src_addr);
    ip[16..20].copy_from_slice(&out.dst_addr);
    let ip_check = !fold(sum_words(&ip[..Ipv4Hdr::LEN]));
    ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    let tcp = &mut h[EthHdr::LEN + Ipv4Hdr::LEN..];
    tcp[0..2].copy_from_slice(&out.src_port);
    tcp[2..4].copy_from_slice(&out.dst_port);
    tcp[4..8].copy_from_slice(&out.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&out.ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = out.flags;
    tcp[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    // Pseudo-header (addresses, protocol, TCP length), header, payload.
    let pseudo = sum_words(&out.src_addr)
        + sum_words(&out.dst_addr)
        + u64::from(u16::from_ne_bytes([0, IpProto::Tcp as u8]))
        + u64::from(u16::from_ne_bytes(tcp_len.to_be_bytes()));
    let tcp_check = !fold(pseudo + sum_words(&tcp[..TcpHdr::LEN]) + out.payload.sum());
    tcp[16..18].copy_from_slice(&tcp_check.to_ne_bytes());
    // SAFETY: `ptr_at` checked that the headers lie inside the (resized) packet.
    unsafe { headers.write_unaligned(h) };
    match out.payload {
        Payload::Empty => {}
        Payload::Request => {
            let p: *mut [u8; REQUEST.len()] = ptr_at(ctx, HEADERS_LEN)?;
            // SAFETY: in bounds, checked by `ptr_at`.
            unsafe { p.write_unaligned(REQUEST) };
        }
        Payload::Response => {
            let p: *mut [u8; RESPONSE.len()] = ptr_at(ctx, HEADERS_LEN)?;
            // SAFETY: in bounds, checked by `ptr_at`.
            unsafe { p.write_unaligned(RESPONSE) };
        }
    }
    Ok(())
}
