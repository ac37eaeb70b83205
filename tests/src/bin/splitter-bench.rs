//! `splitter-bench [SECTION ...] [--quick] [--no-write]`: runs benchmarks, prints their
//! figures and refreshes their sections of docs/BENCHMARKS.md (each section is replaced
//! whole; the rest of the file is kept), plus the summary and the throughput plot
//! (docs/benchmarks-throughput.svg) when a throughput section ran.
//!
//! Sections (default: all):
//! - `forward`: 64-byte UDP forwarding through the splitter (full NAT, DNAT), nftables DNAT,
//!   kernel routing and a bare XDP forwarder: CPU per packet above an XDP_DROP floor, pps.
//! - `connect`: TCP connection rate and latency through the splitter, nftables, HAProxy.
//! - `connect-xdp`: the same connections between stateless XDP endpoints (each balancer's
//!   own cost per connection, and the rate it reaches).
//! - `testrun`: per-packet cost under BPF_PROG_TEST_RUN.
//! - `weights`: weight-change latency and packets lost during 1000 changes under load.
//! - `memory`: map memory at 1, 100 and 1000 gateways.
//! - `expiry`, `flood`: the agent's cost with conntrack full; a spoofed SYN flood.
//! - `killed-canary`: a canary killed mid-rollout, 20 runs: time to the rollback.
//! - `cluster`: three agents on one etcd: a weight change on one node until the others
//!   show it, 100 changes.
//! - `table`: bucket table build time for 1, 8 and 64 targets, and slots moved by changes.
//!
//! Everything but `table` needs root (namespaces, XDP); missing tools (trafgen from
//! netsniff-ng, nft, haproxy, ethtool) are installed with apt-get. Run through
//! `cargo xtask bench [-- ARGS]` (builds everything first), or directly:
//! `cargo run --release -p splitter-tests --bin splitter-bench -- forward --quick`.

#[path = "../bench/mod.rs"]
mod bench;

