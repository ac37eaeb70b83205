//! The side-by-side benchmarks of `splitter-bench` (tests/src/bin/splitter-bench.rs): the
//! splitter against nftables DNAT, plain routing, a bare XDP forwarder and HAProxy, on
//! testbeds in network namespaces this process creates and removes.
//!
//! - [`forward`]: 64-byte UDP forwarding, CPU per packet above an XDP_DROP floor, pps.
//! - [`connect`]: TCP connection rate and latency (short connections, many clients).
//! - [`connect_xdp`]: the same connections between stateless XDP endpoints (each
//!   balancer's own cost and rate).
//! - [`testrun`]: per-packet cost under BPF_PROG_TEST_RUN.
//! - [`weights`]: weight-change latency and packets lost during 1000 changes under load.
//! - [`memory`]: map memory at 1, 100 and 1000 gateways.
//! - [`killed_canary`]: a canary killed mid-rollout, 20 runs: time to the rollback.

pub mod cluster;
pub mod connect;
pub mod connect_xdp;
pub mod expiry;
pub mod flood;
pub mod forward;
pub mod killed_canary;

pub mod memory;
pub mod plot;
pub mod testrun;
pub mod topo;
pub mod weights;

use std::{
    fs,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Options shared by every section.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Shorter runs and fewer repetitions (a smoke run, about a quarter of the time).
    pub quick: bool,
}

/// Prints a progress line (stderr, so stdout stays the report).
pub fn say(message: impl AsRef<str>) {
    eprintln!("splitter-bench: {}", message.as_ref());
}

/// True when running as root (the namespace sections need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Installs the Debian packages that provide `tools` when one is missing (as root, with
/// apt-get), saying so on the output.
pub fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<(&str, &str)> = tools.iter().copied().filter(|(tool, _)| which(tool).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    if which("apt-get").is_none() || !is_root() {
        bail!("missing tools {:?}: install the packages {packages:?}", missing.iter().map(|m| m.0).collect::<Vec<_>>());
    }
    say(format!("installing {packages:?} with apt-get (missing {:?})", missing.iter().map(|m| m.0).collect::<Vec<_>>()));
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {packages:?} failed ({status})");
    }
    Ok(())
}

pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(std::path::PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_else(|_| "?".into())
}

/// CPU time accounting: per-CPU busy time from /proc/stat, the time of reaped children
/// (the generator), and the ksoftirqd threads (softirq work deferred out of the sender).
#[derive(Clone, Debug)]
pub struct CpuSample {
    at: Instant,
    /// Busy and total jiffies per CPU (busy = user + nice + system + irq + softirq).
    per_cpu: Vec<(u64, u64)>,
    /// User + system time of reaped children (RUSAGE_CHILDREN).
    children: Duration,
    /// utime + stime of each ksoftirqd/N, in clock ticks.
    ksoftirqd: Vec<u64>,
    /// User + system time of this process (all its threads).
    this: Duration,
}

/// Differences between two samples.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDelta {
    pub wall: Duration,
    /// Busy time of CPU 0 (where the generator and the whole veth path run).
    pub cpu0_busy: Duration,
    /// Busy time of all CPUs together.
    pub all_busy: Duration,
    /// Busy fraction of each other CPU (other load on the machine, the agent).
    pub others_busy_fraction: f64,
    /// Generator (reaped child) time plus ksoftirqd time on all CPUs.
    pub own: Duration,
    /// This process's own time (its threads: clients, servers) plus ksoftirqd time.
    pub this_and_softirq: Duration,
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

impl CpuSample {
    pub fn take() -> Self {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let mut per_cpu = Vec::new();
        for line in stat.lines() {
            let mut fields = line.split_whitespace();
            let Some(name) = fields.next() else { continue };
            if !name.starts_with("cpu") || name == "cpu" {
                continue;
            }
            let v: Vec<u64> = fields.map(|f| f.parse().unwrap_or(0)).collect();
            if v.len() < 8 {
                continue;
            }
            let busy = v[0] + v[1] + v[2] + v[5] + v[6];
            let total = busy + v[3] + v[4] + v[7];
            per_cpu.push((busy, total));
        }
        // SAFETY: a zeroed rusage is a valid out-parameter.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid rusage for the call to fill.
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        let children = tv(usage.ru_utime) + tv(usage.ru_stime);
        // SAFETY: as above.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        let this = tv(usage.ru_utime) + tv(usage.ru_stime);
        Self { at: Instant::now(), per_cpu, children, ksoftirqd: ksoftirqd_ticks(), this }
    }

