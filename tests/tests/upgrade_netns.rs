//! Live upgrades of the datapath: an agent of a newer build started over the pins of an
//! older one takes the pinned maps over and replaces the program on every interface in
//! place (no established connection broken, the new code running); pins of another map
//! layout are refused with what differs, and the running datapath is left as it was.

use std::{path::PathBuf, thread, time::Duration};

use aya::{
    maps::{Array, Map, MapData},
    programs::ProgramInfo,
};
use splitter_common::maps::DatapathInfo;
use splitter_tests::{
    privileged,
    testbed::{sava_gateway, LineClient, Testbed, VIP},
    traffic::{Bpffs, HttpTraffic},
};

/// The datapath as built before half-open flows (`cargo xtask test` builds it).
fn legacy_object() -> PathBuf {
    let path = PathBuf::from(std::env::var("SPLITTER_EBPF_LEGACY_OBJ").unwrap_or_default());
    assert!(path.is_file(), "SPLITTER_EBPF_LEGACY_OBJ names no file ({}): run the tests with `cargo xtask test`", path.display());
    path
}

fn bed(pin_dir: &str, extra: &[&str]) -> Testbed {
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.write_config("sava.yaml", &sava_gateway("sava", 9050, "50%", "50%", "10.10.2.21:8080", "")).unwrap();
    let mut args = vec!["--bpffs", pin_dir];
    args.extend_from_slice(extra);
    bed.start_agent(&args).unwrap();
    bed
}

/// The `splitter_flow_events_total` sample of `event`.
fn flow_event(bed: &Testbed, event: &str) -> f64 {
    let (body, code) = bed.curl(&["http://splitter/metrics"]);
    assert_eq!(code, 200);
    let prefix = format!("splitter_flow_events_total{{event=\"{event}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {prefix} in /metrics"))
}

fn program_id(pin_dir: &str) -> u32 {
    ProgramInfo::from_pin(PathBuf::from(pin_dir).join("prog")).unwrap().id()
}

/// 20 long-lived connections through the VIP and the answer each got first.
fn long_lived(bed: &Testbed) -> Vec<(LineClient, String)> {
    bed.client
        .enter(|| {
            (0..20)
                .map(|_| {
                    let mut c = LineClient::connect(&format!("{VIP}:9050")).unwrap();
                    let first = c.ask().unwrap();
                    (c, first)
                })
                .collect()
        })
        .unwrap()
}

fn assert_unmoved(conns: &mut [(LineClient, String)], phase: &str) {
    for (i, (c, first)) in conns.iter_mut().enumerate() {
        let answer = c.ask().unwrap_or_else(|e| panic!("{phase}: long-lived connection {i}: {e:#}"));
        assert_eq!(&answer, first, "{phase}: connection {i} moved");
    }
}

#[test]
fn an_older_build_is_upgraded_in_place_under_traffic() {
    if !privileged("an_older_build_is_upgraded_in_place_under_traffic") {
        return;
    }
    let legacy = legacy_object();
    let bpffs = Bpffs::mount();
    let pin_dir = bpffs.dir.path().join("splitter").display().to_string();
    let mut bed = bed(&pin_dir, &["--ebpf-object", legacy.to_str().unwrap()]);
    let old_program = program_id(&pin_dir);
    let mut conns = long_lived(&bed);
    let traffic = HttpTraffic::start(&bed.client);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(flow_event(&bed, "half_open_started"), 0.0, "the older build puts SYNs straight into conntrack");

    bed.stop_agent().unwrap();
    // The pins as the release before half-open flows left them: its eight maps, no record
    // of its build (the running program keeps its own references to the others).
    for added in ["HALF_OPEN", "FLOW_EVENTS", "SOURCE_POOLS", "DATAPATH_INFO"] {
        std::fs::remove_file(PathBuf::from(&pin_dir).join("maps").join(added)).unwrap();
    }
    assert_unmoved(&mut conns, "between the agents");
    bed.start_agent(&["--bpffs", &pin_dir]).unwrap();
    let ready = bed.agent().wait_for_line("ready", Duration::from_secs(1)).unwrap();
    println!("{ready}");
    assert!(ready.contains(&format!("upgraded (program {old_program}, build unknown, replaced; flows kept)")), "{ready}");
    for added in ["HALF_OPEN", "FLOW_EVENTS", "SOURCE_POOLS", "DATAPATH_INFO"] {
        assert!(PathBuf::from(&pin_dir).join("maps").join(added).exists(), "map {added} created and pinned by the upgrade");
    }
    let new_program = program_id(&pin_dir);
    assert_ne!(new_program, old_program, "the pinned program is the new one");
    assert!(ready.contains(&format!("program {new_program} build ")), "{ready}");
    thread::sleep(Duration::from_millis(700));
    assert_unmoved(&mut conns, "after the upgrade");
    let (ok, failures) = traffic.finish();
    println!("{ok} connections during the upgrade, {} failed", failures.len());
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 50, "traffic ran ({ok})");
    // The new code runs: new connections start half-open and are promoted.
    let (started, promoted) = (flow_event(&bed, "half_open_started"), flow_event(&bed, "half_open_promoted"));
    println!("after the upgrade: {started} half-open flows started, {promoted} promoted");
    assert!(started > 0.0 && promoted > 0.0);
    // And the next agent of the same build adopts it as it is.
    bed.stop_agent().unwrap();
    bed.start_agent(&["--bpffs", &pin_dir]).unwrap();
    let ready = bed.agent().wait_for_line("ready", Duration::from_secs(1)).unwrap();
    assert!(ready.contains("adopted on") && ready.contains(&format!("program {new_program} ")), "{ready}");
    assert_unmoved(&mut conns, "after adoption");
}

#[test]
fn pins_of_another_layout_are_refused_and_left_running() {
    if !privileged("pins_of_another_layout_are_refused_and_left_running") {
        return;
    }
    let bpffs = Bpffs::mount();
    let pin_dir = bpffs.dir.path().join("splitter").display().to_string();
    let mut bed = bed(&pin_dir, &[]);
    let program = program_id(&pin_dir);
    let mut conns = long_lived(&bed);
    bed.stop_agent().unwrap();
    // The pins say another layout made them.
    let info_pin = PathBuf::from(&pin_dir).join("maps").join("DATAPATH_INFO");
    let mut info: Array<MapData, DatapathInfo> = Array::try_from(Map::Array(MapData::from_pin(&info_pin).unwrap())).unwrap();
    let mut other = info.get(&0, 0).unwrap();
    other.layout_version = 99;
    info.set(0, other, 0).unwrap();

    let err = bed.start_agent(&["--bpffs", &pin_dir]).unwrap_err();
    let message = format!("{err:#}");
    println!("{message}");
    assert!(
        message.contains("was made with another map layout than this agent's (version 1): it says it is of layout version 99"),
        "{message}"
    );
    assert!(message.contains("nothing was changed and the running datapath keeps forwarding"), "{message}");
    assert_eq!(program_id(&pin_dir), program, "the running program is untouched");
    assert_eq!(info.get(&0, 0).unwrap().layout_version, 99, "the pins are untouched");
    assert_unmoved(&mut conns, "after the refusal");
    let fresh = bed.client.enter(|| splitter_tests::testbed::http_get(&format!("{VIP}:9050"), None)).unwrap();
    assert!(fresh.is_ok(), "new connections still work: {fresh:?}");
}
