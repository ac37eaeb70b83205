//! Applying, merging, batches, history, rollback, promote, delete, health, limits.

use super::*;
use crate::controller::{CanaryOp, HISTORY_DEPTH};
use crate::{datapath::Dataplane, health::HealthReport};

#[test]
fn applying_a_gateway_makes_it_live_and_records_an_event() {
    let mut c = controller();
    let reply = apply(&mut c, SAVA).unwrap();
    assert!(yaml(&reply).starts_with("name: \"sava\""), "{}", yaml(&reply));
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 9000), ("sava:1.1.0", 1000)]));
    assert_eq!(generation(&c, "sava"), Some(1));
    assert_eq!(event_messages(&c), ["weights: sava:1.0.0=90% sava:1.1.0=10% (applied from test.yaml)"]);
}

#[test]
fn the_same_document_again_changes_nothing() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    let reply = apply(&mut c, SAVA).unwrap();
    assert_eq!(yaml(&reply), "# unchanged\n");
    assert_eq!((generation(&c, "sava"), c.dataplane().switches), (Some(1), 1));
    assert_eq!(c.events().all().count(), 1);
}

#[test]
fn a_weights_only_document_merges_into_the_gateway() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", "30%")])).unwrap();
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 7000), ("sava:1.1.0", 3000)]), "the unnamed route takes the rest");
    let g = &c.configured["sava"];
    assert_eq!(g.routes[0].targets.len(), 2, "targets untouched");
}

#[test]
fn a_weights_only_document_for_no_gateway_is_not_found_and_changes_nothing() {
    let mut c = controller();
    assert_eq!(kind(apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", "30%")]))), ErrorKind::NotFound);
    assert!(c.configured.is_empty() && c.dataplane().names().is_empty() && c.events().all().count() == 0);
}

#[test]
fn a_document_that_does_not_parse_is_invalid_with_one_line() {
    let mut c = controller();
    let err = apply(&mut c, "name: sava\nport: 9050/http\nvirtual_address: nope\n").unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(err.message.starts_with("test.yaml:3:") && !err.message.contains('\n'), "{}", err.message);
}

#[test]
fn a_put_to_one_gateway_refuses_a_document_for_another() {
    let mut c = controller();
    let err = c
        .handle(Op::Apply { origin: "body".into(), text: SAVA.into(), path_name: Some("other".into()), validate_only: false })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Invalid);
    assert!(err.message.contains("the document is for gateway sava, not other"), "{}", err.message);
    assert!(c.dataplane().names().is_empty());
}

#[test]
fn a_batch_with_a_vip_clash_changes_nothing() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    let clash = OTHER.replace("10.0.0.20", "10.0.0.10").replace("80/tcp", "9050/tcp");
    let batch = format!("{}---\n{clash}", weight_doc("sava", &[("sava:1.1.0", "50%")]));
    let err = apply(&mut c, &batch).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict);
    assert!(err.message.contains("already served by gateway sava"), "{}", err.message);
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 9000), ("sava:1.1.0", 1000)]));
    assert_eq!(c.dataplane().names(), ["sava"]);
}

/// The failure the checks cannot foresee: a map write of the second gateway fails after
/// the first one (which starts a rollout) was switched. Nothing of the change may remain.
#[test]
fn a_late_map_write_failure_undoes_the_whole_batch_everywhere() {
    let dir = TempDir::new("batch");
    let mut c = controller_with(Some(dir.0.clone()), None);
    apply(&mut c, SAVA).unwrap();
    apply(&mut c, OTHER).unwrap();
    let saved_before = saved_text(&dir.0).unwrap();
    let (events_before, saves_before) = (c.events().all().count(), c.state_saves);
    c.dataplane_mut().failing.insert("other".into());
    let with_canary = format!("{SAVA}canary:\n  route: sava:1.1.0\n  steps: [20, 100]\n  interval: 1s\n");
    let batch = format!("{with_canary}---\n{}", weight_doc("other", &[("b", "90%")]));
    assert_eq!(kind(apply(&mut c, &batch)), ErrorKind::Conflict);
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 9000), ("sava:1.1.0", 1000)]), "the first gateway was put back");
    assert_eq!(live_weights(&c, "other"), w(&[("a", 5000), ("b", 5000)]));
    assert_eq!(weights(&c, "sava"), w(&[("sava:1.0.0", 9000), ("sava:1.1.0", 1000)]));
    assert!(c.configured["sava"].canary.is_none());
    assert!(rollouts(&mut c).is_empty(), "no rollout started");
    assert!(c.history.values().all(Vec::is_empty), "{:?}", c.history);
    assert_eq!(c.events().all().count(), events_before, "{:?}", event_messages(&c));
    assert_eq!((saved_text(&dir.0).unwrap(), c.state_saves), (saved_before, saves_before), "nothing saved");
}

