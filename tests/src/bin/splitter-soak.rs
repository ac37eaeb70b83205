//! `cargo xtask soak [--minutes N]`: real connections through the splitter for N minutes
//! while weights change every 100 ms, targets flap and the agent is killed (`kill -9`) and
//! restarted every minute. Not part of `cargo xtask test`.
//!
//! In the standard test topology (client | splitter | backends, in network namespaces):
//!
//! - 5 backends stay up the whole run: `soak/sava:1.0.0` (10.10.2.11-13) and
//!   `soak/sava:1.1.0` (10.10.2.21-22), behind gateway `soak` at 10.0.0.10:9050 (full NAT,
//!   TCP health checks every second).
//! - Load: `--threads` client threads open short HTTP connections to the VIP, paced to
//!   `--rate` connections per second in all; `--long-lived` connections exchange a line
//!   every 100 ms for the whole run and must never be reset or moved to another target.
//! - Control: every 100 ms a weights-only `PUT /api/v1/gateways/soak` over the control
//!   socket cycles the weights (90/10, 50/50, 0/100, 100/0, ...); every 2 s a target leaves
//!   or rejoins a route (alternately by rewriting the watched gateway file and by
//!   `splitter apply -f`); the backend itself stays up, so flows it holds complete.
//! - Every `--kill-every` seconds the agent is killed with SIGKILL, stays dead for
//!   `--dead-for` seconds, and a new agent adopts the pinned datapath (a bpffs mounted by
//!   this tool, outside the agent's `ip netns exec`).
//!
//! Every connection is classified: ok, failed (connect error or timeout), reset
//! (ECONNRESET/EPIPE, or the answer cut short) or wrong (an answer from no configured
//! backend). All backends stay up, so every failure, reset or wrong answer is the
//! splitter's. Every `--sample-every` seconds it records the counts, conntrack occupancy
//! (read from the pinned CONNTRACK map, so also while the agent is dead) and the agent's
//! RSS, descriptors and CPU. At the end it prints a Markdown report, writes it to
//! `target/soak-report.md` (`--report PATH`) and exits non-zero unless no connection
//! failed, was reset or answered wrong, no long-lived connection broke or moved, and the
//! agent's memory stayed flat (see `memory_verdict`).

use std::{
    collections::HashMap as StdHashMap,
    fmt::Write as _,
    fs,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use splitter_common::maps::{FlowEntry, FlowKey, FLOW_FIN_SEEN, FLOW_TO_TARGET};
use splitter_tests::{
    privileged, splitter_bin,
    testbed::{TempDir, Testbed, VIP},
    traffic::{mac_of, syn_flood},
};

const GATEWAY: &str = "soak";
/// Full-NAT source addresses of the gateway (on the splitter's backend side): capacity for
/// a flood's half-open flows beside the soak's own.
const SOURCE_POOL: [&str; 4] = ["10.10.2.100", "10.10.2.101", "10.10.2.102", "10.10.2.103"];
const PORT: u16 = 9050;
const STABLE: &str = "soak/sava:1.0.0";
const CANARY: &str = "soak/sava:1.1.0";
const STABLE_TARGETS: [&str; 3] = ["10.10.2.11", "10.10.2.12", "10.10.2.13"];
const CANARY_TARGETS: [&str; 2] = ["10.10.2.21", "10.10.2.22"];
const BACKEND_PORT: u16 = 8080;
/// Weights (stable, canary) cycled through, one step every `--weight-every-ms`.
const WEIGHTS: [(&str, &str); 8] = [
    ("90%", "10%"),
    ("50%", "50%"),
    ("0%", "100%"),
    ("100%", "0%"),
    ("75%", "25%"),
    ("10%", "90%"),
    ("33.33%", "66.67%"),
    ("99.99%", "0.01%"),
];
/// Agent samples younger than this (seconds since ready) are warm-up, not judged.
const WARM_UP_SECS: f64 = 10.0;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

const USAGE: &str = "usage: splitter-soak [--minutes N] [--rate CONN_PER_S] [--threads N] [--long-lived N]
                     [--weight-every-ms MS] [--flap-every S] [--kill-every S] [--dead-for S]
                     [--sample-every S] [--flood-at S] [--flood-for S] [--report PATH]

defaults: --minutes 10 --rate 300 --threads 6 --long-lived 16 --weight-every-ms 100
          --flap-every 2 --kill-every 60 --dead-for 2 --sample-every 10
          --report target/soak-report.md (0 for --kill-every: never kill the agent)
--flood-at S: S seconds into the soak, a spoofed SYN flood from one core for --flood-for
          seconds (default 8) at the gateway, from the client namespace (0: no flood)";

#[derive(Clone, Debug)]
struct Options {
    minutes: f64,
    rate: f64,
    threads: usize,
    long_lived: usize,
    weight_every: Duration,
    flap_every: Duration,
    kill_every: Option<Duration>,
    dead_for: Duration,
    sample_every: Duration,
    /// When the SYN flood starts (none: no flood), and how long it lasts.
    flood_at: Option<Duration>,
    flood_for: Duration,
    report: PathBuf,
}

impl Options {
    fn parse() -> Result<Self> {
        let mut o = Self {
            minutes: 10.0,
            rate: 300.0,
            threads: 6,
            long_lived: 16,
            weight_every: Duration::from_millis(100),
            flap_every: Duration::from_secs(2),
            kill_every: Some(Duration::from_secs(60)),
            dead_for: Duration::from_secs(2),
            sample_every: Duration::from_secs(10),
            flood_at: None,
            flood_for: Duration::from_secs(8),
            report: Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak-report.md"),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let value = args.next().with_context(|| format!("{arg} needs a value\n{USAGE}"))?;
            let num = || -> Result<f64> {
                let v: f64 = value.parse().with_context(|| format!("{arg} {value}: not a number"))?;
                if !(v >= 0.0 && v.is_finite()) {
                    bail!("{arg} {value}: must be a non-negative number");
                }
                Ok(v)
            };
            match arg.as_str() {
                "--minutes" => o.minutes = num()?,
                "--rate" => o.rate = num()?.max(1.0),
                "--threads" => o.threads = (num()? as usize).clamp(1, 64),
                "--long-lived" => o.long_lived = (num()? as usize).min(1000),
                "--weight-every-ms" => o.weight_every = Duration::from_millis((num()? as u64).max(1)),
                "--flap-every" => o.flap_every = Duration::from_secs_f64(num()?.max(0.1)),
                "--kill-every" => o.kill_every = Some(Duration::from_secs_f64(num()?)).filter(|d| !d.is_zero()),
                "--dead-for" => o.dead_for = Duration::from_secs_f64(num()?),
                "--sample-every" => o.sample_every = Duration::from_secs_f64(num()?.max(1.0)),
                "--flood-at" => o.flood_at = Some(Duration::from_secs_f64(num()?)).filter(|d| !d.is_zero()),
                "--flood-for" => o.flood_for = Duration::from_secs_f64(num()?.min(600.0)),
                "--report" => o.report = PathBuf::from(&value),
                _ => bail!("unknown option {arg}\n{USAGE}"),
            }
        }
        if o.minutes <= 0.0 {
            bail!("--minutes must be above 0");
        }
        Ok(o)
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.minutes * 60.0)
    }
}

