//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`, and an independent checksum
//! calculator (a full recomputation, to check the datapath's incremental updates).

use std::net::{Ipv4Addr, Ipv6Addr};

use splitter_common::maps::FlowKey;

pub const ETH_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const IPV6_LEN: usize = 40;
pub const PROTO_ICMPV6: u8 = 58;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// An IPv4 address as the datapath's maps hold it: its wire bytes read in native order.
pub fn ipv4_word(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The conntrack key the datapath reads from an IPv4 packet from `src:sport` to
/// `dst:dport`.
pub fn flow_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_addr: ipv4_word(src),
        dst_addr: ipv4_word(dst),
        src_port: sport.to_be(),
        dst_port: dport.to_be(),
        proto,
        _pad: 0,
        _pad_word: 0,
    }
}
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// An IPv4 packet description; `build` gives the Ethernet frame with valid checksums.
#[derive(Clone, Debug)]
pub struct Ipv4Packet {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// IP options (a multiple of 4 bytes, at most 40).
    pub options: Vec<u8>,
    /// L4 header and payload as built by [`tcp`] / [`udp`], or raw bytes.
    pub l4: Vec<u8>,
}

impl Ipv4Packet {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: Vec<u8>) -> Self {
        Self { src_mac: [0x02, 0, 0, 0, 0, 0x01], dst_mac: [0x02, 0, 0, 0, 0, 0x02], src, dst, proto, options: Vec::new(), l4 }
    }

    pub fn build(&self) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
        let ihl = 20 + self.options.len();
        let total = ihl + self.l4.len();
        let mut f = Vec::with_capacity(ETH_LEN + total);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f.push(0x40 | (ihl / 4) as u8);
        f.push(0);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, self.proto, 0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend_from_slice(&self.options);
        f.extend_from_slice(&self.l4);
        fix_checksums(&mut f);
        f
    }
}

/// A TCP header (no options) with `flags` and `payload`; checksum filled by `build`.
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&1000u32.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    h.push(5 << 4);
    h.push(flags);
    h.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
    h.extend_from_slice(payload);
    h
}

/// A UDP header with `payload`; checksum filled by `build`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// A frame with any EtherType and payload.
pub fn ethernet(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// One's-complement sum of 16-bit big-endian words, folded.
pub fn ones_complement_sum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum of an Ethernet/IPv4
/// frame in place (a UDP checksum of zero, "none", is left zero).
pub fn fix_checksums(f: &mut [u8]) {
    let ihl = usize::from(f[ETH_LEN] & 0x0f) * 4;
    f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&[0, 0]);
    let ip_sum = !ones_complement_sum(&f[ETH_LEN..ETH_LEN + ihl], 0);
    f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let proto = f[ETH_LEN + 9];
    let l4 = ETH_LEN + ihl;
    let check_at = match proto {
        PROTO_TCP if f.len() >= l4 + 20 => l4 + 16,
        PROTO_UDP if f.len() >= l4 + 8 => l4 + 6,
        _ => return,
    };
    f[check_at..check_at + 2].copy_from_slice(&[0, 0]);
    let sum = !l4_sum(f);
    let sum = if proto == PROTO_UDP && sum == 0 { 0xffff } else { sum };
    f[check_at..check_at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// True when the frame is a well-formed Ethernet/IPv4 TCP or UDP frame (see
/// [`checksums_checked`]) whose IPv4 header checksum and L4 checksum are both valid.
pub fn checksums_valid(f: &[u8]) -> bool {
    checksums_checked(f) == Some(true)
}

/// Whether both checksums of a well-formed Ethernet/IPv4 TCP or UDP frame (untagged,
/// whole, unfragmented, lengths consistent) verify; `None` for any other frame, whatever
/// its bytes (it never panics: the packet fuzzer feeds it anything). A UDP checksum of
/// zero is "none".
pub fn checksums_checked(f: &[u8]) -> Option<bool> {
    if f.len() < ETH_LEN + 20 || f[12..14] != ETHERTYPE_IPV4.to_be_bytes() || f[ETH_LEN] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(f[ETH_LEN] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[ETH_LEN + 2], f[ETH_LEN + 3]]));
    let fragment = u16::from_be_bytes([f[ETH_LEN + 6], f[ETH_LEN + 7]]) & 0x3fff;
    if ihl < 20 || fragment != 0 || total < ihl || ETH_LEN + total > f.len() {
        return None;
    }
    let l4 = &f[ETH_LEN + ihl..ETH_LEN + total];
    let check_at = match f[ETH_LEN + 9] {
        PROTO_TCP if l4.len() >= 20 && usize::from(l4[12] >> 4) * 4 >= 20 => 16,
        PROTO_UDP if l4.len() >= 8 && usize::from(u16::from_be_bytes([l4[4], l4[5]])) == l4.len() => 6,
        _ => return None,
    };
    let ip_ok = ones_complement_sum(&f[ETH_LEN..ETH_LEN + ihl], 0) == 0xffff;
    if f[ETH_LEN + 9] == PROTO_UDP && l4[check_at..check_at + 2] == [0, 0] {
        return Some(ip_ok);
    }
    Some(ip_ok && l4_sum(f) == 0xffff)
}

/// Sum over the pseudo-header and the L4 segment (checksum field included as it is).
fn l4_sum(f: &[u8]) -> u16 {
    let ihl = usize::from(f[ETH_LEN] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[ETH_LEN + 2], f[ETH_LEN + 3]]));
    let l4 = &f[ETH_LEN + ihl..ETH_LEN + total];
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&f[ETH_LEN + 12..ETH_LEN + 20]);
    pseudo.extend_from_slice(&[0, f[ETH_LEN + 9]]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    ones_complement_sum(l4, u32::from(ones_complement_sum(&pseudo, 0)))
}

