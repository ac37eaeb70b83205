//! Bad documents: one-line errors with their file, line, column and field.

use super::*;

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
             virtual_address, sticky, mode, connect_timeout, active, filters, routes, health_check, canary, source"
                .to_owned(),
        ),
        (
            "connect timeout too short",
            sava_with(3, "connect_timeout: 20ms"),
            "bad.yaml:3:18: connect_timeout: must be between 100ms and 60s".to_owned(),
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
        ("negative weight", sava_with(9, "    weight: -10%"), format!("bad.yaml:9:13: {R1}.weight: weight cannot be negative: `-10%`")),
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
            "bad.yaml:3:18: virtual_address: `10.0.0.300` is not an IPv4 or IPv6 address".to_owned(),
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
            format!("bad.yaml:10:15: {R1}.targets[0]: `10.1.0.21` is not a target: expected IPV4:PORT like 10.1.0.11:8080 or [IPV6]:PORT like [2001:db8::11]:8080"),
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
                "bad.yaml:10:24: {R1}.instances[0].host: `sava-1.local` is not an IPv4 or IPv6 address (the splitter forwards \
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
        ("name ending with a slash", sava_with(1, "name: sava/"), format!("bad.yaml:1:7: name: name `sava/` ends with `/`: {NAME_SHAPE}")),
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
            "bad.yaml:8:14: YAML syntax error: YAML aliases are not supported (this one refers to the anchor at line 7)".to_owned(),
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
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

const SIMPLESERVICE_BLUEPRINT: &str = "---
name: simpleservice
gateways:
  10099: simpleservice/port
clusters:
  simpleservice:
   gateways:
      routes:
        simpleservice:0.9:
          weight: 80%
        simpleservice:1.0:
          weight: 20%
   services:
      -
        breed:
          name: simpleservice:0.9
          deployable: mesosphere/simpleservice:1.0
          ports:
            port: 0/http
        scale:
          instances: 3
      -
        breed:
          name: simpleservice:1.0
          deployable: mesosphere/simpleservice:1.0
          ports:
            port: 0/http
        scale:
          instances: 1
";

const SAVA_DEPLOYMENT: &str = "---
name: sava:1.0
clusters:
  sava:
    services:
      -
        breed:
          name: sava:1.0.0
          deployable: magneticio/sava:1.0.0
          ports:
            port: 8080/http
";

/// The one-line suggestion of a blueprint error, with its placeholders filled in.
fn suggested_gateway(err: &ConfigError) -> Gateway {
    let (_, suggestion) = err
        .message
        .split_once("write instead (one document per gateway, HOST:PORT for each instance, VIP the address clients use): ")
        .unwrap();
    let mut n = 0;
    let filled: String = suggestion
        .replace("VIP", "10.0.0.1")
        .split("HOST:PORT")
        .enumerate()
        .map(|(i, part)| {
            n += 1;
            if i == 0 {
                part.to_string()
            } else {
                format!("10.2.0.{n}:80{part}")
            }
        })
        .collect();
    gateway(&filled.replace("PORT/http", "9050/http"))
}

#[test]
fn a_blueprint_is_named_and_the_gateway_to_write_instead_is_given() {
    let err = parse_documents("simpleservice-blueprint.yaml", SIMPLESERVICE_BLUEPRINT).unwrap_err();
    let line = err.to_string();
    assert!(!line.contains('\n'), "one line: {line}");
    assert!(line.starts_with("simpleservice-blueprint.yaml:3:1: gateways: this is a Vamp blueprint or deployment"), "{line}");
    let g = suggested_gateway(&err);
    assert_eq!((g.name.as_str(), g.port, g.protocol), ("simpleservice/port", 10099, Protocol::Http));
    assert_eq!(route(&g, "simpleservice:0.9").weight, 8000);
    assert_eq!((route(&g, "simpleservice:0.9").targets.len(), route(&g, "simpleservice:1.0").targets.len()), (3, 1), "one per instance");

    let err = parse_documents("deployment", SAVA_DEPLOYMENT).unwrap_err();
    let g = suggested_gateway(&err);
    assert_eq!(g.name, "sava:1.0/sava/port", "Vamp's internal gateway name: deployment/cluster/port");
    assert_eq!((g.routes.len(), route(&g, "sava:1.0.0").targets.len()), (1, 1));
}
