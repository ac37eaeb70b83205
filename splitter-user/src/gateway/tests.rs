//! Gateway documents: the seed examples in config/, the weight rules, and the one-line errors.

use std::path::{Path, PathBuf};

use splitter_common::table::{build_bucket_table, BUCKET_TABLE_SIZE};

use super::*;

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

/// Every document under `path` through the configuration scanner, or its first error.
fn load_path(path: &Path) -> Result<Vec<(PathBuf, Document)>, ConfigError> {
    let mut out = Vec::new();
    for file in crate::config::scan(path, &mut BTreeMap::new())? {
        for document in file.documents? {
            out.push((file.path.clone(), document));
        }
    }
    Ok(out)
}

fn load_gateway(file: &str) -> Gateway {
    match load_path(&config_dir().join(file)) {
        Ok(documents) => match documents.as_slice() {
            [(_, Document::Gateway(gateway))] => gateway.clone(),
            other => panic!("expected one gateway in {file}, got {other:?}"),
        },
        Err(err) => panic!("{err}"),
    }
}

fn route<'g>(gateway: &'g Gateway, name: &str) -> &'g Route {
    gateway
        .routes
        .iter()
        .find(|route| route.name == name)
        .unwrap_or_else(|| panic!("no route {name}"))
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
fn every_example_in_config_validates() {
    let gateways = load_path(&config_dir()).unwrap_or_else(|err| panic!("{err}"));
    let names: Vec<&str> = gateways
        .iter()
        .map(|(_, document)| document.gateway_name())
        .collect();
    for expected in ["sava/sava/port", "simpleservice/port", "qotm", "prod"] {
        assert!(
            names.contains(&expected),
            "config/ has no gateway {expected}: {names:?}"
        );
    }
    assert!(gateways
        .iter()
        .all(|(_, document)| matches!(document, Document::Gateway(_))));

    let updates = load_path(&config_dir().join("updates")).unwrap_or_else(|err| panic!("{err}"));
    assert!(!updates.is_empty());
    for (file, document) in updates {
        let Document::Weights(update) = document else {
            panic!("{} is not a weights update", file.display())
        };
        let (_, target) = gateways
            .iter()
            .find(|(_, document)| document.gateway_name() == update.name)
            .unwrap_or_else(|| panic!("{}: no gateway {} in config/", file.display(), update.name));
        let Document::Gateway(target) = target else {
            unreachable!("checked above")
        };
        let updated = target
            .apply_weights(&update, &file.display().to_string())
            .unwrap_or_else(|err| panic!("{err}"));
        let total: u32 = updated.routes.iter().map(|route| route.weight).sum();
        assert_eq!(total, FULL_WEIGHT);
    }
}

#[test]
fn sava_splits_90_10_over_its_instances() {
    let sava = load_gateway("sava.yaml");
    assert_eq!((sava.port, sava.protocol), (9050, Protocol::Tcp));
    assert_eq!(sava.virtual_address, Ipv4Addr::new(10, 0, 0, 10));
    assert_eq!(route(&sava, "sava/sava/sava:1.0.0/port").weight, 9000);
    assert_eq!(route(&sava, "sava/sava/sava:1.1.0/port").weight, 1000);
    assert_eq!((sava.sticky, sava.mode), (Sticky::Flow, Mode::FullNat));
}