#[test]
fn each_successful_change_is_saved_once() {
    let dir = TempDir::new("saves");
    let mut c = controller_with(Some(dir.0.clone()), None);
    apply(&mut c, SAVA).unwrap();
    assert_eq!(c.state_saves, 1);
    let with_canary = format!("{SAVA}canary:\n  route: sava:1.1.0\n  steps: [20, 100]\n  interval: 1s\n");
    apply(&mut c, &with_canary).unwrap();
    assert_eq!(c.state_saves, 2, "a change that also starts a rollout is one save");
    c.handle(Op::Get("sava".into())).unwrap();
    assert_eq!(c.state_saves, 2, "reads save nothing");
    let saved = state::load(&dir.0).unwrap().unwrap();
    assert_eq!(saved.rollouts.len(), 1);
    assert!(saved.gateways[0].contains("weight: 20%"), "{}", saved.gateways[0]);
}

#[test]
fn rollback_returns_to_the_weights_before_the_last_change() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", "50%")])).unwrap();
    c.handle(Op::Rollback { gateway: "sava".into(), flush: false }).unwrap();
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 9000), ("sava:1.1.0", 1000)]));
    assert!(c.history["sava"].is_empty());
}

#[test]
fn rollback_twice_goes_two_changes_back_then_has_nothing() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", "30%")])).unwrap();
    apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", "60%")])).unwrap();
    c.handle(Op::Rollback { gateway: "sava".into(), flush: false }).unwrap();
    assert_eq!(weights(&c, "sava")["sava:1.1.0"], 3000);
    c.handle(Op::Rollback { gateway: "sava".into(), flush: false }).unwrap();
    assert_eq!(weights(&c, "sava")["sava:1.1.0"], 1000);
    let err = c.handle(Op::Rollback { gateway: "sava".into(), flush: false }).unwrap_err();
    assert_eq!((err.kind, err.message.as_str()), (ErrorKind::Conflict, "gateway sava has no earlier weights to roll back to"));
}

#[test]
fn a_failed_rollback_keeps_its_history_entry() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", "30%")])).unwrap();
    c.dataplane_mut().failing.insert("sava".into());
    assert_eq!(kind(c.handle(Op::Rollback { gateway: "sava".into(), flush: false })), ErrorKind::Conflict);
    assert_eq!(c.history["sava"].len(), 1);
    c.dataplane_mut().failing.clear();
    c.handle(Op::Rollback { gateway: "sava".into(), flush: false }).unwrap();
    assert_eq!(weights(&c, "sava")["sava:1.1.0"], 1000);
}

#[test]
fn rollback_flush_ends_the_flows_of_targets_that_lost_weight() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", "50%")])).unwrap();
    c.dataplane_mut().traffic("sava", target("10.1.0.21:8080")).established = 12;
    c.dataplane_mut().traffic("sava", target("10.1.0.11:8080")).established = 5;
    let reply = c.handle(Op::Rollback { gateway: "sava".into(), flush: true }).unwrap();
    assert!(yaml(&reply).ends_with("# flushed 12 established flow(s)\n"), "{}", yaml(&reply));
    assert_eq!(c.dataplane_mut().traffic("sava", target("10.1.0.11:8080")).established, 5, "the stable targets keep theirs");
}

