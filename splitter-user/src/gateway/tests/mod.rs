//! Gateway documents: the seed examples in config/, the weight rules, and the one-line errors.

use std::path::{Path, PathBuf};

use splitter_common::table::{build_bucket_table, BUCKET_TABLE_SIZE};

use super::*;

mod errors;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

fn gateway(text: &str) -> Gateway {
    match parse_documents("test.yaml", text) {
        Ok(documents) => match documents.as_slice() {
            [Document::Gateway(gateway)] => gateway.clone(),
            other => panic!("expected one gateway, got {other:?}"),
        },
        Err(err) => panic!("{err}"),
    }
}

fn update(text: &str) -> WeightUpdate {
    match parse_documents("update.yaml", text) {
        Ok(documents) => match documents.as_slice() {
            [Document::Weights(update)] => update.clone(),
            other => panic!("expected one weights update, got {other:?}"),
        },
        Err(err) => panic!("{err}"),
    }
}

fn load_gateway(file: &str) -> Gateway {
    let path = config_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match parse_documents(&path.display().to_string(), &text) {
        Ok(documents) => match documents.as_slice() {
            [Document::Gateway(gateway)] => gateway.clone(),
            other => panic!("expected one gateway in {file}, got {other:?}"),
        },
        Err(err) => panic!("{err}"),
    }
}

fn route<'g>(gateway: &'g Gateway, name: &str) -> &'g Route {
    gateway.routes.iter().find(|route| route.name == name).unwrap_or_else(|| panic!("no route {name}"))
}

const SAVA: &str = "\
name: sava/sava/port
port: 9050/http
virtual_address: 10.0.0.10
routes:
  sava/sava/sava:1.0.0/port:
    weight: 90%
    targets: [10.1.0.11:8080, 10.1.0.12:8080]
  sava/sava/sava:1.1.0/port:
    weight: 10%
    targets: [10.1.0.21:8080]
";

#[test]
fn sava_splits_90_10_over_its_instances() {
    let sava = load_gateway("sava.yaml");
    assert_eq!((sava.port, sava.protocol), (9050, Protocol::Http), "http is kept as written");
    assert_eq!(sava.virtual_address, Ipv4Addr::new(10, 0, 0, 10));
    assert_eq!(route(&sava, "sava/sava/sava:1.0.0/port").weight, 9000);
    assert_eq!(route(&sava, "sava/sava/sava:1.1.0/port").weight, 1000);
    assert_eq!((sava.sticky, sava.mode), (Sticky::Flow, Mode::FullNat));
}

/// `connect_timeout:` is the gateway's own, read back as written; absent, the agent's.
#[test]
fn a_gateway_carries_its_connect_timeout() {
    let g = gateway(&SAVA.replace("virtual_address: 10.0.0.10\n", "virtual_address: 10.0.0.10\nconnect_timeout: 2500ms\n"));
    assert_eq!(g.connect_timeout_ms, Some(2500));
    assert!(g.to_yaml().contains("connect_timeout: 2500ms\n"), "{}", g.to_yaml());
    assert_eq!(gateway(&g.to_yaml()), g);
    assert_eq!(gateway(SAVA).connect_timeout_ms, None);
    assert!(!gateway(SAVA).to_yaml().contains("connect_timeout"));
}

#[test]
fn dcos_80_20_over_3_and_1_instances_gives_80_20() {
    let simpleservice = load_gateway("simpleservice.yaml");
    let shares = simpleservice.weighted_targets();
    assert_eq!(shares.len(), 4);
    let percent = |ppm: u32| f64::from(ppm) / 10_000.0;
    for (target, share) in &shares[..3] {
        assert_eq!(target.port, 31463);
        assert!((percent(*share) - 26.67).abs() <= 0.01, "{target}: {}%", percent(*share));
    }
    assert_eq!(shares[3].0, "10.2.0.21:31464".parse().unwrap());
    assert!((percent(shares[3].1) - 20.00).abs() <= 0.01);
    assert_eq!(shares.iter().map(|(_, share)| share).sum::<u32>(), FULL_SHARE_PPM);

    // And the bucket table built from them gives the old version 80% of the slots.
    let table = build_bucket_table(&simpleservice.table_targets());
    let old_version = table.iter().filter(|&&index| index < 3).count();
    let slots = BUCKET_TABLE_SIZE;
    assert!((old_version * 1000).abs_diff(slots * 800) <= slots, "0.9 holds {old_version} of {slots}");
}

