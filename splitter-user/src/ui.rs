//! `splitter ui`: a live dashboard in the browser, served over TCP (loopback by default)
//! and talking to the agent through its control socket, like the CLI.
//!
//! Whoever can start it already has the socket; the page it serves can move production
//! traffic, so nothing else may use it: every request carries a random token made at start
//! (printed in the URL, as Jupyter does), the Host header must name this server (no DNS
//! rebinding), and a request that comes from another origin (`Origin`, `Sec-Fetch-Site`)
//! is refused (no cross-site form posts). The page is one embedded file; no assets are
//! fetched from anywhere.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result};
use clap::Args;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Bytes, header, server::conn::http1, service::service_fn, HeaderMap, Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{client::SocketArg, control::MAX_BODY_BYTES};

/// The dashboard page (HTML, CSS and script in one file).
const PAGE: &str = include_str!("ui/index.html");
/// The header every API request of the page carries the token in.
pub const TOKEN_HEADER: &str = "x-splitter-token";

#[derive(Args)]
pub struct UiArgs {
    /// Address and port to serve on. Loopback by default: the page moves production
    /// traffic. Port 0 picks a free one (printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    socket: SocketArg,
}

/// Who may use the dashboard: requests with this token, addressed to these hosts.
#[derive(Clone, Debug)]
pub struct Guard {
    token: String,
    /// `Host` values that name this server (`127.0.0.1:8080`, `localhost:8080`).
    hosts: Vec<String>,
    /// Served on every address (`0.0.0.0`, `::`): any IP literal on this port names it too.
    /// A DNS-rebinding page reaches the server under its own host name, never as an IP
    /// literal, so these are safe to accept.
    any_address_port: Option<u16>,
}

impl Guard {
    pub fn new(token: String, listen: SocketAddr) -> Self {
        let port = listen.port();
        let mut hosts = vec![listen.to_string(), format!("localhost:{port}")];
        if listen.ip().is_unspecified() || listen.ip().is_loopback() {
            hosts.extend([format!("127.0.0.1:{port}"), format!("[::1]:{port}")]);
        }
        // Browsers leave the default port out of Host.
        if port == 80 {
            let bare: Vec<String> = hosts.iter().filter_map(|h| h.strip_suffix(":80").map(str::to_string)).collect();
            hosts.extend(bare);
        }
        hosts.sort();
        hosts.dedup();
        Self { token, hosts, any_address_port: listen.ip().is_unspecified().then_some(port) }
    }

    /// Whether `host` (a `Host` header, or an `Origin` without its scheme) names this server.
    fn names_this_server(&self, host: &str) -> bool {
        if self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return true;
        }
        let Some(port) = self.any_address_port else { return false };
        if let Ok(addr) = host.parse::<SocketAddr>() {
            return addr.port() == port;
        }
        // Browsers leave the default port out of Host.
        port == 80
            && (host.parse::<std::net::Ipv4Addr>().is_ok()
                || host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok()))
    }

    /// Whether a request may be served: `Err` holds the status and the one-line reason.
    /// A page load (`GET /`) may carry the token in the query (the printed URL); API
    /// requests carry it in [`TOKEN_HEADER`], which a cross-site form cannot set.
    pub fn check(&self, method: &Method, path: &str, query: &str, headers: &HeaderMap) -> Result<(), (u16, String)> {
        let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let host = text(header::HOST).unwrap_or("");
        if !self.names_this_server(host) {
            let also = if self.any_address_port.is_some() { ", or any IP address on this port" } else { "" };
            return Err((403, format!("Host `{host}` is not this dashboard's ({}{also}): refused", self.hosts.join(", "))));
        }
        if let Some(origin) = text(header::ORIGIN) {
            let same = origin.strip_prefix("http://").is_some_and(|o| self.names_this_server(o));
            if !same {
                return Err((403, format!("Origin `{origin}` is not this dashboard: cross-site requests are refused")));
            }
        }
        if headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()).is_some_and(|s| s == "cross-site") {
            return Err((403, "a cross-site request: refused".into()));
        }
        let in_header = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok());
        let in_query = (method == Method::GET && path == "/").then(|| crate::control::query_value(query, "token")).flatten();
        let given = in_header.map(str::to_string).or(in_query).unwrap_or_default();
        if !same_secret(given.as_bytes(), self.token.as_bytes()) {
            return Err((403, "no valid token: open the URL `splitter ui` printed".into()));
        }
        Ok(())
    }
}

