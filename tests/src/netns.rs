//! Network namespaces and veth pairs owned by a test.

use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{bail, Context, Result};

use crate::process::Process;

/// Prefix of every namespace the harness creates; `<prefix><pid>-<n>-<role>`.
const PREFIX: &str = "spltest-";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted (with its interfaces) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named after `role` and this process, with loopback up and IPv6
    /// off (so no router solicitations or MLD reports add packets the tests do not send).
    pub fn new(role: &str) -> Result<Self> {
        sweep_stale();
        let name = format!("{PREFIX}{}-{}-{role}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        for key in ["all", "default"] {
            ns.sysctl(&format!("net.ipv6.conf.{key}.disable_ipv6"), "1")?;
        }
        Ok(ns)
    }

    /// [`Netns::new`] with IPv6 on (for interfaces made from now on), without router
    /// solicitations, address autoconfiguration or duplicate address detection.
    pub fn new_dual_stack(role: &str) -> Result<Self> {
        let ns = Self::new(role)?;
        for key in ["all", "default", "lo"] {
            for (setting, value) in [("disable_ipv6", "0"), ("accept_ra", "0"), ("autoconf", "0"), ("router_solicitations", "0")] {
                ns.sysctl(&format!("net.ipv6.conf.{key}.{setting}"), value)?;
            }
            ns.sysctl(&format!("net.ipv6.conf.{key}.accept_dad"), "0")?;
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip -n <ns> <args>`, returning stdout.
    pub fn ip_output(&self, args: &[&str]) -> Result<String> {
        output(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self.command("sysctl").args(["-q", "-w", &format!("{key}={value}")]))
    }

    /// A command that runs inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs a command inside the namespace to completion; fails on a non-zero exit.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        output(self.command(program).args(args))
    }

    /// Starts a long-running process inside the namespace, killed on drop.
    pub fn spawn(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Result<Process> {
        let mut cmd = self.command(program);
        cmd.args(args);
        Process::spawn(cmd)
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens live in the
    /// namespace. (`setns` moves only the calling thread.)
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name)).with_context(|| format!("opening namespace {}", self.name))?;
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: `file` is an open namespace file descriptor; setns affects only
                    // this thread, which ends with the scope.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns into {}: {}", self.name, std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .map_err(|panic| anyhow::anyhow!("thread in {} panicked: {panic:?}", self.name))?
        })
    }

    /// Packets sent by `dev` so far (`tx_packets`).
    pub fn tx_packets(&self, dev: &str) -> Result<u64> {
        let json = self.ip_output(&["-s", "-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&json)?;
        v[0]["stats64"]["tx"]["packets"].as_u64().with_context(|| format!("no tx packet count for {dev} in {json}"))
    }

    /// Turns a device's TX checksum offload on or off (what `ethtool -K DEV tx off` does,
    /// through the legacy ETHTOOL_STXCSUM ioctl, so no ethtool binary is needed).
    pub fn set_tx_checksum(&self, dev: &str, on: bool) -> Result<()> {
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        const ETHTOOL_STXCSUM: u32 = 0x17;
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        if dev.len() >= libc::IFNAMSIZ {
            bail!("device name {dev} too long");
        }
        self.enter(|| {
            let mut value = EthtoolValue { cmd: ETHTOOL_STXCSUM, data: u32::from(on) };
            // SAFETY: a zeroed ifreq is valid; the name fits (checked above) with its NUL.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
                *d = s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
            // SAFETY: a datagram socket owned here; the ioctl reads `ifr` and the value it
            // points to, both alive for the call.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::ioctl(fd, SIOCETHTOOL, &mut ifr);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if rc != 0 {
                    return Err(err);
                }
            }
            Ok(())
        })?
        .with_context(|| format!("setting tx checksum offload of {dev} in {}", self.name))
    }

    /// One counter from `/proc/net/snmp` in this namespace, e.g. `("Tcp", "OutSegs")`.
    pub fn snmp(&self, group: &str, field: &str) -> Result<u64> {
        let text = self.enter(|| fs::read_to_string("/proc/thread-self/net/snmp"))??;
        snmp_field(&text, group, field)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// Plugs `dev` of `ns` (addressed `addr`) into the bridge `br0` of `fabric` as
/// `fabric_end`, with transmit checksum offload off on `dev` (XDP then sees whole
/// checksums, where veth would hand it partial ones).
pub fn bridge_port(fabric: &Netns, ns: &Netns, dev: &str, addr: &str, fabric_end: &str) -> Result<()> {
    ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", fabric_end, "netns", fabric.name()])?;
    if addr.contains(':') {
        ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"])?;
    } else {
        ns.ip(&["addr", "add", addr, "dev", dev])?;
    }
    ns.ip(&["link", "set", dev, "up"])?;
    fabric.ip(&["link", "set", fabric_end, "master", "br0"])?;
    fabric.ip(&["link", "set", fabric_end, "up"])?;
    ns.set_tx_checksum(dev, false)
}

/// A veth pair whose ends live in two namespaces (created there directly, so the names
/// never meet the host's interfaces). Deleted with either namespace.
pub struct Veth {
    pub a: String,
    pub b: String,
}

impl Veth {
    /// Creates `a_name` in `a` and `b_name` in `b`, addresses them (CIDR strings) and
    /// brings them up.
    pub fn create(a: &Netns, a_name: &str, a_addr: &str, b: &Netns, b_name: &str, b_addr: &str) -> Result<Self> {
        Self::create_with_queues(a, a_name, a_addr, b, b_name, b_addr, 1)
    }

    /// Like [`Veth::create`], with `queues` receive and transmit queues at each end (veth
    /// takes frames sent by XDP into the queue of the sending CPU, so one queue per CPU
    /// keeps CPUs from overflowing each other's ring).
    pub fn create_with_queues(a: &Netns, a_name: &str, a_addr: &str, b: &Netns, b_name: &str, b_addr: &str, queues: usize) -> Result<Self> {
        let q = queues.max(1).to_string();
        let per_end = ["numtxqueues", &q, "numrxqueues", &q];
        let mut args = vec!["link", "add", a_name];
        args.extend(per_end);
        args.extend(["type", "veth", "peer", "name", b_name]);
        args.extend(per_end);
        args.extend(["netns", b.name()]);
        a.ip(&args)?;
        for (ns, dev, addr) in [(a, a_name, a_addr), (b, b_name, b_addr)] {
            ns.ip(&["addr", "add", addr, "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        Ok(Self { a: a_name.into(), b: b_name.into() })
    }
}

/// Parses one field of `/proc/net/snmp` (a header line then a value line per group).
pub fn snmp_field(text: &str, group: &str, field: &str) -> Result<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(header), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {group} group in snmp");
    };
    let index = header.split_whitespace().position(|h| h == field).with_context(|| format!("no {group}.{field} in snmp"))?;
    let value = values.split_whitespace().nth(index).context("short snmp value line")?;
    Ok(value.parse()?)
}

/// Removes namespaces left by harness processes that no longer exist (killed with -9).
fn sweep_stale() {
    let Ok(entries) = fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snmp() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 2 64\nTcp: RtoAlgorithm OutSegs\nTcp: 1 42\n";
        assert_eq!(snmp_field(text, "Tcp", "OutSegs").unwrap(), 42);
        assert!(snmp_field(text, "Udp", "OutDatagrams").is_err());
    }
}
