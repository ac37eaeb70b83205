//! The control socket: HTTP/1.1 over a Unix socket (so `curl --unix-socket` works).
//!
//! Paths follow Vamp's API, gateway names may contain slashes:
//! - `GET /api/v1/gateways`, `POST /api/v1/gateways` (documents in the body)
//! - `GET|PUT|DELETE /api/v1/gateways/{name}`
//! - `POST /api/v1/promote/{name}?route=ROUTE`, `POST /api/v1/rollback/{name}[?flush=true]`
//! - `GET /api/v1/stats[/{name}]` (JSON), `GET /metrics` (Prometheus text)
//! - `GET /api/v1/events[?since=ID]` (JSON)
//! - `GET /api/v1/canary[/{name}]`, `POST /api/v1/canary/start/{name}` (a JSON
//!   `CanarySpec`), `POST /api/v1/canary/{pause|resume|abort|promote|approve}/{name}`
//! - `GET /api/v1/info`, `GET /api/v1/openapi.yaml` (this list as OpenAPI 3, kept true by
//!   a test here and by schemathesis against a live agent in CI)
//!
//! Bodies are YAML or JSON. `Accept: application/json` or `?output=json` selects JSON.
//! Each request becomes one [`Op`] in the controller's inbox; they are applied one at a
//! time. This is the only place where answers and errors become HTTP statuses.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{mpsc, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use tokio::{
    net::UnixListener,
    sync::{oneshot, Semaphore},
};

use crate::{
    api::{Answer, ApiError, ErrorKind, ExternalEvent, Format, Reply, ORIGIN_HEADER, WARNING_HEADER},
    controller::{CanaryOp, Inbox, Op},
};

/// An HTTP answer before it is encoded.
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    warning: Option<String>,
}

impl Response {
    /// A refusal in the format the client asked for (one line of text by default).
    fn refusal(status: u16, message: impl std::fmt::Display, format: Format) -> Self {
        let (content_type, body) = ApiError { kind: ErrorKind::Invalid, message: message.to_string() }.render(format, status);
        Self { status, content_type, body, warning: None }
    }

    fn from_result(result: Result<Reply, ApiError>, format: Format, page: Option<Page>) -> Self {
        match result {
            Ok(mut reply) => {
                if let (Some(page), Answer::Gateways(list)) = (page, &mut reply.answer) {
                    page.apply(&mut list.views);
                }
                let (content_type, body) = reply.answer.render(format);
                Self { status: 200, content_type, body, warning: reply.warning }
            }
            Err(e) => {
                let status = status_of(e.kind);
                let (content_type, body) = e.render(format, status);
                Self { status, content_type, body, warning: None }
            }
        }
    }
}

/// The HTTP status of a refusal.
fn status_of(kind: ErrorKind) -> u16 {
    match kind {
        ErrorKind::Invalid => 400,
        ErrorKind::NotFound => 404,
        ErrorKind::Conflict => 409,
        ErrorKind::TooMany => 429,
        ErrorKind::Failed => 500,
        ErrorKind::Unavailable => 503,
    }
}

/// Vamp's paging of lists: `?page=N` (from 1) and `?per_page=M` (default 30).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Page {
    page: usize,
    per_page: usize,
}

impl Page {
    const DEFAULT_PER_PAGE: usize = 30;
    const MAX_PER_PAGE: usize = 1000;

    /// The paging a query asks for; none when it names neither parameter.
    fn from_query(query: &str) -> Result<Option<Self>, (u16, String)> {
        let number = |key: &str| -> Result<Option<usize>, (u16, String)> {
            query_value(query, key)
                .map(|v| v.parse::<usize>().ok().filter(|n| *n >= 1).ok_or((400, format!("{key}: `{v}` is not a whole number from 1"))))
                .transpose()
        };
        let (page, per_page) = (number("page")?, number("per_page")?);
        if page.is_none() && per_page.is_none() {
            return Ok(None);
        }
        let per_page = per_page.unwrap_or(Self::DEFAULT_PER_PAGE).min(Self::MAX_PER_PAGE);
        Ok(Some(Self { page: page.unwrap_or(1), per_page }))
    }

