//! What a rollout asks outside the splitter: Prometheus queries and webhooks. They run as
//! tasks in the agent's runtime (a slow server never holds the controller up) and each
//! request is answered on its own channel, like health reports.

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::gateway::policy::{MetricCheck, Webhook};

/// Largest answer read from a Prometheus server or a webhook.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// How long a Prometheus query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A question for the outside, about one gateway's rollout.
#[derive(Clone, Debug)]
pub struct CheckRequest {
    pub gateway: String,
    /// Matches the report to what the rollout waits for.
    pub id: u64,
    pub check: Check,
}

#[derive(Clone, Debug)]
pub enum Check {
    /// The metrics, each with its query with the variables filled in.
    Metrics(Vec<(MetricCheck, String)>),
    /// These webhooks, POSTed this JSON.
    Hooks(Vec<Webhook>, serde_json::Value),
}

/// The answer to a [`CheckRequest`].
#[derive(Clone, Debug, PartialEq)]
pub struct CheckReport {
    pub gateway: String,
    pub id: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Each metric's value, or why there is none (inconclusive).
    Metrics(Vec<(String, Result<f64, String>)>),
    /// Each webhook's URL and the status it answered, or why it did not.
    Hooks(Vec<(String, Result<u16, String>)>),
}

/// The payload of a webhook call.
#[derive(Clone, Debug, Serialize)]
pub struct HookPayload {
    pub gateway: String,
    pub route: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// 1-based step the rollout is at (or goes to).
    pub step: usize,
    pub steps: usize,
    /// Weights of every route now, as percent strings.
    pub weights: std::collections::BTreeMap<String, String>,
    pub last_verdict: String,
}

/// Runs every request it is sent, each in its own task; `report` returns false once nobody
/// listens (the requests in flight are then dropped).
pub async fn run(
    mut requests: tokio::sync::mpsc::UnboundedReceiver<CheckRequest>,
    report: impl Fn(CheckReport) -> bool + Clone + Send + Sync + 'static,
) {
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(request) = requests.recv().await {
        let report = report.clone();
        tasks.spawn(async move {
            let outcome = match request.check {
                Check::Metrics(metrics) => {
                    let mut values = Vec::new();
                    for (metric, query) in metrics {
                        values.push((metric.name.clone(), query_prometheus(&metric.prometheus, &query).await));
                    }
                    Outcome::Metrics(values)
                }
                Check::Hooks(hooks, payload) => {
                    let mut answers = Vec::new();
                    for hook in hooks {
                        answers.push((hook.url.clone(), call_hook(&hook, &payload).await));
                    }
                    Outcome::Hooks(answers)
                }
            };
            report(CheckReport { gateway: request.gateway, id: request.id, outcome });
        });
        // Finished tasks are reaped as they end.
        while tasks.try_join_next().is_some() {}
    }
}

/// A query's single value: the first sample of an instant vector or a scalar.
pub async fn query_prometheus(base: &str, query: &str) -> Result<f64, String> {
    let url = format!("{}/api/v1/query?query={}", base.trim_end_matches('/'), percent_encode(query));
    let (status, body) =
        tokio::time::timeout(QUERY_TIMEOUT, http("GET", &url, None)).await.map_err(|_| format!("no answer within {QUERY_TIMEOUT:?}"))??;
    if status != 200 {
        return Err(format!("Prometheus answered {status}: {}", body.trim()));
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("not a Prometheus answer: {e}"))?;
    let data = &v["data"];
    let sample = match data["resultType"].as_str() {
        Some("vector") => data["result"].get(0).map(|r| &r["value"]),
        Some("scalar") => Some(&data["result"]),
        other => return Err(format!("a query answering {other:?} is not a single value")),
    };
    let text = sample.and_then(|s| s.get(1)).and_then(|t| t.as_str()).ok_or("no data (empty result)")?;
    let value: f64 = text.parse().map_err(|_| format!("value `{text}` is not a number"))?;
    if value.is_nan() {
        return Err("the value is NaN (no requests in the range?)".into());
    }
    Ok(value)
}

