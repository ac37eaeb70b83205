//! Forwarding: 64-byte UDP frames over 1000 flows from trafgen (CPU 0) through the middle
//! namespace to a sink that drops in XDP, for each system in turn on the same testbed,
//! in interleaved rounds. The figure is CPU per delivered packet above the floor (XDP_DROP
//! at the middle's ingress) of the same round, with packets per second beside it.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result};

use super::{
    group, median, say,
    topo::{ForwardBed, BACKENDS, BACKENDS6, UDP_PORT, VIP, VIP6},
    Options, TargetCheck,
};
use splitter_tests::{process::Process, testbed::XdpAttachment};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    Floor,
    Floor6,
    Routing,
    BareXdp,
    SplitterFullNat,
    SplitterDnat,
    SplitterDsr,
    SplitterFullNat6,
    SplitterDsr6,
    Nftables,
}

impl System {
    pub const ALL: [System; 10] = [
        System::Floor,
        System::Floor6,
        System::Routing,
        System::BareXdp,
        System::SplitterFullNat,
        System::SplitterDnat,
        System::SplitterDsr,
        System::SplitterFullNat6,
        System::SplitterDsr6,
        System::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            System::Floor => "XDP_DROP at the middle's ingress (floor; the generator's ceiling)",
            System::Floor6 => "XDP_DROP at the middle's ingress, IPv6 frames (the IPv6 rows' floor; 62-byte frames)",
            System::Routing => "plain kernel routing, no balancing",
            System::BareXdp => "bare XDP forwarder (`xdp_forward`: FIB + MAC rewrite + redirect)",
            System::SplitterFullNat => "**splitter, full NAT** (native XDP)",
            System::SplitterDnat => "**splitter, DNAT** (native XDP)",
            System::SplitterDsr => "**splitter, DSR** (native XDP, IP in IP to the target)",
            System::SplitterFullNat6 => "**splitter, full NAT, IPv6** (native XDP; 62-byte frames)",
            System::SplitterDsr6 => "**splitter, DSR, IPv6** (native XDP, IPv6 in IPv6 to the target; 62-byte frames)",
            System::Nftables => "nftables weighted DNAT (numgen + conntrack)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            System::Floor => "floor (XDP_DROP)",
            System::Floor6 => "floor v6 (XDP_DROP)",
            System::Routing => "kernel routing",
            System::BareXdp => "bare XDP fwd",
            System::SplitterFullNat => "splitter fullnat",
            System::SplitterDnat => "splitter dnat",
            System::SplitterDsr => "splitter dsr",
            System::SplitterFullNat6 => "splitter fullnat v6",
            System::SplitterDsr6 => "splitter dsr v6",
            System::Nftables => "nftables DNAT",
        }
    }

    /// Where the generator sends: the VIP for the balancers, a backend otherwise.
    fn destination(self) -> &'static str {
        match self {
            System::SplitterFullNat | System::SplitterDnat | System::SplitterDsr | System::Nftables => VIP,
            System::Floor6 | System::SplitterFullNat6 | System::SplitterDsr6 => VIP6,
            _ => BACKENDS[0],
        }
    }

    fn ipv6(self) -> bool {
        matches!(self, System::Floor6 | System::SplitterFullNat6 | System::SplitterDsr6)
    }

    /// A floor row: XDP_DROP at the middle's ingress, what the others are measured above.
    pub fn is_floor(self) -> bool {
        matches!(self, System::Floor | System::Floor6)
    }

    /// The floor this system is measured above: the one of its own frames.
    fn floor(self) -> System {
        if self.ipv6() {
            System::Floor6
        } else {
            System::Floor
        }
    }
}

