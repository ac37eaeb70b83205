//! Faults around a running agent, with real traffic through the XDP datapath: a broken
//! file in the configuration directory, a state directory that cannot be written, the
//! interfaces going down and up (and a neighbour changing its MAC), and a target network
//! that becomes unreachable.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use splitter_tests::{
    privileged,
    testbed::{sava_gateway, Testbed, SAVA_CANARY as CANARY, VIP},
};

/// One HTTP/1.0 GET to the VIP on `port` that must connect and answer within `limit`
/// (a lost SYN, retransmitted after a second, fails it); returns the version or the error.
fn quick_get(port: u16, limit: Duration) -> Result<String, String> {
    let addr = format!("{VIP}:{port}").parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(limit)).unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\nHost: sava\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("read: {e}"))?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).ok_or_else(|| format!("no HTTP head in {response:?}"))?;
    Ok(body.split(' ').next().unwrap_or_default().to_string())
}

fn assert_agent_alive(bed: &Testbed) {
    let (body, code) = bed.curl(&["http://splitter/api/v1/gateways"]);
    assert_eq!(code, 200, "the agent answers: {body}");
    // SAFETY: kill with signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(bed.agent().pid() as i32, 0) }, 0, "the agent process is alive");
}

#[test]
fn a_broken_file_in_the_config_directory_is_reported_while_the_others_apply() {
    if !privileged("a_broken_file_in_the_config_directory_is_reported_while_the_others_apply") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.write_config("a.yaml", &sava_gateway("a", 9050, "100%", "0%", "10.10.2.21:8080", "")).unwrap();
    let b_path = bed.write_config("b.yaml", &sava_gateway("b", 9060, "100%", "0%", "10.10.2.21:8080", "")).unwrap();
    bed.start_agent(&[]).unwrap();
    assert_eq!(bed.sample(9050, 20).get("1.0.0"), Some(&20));
    assert_eq!(bed.sample(9060, 20).get("1.0.0"), Some(&20));
    let b_before = bed.cli_ok(&["get", "b"]).unwrap();

    // b.yaml: new weights, but an unknown `sticky` value on line 11; a.yaml: new weights;
    // c.yaml: a new file that never was valid (a YAML syntax error).
    bed.write_config("b.yaml", &sava_gateway("b", 9060, "0%", "100%", "10.10.2.21:8080", "sticky: cookie\n")).unwrap();
    let c_path = bed.write_config("c.yaml", "name: c\nport: 9070\nroutes: [\n").unwrap();
    bed.write_config("a.yaml", &sava_gateway("a", 9050, "0%", "100%", "10.10.2.21:8080", "")).unwrap();
    bed.wait_applied("a", 2).unwrap();
    let b_error = format!("{}:11:9: sticky: unknown value `cookie`: expected none, client, service or instance", b_path.display());
    let logged =
        bed.agent().wait_for_line(&format!("configuration file not applied, nothing changed: {b_error}"), Duration::from_secs(5)).unwrap();
    println!("agent log: {logged}");
    bed.agent()
        .wait_for_line(&format!("configuration file not applied, nothing changed: {}:", c_path.display()), Duration::from_secs(5))
        .unwrap();

    // The operator sees both in `splitter get`, one line each, and in /metrics.
    let get = bed.cli_ok(&["get"]).unwrap();
    println!("{get}");
    assert!(get.contains(&format!("# configuration file {} not applied: {b_error}\n", b_path.display())), "{get}");
    let c_note = get
        .lines()
        .find(|l| l.starts_with(&format!("# configuration file {} not applied: ", c_path.display())))
        .unwrap_or_else(|| panic!("{get}"));
    assert!(c_note.contains(&format!("not applied: {}:", c_path.display())) && c_note.contains(": YAML syntax error: "), "{c_note}");
    assert_eq!(bed.metric("splitter_config_errors"), 2.0);

    // a's new weights are live; b keeps its earlier, good version.
    assert_eq!(bed.sample(9050, 30).get("1.1.0"), Some(&30), "a.yaml applied");
    assert_eq!(bed.sample(9060, 30).get("1.0.0"), Some(&30), "b keeps its old weights");
    assert_eq!(bed.cli_ok(&["get", "b"]).unwrap(), b_before, "gateway b unchanged");
    assert!(bed.cli(&["get", "c"]).unwrap().0 != 0, "no gateway c");

    // Fixed: b applies, the errors go.
    bed.write_config("b.yaml", &sava_gateway("b", 9060, "0%", "100%", "10.10.2.21:8080", "")).unwrap();
    std::fs::remove_file(&c_path).unwrap();
    bed.wait_applied("b", 2).unwrap();
    assert_eq!(bed.sample(9060, 30).get("1.1.0"), Some(&30), "b.yaml applied once fixed");
    let deadline = Instant::now() + Duration::from_secs(5);
    while bed.metric("splitter_config_errors") != 0.0 {
        assert!(Instant::now() < deadline, "config errors cleared");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(!bed.cli_ok(&["get"]).unwrap().contains("not applied"));
    assert_agent_alive(&bed);
}

/// A directory made read-only by a read-only bind mount of itself inside the agent's
/// mount namespace (`ip netns exec` gives the agent its own): root ignores file modes, not
/// read-only mounts. Unmounted on drop (on failure too).
struct ReadOnly {
    pid: u32,
    dir: PathBuf,
}

impl ReadOnly {
    fn in_namespace_of(pid: u32, args: &[&str]) -> std::process::Output {
        Command::new("nsenter").arg("-t").arg(pid.to_string()).arg("-m").args(args).output().expect("nsenter (util-linux)")
    }

    fn mount(pid: u32, dir: &Path) -> Self {
        let d = dir.to_str().unwrap();
        let me = Self { pid, dir: dir.to_path_buf() };
        for args in [vec!["mount", "--bind", d, d], vec!["mount", "-o", "remount,bind,ro", d]] {
            let out = Self::in_namespace_of(pid, &args);
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        // Really read-only for the agent (root) now.
        let probe = dir.join("probe");
        let out = Self::in_namespace_of(pid, &["touch", probe.to_str().unwrap()]);
        assert!(!out.status.success(), "the state directory is still writable");
        me
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Self::in_namespace_of(self.pid, &["umount", self.dir.to_str().unwrap()]);
    }
}

#[test]
fn an_unwritable_state_directory_keeps_the_change_live_warns_and_recovers() {
    if !privileged("an_unwritable_state_directory_keeps_the_change_live_warns_and_recovers") {
        return;
    }
    let bed = Testbed::sava(&[], "100%", "0%").unwrap();
    let state_dir = bed.run_dir.path().join("state");
    let state_file = state_dir.join("state.json");
    let saved_before = std::fs::read_to_string(&state_file).expect("the agent saved its state");
    assert_eq!(bed.sample(9050, 20).get("1.0.0"), Some(&20));

    let read_only = ReadOnly::mount(bed.agent().pid(), &state_dir);
    // An emergency change still takes effect, with a warning naming the directory and the
    // OS error.
    let (code, out, err) = bed.cli(&["weight", "sava", &format!("{CANARY}=100%")]).unwrap();
    println!("exit {code}\nstdout:\n{out}stderr:\n{err}");
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.lines().count(), 1, "one warning line: {err:?}");
    let warning = err.trim_end();
    assert!(
        warning
            .starts_with(&format!("splitter: warning: the change is live, but the state could not be saved in {}: ", state_dir.display())),
        "{warning}"
    );
    assert!(warning.contains("Read-only file system"), "the OS error: {warning}");
    assert!(warning.ends_with("an agent restarted now would come back with the last saved state"), "{warning}");
    assert_eq!(bed.sample(9050, 30).get("1.1.0"), Some(&30), "the new weights are live");
    assert_eq!(std::fs::read_to_string(&state_file).unwrap(), saved_before, "nothing could be saved");
    // Visible afterwards too: `get`, /metrics, the log.
    let get = bed.cli_ok(&["get"]).unwrap();
    assert!(get.starts_with(&format!("# state not saved in {}: ", state_dir.display())), "{get}");
    assert!(get.contains("weight: 100%"), "{get}");
    assert!(bed.metric("splitter_state_save_errors_total") >= 1.0);
    assert_eq!(bed.metric("splitter_state_saved"), 0.0);
    bed.agent().wait_for_line(&format!("cannot save state in {}", state_dir.display()), Duration::from_secs(1)).unwrap();
    // A rollback works the same way.
    let (code, _, err) = bed.cli(&["rollback", "sava"]).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("the change is live, but the state could not be saved"), "{err}");
    assert_eq!(bed.sample(9050, 20).get("1.0.0"), Some(&20), "rolled back");
    assert_agent_alive(&bed);

    // Writable again: the next change is saved, without a warning.
    drop(read_only);
    let (code, _, err) = bed.cli(&["weight", "sava", &format!("{CANARY}=50%")]).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "no warning once the disk is back: {err}");
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    let doc = saved["gateways"][0].as_str().unwrap();
    println!("saved:\n{doc}");
    assert!(doc.contains(&format!("\"{CANARY}\":\n    weight: 50%")), "state.json has the new weights: {doc}");
    assert_eq!(bed.metric("splitter_state_saved"), 1.0);
    assert!(!bed.cli_ok(&["get"]).unwrap().contains("state not saved"));
    bed.agent().wait_for_line(&format!("state saved in {} again", state_dir.display()), Duration::from_secs(1)).unwrap();
}

