//! External metrics and webhooks: the questions a rollout asks, and what the answers do.

use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::*;
use crate::{
    analysis::{Check, CheckReport, CheckRequest, Outcome},
    controller::CanaryOp,
    gateway::policy::{Analysis, Bound, CanarySpec, HookKind, MetricCheck, Thresholds, Webhook},
    rollout::RolloutState,
};

const CANARY: &str = "sava:1.1.0";

fn hook(kind: HookKind) -> Webhook {
    Webhook { kind, url: format!("http://127.0.0.1:9/{}", kind.name()), timeout_ms: 1000, retries: 0 }
}

fn spec(analysis: Analysis) -> CanarySpec {
    CanarySpec {
        route: CANARY.into(),
        steps: vec![2000, 5000, 10_000],
        interval_ms: 1000,
        thresholds: Thresholds { min_flows: 10, ..Thresholds::default() },
        analysis,
    }
}

fn metric(max: f64) -> MetricCheck {
    MetricCheck {
        name: "errors".into(),
        prometheus: "http://127.0.0.1:9090".into(),
        query: "sum(rate(errors{instance=~\"{{targets}}\"}[{{interval}}]))".into(),
        min: None,
        max: Some(Bound(max)),
    }
}

fn start(analysis: Analysis) -> (TestController, UnboundedReceiver<CheckRequest>) {
    let mut c = controller();
    let (tx, rx) = unbounded_channel();
    c.set_checks(tx);
    apply(&mut c, SAVA).unwrap();
    c.handle(Op::Canary(CanaryOp::Start { gateway: "sava".into(), spec: spec(analysis) })).unwrap();
    (c, rx)
}

fn hooks_answer(request: &CheckRequest, status: u16) -> CheckReport {
    let Check::Hooks(hooks, _) = &request.check else { panic!("expected webhooks, got {:?}", request.check) };
    CheckReport {
        gateway: request.gateway.clone(),
        id: request.id,
        outcome: Outcome::Hooks(hooks.iter().map(|h| (h.url.clone(), Ok(status))).collect()),
    }
}

fn metrics_answer(request: &CheckRequest, value: Result<f64, String>) -> CheckReport {
    let Check::Metrics(metrics) = &request.check else { panic!("expected metrics, got {:?}", request.check) };
    CheckReport {
        gateway: request.gateway.clone(),
        id: request.id,
        outcome: Outcome::Metrics(metrics.iter().map(|(m, _)| (m.name.clone(), value.clone())).collect()),
    }
}

fn healthy_window(c: &mut TestController) {
    let t = c.dataplane_mut().traffic("sava", target("10.1.0.21:8080"));
    t.new_flows += 30;
    c.tick(Instant::now() + Duration::from_millis(1001));
}

fn state(c: &mut TestController) -> RolloutState {
    rollouts(c)[0].state
}

fn canary(c: &TestController) -> u32 {
    live_weights(c, "sava")[CANARY]
}

#[test]
fn a_failing_pre_rollout_webhook_stops_the_rollout_before_any_weight_moves() {
    let (mut c, mut rx) = start(Analysis { webhooks: vec![hook(HookKind::PreRollout)], ..Analysis::default() });
    let switches = c.dataplane().switches;
    assert_eq!(canary(&c), 1000, "nothing moved yet");
    let request = rx.try_recv().unwrap();
    let Check::Hooks(_, payload) = &request.check else { panic!() };
    assert_eq!(
        (payload["type"].as_str(), payload["route"].as_str(), payload["step"].as_u64()),
        (Some("pre-rollout"), Some(CANARY), Some(1))
    );
    c.check_report(hooks_answer(&request, 500));
    assert_eq!(state(&mut c), RolloutState::RolledBack);
    assert_eq!((canary(&c), c.dataplane().switches), (1000, switches), "no weight ever moved");
    assert!(rollouts(&mut c)[0]
        .reason
        .contains("pre-rollout webhook http://127.0.0.1:9/pre-rollout answered 500: stopped before any weight moved"));
    assert!(event_messages(&c).iter().any(|e| e == "webhook: webhook pre-rollout http://127.0.0.1:9/pre-rollout answered 500"));
}

#[test]
fn a_passing_pre_rollout_webhook_takes_the_first_step() {
    let (mut c, mut rx) = start(Analysis { webhooks: vec![hook(HookKind::PreRollout)], ..Analysis::default() });
    let request = rx.try_recv().unwrap();
    c.check_report(hooks_answer(&request, 200));
    assert_eq!((canary(&c), state(&mut c)), (2000, RolloutState::Progressing));
}

