//! End to end in namespaces: real TCP and UDP clients, the agent attached natively to
//! the splitter's two veths, real backend processes answering their version.

use std::{collections::BTreeMap, sync::Mutex, thread, time::Duration};

use splitter_tests::{
    privileged,
    testbed::{http_get, sava_gateway, LineClient, Testbed, VIP, VIP6},
};

const DCOS_09: [&str; 3] = ["10.10.2.11", "10.10.2.12", "10.10.2.13"];
const DCOS_10: &str = "10.10.2.21";

const DCOS6_09: [&str; 3] = ["2001:db8:2::11", "2001:db8:2::12", "2001:db8:2::13"];
const DCOS6_10: &str = "2001:db8:2::21";

/// The DC/OS example's addresses in one family: the VIP, the 0.9 instances, the 1.0 one.
struct Family {
    vip: &'static str,
    stable: [&'static str; 3],
    canary: &'static str,
}

const IPV4: Family = Family { vip: VIP, stable: DCOS_09, canary: DCOS_10 };
const IPV6: Family = Family { vip: VIP6, stable: DCOS6_09, canary: DCOS6_10 };

fn target(addr: &str) -> String {
    std::net::SocketAddr::new(addr.parse().unwrap(), 8080).to_string()
}

fn dcos_gateway(mode: &str, family: &Family) -> String {
    let quoted = |addr: &str| format!("\"{}\"", target(addr));
    let stable: Vec<String> = family.stable.iter().map(|a| quoted(a)).collect();
    format!(
        "name: simpleservice
port: 9050/http
virtual_address: {}
mode: {mode}
routes:
  simpleservice/0.9:
    weight: 80%
    targets: [{}]
  simpleservice/1.0:
    weight: 20%
    targets: [{}]
",
        family.vip,
        stable.join(", "),
        quoted(family.canary)
    )
}

fn dcos_testbed(mode: &str, family: &Family) -> Testbed {
    let mut bed = if family.vip == VIP6 { Testbed::dual_stack() } else { Testbed::new() }.unwrap();
    for addr in family.stable {
        bed.start_backend(addr, 8080, "0.9", &[]).unwrap();
    }
    bed.start_backend(family.canary, 8080, "1.0", &[]).unwrap();
    bed.write_config("simpleservice.yaml", &dcos_gateway(mode, family)).unwrap();
    bed.start_agent(&[]).unwrap();
    bed
}

/// `connections` HTTP requests to `vip_port` from `threads` client threads; returns how
/// many each backend (`VERSION ADDR:PORT`) answered. Panics on any failed request.
fn requests_to(bed: &Testbed, vip_port: &str, connections: usize, threads: usize) -> BTreeMap<String, usize> {
    let answers = Mutex::new(BTreeMap::new());
    bed.client
        .enter(|| {
            thread::scope(|s| {
                for t in 0..threads {
                    let answers = &answers;
                    s.spawn(move || {
                        for i in (t..connections).step_by(threads) {
                            let body = http_get(vip_port, None).unwrap_or_else(|e| panic!("request {i}: {e:#}"));
                            *answers.lock().unwrap().entry(body).or_insert(0) += 1;
                        }
                    });
                }
            })
        })
        .unwrap();
    answers.into_inner().unwrap()
}

fn share(answers: &BTreeMap<String, usize>, prefix: &str) -> f64 {
    let total: usize = answers.values().sum();
    let part: usize = answers.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum();
    100.0 * part as f64 / total as f64
}

fn dcos_split(mode: &str, family: &Family) {
    let bed = dcos_testbed(mode, family);
    let connections = 2000;
    let vip_port = std::net::SocketAddr::new(family.vip.parse().unwrap(), 9050).to_string();
    let answers = requests_to(&bed, &vip_port, connections, 4);
    println!("{mode}: {connections} connections: {answers:?}");
    assert_eq!(answers.values().sum::<usize>(), connections, "every connection got a complete response");
    // Each flow lands on a target with its share's probability: a check allows 4.5
    // standard deviations of the binomial (a false failure about once in 150,000 checks).
    let tolerance = |percent: f64| 4.5 * 100.0 * ((percent / 100.0) * (1.0 - percent / 100.0) / connections as f64).sqrt();
    let v09 = share(&answers, "0.9 ");
    let v10 = share(&answers, "1.0 ");
    assert!((v09 - 80.0).abs() <= tolerance(80.0), "0.9 got {v09:.1}%, want 80 ± {:.1}", tolerance(80.0));
    assert!((v10 - 20.0).abs() <= tolerance(20.0), "1.0 got {v10:.1}%, want 20 ± {:.1}", tolerance(20.0));
    for addr in family.stable {
        let s = share(&answers, &format!("0.9 {}", target(addr)));
        let third = 80.0 / 3.0;
        assert!((s - third).abs() <= tolerance(third), "instance {addr} got {s:.1}%, want {third:.1}% ± {:.1}", tolerance(third));
    }
    // The agent's own counters saw the same flows.
    let stats = bed.stats().unwrap();
    let gateway = &stats[0];
    assert_eq!(gateway["new_flows"].as_u64().unwrap() as usize, connections, "{gateway}");
    for target in gateway["targets"].as_array().unwrap() {
        let name = target["target"].as_str().unwrap();
        let seen = answers.iter().filter(|(k, _)| k.ends_with(name)).map(|(_, v)| *v).sum::<usize>();
        assert_eq!(target["new_flows"].as_u64().unwrap() as usize, seen, "{target}");
        assert!(target["packets_from_target"].as_u64().unwrap() >= 3 * seen as u64, "{target}");
    }
    // And the packets took the XDP fast path: redirected between the splitter's two
    // interfaces, the kernel forwarding at most the first packets before the neighbour
    // entries are known.
    let mut bed = bed;
    let lines = bed.stop_agent().unwrap();
    let counters = lines.iter().find_map(|l| l.split_once("packet counters ").map(|(_, c)| c)).unwrap();
    let counters: serde_json::Value = serde_json::from_str(counters).unwrap();
    println!("{mode}: datapath counters {counters}");
    let redirected = counters["redirect"].as_u64().unwrap();
    assert!(redirected >= 5 * connections as u64, "{counters}");
    assert!(counters["pass_no_neigh"].as_u64().unwrap() <= 10, "{counters}");
}

#[test]
fn dcos_80_20_split_full_nat() {
    if !privileged("dcos_80_20_split_full_nat") {
        return;
    }
    dcos_split("fullnat", &IPV4);
}

#[test]
fn dcos_80_20_split_dnat() {
    if !privileged("dcos_80_20_split_dnat") {
        return;
    }
    dcos_split("dnat", &IPV4);
}

#[test]
fn dcos_80_20_split_over_ipv6_full_nat() {
    if !privileged("dcos_80_20_split_over_ipv6_full_nat") {
        return;
    }
    dcos_split("fullnat", &IPV6);
}

#[test]
fn dcos_80_20_split_over_ipv6_dnat() {
    if !privileged("dcos_80_20_split_over_ipv6_dnat") {
        return;
    }
    dcos_split("dnat", &IPV6);
}

fn sava(stable: &str, canary: &str) -> String {
    sava_gateway("sava", 9050, stable, canary, "10.10.2.21:8080", "")
}

#[test]
fn weight_changes_never_move_or_reset_established_connections() {
    if !privileged("weight_changes_never_move_or_reset_established_connections") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.write_config("sava.yaml", &sava("90%", "10%")).unwrap();
    bed.start_agent(&[]).unwrap();

    bed.client
        .enter(|| {
            let mut long_lived: Vec<(LineClient, String)> = (0..50)
                .map(|_| {
                    let mut c = LineClient::connect(&format!("{VIP}:9050")).unwrap();
                    let first = c.ask().unwrap();
                    (c, first)
                })
                .collect();
            let on_v2 = long_lived.iter().filter(|(_, a)| a.starts_with("1.1.0")).count();
            println!("50 long-lived connections: {on_v2} on 1.1.0");
            let check_all = |conns: &mut Vec<(LineClient, String)>, phase: &str| {
                for (i, (c, first)) in conns.iter_mut().enumerate() {
                    for _ in 0..3 {
                        let answer = c.ask().unwrap_or_else(|e| panic!("{phase}: connection {i} failed: {e:#}"));
                        assert_eq!(&answer, first, "{phase}: connection {i} moved");
                    }
                }
            };
            check_all(&mut long_lived, "before");

            bed.write_config("sava.yaml", &sava("0%", "100%")).unwrap();
            bed.reload_and_wait("sava", 2).unwrap();
            check_all(&mut long_lived, "after 0/100");
            for _ in 0..50 {
                let body = http_get(&format!("{VIP}:9050"), None).unwrap();
                assert!(body.starts_with("1.1.0 "), "new connection at 0/100 went to {body}");
            }

            bed.write_config("sava.yaml", &sava("90%", "10%")).unwrap();
            bed.reload_and_wait("sava", 3).unwrap();
            check_all(&mut long_lived, "after 90/10 again");
            let back: Vec<String> = (0..200).map(|_| http_get(&format!("{VIP}:9050"), None).unwrap()).collect();
            let v1 = back.iter().filter(|b| b.starts_with("1.0.0 ")).count();
            assert!((160..=195).contains(&v1), "new connections at 90/10: {v1}/200 on 1.0.0");
        })
        .unwrap();
    let stats = bed.stats().unwrap();
    for target in stats[0]["targets"].as_array().unwrap() {
        assert_eq!(target["resets_from_target"].as_u64(), Some(0), "{target}");
    }
}

#[test]
fn udp_requests_reach_a_target_and_come_back_from_the_vip() {
    if !privileged("udp_requests_reach_a_target_and_come_back_from_the_vip") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 5353, "1.0.0", &["--udp"]).unwrap();
    bed.start_backend("10.10.2.21", 5353, "1.1.0", &["--udp"]).unwrap();
    bed.write_config(
        "dns.yaml",
        &format!(
            "name: dns
port: 5353/udp
virtual_address: {VIP}
routes:
  dns/v1:
    weight: 50%
    targets: [10.10.2.11:5353]
  dns/v2:
    weight: 50%
    targets: [10.10.2.21:5353]
"
        ),
    )
    .unwrap();
    bed.start_agent(&[]).unwrap();
    let answers = bed
        .client
        .enter(|| {
            let mut answers = BTreeMap::new();
            for i in 0..200 {
                // A new socket per request: a new flow each time.
                let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                socket.send_to(format!("query {i}").as_bytes(), (VIP, 5353)).unwrap();
                let mut buf = [0u8; 256];
                let (n, from) = socket.recv_from(&mut buf).unwrap_or_else(|e| panic!("request {i}: {e}"));
                assert_eq!(from.to_string(), format!("{VIP}:5353"), "the answer comes from the VIP");
                let body = String::from_utf8_lossy(&buf[..n]).to_string();
                // Same flow again: same target.
                socket.send_to(b"again", (VIP, 5353)).unwrap();
                let (n2, _) = socket.recv_from(&mut buf).unwrap();
                assert_eq!(String::from_utf8_lossy(&buf[..n2]), body, "a UDP flow keeps its target");
                *answers.entry(body).or_insert(0) += 1;
            }
            answers
        })
        .unwrap();
    println!("udp answers: {answers:?}");
    assert_eq!(answers.len(), 2, "both targets answered: {answers:?}");
    let v1 = share(&answers, "1.0.0 ");
    assert!((v1 - 50.0).abs() <= 12.0, "1.0.0 got {v1:.1}% of 200 flows at 50/50");
}