// ---------------------------------------------------------------------------------------
// Shared counters

/// What happened to one short connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
    Reset,
    Wrong,
}

#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    reset: AtomicU64,
    wrong: AtomicU64,
    /// Succeeded, but took over 900 ms (a SYN or segment was retransmitted: something
    /// dropped a packet).
    slow: AtomicU64,
    /// Long-lived connections: answers, broken connections, answers from another target.
    ll_asks: AtomicU64,
    ll_broken: AtomicU64,
    ll_moved: AtomicU64,
    /// Control requests (weight changes and target flaps).
    ctl_ok: AtomicU64,
    /// Refused while the agent was (being) killed or restarted: expected.
    ctl_refused_down: AtomicU64,
    /// Failed while the agent was up: not expected.
    ctl_errors: AtomicU64,
    weight_changes: AtomicU64,
    flaps: AtomicU64,
    /// Latency histogram of successful connections (connect to last byte), in ms buckets.
    latency: Mutex<Vec<u64>>,
    /// The first failures, with when and what.
    problems: Mutex<Vec<String>>,
}

const LATENCY_BUCKETS_MS: usize = 6000;

impl Counters {
    fn new() -> Self {
        Self { latency: Mutex::new(vec![0; LATENCY_BUCKETS_MS + 1]), ..Default::default() }
    }

    fn problem(&self, clock: &Clock, what: String) {
        let mut p = self.problems.lock().unwrap();
        if p.len() < 200 {
            p.push(format!("t={:.3}s agent {}: {what}", clock.secs(), clock.agent_state()));
        }
    }

    fn percentile_ms(&self, q: f64) -> u64 {
        let h = self.latency.lock().unwrap();
        let total: u64 = h.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (ms, n) in h.iter().enumerate() {
            seen += n;
            if seen >= want {
                return ms as u64;
            }
        }
        LATENCY_BUCKETS_MS as u64
    }

    fn max_ms(&self) -> u64 {
        let h = self.latency.lock().unwrap();
        h.iter().rposition(|n| *n > 0).unwrap_or(0) as u64
    }
}

/// The run's clock and the agent's state as the control thread and the reports see it.
struct Clock {
    start: Instant,
    /// False from just before a kill until the next agent is ready.
    agent_up: AtomicBool,
    /// Increases at every kill and at every ready: a request that saw it change overlapped a
    /// restart.
    epoch: AtomicU64,
}

impl Clock {
    fn secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn agent_state(&self) -> &'static str {
        if self.agent_up.load(Ordering::SeqCst) {
            "up"
        } else {
            "down"
        }
    }
}

// ---------------------------------------------------------------------------------------
// Gateway documents

fn targets(addrs: &[&str], without: Option<&str>) -> String {
    let list: Vec<String> = addrs.iter().filter(|a| Some(**a) != without).map(|a| format!("{a}:{BACKEND_PORT}")).collect();
    format!("[{}]", list.join(", "))
}

/// The full gateway document, with one target left out (a flap) or none.
fn gateway_yaml(weights: (&str, &str), without: Option<&str>) -> String {
    format!(
        "# splitter-soak: written by the soak, rewritten by its target flaps.
name: {GATEWAY}
port: {PORT}/http
virtual_address: {VIP}
routes:
  {STABLE}:
    weight: {}
    targets: {}
  {CANARY}:
    weight: {}
    targets: {}
health_check:
  protocol: tcp
  interval: 1s
  timeout: 500ms
  unhealthy_threshold: 2
  healthy_threshold: 2
source:
  addresses: [{}]
  ports: 20000-59999
",
        weights.0,
        targets(&STABLE_TARGETS, without),
        weights.1,
        targets(&CANARY_TARGETS, without),
        SOURCE_POOL.join(", "),
    )
}

/// A weights-only update (the Vamp tutorial's form).
fn weights_yaml(weights: (&str, &str)) -> String {
    format!("name: {GATEWAY}\nport: {PORT}/http\nroutes:\n  {STABLE}:\n    weight: {}\n  {CANARY}:\n    weight: {}\n", weights.0, weights.1)
}

/// The answer a backend at `addr` gives (`VERSION ADDR:PORT`), for every backend.
fn expected_answers() -> Vec<String> {
    let mut v: Vec<String> = STABLE_TARGETS.iter().map(|a| format!("1.0.0 {a}:{BACKEND_PORT}")).collect();
    v.extend(CANARY_TARGETS.iter().map(|a| format!("1.1.0 {a}:{BACKEND_PORT}")));
    v
}

// ---------------------------------------------------------------------------------------
// Threads

/// Moves the calling thread into namespace `ns` (sockets it opens live there).
fn enter_netns(ns: &str) -> Result<()> {
    let file = fs::File::open(format!("/run/netns/{ns}")).with_context(|| format!("opening namespace {ns}"))?;
    // SAFETY: a namespace descriptor; setns moves only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {ns}: {}", io::Error::last_os_error());
    }
    Ok(())
}

fn is_reset(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted)
}

/// One short HTTP/1.0 connection to the VIP, classified.
fn one_connection(vip: &SocketAddr, answers: &[String]) -> (Outcome, String) {
    let timeout = Duration::from_secs(5);
    let mut stream = match TcpStream::connect_timeout(vip, timeout) {
        Ok(s) => s,
        Err(e) if is_reset(&e) => return (Outcome::Reset, format!("connect: {e}")),
        Err(e) => return (Outcome::Failed, format!("connect: {e}")),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if let Err(e) = stream.write_all(b"GET / HTTP/1.0\r\nHost: sava\r\n\r\n") {
        let outcome = if is_reset(&e) { Outcome::Reset } else { Outcome::Failed };
        return (outcome, format!("write: {e}"));
    }
    let mut response = Vec::with_capacity(256);
    if let Err(e) = stream.read_to_end(&mut response) {
        let outcome = if is_reset(&e) { Outcome::Reset } else { Outcome::Failed };
        return (outcome, format!("read after {} bytes: {e}", response.len()));
    }
    let _ = stream.shutdown(Shutdown::Both);
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (Outcome::Reset, format!("short read: {} bytes {text:?}", response.len()));
    };
    let length = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).and_then(|v| v.trim().parse::<usize>().ok());
    if !head.starts_with("HTTP/1.1 200") || length != Some(body.len()) {
        return (Outcome::Reset, format!("short or bad response {text:?}"));
    }
    if !answers.iter().any(|a| a == body) {
        return (Outcome::Wrong, format!("answer from no configured backend: {body:?}"));
    }
    (Outcome::Ok, String::new())
}

