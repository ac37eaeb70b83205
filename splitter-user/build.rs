//! Embeds the eBPF object built by `cargo xtask build` (path in `SPLITTER_EBPF_OBJ`), and
//! the git commit the binary is built from (`splitter --version`; "unknown" outside git).
//!
//! Without the object (a plain `cargo build`), an empty one is embedded and the agent refuses
//! to start with a message saying to build with `cargo xtask build`; every other command works.
use std::{env, fs, path::PathBuf, process::Command};

fn git_commit(repo: &std::path::Path) -> String {
    for path in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if repo.join(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|commit| !commit.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rustc-env=SPLITTER_GIT_COMMIT={}", git_commit(&manifest_dir));
    println!("cargo:rerun-if-env-changed=SPLITTER_EBPF_OBJ");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("splitter.bpf.o");
    let src = env::var_os("SPLITTER_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("../target/bpf/splitter.bpf.o"));
    println!("cargo:rerun-if-changed={}", src.display());
    if src.is_file() {
        fs::copy(&src, &out).expect("copying the eBPF object");
    } else {
        println!("cargo:warning=no eBPF object at {}: the agent will not start; build with `cargo xtask build`", src.display());
        fs::write(&out, b"").unwrap();
    }
}