#[test]
fn history_keeps_the_last_weight_sets_only() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    for i in 1..=(HISTORY_DEPTH as u32 + 5) {
        apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", &format!("{i}%"))])).unwrap();
    }
    assert_eq!(c.history["sava"].len(), HISTORY_DEPTH);
    assert_eq!(c.history["sava"].last().unwrap()["sava:1.1.0"], (HISTORY_DEPTH as u32 + 4) * 100);
}

#[test]
fn promote_gives_the_route_everything_and_can_be_rolled_back() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    c.handle(Op::Promote { gateway: "sava".into(), route: "sava:1.1.0".into() }).unwrap();
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 0), ("sava:1.1.0", 10_000)]));
    c.handle(Op::Rollback { gateway: "sava".into(), flush: false }).unwrap();
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 9000), ("sava:1.1.0", 1000)]));
    let err = c.handle(Op::Promote { gateway: "sava".into(), route: "nope".into() }).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(err.message.contains("its routes: sava:1.0.0, sava:1.1.0"), "{}", err.message);
}

#[test]
fn delete_forgets_the_gateway_its_history_and_rollout() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", "30%")])).unwrap();
    c.handle(Op::Canary(CanaryOp::Start { gateway: "sava".into(), spec: super::rollouts::spec(&[50, 100]) })).unwrap();
    c.handle(Op::Delete("sava".into())).unwrap();
    assert!(c.dataplane().names().is_empty() && c.configured.is_empty());
    assert!(!c.history.contains_key("sava") && rollouts(&mut c).is_empty());
    assert_eq!(kind(c.handle(Op::Delete("sava".into()))), ErrorKind::NotFound);
}

#[test]
fn an_unhealthy_target_leaves_the_table_and_comes_back() {
    let mut c = controller();
    let checked = format!(
        "{SAVA}health_check:\n  protocol: tcp\n  interval: 1s\n  timeout: 500ms\n  unhealthy_threshold: 2\n  healthy_threshold: 1\n"
    );
    apply(&mut c, &checked).unwrap();
    let canary = target("10.1.0.21:8080");
    let report = |result: Result<(), String>| HealthReport { gateway: "sava".into(), target: canary, result };
    c.health_report(report(Err("refused".into())));
    assert!(c.dataplane().shares("sava").iter().all(|(_, s)| *s > 0), "one failure is below the threshold");
    c.health_report(report(Err("refused".into())));
    let share = |c: &TestController| c.dataplane().shares("sava").iter().find(|(t, _)| *t == canary).unwrap().1;
    assert_eq!(share(&c), 0);
    assert_eq!(c.dataplane().shares("sava").iter().map(|(_, s)| s).sum::<u32>(), 1_000_000, "the stable route takes it all");
    c.health_report(report(Ok(())));
    assert_eq!(share(&c), 100_000);
    assert!(event_messages(&c).iter().any(|m| m.starts_with("health: target 10.1.0.21:8080 unhealthy after 2 failed checks: refused")));
}

#[test]
fn a_dsr_targets_check_goes_through_the_tunnel_to_the_vip_on_the_checks_port() {
    let mut c = controller();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    c.set_health_checks(tx);
    let dsr = |port: &str| format!("{OTHER}mode: dsr\nhealth_check:\n  protocol: tcp\n{port}  interval: 1s\n  timeout: 500ms\n");
    let tunnelled = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<crate::health::CheckSpec>>| {
        let mut last = None;
        while let Ok(specs) = rx.try_recv() {
            last = Some(specs);
        }
        last.unwrap().iter().map(|s| (s.target.to_string(), s.through_tunnel_to.map(|a| a.to_string()))).collect::<Vec<_>>()
    };
    apply(&mut c, &dsr("")).unwrap();
    let vip = Some("10.0.0.20:80".to_string());
    assert_eq!(tunnelled(&mut rx), [("10.1.1.1:80".to_string(), vip.clone()), ("10.1.1.2:80".to_string(), vip)]);
    apply(&mut c, &dsr("  port: 8081\n")).unwrap();
    let vip = Some("10.0.0.20:8081".to_string());
    assert_eq!(tunnelled(&mut rx), [("10.1.1.1:80".to_string(), vip.clone()), ("10.1.1.2:80".to_string(), vip)], "the check's own port");
}

