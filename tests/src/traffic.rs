//! Traffic for namespace tests: real HTTP connections in the background, a private bpffs
//! for pins that outlive an agent, and a spoofed SYN flood sent from one core.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    frames::{self, Ipv4Packet, TCP_SYN},
    testbed::{http_get, TempDir, VIP},
    Netns,
};

/// Client traffic in the background: new HTTP connections to the VIP's port 9050 one
/// after another, each answer counted; every failure recorded with when it happened.
pub struct HttpTraffic {
    pub stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    /// (milliseconds since the traffic started, error).
    pub failures: Arc<Mutex<Vec<(u64, String)>>>,
    /// Milliseconds since the start of each successful request.
    pub successes: Arc<Mutex<Vec<u64>>>,
    pub started: Instant,
    handle: Option<thread::JoinHandle<()>>,
}

impl HttpTraffic {
    /// Starts it from the client namespace `client`.
    pub fn start(client: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let successes = Arc::new(Mutex::new(Vec::new()));
        let ns = client.name().to_string();
        let (s, o, f, w) = (stop.clone(), ok.clone(), failures.clone(), successes.clone());
        let started = Instant::now();
        let handle = thread::spawn(move || {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            // SAFETY: a namespace descriptor; setns moves only this thread.
            assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            // Bounded: at most 5 minutes or 200k requests, whichever comes first.
            let deadline = Instant::now() + Duration::from_secs(300);
            for _ in 0..200_000 {
                if s.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let at = started.elapsed().as_millis() as u64;
                match http_get(&format!("{VIP}:9050"), None) {
                    Ok(_) => {
                        o.fetch_add(1, Ordering::Relaxed);
                        w.lock().unwrap().push(at);
                    }
                    Err(e) => f.lock().unwrap().push((at, format!("{e:#}"))),
                }
            }
        });
        Self { stop, ok, failures, successes, started, handle: Some(handle) }
    }