/// An IPv6 packet description; `build` gives the Ethernet frame with a valid L4 checksum.
#[derive(Clone, Debug)]
pub struct Ipv6Packet {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// The traffic class and flow label (the header's first word, version bits aside).
    pub class_and_label: u32,
    /// The next header of the fixed header: the L4 protocol, or the first extension
    /// header's type when `extensions` holds any.
    pub next_header: u8,
    /// Extension headers as raw bytes (their own next-header fields included).
    pub extensions: Vec<u8>,
    pub l4: Vec<u8>,
}

impl Ipv6Packet {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: Vec<u8>) -> Self {
        Self { src, dst, class_and_label: 0x0b_12345, next_header: proto, extensions: Vec::new(), l4 }
    }

    pub fn build(&self) -> Vec<u8> {
        let payload = self.extensions.len() + self.l4.len();
        let mut f = Vec::with_capacity(ETH_LEN + IPV6_LEN + payload);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01]);
        f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f.extend_from_slice(&(0x6000_0000 | (self.class_and_label & 0x0fff_ffff)).to_be_bytes());
        f.extend_from_slice(&(payload as u16).to_be_bytes());
        f.push(self.next_header);
        f.push(64);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend_from_slice(&self.extensions);
        f.extend_from_slice(&self.l4);
        if self.extensions.is_empty() {
            fix_checksums6(&mut f);
        }
        f
    }
}

/// The source of an Ethernet/IPv6 frame.
pub fn ip6_src(f: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&f[ETH_LEN + 8..ETH_LEN + 24]).unwrap())
}

/// The destination of an Ethernet/IPv6 frame.
pub fn ip6_dst(f: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&f[ETH_LEN + 24..ETH_LEN + 40]).unwrap())
}

/// Recomputes the TCP, UDP or ICMPv6 checksum of an Ethernet/IPv6 frame without extension
/// headers in place.
pub fn fix_checksums6(f: &mut [u8]) {
    let l4 = ETH_LEN + IPV6_LEN;
    let check_at = match f[ETH_LEN + 6] {
        PROTO_TCP if f.len() >= l4 + 20 => l4 + 16,
        PROTO_UDP if f.len() >= l4 + 8 => l4 + 6,
        PROTO_ICMPV6 if f.len() >= l4 + 4 => l4 + 2,
        _ => return,
    };
    f[check_at..check_at + 2].copy_from_slice(&[0, 0]);
    let sum = !l4_sum6(f);
    let sum = if f[ETH_LEN + 6] == PROTO_UDP && sum == 0 { 0xffff } else { sum };
    f[check_at..check_at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Whether the L4 checksum (TCP, UDP or ICMPv6) of a whole Ethernet/IPv6 frame without
/// extension headers verifies; `None` for any other frame.
pub fn checksums6_checked(f: &[u8]) -> Option<bool> {
    if f.len() < ETH_LEN + IPV6_LEN || f[12..14] != ETHERTYPE_IPV6.to_be_bytes() || f[ETH_LEN] >> 4 != 6 {
        return None;
    }
    let payload = usize::from(u16::from_be_bytes([f[ETH_LEN + 4], f[ETH_LEN + 5]]));
    if ETH_LEN + IPV6_LEN + payload > f.len() {
        return None;
    }
    let l4 = &f[ETH_LEN + IPV6_LEN..ETH_LEN + IPV6_LEN + payload];
    match f[ETH_LEN + 6] {
        PROTO_TCP if l4.len() >= 20 => {}
        PROTO_UDP if l4.len() >= 8 && l4[6..8] != [0, 0] => {}
        PROTO_ICMPV6 if l4.len() >= 4 => {}
        _ => return None,
    }
    Some(l4_sum6(f) == 0xffff)
}

/// True when [`checksums6_checked`] says the checksum verifies.
pub fn checksums6_valid(f: &[u8]) -> bool {
    checksums6_checked(f) == Some(true)
}

/// Sum over the IPv6 pseudo-header and the L4 segment (checksum field included as it is).
fn l4_sum6(f: &[u8]) -> u16 {
    let payload = usize::from(u16::from_be_bytes([f[ETH_LEN + 4], f[ETH_LEN + 5]]));
    let l4 = &f[ETH_LEN + IPV6_LEN..ETH_LEN + IPV6_LEN + payload];
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&f[ETH_LEN + 8..ETH_LEN + 40]);
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, f[ETH_LEN + 6]]);
    ones_complement_sum(l4, u32::from(ones_complement_sum(&pseudo, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_valid_checksums() {
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        for (proto, l4) in [(PROTO_TCP, tcp(1, 2, TCP_SYN, b"x")), (PROTO_UDP, udp(3, 4, b"odd"))] {
            let mut f = Ipv4Packet::new(a, b, proto, l4).build();
            assert!(checksums_valid(&f));
            let last = f.len() - 1;
            f[last] ^= 1;
            assert!(!checksums_valid(&f));
        }
    }

    #[test]
    fn built_ipv6_frames_have_valid_checksums() {
        let a: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8::2".parse().unwrap();
        for (proto, l4) in [(PROTO_TCP, tcp(1, 2, TCP_SYN, b"x")), (PROTO_UDP, udp(3, 4, b"odd"))] {
            let mut f = Ipv6Packet::new(a, b, proto, l4).build();
            assert!(checksums6_valid(&f));
            let last = f.len() - 1;
            f[last] ^= 1;
            assert!(!checksums6_valid(&f));
        }
    }
}
