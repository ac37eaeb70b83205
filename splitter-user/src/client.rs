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

pub const DEFAULT_SOCKET: &str = "/run/splitter/splitter.sock";

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
    /// Also end the established flows of routes that lose all their weight.
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

/// A response: status and body.
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// One request to the agent.
pub async fn request(socket: &Path, method: Method, path: &str, body: Option<(String, &str)>) -> Result<Answer> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => " (is `splitter agent` running?)",
            std::io::ErrorKind::PermissionDenied => " (the socket is mode 0660: run as root or a member of its group)",
            _ => "",
        };
        anyhow::anyhow!("cannot reach the agent at {}: {e}{hint}", socket.display())
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut builder = hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, "splitter");
    let payload = match body {
        Some((text, origin)) => {
            builder = builder.header("content-type", "application/yaml").header("x-splitter-origin", origin);
            text
        }
        None => String::new(),
    };
    let response = sender.send_request(builder.body(Full::new(Bytes::from(payload)))?).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok(Answer { status, body: String::from_utf8_lossy(&bytes).into_owned() })
}

/// Fails with the agent's one-line error unless the answer is a success.
fn success(answer: Answer) -> Result<String> {
    if answer.status >= 400 {
        bail!("{}", answer.body.trim_end());
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
            let body = success(request(&args.socket.socket, Method::POST, "/api/v1/gateways", Some((text, &origin))).await?)?;
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
        let (route, weight) = pair
            .rsplit_once('=')
            .with_context(|| format!("{pair:?}: expected ROUTE=WEIGHT, e.g. canary=20%"))?;
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
    let path = format!("/api/v1/gateways/{}", encode(&args.gateway, true));
    let body = runtime()?.block_on(async {
        success(request(&args.socket.socket, Method::PUT, &path, Some((doc, "splitter weight"))).await?)
    })?;
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
                render_stats(&serde_json::from_str(&body).context("the agent's stats")?)
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
fn render_stats(stats: &serde_json::Value) -> String {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mut out = String::new();
    for g in stats.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "gateway {}  generation {}  new flows {} ({} since the last weight change)  no target {}  conntrack misses {}\n",
            g["name"].as_str().unwrap_or(""),
            g["generation"],
            g["new_flows"],
            g["new_flows_since_change"],
            g["no_target"],
            g["conntrack_miss"],
        ));
        out.push_str(&format!(
            "  {:<32} {:<22} {:>8} {:>9} {:>9} {:>10} {:>10} {:>12} {:>7} {:>10}\n",
            "ROUTE", "TARGET", "WEIGHT", "OBSERVED", "FLOWS", "PKTS IN", "PKTS OUT", "BYTES OUT", "RESETS", "CONNECT"
        ));
        for t in g["targets"].as_array().into_iter().flatten() {
            let observed = t["observed_share"].as_f64().map(|s| format!("{s:.1}%")).unwrap_or_else(|| "-".into());
            let connects = t["connects"].as_u64().unwrap_or(0);
            let connect = if connects > 0 {
                format!("{:.2}ms", t["connect_ns_total"].as_u64().unwrap_or(0) as f64 / connects as f64 / 1e6)
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "  {:<32} {:<22} {:>8} {:>9} {:>9} {:>10} {:>10} {:>12} {:>7} {:>10}\n",
                t["route"].as_str().unwrap_or(""),
                t["target"].as_str().unwrap_or(""),
                format!("{:.2}%", t["configured_share"].as_f64().unwrap_or(0.0)),
                observed,
                n(&t["new_flows"]),
                n(&t["packets_to_target"]),
                n(&t["packets_from_target"]),
                n(&t["bytes_from_target"]),
                n(&t["resets_from_target"]),
                connect,
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
