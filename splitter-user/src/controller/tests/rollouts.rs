//! Rollouts driven by ticks: steps, waits, breaches, the operator's controls, restarts.

use std::time::{Duration, Instant};

use super::*;
use crate::{
    controller::CanaryOp,
    gateway::policy::{CanarySpec, Thresholds},
    rollout::RolloutState,
};

const CANARY: &str = "sava:1.1.0";

pub(in crate::controller) fn spec(steps: &[u32]) -> CanarySpec {
    CanarySpec {
        route: CANARY.into(),
        steps: steps.iter().map(|s| s * 100).collect(),
        interval_ms: 1000,
        thresholds: Thresholds { min_flows: 10, ..Thresholds::default() },
        analysis: Default::default(),
    }
}

fn started(steps: &[u32]) -> TestController {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    c.handle(Op::Canary(CanaryOp::Start { gateway: "sava".into(), spec: spec(steps) })).unwrap();
    c
}

fn canary_weight(c: &TestController) -> u32 {
    live_weights(c, "sava")[CANARY]
}

fn state(c: &mut TestController) -> RolloutState {
    rollouts(c)[0].state
}

/// New canary flows (and resets) as traffic would count them.
fn traffic(c: &mut TestController, flows: u64, resets: u64) {
    let t = c.dataplane_mut().traffic("sava", target("10.1.0.21:8080"));
    t.new_flows += flows;
    t.resets += resets;
}

/// Failed connects and HTTP responses of the canary target, as the datapath counts them.
fn outcomes(c: &mut TestController, failed_connects: u64, http_2xx: u64, http_5xx: u64) {
    let t = c.dataplane_mut().traffic("sava", target("10.1.0.21:8080"));
    t.failed_connects += failed_connects;
    t.http[1] += http_2xx;
    t.http[4] += http_5xx;
}

#[test]
fn a_canary_answering_http_500_is_rolled_back_by_default_on_an_http_gateway() {
    let mut c = started(&[20, 50, 100]);
    assert_eq!(rollouts(&mut c)[0].spec.thresholds.max_http_error_rate, Some(500), "on by default for 9050/http");
    traffic(&mut c, 30, 0);
    outcomes(&mut c, 0, 20, 10);
    c.tick(Instant::now());
    assert_eq!(state(&mut c), RolloutState::RolledBack);
    let reason = rollouts(&mut c)[0].reason.clone();
    assert!(reason.starts_with("HTTP 5xx rate 33.33% (10 of 30 responses from canary targets) above 5%, over a "), "{reason}");
}

#[test]
fn failed_connects_count_as_errors() {
    let mut c = started(&[20, 50, 100]);
    traffic(&mut c, 20, 0);
    outcomes(&mut c, 3, 0, 0);
    c.tick(Instant::now());
    assert_eq!(state(&mut c), RolloutState::RolledBack);
    assert!(rollouts(&mut c)[0].reason.contains("(0 resets and 3 failed connects of canary targets for 20 new flows)"));
}

fn after_an_interval() -> Instant {
    Instant::now() + Duration::from_millis(1001)
}

#[test]
fn a_started_rollout_takes_its_first_step_at_once() {
    let c = started(&[20, 50, 100]);
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 8000), (CANARY, 2000)]));
    let events = event_messages(&c);
    assert!(events.iter().any(|e| e == "rollout: started: route sava:1.1.0 through [20%, 50%, 100%] every 1s"), "{events:#?}");
    assert!(events.iter().any(|e| e.starts_with("rollout: step 1/3: sava:1.1.0 at 20%")), "{events:#?}");
    assert_eq!(c.history["sava"].last(), Some(&w(&[("sava:1.0.0", 9000), (CANARY, 1000)])), "rollback returns to before it");
}

#[test]
fn healthy_traffic_steps_through_to_promotion() {
    let mut c = started(&[20, 50, 100]);
    traffic(&mut c, 30, 0);
    c.tick(Instant::now());
    assert_eq!(canary_weight(&c), 2000, "not before the interval");
    c.tick(after_an_interval());
    assert_eq!(canary_weight(&c), 5000);
    traffic(&mut c, 30, 0);
    c.tick(after_an_interval());
    assert_eq!(canary_weight(&c), 10_000);
    assert_eq!(state(&mut c), RolloutState::Promoted);
    assert!(event_messages(&c).iter().any(|e| e.starts_with("rollout: promoted: sava:1.1.0 at 100% (step 2 passed: 30 new canary flows")));
}

#[test]
fn no_traffic_never_advances_a_step() {
    let mut c = started(&[20, 100]);
    for _ in 0..3 {
        c.tick(after_an_interval());
    }
    assert_eq!((canary_weight(&c), state(&mut c)), (2000, RolloutState::Progressing));
    assert!(event_messages(&c)
        .iter()
        .any(|e| e == "rollout: waiting at step 1: only 0 new canary flows in the window, 10 needed to judge"));
}

#[test]
fn resets_above_the_error_rate_roll_back_within_the_window() {
    let mut c = started(&[20, 50, 100]);
    traffic(&mut c, 20, 5);
    c.tick(Instant::now());
    assert_eq!(state(&mut c), RolloutState::RolledBack);
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 9000), (CANARY, 1000)]), "exactly the weights before the rollout");
    let events = event_messages(&c);
    assert!(
        events.iter().any(|e| e.starts_with(
            "rollout: rolled back: error rate 25% (5 resets and 0 failed connects of canary targets for 20 new flows) above 5%, over a "
        )),
        "{events:#?}"
    );
}