    fn apply<T>(self, items: &mut Vec<T>) {
        let start = (self.page - 1).saturating_mul(self.per_page).min(items.len());
        items.drain(..start);
        items.truncate(self.per_page);
    }
}

/// The format a request asks for: `?output=json|yaml`, else its `Accept` header.
fn format_of(query: &str, accept: Option<&str>) -> Format {
    match query_value(query, "output").as_deref() {
        Some("json") => return Format::Json,
        Some("yaml") => return Format::Yaml,
        _ => {}
    }
    match accept {
        Some(a) if a.contains("json") => Format::Json,
        Some(a) if a.contains("yaml") => Format::Yaml,
        _ => Format::Natural,
    }
}

/// Largest request body accepted (a gateway document is a few KB).
/// The OpenAPI 3 description of this API, served at [`OPENAPI_PATH`].
pub const OPENAPI_YAML: &str = include_str!("openapi.yaml");
pub const OPENAPI_PATH: &str = "/api/v1/openapi.yaml";

pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest request head (request line and header fields) accepted; a larger one is
/// answered 431 and the connection closed.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// Most header fields in one request (431 beyond).
pub const MAX_HEADERS: usize = 64;
/// A client has this long to send a whole request head (the first one, or the next one
/// on a kept-alive connection), or is disconnected: a stalled or idle client cannot hold
/// a connection for ever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A body must have arrived this long after its head, or the request is answered 408.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Control connections served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;

pub type HttpReply = hyper::Response<Full<Bytes>>;

/// Serves the bound control socket forever, at most [`MAX_CONNECTIONS`] connections at a
/// time.
pub async fn serve_listener(listener: UnixListener, commands: mpsc::Sender<Inbox>) -> Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = listener.accept().await?;
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let commands = commands.clone();
                tokio::spawn(async move {
                    serve_connection(stream, commands).await;
                    drop(permit);
                });
            }
            Err(_) => {
                warn!("control socket: {MAX_CONNECTIONS} connections already open; refusing one more");
                tokio::spawn(async move {
                    let body = format!("the agent serves at most {MAX_CONNECTIONS} control connections at once; try again\n");
                    let response = format!(
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    // A few hundred bytes fit the socket buffer of a fresh connection.
                    if tokio::time::timeout(Duration::from_secs(1), stream.writable()).await.is_ok_and(|w| w.is_ok()) {
                        let _ = stream.try_write(response.as_bytes());
                    }
                });
            }
        }
    }
}

/// Serves one control connection (a socket client, or a fuzzer's in-memory stream) until
/// it closes.
pub async fn serve_connection<I>(io: I, commands: mpsc::Sender<Inbox>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(req, commands.clone()));
    let served = http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .max_header_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        if e.is_timeout() {
            debug!("control connection closed: no complete request head within {HEADER_READ_TIMEOUT:?}");
        } else {
            debug!("control connection: {e}");
        }
    }
}

/// Binds the socket, mode 0660 and owned by `group` if given, replacing a stale one (but
/// not one a live agent serves).
pub fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!("another agent is serving {}", path.display()),
        Err(_) => {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("giving the control socket {} to group {gid}", path.display()))?;
    }
    Ok(listener)
}

