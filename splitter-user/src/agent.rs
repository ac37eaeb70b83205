//! `splitter agent`: loads (or adopts) the XDP datapath, applies the configuration, serves
//! the control socket and follows the configuration files until SIGTERM/SIGINT.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::programs::XdpMode;
use clap::{Args, ValueEnum};
use log::{info, warn};
use splitter_common::{
    conntrack::Timeouts,
    maps::{DEFAULT_CONNTRACK_ENTRIES, DEFAULT_HALF_OPEN_ENTRIES, DEFAULT_MAX_GATEWAYS},
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::oneshot,
};

use crate::{
    analysis,
    api::{Answer, DEFAULT_SOCKET},
    attach,
    cluster::{etcd::EtcdStore, StoreUrl},
    config, control,
    controller::{Controller, Inbox, Op, Settings},
    datapath::{Datapath, Limits},
    health::{self, HealthReport},
    pin::Pins,
    state, system,
};

/// Health reports into the controller's inbox.
#[derive(Clone)]
struct InboxReporter(mpsc::Sender<Inbox>);

impl health::Reporter for InboxReporter {
    fn report(&self, report: HealthReport) -> bool {
        self.0.send(Inbox::Health(report)).is_ok()
    }
}

/// The kernel program, built by `cargo xtask build` (empty in a plain `cargo build`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/splitter.bpf.o"));

#[derive(Args)]
pub struct AgentArgs {
    /// Interface to attach the XDP program to (repeat for several).
    #[arg(long = "iface", value_name = "IF", required_unless_present = "cleanup")]
    ifaces: Vec<String>,
    /// XDP attach mode: `native` (in the driver, the fast path) or `skb` (generic, any device).
    #[arg(long, value_enum, default_value_t = XdpModeArg::Native)]
    xdp_mode: XdpModeArg,
    /// Gateway file, or directory of `*.yaml` gateway files: applied at start, then
    /// followed (changes apply within a second; SIGHUP re-reads at once).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The control socket (created mode 0660).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Group owning the control socket (a name or a numeric gid): its members may use the
    /// CLI without root. Default: the agent's own group.
    #[arg(long, value_name = "NAME|GID")]
    socket_group: Option<String>,
    /// Where the applied gateways are saved.
    #[arg(long, default_value = "/var/lib/splitter")]
    state_dir: PathBuf,
    /// Where the program, its links and its maps are pinned (a BPF filesystem is mounted
    /// there if it is not on one).
    #[arg(long, default_value = "/sys/fs/bpf/splitter")]
    bpffs: PathBuf,
    /// Pin nothing and save nothing: the datapath goes away with the agent.
    #[arg(long)]
    ephemeral: bool,
    /// Detach and remove everything pinned under --bpffs, then exit.
    #[arg(long)]
    cleanup: bool,
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
    /// Half-open table capacity in entries (two per TCP flow still in its handshake); a SYN
    /// flood evicts only these, never an established flow.
    #[arg(long, default_value_t = DEFAULT_HALF_OPEN_ENTRIES)]
    half_open_size: u32,
    /// How long a TCP flow may take to complete its handshake before its state and its
    /// full-NAT port are given back (e.g. 3s, 500ms).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    half_open_timeout: Duration,
    /// How long a target may take to answer a new flow's SYN: one the client has to send
    /// again after this is a failed connect (counted per target; a canary's count towards its
    /// error rate).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Load this eBPF object instead of the one built into the binary (upgrade tests, or a
    /// datapath fix without rebuilding the agent).
    #[arg(long, value_name = "PATH", hide = true)]
    ebpf_object: Option<PathBuf>,
    /// Share gateways, weights, history and rollouts with the agents of other nodes through
    /// etcd: `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`. Changes made on any node are written
    /// there (compare-and-swap) and applied by every node; one node drives the rollouts.
    #[arg(long, value_name = "URL", value_parser = parse_store_url)]
    store: Option<StoreUrl>,
    /// This node's name among the agents sharing a store (default: the host name).
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
}

fn parse_store_url(text: &str) -> Result<StoreUrl, String> {
    StoreUrl::parse(text)
}

/// The host name, for a node's default name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "splitter".into())
}

/// The XDP attach modes operators choose from.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum XdpModeArg {
    Native,
    Skb,
}

/// The eBPF object built into the binary (empty when built without it).
pub fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

