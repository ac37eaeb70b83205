//! A spoofed SYN flood against a full-NAT gateway: established connections are never
//! broken or moved, new clients keep getting through during the flood, and the service
//! is whole again within seconds of its end. Bounded: 8 s of flood from one core.

use std::{thread, time::Duration};

use splitter_tests::{
    privileged,
    testbed::{LineClient, Testbed, SPLITTER_CLIENT_SIDE, VIP},
    traffic::{mac_of, syn_flood, HttpTraffic},
};

const FLOOD: Duration = Duration::from_secs(8);

/// The sava backends behind a full-NAT gateway with a pool of four source addresses.
fn bed() -> Testbed {
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    for addr in ["10.10.2.100", "10.10.2.101", "10.10.2.102", "10.10.2.103"] {
        bed.splitter.ip(&["addr", "add", &format!("{addr}/24"), "dev", "spl-b"]).unwrap();
    }
    let gateway = format!(
        "name: sava
port: 9050/http
virtual_address: {VIP}
routes:
  sava/sava:1.0.0:
    weight: 50%
    targets: [10.10.2.11:8080]
  sava/sava:1.1.0:
    weight: 50%
    targets: [10.10.2.21:8080]
source:
  addresses: [10.10.2.100, 10.10.2.101, 10.10.2.102, 10.10.2.103]
  ports: 20000-59999
"
    );
    bed.write_config("sava.yaml", &gateway).unwrap();
    bed.start_agent(&[]).unwrap();
    bed
}

fn metric(bed: &Testbed, line_prefix: &str) -> f64 {
    let (body, _) = bed.curl(&["http://splitter/metrics"]);
    body.lines().find_map(|l| l.strip_prefix(line_prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

#[test]
fn a_syn_flood_breaks_no_established_connection_and_starves_no_new_one() {
    if !privileged("a_syn_flood_breaks_no_established_connection_and_starves_no_new_one") {
        return;
    }
    let bed = bed();
    let mut established: Vec<(LineClient, String)> = bed
        .client
        .enter(|| {
            (0..50)
                .map(|_| {
                    let mut c = LineClient::connect(&format!("{VIP}:9050")).unwrap();
                    let first = c.ask().unwrap();
                    (c, first)
                })
                .collect()
        })
        .unwrap();
    let splitter_mac = mac_of(&bed.splitter, "spl-c").unwrap();
    let traffic = HttpTraffic::start(&bed.client);
    thread::sleep(Duration::from_secs(1));
    let flood_from = traffic.started.elapsed().as_millis() as u64;
    let report = syn_flood(&bed.client, "cli0", splitter_mac, VIP.parse().unwrap(), 9050, FLOOD, 20_000_000).unwrap();
    let flood_to = traffic.started.elapsed().as_millis() as u64;
    println!(
        "flood: {} SYNs in {:.1} s = {:.0}/s from one core (spoofed 10.92.x.y, via {SPLITTER_CLIENT_SIDE})",
        report.frames,
        report.seconds,
        report.per_second()
    );
    // Established connections: every one answers, from the same backend.
    for (i, (c, first)) in established.iter_mut().enumerate() {
        let answer = c.ask().unwrap_or_else(|e| panic!("established connection {i} broken by the flood: {e:#}"));
        assert_eq!(&answer, first, "established connection {i} moved");
    }
    thread::sleep(Duration::from_secs(5));
    let end = traffic.started.elapsed().as_millis() as u64;
    let failures = traffic.failures.lock().unwrap().clone();
    let successes = traffic.successes.lock().unwrap().clone();
    drop(traffic);
    let during_ok = successes.iter().filter(|t| (flood_from..flood_to).contains(t)).count();
    let during_failed = failures.iter().filter(|(t, _)| (flood_from..flood_to).contains(t)).count();
    let after_ok = successes.iter().filter(|t| (flood_to..end).contains(t)).count();
    let after_failed: Vec<&(u64, String)> = failures.iter().filter(|(t, _)| (flood_to..end).contains(t)).collect();
    println!(
        "during the flood: {during_ok} new connections, {during_failed} failed; within 5 s after it: {after_ok}, {} failed",
        after_failed.len()
    );
    let capacity = metric(&bed, "splitter_half_open_capacity ");
    let started = metric(&bed, "splitter_flow_events_total{event=\"half_open_started\"} ");
    let expired = metric(&bed, "splitter_flow_events_total{event=\"half_open_expired\"} ");
    let taken = metric(&bed, "splitter_flow_events_total{event=\"half_open_taken_over\"} ");
    let missed = metric(&bed, "splitter_flow_events_total{event=\"established_missed\"} ");
    println!(
        "half-open: {started} started ({:.1}x the table's flows), {expired} expired, {taken} ports taken over; {missed} established missed",
        started / (capacity / 2.0)
    );
    assert!(report.frames as f64 > 2.0 * capacity, "the flood sent several times the half-open capacity ({} vs {capacity})", report.frames);
    assert!(during_ok > 20, "clients kept connecting during the flood ({during_ok})");
    assert!(
        during_failed * 100 <= (during_ok + during_failed),
        "at least 99% of new connections during the flood succeed: {during_failed} of {}",
        during_ok + during_failed
    );
    assert!(after_failed.is_empty(), "every connection after the flood succeeds: {after_failed:?}");
    assert!(after_ok > 20, "connections after the flood ({after_ok})");
}