fn xdp_attached(bed: &Testbed, dev: &str) -> bool {
    let link = bed.splitter.ip_output(&["-d", "link", "show", "dev", dev]).unwrap();
    link.contains("prog/xdp")
}

#[test]
fn interfaces_going_down_and_up_and_a_neighbour_changing_its_mac_keep_traffic_flowing() {
    if !privileged("interfaces_going_down_and_up_and_a_neighbour_changing_its_mac_keep_traffic_flowing") {
        return;
    }
    let bed = Testbed::sava(&[], "50%", "50%").unwrap();
    let seen = bed.sample(9050, 40);
    assert!(seen.len() == 2, "{seen:?}");
    let redirects = |bed: &Testbed| bed.metric("splitter_packets_total{kind=\"redirect\"}");

    for dev in ["spl-c", "spl-b"] {
        bed.splitter.ip(&["link", "set", dev, "down"]).unwrap();
        thread::sleep(Duration::from_millis(300));
        bed.splitter.ip(&["link", "set", dev, "up"]).unwrap();
    }
    for dev in ["spl-c", "spl-b"] {
        assert!(xdp_attached(&bed, dev), "XDP still attached to {dev}");
    }
    let before = redirects(&bed);
    let seen = bed.sample(9050, 100);
    println!("after down/up: {seen:?}");
    assert!(seen.get("1.0.0").is_some_and(|n| *n >= 25) && seen.get("1.1.0").is_some_and(|n| *n >= 25), "{seen:?}");
    let after = redirects(&bed);
    assert!(after >= before + 300.0, "the XDP datapath forwards again ({before} -> {after} redirects)");

    // The backends' MAC changes and the splitter learns it: the datapath's per-CPU
    // next-hop cache must not keep sending to the old MAC (which the backends now drop).
    bed.backends.ip(&["link", "set", "bk0", "address", "02:00:5e:10:20:30"]).unwrap();
    for addr in ["10.10.2.11", "10.10.2.21", "10.10.2.2"] {
        bed.splitter.ip(&["neigh", "replace", addr, "lladdr", "02:00:5e:10:20:30", "dev", "spl-b", "nud", "reachable"]).unwrap();
    }
    // Longer than the cache's lifetime (25 jiffies: 100 ms at HZ=250, 250 ms at HZ=100).
    thread::sleep(Duration::from_millis(400));
    let results: Vec<Result<String, String>> =
        bed.client.enter(|| (0..60).map(|_| quick_get(9050, Duration::from_millis(800))).collect()).unwrap();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "connections failed after the MAC change: {failures:?}");

    assert_agent_alive(&bed);
    let errors: Vec<String> = bed.agent().lines().into_iter().filter(|l| l.contains("ERROR") || l.contains("WARN")).collect();
    assert!(errors.is_empty(), "the agent logged problems: {errors:?}");
}

