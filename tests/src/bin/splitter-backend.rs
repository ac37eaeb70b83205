//! A versioned backend for tests and the demo (the "sava" service): answers with its
//! version and address.
//!
//! - TCP, HTTP: `GET ...` gets `200 OK` with body `VERSION ADDR:PORT`, then the connection
//!   closes.
//! - TCP, lines: any other first byte starts a line protocol: every line gets one line
//!   `VERSION ADDR:PORT` back, on the same connection (long-lived connections); the line
//!   `peer` gets `VERSION ADDR:PORT PEER_ADDR:PORT` (where the connection comes from).
//! - `--udp`: every datagram gets one datagram `VERSION ADDR:PORT` back.
//! - `--reset`: accepts connections and resets them at once (a broken canary).
//! - `--status N`: HTTP requests (but `/health`) get status N (a canary failing its users).
//! - `--health-status N`: `GET /health` gets status N (a target failing its health check).
//! - `GET /metrics`: the responses answered so far by status, for Prometheus
//!   (`backend_responses_total{status="500"}`).
//!
//! usage: splitter-backend --listen ADDR:PORT --version V [--udp] [--reset] [--status N] [--health-status N]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{Arc, Mutex},
    thread,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| usage(&format!("missing {flag}")))
    };
    let listen: SocketAddr = value("--listen").parse().unwrap_or_else(|e| usage(&format!("--listen: {e}")));
    let version = value("--version");
    let answer = format!("{version} {listen}");
    if args.iter().any(|a| a == "--udp") {
        let socket = UdpSocket::bind(listen).unwrap_or_else(|e| fail(&format!("bind {listen}: {e}")));
        println!("backend {answer} listening (udp)");
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(answer.as_bytes(), from);
        }
        return;
    }
    let reset_all = args.iter().any(|a| a == "--reset");
    // `--status N`: answer every HTTP request but `/health` with status N (a canary that
    // accepts connections and passes its health check, yet fails its users).
    let status: u16 = args.iter().position(|a| a == "--status").and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(200);
    let health_status: u16 =
        args.iter().position(|a| a == "--health-status").and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(200);
    // Responses answered, by status (served at GET /metrics for Prometheus).
    let counts: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| fail(&format!("bind {listen}: {e}")));
    println!("backend {answer} listening (tcp{})", if reset_all { ", resetting every connection" } else { "" });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if reset_all {
            reset(stream);
            continue;
        }
        let answer = answer.clone();
        let counts = counts.clone();
        thread::spawn(move || serve(stream, &answer, (status, health_status), &counts));
    }
}

/// `statuses`: for requests, and for `GET /health`.
fn serve(stream: TcpStream, answer: &str, statuses: (u16, u16), counts: &Mutex<BTreeMap<u16, u64>>) {
    let (status, health_status) = statuses;
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut writer = stream;
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    if first.starts_with("GET ") {
        // Read the rest of the request head, then answer and close.
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" && line != "\n" {
            line.clear();
        }
        let body = if first.starts_with("GET /metrics") {
            let counts = counts.lock().unwrap();
            let mut text = String::from("# TYPE backend_responses_total counter\n");
            for (code, n) in counts.iter() {
                text.push_str(&format!("backend_responses_total{{status=\"{code}\"}} {n}\n"));
            }
            text
        } else {
            answer.to_string()
        };
        let status = if first.starts_with("GET /health") {
            health_status
        } else if first.starts_with("GET /metrics") {
            200
        } else {
            status
        };
        if !first.starts_with("GET /metrics") && !first.starts_with("GET /health") {
            *counts.lock().unwrap().entry(status).or_default() += 1;
        }
        let reason = if status == 200 { "OK" } else { "Error" };
        // One write: with TCP_NODELAY each write is a segment of its own, and the response
        // should start with its whole status line, as servers send it.
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = writer.write_all(response.as_bytes());
        let _ = writer.flush();
        // Drain until the client closes, so our close never resets unread data.
        let _ = writer.shutdown(std::net::Shutdown::Write);
        let _ = reader.read_to_end(&mut Vec::new());
        return;
    }
    let peer = writer.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut line = first;
    loop {
        let written = if line.trim_end() == "peer" { writeln!(writer, "{answer} {peer}") } else { writeln!(writer, "{answer}") };
        if written.is_err() {
            return;
        }
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
    }
}

/// Closes with RST instead of FIN (SO_LINGER with a zero timeout).
fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket descriptor and a `linger` value of the size passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

fn usage(msg: &str) -> ! {
    fail(&format!("{msg}\nusage: splitter-backend --listen ADDR:PORT --version V [--udp] [--reset] [--status N] [--health-status N]"))
}

fn fail(msg: &str) -> ! {
    eprintln!("splitter-backend: {msg}");
    std::process::exit(2)
}