use std::{
    env, fs,
    hint::black_box,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bench::{Figures, Options};
use splitter_common::table::{build_bucket_table, TableTarget, BUCKET_TABLE_SIZE};

/// A benchmark: its name on the command line and the function that runs it.
struct Benchmark {
    name: &'static str,
    /// Needs root (namespaces, BPF).
    privileged: bool,
    run: fn(Options, &mut Figures) -> anyhow::Result<Section>,
}

/// One section of docs/BENCHMARKS.md: a `## title` heading and its Markdown body.
struct Section {
    title: &'static str,
    body: String,
}

const BENCHMARKS: &[Benchmark] = &[
    Benchmark { name: "forward", privileged: true, run: forward },
    Benchmark { name: "connect", privileged: true, run: connect },
    Benchmark { name: "connect-xdp", privileged: true, run: connect_xdp },
    Benchmark { name: "testrun", privileged: true, run: testrun },
    Benchmark { name: "weights", privileged: true, run: weights },
    Benchmark { name: "memory", privileged: true, run: memory },
    Benchmark { name: "expiry", privileged: true, run: expiry },
    Benchmark { name: "flood", privileged: true, run: flood },
    Benchmark { name: "killed-canary", privileged: true, run: killed_canary },
    Benchmark { name: "cluster", privileged: true, run: cluster },
    Benchmark { name: "table", privileged: false, run: |_, _| Ok(table_build()) },
];

const USAGE: &str = "usage: splitter-bench [SECTION ...|all] [--quick] [--no-write]

Runs the benchmarks (default: all), prints their figures and refreshes their sections of
docs/BENCHMARKS.md, the summary and docs/benchmarks-throughput.svg (--no-write: print only).
--quick: shorter runs and fewer repetitions (a smoke run).

sections:
  forward  64-byte UDP forwarding: splitter (full NAT, DNAT), nftables DNAT, kernel routing,
           bare XDP forwarder; CPU per packet above an XDP_DROP floor, packets/s (root)
  connect  TCP connection rate and latency: splitter, nftables DNAT, HAProxy (root)
  connect-xdp
           the same connections between stateless XDP clients and backends: each
           balancer's own CPU per connection and the rate it reaches (root)
  testrun  per-packet cost under BPF_PROG_TEST_RUN (root)
  weights  weight-change latency, packets lost during 1000 changes under load (root)
  memory   map memory at 1, 100 and 1000 gateways (root)
  expiry   the agent's CPU with conntrack full (the sweep and occupancy reads) (root)
  flood    a spoofed SYN flood from one core: splitter vs nftables DNAT (root)
  killed-canary
           a canary killed mid-rollout, 20 runs: time to the rollback, failed requests (root)
  cluster  three agents on one etcd: weight change on node 0 until nodes 1 and 2 show it,
           100 changes (root; etcd-server installed with apt-get)
  table    bucket table build time for 1, 8 and 64 targets; slots moved by changes";

fn main() -> ExitCode {
    let mut write = true;
    let mut quick = false;
    let mut chosen: Vec<&Benchmark> = Vec::new();
    for arg in env::args().skip(1) {
        match arg.as_str() {
            "--no-write" => write = false,
            "--quick" => quick = true,
            "all" => chosen.extend(BENCHMARKS.iter()),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            name => match BENCHMARKS.iter().find(|benchmark| benchmark.name == name) {
                Some(benchmark) => chosen.push(benchmark),
                None => {
                    eprintln!("splitter-bench: unknown section {name:?}\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
        }
    }
    if chosen.is_empty() {
        chosen = BENCHMARKS.iter().collect();
    }
    chosen.dedup_by_key(|b| b.name);
    let opts = Options { quick };
    let started = Instant::now();
    let load_before = bench::loadavg();
    let mut figures = Figures::default();
    let mut failed = Vec::new();
    let mut sections = Vec::new();
    for benchmark in chosen {
        if benchmark.privileged && !bench::is_root() {
            eprintln!("SKIPPED {}: needs root (network namespaces, XDP, BPF_PROG_TEST_RUN)", benchmark.name);
            continue;
        }
        let load = bench::loadavg();
        let section_start = Instant::now();
        bench::say(format!("section {} (load average {load})", benchmark.name));
        match (benchmark.run)(opts, &mut figures) {
            Ok(mut section) => {
                if benchmark.privileged {
                    section.body.push_str(&format!(
                        "\n{}Load average (1, 5, 15 min) before / after this section: {load} / {}; it took {:.0} s.{}\n",
                        provenance(benchmark.name),
                        bench::loadavg(),
                        section_start.elapsed().as_secs_f64(),
                        if quick { " **Quick run (--quick): shorter runs, fewer repetitions.**" } else { "" }
                    ));
                }
                println!("## {}\n\n{}", section.title, section.body);
                sections.push(section);
            }
            Err(err) => {
                eprintln!("splitter-bench: section {} failed: {err:#}", benchmark.name);
                failed.push(benchmark.name);
            }
        }
    }
    let checks = figures.checks();
    if !checks.is_empty() {
        let summary = summary(&figures, &checks, &load_before, started.elapsed(), quick);
        println!("## {}\n\n{}", summary.title, summary.body);
        sections.insert(0, summary);
    }
    if write {
        for section in &sections {
            if let Err(err) = write_section(section) {
                eprintln!("splitter-bench: cannot update {}: {err}", benchmarks_file().display());
                return ExitCode::FAILURE;
            }
        }
        if let Some(svg) = bench::plot::svg(&figures, &format!("{}, {} CPUs, {}", cpu_model(), cpus(), today())) {
            let path = benchmarks_file().with_file_name("benchmarks-throughput.svg");
            if let Err(err) = fs::write(&path, svg) {
                eprintln!("splitter-bench: cannot write {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
            println!("(plot written to {})", path.display());
        }
        if !sections.is_empty() {
            println!("(written to {})", benchmarks_file().display());
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("splitter-bench: failed sections: {failed:?}");
        ExitCode::FAILURE
    }
}

fn forward(opts: Options, figures: &mut Figures) -> anyhow::Result<Section> {
    let r = bench::forward::run(opts)?;
    let body = bench::forward::section(&r);
    figures.forward = Some(r);
    Ok(Section { title: "Forwarding: 64-byte UDP, CPU per packet and packets/s", body })
}

fn connect(opts: Options, figures: &mut Figures) -> anyhow::Result<Section> {
    let r = bench::connect::run(opts)?;
    let body = bench::connect::section(&r);
    figures.connect = Some(r);
    Ok(Section { title: "TCP connections: rate and latency", body })
}

fn connect_xdp(opts: Options, figures: &mut Figures) -> anyhow::Result<Section> {
    let r = bench::connect_xdp::run(opts)?;
    let body = bench::connect_xdp::section(&r);
    figures.connect_xdp = Some(r);
    Ok(Section { title: "TCP connections between XDP endpoints: each balancer's own cost", body })
}

fn killed_canary(opts: Options, _figures: &mut Figures) -> anyhow::Result<Section> {
    let r = bench::killed_canary::run(opts)?;
    Ok(Section { title: "A canary killed mid-rollout: time to the rollback", body: bench::killed_canary::section(&r) })
}

fn cluster(opts: Options, _figures: &mut Figures) -> anyhow::Result<Section> {
    bench::ensure_tools(&[("etcd", "etcd-server")])?;
    let r = bench::cluster::run(opts)?;
    let body = bench::cluster::section(&r);
    println!("{body}");
    Ok(Section { title: "Many nodes: a weight change until the other nodes apply it", body })
}

fn flood(opts: Options, _figures: &mut Figures) -> anyhow::Result<Section> {
    let r = bench::flood::run(opts)?;
    let body = bench::flood::section(&r);
    println!("{body}");
    Ok(Section { title: "SYN flood: splitter and nftables", body })
}

fn expiry(opts: Options, _figures: &mut Figures) -> anyhow::Result<Section> {
    let r = bench::expiry::run(opts)?;
    println!("expiry: agent CPU {:.2}% idle, {:.2}% with {} conntrack entries", r.idle_percent, r.full_percent, r.entries);
    Ok(Section { title: "Agent CPU with conntrack full", body: bench::expiry::section(&r) })
}

fn testrun(opts: Options, figures: &mut Figures) -> anyhow::Result<Section> {
    let r = bench::testrun::run(opts)?;
    let body = bench::testrun::section(&r);
    figures.testrun = Some(r);
    Ok(Section { title: "Per-packet cost under BPF_PROG_TEST_RUN", body })
}

fn weights(opts: Options, figures: &mut Figures) -> anyhow::Result<Section> {
    let r = bench::weights::run(opts)?;
    let body = bench::weights::section(&r);
    figures.weights = Some(r);
    Ok(Section { title: "Weight changes under load", body })
}

fn memory(opts: Options, figures: &mut Figures) -> anyhow::Result<Section> {
    let r = bench::memory::run(opts)?;
    let body = bench::memory::section(&r);
    figures.memory = Some(r);
    Ok(Section { title: "Map memory", body })
}

/// The targets of the issue against what this run measured.
fn summary(figures: &Figures, checks: &[bench::TargetCheck], load_before: &str, took: Duration, quick: bool) -> Section {
    let mut rows = String::new();
    for c in checks {
        rows.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            c.what,
            c.measured,
            c.target,
            if c.context {
                format!("context: {}", c.note)
            } else if c.met {
                "met".to_string()
            } else if c.note.is_empty() {
                "**missed**".to_string()
            } else {
                format!("**missed** ({})", c.note)
            }
        ));
    }
    let plot = if figures.forward.is_some() || figures.connect.is_some() || figures.connect_xdp.is_some() {
        "![throughput against the alternatives](benchmarks-throughput.svg)\n\n"
    } else {
        ""
    };
    let body = format!(
        "Targets of the benchmark issue against the figures of this run (details in the sections below; \
         every figure is from the same run on the same testbeds).\n\n\
         | figure | measured | target | verdict |\n|---|---|---|---|\n{rows}\n{plot}\
         Command: `cargo xtask bench{}` (builds everything, then runs `splitter-bench{}`).  \n\
         Machine: {} CPUs (nproc), {}, {} GiB RAM, kernel {}; measured {}; the run took {:.0} s.  \n\
         Load average (1, 5, 15 min) before / after: {load_before} / {}. Other engineers' builds may have \
         been running on the other CPU: see each section's load figures.\n",
        if quick { " -- --quick" } else { "" },
        if quick { " --quick" } else { "" },
        cpus(),
        cpu_model(),
        mem_gib(),
        kernel(),
        today(),
        took.as_secs_f64(),
        bench::loadavg(),
    );
    Section { title: "Summary: side by side, against the targets", body }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn mem_gib() -> String {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next().and_then(|k| k.parse::<f64>().ok()))
        })
        .map_or("?".into(), |kb| format!("{:.0}", kb / 1024.0 / 1024.0))
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map_or("?".into(), |s| s.trim().to_string())
}

/// Table build time: targets with varied weights, each size repeated for about a second.
fn table_build() -> Section {
    const SIZES: [usize; 3] = [1, 8, 64];
    const TIME_PER_SIZE: Duration = Duration::from_millis(800);
    const MAX_RUNS: usize = 2000;
    const MIN_RUNS: usize = 30;

    let mut rows = String::new();
    for &count in &SIZES {
        let targets = varied_targets(count);
        // Warm up caches and the allocator.
        for _ in 0..3 {
            black_box(build_bucket_table(black_box(&targets)));
        }
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < MIN_RUNS || (times.len() < MAX_RUNS && start.elapsed() < TIME_PER_SIZE) {
            let run = Instant::now();
            black_box(build_bucket_table(black_box(&targets)));
            times.push(run.elapsed());
        }
        times.sort_unstable();
        rows.push_str(&format!(
            "| {count} | {} | {} | {} |\n",
            times.len(),
            micros(percentile(&times, 50)),
            micros(percentile(&times, 99)),
        ));
    }

    let mut moved = String::new();
    for &count in &[8usize, 32, 64] {
        let targets = varied_targets(count);
        let before = keyed_table(&targets);
        let removed = keyed_table(&targets[1..]);
        let mut reweighted = targets.clone();
        reweighted[0].weight += reweighted[0].weight / 5;
        let ideal_removed = share_of_slots(&targets, 0);
        let reweighted_table = keyed_table(&reweighted);
        let ideal_reweighted = share_of_slots(&reweighted, 0).abs_diff(ideal_removed);
        moved.push_str(&format!(
            "| {count} | {} (ideal {ideal_removed}) | {} (ideal {ideal_reweighted}) |\n",
            slots_moved(&before, &removed),
            slots_moved(&before, &reweighted_table),
        ));
    }

    let body = format!(
        "How long the agent takes to build one gateway's bucket table ({BUCKET_TABLE_SIZE} slots, \
         `splitter_common::table::build_bucket_table`), for targets with varied weights. Each size \
         is built repeatedly for about {} ms (at least {MIN_RUNS}, at most {MAX_RUNS} builds).\n\n\
         | targets | builds | median | p99 |\n|---:|---:|---:|---:|\n{rows}\n\
         Slots that change target when the first target is removed, or when its weight grows by a \
         fifth (ideal: its own slots, or the change of its slot count):\n\n\
         | targets | removed: slots moved | re-weighted: slots moved |\n|---:|---:|---:|\n{moved}\n\
         {}",
        TIME_PER_SIZE.as_millis(),
        provenance("table"),
    );
    Section { title: "Bucket table build", body }
}

/// `count` targets at neighbouring addresses with weights that differ (parts per million of
/// the gateway, as the agent passes them), from a fixed sequence so that runs compare.
fn varied_targets(count: usize) -> Vec<TableTarget> {
    let raw: Vec<u64> = (0..count as u64).map(|n| 1 + (n * 7919 + 13) % 97).collect();
    let total: u64 = raw.iter().sum();
    raw.iter()
        .zip(0u64..)
        .map(|(&weight, n)| TableTarget { key: (0x0a01_0000 + n) << 16 | 8080, weight: (weight * 1_000_000 / total) as u32 })
        .collect()
}

/// The table with each slot's target key (comparable across target lists).
fn keyed_table(targets: &[TableTarget]) -> Vec<u64> {
    build_bucket_table(targets).iter().map(|&index| targets[usize::from(index)].key).collect()
}

fn slots_moved(before: &[u64], after: &[u64]) -> usize {
    before.iter().zip(after).filter(|(a, b)| a != b).count()
}

/// Slots that target `index` should hold: its weight's share of the table, rounded.
fn share_of_slots(targets: &[TableTarget], index: usize) -> usize {
    let total: u64 = targets.iter().map(|target| u64::from(target.weight)).sum();
    ((u64::from(targets[index].weight) * BUCKET_TABLE_SIZE as u64 + total / 2) / total) as usize
}

fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    let rank = (sorted.len() * percent).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

fn micros(duration: Duration) -> String {
    format!("{:.0} µs", duration.as_secs_f64() * 1e6)
}

/// How the figures were made: command, machine and date.
fn provenance(section: &str) -> String {
    format!(
        "Command: `cargo xtask bench` (builds everything, then runs all sections), or this section \
         alone: `cargo xtask bench -- {section}`.  \n\
         Machine: {} CPUs (nproc), {}; measured {}.\n",
        cpus(),
        cpu_model(),
        today(),
    )
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// Today's date (UTC) as YYYY-MM-DD.
fn today() -> String {
    let days = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs() / 86_400) as i64;
    // Civil date from days since 1970-01-01, counting in 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn benchmarks_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/BENCHMARKS.md")
}

/// Replaces the section's `## title` block in docs/BENCHMARKS.md (up to the next `## `
/// heading), or appends it; creates the file when missing.
fn write_section(section: &Section) -> std::io::Result<()> {
    let path = benchmarks_file();
    let current = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            "# Benchmarks\n\nFigures written by `splitter-bench` (tests/src/bin/splitter-bench.rs); each section \
             says the command and the machine that produced it.\n"
                .to_owned()
        }
        Err(err) => return Err(err),
    };
    let heading = format!("## {}", section.title);
    let block = format!("{heading}\n\n{}", section.body.trim_end());
    let lines: Vec<&str> = current.lines().collect();
    let updated = match lines.iter().position(|line| line.trim_end() == heading) {
        Some(start) => {
            let end = lines[start + 1..].iter().position(|line| line.starts_with("## ")).map_or(lines.len(), |offset| start + 1 + offset);
            let mut parts: Vec<String> = lines[..start].iter().map(|line| line.to_string()).collect();
            parts.push(block);
            if end < lines.len() {
                parts.push(String::new());
                parts.extend(lines[end..].iter().map(|line| line.to_string()));
            }
            parts.join("\n") + "\n"
        }
        None => format!("{}\n\n{block}\n", current.trim_end()),
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&path, updated)
}