    pub fn since(&self, before: &CpuSample) -> CpuDelta {
        let hz = clock_ticks();
        let ticks = |t: u64| Duration::from_nanos(t * 1_000_000_000 / hz);
        let cpu0_busy = ticks(self.per_cpu[0].0.saturating_sub(before.per_cpu[0].0));
        let mut others = Vec::new();
        for (now, then) in self.per_cpu.iter().zip(&before.per_cpu).skip(1) {
            let total = now.1.saturating_sub(then.1).max(1);
            others.push(now.0.saturating_sub(then.0) as f64 / total as f64);
        }
        let softirq: u64 = self.ksoftirqd.iter().zip(&before.ksoftirqd).map(|(a, b)| a.saturating_sub(*b)).sum();
        CpuDelta {
            wall: self.at - before.at,
            cpu0_busy,
            all_busy: ticks(self.per_cpu.iter().zip(&before.per_cpu).map(|(now, then)| now.0.saturating_sub(then.0)).sum()),
            others_busy_fraction: if others.is_empty() { 0.0 } else { others.iter().sum::<f64>() / others.len() as f64 },
            own: self.children.saturating_sub(before.children) + ticks(softirq),
            this_and_softirq: self.this.saturating_sub(before.this) + ticks(softirq),
        }
    }
}

/// utime + stime of a process (all its threads), from /proc.
pub fn process_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks())
}

fn ksoftirqd_ticks() -> Vec<u64> {
    let mut out = Vec::new();
    for cpu in 0.. {
        let Some(pid) = ksoftirqd_pid(cpu) else { break };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command (in parentheses): state is field 3; utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
        out.push(f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0));
    }
    out
}

fn ksoftirqd_pid(cpu: usize) -> Option<u32> {
    use std::sync::OnceLock;
    static PIDS: OnceLock<Vec<u32>> = OnceLock::new();
    let pids = PIDS.get_or_init(|| {
        let mut found: Vec<(usize, u32)> = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if let Some(n) = comm.trim().strip_prefix("ksoftirqd/").and_then(|n| n.parse().ok()) {
                found.push((n, pid));
            }
        }
        found.sort();
        found.into_iter().map(|(_, pid)| pid).collect()
    });
    pids.get(cpu).copied()
}

/// The value at `percent` of sorted values (nearest rank).
pub fn percentile<T: Copy>(sorted: &[T], percent: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * percent / 100.0).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Median, smallest and largest of `values` (sorted in place).
pub fn median_and_spread(values: &mut [f64]) -> (f64, f64, f64) {
    let mid = median(values);
    (mid, values.first().copied().unwrap_or(f64::NAN), values.last().copied().unwrap_or(f64::NAN))
}

/// `1234567` -> `1 234 567` (thin grouping for tables).
pub fn group(n: f64) -> String {
    let n = n.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// One measured figure against a target, for the summary.
#[derive(Clone, Debug)]
pub struct TargetCheck {
    pub what: String,
    pub measured: String,
    pub target: String,
    pub met: bool,
    pub note: String,
    /// A figure shown beside a target whose condition it does not meet (the verdict is
    /// the note, not met or missed).
    pub context: bool,
}

/// The structured results of the sections that ran, for the summary and the plot.
#[derive(Default)]
pub struct Figures {
    pub forward: Option<forward::ForwardResults>,
    pub connect: Option<connect::ConnectResults>,
    pub connect_xdp: Option<connect_xdp::Results>,
    pub testrun: Option<testrun::TestRunResults>,
    pub weights: Option<weights::WeightResults>,
    pub memory: Option<memory::MemoryResults>,
}

impl Figures {
    /// Every target of the issue that the sections measured, with the verdict.
    pub fn checks(&self) -> Vec<TargetCheck> {
        let mut out = Vec::new();
        if let Some(f) = &self.forward {
            out.extend(f.checks());
        }
        if let Some(c) = &self.connect {
            out.extend(c.checks());
        }
        if let Some(c) = &self.connect_xdp {
            out.extend(c.checks());
        }
        if let Some(t) = &self.testrun {
            out.extend(t.checks());
        }
        if let Some(w) = &self.weights {
            out.extend(w.checks());
        }
        out
    }
}