#[test]
fn an_unreachable_target_fails_only_its_own_flows_and_a_health_check_takes_it_out() {
    if !privileged("an_unreachable_target_fails_only_its_own_flows_and_a_health_check_takes_it_out") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    // A backend on another network, routed via the backends' namespace.
    bed.start_backend("10.99.0.5", 8080, "1.1.0", &[]).unwrap();
    bed.splitter.ip(&["route", "add", "10.99.0.0/24", "via", "10.10.2.2"]).unwrap();
    let check = "health_check:\n  protocol: tcp\n  interval: 200ms\n  timeout: 150ms\n  unhealthy_threshold: 2\n  healthy_threshold: 2\n";
    bed.write_config("plain.yaml", &sava_gateway("plain", 9050, "50%", "50%", "10.99.0.5:8080", "")).unwrap();
    bed.write_config("checked.yaml", &sava_gateway("checked", 9060, "50%", "50%", "10.99.0.5:8080", check)).unwrap();
    bed.start_agent(&[]).unwrap();
    assert_eq!(bed.sample(9050, 40).len(), 2, "both targets serve while reachable");
    assert_eq!(bed.sample(9060, 40).len(), 2, "both targets serve while reachable");

    // A full-NAT target without any route is refused when applied, with one line.
    let before = bed.cli_ok(&["get"]).unwrap();
    let far = bed.run_dir.path().join("far.yaml");
    std::fs::write(&far, sava_gateway("far", 9080, "50%", "50%", "10.98.0.7:8080", "")).unwrap();
    let (code, _, err) = bed.cli(&["apply", "-f", far.to_str().unwrap()]).unwrap();
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no route to target 10.98.0.7:8080"), "{err}");
    assert_eq!(bed.cli_ok(&["get"]).unwrap(), before, "nothing changed");

    // The network becomes unreachable.
    bed.splitter.ip(&["route", "del", "10.99.0.0/24"]).unwrap();
    // The datapath's next-hop cache may forward along the old route for one more
    // lifetime (25 jiffies, at most 250 ms).
    thread::sleep(Duration::from_millis(300));
    let passed_before = bed.metric("splitter_packets_total{kind=\"pass_fib\"}");
    // Without a health check, new flows hashed to that target fail (the FIB finds no
    // route: the translated packet is passed to the kernel, which has no route either);
    // the other target's flows are unaffected.
    let results: Vec<Result<String, String>> =
        bed.client.enter(|| (0..16).map(|_| quick_get(9050, Duration::from_millis(700))).collect()).unwrap();
    println!("plain gateway: {results:?}");
    let served: Vec<&String> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert!(served.iter().all(|v| *v == "1.0.0"), "{results:?}");
    assert!(served.len() >= 2 && served.len() < 16, "some flows fail, the stable target's succeed: {results:?}");
    assert!(bed.metric("splitter_packets_total{kind=\"pass_fib\"}") > passed_before, "counted as FIB misses");

    // With a health check, the target is taken out and every new connection succeeds.
    let unhealthy = bed.agent().wait_for_line("event health checked: target 10.99.0.5:8080 unhealthy", Duration::from_secs(5)).unwrap();
    println!("{unhealthy}");
    let seen = bed.sample(9060, 50);
    assert_eq!(seen.get("1.0.0"), Some(&50), "{seen:?}");
    assert_agent_alive(&bed);
    let errors: Vec<String> = bed.agent().lines().into_iter().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "the agent logged errors: {errors:?}");

    // Reachable again: back in.
    bed.splitter.ip(&["route", "add", "10.99.0.0/24", "via", "10.10.2.2"]).unwrap();
    bed.agent().wait_for_line("event health checked: target 10.99.0.5:8080 healthy again", Duration::from_secs(5)).unwrap();
    assert_eq!(bed.sample(9060, 40).len(), 2, "the target serves again");
}