/// Compares in time independent of where the inputs differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes from the kernel, as hex.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    // SAFETY: the buffer is valid for its length; getrandom writes at most that much.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    anyhow::ensure!(n == bytes.len() as isize, "getrandom: {}", std::io::Error::last_os_error());
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub fn run(args: UiArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: UiArgs) -> Result<()> {
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr()?;
    let guard = Arc::new(Guard::new(random_token()?, bound));
    let scope = if bound.ip().is_loopback() {
        "loopback only".to_string()
    } else {
        format!("NOT loopback: anyone who reaches {bound} and has the token can move traffic")
    };
    println!("splitter ui: serving {bound} ({scope}), agent socket {}", args.socket.socket.display());
    println!("splitter ui: open http://{bound}/?token={}", guard.token);
    let socket = Arc::new(args.socket.socket);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: serve on once some are free.
                log::warn!("ui: accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (guard, socket) = (guard.clone(), socket.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, guard.clone(), socket.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

type Reply = hyper::Response<Full<Bytes>>;

fn plain(status: u16, text: String) -> Reply {
    hyper::Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(format!("{text}\n"))))
        .expect("a response from valid parts")
}

async fn handle(req: hyper::Request<hyper::body::Incoming>, guard: Arc<Guard>, socket: Arc<PathBuf>) -> Result<Reply, hyper::Error> {
    let (method, path, query) = (req.method().clone(), req.uri().path().to_string(), req.uri().query().unwrap_or("").to_string());
    if let Err((status, reason)) = guard.check(&method, &path, &query, req.headers()) {
        log::warn!("ui: {method} {path} refused: {reason}");
        return Ok(plain(status, reason));
    }
    if method == Method::GET && path == "/" {
        return Ok(hyper::Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .header(header::CACHE_CONTROL, "no-store")
            // The page runs its own script only and talks to this server only.
            .header(
                "content-security-policy",
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            )
            .header("x-frame-options", "DENY")
            .header("referrer-policy", "no-referrer")
            .body(Full::new(Bytes::from(PAGE)))
            .expect("a response from valid parts"));
    }
    if !(path.starts_with("/api/v1/") || path == "/metrics") {
        return Ok(plain(404, format!("no such page: {path}")));
    }
    let accept = req.headers().get(header::ACCEPT).cloned();
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Ok(plain(413, format!("request body: {e}"))),
    };
    let target = if query.is_empty() { path } else { format!("{path}?{query}") };
    Ok(match forward(&socket, method, &target, accept, body).await {
        Ok(reply) => reply,
        Err(e) => plain(502, format!("the agent: {e:#}")),
    })
}

