//! `cargo xtask demo`: a self-contained topology in network namespaces showing the agent
//! at work. Everything it creates is removed when it ends (Ctrl-C included).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use splitter_tests::{privileged, splitter_bin, Netns, Veth};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> Result<()> {
    if !privileged("demo") {
        anyhow::bail!("the demo creates network namespaces and loads XDP: run it as root");
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let splitter = Netns::new("demo-splitter")?;
    let client = Netns::new("demo-client")?;
    let veth = Veth::create(&splitter, "spl0", "10.210.0.1/24", &client, "cli0", "10.210.0.2/24")?;
    println!("topology: namespace {} (agent on {}, 10.210.0.1) <-> namespace {} (client, 10.210.0.2)",
        splitter.name(), veth.a, client.name());

    let listener = splitter.enter(|| TcpListener::bind("10.210.0.1:9050"))??;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut s = stream;
            // Read the request before answering, so closing does not reset the connection.
            let mut req = [0u8; 512];
            let _ = s.read(&mut req);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n1.0.0");
        }
    });

    let agent = splitter.spawn(splitter_bin(), &["agent", "--iface", &veth.a])?;
    println!("{}", agent.wait_for_line("ready", Duration::from_secs(20))?);

    let rounds = 5;
    for round in 1..=rounds {
        if STOP.load(Ordering::Relaxed) {
            break;
        }
        let ok = client.enter(|| {
            (0..100)
                .filter(|_| {
                    let Ok(mut s) = TcpStream::connect("10.210.0.1:9050") else { return false };
                    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                    let mut body = String::new();
                    s.read_to_string(&mut body).is_ok() && body.ends_with("1.0.0")
                })
                .count()
        })?;
        println!("round {round}/{rounds}: out of 100 clients {ok} got an answer through the XDP-attached interface");
        thread::sleep(Duration::from_millis(500));
    }
    agent.signal(libc::SIGTERM)?;
    let (_, lines) = agent.wait(Duration::from_secs(10))?;
    let counters = lines
        .iter()
        .find(|l| l.contains("packet counters"))
        .context("the agent did not report its counters")?;
    println!("{counters}");
    println!("demo finished; namespaces removed");
    Ok(())
}