#[test]
fn a_paused_rollout_holds_its_weights_and_resumes() {
    let mut c = started(&[20, 50, 100]);
    c.handle(Op::Canary(CanaryOp::Pause("sava".into()))).unwrap();
    traffic(&mut c, 30, 0);
    c.tick(after_an_interval());
    c.tick(after_an_interval() + Duration::from_secs(1));
    assert_eq!((canary_weight(&c), state(&mut c)), (2000, RolloutState::Paused));
    assert_eq!(kind(c.handle(Op::Canary(CanaryOp::Pause("sava".into())))), ErrorKind::Conflict);
    c.handle(Op::Canary(CanaryOp::Resume("sava".into()))).unwrap();
    traffic(&mut c, 30, 0);
    c.tick(after_an_interval());
    assert_eq!(canary_weight(&c), 5000, "judged on the window after the resume");
}

/// Like Argo Rollouts' abort: back to exactly the weights before the rollout (the canary
/// at its old 10%, not 0%).
#[test]
fn abort_returns_to_the_exact_weights_before_the_rollout() {
    let mut c = started(&[20, 50, 100]);
    c.handle(Op::Canary(CanaryOp::Abort("sava".into()))).unwrap();
    assert_eq!(state(&mut c), RolloutState::RolledBack);
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 9000), (CANARY, 1000)]));
    assert_eq!(kind(c.handle(Op::Canary(CanaryOp::Abort("nope".into())))), ErrorKind::NotFound);
}

#[test]
fn canary_promote_goes_to_the_last_step() {
    let mut c = started(&[20, 50, 100]);
    c.handle(Op::Canary(CanaryOp::Promote("sava".into()))).unwrap();
    assert_eq!((canary_weight(&c), state(&mut c)), (10_000, RolloutState::Promoted));
}

#[test]
fn a_manual_weight_change_pauses_the_rollout() {
    let mut c = started(&[20, 50, 100]);
    apply(&mut c, &weight_doc("sava", &[(CANARY, "35%")])).unwrap();
    assert_eq!(state(&mut c), RolloutState::Paused);
    assert_eq!(rollouts(&mut c)[0].reason, "paused: the weights were changed by hand");
    traffic(&mut c, 30, 0);
    c.tick(after_an_interval());
    assert_eq!(canary_weight(&c), 3500, "the operator's weights hold");
}

#[test]
fn a_second_rollout_of_the_same_gateway_is_a_conflict() {
    let mut c = started(&[20, 100]);
    let err = c.handle(Op::Canary(CanaryOp::Start { gateway: "sava".into(), spec: spec(&[50, 100]) })).unwrap_err();
    assert_eq!((err.kind, err.message.as_str()), (ErrorKind::Conflict, "a rollout of sava is already progressing (abort it first)"));
}

/// The socket path goes through the same spec rules as the gateway file and the CLI.
#[test]
fn a_start_with_bad_steps_is_refused_and_changes_nothing() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    for (steps, why) in
        [(vec![20, 10, 100], "canary.steps[1]: steps must increase"), (vec![20, 50], "canary.steps: the last step must be 100%")]
    {
        let err = c.handle(Op::Canary(CanaryOp::Start { gateway: "sava".into(), spec: spec(&steps) })).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(err.message.starts_with(why), "{}", err.message);
    }
    let mut unknown = spec(&[50, 100]);
    unknown.route = "nope".into();
    assert_eq!(kind(c.handle(Op::Canary(CanaryOp::Start { gateway: "sava".into(), spec: unknown }))), ErrorKind::NotFound);
    assert_eq!(canary_weight(&c), 1000);
    assert!(rollouts(&mut c).is_empty());
}

#[test]
fn a_canary_block_in_a_document_starts_the_rollout() {
    let mut c = controller();
    apply(&mut c, &format!("{SAVA}canary:\n  route: {CANARY}\n  steps: [25, 100]\n  interval: 1s\n  min_flows: 10\n")).unwrap();
    assert_eq!((canary_weight(&c), state(&mut c)), (2500, RolloutState::Progressing));
}

#[test]
fn a_failed_step_write_rolls_back() {
    let mut c = started(&[20, 50, 100]);
    traffic(&mut c, 30, 0);
    c.dataplane_mut().failing.insert("sava".into());
    c.tick(after_an_interval());
    assert_eq!(state(&mut c), RolloutState::RolledBack);
    assert_eq!(live_weights(&c, "sava")[CANARY], 2000, "neither write went through: the live table is still step 1");
    assert!(rollouts(&mut c)[0].reason.starts_with("the weights of step 2 could not be applied"));
}

#[test]
fn an_agent_restarted_mid_rollout_takes_it_up_at_its_step() {
    let dir = TempDir::new("restart");
    let mut c = controller_with(Some(dir.0.clone()), None);
    apply(&mut c, SAVA).unwrap();
    c.handle(Op::Canary(CanaryOp::Start { gateway: "sava".into(), spec: spec(&[20, 50, 100]) })).unwrap();
    traffic(&mut c, 30, 0);
    c.tick(after_an_interval());
    c.handle(Op::Get("sava".into())).unwrap();
    assert_eq!(canary_weight(&c), 5000);
    drop(c);

    let saved = state::load(&dir.0).unwrap().unwrap();
    let mut restarted = controller_with(Some(dir.0.clone()), None);
    restarted.restore(&saved, false);
    assert_eq!(live_weights(&restarted, "sava")[CANARY], 5000);
    let r = &rollouts(&mut restarted)[0];
    assert_eq!((r.state, r.step), (RolloutState::Progressing, 1));
    assert!(event_messages(&restarted).iter().any(|e| e == "rollout: taken up after an agent restart: progressing at step 2/3"));
    traffic(&mut restarted, 30, 0);
    restarted.tick(after_an_interval());
    assert_eq!(state(&mut restarted), RolloutState::Promoted);
}