/// A client thread: paced short connections until `deadline` (bounded in count too).
fn load_thread(ns: String, per_second: f64, deadline: Instant, counters: Arc<Counters>, clock: Arc<Clock>) -> Result<()> {
    enter_netns(&ns)?;
    let vip: SocketAddr = format!("{VIP}:{PORT}").parse()?;
    let answers = expected_answers();
    let interval = Duration::from_secs_f64(1.0 / per_second);
    let max = (per_second * deadline.saturating_duration_since(Instant::now()).as_secs_f64() * 1.5) as u64 + 10;
    let mut next = Instant::now();
    for _ in 0..max {
        if STOP.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        let started = Instant::now();
        counters.attempted.fetch_add(1, Ordering::Relaxed);
        let (outcome, detail) = one_connection(&vip, &answers);
        let took = started.elapsed();
        match outcome {
            Outcome::Ok => {
                counters.ok.fetch_add(1, Ordering::Relaxed);
                let ms = (took.as_millis() as usize).min(LATENCY_BUCKETS_MS);
                counters.latency.lock().unwrap()[ms] += 1;
                if took > Duration::from_millis(900) {
                    counters.slow.fetch_add(1, Ordering::Relaxed);
                }
            }
            Outcome::Failed => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                counters.problem(&clock, format!("connection failed after {took:?}: {detail}"));
            }
            Outcome::Reset => {
                counters.reset.fetch_add(1, Ordering::Relaxed);
                counters.problem(&clock, format!("connection reset after {took:?}: {detail}"));
            }
            Outcome::Wrong => {
                counters.wrong.fetch_add(1, Ordering::Relaxed);
                counters.problem(&clock, format!("wrong answer after {took:?}: {detail}"));
            }
        }
        pace(&mut next, interval);
    }
    Ok(())
}

/// Sleeps until `interval` after `next` and moves `next` there; after a stall, carries on
/// at the rate from now rather than burst to catch up.
fn pace(next: &mut Instant, interval: Duration) {
    *next += interval;
    let now = Instant::now();
    if *next > now {
        thread::sleep(*next - now);
    } else {
        *next = now;
    }
}

/// A long-lived connection speaking the backends' line protocol.
struct Line {
    reader: io::BufReader<TcpStream>,
    writer: TcpStream,
    first: String,
}

impl Line {
    fn connect(vip: &SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(vip, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_nodelay(true)?;
        let mut line = Self { reader: io::BufReader::new(stream.try_clone()?), writer: stream, first: String::new() };
        line.first = line.ask()?;
        Ok(line)
    }

    fn ask(&mut self) -> Result<String> {
        use std::io::BufRead;
        self.writer.write_all(b"ping\n")?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            bail!("connection closed by the peer");
        }
        Ok(answer.trim_end().to_string())
    }
}

/// Long-lived connections, each asked every 100 ms; a broken one is counted and replaced.
fn long_lived_thread(ns: String, n: usize, deadline: Instant, counters: Arc<Counters>, clock: Arc<Clock>) -> Result<()> {
    enter_netns(&ns)?;
    let vip: SocketAddr = format!("{VIP}:{PORT}").parse()?;
    let mut lines = Vec::with_capacity(n);
    for _ in 0..n {
        lines.push(Some(Line::connect(&vip).context("opening a long-lived connection")?));
    }
    let mut tick = Instant::now();
    // Bounded: one round per 100 ms until the deadline.
    let rounds = deadline.saturating_duration_since(Instant::now()).as_millis() / 100 + 10;
    for _ in 0..rounds {
        if STOP.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        for (i, slot) in lines.iter_mut().enumerate() {
            let Some(line) = slot else {
                *slot = Line::connect(&vip).ok();
                continue;
            };
            match line.ask() {
                Ok(answer) => {
                    counters.ll_asks.fetch_add(1, Ordering::Relaxed);
                    if answer != line.first {
                        counters.ll_moved.fetch_add(1, Ordering::Relaxed);
                        counters.problem(&clock, format!("long-lived connection {i} moved: {} -> {answer}", line.first));
                        line.first = answer;
                    }
                }
                Err(e) => {
                    counters.ll_broken.fetch_add(1, Ordering::Relaxed);
                    counters.problem(&clock, format!("long-lived connection {i} to {} broke: {e:#}", line.first));
                    *slot = Line::connect(&vip).ok();
                }
            }
        }
        pace(&mut tick, Duration::from_millis(100));
    }
    Ok(())
}

/// One HTTP/1.1 request over the control socket; returns the status and body.
fn control_request(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: splitter\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status: u16 = text.split(' ').nth(1).and_then(|c| c.parse().ok()).with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    // Chunked bodies keep their chunk sizes: fine for the one-line errors and metrics
    // parsing (sizes are hex lines that name no metric).
    Ok((status, body))
}