#[test]
fn dcos_80_20_over_3_and_1_instances_gives_80_20() {
    let simpleservice = load_gateway("simpleservice.yaml");
    let shares = simpleservice.weighted_targets();
    assert_eq!(shares.len(), 4);
    let percent = |ppm: u32| f64::from(ppm) / 10_000.0;
    for (target, share) in &shares[..3] {
        assert_eq!(target.port, 31463);
        assert!(
            (percent(*share) - 26.67).abs() <= 0.01,
            "{target}: {}%",
            percent(*share)
        );
    }
    assert_eq!(shares[3].0, "10.2.0.21:31464".parse().unwrap());
    assert!((percent(shares[3].1) - 20.00).abs() <= 0.01);
    assert_eq!(
        shares.iter().map(|(_, share)| share).sum::<u32>(),
        FULL_SHARE_PPM
    );

    // And the bucket table built from them gives the old version 80% of the slots.
    let table = build_bucket_table(&simpleservice.table_targets());
    let old_version = table.iter().filter(|&&index| index < 3).count();
    let slots = BUCKET_TABLE_SIZE;
    assert!(
        (old_version * 1000).abs_diff(slots * 800) <= slots,
        "0.9 holds {old_version} of {slots}"
    );
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
    let weights: Vec<(&str, u32)> = gateway
        .routes
        .iter()
        .map(|r| (r.name.as_str(), r.weight))
        .collect();
    // 50% over three routes is 16.66% each with two hundredths left: to a and b.
    assert_eq!(
        weights,
        [("a", 1667), ("b", 1667), ("c", 1666), ("d", 5000)]
    );
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
    assert_eq!(
        build_bucket_table(&a.table_targets()),
        build_bucket_table(&b.table_targets())
    );
}

