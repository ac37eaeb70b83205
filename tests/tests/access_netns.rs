//! Who may use the agent, and how much a client may ask of it: the control socket's
//! group, the CLI's permission error, bounded request heads, stalled and idle clients,
//! the connection cap, and the capabilities the agent refuses to start without.

use std::{
    io::{Read, Write},
    os::unix::{fs::MetadataExt, net::UnixStream},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use splitter_tests::{
    privileged, splitter_bin,
    testbed::{TempDir, Testbed},
    Netns, Process,
};

const SAVA: &str = "name: sava
port: 9050/http
virtual_address: 10.0.0.10
routes:
  sava/sava:1.0.0:
    weight: 100%
    targets: [10.10.2.11:8080]
";

/// A group of the host other than root's, by name and gid (e.g. daemon, 1).
fn some_named_group() -> (String, u32) {
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    groups
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse::<u32>().ok()?))
        })
        .find(|(_, gid)| *gid > 0 && *gid < 1000)
        .expect("a system group in /etc/group")
}

/// Runs the CLI as uid/gid 4243 with the given supplementary groups (none: `--clear-groups`).
fn cli_as_other_user(bed: &Testbed, groups: Option<u32>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "4243", "--regid", "4243"]);
    match groups {
        Some(g) => cmd.args(["--groups", &g.to_string()]),
        None => cmd.arg("--clear-groups"),
    };
    cmd.args(["--inh-caps=-all", "--"]).arg(splitter_bin()).args(args).arg("--socket").arg(bed.socket());
    let out = cmd.output().expect("setpriv (util-linux)");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_socket_belongs_to_its_group_and_others_get_a_clear_permission_error() {
    if !privileged("the_socket_belongs_to_its_group_and_others_get_a_clear_permission_error") {
        return;
    }
    let (group, gid) = some_named_group();
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.write_config("sava.yaml", SAVA).unwrap();
    // The user must be able to reach the socket: every directory on the way searchable.
    for dir in bed.socket().ancestors().skip(1) {
        let mode = std::fs::metadata(dir).unwrap().mode();
        assert!(mode & 0o001 != 0, "{} is not searchable by others (mode {mode:o})", dir.display());
    }
    bed.start_agent(&["--socket-group", &group]).unwrap();
    let meta = std::fs::metadata(bed.socket()).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o660, "socket mode");
    assert_eq!(meta.gid(), gid, "socket group");

    // Outside the group: one line naming the socket, its mode and group, and what to do.
    let (code, out, err) = cli_as_other_user(&bed, None, &["get"]);
    println!("{err}");
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    let expected = format!(
        "splitter: error: permission denied on {}: the control socket is mode 0660, group '{group}' (gid {gid}); run as root or as a member of that group",
        bed.socket().display()
    );
    assert!(err.starts_with(&expected), "got {err}\nexpected {expected}");
    // A member of the group may use every command.
    let (code, out, err) = cli_as_other_user(&bed, Some(gid), &["get"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("name: \"sava\""), "{out}");
    let (code, _, err) = cli_as_other_user(&bed, Some(gid), &["weight", "sava", "sava/sava:1.0.0=100%"]);
    assert_eq!(code, 0, "{err}");

    // An unknown group: the agent refuses to start, in one line.
    let run = TempDir::new("nogroup").unwrap();
    let socket = run.path().join("s.sock").display().to_string();
    let agent = bed
        .splitter
        .spawn(splitter_bin(), &["agent", "--iface", "spl-c", "--ephemeral", "--socket", &socket, "--socket-group", "no-such-group-4711"])
        .unwrap();
    let (code, lines) = agent.wait(Duration::from_secs(10)).unwrap();
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("--socket-group no-such-group-4711: no group named \"no-such-group-4711\""), "{lines:?}");
}