#[test]
fn unweighted_routes_take_the_remainder() {
    let qotm = load_gateway("qotm.yaml");
    assert_eq!(route(&qotm, "qotm").weight, 9000);
    assert_eq!(route(&qotm, "qotm").explicit_weight, None);
    assert_eq!(route(&qotm, "qotmv2").weight, 1000);

    let prod = load_gateway("prod-canary.yaml");
    assert_eq!(route(&prod, "prod/canary/eh1sby").weight, 1050);
    assert_eq!(route(&prod, "prod/deployment/nfcn0x").weight, 8950);
    assert_eq!(prod.sticky, Sticky::Client);
}

#[test]
fn an_uneven_remainder_goes_to_the_first_routes_by_name() {
    let gateway = gateway(
        "name: g\nport: 80\nvirtual_address: 10.0.0.1\nroutes:\n  \
         c: {targets: [10.1.0.3:80]}\n  a: {targets: [10.1.0.1:80]}\n  \
         d: {weight: 50%, targets: [10.1.0.4:80]}\n  b: {targets: [10.1.0.2:80]}\n",
    );
    let weights: Vec<(&str, u32)> = gateway.routes.iter().map(|r| (r.name.as_str(), r.weight)).collect();
    // 50% over three routes is 16.66% each with two hundredths left: to a and b.
    assert_eq!(weights, [("a", 1667), ("b", 1667), ("c", 1666), ("d", 5000)]);
}

#[test]
fn route_order_in_the_file_does_not_matter() {
    let reordered = "\
name: sava/sava/port
port: 9050/http
virtual_address: 10.0.0.10
routes:
  sava/sava/sava:1.1.0/port:
    targets: [10.1.0.21:8080]
    weight: 10%
  sava/sava/sava:1.0.0/port:
    targets: [10.1.0.11:8080, 10.1.0.12:8080]
    weight: 90%
";
    let (a, b) = (gateway(SAVA), gateway(reordered));
    assert_eq!(a, b);
    assert_eq!(build_bucket_table(&a.table_targets()), build_bucket_table(&b.table_targets()));
}

#[test]
fn weights_are_read_in_every_accepted_form() {
    for (text, hundredths) in
        [("90%", 9000), ("90", 9000), ("10.5%", 1050), ("10.50%", 1050), ("0.01%", 1), ("0%", 0), ("100%", 10000), (" 7 % ", 700)]
    {
        assert_eq!(parse_weight(text), Ok(hundredths), "{text}");
    }
    for text in ["-1%", "abc", "10.555%", "101%", "1000%", "", "%", "1e2", ".5", "5.", "+5", "0x10"] {
        assert!(parse_weight(text).is_err(), "{text} accepted");
    }
    for hundredths in 0..=FULL_WEIGHT {
        assert_eq!(parse_weight(&format_weight(hundredths)), Ok(hundredths));
    }
    assert_eq!(format_weight(1050), "10.5%");
    assert_eq!(format_weight(1), "0.01%");
}

#[test]
fn a_weights_only_document_updates_weights_and_keeps_targets() {
    let sava = gateway(SAVA);
    let fifty_fifty = update(
        "name: sava/sava/port\nport: 9050/http\nroutes:\n  \
         sava/sava/sava:1.0.0/port:\n    weight: 50%\n  sava/sava/sava:1.1.0/port:\n    weight: 50%\n",
    );
    let updated = sava.apply_weights(&fifty_fifty, "update.yaml").unwrap_or_else(|err| panic!("{err}"));
    for (before, after) in sava.routes.iter().zip(&updated.routes) {
        assert_eq!(after.weight, 5000);
        assert_eq!(after.targets, before.targets);
    }

    // Naming only the canary: the other routes share what it leaves.
    let canary_20 = update("name: sava/sava/port\nroutes:\n  sava/sava/sava:1.1.0/port:\n    weight: 20%\n");
    let updated = sava.apply_weights(&canary_20, "update.yaml").unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(route(&updated, "sava/sava/sava:1.0.0/port").weight, 8000);
    assert_eq!(route(&updated, "sava/sava/sava:1.0.0/port").explicit_weight, None);
    assert_eq!(route(&updated, "sava/sava/sava:1.1.0/port").weight, 2000);
}

