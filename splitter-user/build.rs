//! Embeds the eBPF object built by `cargo xtask build` (path in `SPLITTER_EBPF_OBJ`).
//!
//! Without it (a plain `cargo build`), an empty object is embedded and the agent refuses to
//! start with a message saying to build with `cargo xtask build`; every other command works.
use std::{env, fs, path::PathBuf};

fn main() {
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