/// One raw exchange on the control socket: sends `request` (ignoring a write cut short by
/// the agent closing), then reads until the agent closes or `limit` passes. Returns what
/// was read and how long the agent took to close.
fn raw_exchange(socket: &Path, request: &[u8], limit: Duration) -> (String, Option<Duration>) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(limit)).unwrap();
    let started = Instant::now();
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Some(started.elapsed()),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            // A reset after the agent refused a request it did not read whole.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break Some(started.elapsed()),
            Err(_) => break None,
        }
    };
    (String::from_utf8_lossy(&answer).into_owned(), closed)
}

#[test]
fn request_heads_are_bounded_and_stalled_or_idle_clients_are_disconnected() {
    if !privileged("request_heads_are_bounded_and_stalled_or_idle_clients_are_disconnected") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.write_config("sava.yaml", SAVA).unwrap();
    bed.start_agent(&[]).unwrap();
    let socket = bed.socket();

    // A 100 KB header field: 431, the connection closed.
    let big = format!("GET /api/v1/gateways HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(100_000));
    let (answer, closed) = raw_exchange(&socket, big.as_bytes(), Duration::from_secs(5));
    println!("100 KB header: {:?}", answer.lines().next());
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    assert!(closed.is_some(), "the connection is closed");
    // Too many header fields: 431 too.
    let many: String = (0..200).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let (answer, _) =
        raw_exchange(&socket, format!("GET /api/v1/gateways HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(), Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    // The agent still answers.
    let (body, code) = bed.curl(&["http://splitter/api/v1/gateways"]);
    assert_eq!(code, 200, "{body}");

    // Half a head, then nothing; no request at all; a body that stops short. Each is
    // disconnected after the timeouts (10 s), and others are served meanwhile.
    let stalls: Vec<(&str, &[u8])> = vec![
        ("half a request head", b"GET /api/v1/gateways HTTP/1.1\r\nHost: x\r\n"),
        ("an idle connection", b""),
        ("a body that stops short", b"PUT /api/v1/gateways/sava HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nname: sa"),
    ];
    let handles: Vec<_> = stalls
        .into_iter()
        .map(|(what, request)| {
            let socket = socket.clone();
            thread::spawn(move || (what, raw_exchange(&socket, request, Duration::from_secs(30))))
        })
        .collect();
    thread::sleep(Duration::from_secs(2));
    let (body, code) = bed.curl(&["http://splitter/api/v1/gateways"]);
    assert_eq!(code, 200, "served while three clients stall: {body}");
    for handle in handles {
        let (what, (answer, closed)) = handle.join().unwrap();
        println!("{what}: closed after {closed:?}, answer {:?}", answer.lines().next());
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after 30 s"));
        // Not before the 10 s limit (the upper bound is raw_exchange's 30 s).
        assert!(closed >= Duration::from_secs(9), "{what}: closed after {closed:?}");
        if what == "a body that stops short" {
            assert!(answer.starts_with("HTTP/1.1 408 "), "{what}: {answer:?}");
            assert!(answer.contains("request body: not complete within 10s"), "{answer}");
        }
    }
    assert!(bed.cli_ok(&["get", "sava"]).unwrap().contains("weight: 100%"), "the stalled PUT changed nothing");

    // At most 64 connections at once: one more is answered 503 at once, and served again
    // once the others close.
    let open: Vec<UnixStream> = (0..64).map(|_| UnixStream::connect(&socket).unwrap()).collect();
    thread::sleep(Duration::from_millis(300));
    let (answer, closed) = raw_exchange(&socket, b"", Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
    assert!(answer.contains("at most 64 control connections"), "{answer}");
    assert!(closed.is_some(), "answered and closed, not held: {closed:?}");
    drop(open);
    thread::sleep(Duration::from_millis(300));
    let (body, code) = bed.curl(&["http://splitter/api/v1/gateways"]);
    assert_eq!(code, 200, "{body}");
}

/// Runs `splitter agent` under setpriv with `setpriv_args` in a namespace of its own (on
/// its loopback, generic XDP); returns its exit code and output. A started agent is
/// stopped with SIGTERM (a clean exit, code 0, after its "ready" line).
fn agent_under(setpriv_args: &[&str], agent_args: &[&str]) -> (i32, Vec<String>) {
    let ns = Netns::new("caps").unwrap();
    let run = TempDir::new("caps").unwrap();
    let socket = run.path().join("s.sock").display().to_string();
    let state = run.path().join("state").display().to_string();
    let mut cmd = ns.command("setpriv");
    cmd.args(setpriv_args).arg("--").arg(splitter_bin());
    cmd.args(["agent", "--iface", "lo", "--xdp-mode", "skb", "--socket", &socket, "--state-dir", &state]).args(agent_args);
    let agent = Process::spawn(cmd).unwrap();
    if agent.wait_for_line("ready", Duration::from_secs(10)).is_ok() {
        agent.signal(libc::SIGTERM).unwrap();
    }
    agent.wait(Duration::from_secs(10)).unwrap()
}

#[test]
fn the_agent_names_exactly_the_capabilities_it_lacks() {
    if !privileged("the_agent_names_exactly_the_capabilities_it_lacks") {
        return;
    }
    const BPF: &str = "CAP_BPF or CAP_SYS_ADMIN (to load BPF programs and maps)";
    const PERFMON: &str = "CAP_PERFMON or CAP_SYS_ADMIN (for the verifier";
    const NET_ADMIN: &str = "CAP_NET_ADMIN (to attach XDP programs to interfaces)";
    const MOUNT: &str = "CAP_SYS_ADMIN (to mount a BPF filesystem on /sys/fs/bpf;";
    let all = [BPF, PERFMON, NET_ADMIN, MOUNT];
    // (setpriv arguments, agent arguments, what the refusal names; empty: it starts)
    let cases: Vec<(Vec<&str>, Vec<&str>, Vec<&str>)> = vec![
        (vec!["--inh-caps=-all", "--bounding-set=-net_admin"], vec!["--ephemeral"], vec![NET_ADMIN]),
        (vec!["--inh-caps=-all", "--bounding-set=-bpf,-sys_admin"], vec!["--ephemeral"], vec![BPF]),
        (vec!["--inh-caps=-all", "--bounding-set=-perfmon,-sys_admin"], vec!["--ephemeral"], vec![PERFMON]),
        // `ip netns exec` gives the agent a fresh /sys: /sys/fs/bpf is no bpffs there.
        (vec!["--inh-caps=-all", "--bounding-set=-sys_admin"], vec![], vec![MOUNT]),
        (vec!["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"], vec![], all.to_vec()),
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON; without it, those two and
        // CAP_NET_ADMIN are enough when nothing is mounted.
        (vec!["--inh-caps=-all", "--bounding-set=-bpf,-perfmon"], vec!["--ephemeral"], vec![]),
        (vec!["--inh-caps=-all", "--bounding-set=-sys_admin"], vec!["--ephemeral"], vec![]),
    ];
    for (setpriv_args, agent_args, expected) in cases {
        let (code, lines) = agent_under(&setpriv_args, &agent_args);
        println!("{setpriv_args:?} {agent_args:?}: exit {code}: {lines:?}");
        if expected.is_empty() {
            assert_eq!(code, 0, "{setpriv_args:?}: {lines:?}");
            assert!(lines.iter().any(|l| l.contains("ready")), "{lines:?}");
            continue;
        }
        assert_eq!(code, 1, "{setpriv_args:?}: {lines:?}");
        assert_eq!(lines.len(), 1, "one line: {lines:?}");
        let line = &lines[0];
        assert!(line.starts_with("stderr: splitter: error: insufficient privileges: the agent lacks "), "{line}");
        for needle in all {
            assert_eq!(line.contains(needle), expected.contains(&needle), "{setpriv_args:?}: {needle:?} in {line}");
        }
    }
}