async fn handle(req: hyper::Request<hyper::body::Incoming>, commands: mpsc::Sender<Inbox>) -> Result<HttpReply, hyper::Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    // The CLI names the file a body came from, so errors point at it; other clients are
    // named by their user agent in the events they record.
    let origin = header(ORIGIN_HEADER).unwrap_or_else(|| "request body".into());
    let client = header(ORIGIN_HEADER).or_else(|| header("user-agent")).unwrap_or_else(|| "api".into());
    let format = format_of(&query, header("accept").as_deref());
    let collected = tokio::time::timeout(BODY_READ_TIMEOUT, Limited::new(req.into_body(), MAX_BODY_BYTES).collect()).await;
    let Ok(collected) = collected else {
        return Ok(reply(Response::refusal(408, format!("request body: not complete within {BODY_READ_TIMEOUT:?}"), format)));
    };
    let body = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let message = if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                format!("request body: larger than the limit of {MAX_BODY_BYTES} bytes")
            } else {
                format!("request body: {e}")
            };
            return Ok(reply(Response::refusal(413, message, format)));
        }
    };
    if method == Method::GET && path == OPENAPI_PATH {
        return Ok(reply(Response { status: 200, content_type: "application/yaml", body: OPENAPI_YAML.to_string(), warning: None }));
    }
    let page = match (&method, path.as_str()) {
        (&Method::GET, "/api/v1/gateways" | "/api/v1/gateways/") => Page::from_query(&query),
        _ => Ok(None),
    };
    let routed = page.and_then(|page| {
        route(&method, &path, &query, &body, &origin, &client).and_then(|op| if_revision(op, &query)).map(|op| (op, page))
    });
    let (op, page) = match routed {
        Ok(routed) => routed,
        Err((status, message)) => return Ok(reply(Response::refusal(status, message, format))),
    };
    let (tx, rx) = oneshot::channel();
    if commands.send(Inbox::Operator { op, reply: tx }).is_err() {
        return Ok(reply(Response::refusal(503, "the agent is shutting down", format)));
    }
    Ok(reply(match rx.await {
        Ok(result) => Response::from_result(result, format, page),
        Err(_) => Response::refusal(500, "the agent dropped the request", format),
    }))
}

/// Maps method and path to an operator request, or a refusal (status and one line).
fn route(method: &Method, path: &str, query: &str, body: &[u8], origin: &str, client: &str) -> Result<Op, (u16, String)> {
    let text = || String::from_utf8(body.to_vec()).map_err(|_| error(400, "request body: not UTF-8"));
    let name_in = |prefix: &str| path.strip_prefix(prefix).filter(|n| !n.is_empty()).map(str::to_string);
    let validate_only = || flag(query, "validate_only");
    match (method, path) {
        (&Method::GET, "/metrics") => Ok(Op::Metrics),
        (&Method::GET, "/api/v1/info" | "/api/v1/info/") => Ok(Op::Info),
        (&Method::GET, "/api/v1/gateways" | "/api/v1/gateways/") => Ok(Op::List),
        (&Method::POST, "/api/v1/gateways" | "/api/v1/gateways/") => {
            Ok(Op::Apply { origin: origin.into(), text: text()?, path_name: None, validate_only: validate_only()? })
        }
        (&Method::GET, "/api/v1/stats" | "/api/v1/stats/") => Ok(Op::Stats(None)),
        (&Method::GET, p) if p.starts_with("/api/v1/stats/") => Ok(Op::Stats(name_in("/api/v1/stats/"))),
        (&Method::GET, "/api/v1/events" | "/api/v1/events/") => {
            let since = query_value(query, "since").and_then(|v| v.parse().ok()).unwrap_or(0);
            let tags = query_values(query, "tag");
            Ok(Op::Events { since, tags, event_type: query_value(query, "type") })
        }
        (&Method::POST, "/api/v1/events" | "/api/v1/events/") => {
            let event: ExternalEvent = serde_json::from_slice(body)
                .map_err(|e| error(400, format!("{origin}: not an event (JSON with tags, value and type): {e}")))?;
            Ok(Op::RecordEvent { event, origin: client.into() })
        }
        (&Method::GET, "/api/v1/canary" | "/api/v1/canary/") => Ok(Op::Canary(CanaryOp::Status(None))),
        (&Method::POST, p) if p.starts_with("/api/v1/canary/") => {
            let rest = &p["/api/v1/canary/".len()..];
            let (action, gateway) =
                rest.split_once('/').filter(|(_, g)| !g.is_empty()).ok_or_else(|| error(404, format!("no gateway name in {p}")))?;
            let gateway = gateway.to_string();
            let request = match action {
                "start" => {
                    let spec: crate::gateway::policy::CanarySpec =
                        serde_json::from_slice(body).map_err(|e| error(400, format!("{origin}: not a canary specification: {e}")))?;
                    CanaryOp::Start { gateway, spec }
                }
                "pause" => CanaryOp::Pause(gateway),
                "resume" => CanaryOp::Resume(gateway),
                "abort" => CanaryOp::Abort(gateway),
                "promote" => CanaryOp::Promote(gateway),
                "approve" => CanaryOp::Approve(gateway),
                other => return Err(error(404, format!("no canary action {other}: start, pause, resume, abort, promote or approve"))),
            };
            Ok(Op::Canary(request))
        }
        (&Method::GET, p) if p.starts_with("/api/v1/canary/") => Ok(Op::Canary(CanaryOp::Status(name_in("/api/v1/canary/")))),
        (m, p) if p.starts_with("/api/v1/gateways/") => {
            let name = name_in("/api/v1/gateways/").ok_or_else(|| error(404, "no gateway name in the path"))?;
            match *m {
                Method::GET => Ok(Op::Get(name)),
                Method::PUT | Method::POST => {
                    Ok(Op::Apply { origin: origin.into(), text: text()?, path_name: Some(name), validate_only: validate_only()? })
                }
                Method::DELETE => Ok(Op::Delete(name)),
                _ => Err(error(405, format!("{m} is not allowed on {p}"))),
            }
        }
        (&Method::POST, p) if p.starts_with("/api/v1/promote/") => {
            let gateway = name_in("/api/v1/promote/").ok_or_else(|| error(404, "no gateway name in the path"))?;
            let route = query_value(query, "route").ok_or_else(|| error(400, "promote: the route=ROUTE query parameter is missing"))?;
            Ok(Op::Promote { gateway, route })
        }
        (&Method::POST, p) if p.starts_with("/api/v1/rollback/") => {
            let gateway = name_in("/api/v1/rollback/").ok_or_else(|| error(404, "no gateway name in the path"))?;
            let flush = flag(query, "flush")?;
            Ok(Op::Rollback { gateway, flush })
        }
        (m, p) => Err(error(404, format!("no such endpoint: {m} {p}"))),
    }
}

