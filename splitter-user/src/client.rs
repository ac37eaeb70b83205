//! The operator's commands: talk to the agent over its control socket.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Method};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::{
    api::{Event, GatewayStats, DEFAULT_SOCKET, ORIGIN_HEADER, WARNING_HEADER},
    rollout::Rollout,
};

#[derive(Args, Clone)]
pub struct SocketArg {
    /// The agent's control socket.
    #[arg(long, env = "SPLITTER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum Output {
    Yaml,
    Json,
}

#[derive(Args)]
pub struct ApplyArgs {
    /// Gateway file (full gateway or weights-only update); repeat for several.
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// Take the change only if the gateways it changes are still at this store revision
    /// (`# store revision:` in `get`): another operator's change in between makes it fail
    /// with a conflict instead of being overwritten (agents sharing a store).
    #[arg(long, value_name = "REVISION")]
    if_revision: Option<i64>,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
pub struct GetArgs {
    /// One gateway (all when omitted).
    gateway: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Yaml)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
pub struct DeleteArgs {
    gateway: String,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
pub struct WeightArgs {
    gateway: String,
    /// ROUTE=WEIGHT, e.g. `sava/sava/sava:1.1.0/port=20%`; routes not named share what is
    /// left equally.
    #[arg(required = true, value_name = "ROUTE=WEIGHT")]
    weights: Vec<String>,
    /// Take the change only if the gateway is still at this store revision (`# store
    /// revision:` in `get`).
    #[arg(long, value_name = "REVISION")]
    if_revision: Option<i64>,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
pub struct PromoteArgs {
    gateway: String,
    /// The canary route that takes 100%.
    route: String,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
pub struct RollbackArgs {
    gateway: String,
    /// Also move established flows off the targets whose share goes down: their next
    /// packets are placed by the restored table (a flow placed elsewhere is reset).
    #[arg(long)]
    flush: bool,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
pub struct StatsArgs {
    gateway: Option<String>,
    /// Refresh in place every second until interrupted.
    #[arg(long)]
    watch: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Yaml)]
    output: Output,
    #[command(flatten)]
    socket: SocketArg,
}

/// A response: status, body and the agent's warning, if any.
pub struct Response {
    pub status: u16,
    pub body: String,
    pub warning: Option<String>,
}

/// One request to the agent.
pub async fn request(socket: &Path, method: Method, path: &str, body: Option<(String, &str)>) -> Result<Response> {
    let mut builder = hyper::Request::builder().method(method).uri(path);
    let payload = match body {
        Some((text, origin)) => {
            builder = builder.header("content-type", "application/yaml").header(ORIGIN_HEADER, origin);
            text
        }
        None => String::new(),
    };
    let (parts, bytes) = send(socket, builder.body(Full::new(Bytes::from(payload)))?).await?;
    let warning = parts.headers.get(WARNING_HEADER).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    Ok(Response { status: parts.status.as_u16(), body: String::from_utf8_lossy(&bytes).into_owned(), warning })
}

/// Sends `request` to the agent's socket (with `Host: splitter`); returns the answer's head
/// and body. A socket that cannot be reached is named with what to do.
pub async fn send(socket: &Path, mut request: hyper::Request<Full<Bytes>>) -> Result<(hyper::http::response::Parts, Bytes)> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return anyhow::anyhow!("{}", permission_denied(socket));
        }
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => " (is `splitter agent` running?)",
            _ => "",
        };
        anyhow::anyhow!("cannot reach the agent at {}: {e}{hint}", socket.display())
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    request.headers_mut().insert(hyper::header::HOST, hyper::header::HeaderValue::from_static("splitter"));
    let (parts, body) = sender.send_request(request).await?.into_parts();
    Ok((parts, body.collect().await?.to_bytes()))
}

/// Why connecting to the socket was refused, for an operator: its mode and group, and
/// what to do.
fn permission_denied(socket: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    match std::fs::metadata(socket) {
        Ok(meta) => {
            let gid = meta.gid();
            let group = crate::system::group_name(gid).map(|n| format!("'{n}' ")).unwrap_or_default();
            format!(
                "permission denied on {}: the control socket is mode {:04o}, group {group}(gid {gid}); run as root or as a member of that group (this is uid {uid})",
                socket.display(),
                meta.mode() & 0o7777
            )
        }
        Err(e) => format!(
            "permission denied on {}: {e}: a directory on the way is not searchable by uid {uid}; run as root or as a member of the socket's group",
            socket.display()
        ),
    }
}

