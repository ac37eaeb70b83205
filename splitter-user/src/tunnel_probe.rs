//! The health check of a direct-server-return target, sent the way its traffic goes: a
//! TCP SYN from this node to the VIP inside an IP-in-IP header addressed to the target. A
//! target that holds the VIP (IPv6 in IPv6 for an IPv6 one), decapsulates and listens answers from the VIP with a SYN-ACK,
//! which comes back directly (not through any tunnel). Raw sockets, so the agent needs
//! CAP_NET_RAW for these checks.

use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant, SystemTime},
};

use splitter_common::csum::{fold, sum_words};

const IPPROTO_IPIP: i32 = 4;
/// IPv6 in IPv6 (the outer header's next header).
const IPPROTO_IPV6_ENCAP: i32 = 41;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// An IPv4 header and a TCP header, neither with options.
const SEGMENT_LEN: usize = 40;
/// An IPv6 header and a TCP header without options.
const SEGMENT6_LEN: usize = 60;

/// A TCP segment without payload or options, with its IPv4 header (TTL 64, don't
/// fragment) and both checksums.
pub fn tcp_segment(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, ack: u32, flags: u8) -> [u8; SEGMENT_LEN] {
    let mut p = [0u8; SEGMENT_LEN];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(SEGMENT_LEN as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.ip().octets());
    p[16..20].copy_from_slice(&dst.ip().octets());
    let ip_check = !fold(sum_words(&p[..20]));
    p[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    p[20..22].copy_from_slice(&src.port().to_be_bytes());
    p[22..24].copy_from_slice(&dst.port().to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[28..32].copy_from_slice(&ack.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = flags;
    p[34..36].copy_from_slice(&64_240u16.to_be_bytes());
    // The pseudo-header: addresses, protocol, TCP length.
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&p[12..20]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let tcp_check = !fold(sum_words(&pseudo) + sum_words(&p[20..]));
    p[36..38].copy_from_slice(&tcp_check.to_ne_bytes());
    p
}

/// What a received packet says to a probe from `local` to `vip`.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The VIP accepted: SYN-ACK acknowledging `seq + 1`.
    Accepted,
    /// The VIP refused: a reset.
    Refused,
    /// Not an answer to this probe.
    Other,
}

/// Reads a packet (IPv4 header first, as a raw socket receives it) as an answer to the SYN
/// with `seq` from `local` to `vip`.
pub fn answer_to(packet: &[u8], local: SocketAddrV4, vip: SocketAddrV4, seq: u32) -> Answer {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 6 {
        return Answer::Other;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if ihl < 20 {
        return Answer::Other;
    }
    let from = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let to = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    if from != *vip.ip() || to != *local.ip() {
        return Answer::Other;
    }
    segment_answer(&packet[ihl.min(packet.len())..], local.port(), vip.port(), seq)
}

/// A TCP segment without payload or options, with its IPv6 header (hop limit 64) and
/// its checksum.
pub fn tcp_segment6(src: SocketAddrV6, dst: SocketAddrV6, seq: u32, ack: u32, flags: u8) -> [u8; SEGMENT6_LEN] {
    let mut p = [0u8; SEGMENT6_LEN];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&20u16.to_be_bytes());
    p[6] = 6;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.ip().octets());
    p[24..40].copy_from_slice(&dst.ip().octets());
    p[40..42].copy_from_slice(&src.port().to_be_bytes());
    p[42..44].copy_from_slice(&dst.port().to_be_bytes());
    p[44..48].copy_from_slice(&seq.to_be_bytes());
    p[48..52].copy_from_slice(&ack.to_be_bytes());
    p[52] = 5 << 4;
    p[53] = flags;
    p[54..56].copy_from_slice(&64_240u16.to_be_bytes());
    // The pseudo-header: addresses, TCP length, next header.
    let mut pseudo = [0u8; 40];
    pseudo[..32].copy_from_slice(&p[8..40]);
    pseudo[34..36].copy_from_slice(&20u16.to_be_bytes());
    pseudo[39] = 6;
    let tcp_check = !fold(sum_words(&pseudo) + sum_words(&p[40..]));
    p[56..58].copy_from_slice(&tcp_check.to_ne_bytes());
    p
}

/// Reads a TCP segment from `from` (an IPv6 raw socket gives no IP header) as an answer
/// to the SYN with `seq` from `local` to `vip`.
pub fn answer6_to(segment: &[u8], from: Ipv6Addr, local: SocketAddrV6, vip: SocketAddrV6, seq: u32) -> Answer {
    if from != *vip.ip() {
        return Answer::Other;
    }
    segment_answer(segment, local.port(), vip.port(), seq)
}

/// Reads a TCP segment from the VIP's address as an answer to the SYN with `seq` from port
/// `local_port` to port `vip_port`.
fn segment_answer(segment: &[u8], local_port: u16, vip_port: u16, seq: u32) -> Answer {
    let Some(tcp) = segment.get(..20) else { return Answer::Other };
    let (sport, dport) = (u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]));
    if sport != vip_port || dport != local_port {
        return Answer::Other;
    }
    let (flags, ack) = (tcp[13], u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]));
    if flags & TCP_RST != 0 {
        Answer::Refused
    } else if flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) && ack == seq.wrapping_add(1) {
        Answer::Accepted
    } else {
        Answer::Other
    }
}