#[test]
fn an_update_that_leaves_weights_short_of_100_is_refused_when_applied() {
    let sava = gateway(SAVA);
    let short = update(
        "name: sava/sava/port\nroutes:\n  sava/sava/sava:1.0.0/port: {weight: 50%}\n  \
         sava/sava/sava:1.1.0/port: {weight: 20%}\n",
    );
    let err = sava.apply_weights(&short, "update.yaml").unwrap_err();
    assert_eq!(err.field.as_deref(), Some("routes"));
    assert!(err.message.contains("add up to 70%"), "{err}");
}

#[test]
fn several_documents_in_one_stream() {
    let stream = format!("{SAVA}---\nname: sava/sava/port\nroutes:\n  sava/sava/sava:1.1.0/port: {{weight: 30%}}\n");
    let documents = parse_documents("stream.yaml", &stream).unwrap_or_else(|err| panic!("{err}"));
    assert!(matches!(documents.as_slice(), [Document::Gateway(_), Document::Weights(_)]));
}

#[test]
fn to_yaml_parses_back_to_the_same_gateway() {
    let mut examples: Vec<Gateway> =
        ["sava.yaml", "simpleservice.yaml", "qotm.yaml", "prod-canary.yaml", "dsr.yaml"].into_iter().map(load_gateway).collect();
    examples.push(gateway(
        "name: \"odd\\\"name\\\"#1\"\nport: 53/udp\nvirtual_address: 10.0.0.53\nsticky: instance\nmode: dnat\n\
         routes:\n  'a:#b':\n    weight: 33.33%\n    targets: [10.5.0.1:53]\n  c:\n    targets: [10.5.0.2:53, 10.5.0.3:53]\n",
    ));
    for example in examples {
        let text = example.to_yaml();
        assert_eq!(gateway(&text), example, "{text}");
    }
}

#[test]
fn vamp_export_fields_are_accepted() {
    let exported = gateway(
        "name: sava/sava/port\nkind: gateways\nmetadata: {}\ninternal: false\nport: 9050/http\n\
         virtual_address: 10.0.0.10\nsticky: service\nactive: true\nfilters: []\nroutes:\n  \
         sava/sava/sava:1.0.0/port:\n    lookup_name: 4c6e\n    weight: 100%\n    balance: default\n    \
         condition: null\n    rewrites: []\n    instances:\n      - {name: sava-1, host: 10.1.0.11, port: 31463, deployed: true}\n",
    );
    assert_eq!(exported.sticky, Sticky::Client);
    assert_eq!(exported.routes[0].targets, ["10.1.0.11:31463".parse::<Target>().unwrap()]);
}

#[test]
fn errors_from_updates_are_located_in_the_update_text() {
    let text = "name: sava/sava/port\nroutes:\n  sava/sava/sava:2.0.0/port:\n    weight: 10%\n";
    let err = gateway(SAVA).apply_weights(&update(text), "update.yaml").unwrap_err().locate_in(text);
    assert_eq!(
        err.to_string(),
        "update.yaml:3:3: routes.sava/sava/sava:2.0.0/port: unknown route sava/sava/sava:2.0.0/port in gateway \
         sava/sava/port (its routes: sava/sava/sava:1.0.0/port, sava/sava/sava:1.1.0/port)"
    );
}

const SAVA_WITH_POLICIES: &str = "name: sava
port: 9050/http
virtual_address: 10.0.0.10
routes:
  sava:1.0.0:
    weight: 100%
    targets: [10.1.0.11:8080]
  sava:1.1.0:
    weight: 0%
    targets: [10.1.0.21:8080]
health_check:
  protocol: http
  path: /health
  expected_status: 204
  interval: 500ms
  timeout: 200ms
  unhealthy_threshold: 3
canary:
  route: sava:1.1.0
  steps: [5, 10, 25, 50, 100]
  interval: 2s
  max_error_rate: 2.5%
  max_connect_latency: 2x
  min_flows: 10