/// Fails with the agent's one-line error unless the answer is a success; a warning of
/// the agent goes to stderr.
fn success(answer: Response) -> Result<String> {
    if answer.status >= 400 {
        // A refusal asked for as JSON (`-o json`) is Vamp's `{"message": ...}`.
        let message = serde_json::from_str::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| answer.body.trim_end().to_string());
        bail!("{message}");
    }
    if let Some(warning) = &answer.warning {
        eprintln!("splitter: warning: {warning}");
    }
    Ok(answer.body)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Percent-encodes a path segment or query value (gateway names keep their slashes).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => out.push(b as char),
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

pub fn apply(args: ApplyArgs) -> Result<()> {
    runtime()?.block_on(async {
        for file in &args.files {
            let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))?;
            let origin = file.display().to_string();
            let path = match args.if_revision {
                Some(r) => format!("/api/v1/gateways?if_revision={r}"),
                None => "/api/v1/gateways".to_string(),
            };
            let body = success(request(&args.socket.socket, Method::POST, &path, Some((text, &origin))).await?)?;
            print!("{body}");
        }
        Ok(())
    })
}

pub fn get(args: GetArgs) -> Result<()> {
    let path = match &args.gateway {
        Some(g) => format!("/api/v1/gateways/{}", encode(g, true)),
        None => "/api/v1/gateways".to_string(),
    };
    let path = if args.output == Output::Json { format!("{path}?output=json") } else { path };
    let body = runtime()?.block_on(async { success(request(&args.socket.socket, Method::GET, &path, None).await?) })?;
    print!("{body}");
    if args.output == Output::Json {
        println!();
    }
    Ok(())
}

pub fn delete(args: DeleteArgs) -> Result<()> {
    let path = format!("/api/v1/gateways/{}", encode(&args.gateway, true));
    let body = runtime()?.block_on(async { success(request(&args.socket.socket, Method::DELETE, &path, None).await?) })?;
    print!("{body}");
    Ok(())
}

/// Builds the weights-only document for `splitter weight`.
fn weights_document(gateway: &str, weights: &[String]) -> Result<String> {
    let mut doc = format!("name: {}\nroutes:\n", yaml_string(gateway));
    for pair in weights {
        let (route, weight) = pair.rsplit_once('=').with_context(|| format!("{pair:?}: expected ROUTE=WEIGHT, e.g. canary=20%"))?;
        doc.push_str(&format!("  {}:\n    weight: {}\n", yaml_string(route), yaml_string(weight)));
    }
    Ok(doc)
}

/// A YAML double-quoted scalar.
fn yaml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

pub fn weight(args: WeightArgs) -> Result<()> {
    let doc = weights_document(&args.gateway, &args.weights)?;
    let mut path = format!("/api/v1/gateways/{}", encode(&args.gateway, true));
    if let Some(r) = args.if_revision {
        path.push_str(&format!("?if_revision={r}"));
    }
    let body =
        runtime()?.block_on(async { success(request(&args.socket.socket, Method::PUT, &path, Some((doc, "splitter weight"))).await?) })?;
    print!("{body}");
    Ok(())
}

pub fn promote(args: PromoteArgs) -> Result<()> {
    let path = format!("/api/v1/promote/{}?route={}", encode(&args.gateway, true), encode(&args.route, false));
    let body = runtime()?.block_on(async { success(request(&args.socket.socket, Method::POST, &path, None).await?) })?;
    print!("{body}");
    Ok(())
}

pub fn rollback(args: RollbackArgs) -> Result<()> {
    let mut path = format!("/api/v1/rollback/{}", encode(&args.gateway, true));
    if args.flush {
        path.push_str("?flush=true");
    }
    let body = runtime()?.block_on(async { success(request(&args.socket.socket, Method::POST, &path, None).await?) })?;
    print!("{body}");
    Ok(())
}

pub fn stats(args: StatsArgs) -> Result<()> {
    let path = match &args.gateway {
        Some(g) => format!("/api/v1/stats/{}", encode(g, true)),
        None => "/api/v1/stats".to_string(),
    };
    runtime()?.block_on(async {
        loop {
            let body = success(request(&args.socket.socket, Method::GET, &path, None).await?)?;
            let text = if args.output == Output::Json {
                format!("{body}\n")
            } else {
                render_stats(&serde_json::from_str::<Vec<GatewayStats>>(&body).context("the agent's stats")?)
            };
            if args.watch {
                // Home the cursor and clear the screen, then redraw.
                print!("\x1b[H\x1b[2J{text}");
                std::io::stdout().flush()?;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            } else {
                print!("{text}");
                return Ok(());
            }
        }
    })
}