#[test]
fn weights_are_read_in_every_accepted_form() {
    for (text, hundredths) in [
        ("90%", 9000),
        ("90", 9000),
        ("10.5%", 1050),
        ("10.50%", 1050),
        ("0.01%", 1),
        ("0%", 0),
        ("100%", 10000),
        (" 7 % ", 700),
    ] {
        assert_eq!(parse_weight(text), Ok(hundredths), "{text}");
    }
    for text in [
        "-1%", "abc", "10.555%", "101%", "1000%", "", "%", "1e2", ".5", "5.", "+5", "0x10",
    ] {
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
    let updated = sava
        .apply_weights(&fifty_fifty, "update.yaml")
        .unwrap_or_else(|err| panic!("{err}"));
    for (before, after) in sava.routes.iter().zip(&updated.routes) {
        assert_eq!(after.weight, 5000);
        assert_eq!(after.targets, before.targets);
    }

    // Naming only the canary: the other routes share what it leaves.
    let canary_20 =
        update("name: sava/sava/port\nroutes:\n  sava/sava/sava:1.1.0/port:\n    weight: 20%\n");
    let updated = sava
        .apply_weights(&canary_20, "update.yaml")
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(route(&updated, "sava/sava/sava:1.0.0/port").weight, 8000);
    assert_eq!(
        route(&updated, "sava/sava/sava:1.0.0/port").explicit_weight,
        None
    );
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
    let stream = format!(
        "{SAVA}---\nname: sava/sava/port\nroutes:\n  sava/sava/sava:1.1.0/port: {{weight: 30%}}\n"
    );
    let documents = parse_documents("stream.yaml", &stream).unwrap_or_else(|err| panic!("{err}"));
    assert!(matches!(
        documents.as_slice(),
        [Document::Gateway(_), Document::Weights(_)]
    ));
}

#[test]
fn to_yaml_parses_back_to_the_same_gateway() {
    let mut examples: Vec<Gateway> = [
        "sava.yaml",
        "simpleservice.yaml",
        "qotm.yaml",
        "prod-canary.yaml",
    ]
    .into_iter()
    .map(load_gateway)
    .collect();
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
    assert_eq!(
        exported.routes[0].targets,
        ["10.1.0.11:31463".parse::<Target>().unwrap()]
    );
}

#[test]
fn errors_from_updates_are_located_in_the_update_text() {
    let text = "name: sava/sava/port\nroutes:\n  sava/sava/sava:2.0.0/port:\n    weight: 10%\n";
    let err = gateway(SAVA)
        .apply_weights(&update(text), "update.yaml")
        .unwrap_err()
        .locate_in(text);
    assert_eq!(
        err.to_string(),
        "update.yaml:3:3: routes.sava/sava/sava:2.0.0/port: unknown route sava/sava/sava:2.0.0/port in gateway \
         sava/sava/port (its routes: sava/sava/sava:1.0.0/port, sava/sava/sava:1.1.0/port)"
    );
}

/// SAVA with `line` (from 1) replaced.
fn sava_with(line: usize, replacement: &str) -> String {
    let mut lines: Vec<&str> = SAVA.lines().collect();
    lines[line - 1] = replacement;
    lines.join("\n") + "\n"
}

#[test]
fn bad_documents_give_one_line_errors_with_their_position() {
    const R0: &str = "routes.sava/sava/sava:1.0.0/port";
    const R1: &str = "routes.sava/sava/sava:1.1.0/port";
    const NAME_SHAPE: &str = "names are segments separated by single slashes, like sava/sava/port";
    let cases: Vec<(&str, String, String)> = vec![
        (
            "unknown field",
            sava_with(6, "    wieght: 90%"),
            format!("bad.yaml:6:5: {R0}.wieght: unknown field `wieght`, expected one of: weight, targets, instances, filters"),
        ),
        (
            "unknown top-level field",
            sava_with(3, "virtual_adress: 10.0.0.10"),
            "bad.yaml:3:1: virtual_adress: unknown field `virtual_adress`, expected one of: name, port, \
             virtual_address, sticky, mode, active, filters, routes, health_check, canary"
                .to_owned(),
        ),
        (
            "weights over 100 in total",
            sava_with(9, "    weight: 20%"),
            "bad.yaml:4:1: routes: the weights add up to 110%, more than 100%".to_owned(),
        ),
        (
            "weights under 100 with every route weighted",
            sava_with(6, "    weight: 80%"),
            "bad.yaml:4:1: routes: every route has a weight and they add up to 90%; they must add up to 100% \
             (or leave one route without a weight to take the rest)"
                .to_owned(),
        ),
        (
            "negative weight",
            sava_with(9, "    weight: -10%"),
            format!("bad.yaml:9:13: {R1}.weight: weight cannot be negative: `-10%`"),
        ),
        (
            "weight not a number",
            sava_with(9, "    weight: ten percent"),
            format!("bad.yaml:9:13: {R1}.weight: `ten percent` is not a weight: expected a percentage like 90%, 90 or 10.5%"),
        ),
        (
            "weight with three decimals",
            sava_with(9, "    weight: 10.125%"),
            format!("bad.yaml:9:13: {R1}.weight: `10.125%` has more than two decimals: the finest weight step is 0.01%"),
        ),
        (
            "weight above 100 on its own",
            sava_with(9, "    weight: 120%"),
            format!("bad.yaml:9:13: {R1}.weight: weight 120% is more than 100%"),
        ),
        (
            "weight that is a list",
            sava_with(9, "    weight: [10]"),
            format!("bad.yaml:9:13: {R1}.weight: expected a percentage like 90%, found a list"),
        ),
        (
            "bad virtual address",
            sava_with(3, "virtual_address: 10.0.0.300"),
            "bad.yaml:3:18: virtual_address: `10.0.0.300` is not an IPv4 address".to_owned(),
        ),
        (
            "broadcast virtual address",
            sava_with(3, "virtual_address: 255.255.255.255"),
            "bad.yaml:3:18: virtual_address: 255.255.255.255 is not a unicast address".to_owned(),
        ),
        (
            "port out of range",
            sava_with(2, "port: 70000/http"),
            "bad.yaml:2:7: port: port 70000 is out of range 1-65535 (expected PORT or PORT/PROTO like 9050/http)".to_owned(),
        ),
        (
            "unknown protocol",
            sava_with(2, "port: 9050/sctp"),
            "bad.yaml:2:7: port: unknown protocol `sctp`: expected tcp, udp or http".to_owned(),
        ),
        (
            "target without port",
            sava_with(10, "    targets: [10.1.0.21]"),
            format!("bad.yaml:10:15: {R1}.targets[0]: `10.1.0.21` is not a target: expected IPV4:PORT like 10.1.0.11:8080"),
        ),
        (
            "target port zero",
            sava_with(10, "    targets: [10.1.0.21:0]"),
            format!("bad.yaml:10:15: {R1}.targets[0]: `10.1.0.21:0`: port 0 is out of range 1-65535"),
        ),
        (
            "duplicate target across routes",
            sava_with(10, "    targets: [10.1.0.12:8080]"),
            format!("bad.yaml:10:15: {R1}.targets[0]: duplicate target 10.1.0.12:8080 (already at {R0}.targets[1])"),
        ),
        (
            "duplicate target in a route",
            sava_with(7, "    targets: [10.1.0.11:8080, 10.1.0.11:8080]"),
            format!("bad.yaml:7:31: {R0}.targets[1]: duplicate target 10.1.0.11:8080 (already at {R0}.targets[0])"),
        ),
        (
            "empty target list",
            sava_with(10, "    targets: []"),
            format!(
                "bad.yaml:10:14: {R1}.targets: empty list: give targets like [10.1.0.11:8080], or leave it out for a \
                 weights-only update"
            ),
        ),
        (
            "empty routes",
            "name: sava/sava/port\nport: 9050/http\nvirtual_address: 10.0.0.10\nroutes: {}\n".to_owned(),
            "bad.yaml:4:9: routes: empty: a gateway needs at least one route".to_owned(),
        ),
        (
            "missing routes",
            "name: sava/sava/port\nport: 9050/http\nvirtual_address: 10.0.0.10\n".to_owned(),
            "bad.yaml:1:1: routes: missing: a gateway needs at least one route".to_owned(),
        ),
        (
            "missing virtual address",
            sava_with(3, "sticky: client"),
            "bad.yaml:1:1: virtual_address: missing: a gateway needs its virtual address (the VIP), like \
             virtual_address: 10.0.0.10"
                .to_owned(),
        ),
        (
            "a route without targets in a definition",
            sava_with(10, "    # no targets"),
            format!(
                "bad.yaml:8:3: {R1}: no targets, while other routes have some: in a gateway definition every route \
                 lists its targets (or instances); a weights-only update lists none"
            ),
        ),
        (
            "duplicate route",
            sava_with(8, "  sava/sava/sava:1.0.0/port:"),
            format!("bad.yaml:8:3: {R0}: route listed twice (first at line 5)"),
        ),
        (
            "duplicate field",
            sava_with(10, "    weight: 10%"),
            format!("bad.yaml:10:5: {R1}.weight: duplicate field `weight` (first at line 9)"),
        ),
        (
            "targets and instances",
            sava_with(10, "    targets: [10.1.0.21:8080]\n    instances: [{host: 10.1.0.22, port: 8080}]"),
            format!("bad.yaml:11:5: {R1}.instances: a route lists either targets or instances, not both"),
        ),
        (
            "instance host that is a name",
            sava_with(10, "    instances: [{host: sava-1.local, port: 8080}]"),
            format!(
                "bad.yaml:10:24: {R1}.instances[0].host: `sava-1.local` is not an IPv4 address (the splitter forwards \
                 to addresses, not names)"
            ),
        ),
        (
            "L7 filters",
            sava_with(3, "virtual_address: 10.0.0.10\nfilters: [{condition: User-Agent = Firefox}]"),
            "bad.yaml:4:10: filters: L7 filters cannot be applied at L4: the splitter places TCP/UDP flows, it does \
             not look into HTTP requests (leave it out or empty)"
                .to_owned(),
        ),
        (
            "unknown sticky",
            sava_with(3, "virtual_address: 10.0.0.10\nsticky: cookie"),
            "bad.yaml:4:9: sticky: unknown value `cookie`: expected none, client, service or instance".to_owned(),
        ),
        (
            "weights-only update that sets the VIP",
            "name: sava/sava/port\nvirtual_address: 10.0.0.10\nroutes:\n  a:\n    weight: 10%\n".to_owned(),
            "bad.yaml:2:1: virtual_address: no route lists targets, so this is a weights-only update, which cannot \
             set this field: give every route its targets to define the gateway"
                .to_owned(),
        ),
        (
            "weights-only update over 100",
            "name: sava/sava/port\nroutes:\n  a: {weight: 60%}\n  b: {weight: 50%}\n".to_owned(),
            "bad.yaml:2:1: routes: the weights add up to 110%, more than 100%".to_owned(),
        ),
        (
            "name with a space",
            sava_with(1, "name: sava port"),
            "bad.yaml:1:7: name: name `sava port` contains white space or control characters".to_owned(),
        ),
        (
            "name with a `..` segment",
            sava_with(1, "name: sava/../port"),
            format!("bad.yaml:1:7: name: name `sava/../port` has a `..` segment: {NAME_SHAPE}, none of them `.` or `..`"),
        ),
        (
            "name with a `.` segment",
            sava_with(1, "name: ./sava"),
            format!("bad.yaml:1:7: name: name `./sava` has a `.` segment: {NAME_SHAPE}, none of them `.` or `..`"),
        ),
        (
            "name starting with a slash",
            sava_with(1, "name: /etc/passwd"),
            format!("bad.yaml:1:7: name: name `/etc/passwd` starts with `/`: {NAME_SHAPE}"),
        ),
        (
            "name ending with a slash",
            sava_with(1, "name: sava/"),
            format!("bad.yaml:1:7: name: name `sava/` ends with `/`: {NAME_SHAPE}"),
        ),
        (
            "name with an empty segment",
            sava_with(1, "name: sava//port"),
            format!("bad.yaml:1:7: name: name `sava//port` has an empty segment (`//`): {NAME_SHAPE}"),
        ),
        (
            "name with a NUL",
            sava_with(1, "name: \"sava\\0port\""),
            "bad.yaml:1:7: name: name `sava\\u{0}port` contains white space or control characters".to_owned(),
        ),
        (
            "name with an escape character",
            sava_with(1, "name: \"sava\\e[2Jport\""),
            "bad.yaml:1:7: name: name `sava\\u{1b}[2Jport` contains white space or control characters".to_owned(),
        ),
        (
            "overlong name",
            sava_with(1, &format!("name: {}", "s".repeat(300))),
            format!("bad.yaml:1:7: name: name `{}...` is 300 bytes long, longer than the limit of 253", "s".repeat(32)),
        ),
        (
            "route name with a `..` segment",
            sava_with(8, "  sava/../../port:"),
            format!("bad.yaml:8:3: routes: name `sava/../../port` has a `..` segment: {NAME_SHAPE}, none of them `.` or `..`"),
        ),
        (
            "route name starting with a slash in a weights-only update",
            "name: sava/sava/port\nroutes:\n  /sava:\n    weight: 10%\n".to_owned(),
            format!("bad.yaml:3:3: routes: name `/sava` starts with `/`: {NAME_SHAPE}"),
        ),
        (
            "YAML syntax error",
            sava_with(9, "    weight: 10%: oops"),
            "bad.yaml:9:16: YAML syntax error: mapping values are not allowed in this context".to_owned(),
        ),
        (
            "YAML alias",
            sava_with(7, "    targets: &stable [10.1.0.11:8080]\n    filters: *stable"),
            "bad.yaml:8:14: YAML syntax error: YAML aliases are not supported (this one refers to the anchor at line 7)"
                .to_owned(),
        ),
        (
            "a document that is a list",
            "- name: sava\n".to_owned(),
            "bad.yaml:1:1: a gateway document is a mapping with name, port and routes, found a list".to_owned(),
        ),
        ("an empty document", "# nothing here\n".to_owned(), "bad.yaml: no gateway document (the input is empty)".to_owned()),
        (
            "the same gateway twice",
            format!("{SAVA}---\n{SAVA}"),
            "bad.yaml:12:7: name: gateway sava/sava/port is defined twice (first at line 1)".to_owned(),
        ),
    ];
    let mut failures = Vec::new();
    for (case, text, expected) in &cases {
        match parse_documents("bad.yaml", text) {
            Ok(documents) => failures.push(format!("{case}: accepted: {documents:?}")),
            Err(err) => {
                let line = err.to_string();
                assert!(!line.contains('\n'), "{case}: not one line: {line}");
                if &line != expected {
                    failures.push(format!("{case}:\n  expected {expected}\n  got      {line}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn a_directory_with_a_gateway_defined_twice_is_refused() {
    let dir = std::env::temp_dir().join(format!("splitter-gateway-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), SAVA).unwrap();
    std::fs::write(dir.join("b.yml"), SAVA).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a gateway").unwrap();
    let err = load_path(&dir).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(err.line, Some(1));
    assert!(err.origin.ends_with("b.yml"), "{err}");
    assert!(
        err.message.contains("already defined in") && err.message.contains("a.yaml"),
        "{err}"
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