/// One webhook: POSTed, retried on errors and non-2xx answers; the last status, or why
/// no attempt got one.
pub async fn call_hook(hook: &Webhook, payload: &serde_json::Value) -> Result<u16, String> {
    let timeout = Duration::from_millis(hook.timeout_ms.max(1));
    let mut last = Err("not called".to_string());
    for _ in 0..=hook.retries {
        last = match tokio::time::timeout(timeout, http("POST", &hook.url, Some(payload.to_string()))).await {
            Ok(Ok((status, _))) => Ok(status),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        if matches!(last, Ok(s) if (200..300).contains(&s)) {
            break;
        }
    }
    last
}

/// One HTTP/1.1 request to an `http://HOST:PORT/PATH` address: status and body.
async fn http(method: &str, url: &str, json: Option<String>) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// is supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let address = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    let stream = TcpStream::connect(&address).await.map_err(|e| format!("connect {address}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "splitter-agent");
    if json.is_some() {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = request.body(Full::new(Bytes::from(json.unwrap_or_default()))).map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES).collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A query string value, percent-encoded (unreserved characters kept).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A metric's query with `{{gateway}}`, `{{route}}`, `{{targets}}` and `{{interval}}`
/// filled in.
pub fn render_query(query: &str, gateway: &str, route: &str, targets: &[String], interval: &str) -> String {
    let query = query.replace("{{gateway}}", gateway).replace("{{route}}", route).replace("{{interval}}", interval);
    let mut out = String::with_capacity(query.len());
    let mut rest = query.as_str();
    while let Some(at) = rest.find("{{targets}}") {
        out.push_str(&rest[..at]);
        // In a backtick (raw) string a regex escape is one backslash; in a quoted one the
        // string's own escaping doubles it.
        let raw = out.rfind(['"', '\'', '`']).is_some_and(|i| out[i..].starts_with('`'));
        let alternatives: Vec<String> = targets.iter().map(|t| regex_literal(t, raw)).collect();
        out.push_str(&alternatives.join("|"));
        rest = &rest[at + "{{targets}}".len()..];
    }
    out.push_str(rest);
    out
}

/// `text` as a regex matching itself: the dots of an IPv4 address and the brackets of an
/// IPv6 one are operators otherwise (`[2001:db8::1]:80` would be a character class).
fn regex_literal(text: &str, raw: bool) -> String {
    let escape = if raw { "\\" } else { "\\\\" };
    text.chars().map(|c| if "\\.+*?()|[]{}^$".contains(c) { format!("{escape}{c}") } else { c.to_string() }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_filled_in_and_encoded() {
        let q = render_query(
            "sum(rate(errors{instance=~\"{{targets}}\"}[{{interval}}]))",
            "g",
            "r",
            &["10.0.0.1:80".into(), "10.0.0.2:80".into()],
            "30s",
        );
        assert_eq!(q, r#"sum(rate(errors{instance=~"10\\.0\\.0\\.1:80|10\\.0\\.0\\.2:80"}[30s]))"#);
        let v6 = ["[2001:db8::1]:80".to_string()];
        assert_eq!(
            render_query("x{instance=~`{{targets}}`}", "g", "r", &v6, "1s"),
            r"x{instance=~`\[2001:db8::1\]:80`}",
            "raw string: one backslash"
        );
        assert_eq!(render_query("x{instance=~'{{targets}}'}", "g", "r", &v6, "1s"), r"x{instance=~'\\[2001:db8::1\\]:80'}");
        assert_eq!(percent_encode("a b{c}"), "a%20b%7Bc%7D");
    }

    /// A real HTTP exchange with a server on loopback: Prometheus' answer shapes, and a
    /// webhook retried until it passes.
    #[tokio::test]
    async fn prometheus_answers_and_webhooks_over_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let answers = [
            (200, r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"0.25"]}]}}"#),
            (200, r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#),
            (500, "boom"),
            (200, "ok"),
        ];
        let server = tokio::spawn(async move {
            for (status, body) in answers {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let base = format!("http://127.0.0.1:{port}");
        assert_eq!(query_prometheus(&base, "up").await, Ok(0.25));
        assert!(query_prometheus(&base, "up").await.unwrap_err().contains("no data"));
        let hook = Webhook { kind: crate::gateway::policy::HookKind::Step, url: format!("{base}/hook"), timeout_ms: 2000, retries: 1 };
        assert_eq!(call_hook(&hook, &serde_json::json!({})).await, Ok(200), "retried after the 500");
        server.await.unwrap();
    }
}