/// One request to the agent's socket, its answer passed back as it is.
async fn forward(socket: &Path, method: Method, target: &str, accept: Option<header::HeaderValue>, body: Bytes) -> Result<Reply> {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(target)
        .header(header::USER_AGENT, "splitter-ui")
        .header(crate::api::ORIGIN_HEADER, "splitter ui");
    if let Some(accept) = accept {
        request = request.header(header::ACCEPT, accept);
    }
    let (parts, bytes) = crate::client::send(socket, request.body(Full::new(body))?).await?;
    let mut reply = hyper::Response::builder().status(parts.status).header(header::CACHE_CONTROL, "no-store");
    for name in [header::CONTENT_TYPE, header::HeaderName::from_static(crate::api::WARNING_HEADER)] {
        if let Some(value) = parts.headers.get(&name) {
            reply = reply.header(name, value);
        }
    }
    Ok(reply.body(Full::new(bytes))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    fn guard() -> Guard {
        Guard::new("secret".into(), "127.0.0.1:8080".parse().unwrap())
    }

    #[test]
    fn the_page_and_the_api_need_the_token() {
        let g = guard();
        let host = ("host", "127.0.0.1:8080");
        assert!(g.check(&Method::GET, "/", "token=secret", &headers(&[host])).is_ok());
        assert_eq!(g.check(&Method::GET, "/", "", &headers(&[host])).unwrap_err().0, 403);
        assert_eq!(g.check(&Method::GET, "/", "token=secreT", &headers(&[host])).unwrap_err().0, 403);
        assert!(g.check(&Method::PUT, "/api/v1/gateways/a", "", &headers(&[host, (TOKEN_HEADER, "secret")])).is_ok());
        // The API takes the token from the header only.
        assert_eq!(g.check(&Method::GET, "/api/v1/gateways", "token=secret", &headers(&[host])).unwrap_err().0, 403);
        assert_eq!(g.check(&Method::POST, "/", "token=secret", &headers(&[host])).unwrap_err().0, 403);
    }

    #[test]
    fn another_host_or_origin_is_refused_even_with_the_token() {
        let g = guard();
        let token = (TOKEN_HEADER, "secret");
        let rebound = g.check(&Method::GET, "/api/v1/gateways", "", &headers(&[("host", "evil.example:8080"), token]));
        assert!(rebound.unwrap_err().1.contains("evil.example:8080"));
        assert!(g.check(&Method::GET, "/api/v1/gateways", "", &headers(&[("host", "localhost:8080"), token])).is_ok());
        let cross = headers(&[("host", "127.0.0.1:8080"), ("origin", "http://evil.example"), token]);
        assert!(g.check(&Method::POST, "/api/v1/promote/sava", "route=b", &cross).unwrap_err().1.contains("Origin"));
        let null_origin = headers(&[("host", "127.0.0.1:8080"), ("origin", "null"), token]);
        assert_eq!(g.check(&Method::POST, "/api/v1/promote/sava", "", &null_origin).unwrap_err().0, 403);
        let same = headers(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080"), token]);
        assert!(g.check(&Method::POST, "/api/v1/promote/sava", "", &same).is_ok());
        let fetch_cross = headers(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site"), token]);
        assert_eq!(g.check(&Method::GET, "/api/v1/gateways", "", &fetch_cross).unwrap_err().0, 403);
    }

    #[test]
    fn on_port_80_a_host_without_the_port_is_this_dashboard() {
        let g = Guard::new("secret".into(), "127.0.0.1:80".parse().unwrap());
        let token = (TOKEN_HEADER, "secret");
        for host in ["127.0.0.1", "localhost", "127.0.0.1:80"] {
            assert!(g.check(&Method::GET, "/api/v1/info", "", &headers(&[("host", host), token])).is_ok(), "{host}");
        }
        assert!(g.check(&Method::GET, "/api/v1/info", "", &headers(&[("host", "evil.example"), token])).is_err());
    }

    #[test]
    fn served_on_every_address_any_ip_literal_on_its_port_is_this_dashboard_and_names_are_not() {
        let token = (TOKEN_HEADER, "secret");
        let ask = |g: &Guard, host: &str| g.check(&Method::GET, "/api/v1/info", "", &headers(&[("host", host), token]));
        let g = Guard::new("secret".into(), "0.0.0.0:8080".parse().unwrap());
        for host in ["192.0.2.7:8080", "[2001:db8::7]:8080", "127.0.0.1:8080", "localhost:8080"] {
            assert!(ask(&g, host).is_ok(), "{host}");
        }
        for host in ["192.0.2.7:8081", "192.0.2.7", "evil.example:8080", "192.0.2.7.nip.io:8080"] {
            let refused = ask(&g, host).unwrap_err();
            assert!(refused.1.contains("or any IP address on this port"), "{host}: {}", refused.1);
        }
        let same = headers(&[("host", "192.0.2.7:8080"), ("origin", "http://192.0.2.7:8080"), token]);
        assert!(g.check(&Method::POST, "/api/v1/promote/sava", "", &same).is_ok());
        let cross = headers(&[("host", "192.0.2.7:8080"), ("origin", "http://evil.example:8080"), token]);
        assert!(g.check(&Method::POST, "/api/v1/promote/sava", "", &cross).is_err());
        // On port 80 browsers leave the port out.
        let g = Guard::new("secret".into(), "[::]:80".parse().unwrap());
        for host in ["192.0.2.7", "[2001:db8::7]", "192.0.2.7:80"] {
            assert!(ask(&g, host).is_ok(), "{host}");
        }
        // On one address, another address is not this dashboard.
        assert!(ask(&guard(), "192.0.2.7:8080").is_err());
    }

    #[test]
    fn tokens_are_random_and_long() {
        let (a, b) = (random_token().unwrap(), random_token().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