/// What a system leaves set up while it is measured.
enum Setup {
    Nothing,
    Xdp(#[expect(dead_code, reason = "held so the program stays attached until the setup is dropped")] XdpAttachment),
    Agent(Process),
    Nft,
}

pub fn gateway_yaml(mode: &str) -> String {
    format!(
        "name: bench\nport: {UDP_PORT}/udp\nvirtual_address: {VIP}\nmode: {mode}\nroutes:\n  bench/a:\n    weight: 90%\n    \
         targets: [{}:{UDP_PORT}]\n  bench/b:\n    weight: 10%\n    targets: [{}:{UDP_PORT}]\n",
        BACKENDS[0], BACKENDS[1]
    )
}

/// [`gateway_yaml`] of an IPv6 gateway.
pub fn gateway_yaml6(mode: &str) -> String {
    format!(
        "name: bench6\nport: {UDP_PORT}/udp\nvirtual_address: {VIP6}\nmode: {mode}\nroutes:\n  bench/a:\n    weight: 90%\n    \
         targets: [\"[{}]:{UDP_PORT}\"]\n  bench/b:\n    weight: 10%\n    targets: [\"[{}]:{UDP_PORT}\"]\n",
        BACKENDS6[0], BACKENDS6[1]
    )
}

fn nft_ruleset() -> String {
    format!(
        "table ip bench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {VIP} udp dport {UDP_PORT} dnat to numgen random mod 100 map {{ 0-89 : {}, 90-99 : {} }}\n  }}\n}}\n",
        BACKENDS[0], BACKENDS[1]
    )
}

fn set_up(bed: &ForwardBed, system: System) -> Result<Setup> {
    Ok(match system {
        System::Floor | System::Floor6 => Setup::Xdp(XdpAttachment::attach(&bed.mid, "spl-c", "xdp_drop")?),
        System::Routing => Setup::Nothing,
        System::BareXdp => Setup::Xdp(XdpAttachment::attach(&bed.mid, "spl-c", "xdp_forward")?),
        System::SplitterFullNat => Setup::Agent(bed.start_agent(&gateway_yaml("fullnat"), &["--ephemeral"])?),
        System::SplitterDnat => Setup::Agent(bed.start_agent(&gateway_yaml("dnat"), &["--ephemeral"])?),
        System::SplitterDsr => Setup::Agent(bed.start_agent(&gateway_yaml("dsr"), &["--ephemeral"])?),
        System::SplitterFullNat6 => Setup::Agent(bed.start_agent(&gateway_yaml6("fullnat"), &["--ephemeral"])?),
        System::SplitterDsr6 => Setup::Agent(bed.start_agent(&gateway_yaml6("dsr"), &["--ephemeral"])?),
        System::Nftables => {
            bed.nft(&nft_ruleset())?;
            Setup::Nft
        }
    })
}

fn tear_down(bed: &ForwardBed, setup: Setup) -> Result<()> {
    match setup {
        Setup::Agent(agent) => {
            agent.signal(libc::SIGTERM)?;
            let (code, lines) = agent.wait(Duration::from_secs(15))?;
            if code != 0 {
                say(format!("agent exited {code}: {}", lines.join("\n")));
            }
        }
        Setup::Nft => {
            bed.mid.run("nft", &["delete", "table", "ip", "bench"])?;
        }
        Setup::Xdp(_) | Setup::Nothing => {}
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct Row {
    pub system: System,
    pub pps: f64,
    /// CPU per delivered packet (µs), the generator's and deferred softirq time.
    pub cost_us: f64,
    /// Same, from CPU 0's busy time in /proc/stat.
    pub cpu0_cost_us: f64,
    /// `cost_us` minus the floor's (of the same frames) of the same round (µs), the median.
    pub marginal_us: f64,
    /// The lowest and highest of the rounds' `marginal_us`.
    pub marginal_range: (f64, f64),
    pub delivered_fraction: f64,
}

pub struct ForwardResults {
    pub rows: Vec<Row>,
    pub rounds: usize,
    pub seconds: u64,
    pub others_busy: f64,
    pub profiles: Vec<(System, String)>,
}

impl ForwardResults {
    pub fn row(&self, system: System) -> Option<&Row> {
        self.rows.iter().find(|r| r.system == system)
    }

    pub fn checks(&self) -> Vec<TargetCheck> {
        let mut out = Vec::new();
        let (Some(nft), Some(bare)) = (self.row(System::Nftables), self.row(System::BareXdp)) else { return out };
        for system in [System::SplitterFullNat, System::SplitterDnat] {
            let Some(s) = self.row(system) else { continue };
            let vs_nft = s.marginal_us / nft.marginal_us;
            let vs_bare = s.marginal_us / bare.marginal_us;
            out.push(TargetCheck {
                what: format!("forwarding cost above the floor, {} vs nftables DNAT", system.short()),
                measured: format!("{:.3} µs vs {:.3} µs = {vs_nft:.2}x", s.marginal_us, nft.marginal_us),
                target: "≤ 0.5x".into(),
                met: vs_nft <= 0.5,
                note: if vs_nft <= 0.5 { String::new() } else { format!("missed by {:.0}%", (vs_nft / 0.5 - 1.0) * 100.0) },
                context: false,
            });
            out.push(TargetCheck {
                what: format!("forwarding cost above the floor, {} vs bare XDP forwarder", system.short()),
                measured: format!("{:.3} µs vs {:.3} µs = {vs_bare:.2}x", s.marginal_us, bare.marginal_us),
                target: "≤ 1.0x".into(),
                met: vs_bare <= 1.0,
                note: if vs_bare <= 1.0 { String::new() } else { format!("missed by {:.0}%", (vs_bare - 1.0) * 100.0) },
                context: false,
            });
        }
        // Against IPv4 full NAT: DSR of either family no dearer, IPv6 full NAT within 1.15x.
        let Some(full) = self.row(System::SplitterFullNat) else { return out };
        for (system, limit) in [(System::SplitterDsr, 1.0), (System::SplitterDsr6, 1.0), (System::SplitterFullNat6, 1.15)] {
            let Some(row) = self.row(system) else { continue };
            let ratio = row.marginal_us / full.marginal_us;
            out.push(TargetCheck {
                what: format!("forwarding cost above the floor, {} vs splitter fullnat", system.short()),
                measured: format!("{:.3} µs vs {:.3} µs = {ratio:.2}x", row.marginal_us, full.marginal_us),
                target: format!("≤ {limit:.2}x"),
                met: ratio <= limit,
                note: if ratio <= limit { String::new() } else { format!("missed by {:.0}%", (ratio / limit - 1.0) * 100.0) },
                context: false,
            });
        }
        out
    }
}

pub fn run(opts: Options) -> Result<ForwardResults> {
    super::ensure_tools(&[("trafgen", "netsniff-ng"), ("nft", "nftables"), ("ethtool", "ethtool"), ("taskset", "util-linux")])?;
    let rounds = if opts.quick { 1 } else { 9 };
    let seconds = if opts.quick { 2 } else { 4 };
    let flows = 1000;
    let bed = ForwardBed::new()?;
    let mut per_system: Vec<(System, Vec<super::topo::Run>)> = System::ALL.iter().map(|s| (*s, Vec::new())).collect();
    let mut others = Vec::new();
    for round in 0..rounds {
        for system in System::ALL {
            say(format!("forward round {}/{rounds}: {}", round + 1, system.short()));
            let config = if system.ipv6() {
                bed.trafgen_config6(system.destination(), flows)?
            } else {
                bed.trafgen_config(system.destination(), flows)?
            };
            let setup = set_up(&bed, system)?;
            let result = (|| -> Result<super::topo::Run> {
                // Warm-up: every flow's first packet (conntrack entries), caches.
                bed.send(&config, 20_000)?;
                std::thread::sleep(Duration::from_millis(200));
                if system.is_floor() {
                    bed.measure(&config, Duration::from_secs(seconds), || bed.mid_ingress_drops())
                } else {
                    bed.measure(&config, Duration::from_secs(seconds), || bed.sink_count())
                }
            })();
            tear_down(&bed, setup)?;
            let run = result.with_context(|| format!("measuring {}", system.short()))?;
            say(format!(
                "  {} pps, {:.3} µs/packet (cpu0 busy {:.3}), delivered {}/{} sent, other CPU {:.0}% busy",
                group(run.pps()),
                run.cost_us(),
                run.cpu0_cost_us(),
                run.delivered,
                run.sent,
                run.cpu.others_busy_fraction * 100.0
            ));
            others.push(run.cpu.others_busy_fraction);
            per_system.iter_mut().find(|(s, _)| *s == system).unwrap().1.push(run);
        }
    }
    let floor_costs = |floor: System| -> Vec<f64> {
        per_system.iter().find(|(s, _)| *s == floor).map(|(_, runs)| runs.iter().map(|r| r.cost_us()).collect()).unwrap_or_default()
    };
    let rows = per_system
        .iter()
        .map(|(system, runs)| {
            let floors = floor_costs(system.floor());
            let mut pps: Vec<f64> = runs.iter().map(|r| r.pps()).collect();
            let mut cost: Vec<f64> = runs.iter().map(|r| r.cost_us()).collect();
            let mut cpu0: Vec<f64> = runs.iter().map(|r| r.cpu0_cost_us()).collect();
            let mut marginal: Vec<f64> = runs.iter().zip(&floors).map(|(r, f)| r.cost_us() - f).collect();
            let mut fraction: Vec<f64> = runs.iter().map(|r| r.delivered as f64 / r.sent.max(1) as f64).collect();
            let marginal_range = marginal.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), m| (lo.min(*m), hi.max(*m)));
            Row {
                system: *system,
                pps: median(&mut pps),
                cost_us: median(&mut cost),
                cpu0_cost_us: median(&mut cpu0),
                marginal_us: median(&mut marginal),
                marginal_range,
                delivered_fraction: median(&mut fraction),
            }
        })
        .collect();
    let profiles = if opts.quick { Vec::new() } else { profile(&bed, flows)? };
    Ok(ForwardResults { rows, rounds, seconds, others_busy: median(&mut others), profiles })
}

/// A flat CPU profile (perf, software clock, CPU 0) of a few systems while they forward.
fn profile(bed: &ForwardBed, flows: u32) -> Result<Vec<(System, String)>> {
    if super::which("perf").is_none() {
        return Ok(Vec::new());
    }
    let jit_kallsyms = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_kallsyms").unwrap_or_default();
    let _ = std::fs::write("/proc/sys/net/core/bpf_jit_kallsyms", "1");
    let mut out = Vec::new();
    for system in [System::BareXdp, System::SplitterFullNat, System::SplitterFullNat6, System::Nftables] {
        say(format!("profiling {}", system.short()));
        let config = if system.ipv6() {
            bed.trafgen_config6(system.destination(), flows)?
        } else {
            bed.trafgen_config(system.destination(), flows)?
        };
        let setup = set_up(bed, system)?;
        let text = (|| -> Result<String> {
            bed.send(&config, 20_000)?;
            let data = bed.run.path().join("perf.data");
            let generator = bed.spawn_trafgen(&config, None, None)?;
            std::thread::sleep(Duration::from_millis(300));
            let rec = Command::new("perf")
                .args(["record", "-q", "-e", "cpu-clock", "-F", "4000", "-C", "0", "-o"])
                .arg(&data)
                .args(["--", "sleep", "2"])
                .output()?;
            super::topo::stop_trafgen(&generator)?;
            let _ = generator.wait(Duration::from_secs(20))?;
            if !rec.status.success() {
                return Ok(format!("perf record failed: {}", String::from_utf8_lossy(&rec.stderr).trim()));
            }
            let rep = Command::new("perf")
                .args(["report", "-q", "--stdio", "--sort", "sym", "--percent-limit", "1.5", "-i"])
                .arg(&data)
                .output()?;
            let text = String::from_utf8_lossy(&rep.stdout);
            Ok(text.lines().filter(|l| !l.trim().is_empty()).take(18).map(|l| l.trim().to_string()).collect::<Vec<_>>().join("\n"))
        })();
        tear_down(bed, setup)?;
        out.push((system, text.unwrap_or_else(|e| format!("profile failed: {e:#}"))));
    }
    if !jit_kallsyms.trim().is_empty() {
        let _ = std::fs::write("/proc/sys/net/core/bpf_jit_kallsyms", jit_kallsyms.trim());
    }
    Ok(out)
}

pub fn section(r: &ForwardResults) -> String {
    let floor = r.row(System::Floor).map_or(f64::NAN, |f| f.cost_us);
    let nft = r.row(System::Nftables).map_or(f64::NAN, |x| x.marginal_us);
    let bare = r.row(System::BareXdp).map_or(f64::NAN, |x| x.marginal_us);
    let mut rows = String::new();
    for row in &r.rows {
        let (marginal, vs_nft, vs_bare) = if row.system == System::Floor {
            ("—".to_string(), "—".to_string(), "—".to_string())
        } else if row.system.is_floor() {
            (format!("{:+.3} (above the IPv4 floor)", row.cost_us - floor), "—".to_string(), "—".to_string())
        } else {
            let (lo, hi) = row.marginal_range;
            (
                format!("{:+.3} ({lo:+.3} to {hi:+.3})", row.marginal_us),
                format!("{:.2}x", row.marginal_us / nft),
                format!("{:.2}x", row.marginal_us / bare),
            )
        };
        rows.push_str(&format!(
            "| {} | {} | {:.3} | {} | {} | {} | {:.3} | {:.1}% |\n",
            row.system.label(),
            group(row.pps),
            row.cost_us,
            marginal,
            vs_nft,
            vs_bare,
            row.cpu0_cost_us,
            row.delivered_fraction * 100.0
        ));
    }
    let mut profiles = String::new();
    for (system, text) in &r.profiles {
        profiles.push_str(&format!("\n{} (perf, software clock, CPU 0, symbols ≥ 1.5%):\n\n```text\n{text}\n```\n", system.short()));
    }
    format!(
        "trafgen (netsniff-ng) pinned to CPU 0 sends 64-byte UDP frames (60 bytes + FCS) over 1000 flows \
         (source ports 10000-10999) from the generator namespace into the middle one; the sink's veth drops \
         every frame in XDP and counts it, so the backends' stack is not counted. Each system runs on the same \
         testbed in turn, {rounds} interleaved round(s) of {seconds} s each, after a 20 000-packet warm-up \
         (every flow's first packet). **CPU/packet** is the generator's CPU time plus ksoftirqd's, divided \
         by the packets that reached the sink (the whole veth path runs in the sender's softirq context on \
         CPU 0); **above floor** subtracts the same figure for XDP_DROP at the middle's ingress in the same \
         round, of the same frames (IPv6 rows above the IPv6 floor): the median of the rounds, the lowest and \
         highest in brackets. The other columns show the median of the rounds. `CPU 0 busy` is the cross-check from /proc/stat. The \
         agent runs pinned to CPU 1.\n\n\
         | system | packets/s | CPU µs/packet | above floor (µs) | vs nftables | vs bare XDP | CPU 0 busy µs/packet | delivered |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n{rows}\n\
         The floor is {floor:.3} µs per packet; the other CPU was {:.0}% busy (median) while these ran.\n{profiles}",
        r.others_busy * 100.0,
        rounds = r.rounds,
        seconds = r.seconds,
    )
}
