//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the cargo-fuzz targets of `fuzz/`
//! for N seconds each and prints, per target, executions, executions per second,
//! coverage and corpus size. cargo-fuzz is installed (cached under `~/.cache/splitter`)
//! when missing; the targets are built by nightly with AddressSanitizer.
//!
//! New inputs go to `target/fuzz-corpus/TARGET`; the committed seeds in
//! `fuzz/seeds/TARGET` are read too. A crash leaves its input under
//! `fuzz/artifacts/TARGET` and fails the task.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{build, status, workspace_root};

const CARGO_FUZZ_VERSION: &str = "0.13.1";
pub const TARGETS: [&str; 3] = ["gateway_yaml", "control_request", "xdp_packet"];
const NIGHTLY: &str = "nightly";

pub struct Args {
    pub seconds: u64,
    pub targets: Vec<String>,
}

impl Args {
    pub fn parse(rest: &[String]) -> Result<Self> {
        let mut seconds = 60;
        let mut targets = Vec::new();
        let mut it = rest.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--seconds" => {
                    seconds = it.next().and_then(|v| v.parse().ok()).context("--seconds takes a whole number of seconds")?;
                }
                t if TARGETS.contains(&t) => targets.push(t.to_string()),
                other => bail!("unknown fuzz argument {other:?} (targets: {})", TARGETS.join(", ")),
            }
        }
        if targets.is_empty() {
            targets = TARGETS.iter().map(|t| t.to_string()).collect();
        }
        Ok(Self { seconds, targets })
    }
}

/// What one run reported.
struct Summary {
    target: String,
    executions: u64,
    per_second: u64,
    coverage: String,
}

pub fn run(art: &build::Artifacts, args: &Args) -> Result<()> {
    let cargo_fuzz = ensure_cargo_fuzz()?;
    let root = workspace_root();
    let mut summaries = Vec::new();
    for target in &args.targets {
        let corpus = root.join("target/fuzz-corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let seeds = root.join("fuzz/seeds").join(target);
        let mut cmd = Command::new(&cargo_fuzz);
        cmd.current_dir(&root).args(["fuzz", "run", "--fuzz-dir", "fuzz", target]).arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg("-print_final_stats=1")
            .arg("-max_len=4096")
            .arg("-rss_limit_mb=4096")
            .envs(art.env());
        build::clear_toolchain_env(&mut cmd);
        cmd.env("RUSTUP_TOOLCHAIN", NIGHTLY);
        // libFuzzer reports on stderr; into a file the operator can follow with tail -f.
        let log_path = root.join("target").join(format!("fuzz-{target}.log"));
        cmd.stderr(Stdio::from(fs::File::create(&log_path)?));
        eprintln!("xtask: fuzzing {target} for {} s (progress: tail -f {})", args.seconds, log_path.display());
        let status = cmd.status().context("starting cargo fuzz")?;
        let log = String::from_utf8_lossy(&fs::read(&log_path).unwrap_or_default()).into_owned();
        if !status.success() {
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            bail!("fuzz target {target} failed ({status}); full log in {}", log_path.display());
        }
        summaries.push(summarize(target, &log)?);
    }
    println!("fuzz summary ({} s per target):", args.seconds);
    for s in &summaries {
        println!("  {:<16} {:>10} executions  {:>7} exec/s  {}", s.target, s.executions, s.per_second, s.coverage);
    }
    Ok(())
}

/// Reads libFuzzer's final statistics and its last status line.
fn summarize(target: &str, log: &str) -> Result<Summary> {
    let stat = |key: &str| log.lines().find_map(|l| l.strip_prefix(&format!("stat::{key}:"))).and_then(|v| v.trim().parse::<u64>().ok());
    let executions = stat("number_of_executed_units").context("no final statistics from libFuzzer")?;
    let per_second = stat("average_exec_per_sec").unwrap_or(0);
    // "#1234 DONE cov: 567 ft: 890 corp: 12/3456b ..." (or the last pulse line).
    let coverage = log
        .lines()
        .rev()
        .find(|l| l.starts_with('#') && l.contains("cov:"))
        .and_then(|l| l.find("cov:").map(|i| l[i..].to_string()))
        .unwrap_or_default();
    ensure!(executions > 0, "{target}: no input was executed");
    Ok(Summary { target: target.to_string(), executions, per_second, coverage })
}

/// cargo-fuzz from PATH, or installed into the cache.
fn ensure_cargo_fuzz() -> Result<PathBuf> {
    if let Some(found) = crate::which("cargo-fuzz") {
        return Ok(found);
    }
    let dir = build::cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = dir.join("bin/cargo-fuzz");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {}", dir.display());
    // By the stable toolchain: its pinned dependencies do not build on nightly.
    let mut cmd = Command::new("cargo");
    build::clear_toolchain_env(&mut cmd);
    cmd.args(["install", &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"), "--locked", "--root"]).arg(&dir);
    status(&mut cmd, "cargo install cargo-fuzz")?;
    ensure!(bin.is_file(), "cargo-fuzz was not installed at {}", bin.display());
    Ok(bin)
}
