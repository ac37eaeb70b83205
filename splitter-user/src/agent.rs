//! `splitter agent`: loads the XDP program, attaches it and runs until SIGTERM/SIGINT.

use std::io::Write as _;

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use clap::{Args, ValueEnum};
use log::{error, info, warn};
use splitter_common::{
    conntrack::Timeouts,
    maps::{DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAX_GATEWAYS, MAX_TARGETS_PER_GATEWAY},
    PROGRAM_NAME,
};
use tokio::{io::unix::AsyncFd, signal::unix::{signal, SignalKind}};

use crate::{
    datapath::{Datapath, Limits},
    gateway::{self, Document, Gateway},
    system,
};

/// The kernel program, built by `cargo xtask build` (empty in a plain `cargo build`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/splitter.bpf.o"));

#[derive(Args)]
pub struct AgentArgs {
    /// Interface to attach the XDP program to (repeat for several).
    #[arg(long = "iface", value_name = "IF", required = true)]
    ifaces: Vec<String>,
    /// XDP attach mode: `native` (in the driver, the fast path) or `skb` (generic, any device).
    #[arg(long, value_enum, default_value_t = XdpModeArg::Native)]
    xdp_mode: XdpModeArg,
    /// Gateway file, or directory of `*.yaml` gateway files, applied at start and on SIGHUP.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Gateways the maps are sized for.
    #[arg(long, default_value_t = DEFAULT_MAX_GATEWAYS)]
    max_gateways: u32,
    /// Conntrack capacity in entries (two per flow); least recently used entries are
    /// evicted when full.
    #[arg(long, default_value_t = DEFAULT_CONNTRACK_ENTRIES)]
    conntrack_size: u32,
    /// Seconds after which an idle UDP flow is forgotten.
    #[arg(long, default_value_t = 30)]
    udp_timeout: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    Native,
    Skb,
}

impl XdpModeArg {
    fn mode(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Skb => XdpMode::Skb,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Skb => "skb",
        }
    }
}

pub fn run(args: AgentArgs) -> Result<()> {
    for iface in &args.ifaces {
        system::ifindex(iface)?;
    }
    system::require_bpf_privileges()?;
    if EBPF_OBJECT.is_empty() {
        bail!("this binary was built without the eBPF object: build it with `cargo xtask build`");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run_agent(args))
}

async fn run_agent(args: AgentArgs) -> Result<()> {
    // Parse the configuration before touching the kernel: a bad file stops the start.
    let initial = match &args.config {
        Some(path) => load_config(path)?,
        None => Vec::new(),
    };
    // Kernel log statements at or below the agent's own level are kept; the rest are
    // skipped in the kernel at the cost of one load.
    let kernel_log_level = log::max_level() as u8;
    let limits = Limits { max_gateways: args.max_gateways.max(1), conntrack_entries: args.conntrack_size.max(2) };
    let mut ebpf = EbpfLoader::new()
        .override_global("AYA_LOG_LEVEL", &kernel_log_level, false)
        .map_max_entries("GATEWAYS", limits.max_gateways)
        .map_max_entries("GATEWAY_COUNTERS", limits.max_gateways)
        .map_max_entries("BUCKET_TABLES", 2 * limits.max_gateways)
        .map_max_entries("TARGETS", 2 * limits.max_gateways * MAX_TARGETS_PER_GATEWAY)
        .map_max_entries("CONNTRACK", limits.conntrack_entries)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object")?;
    spawn_kernel_logger(&mut ebpf);
    let mut datapath = Datapath::new(&mut ebpf, limits)?;
    for gateway in &initial {
        datapath.apply(gateway)?;
    }

    let program: &mut Xdp = ebpf
        .program_mut(PROGRAM_NAME)
        .context("the eBPF object has no XDP program named splitter")?
        .try_into()?;
    program.load().context("loading the XDP program into the kernel")?;
    let mut links = Vec::new();
    for iface in &args.ifaces {
        let link = program
            .attach(iface, args.xdp_mode.mode())
            .with_context(|| format!("attaching XDP ({} mode) to {iface}", args.xdp_mode.name()))?;
        links.push(link);
    }
    println!(
        "splitter agent ready: XDP attached to {} ({} mode), {} gateway(s)",
        args.ifaces.join(","),
        args.xdp_mode.name(),
        initial.len()
    );
    std::io::stdout().flush()?;

    let timeouts = Timeouts { udp_idle_ns: args.udp_timeout.saturating_mul(1_000_000_000), ..Timeouts::DEFAULT };
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigusr1 = signal(SignalKind::user_defined1())?;
    let mut sweep = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break }
            _ = sigint.recv() => { info!("SIGINT: detaching"); break }
            _ = sighup.recv() => match &args.config {
                Some(path) => if let Err(e) = reload(&mut datapath, path) {
                    error!("configuration not applied, nothing changed: {e:#}");
                },
                None => warn!("SIGHUP: no --config to reload"),
            },
            _ = sigusr1.recv() => print_stats(&datapath)?,
            _ = sweep.tick() => { datapath.sweep_conntrack(&timeouts)?; }
        }
    }

    let program: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into()?;
    for link in links {
        program.detach(link).context("detaching XDP")?;
    }
    print_stats(&datapath)?;
    let counters: serde_json::Map<String, serde_json::Value> =
        datapath.packet_counters()?.into_iter().map(|(k, v)| (k.to_string(), v.into())).collect();
    println!("splitter agent stopped: packet counters {}", serde_json::to_string(&counters)?);
    Ok(())
}

/// Reads every gateway document under `path`; full gateways only (weights-only
/// documents need a running gateway to update).
fn load_config(path: &std::path::Path) -> Result<Vec<Gateway>> {
    let mut out = Vec::new();
    for (file, doc) in gateway::load_path(path)? {
        match doc {
            Document::Gateway(g) => out.push(g),
            Document::Weights(w) => bail!("{}: weights-only update for {} given as a gateway configuration", file.display(), w.name),
        }
    }
    Ok(out)
}

/// Applies the configuration again: changed gateways are switched, gateways whose file
/// is gone are removed. A configuration with any error changes nothing.
fn reload(datapath: &mut Datapath, path: &std::path::Path) -> Result<()> {
    let gateways = load_config(path)?;
    for gateway in &gateways {
        if datapath.gateway(&gateway.name) != Some(gateway) {
            datapath.apply(gateway)?;
        }
    }
    for name in datapath.gateway_names() {
        if !gateways.iter().any(|g| g.name == name) {
            datapath.remove(&name)?;
        }
    }
    Ok(())
}

fn print_stats(datapath: &Datapath) -> Result<()> {
    println!("splitter stats {}", serde_json::to_string(&datapath.stats()?)?);
    std::io::stdout().flush()?;
    Ok(())
}

/// Forwards aya-log records from the kernel to the agent's log (standard build route only;
/// objects built without kernel logging have no AYA_LOGS map).
fn spawn_kernel_logger(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(aya_log::Error::MapNotFound) => return,
        Err(e) => {
            warn!("kernel logging unavailable: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's file descriptor, which stays open and the
    // same for as long as the logger lives inside the AsyncFd.
    let registered = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("kernel logging unavailable: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