/// A yes/no query parameter: absent or empty is no; anything but true/false, 1/0, yes/no is
/// refused.
/// A change with `?if_revision=R` is taken only if the gateways it changes are still at
/// store revision R.
fn if_revision(op: Op, query: &str) -> Result<Op, (u16, String)> {
    let Some(value) = query_value(query, "if_revision") else { return Ok(op) };
    let revision = value
        .parse::<i64>()
        .ok()
        .filter(|r| *r > 0)
        .ok_or_else(|| error(400, format!("if_revision: `{value}` is not a store revision")))?;
    if !op.writes() {
        return Err(error(400, "if_revision: only for requests that change gateways"));
    }
    Ok(Op::IfRevision { revision, op: Box::new(op) })
}

fn flag(query: &str, key: &str) -> Result<bool, (u16, String)> {
    match query_value(query, key).as_deref() {
        None | Some("false" | "0" | "no") => Ok(false),
        Some("true" | "1" | "yes") => Ok(true),
        // `?flush=` with no value: the harmless reading.
        Some("") => Ok(false),
        Some(other) => Err(error(400, format!("{key}: `{other}` is not true, false, 1, 0, yes or no"))),
    }
}

/// Every decoded value of `key` in a query string (`?tag=a&tag=b`).
pub fn query_values(query: &str, key: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then(|| percent_decode(v))
        })
        .collect()
}

/// The decoded value of `key` in a query string.
pub fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn error(status: u16, message: impl std::fmt::Display) -> (u16, String) {
    (status, message.to_string())
}

