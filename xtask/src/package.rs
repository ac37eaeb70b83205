//! `cargo xtask package`: the Debian package (cargo-deb, installed if missing) with the
//! agent, its systemd unit, man pages and shell completions generated from the CLI, the
//! example gateways and the monitoring files; the `splitter` group and
//! /etc/splitter/gateways come from its maintainer scripts (deploy/debian/).

use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{build::Artifacts, cargo, status, which, workspace_root};

/// The cargo-deb release the package is built with (crates.io).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Builds the package from the built agent; returns the .deb's path.
pub fn build(art: &Artifacts) -> Result<PathBuf> {
    let root = workspace_root();
    let staging = root.join("target/release/package");
    let _ = fs::remove_dir_all(&staging);
    let (man, completions) = (staging.join("man"), staging.join("completions"));
    fs::create_dir_all(&completions)?;
    status(Command::new(&art.splitter).args(["man", "--dir"]).arg(&man), "splitter man --dir")?;
    for (shell, file) in [("bash", "splitter.bash"), ("zsh", "_splitter"), ("fish", "splitter.fish")] {
        let out = Command::new(&art.splitter).args(["completions", shell]).output().context("splitter completions")?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("splitter completions {shell} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        fs::write(completions.join(file), out.stdout)?;
    }
    ensure_cargo_deb()?;
    let deb_dir = root.join("target/debian");
    let _ = fs::remove_dir_all(&deb_dir);
    // The agent is already built with its eBPF object embedded: package that binary.
    status(
        cargo().current_dir(&root).args(["deb", "--no-build", "-p", "splitter-user", "--output"]).arg(&deb_dir).envs(art.env()),
        "cargo deb",
    )?;
    let deb = fs::read_dir(&deb_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("cargo deb made no .deb")?;
    eprintln!("xtask: the Debian package: {}", deb.display());
    Ok(deb)
}

fn ensure_cargo_deb() -> Result<()> {
    if which("cargo-deb").is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (crates.io)");
    status(cargo().args(["install", "--locked", "cargo-deb", "--version", CARGO_DEB_VERSION]), "cargo install cargo-deb")
}
