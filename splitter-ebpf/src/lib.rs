//! The splitter's XDP program.
//!
//! Parses Ethernet, IPv4, TCP and UDP; frames it cannot parse, or that are not IPv4
//! (VLAN-tagged frames included), are passed to the kernel untouched.
#![no_std]

use core::mem;

use aya_ebpf::{bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext};
#[cfg(feature = "log")]
use aya_log_ebpf::debug;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use splitter_common::PacketClass;

/// Packets seen, per CPU, indexed by [`PacketClass`].
/// Written by: this program. Read by: the agent (`splitter agent` counters, tests).
#[map]
static PACKET_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PacketClass::COUNT, 0);

/// Why a packet could not be classified. Parse failures are passed, never aborted.
enum ParseError {
    /// The frame ends before the header being read.
    Truncated,
}

#[xdp]
pub fn splitter(ctx: XdpContext) -> u32 {
    let class = match try_classify(&ctx) {
        Ok(class) => class,
        Err(ParseError::Truncated) => PacketClass::MALFORMED,
    };
    count(class);
    #[cfg(feature = "log")]
    debug!(&ctx, "packet class {}", class.0);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(class: PacketClass) {
    if let Some(counter) = PACKET_COUNTERS.get_ptr_mut(class.0) {
        // SAFETY: the pointer comes from a per-CPU array slot of this CPU; nothing else
        // writes it while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}

/// Returns a pointer to a `T` at `offset` bytes into the packet, or `Truncated` if the
/// packet is too short. The only place packet bounds are checked.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ParseError> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(ParseError::Truncated);
    }
    Ok((start + offset) as *mut T)
}

#[inline(always)]
fn try_classify(ctx: &XdpContext) -> Result<PacketClass, ParseError> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that a whole EthHdr lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type != EtherType::Ipv4 as u16 {
        return Ok(PacketClass::NON_IPV4);
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: `ptr_at` checked that a whole Ipv4Hdr lies inside the packet.
    let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(ParseError::Truncated);
    }
    let l4 = EthHdr::LEN + ihl;
    if proto == IpProto::Tcp as u8 {
        let _tcp: *mut TcpHdr = ptr_at(ctx, l4)?;
        Ok(PacketClass::TCP)
    } else if proto == IpProto::Udp as u8 {
        let _udp: *mut UdpHdr = ptr_at(ctx, l4)?;
        Ok(PacketClass::UDP)
    } else if proto == IpProto::Icmp as u8 {
        Ok(PacketClass::ICMP)
    } else {
        Ok(PacketClass::IPV4_OTHER)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // No panic is reachable (the verifier would reject one anyway); the handler is only
    // required by `no_std`.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
