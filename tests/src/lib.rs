//! Test harness for the splitter: network namespaces, veth pairs and processes that are
//! created with unique names and removed on drop (so on panic too), plus the artifacts
//! built by `cargo xtask build`.
//!
//! Everything a test creates lives inside namespaces it owns; nothing touches the host's
//! own interfaces or addresses.

pub mod browser;
pub mod cluster;
pub mod frames;
pub mod netns;
pub mod process;
pub mod testbed;
pub mod traffic;

use std::{
    env,
    path::{Path, PathBuf},
};

pub use netns::{Netns, Veth};
pub use process::Process;

/// The agent binary built by `cargo xtask build`.
pub fn splitter_bin() -> PathBuf {
    artifact("SPLITTER_BIN", "target/release/splitter")
}

/// The eBPF object built by `cargo xtask build`.
pub fn ebpf_object() -> PathBuf {
    artifact("SPLITTER_EBPF_OBJ", "target/bpf/splitter.bpf.o")
}

/// The eBPF object of test and benchmark programs (pass, drop, bare forwarder, the
/// connection-rate endpoints), built by `cargo xtask build` beside the agent's.
pub fn test_object() -> PathBuf {
    artifact("SPLITTER_EBPF_TEST_OBJ", "target/bpf/splitter-test.bpf.o")
}

fn artifact(var: &str, default: &str) -> PathBuf {
    let path = env::var_os(var).map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(default));
    assert!(path.is_file(), "{} does not exist: build with `cargo xtask build` (or run `cargo xtask test`)", path.display());
    path
}

/// Set to `1` to let privileged tests pass without running when not root (a developer's
/// machine without BPF); never honoured in CI.
pub const SKIP_PRIVILEGED_VAR: &str = "SPLITTER_SKIP_PRIVILEGED";

/// True when privileged tests can run (root). Without root a privileged test fails, so a
/// run that could not test anything cannot pass: unless `SPLITTER_SKIP_PRIVILEGED=1` asks
/// to skip them (a visible `SKIPPED` line), and never under CI (`CI` set to anything but
/// `false` or `0`).
#[must_use]
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let in_ci = env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    let opted_out = env::var(SKIP_PRIVILEGED_VAR).is_ok_and(|v| v == "1");
    if in_ci || !opted_out {
        panic!(
            "{test}: needs root (BPF, network namespaces){}",
            if in_ci { "; CI does not allow skipping it" } else { "; set SPLITTER_SKIP_PRIVILEGED=1 to skip privileged tests" }
        );
    }
    eprintln!("SKIPPED {test}: needs root (BPF, network namespaces)");
    false
}

/// Runs an XDP program once on `frame` with `BPF_PROG_TEST_RUN`: its action and the frame
/// as it left it (the output buffer leaves the program 256 bytes to grow the frame).
pub fn run_xdp(prog: &aya::programs::Xdp, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
    use aya::programs::{TestRun, TestRunOptions};
    let mut out = vec![0u8; frame.len() + 256];
    let result = prog.test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat: 1, ..Default::default() })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// Keeps the calling thread on `cpu` (per-CPU BPF state, a generator per CPU).
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; the set outlives the call.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
