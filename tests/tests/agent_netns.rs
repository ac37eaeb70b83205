//! The agent attached in native mode to a veth inside a namespace; real ping, UDP and TCP
//! traffic from a peer namespace; the counters it reports match what the peer sent.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use splitter_tests::{privileged, splitter_bin, Netns, Process, Veth};

const SPLITTER_ADDR: &str = "10.201.0.1";

/// What the client namespace's kernel says it sent, per protocol.
#[derive(Debug, Clone, Copy)]
struct Sent {
    frames: u64,
    tcp: u64,
    udp: u64,
    icmp: u64,
}

fn sent(client: &Netns, dev: &str) -> Sent {
    let snmp = |g, f| client.snmp(g, f).unwrap();
    Sent {
        frames: client.tx_packets(dev).unwrap(),
        tcp: snmp("Tcp", "OutSegs") + snmp("Tcp", "RetransSegs"),
        udp: snmp("Udp", "OutDatagrams"),
        icmp: snmp("Icmp", "OutMsgs"),
    }
}

fn counter(json: &serde_json::Value, name: &str) -> u64 {
    json[name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {json}"))
}

#[test]
fn agent_counts_real_traffic_on_a_native_veth() {
    if !privileged("agent_counts_real_traffic_on_a_native_veth") {
        return;
    }
    let splitter = Netns::new("splitter").unwrap();
    let client = Netns::new("client").unwrap();
    let veth = Veth::create(&splitter, "spl0", "10.201.0.1/24", &client, "cli0", "10.201.0.2/24").unwrap();

    // Echo servers in the splitter namespace, on threads that entered it.
    let tcp_listener = splitter.enter(|| TcpListener::bind((SPLITTER_ADDR, 7000))).unwrap().unwrap();
    let udp_server = splitter.enter(|| UdpSocket::bind((SPLITTER_ADDR, 7001))).unwrap().unwrap();
    thread::spawn(move || {
        for stream in tcp_listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = [0u8; 64];
            if let Ok(n) = s.read(&mut buf) {
                let _ = s.write_all(&buf[..n]);
            }
        }
    });
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = udp_server.recv_from(&mut buf) {
            let _ = udp_server.send_to(&buf[..n], from);
        }
    });

    let run = splitter_tests::testbed::TempDir::new("run").unwrap();
    let socket = run.path().join("splitter.sock").display().to_string();
    let agent =
        splitter.spawn(splitter_bin(), &["agent", "--iface", &veth.a, "--xdp-mode", "native", "--ephemeral", "--socket", &socket]).unwrap();
    agent.wait_for_line("ready", Duration::from_secs(20)).unwrap();

    let before = sent(&client, &veth.b);
    let pings = 5;
    client.run("ping", &["-c", &pings.to_string(), "-i", "0.05", "-W", "2", SPLITTER_ADDR]).unwrap();
    let (udp_exchanges, tcp_connections) = (20, 5);
    client
        .enter(|| {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            for i in 0..udp_exchanges {
                let msg = format!("datagram {i}");
                sock.send_to(msg.as_bytes(), (SPLITTER_ADDR, 7001)).unwrap();
                let mut buf = [0u8; 64];
                let n = sock.recv(&mut buf).expect("UDP echo");
                assert_eq!(&buf[..n], msg.as_bytes());
            }
            for i in 0..tcp_connections {
                let mut s = TcpStream::connect((SPLITTER_ADDR, 7000)).unwrap();
                let msg = format!("connection {i}");
                s.write_all(msg.as_bytes()).unwrap();
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap();
                assert_eq!(&buf[..n], msg.as_bytes());
            }
        })
        .unwrap();
    // Let the last FIN/ACK exchanges finish before the snapshots.
    thread::sleep(Duration::from_millis(500));
    let after = sent(&client, &veth.b);

    agent.signal(libc::SIGTERM).unwrap();
    let (code, lines) = agent.wait(Duration::from_secs(10)).unwrap();
    assert_eq!(code, 0, "agent exit code; output:\n{}", lines.join("\n"));
    let line = lines
        .iter()
        .find_map(|l| l.strip_prefix("splitter agent stopped: XDP detached; packet counters "))
        .unwrap_or_else(|| panic!("no counters line in:\n{}", lines.join("\n")));
    let counted: serde_json::Value = serde_json::from_str(line).unwrap();

    let frames = after.frames - before.frames;
    let (tcp, udp, icmp) = (after.tcp - before.tcp, after.udp - before.udp, after.icmp - before.icmp);
    println!("client sent {frames} frames: tcp {tcp}, udp {udp}, icmp {icmp}; agent counted {counted}");
    assert_eq!(icmp, pings, "the client sent only echo requests");
    assert_eq!(udp, udp_exchanges);
    assert!(tcp >= 3 * tcp_connections, "at least SYN, ACK and data per connection");
    assert_eq!(counter(&counted, "icmp"), icmp);
    assert_eq!(counter(&counted, "udp"), udp);
    assert_eq!(counter(&counted, "tcp"), tcp);
    assert_eq!(counter(&counted, "malformed"), 0);
    // Every frame the peer put on the wire was seen: ARP makes up the rest.
    let total: u64 = ["non_ipv4", "ipv4_other", "tcp", "udp", "icmp", "malformed"].iter().map(|c| counter(&counted, c)).sum();
    assert_eq!(total, frames, "frames counted by XDP vs frames sent by the peer");
    // The XDP program is gone after a clean exit.
    let link = splitter.ip_output(&["link", "show", "dev", &veth.a]).unwrap();
    assert!(!link.contains("xdp"), "XDP still attached after SIGTERM: {link}");
}

#[test]
fn agent_refuses_a_missing_interface_in_one_line() {
    if !privileged("agent_refuses_a_missing_interface_in_one_line") {
        return;
    }
    let ns = Netns::new("noiface").unwrap();
    let agent = ns.spawn(splitter_bin(), &["agent", "--iface", "nosuch0"]).unwrap();
    let (code, lines) = agent.wait(Duration::from_secs(10)).unwrap();
    assert_ne!(code, 0);
    assert_eq!(lines.len(), 1, "one line, got {lines:?}");
    assert!(lines[0].contains("interface \"nosuch0\" does not exist"), "{lines:?}");
}

#[test]
fn agent_refuses_without_privileges_in_one_line() {
    if !privileged("agent_refuses_without_privileges_in_one_line") {
        return;
    }
    let ns = Netns::new("nopriv").unwrap();
    // Drop to an unprivileged user with no capabilities (setpriv is in util-linux).
    let mut cmd = ns.command("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--"])
        .arg(splitter_bin())
        .args(["agent", "--iface", "lo"]);
    let (code, lines) = Process::spawn(cmd).unwrap().wait(Duration::from_secs(10)).unwrap();
    assert_ne!(code, 0);
    assert_eq!(lines.len(), 1, "one line, got {lines:?}");
    assert!(lines[0].contains("insufficient privileges"), "{lines:?}");
}