impl XdpModeArg {
    pub fn mode(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Skb => XdpMode::Skb,
        }
    }
    pub fn name(self) -> &'static str {
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
    let socket_group = args.socket_group.as_deref().map(system::resolve_group).transpose()?;
    let mount_on = if args.ephemeral { None } else { crate::pin::mount_needed(&args.bpffs) };
    system::require_bpf_privileges(mount_on.as_deref())?;
    if args.cleanup {
        return cleanup(&args.bpffs);
    }
    if EBPF_OBJECT.is_empty() {
        bail!("this binary was built without the eBPF object: build it with `cargo xtask build`");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run_agent(args, socket_group))
}

fn cleanup(bpffs: &Path) -> Result<()> {
    if !bpffs.exists() {
        println!("nothing pinned at {}", bpffs.display());
        return Ok(());
    }
    let pins = Pins::open(bpffs)?;
    let removed = pins.remove_all()?;
    println!("removed {} pinned object(s) under {}; the XDP program is detached", removed.len(), bpffs.display());
    Ok(())
}

async fn run_agent(args: AgentArgs, socket_group: Option<u32>) -> Result<()> {
    let limits = Limits {
        max_gateways: args.max_gateways.max(1),
        conntrack_entries: args.conntrack_size.max(2),
        half_open_entries: args.half_open_size.max(2),
        half_open_timeout_ns: args.half_open_timeout.as_nanos().min(u128::from(u64::MAX)) as u64,
        connect_timeout_ns: args.connect_timeout.as_nanos().min(u128::from(u64::MAX)) as u64,
    };
    let pins = if args.ephemeral { None } else { Some(Pins::open(&args.bpffs)?) };
    let object = match &args.ebpf_object {
        Some(path) => std::fs::read(path).with_context(|| format!("reading the eBPF object {}", path.display()))?,
        None => EBPF_OBJECT.to_vec(),
    };
    // Kernel log statements at or below the agent's own level are kept; the rest are
    // skipped in the kernel at the cost of one load.
    let kernel_log_level = log::max_level() as u8;
    let running = attach::run(&object, &args.ifaces, args.xdp_mode.mode(), limits, pins.as_ref(), kernel_log_level)
        .with_context(|| format!("starting the datapath ({} mode)", args.xdp_mode.name()))?;
    let attach::Running { maps, program_id, build_id, how, ebpf } = running;
    let mut ebpf = ebpf;
    match ebpf.as_mut() {
        Some(ebpf) => spawn_kernel_logger(aya_log::EbpfLogger::init(ebpf)),
        None => spawn_kernel_logger(aya_log::EbpfLogger::init_from_id(program_id)),
    }
    let adopting = how != attach::How::Attached;
    let build = attach::describe_build(build_id);
    let how_line = match &how {
        attach::How::Attached => "attached to".to_string(),
        attach::How::Adopted => "adopted on".to_string(),
        attach::How::Upgraded { from_build, from_program } => format!(
            "upgraded (program {from_program}, build {}, replaced; flows kept) on",
            from_build.map_or("unknown".into(), attach::describe_build)
        ),
    };

    let datapath = Datapath::new(maps, limits);
    let state_dir = (!args.ephemeral).then(|| args.state_dir.clone());
    let saved = match &state_dir {
        Some(dir) => state::load(dir)?,
        None => None,
    };
    let timeouts = Timeouts { udp_idle_ns: args.udp_timeout.saturating_mul(1_000_000_000), ..Timeouts::DEFAULT };
    let settings = Settings { state_dir, config: args.config.clone(), timeouts, program_id, build: build.clone() };
    let mut controller = Controller::new(datapath, settings);
    if let Some(saved) = &saved {
        controller.restore(saved, adopting);
    }
    let (checks_tx, checks_rx) = tokio::sync::mpsc::unbounded_channel();
    controller.set_health_checks(checks_tx);
    let (analysis_tx, analysis_rx) = tokio::sync::mpsc::unbounded_channel();
    controller.set_checks(analysis_tx);
    let mut fingerprint = args.config.as_deref().map(config::fingerprint);
    let (commands, inbox) = mpsc::channel::<Inbox>();
    match &args.store {
        // The configuration files are written through the store once it is reached; until
        // then the node forwards with its saved state.
        Some(url) => {
            let node = args.node_name.clone().unwrap_or_else(host_name);
            let tell = {
                let inbox = commands.clone();
                move |update| inbox.send(Inbox::Store(update)).is_ok()
            };
            let store = EtcdStore::start(url.clone(), node.clone(), tell)?;
            info!("following the store {} as node {node}", url.display());
            controller.set_store(Box::new(store));
        }
        None => controller.sync_config(),
    }
    controller.save_now();

    let controller_thread = std::thread::Builder::new().name("controller".into()).spawn(move || controller.run(inbox))?;
    let listener = control::bind(&args.socket, socket_group)?;
    let server = tokio::spawn(control::serve_listener(listener, commands.clone()));
    let checker = tokio::spawn(health::run_checks(checks_rx, InboxReporter(commands.clone())));
    let analyst = {
        let inbox = commands.clone();
        tokio::spawn(analysis::run(analysis_rx, move |report| inbox.send(Inbox::Check(report)).is_ok()))
    };

    // Handled from before `ready`: a SIGTERM right after it stops the agent cleanly.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigusr1 = signal(SignalKind::user_defined1())?;
    println!(
        "splitter agent ready: XDP {how_line} {} ({} mode), program {program_id} build {build}, control socket {}",
        args.ifaces.join(","),
        args.xdp_mode.name(),
        args.socket.display()
    );
    std::io::stdout().flush()?;

    let mut poll = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break }
            _ = sighup.recv() => {
                ask(&commands, Op::SyncConfig).await;
                match &args.config {
                    Some(path) => info!("SIGHUP: configuration reloaded from {}", path.display()),
                    None => info!("SIGHUP: no --config to reload"),
                }
            }
            _ = sigusr1.recv() => print_stats(&commands).await,
            _ = poll.tick() => if let Some(path) = &args.config {
                let now = config::fingerprint(path);
                if Some(now) != fingerprint {
                    fingerprint = Some(now);
                    let _ = commands.send(Inbox::ConfigChanged);
                }
            },
        }
    }
    server.abort();
    checker.abort();
    analyst.abort();
    print_stats(&commands).await;
    let packets = match ask(&commands, Op::Metrics).await {
        Some(Answer::Metrics(text)) => packet_counters_json(&text),
        _ => "{}".into(),
    };
    let _ = commands.send(Inbox::Stop);
    drop(commands);
    // The service thread ends once every sender is gone. The aborted tasks drop theirs
    // only when the runtime runs them again, so wait without blocking it (a blocking join
    // here could wait for ever), and not for ever: a client still connected holds one.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !controller_thread.is_finished() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if controller_thread.is_finished() {
        let _ = controller_thread.join();
    } else {
        warn!("a control connection is still open; stopping without waiting for it");
    }
    let _ = std::fs::remove_file(&args.socket);
    match ebpf {
        Some(ebpf) if args.ephemeral => {
            drop(ebpf);
            println!("splitter agent stopped: XDP detached; packet counters {packets}");
        }
        _ => println!(
            "splitter agent stopped: the datapath keeps forwarding from {} (`splitter agent --cleanup` removes it); packet counters {packets}",
            args.bpffs.display()
        ),
    }
    Ok(())
}