/// Counts the outcome of one control request, telling refusals while the agent was down
/// from real errors.
fn count_control(result: Result<(u16, String)>, epoch_before: u64, what: &str, counters: &Counters, clock: &Clock) {
    let overlapped = epoch_before != clock.epoch.load(Ordering::SeqCst) || !clock.agent_up.load(Ordering::SeqCst);
    match result {
        Ok((200..=299, _)) => {
            counters.ctl_ok.fetch_add(1, Ordering::Relaxed);
        }
        Ok((status, body)) if !overlapped => {
            counters.ctl_errors.fetch_add(1, Ordering::Relaxed);
            counters.problem(clock, format!("control {what}: HTTP {status} {}", body.trim()));
        }
        Err(e) if !overlapped => {
            counters.ctl_errors.fetch_add(1, Ordering::Relaxed);
            counters.problem(clock, format!("control {what}: {e:#}"));
        }
        _ => {
            counters.ctl_refused_down.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct ControlSetup {
    socket: PathBuf,
    config_file: PathBuf,
    scratch: PathBuf,
}

/// Weight changes every `weight_every`; a target flap every `flap_every`, alternately by
/// rewriting the watched file and with `splitter apply -f`.
fn control_thread(setup: ControlSetup, opts: Options, deadline: Instant, counters: Arc<Counters>, clock: Arc<Clock>) -> Result<()> {
    let flappers: Vec<&str> = vec![STABLE_TARGETS[2], CANARY_TARGETS[1], STABLE_TARGETS[0], CANARY_TARGETS[0]];
    let mut step = 0usize;
    let mut flap = 0usize;
    let mut removed: Option<&str> = None;
    let mut next_weight = Instant::now();
    let mut next_flap = Instant::now() + opts.flap_every;
    let url = format!("/api/v1/gateways/{GATEWAY}");
    let rounds = deadline.saturating_duration_since(Instant::now()).as_millis() / opts.weight_every.as_millis().max(1) + 10;
    for _ in 0..rounds {
        if STOP.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        step += 1;
        let weights = WEIGHTS[step % WEIGHTS.len()];
        let epoch = clock.epoch.load(Ordering::SeqCst);
        let result = control_request(&setup.socket, "PUT", &url, &weights_yaml(weights));
        counters.weight_changes.fetch_add(1, Ordering::Relaxed);
        count_control(result, epoch, "weight change", &counters, &clock);

        if Instant::now() >= next_flap {
            next_flap += opts.flap_every;
            // Remove the next flapper, or bring back the one removed.
            removed = match removed {
                Some(_) => None,
                None => {
                    let t = flappers[flap / 2 % flappers.len()];
                    Some(t)
                }
            };
            let doc = gateway_yaml(weights, removed);
            counters.flaps.fetch_add(1, Ordering::Relaxed);
            // Removals and re-adds each alternate between the file and the CLI.
            if (flap + flap / 2).is_multiple_of(2) {
                // The watched file: the agent applies it within a second (or at its start).
                let tmp = setup.config_file.with_extension("tmp");
                fs::write(&tmp, &doc)?;
                fs::rename(&tmp, &setup.config_file)?;
                counters.ctl_ok.fetch_add(1, Ordering::Relaxed);
            } else {
                fs::write(&setup.scratch, &doc)?;
                let epoch = clock.epoch.load(Ordering::SeqCst);
                let out = Command::new(splitter_bin())
                    .args(["apply", "-f"])
                    .arg(&setup.scratch)
                    .arg("--socket")
                    .arg(&setup.socket)
                    .output()
                    .context("running splitter apply")?;
                let result = if out.status.success() {
                    Ok((200, String::new()))
                } else {
                    Err(anyhow::anyhow!("splitter apply: {}", String::from_utf8_lossy(&out.stderr).trim()))
                };
                count_control(result, epoch, "target flap (splitter apply)", &counters, &clock);
            }
            flap += 1;
        }

        pace(&mut next_weight, opts.weight_every);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Observations

/// Conntrack occupancy, read from the pinned map.
#[derive(Clone, Copy, Debug, Default)]
struct Conntrack {
    entries: usize,
    flows: usize,
    /// Flows with a FIN seen both ways (closed, waiting for port reuse or the sweep).
    closed: usize,
}

fn conntrack(pin: &Path) -> Result<Conntrack> {
    let data = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let map: BpfHashMap<MapData, FlowKey, FlowEntry> = BpfHashMap::try_from(Map::LruHashMap(data))?;
    let mut all: StdHashMap<FlowKey, FlowEntry> = StdHashMap::new();
    // Entries removed between listing and lookup are skipped.
    for (k, v) in map.iter().flatten() {
        all.insert(k, v);
    }
    let mut c = Conntrack { entries: all.len(), ..Default::default() };
    for entry in all.values().filter(|e| e.flags & FLOW_TO_TARGET != 0) {
        c.flows += 1;
        let peer = all.get(&entry.rewritten.reversed());
        if entry.flags & FLOW_FIN_SEEN != 0 && peer.is_some_and(|p| p.flags & FLOW_FIN_SEEN != 0) {
            c.closed += 1;
        }
    }
    Ok(c)
}

/// The agent process: RSS (KiB), open descriptors, CPU seconds.
#[derive(Clone, Copy, Debug, Default)]
struct AgentProc {
    rss_kib: u64,
    fds: usize,
    cpu_secs: f64,
}

fn agent_proc(pid: u32) -> Option<AgentProc> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok())?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(AgentProc { rss_kib, fds, cpu_secs: ticks as f64 / hz })
}

/// The datapath counters the agent exports (they live in maps: they survive restarts).
#[derive(Clone, Copy, Debug, Default)]
struct DatapathCounters {
    new_flows: u64,
    no_target: u64,
    conntrack_miss: u64,
    alloc_failed: u64,
    target_resets: u64,
    program_id: u64,
}

/// One scrape of `/metrics`: the counters above and every sample, `name{labels}` -> value.
fn scrape_metrics(socket: &Path) -> Option<(DatapathCounters, Vec<(String, f64)>)> {
    let (status, text) = control_request(socket, "GET", "/metrics", "").ok()?;
    if status != 200 {
        return None;
    }
    let mut c = DatapathCounters::default();
    let mut all = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("splitter_")) {
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        all.push((name.to_string(), value));
        let field = match name.split('{').next().unwrap_or("") {
            "splitter_gateway_new_flows_total" => &mut c.new_flows,
            "splitter_gateway_no_target_packets_total" => &mut c.no_target,
            "splitter_gateway_conntrack_miss_total" => &mut c.conntrack_miss,
            "splitter_gateway_alloc_failed_total" => &mut c.alloc_failed,
            "splitter_target_resets_total" => &mut c.target_resets,
            "splitter_program_id" => &mut c.program_id,
            _ => continue,
        };
        *field += value as u64;
    }
    Some((c, all))
}

/// Kernel TCP counters of a namespace (`/proc/net/snmp` Tcp and `/proc/net/netstat`
/// TcpExt), for the report: what the endpoints saw (retransmitted SYNs, resets sent...).
const TCP_COUNTERS: [(&str, &str); 20] = [
    ("Tcp", "ActiveOpens"),
    ("Tcp", "PassiveOpens"),
    ("Tcp", "AttemptFails"),
    ("Tcp", "EstabResets"),
    ("Tcp", "RetransSegs"),
    ("Tcp", "InErrs"),
    ("Tcp", "OutRsts"),
    ("TcpExt", "TCPSynRetrans"),
    ("TcpExt", "TCPTimeouts"),
    ("TcpExt", "TCPLostRetransmit"),
    ("TcpExt", "TW"),
    ("TcpExt", "TWRecycled"),
    ("TcpExt", "PAWSTimewait"),
    ("TcpExt", "PAWSActive"),
    ("TcpExt", "TCPACKSkippedTimeWait"),
    ("TcpExt", "TCPChallengeACK"),
    ("TcpExt", "TCPSYNChallenge"),
    ("TcpExt", "TCPAbortOnData"),
    ("TcpExt", "ListenOverflows"),
    ("TcpExt", "TCPTimeWaitOverflow"),
];

fn tcp_counters(ns: &splitter_tests::Netns) -> Vec<u64> {
    let texts = ns
        .enter(|| {
            let snmp = fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
            let netstat = fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default();
            (snmp, netstat)
        })
        .unwrap_or_default();
    TCP_COUNTERS
        .iter()
        .map(|(group, field)| {
            let text = if *group == "Tcp" { &texts.0 } else { &texts.1 };
            splitter_tests::netns::snmp_field(text, group, field).unwrap_or(0)
        })
        .collect()
}

#[derive(Clone, Debug)]
struct Sample {
    t: f64,
    incarnation: usize,
    /// Seconds since this incarnation was ready (None: no agent running).
    agent_age: Option<f64>,
    attempted: u64,
    failed: u64,
    reset: u64,
    wrong: u64,
    slow: u64,
    ll_broken: u64,
    ll_moved: u64,
    conntrack: Option<Conntrack>,
    agent: Option<AgentProc>,
    datapath: Option<DatapathCounters>,
}

#[derive(Clone, Debug)]
struct Incarnation {
    number: usize,
    ready_at: f64,
    /// From the restart to `ready` (the first one loads the program, the others adopt).
    start_ms: u128,
    ready_line: String,
    killed_at: Option<f64>,
    /// The XDP program's kernel id, from `/metrics` (the same in every adopting agent).
    program_id: Option<u64>,
}

fn take_sample(clock: &Clock, counters: &Counters, bed: &Testbed, incarnation: Option<&Incarnation>, conntrack_pin: &Path) -> Sample {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let t = clock.secs();
    let agent_up = clock.agent_up.load(Ordering::SeqCst);
    Sample {
        t,
        incarnation: incarnation.map_or(0, |i| i.number),
        agent_age: incarnation.filter(|_| agent_up).map(|i| t - i.ready_at),
        attempted: load(&counters.attempted),
        failed: load(&counters.failed),
        reset: load(&counters.reset),
        wrong: load(&counters.wrong),
        slow: load(&counters.slow),
        ll_broken: load(&counters.ll_broken),
        ll_moved: load(&counters.ll_moved),
        conntrack: conntrack(conntrack_pin).ok(),
        agent: if agent_up { agent_proc(bed.agent().pid()) } else { None },
        datapath: if agent_up { scrape_metrics(&bed.socket()).map(|(c, _)| c) } else { None },
    }
}

// ---------------------------------------------------------------------------------------
// The run

/// A BPF filesystem mounted outside the agent's `ip netns exec` (so pins outlive the
/// agent), unmounted on drop.
struct Bpffs {
    dir: TempDir,
}

impl Bpffs {
    fn mount() -> Result<Self> {
        let dir = TempDir::new("soak-bpffs")?;
        let status = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()).status()?;
        if !status.success() {
            bail!("mounting a bpffs at {}", dir.path().display());
        }
        Ok(Self { dir })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

struct Run {
    opts: Options,
    samples: Vec<Sample>,
    incarnations: Vec<Incarnation>,
    counters: Arc<Counters>,
    elapsed: f64,
    long_lived_opened: bool,
    /// Kernel TCP counters (`TCP_COUNTERS`) of the client and backends namespaces, before
    /// and after the load.
    tcp_client: (Vec<u64>, Vec<u64>),
    tcp_splitter: (Vec<u64>, Vec<u64>),
    tcp_backends: (Vec<u64>, Vec<u64>),
    /// The last `/metrics` scrape.
    final_metrics: Vec<(String, f64)>,
    /// How the agent took SIGTERM at the end (None: it exited cleanly).
    stop_problem: Option<String>,
    /// Warnings and errors the agents logged, `#N: line`.
    agent_warnings: Vec<String>,
    /// The command line.
    command: String,
}

/// The warning and error lines of the running agent's log.
fn agent_warnings(bed: &Testbed, incarnation: usize, into: &mut Vec<String>) {
    for line in bed.agent().lines() {
        // env_logger's `[TIME LEVEL] message`.
        let level = line.split_once(']').map_or("", |(head, _)| head);
        if level.contains(" WARN") || level.contains(" ERROR") || line.contains("panicked") {
            into.push(format!("#{incarnation}: {}", line.trim_start_matches("stderr: ")));
        }
    }
}

fn main() -> ExitCode {
    let opts = match Options::parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("splitter-soak: {e:#}");
            return ExitCode::from(2);
        }
    };
    if !privileged("soak") {
        eprintln!("splitter-soak: creates network namespaces and loads XDP: run it as root");
        return ExitCode::from(2);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match soak(&opts) {
        Ok(run) => {
            let (report, passed) = report(&run);
            println!("\n{report}");
            if let Some(dir) = opts.report.parent() {
                let _ = fs::create_dir_all(dir);
            }
            match fs::write(&opts.report, &report) {
                Ok(()) => println!("report written to {}", opts.report.display()),
                Err(e) => eprintln!("splitter-soak: writing {}: {e}", opts.report.display()),
            }
            if passed {
                ExitCode::SUCCESS
            } else {
                eprintln!("splitter-soak: FAILED (see the report)");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("splitter-soak: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn soak(opts: &Options) -> Result<Run> {
    // Dropped last: the bed (agent, namespaces) goes first, then the pins.
    let bpffs = Bpffs::mount()?;
    let pin_dir = bpffs.dir.path().join("splitter");
    let pin_arg = pin_dir.display().to_string();
    let conntrack_pin = pin_dir.join("maps").join("CONNTRACK");

    println!("== topology: client | splitter (XDP, native) | backends, in network namespaces");
    let mut bed = Testbed::new()?;
    for a in STABLE_TARGETS {
        bed.start_backend(a, BACKEND_PORT, "1.0.0", &[])?;
    }
    for a in CANARY_TARGETS {
        bed.start_backend(a, BACKEND_PORT, "1.1.0", &[])?;
    }
    for addr in SOURCE_POOL {
        bed.splitter.ip(&["addr", "add", &format!("{addr}/24"), "dev", "spl-b"])?;
    }
    let config_file = bed.write_config("soak.yaml", &gateway_yaml(WEIGHTS[0], None))?;
    let clock = Arc::new(Clock { start: Instant::now(), agent_up: AtomicBool::new(false), epoch: AtomicU64::new(0) });
    let counters = Arc::new(Counters::new());
    let mut incarnations = Vec::new();
    let mut warnings = Vec::new();

    let started = Instant::now();
    bed.start_agent(&["--bpffs", &pin_arg])?;
    let ready_line = bed.agent().wait_for_line("ready", Duration::from_secs(1))?;
    clock.epoch.fetch_add(1, Ordering::SeqCst);
    clock.agent_up.store(true, Ordering::SeqCst);
    incarnations.push(Incarnation {
        number: 1,
        ready_at: clock.secs(),
        start_ms: started.elapsed().as_millis(),
        ready_line,
        killed_at: None,
        program_id: scrape_metrics(&bed.socket()).map(|(c, _)| c.program_id),
    });
    println!("   agent ready: {}", incarnations[0].ready_line);
    // The first connections must work before the load starts.
    let vip: SocketAddr = format!("{VIP}:{PORT}").parse()?;
    let answers = expected_answers();
    let check = bed.client.enter(|| (0..20).map(|_| one_connection(&vip, &answers)).find(|(o, _)| *o != Outcome::Ok))?;
    if let Some((o, detail)) = check {
        bail!("traffic does not go through before the soak starts: {o:?} {detail}");
    }

    let tcp_before = (tcp_counters(&bed.client), tcp_counters(&bed.splitter), tcp_counters(&bed.backends));
    let duration = opts.duration();
    let deadline = Instant::now() + duration;
    println!(
        "== soak for {:.1} min: {} conn/s from {} threads, {} long-lived connections, weights every {:?}, a flap every {:?}, {}",
        opts.minutes,
        opts.rate,
        opts.threads,
        opts.long_lived,
        opts.weight_every,
        opts.flap_every,
        match opts.kill_every {
            Some(k) => format!("kill -9 every {k:?} (dead for {:?})", opts.dead_for),
            None => "no kills".into(),
        }
    );
    let mut handles: Vec<(&str, thread::JoinHandle<Result<()>>)> = Vec::new();
    let ns = bed.client.name().to_string();
    if opts.long_lived > 0 {
        let (c, k, ns) = (counters.clone(), clock.clone(), ns.clone());
        let n = opts.long_lived;
        handles.push(("long-lived", thread::spawn(move || long_lived_thread(ns, n, deadline, c, k))));
    }
    for _ in 0..opts.threads {
        let (c, k, ns) = (counters.clone(), clock.clone(), ns.clone());
        let per = opts.rate / opts.threads as f64;
        handles.push(("load", thread::spawn(move || load_thread(ns, per, deadline, c, k))));
    }
    {
        let setup = ControlSetup { socket: bed.socket(), config_file: config_file.clone(), scratch: bed.run_dir.path().join("flap.yaml") };
        let (c, k, o) = (counters.clone(), clock.clone(), opts.clone());
        handles.push(("control", thread::spawn(move || control_thread(setup, o, deadline, c, k))));
    }

    let mut samples = vec![take_sample(&clock, &counters, &bed, incarnations.last(), &conntrack_pin)];
    print_sample_header();
    print_sample(&samples[0], None);
    let soak_start = Instant::now();
    let mut next_sample = soak_start + opts.sample_every;
    let mut next_kill = opts.kill_every.map(|k| soak_start + k);
    let mut next_flood = opts.flood_at.map(|at| soak_start + at);
    let mut result = Ok(());
    // Bounded: one pass per 50 ms until the deadline.
    let passes = duration.as_millis() / 50 + 100;
    for _ in 0..passes {
        if STOP.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        if next_flood.is_some_and(|at| Instant::now() >= at) {
            // The load, long-lived and control threads go on; samples and kills wait for it.
            next_flood = None;
            let mac = mac_of(&bed.splitter, "spl-c")?;
            let length = opts.flood_for.min(deadline.saturating_duration_since(Instant::now()));
            println!("   t={:.1}s SYN flood from one core for {length:?}", clock.secs());
            let report = syn_flood(&bed.client, "cli0", mac, VIP.parse()?, PORT, length, 100_000_000)?;
            println!("   t={:.1}s flood over: {} SYNs, {:.0}/s", clock.secs(), report.frames, report.per_second());
        }
        if let Some(kill_at) = next_kill.filter(|k| Instant::now() >= *k && *k + Duration::from_secs(5) < deadline) {
            next_kill = opts.kill_every.map(|k| kill_at + k);
            // One last look at the agent about to die.
            let s = take_sample(&clock, &counters, &bed, incarnations.last(), &conntrack_pin);
            print_sample(&s, samples.last());
            samples.push(s);
            clock.agent_up.store(false, Ordering::SeqCst);
            clock.epoch.fetch_add(1, Ordering::SeqCst);
            agent_warnings(&bed, incarnations.len(), &mut warnings);
            bed.agent().signal(libc::SIGKILL)?;
            let _ = bed.stop_agent(); // reaps it; "exited with -1" is expected
            let killed_at = clock.secs();
            if let Some(i) = incarnations.last_mut() {
                i.killed_at = Some(killed_at);
            }
            println!("   t={killed_at:.1}s agent killed (SIGKILL); restarting in {:?}", opts.dead_for);
            thread::sleep(opts.dead_for);
            let s = take_sample(&clock, &counters, &bed, None, &conntrack_pin);
            print_sample(&s, samples.last());
            samples.push(s);
            let restarting = Instant::now();
            if let Err(e) = bed.start_agent(&["--bpffs", &pin_arg]) {
                result = Err(e.context("restarting the agent"));
                break;
            }
            let ready_line = bed.agent().wait_for_line("ready", Duration::from_secs(1))?;
            clock.epoch.fetch_add(1, Ordering::SeqCst);
            clock.agent_up.store(true, Ordering::SeqCst);
            let inc = Incarnation {
                number: incarnations.len() + 1,
                ready_at: clock.secs(),
                start_ms: restarting.elapsed().as_millis(),
                ready_line,
                killed_at: None,
                program_id: scrape_metrics(&bed.socket()).map(|(c, _)| c.program_id),
            };
            println!("   t={:.1}s agent {} ready after {} ms: {}", inc.ready_at, inc.number, inc.start_ms, inc.ready_line);
            if !inc.ready_line.contains("adopt") {
                result = Err(anyhow::anyhow!("the restarted agent did not adopt the pinned datapath: {}", inc.ready_line));
                incarnations.push(inc);
                break;
            }
            incarnations.push(inc);
        }
        if Instant::now() >= next_sample {
            next_sample += opts.sample_every;
            let s = take_sample(&clock, &counters, &bed, incarnations.last(), &conntrack_pin);
            print_sample(&s, samples.last());
            samples.push(s);
        }
        thread::sleep(Duration::from_millis(50));
    }
    if result.is_err() {
        STOP.store(true, Ordering::Relaxed);
    }
    for (what, h) in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if result.is_ok() {
                    result = Err(e.context(format!("{what} thread")));
                }
            }
            Err(p) => {
                if result.is_ok() {
                    result = Err(anyhow::anyhow!("{what} thread panicked: {p:?}"));
                }
            }
        }
    }
    let elapsed = soak_start.elapsed().as_secs_f64();
    // Let the last flows close before the final look at conntrack.
    let s = take_sample(&clock, &counters, &bed, incarnations.last(), &conntrack_pin);
    print_sample(&s, samples.last());
    samples.push(s);
    result?;
    let tcp_after = (tcp_counters(&bed.client), tcp_counters(&bed.splitter), tcp_counters(&bed.backends));
    let final_metrics = scrape_metrics(&bed.socket()).map(|(_, all)| all).unwrap_or_default();

    // An orderly end: SIGTERM (the agent must exit within 15 s), then remove the pinned
    // datapath.
    clock.agent_up.store(false, Ordering::SeqCst);
    agent_warnings(&bed, incarnations.len(), &mut warnings);
    let stopping = Instant::now();
    let stop_problem = match bed.stop_agent() {
        Ok(_) => None,
        Err(e) => {
            let text = format!("{e:#}");
            let first = text.lines().next().unwrap_or("").trim_end_matches("; output:").to_string();
            Some(format!("{first} (after {:.1} s; killed)", stopping.elapsed().as_secs_f64()))
        }
    };
    if let Some(p) = &stop_problem {
        eprintln!("splitter-soak: the agent did not stop cleanly on SIGTERM: {p}");
    }
    let out = Command::new(splitter_bin()).args(["agent", "--cleanup", "--bpffs", &pin_arg]).output()?;
    if !out.status.success() {
        eprintln!("splitter-soak: cleanup: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    drop(bed);
    drop(bpffs);
    Ok(Run {
        opts: opts.clone(),
        samples,
        incarnations,
        counters,
        elapsed,
        long_lived_opened: opts.long_lived > 0,
        tcp_client: (tcp_before.0, tcp_after.0),
        tcp_splitter: (tcp_before.1, tcp_after.1),
        tcp_backends: (tcp_before.2, tcp_after.2),
        final_metrics,
        stop_problem,
        agent_warnings: warnings,
        command: std::env::args().skip(1).collect::<Vec<_>>().join(" "),
    })
}

fn print_sample_header() {
    println!(
        "   {:>7} {:>5} {:>9} {:>6} {:>6} {:>5} {:>5} {:>5} {:>8} {:>8} {:>7} {:>8} {:>5}",
        "t(s)", "agent", "conns", "failed", "reset", "wrong", "slow", "ll-br", "ct-ent", "ct-open", "rss-MiB", "fds", "cpu%"
    );
}

fn print_sample(s: &Sample, prev: Option<&Sample>) {
    let cpu = cpu_percent(s, prev).map_or("-".into(), |c| format!("{c:.1}"));
    println!(
        "   {:>7.1} {:>5} {:>9} {:>6} {:>6} {:>5} {:>5} {:>5} {:>8} {:>8} {:>7} {:>8} {:>5}",
        s.t,
        agent_label(s),
        s.attempted,
        s.failed,
        s.reset,
        s.wrong,
        s.slow,
        s.ll_broken + s.ll_moved,
        s.conntrack.map_or("-".into(), |c| c.entries.to_string()),
        s.conntrack.map_or("-".into(), |c| (c.flows - c.closed).to_string()),
        s.agent.map_or("-".into(), |a| format!("{:.1}", a.rss_kib as f64 / 1024.0)),
        s.agent.map_or("-".into(), |a| a.fds.to_string()),
        cpu,
    );
}

fn agent_label(s: &Sample) -> String {
    if s.agent_age.is_some() {
        format!("#{}", s.incarnation)
    } else {
        "dead".into()
    }
}

/// The agent's CPU use since the previous sample of the same incarnation.
fn cpu_percent(s: &Sample, prev: Option<&Sample>) -> Option<f64> {
    let prev = prev?;
    if prev.incarnation != s.incarnation || prev.agent_age.is_none() {
        return None;
    }
    let (a, b) = (prev.agent?, s.agent?);
    let dt = s.t - prev.t;
    (dt > 0.5).then(|| (b.cpu_secs - a.cpu_secs) / dt * 100.0)
}

// ---------------------------------------------------------------------------------------
// The report

/// Per incarnation: RSS at the first sample after warm-up and at the last before it ended.
struct MemoryRow {
    number: usize,
    warm: (f64, u64, usize),
    last: (f64, u64, usize),
    peak_kib: u64,
}

fn memory_rows(run: &Run) -> Vec<MemoryRow> {
    let mut rows = Vec::new();
    for inc in &run.incarnations {
        let mine: Vec<&Sample> = run
            .samples
            .iter()
            .filter(|s| s.incarnation == inc.number && s.agent_age.is_some_and(|a| a >= WARM_UP_SECS) && s.agent.is_some())
            .collect();
        let (Some(first), Some(last)) = (mine.first(), mine.last()) else { continue };
        let a = |s: &Sample| (s.agent_age.unwrap_or(0.0), s.agent.unwrap().rss_kib, s.agent.unwrap().fds);
        rows.push(MemoryRow {
            number: inc.number,
            warm: a(first),
            last: a(last),
            peak_kib: mine.iter().map(|s| s.agent.unwrap().rss_kib).max().unwrap_or(0),
        });
    }
    rows
}

/// Flat memory: (1) within every incarnation, RSS at its last sample is at most 10% or
/// 2 MiB (whichever is larger) above its first sample after warm-up, and its descriptor
/// count grows by at most 2; (2) across incarnations (the agent is restarted, so RSS starts
/// over, but what it adopts — maps, state — accumulates), the last incarnation's final RSS
/// is at most 10% or 2 MiB above the first one's.
fn memory_verdict(rows: &[MemoryRow]) -> (bool, Vec<String>) {
    let allowed = |base: u64| (base / 10).max(2048);
    let mut notes = Vec::new();
    let mut ok = true;
    for r in rows {
        let growth = r.last.1 as i64 - r.warm.1 as i64;
        if growth > allowed(r.warm.1) as i64 {
            ok = false;
            notes.push(format!("agent #{}: RSS grew {} KiB within its life (allowed {} KiB)", r.number, growth, allowed(r.warm.1)));
        }
        if r.last.2 > r.warm.2 + 2 {
            ok = false;
            notes.push(format!("agent #{}: descriptors {} -> {}", r.number, r.warm.2, r.last.2));
        }
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let growth = last.last.1 as i64 - first.last.1 as i64;
        if growth > allowed(first.last.1) as i64 {
            ok = false;
            notes.push(format!(
                "RSS at the end of agent #{} is {} KiB above agent #{}'s (allowed {} KiB)",
                last.number,
                growth,
                first.number,
                allowed(first.last.1)
            ));
        }
    }
    if rows.is_empty() {
        ok = false;
        notes.push("no agent lived past its warm-up: memory not judged".into());
    }
    (ok, notes)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn report(run: &Run) -> (String, bool) {
    let c = &run.counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let o = &run.opts;
    let mut r = String::new();
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let _ = writeln!(r, "# Soak report\n");
    let _ = writeln!(r, "`splitter-soak {}` (ended at unix time {unix}); kernel {}, {cpus} CPUs.\n", run.command, kernel.trim());
    let _ = writeln!(
        r,
        "{:.0} s of load: {} connections/s target from {} client threads, {} long-lived connections \
         asked every 100 ms, a weight change every {} ms, a target flap every {:.1} s, {}.\n",
        run.elapsed,
        o.rate,
        o.threads,
        o.long_lived,
        o.weight_every.as_millis(),
        o.flap_every.as_secs_f64(),
        match o.kill_every {
            Some(k) => format!("`kill -9` of the agent every {:.0} s, restarted after {:.1} s", k.as_secs_f64(), o.dead_for.as_secs_f64()),
            None => "no agent kills".into(),
        }
    );

    let _ = writeln!(r, "## Samples\n");
    let _ = writeln!(
        r,
        "Cumulative connection counts; conntrack entries (two per flow) and open flows (no FIN both ways) \
         from the pinned map; agent RSS, open descriptors and CPU since the previous sample.\n"
    );
    let _ = writeln!(
        r,
        "| t (s) | agent | connections | failed | reset | wrong | slow (>0.9 s) | long-lived broken/moved | conntrack entries | open flows | agent RSS (MiB) | agent fds | agent CPU % |"
    );
    let _ = writeln!(r, "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut prev: Option<&Sample> = None;
    for s in &run.samples {
        let cpu = cpu_percent(s, prev).map_or("-".into(), |c| format!("{c:.1}"));
        let _ = writeln!(
            r,
            "| {:.1} | {} | {} | {} | {} | {} | {} | {}/{} | {} | {} | {} | {} | {} |",
            s.t,
            agent_label(s),
            s.attempted,
            s.failed,
            s.reset,
            s.wrong,
            s.slow,
            s.ll_broken,
            s.ll_moved,
            s.conntrack.map_or("-".into(), |c| c.entries.to_string()),
            s.conntrack.map_or("-".into(), |c| (c.flows - c.closed).to_string()),
            s.agent.map_or("-".into(), |a| mib(a.rss_kib)),
            s.agent.map_or("-".into(), |a| a.fds.to_string()),
            cpu,
        );
        prev = Some(s);
    }

    let attempted = load(&c.attempted);
    let (ok, failed, reset, wrong) = (load(&c.ok), load(&c.failed), load(&c.reset), load(&c.wrong));
    let (ll_asks, ll_broken, ll_moved) = (load(&c.ll_asks), load(&c.ll_broken), load(&c.ll_moved));
    let _ = writeln!(r, "\n## Totals\n");
    let _ = writeln!(r, "| | count |\n|:---|---:|");
    let _ = writeln!(r, "| connections attempted | {attempted} |");
    let _ = writeln!(r, "| completed with a configured backend's answer | {ok} |");
    let _ = writeln!(r, "| failed (connect error or timeout) | {failed} |");
    let _ = writeln!(r, "| reset (ECONNRESET, EPIPE, cut short) | {reset} |");
    let _ = writeln!(r, "| wrong answer | {wrong} |");
    let _ = writeln!(r, "| slow (over 0.9 s: a packet was retransmitted) | {} |", load(&c.slow));
    let _ = writeln!(
        r,
        "| latency p50 / p99 / p99.9 / max (ms) | {} / {} / {} / {} |",
        c.percentile_ms(0.5),
        c.percentile_ms(0.99),
        c.percentile_ms(0.999),
        c.max_ms()
    );
    let _ = writeln!(r, "| long-lived connections / answers | {} / {ll_asks} |", o.long_lived);
    let _ = writeln!(r, "| long-lived broken / moved to another target | {ll_broken} / {ll_moved} |");
    let _ = writeln!(r, "| weight changes sent / target flaps | {} / {} |", load(&c.weight_changes), load(&c.flaps));
    let _ = writeln!(r, "| control requests accepted | {} |", load(&c.ctl_ok));
    let _ = writeln!(r, "| control requests refused while the agent was down (expected) | {} |", load(&c.ctl_refused_down));
    let _ = writeln!(r, "| control requests failed while the agent was up | {} |", load(&c.ctl_errors));
    let _ = writeln!(
        r,
        "| agent incarnations (kill -9 + restart) | {} ({}) |",
        run.incarnations.len(),
        run.incarnations.len().saturating_sub(1)
    );
    let last_dp = run.samples.iter().rev().find_map(|s| s.datapath);
    if let Some(d) = last_dp {
        let _ = writeln!(
            r,
            "| datapath: new flows / no-target packets / conntrack misses / allocation failures / resets sent by targets | {} / {} / {} / {} / {} |",
            d.new_flows, d.no_target, d.conntrack_miss, d.alloc_failed, d.target_resets
        );
    }
    let packets: Vec<String> = run
        .final_metrics
        .iter()
        .filter(|(n, v)| n.starts_with("splitter_packets_total") && *v > 0.0)
        .map(|(n, v)| format!("{}={v}", n.split('"').nth(1).unwrap_or(n)))
        .collect();
    if !packets.is_empty() {
        let _ = writeln!(r, "| datapath packet counters (non-zero) | {} |", packets.join(", "));
    }
    let ct: Vec<Conntrack> = run.samples.iter().filter_map(|s| s.conntrack).collect();
    if !ct.is_empty() {
        let max = ct.iter().map(|c| c.entries).max().unwrap_or(0);
        let min = ct.iter().map(|c| c.entries).min().unwrap_or(0);
        let _ = writeln!(r, "| conntrack entries min / max over the samples | {min} / {max} |");
    }

    let _ = writeln!(r, "\n## Agent incarnations and memory\n");
    let _ = writeln!(r, "| agent | ready at (s) | start to ready (ms) | killed at (s) | RSS after warm-up (MiB, age s) | RSS last (MiB, age s) | peak (MiB) | fds warm/last |");
    let _ = writeln!(r, "|:---|---:|---:|---:|---:|---:|---:|---:|");
    let rows = memory_rows(run);
    for inc in &run.incarnations {
        let row = rows.iter().find(|m| m.number == inc.number);
        let _ = writeln!(
            r,
            "| #{} {} | {:.1} | {} | {} | {} | {} | {} | {} |",
            inc.number,
            if inc.ready_line.contains("adopt") { "(adopted)" } else { "(loaded)" },
            inc.ready_at,
            inc.start_ms,
            inc.killed_at.map_or("-".into(), |k| format!("{k:.1}")),
            row.map_or("-".into(), |m| format!("{} ({:.0})", mib(m.warm.1), m.warm.0)),
            row.map_or("-".into(), |m| format!("{} ({:.0})", mib(m.last.1), m.last.0)),
            row.map_or("-".into(), |m| mib(m.peak_kib)),
            row.map_or("-".into(), |m| format!("{}/{}", m.warm.2, m.last.2)),
        );
    }
    let (memory_ok, notes) = memory_verdict(&rows);

    let _ = writeln!(r, "\n## Kernel TCP counters during the load\n");
    let _ = writeln!(
        r,
        "Differences of `/proc/net/snmp` (Tcp) and `/proc/net/netstat` (TcpExt) in the client, splitter and backends \
         namespaces; zero rows left out. The splitter node's kernel sees only what the datapath passes up (the agent's \
         health checks, and reply packets of flows conntrack no longer knows).\n"
    );
    let _ = writeln!(r, "| counter | client | splitter node | backends |\n|:---|---:|---:|---:|");
    for (i, (group, field)) in TCP_COUNTERS.iter().enumerate() {
        let d = |p: &(Vec<u64>, Vec<u64>)| p.1.get(i).copied().unwrap_or(0).saturating_sub(p.0.get(i).copied().unwrap_or(0));
        let (c, s, b) = (d(&run.tcp_client), d(&run.tcp_splitter), d(&run.tcp_backends));
        if c != 0 || s != 0 || b != 0 {
            let _ = writeln!(r, "| {group} {field} | {c} | {s} | {b} |");
        }
    }
    let ids: Vec<u64> = run.incarnations.iter().filter_map(|i| i.program_id).collect();
    let program_ok = ids.windows(2).all(|w| w[0] == w[1]) && ids.len() == run.incarnations.len();

    if !run.agent_warnings.is_empty() {
        let _ = writeln!(r, "\n## Agent warnings and errors ({})\n", run.agent_warnings.len());
        for w in run.agent_warnings.iter().take(50) {
            let _ = writeln!(r, "- {w}");
        }
    }
    let problems = c.problems.lock().unwrap().clone();
    if !problems.is_empty() {
        let _ = writeln!(r, "\n## Problems (first {})\n", problems.len());
        for p in &problems {
            let _ = writeln!(r, "- {p}");
        }
    }

    let traffic_ok = failed == 0 && reset == 0 && wrong == 0 && attempted > 0;
    let ll_ok = ll_broken == 0 && ll_moved == 0 && (!run.long_lived_opened || ll_asks > 0);
    let ctl_ok = load(&c.ctl_errors) == 0;
    let _ = writeln!(r, "\n## Verdict\n");
    let mark = |b: bool| if b { "PASS" } else { "FAIL" };
    let _ = writeln!(r, "- {}: {failed} failed, {reset} reset, {wrong} wrong out of {attempted} connections", mark(traffic_ok));
    let _ = writeln!(r, "- {}: {ll_broken} long-lived connections broken, {ll_moved} moved", mark(ll_ok));
    let _ = writeln!(r, "- {}: {} control requests failed while the agent was up", mark(ctl_ok), load(&c.ctl_errors));
    let _ = writeln!(
        r,
        "- {}: agent memory flat (per incarnation: last sample within max(10%, 2 MiB) of the first after {WARM_UP_SECS:.0} s, fds +2 at most; last incarnation's final RSS within max(10%, 2 MiB) of the first's){}",
        mark(memory_ok),
        if notes.is_empty() { String::new() } else { format!(": {}", notes.join("; ")) }
    );
    let _ = writeln!(r, "- {}: every agent ran the same XDP program (ids {:?}: adopted, never reloaded)", mark(program_ok), ids);
    match &run.stop_problem {
        None => {
            let _ = writeln!(r, "- PASS: the last agent stopped cleanly on SIGTERM");
        }
        Some(p) => {
            let _ = writeln!(r, "- WARN (not counted in the verdict): the last agent did not stop cleanly on SIGTERM: {p}");
        }
    }
    (r, traffic_ok && ll_ok && ctl_ok && memory_ok && program_ok)
}
