//! `cargo xtask build`: toolchain pieces, the eBPF object, then the agent.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};
use object::{Object, ObjectSection};

use crate::{cargo, shim, status, workspace_root};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Toolchain of the standard route (needs rust-src for `-Z build-std`).
const NIGHTLY: &str = "nightly";
/// Toolchain of the host route (no rust-src needed).
const STABLE: &str = "stable";
/// Sections the agent and the kernel need in the object.
const REQUIRED_SECTIONS: [&str; 4] = ["xdp", "maps", "license", ".BTF"];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Route {
    Auto,
    Standard,
    Host,
}

pub struct Options {
    route: Route,
    /// Also build the legacy eBPF object (for the upgrade tests).
    pub legacy: bool,
}

impl Options {
    /// Parses `--route R`; returns the options and the remaining arguments (after `--`,
    /// or anything not understood, which the task may pass on).
    pub fn parse(args: Vec<String>) -> Result<(Self, Vec<String>)> {
        let mut route = match env::var("SPLITTER_EBPF_ROUTE").as_deref() {
            Ok("standard") => Route::Standard,
            Ok("host") => Route::Host,
            _ => Route::Auto,
        };
        let mut rest = Vec::new();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--route" => {
                    route = match it.next().as_deref() {
                        Some("auto") => Route::Auto,
                        Some("standard") => Route::Standard,
                        Some("host") => Route::Host,
                        other => bail!("--route takes auto, standard or host, not {other:?}"),
                    }
                }
                "--" => {
                    rest.extend(it);
                    break;
                }
                _ => rest.push(arg),
            }
        }
        Ok((Self { route, legacy: false }, rest))
    }
}

/// What a build produced; passed to tests, demo and bench through the environment.
pub struct Artifacts {
    pub object: PathBuf,
    /// The datapath as it was before half-open flows (feature `legacy-syn`), for the
    /// live-upgrade test; built only for `test`.
    pub legacy_object: Option<PathBuf>,
    /// Test and benchmark programs (feature `test-programs`), kept out of the agent's object.
    pub test_object: PathBuf,
    pub splitter: PathBuf,
    pub route: &'static str,
}

impl Artifacts {
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SPLITTER_EBPF_OBJ", self.object.display().to_string()),
            ("SPLITTER_BIN", self.splitter.display().to_string()),
            ("SPLITTER_EBPF_ROUTE", self.route.to_string()),
            ("SPLITTER_EBPF_TEST_OBJ", self.test_object.display().to_string()),
            ("SPLITTER_EBPF_LEGACY_OBJ", self.legacy_object.as_ref().map(|p| p.display().to_string()).unwrap_or_default()),
        ]
    }
}

pub fn build_all(opts: &Options) -> Result<Artifacts> {
    // The etcd client's build script compiles etcd's protocol definitions with protoc.
    crate::ensure_system_tools(&["protoc"])?;
    let root = workspace_root();
    let out_dir = root.join("target/bpf");
    fs::create_dir_all(&out_dir)?;
    let object = out_dir.join("splitter.bpf.o");

    let route = match opts.route {
        Route::Host => Route::Host,
        Route::Standard => {
            ensure!(ensure_rust_src(NIGHTLY), "the standard route needs rust-src for the {NIGHTLY} toolchain");
            Route::Standard
        }
        Route::Auto if ensure_rust_src(NIGHTLY) => Route::Standard,
        Route::Auto => {
            eprintln!("xtask: rust-src is not available for {NIGHTLY}: falling back to the host route");
            Route::Host
        }
    };
    let (built, name) = match route {
        Route::Standard => (build_ebpf_standard(&root, &[], "ebpf")?, "standard"),
        _ => (build_ebpf_host(&root, &[], "ebpf-host")?, "host"),
    };
    fs::copy(&built, &object).with_context(|| format!("copying {}", built.display()))?;
    check_sections(&object)?;
    eprintln!("xtask: eBPF object built by the {name} route: {}", object.display());

    let mut cmd = cargo();
    cmd.current_dir(&root).args(["build", "--release", "-p", "splitter-user"]).env("SPLITTER_EBPF_OBJ", &object);
    status(&mut cmd, "cargo build -p splitter-user")?;
    let splitter = root.join("target/release/splitter");
    eprintln!("xtask: built {} (eBPF route: {name})", splitter.display());
    let built = match route {
        Route::Standard => build_ebpf_standard(&root, &["test-programs"], "ebpf-test")?,
        _ => build_ebpf_host(&root, &["test-programs"], "ebpf-host-test")?,
    };
    let test_object = out_dir.join("splitter-test.bpf.o");
    fs::copy(&built, &test_object).with_context(|| format!("copying {}", built.display()))?;
    check_sections(&test_object)?;
    eprintln!("xtask: the test eBPF object (helper and benchmark programs): {}", test_object.display());
    let legacy_object = if opts.legacy {
        let built = match route {
            Route::Standard => build_ebpf_standard(&root, &["legacy-syn"], "ebpf-legacy")?,
            _ => build_ebpf_host(&root, &["legacy-syn"], "ebpf-host-legacy")?,
        };
        let legacy = out_dir.join("splitter-legacy.bpf.o");
        fs::copy(&built, &legacy).with_context(|| format!("copying {}", built.display()))?;
        check_sections(&legacy)?;
        eprintln!("xtask: the legacy eBPF object (upgrade tests): {}", legacy.display());
        Some(legacy)
    } else {
        None
    };
    Ok(Artifacts { object, legacy_object, test_object, splitter, route: name })
}

