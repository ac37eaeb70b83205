//! Programs for tests and benchmarks, built only into the test object
//! (`target/bpf/splitter-test.bpf.o`, feature `test-programs`), never into the agent's:
//! a pass-all and a drop-all program, and a bare forwarder.

use core::mem;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup, bpf_redirect},
    macros::xdp,
    programs::XdpContext,
    EbpfContext,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{mac_words, ptr_at, write_mac_words, AF_INET};

/// A program that passes every packet: attached to the peers of interfaces the splitter
/// redirects into (veth delivers redirected frames promptly only to a peer with XDP).
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// A program that drops every packet: the sink of forwarding benchmarks.
#[xdp]
pub fn xdp_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// A bare forwarder for benchmarks (the ceiling of any XDP forwarder on a testbed): FIB
/// lookup, MAC rewrite and redirect of IPv4 packets, unchanged otherwise (no NAT, no maps);
/// anything else, or a next hop the kernel has not resolved, is passed.
#[xdp]
pub fn xdp_forward(ctx: XdpContext) -> u32 {
    let Ok(eth) = ptr_at::<EthHdr>(&ctx, 0) else { return xdp_action::XDP_PASS };
    // SAFETY: `ptr_at` checked that a whole EthHdr lies inside the packet.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return xdp_action::XDP_PASS;
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr>(&ctx, EthHdr::LEN) else { return xdp_action::XDP_PASS };
    // SAFETY: an all-zero bpf_fib_lookup is valid; the IP header is in bounds.
    let mut fib: FibParams = unsafe { mem::zeroed() };
    unsafe {
        fib.family = AF_INET;
        fib.l4_protocol = (*ip).proto;
        fib.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
    }
    fib.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: `fib` is a valid bpf_fib_lookup on our stack, its size passed alongside.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut fib, mem::size_of::<FibParams>() as i32, 0) };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return xdp_action::XDP_PASS;
    }
    write_mac_words(eth, mac_words(&fib.dmac, &fib.smac));
    if fib.ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: bpf_redirect only records the target interface for this packet.
    unsafe { bpf_redirect(fib.ifindex, 0) as u32 }
}