fn reply(r: Response) -> HttpReply {
    if r.status >= 400 {
        warn!("control request refused ({}): {}", r.status, r.body.trim_end());
    }
    let mut builder = hyper::Response::builder()
        .status(StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(hyper::header::CONTENT_TYPE, r.content_type);
    if let Some(warning) = &r.warning {
        warn!("control request answered with a warning: {warning}");
        builder = builder.header(WARNING_HEADER, header_text(warning));
    }
    builder.body(Full::new(Bytes::from(r.body))).expect("a response from valid parts")
}

/// `text` as a header value: visible ASCII and spaces, anything else escaped.
fn header_text(text: &str) -> hyper::header::HeaderValue {
    let escaped: String =
        text.chars().flat_map(|c| if c == ' ' || c.is_ascii_graphic() { vec![c] } else { c.escape_default().collect() }).collect();
    hyper::header::HeaderValue::from_str(&escaped).unwrap_or_else(|_| hyper::header::HeaderValue::from_static("(unprintable)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(query_value("route=sava%2Fsava%3A1.1.0&flush=1", "route").as_deref(), Some("sava/sava:1.1.0"));
        assert_eq!(query_value("flush=1", "flush").as_deref(), Some("1"));
        assert_eq!(query_value("flush", "flush").as_deref(), Some(""));
        assert_eq!(query_value("a=1", "route"), None);
        assert_eq!(query_value("route=50%25", "route").as_deref(), Some("50%"));
    }

    #[test]
    fn yes_no_parameters_take_only_yes_or_no() {
        assert_eq!(flag("flush=true", "flush"), Ok(true));
        assert_eq!(flag("flush=0", "flush"), Ok(false));
        assert_eq!(flag("", "flush"), Ok(false));
        assert_eq!(flag("flush=", "flush"), Ok(false), "an empty value is the harmless reading");
        assert_eq!(flag("flush=AAA", "flush").unwrap_err().0, 400);
        // A bad validate_only only matters where it is read.
        assert!(route(&Method::GET, "/api/v1/info", "validate_only=AAA", b"", "t", "t").is_ok());
        assert!(route(&Method::PUT, "/api/v1/gateways/a", "validate_only=AAA", b"name: a\n", "t", "t").is_err());
    }

    #[test]
    fn gateway_names_keep_their_slashes() {
        match route(&Method::GET, "/api/v1/gateways/sava/sava/port", "", b"", "t", "t") {
            Ok(Op::Get(name)) => assert_eq!(name, "sava/sava/port"),
            _ => panic!("expected a get"),
        }
        match route(&Method::DELETE, "/api/v1/gateways/", "", b"", "t", "t") {
            Err((status, _)) => assert_eq!(status, 404),
            Ok(_) => panic!("expected an error"),
        }
    }

    /// Every operation the OpenAPI description names is one the server routes (the
    /// description's schemas are checked against live answers by schemathesis in CI).
    #[test]
    fn every_described_operation_is_routed() {
        let spec: serde_yaml::Value = serde_yaml::from_str(OPENAPI_YAML).expect("the description is YAML");
        assert_eq!(spec["openapi"].as_str(), Some("3.0.3"));
        let paths = spec["paths"].as_mapping().expect("paths");
        let mut operations = 0;
        for (path, item) in paths {
            let template = path.as_str().unwrap();
            let concrete = template.replace("{name}", "sava/sava").replace("{action}", "pause");
            for (method, _) in item.as_mapping().unwrap().iter().filter(|(m, _)| m.as_str() != Some("parameters")) {
                let method = Method::from_bytes(method.as_str().unwrap().to_uppercase().as_bytes()).unwrap();
                operations += 1;
                if concrete == OPENAPI_PATH {
                    continue;
                }
                let (query, body): (&str, &[u8]) = match concrete.as_str() {
                    "/api/v1/canary/start/sava/sava" => ("", br#"{"route":"v2","steps":[1000,10000],"interval_ms":1000,"thresholds":{"max_error_rate":500,"max_failed_checks":1,"min_flows":20,"flush_on_rollback":false}}"#),
                    "/api/v1/events" => ("", br#"{"type":"deploy"}"#),
                    p if p.starts_with("/api/v1/promote/") => ("route=v2", b""),
                    _ => ("", b"name: sava/sava\n"),
                };
                if let Err((status, message)) = route(&method, &concrete, query, body, "t", "t") {
                    panic!("{method} {template}: {status} {message}");
                }
            }
        }
        assert!(operations >= 18, "{operations} operations described");
    }
}