/// Standard route: nightly, rust-src, `-Z build-std=core`, target `bpfel-unknown-none`.
fn build_ebpf_standard(root: &Path, features: &[&str], target_subdir: &str) -> Result<PathBuf> {
    let linker = ensure_bpf_linker(NIGHTLY)?;
    eprintln!("xtask: building the eBPF object: standard route ({NIGHTLY} + rust-src + build-std, bpfel-unknown-none)");
    eprintln!("xtask: (rustc warns that `allows-misaligned-mem-access` is unstable: expected, see xtask/src/build.rs)");
    let target_dir = root.join("target").join(target_subdir);
    let features = [&["log"], features].concat().join(",");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("splitter-ebpf"))
        .arg(format!("+{NIGHTLY}"))
        .args(["build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--features", &features, "--target-dir"])
        .arg(&target_dir)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        // Misaligned loads and stores: LLVM otherwise splits every access to packet data
        // (aligned to 2 at best) into single bytes. The kernel accepts them on
        // architectures with efficient unaligned access (x86-64, arm64); it rejects them
        // on the stack, hence shared types with naturally aligned fields.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf", "-Ctarget-feature=+allows-misaligned-mem-access"].join("\x1f"),
        );
    clear_toolchain_env(&mut cmd);
    status(&mut cmd, "cargo build (eBPF, standard route)")?;
    Ok(target_dir.join("bpfel-unknown-none/release/libsplitter_ebpf.so"))
}

/// Host route: stable rustc emits x86_64 bitcode for a `cdylib`; this xtask binary,
/// invoked as the linker, hands it to bpf-linker which retargets it to BPF. Kernel
/// logging is left out: aya-log-ebpf only declares its ring buffer map for BPF targets.
fn build_ebpf_host(root: &Path, features: &[&str], target_subdir: &str) -> Result<PathBuf> {
    let linker = ensure_bpf_linker(STABLE)?;
    eprintln!("xtask: building the eBPF object: host route ({STABLE}, x86_64 bitcode linked for BPF by bpf-linker; no kernel logging)");
    let target_dir = root.join("target").join(target_subdir);
    let shim = env::current_exe().context("locating the xtask binary for the linker shim")?;
    let flags = [format!("-Clinker={}", shim.display()), "-Clinker-plugin-lto".into(), "-Cpanic=abort".into(), "-Cdebuginfo=2".into()];
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("splitter-ebpf"))
        .arg(format!("+{STABLE}"))
        // An explicit --target keeps these flags off build scripts and proc macros.
        .args(["build", "--release", "--target", "x86_64-unknown-linux-gnu", "--target-dir"])
        .arg(&target_dir)
        .args(["--features", &features.join(",")])
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .env(shim::LINKER_ENV, &linker);
    clear_toolchain_env(&mut cmd);
    status(&mut cmd, "cargo build (eBPF, host route)")?;
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/libsplitter_ebpf.so"))
}

/// The outer `cargo xtask` sets these for its own toolchain; the eBPF build picks its own.
pub(crate) fn clear_toolchain_env(cmd: &mut Command) {
    for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTC_WRAPPER", "RUSTFLAGS", "CARGO"] {
        cmd.env_remove(var);
    }
}

/// True when `toolchain` has rust-src, installing it with rustup if needed.
fn ensure_rust_src(toolchain: &str) -> bool {
    let Ok(sysroot) = sysroot(toolchain) else {
        eprintln!("xtask: no {toolchain} toolchain");
        return false;
    };
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return true;
    }
    eprintln!("xtask: installing rust-src for {toolchain}");
    let ok = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", toolchain])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok && sysroot.join("lib/rustlib/src/rust/library/core").is_dir()
}

