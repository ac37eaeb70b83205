//! Developer tasks: `cargo xtask build | test | demo | bench | soak | fuzz | package`.
//!
//! `build` works from a fresh clone: it installs bpf-linker (against the compiling
//! toolchain's own libLLVM, cached under `~/.cache/splitter`), the rust components it needs,
//! builds the eBPF object and then the agent with the object embedded.

mod build;
mod fuzz;
mod package;
mod shim;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

const USAGE: &str = "\
usage: cargo xtask <task> [options]

tasks:
  build [--route auto|standard|host]   install what is missing, build the eBPF object and target/release/splitter
  test  [--route ...] [-- TEST-ARGS]   build, then run every test (privileged tests need root)
  demo  [--route ...]                  build, then run the live-split demo in network namespaces (root)
  bench [--route ...]                  build, then run the benchmarks and print their figures
  soak  [--minutes N]                  build, then run real connections through the splitter for N
                                       minutes while weights change, targets flap and the agent is
                                       killed and restarted (root; not part of `test`)
  fuzz  [--seconds N] [TARGET...]      build, then run each fuzz target for N seconds (cargo-fuzz,
                                       installed if missing; the packet fuzzer needs root)
  package                              build, then the Debian package (cargo-deb, installed if
                                       missing): target/debian/splitter_VERSION_ARCH.deb

routes (how the eBPF object is built):
  standard  nightly + rust-src + -Z build-std=core for bpfel-unknown-none (the ecosystem's route)
  host      stable only: host-target bitcode linked by bpf-linker for BPF (no rust-src needed)
  auto      standard, falling back to host when rust-src cannot be installed (default)
";

fn main() {
    // rustc invokes this same binary as its linker on the host route.
    if let Some(code) = shim::run_if_invoked_as_linker() {
        std::process::exit(code);
    }
    if let Err(err) = run() {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args: Vec<String> = env::args().skip(1).collect();
    if args.is_empty() || args[0] == "-h" || args[0] == "--help" {
        print!("{USAGE}");
        return Ok(());
    }
    let task = args.remove(0);
    let (opts, rest) = build::Options::parse(args)?;
    match task.as_str() {
        "build" => {
            if !rest.is_empty() {
                bail!("unexpected arguments {rest:?}\n{USAGE}");
            }
            build::build_all(&opts)?;
        }
        "test" => {
            let mut opts = opts;
            opts.legacy = true;
            let art = build::build_all(&opts)?;
            // The package test installs the .deb built from this very agent.
            let deb = package::build(&art)?;
            test(&art, &deb, &rest)?;
        }
        "package" => {
            if !rest.is_empty() {
                bail!("unexpected arguments {rest:?}\n{USAGE}");
            }
            let art = build::build_all(&opts)?;
            package::build(&art)?;
        }
        "demo" => {
            let art = build::build_all(&opts)?;
            ensure_system_tools(&["ip"])?;
            run_tool(&art, "splitter-demo", &rest)?;
        }
        "bench" => {
            let art = build::build_all(&opts)?;
            ensure_system_tools(&["ip"])?;
            run_tool(&art, "splitter-bench", &rest)?;
        }
        "fuzz" => {
            let fuzz_args = fuzz::Args::parse(&rest)?;
            let art = build::build_all(&opts)?;
            ensure_system_tools(&["ip"])?;
            fuzz::run(&art, &fuzz_args)?;
        }
        "soak" => {
            let art = build::build_all(&opts)?;
            ensure_system_tools(&["ip"])?;
            run_tool(&art, "splitter-soak", &rest)?;
        }
        other => bail!("unknown task {other:?}\n{USAGE}"),
    }
    Ok(())
}

/// Runs the whole test suite in release mode (it shares the agent's compiled dependencies).
fn test(art: &build::Artifacts, deb: &Path, extra: &[String]) -> Result<()> {
    // What the namespace tests run besides the splitter: a fresh machine may lack any.
    ensure_system_tools(&["ip", "ping", "curl", "nft", "setpriv", "prometheus", "socat", "chromium", "chromedriver", "etcd", "protoc"])?;
    let schemathesis = ensure_python_tool("schemathesis", SCHEMATHESIS_VERSION, "schemathesis")?;
    let kubernetes_validate = ensure_python_tool("kubernetes-validate", KUBERNETES_VALIDATE_VERSION, "kubernetes-validate")?;
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args(["test", "--release", "--workspace"])
        .envs(art.env())
        .env("SPLITTER_SCHEMATHESIS", schemathesis)
        .env("SPLITTER_KUBERNETES_VALIDATE", kubernetes_validate)
        .env("SPLITTER_DEB", deb);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    status(&mut cmd, "cargo test")
}

/// Builds and runs one of the test crate's tools (demo, bench) with the built artifacts.
/// Every binary of the test crate is built first: the tools start the others (backends,
/// endpoints) as processes, and `cargo run` builds only the one it runs.
fn run_tool(art: &build::Artifacts, bin: &str, args: &[String]) -> Result<()> {
    status(
        cargo().current_dir(workspace_root()).args(["build", "--quiet", "--release", "-p", "splitter-tests", "--bins"]).envs(art.env()),
        "cargo build of the test tools",
    )?;
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args(["run", "--quiet", "--release", "-p", "splitter-tests", "--bin", bin, "--"])
        .args(args)
        .envs(art.env());
    status(&mut cmd, bin)
}

/// The schemathesis version the API contract test runs (PyPI).
const SCHEMATHESIS_VERSION: &str = "4.32.5";
/// kubernetes-validate from PyPI: the Kubernetes schemas it ships validate the manifests
/// of deploy/kubernetes offline.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// A PyPI tool in a virtual environment of its own under the user's cache (kept between
/// runs), installed when missing; returns its command.
fn ensure_python_tool(package: &str, version: &str, command_name: &str) -> Result<PathBuf> {
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("no HOME for the tool cache")?;
    let venv = cache.join(format!("splitter-tools/{package}-{version}"));
    let command = venv.join("bin").join(command_name);
    if command.is_file() {
        return Ok(command);
    }
    eprintln!("xtask: installing {package} {version} (PyPI) into {}", venv.display());
    status(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv (Debian: python3-venv)")?;
    status(
        Command::new(venv.join("bin/pip")).args(["install", "--quiet", &format!("{package}=={version}")]),
        &format!("pip install {package}"),
    )?;
    Ok(command)
}

/// Installs missing system tools with apt when running as root on Debian/Ubuntu.
pub(crate) fn ensure_system_tools(tools: &[&str]) -> Result<()> {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| which(t).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing
        .iter()
        .map(|t| match *t {
            "ip" => "iproute2",
            "ping" => "iputils-ping",
            "nft" => "nftables",
            "setpriv" => "util-linux",
            "chromedriver" => "chromium-driver",
            "etcd" => "etcd-server",
            "protoc" => "protobuf-compiler",
            other => other,
        })
        .collect();
    if which("apt-get").is_none() {
        bail!("missing tools {missing:?}: install the packages {packages:?}");
    }
    eprintln!("xtask: installing {packages:?} with apt-get");
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )
}

pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from)).map(|dir| dir.join(tool)).find(|p| p.is_file())
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives one level below the workspace root").to_path_buf()
}

/// `cargo` as invoked by the user (the toolchain the workspace builds with).
pub(crate) fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub(crate) fn status(cmd: &mut Command, what: &str) -> Result<()> {
    let st = cmd.status().with_context(|| format!("cannot run {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}
