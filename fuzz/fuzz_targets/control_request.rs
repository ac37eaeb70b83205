//! Raw bytes on the control socket: the agent's own HTTP server, router and controller
//! thread, with the controller writing real BPF maps (the object loaded, nothing attached,
//! in a network namespace of the fuzzer's own).
//!
//! Invariants: every request that arrives whole gets one well-formed HTTP response; the
//! controller never drops a request (a 500 from a panic, a 503 from a dead controller thread);
//! a refusal is a single line; the exchange ends (no hang).
#![no_main]

use std::{
    sync::{mpsc, OnceLock},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use splitter_common::conntrack::Timeouts;
use splitter_user::{
    api::Answer,
    control::serve_connection,
    controller::{Controller, Inbox, Op, Settings},
    datapath::Datapath,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Agent {
    /// The loaded programs, kept for the fuzzer's life.
    _ebpf: std::sync::Mutex<aya::Ebpf>,
    runtime: tokio::runtime::Runtime,
    commands: mpsc::Sender<Inbox>,
}

fn agent() -> &'static Agent {
    static AGENT: OnceLock<Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        splitter_fuzz::isolate_network();
        // Every address has a route (so full-NAT gateways find a source address); what
        // is sent there stays on a veth pair inside this namespace.
        splitter_fuzz::ip(&["link", "add", "fz0", "type", "veth", "peer", "name", "fz1"]);
        splitter_fuzz::ip(&["addr", "add", "10.0.0.1/8", "dev", "fz0"]);
        splitter_fuzz::ip(&["link", "set", "fz0", "up"]);
        splitter_fuzz::ip(&["link", "set", "fz1", "up"]);
        splitter_fuzz::ip(&["route", "add", "default", "dev", "fz0"]);
        let (ebpf, maps) = splitter_fuzz::load();
        let settings = Settings { state_dir: None, config: None, timeouts: Timeouts::DEFAULT, program_id: 0, build: "fuzz".into() };
        let controller = Controller::new(Datapath::new(maps, splitter_fuzz::LIMITS), settings);
        let (commands, inbox) = mpsc::channel();
        // Started after `isolate_network`: the thread is in the fuzzer's namespace.
        std::thread::spawn(move || controller.run(inbox));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        Agent { _ebpf: std::sync::Mutex::new(ebpf), runtime, commands }
    })
}

/// Asks the controller directly (as the agent's signal handlers do).
fn ask(agent: &Agent, op: Op) -> Option<Answer> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    agent.commands.send(Inbox::Operator { op, reply }).expect("the controller thread is alive");
    answer.blocking_recv().expect("the controller answers").ok().map(|r| r.answer)
}

/// Splits an HTTP/1.x response stream into (status, content type, body).
fn responses(mut raw: &[u8]) -> Vec<(u16, String, Vec<u8>)> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head ends with an empty line");
        let head = std::str::from_utf8(&raw[..end]).expect("a response head is text");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        assert!(status_line.starts_with("HTTP/1."), "status line {status_line:?}");
        let status: u16 = status_line[9..12].parse().expect("a numeric status");
        let mut length = 0usize;
        let mut content_type = String::new();
        for line in lines {
            let (name, value) = line.split_once(": ").expect("a header line");
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().expect("a numeric content-length"),
                "content-type" => content_type = value.to_string(),
                "transfer-encoding" => panic!("unexpected transfer-encoding {value}"),
                _ => {}
            }
        }
        let body_start = end + 4;
        if raw.len() < body_start + length {
            // A HEAD response announces a body it does not carry.
            break;
        }
        out.push((status, content_type, raw[body_start..body_start + length].to_vec()));
        raw = &raw[body_start + length..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let agent = agent();
    let raw = agent.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(serve_connection(server, agent.commands.clone()));
        let exchange = async {
            let (mut rx, mut tx) = tokio::io::split(&mut client);
            let send = async {
                let _ = tx.write_all(data).await;
                let _ = tx.shutdown().await;
            };
            let mut raw = Vec::new();
            let receive = rx.read_to_end(&mut raw);
            let (_, read) = tokio::join!(send, receive);
            read.map(|_| raw)
        };
        tokio::time::timeout(Duration::from_secs(20), exchange).await
    });
    let raw = raw.expect("the exchange ends within 20 s").unwrap_or_default();
    for (status, content_type, body) in responses(&raw) {
        assert!(status != 500 && status != 503, "the controller dropped a request: {status} {}", String::from_utf8_lossy(&body));
        if status >= 400 && content_type.starts_with("text/plain") {
            let text = String::from_utf8_lossy(&body);
            assert!(text.ends_with('\n') && text.trim_end().lines().count() <= 1, "a refusal is one line: {text:?}");
        }
    }
    // Back to no gateways, so each input starts from the same datapath.
    let names: Vec<String> = match ask(agent, Op::List) {
        Some(Answer::Gateways(list)) => list.views.iter().map(|v| v.gateway.name.clone()).collect(),
        _ => Vec::new(),
    };
    for name in names {
        ask(agent, Op::Delete(name));
    }
});