/// The stats table: per gateway, a line per target.
fn render_stats(stats: &[GatewayStats]) -> String {
    let mut out = String::new();
    for g in stats {
        out.push_str(&format!(
            "gateway {}  generation {}  new flows {} ({} since the last weight change)  no target {}  conntrack misses {}\n",
            g.name, g.generation, g.new_flows, g.new_flows_since_change, g.no_target, g.conntrack_miss,
        ));
        out.push_str(&format!(
            "  {:<32} {:<22} {:>8} {:>9} {:>9} {:>10} {:>10} {:>12} {:>7} {:>9} {:>10} {:>8}\n",
            "ROUTE",
            "TARGET",
            "WEIGHT",
            "OBSERVED",
            "FLOWS",
            "PKTS IN",
            "PKTS OUT",
            "BYTES OUT",
            "RESETS",
            "CONN FAIL",
            "CONNECT",
            "HTTP 5XX"
        ));
        for t in &g.targets {
            let observed = t.observed_share.map(|s| format!("{s:.1}%")).unwrap_or_else(|| "-".into());
            let connect = match t.connects {
                0 => "-".into(),
                n => format!("{:.2}ms", t.connect_ns_total as f64 / n as f64 / 1e6),
            };
            let responses: u64 = t.http_responses.iter().sum();
            let http_5xx =
                if responses > 0 { format!("{:.1}%", 100.0 * t.http_responses[4] as f64 / responses as f64) } else { "-".into() };
            out.push_str(&format!(
                "  {:<32} {:<22} {:>8} {:>9} {:>9} {:>10} {:>10} {:>12} {:>7} {:>9} {:>10} {:>8}\n",
                t.route,
                t.target,
                format!("{:.2}%", t.configured_share),
                observed,
                t.new_flows,
                t.packets_to_target,
                t.packets_from_target,
                t.bytes_from_target,
                t.resets_from_target,
                t.failed_connects,
                connect,
                http_5xx,
            ));
        }
    }
    if out.is_empty() {
        out.push_str("no gateways\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_document_splits_at_the_last_equals_sign() {
        let doc = weights_document("sava/sava/port", &["sava/sava/sava:1.1.0/port=20%".into()]).unwrap();
        assert_eq!(doc, "name: \"sava/sava/port\"\nroutes:\n  \"sava/sava/sava:1.1.0/port\":\n    weight: \"20%\"\n");
        assert!(weights_document("g", &["no-weight".into()]).is_err());
    }

    #[test]
    fn paths_are_encoded() {
        assert_eq!(encode("sava/sava:1.1.0 x", true), "sava/sava:1.1.0%20x");
        assert_eq!(encode("a/b", false), "a%2Fb");
    }
}

#[derive(clap::Subcommand)]
pub enum CanaryCommand {
    /// Start a progressive rollout of a route: its weight moves step by step, judged at
    /// every step from what the splitter sees, rolled back on a breach.
    Start(CanaryStartArgs),
    /// Rollouts: state (progressing, paused, promoted, rolled-back), step, reason.
    Status(CanaryGatewayOpt),
    /// Hold the rollout at its current step.
    Pause(CanaryGatewayArg),
    /// Continue a paused rollout.
    Resume(CanaryGatewayArg),
    /// Stop the rollout: the routes go back to their weights before it.
    Abort(CanaryGatewayArg),
    /// Finish the rollout now: the canary takes 100%.
    Promote(CanaryGatewayArg),
    /// Approve the promotion of a rollout waiting for its confirm-promotion webhooks.
    Approve(CanaryGatewayArg),
}

#[derive(Args)]
pub struct CanaryStartArgs {
    gateway: String,
    /// The canary route.
    #[arg(long)]
    route: String,
    /// Canary weights, ending at 100.
    #[arg(long, default_value = "5,10,25,50,100", value_delimiter = ',')]
    steps: Vec<String>,
    /// Time at each step before it is judged.
    #[arg(long, default_value = "30s")]
    interval: String,
    /// Most resets of established flows plus failed connects of canary targets per new
    /// canary flow.
    #[arg(long, default_value = "5%")]
    max_error_rate: String,
    /// Most HTTP 5xx responses of canary targets per response (default 5% on HTTP gateways).
    #[arg(long)]
    max_http_error_rate: Option<String>,
    /// Most failed health checks of canary targets in a window.
    #[arg(long, default_value_t = 1)]
    max_failed_checks: u32,
    /// Most connect latency (SYN to SYN-ACK): absolute (50ms) or relative to stable (2x).
    #[arg(long)]
    max_connect_latency: Option<String>,
    /// New canary flows a window needs before it is judged (fewer: wait).
    #[arg(long, default_value_t = 20)]
    min_flows: u32,
    /// On rollback, also end the canary's established flows.
    #[arg(long)]
    flush: bool,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
pub struct CanaryGatewayArg {
    gateway: String,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
pub struct CanaryGatewayOpt {
    gateway: Option<String>,
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
pub struct EventsArgs {
    /// Only this gateway's events.
    gateway: Option<String>,
    /// Keep printing new events until interrupted.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    socket: SocketArg,
}

fn canary_spec(args: &CanaryStartArgs) -> Result<crate::gateway::policy::CanarySpec> {
    use crate::gateway::{parse_weight, policy};
    let steps = args.steps.iter().map(|s| parse_weight(s).map_err(|e| anyhow::anyhow!("--steps: {e}"))).collect::<Result<Vec<u32>>>()?;
    let interval_ms = policy::parse_duration_us(&args.interval).map_err(|e| anyhow::anyhow!("--interval: {e}"))?.div_ceil(1000);
    let max_error_rate = parse_weight(&args.max_error_rate).map_err(|e| anyhow::anyhow!("--max-error-rate: {e}"))?;
    let max_http_error_rate = args
        .max_http_error_rate
        .as_deref()
        .map(|r| parse_weight(r).map_err(|e| anyhow::anyhow!("--max-http-error-rate: {e}")))
        .transpose()?;
    let max_connect_latency = args
        .max_connect_latency
        .as_deref()
        .map(|l| policy::parse_latency_limit(l).map_err(|e| anyhow::anyhow!("--max-connect-latency: {e}")))
        .transpose()?;
    let spec = policy::CanarySpec {
        route: args.route.clone(),
        steps,
        interval_ms,
        thresholds: policy::Thresholds {
            max_error_rate,
            max_http_error_rate,
            max_failed_checks: args.max_failed_checks,
            max_connect_latency,
            min_flows: args.min_flows,
            flush_on_rollback: args.flush,
        },
        analysis: policy::Analysis { max_inconclusive: 3, ..policy::Analysis::default() },
    };
    spec.check().map_err(|p| {
        let option = p.field.split('[').next().unwrap_or(&p.field).replace('_', "-");
        anyhow::anyhow!("--{option}: {}", p.message)
    })?;
    Ok(spec)
}

pub fn canary(command: CanaryCommand) -> Result<()> {
    let (socket, method, path, body) = match &command {
        CanaryCommand::Start(args) => {
            let spec = serde_json::to_string(&canary_spec(args)?)?;
            (&args.socket, Method::POST, format!("/api/v1/canary/start/{}", encode(&args.gateway, true)), Some(spec))
        }
        CanaryCommand::Status(args) => {
            let path = match &args.gateway {
                Some(g) => format!("/api/v1/canary/{}", encode(g, true)),
                None => "/api/v1/canary".into(),
            };
            (&args.socket, Method::GET, path, None)
        }
        CanaryCommand::Pause(a) => (&a.socket, Method::POST, format!("/api/v1/canary/pause/{}", encode(&a.gateway, true)), None),
        CanaryCommand::Resume(a) => (&a.socket, Method::POST, format!("/api/v1/canary/resume/{}", encode(&a.gateway, true)), None),
        CanaryCommand::Abort(a) => (&a.socket, Method::POST, format!("/api/v1/canary/abort/{}", encode(&a.gateway, true)), None),
        CanaryCommand::Promote(a) => (&a.socket, Method::POST, format!("/api/v1/canary/promote/{}", encode(&a.gateway, true)), None),
        CanaryCommand::Approve(a) => (&a.socket, Method::POST, format!("/api/v1/canary/approve/{}", encode(&a.gateway, true)), None),
    };
    let body = runtime()?
        .block_on(async { success(request(&socket.socket, method, &path, body.map(|b| (b, "splitter canary start"))).await?) })?;
    let rollouts: Vec<Rollout> = serde_json::from_str(&body).context("the agent's answer")?;
    for r in rollouts {
        let steps: Vec<String> = r.spec.steps.iter().map(|s| crate::gateway::format_weight(*s)).collect();
        println!(
            "{}: {} at step {}/{} ({} at {}); steps [{}]: {}",
            r.gateway,
            r.state.name(),
            r.step + 1,
            steps.len(),
            r.spec.route,
            steps.get(r.step).map(String::as_str).unwrap_or("?"),
            steps.join(", "),
            r.reason
        );
        if let Some(signals) = &r.signals {
            println!("  {signals}");
        }
    }
    Ok(())
}

pub fn events(args: EventsArgs) -> Result<()> {
    runtime()?.block_on(async {
        let mut since = 0u64;
        loop {
            let body = success(request(&args.socket.socket, Method::GET, &format!("/api/v1/events?since={since}"), None).await?)?;
            let events: Vec<Event> = serde_json::from_str(&body).context("the agent's events")?;
            for e in events {
                since = since.max(e.id);
                if args.gateway.as_ref().is_some_and(|g| *g != e.gateway) {
                    continue;
                }
                let time = std::time::UNIX_EPOCH + Duration::from_millis(e.time_ms);
                println!("{} {} {}: {}", humantime::format_rfc3339_millis(time), e.gateway, e.kind, e.message);
            }
            std::io::stdout().flush()?;
            if !args.follow {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    })
}
