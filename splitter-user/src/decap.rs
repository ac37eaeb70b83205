//! `splitter decap`: on a target of direct-server-return gateways whose kernel has no
//! `ipip` device, attaches the project's decapsulation program to the interfaces the
//! splitter's encapsulated packets arrive on, until SIGTERM or SIGINT (then detaches it).
//! The target holds the VIP on its loopback; each decapsulated packet goes up its stack
//! addressed to the VIP, and the answer goes to the client directly.

use anyhow::{bail, Context, Result};
use aya::programs::Xdp;
use clap::Args;
use log::info;
use splitter_common::{map_names, DECAP_PROGRAM_NAME};
use tokio::signal::unix::{signal, SignalKind};

use crate::{agent::XdpModeArg, system};

#[derive(Args, Debug)]
pub struct DecapArgs {
    /// Interface the encapsulated packets arrive on (repeat for several)
    #[arg(long = "iface", value_name = "IF", required = true)]
    pub ifaces: Vec<String>,
    /// XDP attach mode: `native` (in the driver) or `skb` (generic, any device)
    #[arg(long, value_enum, default_value_t = XdpModeArg::Native)]
    pub xdp_mode: XdpModeArg,
}

/// Entries the datapath's flow tables get in the decapsulation program's object: it uses
/// none of the datapath's maps, which the loader creates all the same.
const UNUSED_MAP_ENTRIES: u32 = 256;

pub fn run(args: DecapArgs) -> Result<()> {
    for iface in &args.ifaces {
        system::ifindex(iface)?;
    }
    system::require_bpf_privileges(None)?;
    let object = crate::agent::ebpf_object();
    if object.is_empty() {
        bail!("this binary was built without the eBPF object: build it with `cargo xtask build`");
    }
    let mut loader = aya::EbpfLoader::new();
    for name in map_names::FLOW_TABLES {
        loader.map_max_entries(name, UNUSED_MAP_ENTRIES);
    }
    let mut ebpf = loader.load(object).context("loading the eBPF object")?;
    let program: &mut Xdp = ebpf
        .program_mut(DECAP_PROGRAM_NAME)
        .context("the eBPF object has no decapsulation program")?
        .try_into()
        .context("the decapsulation program is not an XDP program")?;
    program.load().context("loading the decapsulation program")?;
    for iface in &args.ifaces {
        program.attach(iface, args.xdp_mode.mode()).with_context(|| format!("attaching the decapsulation program to {iface}"))?;
    }
    println!(
        "splitter decap: IP-in-IP packets on {} ({} mode) are decapsulated and go up the stack; SIGTERM or SIGINT detaches",
        args.ifaces.join(", "),
        args.xdp_mode.name()
    );
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: detaching"),
            _ = sigint.recv() => info!("SIGINT: detaching"),
        }
        anyhow::Ok(())
    })?;
    // Dropping the object detaches the program from every interface.
    drop(ebpf);
    println!("splitter decap: detached from {}", args.ifaces.join(", "));
    Ok(())
}
