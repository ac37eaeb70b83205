//! What the fuzz targets share: a private network namespace, and the real datapath
//! (the built eBPF object, maps sized small) driven by the agent's own code.

use std::{path::PathBuf, process::Command};

use aya::Ebpf;
use splitter_user::datapath::{load_object, Limits, Maps};

/// Map sizes for fuzzing: small, so a full map is reached and its errors are exercised.
pub const LIMITS: Limits = Limits { max_gateways: 8, conntrack_entries: 4096, half_open_entries: 4096, ..Limits::DEFAULT };

/// Moves this thread (and the programs it starts) into a new, anonymous network
/// namespace: interfaces made here vanish with the process, whatever way it exits, and
/// nothing sent here reaches any other network. Needs root.
pub fn isolate_network() {
    // SAFETY: unshare takes no pointers; it only changes this thread's namespaces.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        eprintln!("fuzz: unshare(CLONE_NEWNET) failed ({}): this fuzz target needs root", std::io::Error::last_os_error());
        std::process::abort();
    }
    ip(&["link", "set", "lo", "up"]);
}

/// Runs `ip ARGS` in this thread's namespace; aborts the fuzzer if it fails (the
/// setup, not the input, is broken then).
pub fn ip(args: &[&str]) {
    let ok = Command::new("ip").args(args).status().is_ok_and(|s| s.success());
    if !ok {
        eprintln!("fuzz: `ip {}` failed", args.join(" "));
        std::process::abort();
    }
}

/// Writes a sysctl of this thread's namespace.
pub fn sysctl(key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    if let Err(e) = std::fs::write(&path, value) {
        eprintln!("fuzz: cannot write {path}: {e}");
        std::process::abort();
    }
}

/// The eBPF object built by `cargo xtask build` (`SPLITTER_EBPF_OBJ`, or the default
/// place under target/).
pub fn ebpf_object() -> Vec<u8> {
    let path = std::env::var_os("SPLITTER_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bpf/splitter.bpf.o")));
    match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("fuzz: cannot read the eBPF object {} ({e}): run `cargo xtask build`", path.display());
            std::process::abort();
        }
    }
}

/// Loads the object (maps created in the kernel) and takes the datapath maps out of it.
pub fn load() -> (Ebpf, Maps) {
    let object = ebpf_object();
    let mut ebpf = match load_object(&object, LIMITS, 0, None) {
        Ok(ebpf) => ebpf,
        Err(e) => {
            eprintln!("fuzz: {e:#}");
            std::process::abort();
        }
    };
    let maps = match Maps::take(&mut ebpf) {
        Ok(maps) => maps,
        Err(e) => {
            eprintln!("fuzz: {e:#}");
            std::process::abort();
        }
    };
    (ebpf, maps)
}
