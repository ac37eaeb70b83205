//! `splitter agent`: loads the XDP program, attaches it and runs until SIGTERM/SIGINT.

use std::io::Write as _;

use anyhow::{bail, Context, Result};
use aya::{
    maps::PerCpuArray,
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use clap::{Args, ValueEnum};
use log::{info, warn};
use splitter_common::{PacketClass, PROGRAM_NAME};
use tokio::{io::unix::AsyncFd, signal::unix::{signal, SignalKind}};

use crate::system;

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
    // Kernel log statements at or below the agent's own level are kept; the rest are
    // skipped in the kernel at the cost of one load.
    let kernel_log_level = log::max_level() as u8;
    let mut ebpf = EbpfLoader::new()
        .override_global("AYA_LOG_LEVEL", &kernel_log_level, false)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object")?;
    spawn_kernel_logger(&mut ebpf);

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
        "splitter agent ready: XDP attached to {} ({} mode)",
        args.ifaces.join(","),
        args.xdp_mode.name()
    );
    std::io::stdout().flush()?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: detaching"),
        _ = sigint.recv() => info!("SIGINT: detaching"),
    }

    let program: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).unwrap().try_into()?;
    for link in links {
        program.detach(link).context("detaching XDP")?;
    }
    let counters = read_packet_counters(&ebpf)?;
    println!("splitter agent stopped: packet counters {}", serde_json::to_string(&counters)?);
    Ok(())
}

/// Sums the per-CPU packet counters by class name.
fn read_packet_counters(ebpf: &Ebpf) -> Result<serde_json::Map<String, serde_json::Value>> {
    let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
        ebpf.map("PACKET_COUNTERS").context("no PACKET_COUNTERS map")?,
    )?;
    let mut out = serde_json::Map::new();
    for class in PacketClass::ALL {
        let total: u64 = map.get(&class.0, 0)?.iter().sum();
        out.insert(class.name().to_string(), total.into());
    }
    Ok(out)
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