#[test]
fn a_metric_above_its_max_rolls_back_with_its_evidence() {
    let (mut c, mut rx) = start(Analysis { metrics: vec![metric(0.05)], max_inconclusive: 3, ..Analysis::default() });
    healthy_window(&mut c);
    let request = rx.try_recv().unwrap();
    let Check::Metrics(metrics) = &request.check else { panic!() };
    assert_eq!(metrics[0].1, r#"sum(rate(errors{instance=~"10\\.1\\.0\\.21:8080"}[1s]))"#, "the query with its variables filled in");
    assert_eq!(canary(&c), 2000, "no step before the metrics answer");
    c.check_report(metrics_answer(&request, Ok(0.3)));
    assert_eq!(state(&mut c), RolloutState::RolledBack);
    let reason = rollouts(&mut c)[0].reason.clone();
    assert!(reason.starts_with("metric errors = 0.3 above its max 0.05 (sum(rate(errors"), "{reason}");
}

#[test]
fn an_unreachable_prometheus_never_advances_and_rolls_back_after_the_inconclusive_windows() {
    let (mut c, mut rx) = start(Analysis { metrics: vec![metric(0.05)], max_inconclusive: 2, ..Analysis::default() });
    for window in 1..=2 {
        healthy_window(&mut c);
        let request = rx.try_recv().unwrap();
        c.check_report(metrics_answer(&request, Err("connect 127.0.0.1:9090: Connection refused".into())));
        assert_eq!((canary(&c), state(&mut c)), (2000, RolloutState::Progressing), "window {window}: waits at its step");
    }
    healthy_window(&mut c);
    let request = rx.try_recv().unwrap();
    c.check_report(metrics_answer(&request, Err("connect 127.0.0.1:9090: Connection refused".into())));
    assert_eq!(state(&mut c), RolloutState::RolledBack);
    assert!(rollouts(&mut c)[0].reason.starts_with("external metrics inconclusive for 3 windows in a row"));
}

#[test]
fn metrics_within_bounds_advance_the_step() {
    let (mut c, mut rx) = start(Analysis { metrics: vec![metric(0.05)], max_inconclusive: 3, ..Analysis::default() });
    healthy_window(&mut c);
    let request = rx.try_recv().unwrap();
    c.check_report(metrics_answer(&request, Ok(0.01)));
    assert_eq!(canary(&c), 5000);
    assert!(rollouts(&mut c)[0].reason.ends_with("; metrics errors = 0.01"));
}

#[test]
fn a_failing_step_webhook_rolls_back() {
    let (mut c, mut rx) = start(Analysis { webhooks: vec![hook(HookKind::Step)], ..Analysis::default() });
    healthy_window(&mut c);
    let request = rx.try_recv().unwrap();
    c.check_report(hooks_answer(&request, 503));
    assert_eq!(state(&mut c), RolloutState::RolledBack);
    assert_eq!(canary(&c), 1000, "back to the weights before the rollout");
}

/// Confirm-promotion: the rollout waits before the last step until a webhook says yes or
/// the operator approves; a breach while it waits still rolls back.
#[test]
fn promotion_waits_for_confirmation_or_approval() {
    let (mut c, mut rx) = start(Analysis { webhooks: vec![hook(HookKind::ConfirmPromotion)], ..Analysis::default() });
    healthy_window(&mut c);
    assert_eq!(canary(&c), 5000, "no hook before the middle step");
    healthy_window(&mut c);
    let request = rx.try_recv().unwrap();
    c.check_report(hooks_answer(&request, 403));
    assert_eq!((canary(&c), state(&mut c)), (5000, RolloutState::Progressing), "waits at the last step but one");
    healthy_window(&mut c);
    let request = rx.try_recv().unwrap();
    assert!(matches!(request.check, Check::Hooks(..)), "asks again after another interval");
    c.handle(Op::Canary(CanaryOp::Approve("sava".into()))).unwrap();
    assert_eq!((canary(&c), state(&mut c)), (10_000, RolloutState::Promoted));

    // Approving between two asks takes the held promotion at once.
    let (mut c, mut rx) = start(Analysis { webhooks: vec![hook(HookKind::ConfirmPromotion)], ..Analysis::default() });
    healthy_window(&mut c);
    healthy_window(&mut c);
    let request = rx.try_recv().unwrap();
    c.check_report(hooks_answer(&request, 403));
    c.handle(Op::Canary(CanaryOp::Approve("sava".into()))).unwrap();
    assert_eq!((canary(&c), state(&mut c)), (10_000, RolloutState::Promoted));

    // A breach while waiting for the confirmation rolls back (Flagger #1801).
    let (mut c, mut rx) = start(Analysis { webhooks: vec![hook(HookKind::ConfirmPromotion)], ..Analysis::default() });
    healthy_window(&mut c);
    healthy_window(&mut c);
    let _pending = rx.try_recv().unwrap();
    let t = c.dataplane_mut().traffic("sava", target("10.1.0.21:8080"));
    t.new_flows += 30;
    t.resets += 30;
    c.tick(Instant::now());
    assert_eq!(state(&mut c), RolloutState::RolledBack);
}

#[test]
fn analysis_blocks_read_back_from_the_document() {
    let text = format!(
        "{SAVA}canary:\n  route: {CANARY}\n  steps: [50, 100]\n  metrics:\n    - name: errors\n      prometheus: http://127.0.0.1:9090\n      \
         query: sum(up)\n      max: 0.5\n  max_inconclusive: 1\n  webhooks:\n    - type: confirm-promotion\n      url: http://127.0.0.1:8000/ok\n      timeout: 2s\n      retries: 1\n"
    );
    let docs = crate::gateway::parse_documents("t.yaml", &text).unwrap();
    let crate::gateway::Document::Gateway(g) = &docs[0] else { panic!() };
    let a = &g.canary.as_ref().unwrap().analysis;
    assert_eq!(
        (a.metrics[0].max, a.max_inconclusive, a.webhooks[0].kind, a.webhooks[0].timeout_ms),
        (Some(Bound(0.5)), 1, HookKind::ConfirmPromotion, 2000)
    );
    let again = crate::gateway::parse_documents("t.yaml", &g.to_yaml()).unwrap();
    assert_eq!(again[0], docs[0], "to_yaml reads back the same");
}