";

#[test]
fn health_check_and_canary_blocks_are_read_and_written_back() {
    let g = gateway(SAVA_WITH_POLICIES);
    let check = g.health_check.clone().unwrap();
    assert_eq!(check.protocol, policy::CheckProtocol::Http);
    assert_eq!((check.path.as_str(), check.expected_status), ("/health", 204));
    assert_eq!((check.interval_ms, check.timeout_ms), (500, 200));
    assert_eq!((check.unhealthy_threshold, check.healthy_threshold), (3, 2));
    let canary = g.canary.clone().unwrap();
    assert_eq!(canary.route, "sava:1.1.0");
    assert_eq!(canary.steps, vec![500, 1000, 2500, 5000, 10000]);
    assert_eq!(canary.interval_ms, 2000);
    assert_eq!(canary.thresholds.max_error_rate, 250);
    assert_eq!(canary.thresholds.max_connect_latency, Some(policy::LatencyLimit::Relative(200)));
    assert_eq!(canary.thresholds.min_flows, 10);
    assert_eq!(gateway(&g.to_yaml()), g, "to_yaml round trip:\n{}", g.to_yaml());
}

#[test]
fn a_dsr_gateway_reads_its_mode_and_outer_source_prefix() {
    let g = load_gateway("dsr.yaml");
    assert_eq!(g.mode, Mode::Dsr);
    assert_eq!(g.source.prefix, Some((std::net::Ipv4Addr::new(10, 200, 0, 0), 24)));
    assert!(g.unseen_signals().is_some_and(|s| s.contains("replies bypass the splitter")));
    assert_eq!(g.dsr_canary_warning(), None, "no canary, no warning");
    assert_eq!(load_gateway("sava.yaml").unseen_signals(), None);
}

#[test]
fn a_dsr_canary_without_health_checks_or_metrics_is_warned_about() {
    let text = "name: web\nport: 80/tcp\nvirtual_address: 10.0.0.80\nmode: dsr\nroutes:\n  a:\n    weight: 100%\n    \
                targets: [10.1.0.11:80]\n  b:\n    weight: 0%\n    targets: [10.1.0.21:80]\ncanary:\n  route: b\n  \
                steps: [10, 100]\n  interval: 2s\n";
    let warning = gateway(text).dsr_canary_warning().expect("a warning");
    assert!(warning.contains("gateway web") && warning.contains("health_check or canary metrics"), "{warning}");
    let checked = format!("{text}health_check:\n  protocol: tcp\n");
    assert_eq!(gateway(&checked).dsr_canary_warning(), None, "health checks judge it");
    assert_eq!(gateway(&text.replace("mode: dsr", "mode: fullnat")).dsr_canary_warning(), None, "full NAT sees replies");
}

#[test]
fn bad_dsr_documents_give_located_errors() {
    let dsr = std::fs::read_to_string(config_dir().join("dsr.yaml")).unwrap();
    let line_of = |needle: &str| dsr.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let cases = [
        (
            dsr.replace("10.1.0.21:80]", "10.1.0.21:8080]"),
            format!(
                "test.yaml:{}:15: routes.web:1.1.targets[0]: target 10.1.0.21:8080: mode dsr delivers the client's packet \
                 unchanged, so a target serves the gateway's port 80",
                line_of("10.1.0.21:80")
            ),
        ),
        (
            dsr.replace("10.200.0.0/24", "10.200.0.1/24"),
            format!("test.yaml:{}:11: source.prefix: `10.200.0.1/24` has host bits set (the prefix is 10.200.0.0/24)", line_of("prefix:")),
        ),
        (
            dsr.replace("10.200.0.0/24", "10.200.0.0/4"),
            format!("test.yaml:{}:11: source.prefix: `/4`: the length must be 8 to 32", line_of("prefix:")),
        ),
        (
            dsr.replace("prefix: 10.200.0.0/24", "addresses: [10.200.0.1]"),
            format!("test.yaml:{}:3: source: mode dsr sends the client's packet unchanged", line_of("prefix:")),
        ),
        (
            dsr.replace("mode: dsr", "mode: fullnat").replace(":80]", ":8080]").replace(":80,", ":8080,"),
            format!("test.yaml:{}:3: source.prefix: only mode dsr has an outer header", line_of("prefix:")),
        ),
    ];
    for (text, want) in cases {
        let err = parse_documents("test.yaml", &text).expect_err(&want).to_string();
        assert!(err.starts_with(&want), "got {err}\nwant {want}");
        assert_eq!(err.lines().count(), 1);
    }
}