fn rustc_info(toolchain: &str) -> Result<String> {
    let out = Command::new("rustc")
        .arg(format!("+{toolchain}"))
        .arg("-vV")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .with_context(|| format!("running rustc +{toolchain}"))?;
    ensure!(out.status.success(), "rustc +{toolchain} -vV failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

fn sysroot(toolchain: &str) -> Result<PathBuf> {
    let out = Command::new("rustc").arg(format!("+{toolchain}")).args(["--print", "sysroot"]).env_remove("RUSTUP_TOOLCHAIN").output()?;
    ensure!(out.status.success(), "rustc +{toolchain} --print sysroot failed");
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

pub(crate) fn cache_dir() -> PathBuf {
    if let Some(dir) = env::var_os("SPLITTER_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("splitter")
}

/// bpf-linker built against `toolchain`'s own libLLVM, cached per toolchain commit.
fn ensure_bpf_linker(toolchain: &str) -> Result<PathBuf> {
    let info = rustc_info(toolchain)?;
    let field = |key: &str| {
        info.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string()).with_context(|| format!("rustc -vV has no {key}"))
    };
    let commit = field("commit-hash:")?;
    let llvm_major = field("LLVM version:")?.split('.').next().unwrap_or_default().to_string();
    let dir = cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-{}", &commit[..commit.len().min(12)]));
    let bin = dir.join("bin/bpf-linker");
    if bin.is_file() {
        return Ok(bin);
    }

    // A prefix whose lib/ holds the toolchain's libLLVM under the two names the build and
    // the loader look for (libLLVM.so for linking, the SONAME through the rpath).
    let lib_dir = sysroot(toolchain)?.join("lib");
    let llvm_lib = fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so")))
        })
        .with_context(|| format!("no libLLVM in {}", lib_dir.display()))?;
    let prefix_lib = dir.join("llvm/lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), llvm_lib.file_name().unwrap()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm_lib, &link)?;
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {llvm_major}) into {}",
        llvm_lib.display(),
        dir.display()
    );
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{toolchain}"))
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--no-default-features"])
        .args(["--features", &format!("llvm-{llvm_major}"), "--root"])
        .arg(&dir)
        .env("LLVM_PREFIX", dir.join("llvm"));
    clear_toolchain_env(&mut cmd);
    status(&mut cmd, "cargo install bpf-linker")?;
    ensure!(bin.is_file(), "bpf-linker was not installed at {}", bin.display());
    Ok(bin)
}

/// Fails unless the object carries every section the loader needs.
fn check_sections(path: &Path) -> Result<()> {
    let data = fs::read(path)?;
    let file = object::File::parse(&*data).with_context(|| format!("parsing {}", path.display()))?;
    ensure!(file.architecture() == object::Architecture::Bpf, "{} is not a BPF object ({:?})", path.display(), file.architecture());
    let names: Vec<&str> = file.sections().filter_map(|s| s.name().ok()).collect();
    let missing: Vec<&str> = REQUIRED_SECTIONS.iter().copied().filter(|s| !names.contains(s)).collect();
    ensure!(missing.is_empty(), "{} lacks sections {missing:?} (has {names:?})", path.display());
    eprintln!("xtask: object sections: {}", names.join(" "));
    check_no_byte_loops(&file, path)
}

/// Fails if program code calls `memmove`: BPF has it only as compiler_builtins' loop of
/// one byte per iteration (a 64-byte copy costs hundreds of instructions), where a
/// non-overlapping copy is expanded into word loads and stores.
fn check_no_byte_loops(file: &object::File, path: &Path) -> Result<()> {
    use object::{ObjectSymbol, RelocationTarget};
    let mut calls = Vec::new();
    for section in file.sections() {
        for (offset, relocation) in section.relocations() {
            let RelocationTarget::Symbol(index) = relocation.target() else { continue };
            let Ok(symbol) = file.symbol_by_index(index) else { continue };
            if symbol.name() == Ok("memmove") {
                calls.push(format!("{}+{offset:#x}", section.name().unwrap_or("?")));
            }
        }
    }
    ensure!(
        calls.is_empty(),
        "{} calls memmove (a byte-at-a-time loop in BPF) at {}: copy with `copy_value` (copy_nonoverlapping) instead",
        path.display(),
        calls.join(", ")
    );
    Ok(())
}