#[test]
fn gateways_beyond_the_limit_are_refused_whole() {
    let mut c = controller();
    let docs: Vec<String> =
        (0..5).map(|i| OTHER.replace("name: other", &format!("name: g{i}")).replace("10.0.0.20", &format!("10.0.0.{}", 30 + i))).collect();
    let err = apply(&mut c, &docs.join("---\n")).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict);
    assert!(err.message.contains("--max-gateways 4"), "{}", err.message);
    assert!(c.dataplane().names().is_empty());
    apply(&mut c, &docs[..4].join("---\n")).unwrap();
    assert_eq!(c.dataplane().names().len(), 4);
}

#[test]
fn an_unreachable_target_refuses_the_change() {
    let mut c = controller();
    c.dataplane_mut().unreachable.insert(target("10.1.0.21:8080"));
    let err = apply(&mut c, SAVA).unwrap_err();
    assert!(err.message.contains("no route to target 10.1.0.21:8080"), "{}", err.message);
    assert!(c.configured.is_empty() && c.events().all().count() == 0);
}

#[test]
fn stats_show_the_observed_share_since_the_last_change() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    c.dataplane_mut().traffic("sava", target("10.1.0.21:8080")).new_flows = 50;
    apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", "50%")])).unwrap();
    c.dataplane_mut().traffic("sava", target("10.1.0.21:8080")).new_flows = 60;
    c.dataplane_mut().traffic("sava", target("10.1.0.11:8080")).new_flows = 10;
    let Answer::Stats(stats) = c.handle(Op::Stats(Some("sava".into()))).unwrap().answer else { panic!("stats") };
    let canary = stats[0].targets.iter().find(|t| t.target == "10.1.0.21:8080").unwrap();
    assert_eq!((canary.new_flows_since_change, stats[0].new_flows_since_change), (10, 20));
    assert_eq!(canary.observed_share, Some(50.0));
    assert_eq!(kind(c.handle(Op::Stats(Some("nope".into())))), ErrorKind::NotFound);
}

#[test]
fn nodes_given_the_same_documents_show_the_same_table_fingerprint() {
    let fingerprint = |c: &TestController| -> String {
        let stats = c.stats(Some("sava")).unwrap();
        let view = c.view(&c.configured["sava"]);
        assert_eq!(view.status.table_fingerprint.as_deref(), Some(stats[0].table_fingerprint.as_str()), "get and stats agree");
        stats[0].table_fingerprint.clone()
    };
    let (mut a, mut b) = (controller(), controller());
    apply(&mut a, SAVA).unwrap();
    apply(&mut b, SAVA).unwrap();
    let first = fingerprint(&a);
    assert_eq!(first.len(), 16);
    assert_eq!(fingerprint(&b), first, "two nodes, one document, one table");
    let metrics = a.metrics().unwrap();
    assert!(metrics.contains(&format!("splitter_gateway_table_fingerprint{{gateway=\"sava\",fingerprint=\"{first}\"}} 1")), "{metrics}");
    apply(&mut a, &weight_doc("sava", &[("sava:1.1.0", "30%")])).unwrap();
    assert_ne!(fingerprint(&a), first, "another split, another fingerprint");
    apply(&mut b, &weight_doc("sava", &[("sava:1.1.0", "30%")])).unwrap();
    assert_eq!(fingerprint(&a), fingerprint(&b), "the same change on both nodes");
    let shown = yaml(&a.handle(Op::Get("sava".into())).unwrap());
    assert!(shown.contains(&format!("# table: generation 2, fingerprint {}", fingerprint(&a))), "{shown}");
}