#[test]
fn bad_policies_give_located_errors() {
    let with = |from: &str, to: &str| SAVA_WITH_POLICIES.replace(from, to);
    let cases = [
        (with("route: sava:1.1.0", "route: sava:2.0"), "test.yaml:19:10: canary.route: no route sava:2.0 in this gateway"),
        (with("[5, 10, 25, 50, 100]", "[5, 50, 25, 100]"), "test.yaml:20:18: canary.steps[2]: steps must increase"),
        (with("[5, 10, 25, 50, 100]", "[5, 10]"), "test.yaml:20:10: canary.steps: the last step must be 100%"),
        (with("interval: 2s", "interval: 2"), "test.yaml:21:13: canary.interval: `2` has no unit"),
        (with("timeout: 200ms", "timeout: 2s"), "test.yaml:16:3: health_check.timeout: the timeout is longer than the interval"),
        (with("protocol: http", "protocol: icmp"), "test.yaml:12:13: health_check.protocol: unknown value `icmp`: expected tcp or http"),
        (with("max_connect_latency: 2x", "max_connect_latency: fast"), "test.yaml:23:24: canary.max_connect_latency:"),
    ];
    for (text, want) in cases {
        let err = parse_documents("test.yaml", &text).expect_err(want).to_string();
        assert!(err.starts_with(want), "got {err}\nwant {want}");
        assert_eq!(err.lines().count(), 1);
    }
}

#[test]
fn unhealthy_targets_and_routes_give_their_share_away() {
    let g = load_gateway("simpleservice.yaml");
    let all = g.weighted_targets();
    assert_eq!(g.shares_with_health(|_| true), all, "all healthy: the configured shares");
    let share = |shares: &[(Target, u32)], t: &Target| shares.iter().find(|(x, _)| x == t).unwrap().1;
    let (v09, v10) = (&g.routes[0], &g.routes[1]);
    // One of the three 0.9 instances down: the other two carry 80% between them.
    let down = v09.targets[0];
    let shares = g.shares_with_health(|t| *t != down);
    assert_eq!(share(&shares, &down), 0);
    assert_eq!(share(&shares, &v09.targets[1]) + share(&shares, &v09.targets[2]), 800_000);
    assert_eq!(share(&shares, &v10.targets[0]), 200_000, "the other route keeps its share");
    // The 1.0 route's only instance down: its 20% goes to 0.9.
    let shares = g.shares_with_health(|t| *t != v10.targets[0]);
    assert_eq!(shares.iter().map(|(_, s)| s).sum::<u32>(), 1_000_000);
    assert_eq!(share(&shares, &v10.targets[0]), 0);
    // Nothing healthy: the configured shares stand.
    assert_eq!(g.shares_with_health(|_| false), all);
}

#[test]
fn a_dead_route_splits_its_weight_in_proportion() {
    let g = gateway(
        "name: three\nport: 80\nvirtual_address: 10.0.0.1\nroutes:\n  a:\n    weight: 60%\n    targets: [10.0.0.2:80]\n  b:\n    weight: 30%\n    targets: [10.0.0.3:80]\n  c:\n    weight: 10%\n    targets: [10.0.0.4:80]\n",
    );
    let dead: Target = "10.0.0.3:80".parse().unwrap();
    let shares = g.shares_with_health(|t| *t != dead);
    let values: Vec<u32> = shares.iter().map(|(_, s)| *s).collect();
    assert_eq!(values, vec![857_143, 0, 142_857], "60:10 of 100%");
}