/// The probe's segment from `src` to `dst` with its IP header (none when the two are of
/// different families).
fn segment(src: SocketAddr, dst: SocketAddr, seq: u32, flags: u8) -> Option<Vec<u8>> {
    match (src, dst) {
        (SocketAddr::V4(src), SocketAddr::V4(dst)) => Some(tcp_segment(src, dst, seq, 0, flags).to_vec()),
        (SocketAddr::V6(src), SocketAddr::V6(dst)) => Some(tcp_segment6(src, dst, seq, 0, flags).to_vec()),
        _ => None,
    }
}

/// What a received packet says to the probe, read as the family's raw socket gives it.
fn answer(packet: &[u8], from: IpAddr, local: SocketAddr, vip: SocketAddr, seq: u32) -> Answer {
    match (local, vip, from) {
        (SocketAddr::V4(local), SocketAddr::V4(vip), _) => answer_to(packet, local, vip, seq),
        (SocketAddr::V6(local), SocketAddr::V6(vip), IpAddr::V6(from)) => answer6_to(packet, from, local, vip, seq),
        _ => Answer::Other,
    }
}

fn socket(family: IpAddr, kind: i32, protocol: i32) -> io::Result<OwnedFd> {
    let domain = if family.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket(2) with plain integer arguments; the descriptor is owned at once.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by socket(2), owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `addr` as a socket address for the system calls, with its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any socket address.
            let sa = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = a.port().to_be();
            sa.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sa = unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = a.port().to_be();
            sa.sin6_addr.s6_addr = a.ip().octets();
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The address and port in a socket address the kernel filled in (none: another family).
fn socket_addr_of(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in, as its family says.
            let sa = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((Ipv4Addr::from(sa.sin_addr.s_addr.to_ne_bytes()), u16::from_be(sa.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6, as its family says.
            let sa = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::from((Ipv6Addr::from(sa.sin6_addr.s6_addr), u16::from_be(sa.sin6_port))))
        }
        _ => None,
    }
}

/// A TCP port of `addr` reserved for the probe (bound, never listening: the kernel answers
/// the SYN-ACK with a reset, and no other socket can take the port meanwhile).
fn reserve_port(addr: IpAddr) -> io::Result<(OwnedFd, u16)> {
    let fd = socket(addr, libc::SOCK_STREAM, 0)?;
    let (sa, len) = sockaddr(SocketAddr::new(addr, 0));
    // SAFETY: all zero is a valid sockaddr_storage to be filled.
    let mut bound: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut bound_len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `sa` and `bound` outlive the calls; the lengths passed are theirs.
    unsafe {
        if libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_storage).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getsockname(fd.as_raw_fd(), (&mut bound as *mut libc::sockaddr_storage).cast(), &mut bound_len) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let port = socket_addr_of(&bound).map(|a| a.port()).ok_or_else(|| io::Error::other("getsockname gave another family"))?;
    Ok((fd, port))
}

/// Sends `inner` (an IP packet) to `target` inside an outer header of its family, which
/// the kernel adds.
fn send_tunnelled(fd: &OwnedFd, target: IpAddr, inner: &[u8]) -> io::Result<()> {
    let (sa, len) = sockaddr(SocketAddr::new(target, 0));
    // SAFETY: `inner` and `sa` outlive the call; the lengths passed are theirs.
    let sent =
        unsafe { libc::sendto(fd.as_raw_fd(), inner.as_ptr().cast(), inner.len(), 0, (&sa as *const libc::sockaddr_storage).cast(), len) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks that `target` serves `vip`: a SYN to the VIP through the tunnel (IP-in-IP, or
/// IPv6-in-IPv6 for an IPv6 target), a SYN-ACK from the VIP within `timeout`. Blocking.
pub fn tunnel_syn_probe(target: IpAddr, vip: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let node = match crate::system::source_towards(target) {
        Ok(node) if node.is_ipv4() == target.is_ipv4() => node,
        Ok(other) => return Err(format!("a source {other} of another family towards target {target}")),
        Err(e) => return Err(format!("no route to target {target}: {e}")),
    };
    let (_reserved, port) = reserve_port(node).map_err(|e| format!("reserving a port on {node}: {e}"))?;
    let local = SocketAddr::new(node, port);
    let seq = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()) ^ u32::from(port) << 16;
    let (Some(syn), Some(reset)) = (segment(local, vip, seq, TCP_SYN), segment(local, vip, seq.wrapping_add(1), TCP_RST)) else {
        return Err(format!("target {target} and VIP {vip} are of different address families"));
    };
    let (encap, tunnel_kind) = if target.is_ipv4() { (IPPROTO_IPIP, "IP-in-IP") } else { (IPPROTO_IPV6_ENCAP, "IPv6-in-IPv6") };
    let tunnel = socket(target, libc::SOCK_RAW, encap).map_err(|e| format!("raw {tunnel_kind} socket (needs CAP_NET_RAW): {e}"))?;
    let replies = socket(target, libc::SOCK_RAW, libc::IPPROTO_TCP).map_err(|e| format!("raw TCP socket (needs CAP_NET_RAW): {e}"))?;
    send_tunnelled(&tunnel, target, &syn).map_err(|e| format!("sending the check to {target}: {e}"))?;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no SYN-ACK from {vip} through target {target} within {}ms", timeout.as_millis()));
        }
        let tv = libc::timeval { tv_sec: left.as_secs() as libc::time_t, tv_usec: left.subsec_micros().max(1) as libc::suseconds_t };
        // SAFETY: all zero is a valid sockaddr_storage to be filled.
        let mut from: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let mut from_len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: `tv`, `from` and `from_len` outlive the calls and their sizes are passed;
        // `buf` is writable for its whole length.
        let received = unsafe {
            libc::setsockopt(
                replies.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            libc::recvfrom(
                replies.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_storage).cast(),
                &mut from_len,
            )
        };
        if received < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) {
                continue;
            }
            return Err(format!("reading answers: {e}"));
        }
        let Some(from) = socket_addr_of(&from) else { continue };
        match answer(&buf[..received as usize], from.ip(), local, vip, seq) {
            Answer::Accepted => {
                // Leave nothing half-open on the target.
                let _ = send_tunnelled(&tunnel, target, &reset);
                return Ok(());
            }
            Answer::Refused => return Err(format!("{vip} refused the connection through target {target} (reset)")),
            Answer::Other => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ones_complement_ok(bytes: &[u8]) -> bool {
        fold(sum_words(bytes)) == 0xffff
    }

    #[test]
    fn segments_carry_valid_checksums_and_answers_are_matched_to_their_probe() {
        let local = SocketAddrV4::new(Ipv4Addr::new(10, 10, 2, 1), 40_000);
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 80), 80);
        let syn = tcp_segment(local, vip, 7, 0, TCP_SYN);
        assert!(ones_complement_ok(&syn[..20]), "IP header checksum");
        let mut pseudo = syn[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&syn[20..]);
        assert!(ones_complement_ok(&pseudo), "TCP checksum over the pseudo-header");
        assert_eq!(syn[33], TCP_SYN);

        let syn_ack = tcp_segment(vip, local, 1000, 8, TCP_SYN | TCP_ACK);
        assert_eq!(answer_to(&syn_ack, local, vip, 7), Answer::Accepted);
        assert_eq!(answer_to(&syn_ack, local, vip, 8), Answer::Other, "acknowledges another SYN");
        let rst = tcp_segment(vip, local, 0, 8, TCP_RST | TCP_ACK);
        assert_eq!(answer_to(&rst, local, vip, 7), Answer::Refused);
        let other_port = SocketAddrV4::new(*local.ip(), 40_001);
        assert_eq!(answer_to(&syn_ack, other_port, vip, 7), Answer::Other, "another probe's answer");
        assert_eq!(answer_to(&syn_ack[..30], local, vip, 7), Answer::Other, "truncated");

        let local6 = SocketAddrV6::new("2001:db8:2::1".parse().unwrap(), 40_000, 0, 0);
        let vip6 = SocketAddrV6::new("2001:db8::80".parse().unwrap(), 80, 0, 0);
        let syn6 = tcp_segment6(local6, vip6, 7, 0, TCP_SYN);
        let mut pseudo6 = syn6[8..40].to_vec();
        pseudo6.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
        pseudo6.extend_from_slice(&syn6[40..]);
        assert!(ones_complement_ok(&pseudo6), "TCP checksum over the IPv6 pseudo-header");
        // An IPv6 raw socket gives the segment without its IP header, and its source apart.
        let syn_ack6 = tcp_segment6(vip6, local6, 1000, 8, TCP_SYN | TCP_ACK);
        assert_eq!(answer6_to(&syn_ack6[40..], *vip6.ip(), local6, vip6, 7), Answer::Accepted);
        assert_eq!(answer6_to(&syn_ack6[40..], *local6.ip(), local6, vip6, 7), Answer::Other, "not from the VIP");
        let rst6 = tcp_segment6(vip6, local6, 0, 8, TCP_RST | TCP_ACK);
        assert_eq!(answer(&rst6[40..], IpAddr::V6(*vip6.ip()), local6.into(), vip6.into(), 7), Answer::Refused);
        assert_eq!(segment(local.into(), vip6.into(), 7, TCP_SYN), None, "families mixed");
    }
}
