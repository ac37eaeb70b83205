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

/// What a received IPv4 packet says to a probe from `local` to `vip`.
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
    let Some(tcp) = packet.get(ihl..ihl + 20) else { return Answer::Other };
    let from = SocketAddrV4::new(Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]), u16::from_be_bytes([tcp[0], tcp[1]]));
    let to = SocketAddrV4::new(Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]), u16::from_be_bytes([tcp[2], tcp[3]]));
    if from != vip || to != local {
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

fn socket(kind: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by socket(2), owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all zero is valid.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from_ne_bytes(addr.ip().octets());
    sa
}

/// A TCP port of `addr` reserved for the probe (bound, never listening: the kernel answers
/// the SYN-ACK with a reset, and no other socket can take the port meanwhile).
fn reserve_port(addr: Ipv4Addr) -> io::Result<(OwnedFd, u16)> {
    let fd = socket(libc::SOCK_STREAM, 0)?;
    let sa = sockaddr(SocketAddrV4::new(addr, 0));
    let mut bound = sa;
    let mut len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `sa` and `bound` are sockaddr_in values that outlive the calls; the lengths
    // passed are theirs.
    unsafe {
        if libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getsockname(fd.as_raw_fd(), (&mut bound as *mut libc::sockaddr_in).cast(), &mut len) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((fd, u16::from_be(bound.sin_port)))
}

/// Sends `inner` (an IPv4 packet) to `target` inside an IP-in-IP header the kernel adds.
fn send_tunnelled(fd: &OwnedFd, target: Ipv4Addr, inner: &[u8]) -> io::Result<()> {
    let sa = sockaddr(SocketAddrV4::new(target, 0));
    // SAFETY: `inner` and `sa` outlive the call; the lengths passed are theirs.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            inner.as_ptr().cast(),
            inner.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks that `target` serves `vip`: a SYN to the VIP through the tunnel, a SYN-ACK from
/// the VIP within `timeout`. Blocking.
pub fn tunnel_syn_probe(target: IpAddr, vip: SocketAddr, timeout: Duration) -> Result<(), String> {
    match (target, vip) {
        (IpAddr::V4(target), SocketAddr::V4(vip)) => tunnel_syn_probe4(target, vip, timeout),
        (IpAddr::V6(target), SocketAddr::V6(vip)) => tunnel_syn_probe6(target, vip, timeout),
        _ => Err(format!("target {target} and VIP {vip} are of different address families")),
    }
}

fn tunnel_syn_probe4(target: Ipv4Addr, vip: SocketAddrV4, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let node = match crate::system::source_towards(IpAddr::V4(target)) {
        Ok(IpAddr::V4(node)) => node,
        Ok(other) => return Err(format!("an IPv6 source {other} towards target {target}")),
        Err(e) => return Err(format!("no route to target {target}: {e}")),
    };
    let (_reserved, port) = reserve_port(node).map_err(|e| format!("reserving a port on {node}: {e}"))?;
    let local = SocketAddrV4::new(node, port);
    let tunnel = socket(libc::SOCK_RAW, IPPROTO_IPIP).map_err(|e| format!("raw IP-in-IP socket (needs CAP_NET_RAW): {e}"))?;
    let replies = socket(libc::SOCK_RAW, libc::IPPROTO_TCP).map_err(|e| format!("raw TCP socket (needs CAP_NET_RAW): {e}"))?;
    let seq = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()) ^ u32::from(port) << 16;
    send_tunnelled(&tunnel, target, &tcp_segment(local, vip, seq, 0, TCP_SYN))
        .map_err(|e| format!("sending the check to {target}: {e}"))?;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no SYN-ACK from {vip} through target {target} within {}ms", timeout.as_millis()));
        }
        let tv = libc::timeval { tv_sec: left.as_secs() as libc::time_t, tv_usec: left.subsec_micros().max(1) as libc::suseconds_t };
        // SAFETY: `tv` outlives the call and its size is passed; `buf` is writable for its
        // whole length.
        let received = unsafe {
            libc::setsockopt(
                replies.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            libc::recv(replies.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
        };
        if received < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) {
                continue;
            }
            return Err(format!("reading answers: {e}"));
        }
        match answer_to(&buf[..received as usize], local, vip, seq) {
            Answer::Accepted => {
                // Leave nothing half-open on the target.
                let _ = send_tunnelled(&tunnel, target, &tcp_segment(local, vip, seq.wrapping_add(1), 0, TCP_RST));
                return Ok(());
            }
            Answer::Refused => return Err(format!("{vip} refused the connection through target {target} (reset)")),
            Answer::Other => {}
        }
    }
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
    let Some(tcp) = segment.get(..20) else { return Answer::Other };
    let (sport, dport) = (u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]));
    if from != *vip.ip() || sport != vip.port() || dport != local.port() {
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

fn socket6(kind: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET6, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by socket(2), owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr6(addr: SocketAddrV6) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain data; all zero is valid.
    let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_port = addr.port().to_be();
    sa.sin6_addr.s6_addr = addr.ip().octets();
    sa
}

/// As [`reserve_port`], on an IPv6 address.
fn reserve_port6(addr: Ipv6Addr) -> io::Result<(OwnedFd, u16)> {
    let fd = socket6(libc::SOCK_STREAM, 0)?;
    let sa = sockaddr6(SocketAddrV6::new(addr, 0, 0, 0));
    let mut bound = sa;
    let mut len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: `sa` and `bound` are sockaddr_in6 values that outlive the calls; the lengths
    // passed are theirs.
    unsafe {
        if libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_in6).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getsockname(fd.as_raw_fd(), (&mut bound as *mut libc::sockaddr_in6).cast(), &mut len) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((fd, u16::from_be(bound.sin6_port)))
}

/// Sends `inner` (an IPv6 packet) to `target` inside an IPv6 header the kernel adds.
fn send_tunnelled6(fd: &OwnedFd, target: Ipv6Addr, inner: &[u8]) -> io::Result<()> {
    let sa = sockaddr6(SocketAddrV6::new(target, 0, 0, 0));
    // SAFETY: `inner` and `sa` outlive the call; the lengths passed are theirs.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            inner.as_ptr().cast(),
            inner.len(),
            0,
            (&sa as *const libc::sockaddr_in6).cast(),
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`tunnel_syn_probe`] of an IPv6 target: the SYN goes inside an IPv6-in-IPv6 header.
fn tunnel_syn_probe6(target: Ipv6Addr, vip: SocketAddrV6, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let node = match crate::system::source_towards(IpAddr::V6(target)) {
        Ok(IpAddr::V6(node)) => node,
        Ok(other) => return Err(format!("an IPv4 source {other} towards target {target}")),
        Err(e) => return Err(format!("no route to target {target}: {e}")),
    };
    let (_reserved, port) = reserve_port6(node).map_err(|e| format!("reserving a port on {node}: {e}"))?;
    let local = SocketAddrV6::new(node, port, 0, 0);
    let tunnel = socket6(libc::SOCK_RAW, IPPROTO_IPV6_ENCAP).map_err(|e| format!("raw IPv6-in-IPv6 socket (needs CAP_NET_RAW): {e}"))?;
    let replies = socket6(libc::SOCK_RAW, libc::IPPROTO_TCP).map_err(|e| format!("raw TCP socket (needs CAP_NET_RAW): {e}"))?;
    let seq = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()) ^ u32::from(port) << 16;
    send_tunnelled6(&tunnel, target, &tcp_segment6(local, vip, seq, 0, TCP_SYN))
        .map_err(|e| format!("sending the check to {target}: {e}"))?;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no SYN-ACK from {vip} through target {target} within {}ms", timeout.as_millis()));
        }
        let tv = libc::timeval { tv_sec: left.as_secs() as libc::time_t, tv_usec: left.subsec_micros().max(1) as libc::suseconds_t };
        // SAFETY: all zero is a valid sockaddr_in6 to be filled.
        let mut from: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let mut from_len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
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
                (&mut from as *mut libc::sockaddr_in6).cast(),
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
        match answer6_to(&buf[..received as usize], Ipv6Addr::from(from.sin6_addr.s6_addr), local, vip, seq) {
            Answer::Accepted => {
                // Leave nothing half-open on the target.
                let _ = send_tunnelled6(&tunnel, target, &tcp_segment6(local, vip, seq.wrapping_add(1), 0, TCP_RST));
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
    }
}