    /// Stops the traffic; returns (successful requests, failures as text).
    pub fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            handle.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().iter().map(|(at, e)| format!("{at} ms after start: {e}")).collect();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

impl Drop for HttpTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A BPF filesystem mounted by the test (outside the agent's `ip netns exec`, so pins
/// outlive the agent), unmounted on drop.
pub struct Bpffs {
    pub dir: TempDir,
}

impl Bpffs {
    pub fn mount() -> Self {
        let dir = TempDir::new("bpffs").unwrap();
        let status = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()).status().unwrap();
        assert!(status.success(), "mounting a bpffs");
        Self { dir }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The MAC address of `dev` in `ns`.
pub fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let out = ns.ip_output(&["-o", "link", "show", "dev", dev])?;
    let text = out.split("link/ether ").nth(1).context("no link/ether")?.split_whitespace().next().context("no MAC")?;
    let mut mac = [0u8; 6];
    for (slot, part) in mac.iter_mut().zip(text.split(':')) {
        *slot = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// What a flood sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodReport {
    pub frames: u64,
    pub seconds: f64,
}

impl FloodReport {
    pub fn per_second(&self) -> f64 {
        self.frames as f64 / self.seconds.max(1e-9)
    }
}

/// Sends spoofed TCP SYNs to `dst:port` from `ns`'s `dev` (next hop `dst_mac`), from
/// sources 10.92.x.y with random ports, as fast as one core can for `duration` (at most
/// `max_frames`), on a packet socket: no handshake will ever complete. Bounded in time
/// and count.
pub fn syn_flood(
    ns: &Netns,
    dev: &str,
    dst_mac: [u8; 6],
    dst: Ipv4Addr,
    port: u16,
    duration: Duration,
    max_frames: u64,
) -> Result<FloodReport> {
    let src_mac = mac_of(ns, dev)?;
    let ifindex: i32 = ns.ip_output(&["-o", "link", "show", "dev", dev])?.split(':').next().context("ifindex")?.trim().parse()?;
    ns.enter(|| -> Result<FloodReport> {
        // SAFETY: plain socket(2) call; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_IP as u16).to_be() as i32) };
        if fd < 0 {
            bail!("packet socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned by socket(2), owned from here on.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; fields set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = ifindex;
        // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(socket.as_raw_fd(), (&addr as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
        };
        if rc != 0 {
            bail!("binding the packet socket to {dev}: {}", std::io::Error::last_os_error());
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < max_frames && start.elapsed() < duration {
            // A batch between clock reads.
            for _ in 0..256 {
                let r = next();
                let src = Ipv4Addr::new(10, 92, (r >> 8) as u8, (r >> 16) as u8 | 1);
                let sport = 1024 + (r >> 24) as u16 % 60000;
                let mut frame = Ipv4Packet::new(src, dst, 6, frames::tcp(sport, port, TCP_SYN, b"")).build();
                frame[0..6].copy_from_slice(&dst_mac);
                frame[6..12].copy_from_slice(&src_mac);
                // SAFETY: `frame` is a valid buffer of the length passed.
                let n = unsafe { libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                if n > 0 {
                    sent += 1;
                }
            }
        }
        Ok(FloodReport { frames: sent, seconds: start.elapsed().as_secs_f64() })
    })?
}

/// What a flood did to a service: the flood itself, new connections during it and in the
/// window after it, and the long-lived connections opened before it.
#[derive(Clone, Debug, Default)]
pub struct FloodOutcome {
    pub flood: FloodReport,
    pub during_ok: usize,
    pub during_failed: Vec<(u64, String)>,
    pub after_ok: usize,
    pub after_failed: Vec<(u64, String)>,
    /// Long-lived connections that stopped answering, and that answered from another backend.
    pub established_broken: usize,
    pub established_moved: usize,
    /// Milliseconds from the flood's end to the start of the first success after which
    /// no connection failed (none: failures until the end of the window).
    pub recovered_after_ms: Option<u64>,
}

/// Opens `established` long-lived connections to `VIP:9050` from `client`, runs new
/// connections one after another, floods `dst_mac` through `dev` for `duration`, then
/// watches `after` more; checks the long-lived connections at the end.
pub fn flood_scenario(
    client: &Netns,
    dev: &str,
    dst_mac: [u8; 6],
    established: usize,
    duration: Duration,
    after: Duration,
) -> Result<FloodOutcome> {
    let addr = format!("{VIP}:9050");
    let mut long_lived: Vec<(crate::testbed::LineClient, String)> = client.enter(|| -> Result<Vec<_>> {
        (0..established)
            .map(|_| {
                let mut c = crate::testbed::LineClient::connect(&addr)?;
                let first = c.ask()?;
                Ok((c, first))
            })
            .collect()
    })??;
    let traffic = HttpTraffic::start(client);
    thread::sleep(Duration::from_secs(1));
    let from = traffic.started.elapsed().as_millis() as u64;
    let flood = syn_flood(client, dev, dst_mac, VIP.parse()?, 9050, duration, 20_000_000)?;
    let to = traffic.started.elapsed().as_millis() as u64;
    let (mut broken, mut moved) = (0, 0);
    for (c, first) in &mut long_lived {
        match c.ask() {
            Ok(answer) if answer == *first => {}
            Ok(_) => moved += 1,
            Err(_) => broken += 1,
        }
    }
    thread::sleep(after);
    let end = traffic.started.elapsed().as_millis() as u64;
    let failures = traffic.failures.lock().unwrap().clone();
    let successes = traffic.successes.lock().unwrap().clone();
    drop(traffic);
    let in_window = |t: u64, a: u64, b: u64| (a..b).contains(&t);
    let last_failure = failures.iter().map(|(t, _)| *t).filter(|t| *t < end).max();
    let recovered_after_ms = match last_failure {
        None => Some(0),
        Some(t) if t < to => Some(0),
        Some(t) => successes.iter().copied().filter(|s| *s > t && *s < end).min().map(|s| s - to),
    };
    Ok(FloodOutcome {
        flood,
        during_ok: successes.iter().filter(|t| in_window(**t, from, to)).count(),
        during_failed: failures.iter().filter(|(t, _)| in_window(*t, from, to)).cloned().collect(),
        after_ok: successes.iter().filter(|t| in_window(**t, to, end)).count(),
        after_failed: failures.iter().filter(|(t, _)| in_window(*t, to, end)).cloned().collect(),
        established_broken: broken,
        established_moved: moved,
        recovered_after_ms,
    })
}