#[test]
fn names_are_path_like_and_bounded() {
    use super::parse::{check_name, MAX_NAME_BYTES};
    for good in [
        "sava/sava/port",
        "sava/sava/sava:1.1.0/port",
        "sava:1.1.0",
        "simpleservice:0.9",
        "prod/canary/eh1sby",
        "qotm",
        "a.b/..c/d..",
        &"n".repeat(MAX_NAME_BYTES),
    ] {
        assert_eq!(check_name(good), Ok(()), "{good}");
    }
    for bad in ["", "..", ".", "a/./b", "a/../b", "/a", "a/", "a//b", "a\0b", "a\nb", "a b", &"n".repeat(MAX_NAME_BYTES + 1)] {
        assert!(check_name(bad).is_err(), "{bad:?} accepted");
    }
}

/// Found by the gateway_yaml fuzzer: a key with line breaks (a multi-line plain scalar)
/// made the refusal span several lines.
#[test]
fn a_refusal_with_line_breaks_in_a_key_stays_one_line() {
    let err = super::parse_documents("f.yaml", "\n?\n\n\n\n\n\n targets4 \n\n\n\n\n 80:0]*").unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err:?}");
    assert!(err.starts_with("f.yaml:"), "{err:?}");
    assert!(err.contains("\\n"), "the line breaks are shown escaped: {err:?}");
}

#[test]
fn an_ipv6_gateway_loads_with_bracketed_targets() {
    let g = load_gateway("ipv6.yaml");
    assert_eq!(g.virtual_address, "2001:db8::10".parse::<std::net::IpAddr>().unwrap());
    let targets: Vec<String> = g.routes.iter().flat_map(|r| r.targets.iter().map(Target::to_string)).collect();
    assert_eq!(
        targets,
        ["[2001:db8:1::11]:8080", "[2001:db8:1::12]:8080", "[2001:db8:1::13]:8080", "[2001:db8:1::21]:8080"],
        "targets print as they are written"
    );
    for text in &targets {
        assert_eq!(text.parse::<Target>().unwrap().to_string(), *text);
    }
    // The canonical text form is what renders back.
    assert!(g.to_yaml().contains("virtual_address: 2001:db8::10"), "{}", g.to_yaml());
    assert_eq!(gateway(&g.to_yaml()), g, "an IPv6 gateway round-trips through its YAML");
}

#[test]
fn ipv6_table_keys_differ_from_each_other_and_from_ipv4_ones() {
    let keys: std::collections::BTreeSet<u64> =
        ["[2001:db8::1]:80", "[2001:db8::2]:80", "[2001:db8::1]:81", "10.0.0.1:80", "[::ffff:10.0.0.1]:80"]
            .iter()
            .map(|t| t.parse::<Target>().unwrap().table_key())
            .collect();
    assert_eq!(keys.len(), 5, "{keys:?}");
}

#[test]
fn mixed_families_and_ipv6_source_pools_give_located_errors() {
    let v6 = std::fs::read_to_string(config_dir().join("ipv6.yaml")).unwrap();
    let line_of = |needle: &str| v6.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let cases = [
        (
            v6.replace("\"[2001:db8:1::21]:8080\"", "10.1.0.21:8080"),
            format!(
                "test.yaml:{}:15: routes.shop:1.1.targets[0]: target 10.1.0.21:8080 is not of the family of the virtual \
                 address 2001:db8::10: a gateway forwards IPv4 to IPv4 and IPv6 to IPv6",
                line_of("[2001:db8:1::21]")
            ),
        ),
        (
            format!("{v6}source:\n  addresses: [10.9.0.1]\n"),
            format!(
                "test.yaml:{}:1: source: source addresses and prefixes are IPv4, and the virtual address 2001:db8::10 is \
                 IPv6: an IPv6 gateway's packets leave from the node's own address (source.ports may be set)",
                v6.lines().count() + 1
            ),
        ),
        (
            v6.replace("[2001:db8:1::11]:8080", "[2001:db8:1::11:8080"),
            format!(
                "test.yaml:{}:15: routes.shop:1.0.targets[0]: `[2001:db8:1::11:8080` is not a target: expected IPV4:PORT like \
                 10.1.0.11:8080 or [IPV6]:PORT like [2001:db8::11]:8080",
                line_of("[2001:db8:1::11]")
            ),
        ),
    ];
    for (text, want) in cases {
        let err = parse_documents("test.yaml", &text).expect_err(&want).to_string();
        assert_eq!(err, want);
    }
}