#[test]
fn sticky_client_sees_one_target_per_client() {
    if !privileged("sticky_client_sees_one_target_per_client") {
        return;
    }
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    let clients: Vec<String> = (100..120).map(|i| format!("10.10.1.{i}")).collect();
    for c in &clients {
        bed.add_client_addr(c).unwrap();
    }
    let mut yaml = sava("50%", "50%");
    yaml = yaml.replace("routes:\n", "sticky: client\nroutes:\n");
    bed.write_config("sava.yaml", &yaml).unwrap();
    bed.start_agent(&[]).unwrap();
    let per_client: Vec<(String, Vec<String>)> = bed
        .client
        .enter(|| {
            clients
                .iter()
                .map(|c| {
                    let mut seen: Vec<String> = (0..50).map(|_| http_get(&format!("{VIP}:9050"), Some(c)).unwrap()).collect();
                    seen.sort();
                    seen.dedup();
                    (c.clone(), seen)
                })
                .collect()
        })
        .unwrap();
    let mut on_v1 = 0;
    for (client, seen) in &per_client {
        assert_eq!(seen.len(), 1, "client {client} saw {seen:?}");
        if seen[0].starts_with("1.0.0") {
            on_v1 += 1;
        }
    }
    println!("sticky: {on_v1}/20 clients on 1.0.0, {}/20 on 1.1.0", 20 - on_v1);
    assert!((4..=16).contains(&on_v1), "20 clients at 50/50 split {on_v1}/{}", 20 - on_v1);
}