/// Sends a request to the controller and waits for its answer (none once it stopped).
async fn ask(commands: &mpsc::Sender<Inbox>, op: Op) -> Option<Answer> {
    let (reply, rx) = oneshot::channel();
    commands.send(Inbox::Operator { op, reply }).ok()?;
    rx.await.ok()?.ok().map(|r| r.answer)
}

async fn print_stats(commands: &mpsc::Sender<Inbox>) {
    if let Some(answer) = ask(commands, Op::Stats(None)).await {
        println!("splitter stats {}", answer.render(crate::api::Format::Json).1);
        let _ = std::io::stdout().flush();
    }
}

/// The `splitter_packets_total` samples of a metrics text, as a JSON object by kind.
fn packet_counters_json(metrics: &str) -> String {
    let mut out = serde_json::Map::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("splitter_packets_total{kind=\"") else { continue };
        if let Some((kind, value)) = rest.split_once("\"} ") {
            out.insert(kind.to_string(), value.parse::<u64>().unwrap_or(0).into());
        }
    }
    serde_json::Value::Object(out).to_string()
}

/// Forwards aya-log records from the kernel to the agent's log (standard build route only;
/// objects built without kernel logging have no AYA_LOGS map).
fn spawn_kernel_logger(logger: Result<aya_log::EbpfLogger<&'static dyn log::Log>, aya_log::Error>) {
    let logger = match logger {
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
