//! Automated canary rollouts as a state machine: move a route's weight step by step, judge
//! every window from what the splitter itself sees, roll back on a breach, promote at the
//! end. Nothing here writes weights: a rollout says what it wants next ([`Intent`]) and the
//! controller carries it out, then tells the rollout what happened.

use std::{collections::BTreeMap, time::Instant};

use serde::{Deserialize, Serialize};

use splitter_common::apportion::largest_remainder;

use crate::gateway::{
    format_weight,
    policy::{format_duration_us, CanarySpec, LatencyLimit, Thresholds},
    FULL_WEIGHT,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    Progressing,
    Paused,
    Promoted,
    RolledBack,
}

impl RolloutState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Progressing => "progressing",
            Self::Paused => "paused",
            Self::Promoted => "promoted",
            Self::RolledBack => "rolled-back",
        }
    }
}

/// Counters that the analysis compares between two moments (all cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub canary_flows: u64,
    pub canary_resets: u64,
    /// SYNs canary targets refused, answered wrongly or left unanswered.
    pub canary_failed_connects: u64,
    /// HTTP responses of canary targets, and how many were 5xx.
    pub canary_http_responses: u64,
    pub canary_http_5xx: u64,
    pub canary_connects: u64,
    pub canary_connect_ns: u64,
    pub stable_connects: u64,
    pub stable_connect_ns: u64,
    pub canary_failed_checks: u64,
}

impl Sample {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Sample) -> Sample {
        Sample {
            canary_flows: self.canary_flows.saturating_sub(earlier.canary_flows),
            canary_resets: self.canary_resets.saturating_sub(earlier.canary_resets),
            canary_failed_connects: self.canary_failed_connects.saturating_sub(earlier.canary_failed_connects),
            canary_http_responses: self.canary_http_responses.saturating_sub(earlier.canary_http_responses),
            canary_http_5xx: self.canary_http_5xx.saturating_sub(earlier.canary_http_5xx),
            canary_connects: self.canary_connects.saturating_sub(earlier.canary_connects),
            canary_connect_ns: self.canary_connect_ns.saturating_sub(earlier.canary_connect_ns),
            stable_connects: self.stable_connects.saturating_sub(earlier.stable_connects),
            stable_connect_ns: self.stable_connect_ns.saturating_sub(earlier.stable_connect_ns),
            canary_failed_checks: self.canary_failed_checks.saturating_sub(earlier.canary_failed_checks),
        }
    }

    pub fn canary_connect_us(&self) -> Option<u64> {
        (self.canary_connects > 0).then(|| self.canary_connect_ns / self.canary_connects / 1000)
    }

    pub fn stable_connect_us(&self) -> Option<u64> {
        (self.stable_connects > 0).then(|| self.stable_connect_ns / self.stable_connects / 1000)
    }
}

/// The judgement of a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Enough flows, nothing wrong.
    Healthy(String),
    /// Too few new canary flows to judge: wait.
    TooFewFlows(String),
    /// A threshold is crossed: roll back, for this reason.
    Breach(String),
}

/// Judges a window. Failed health checks count whatever the traffic; rates and latency
/// need `min_flows` new canary flows.
pub fn judge(w: &Sample, t: &Thresholds) -> Verdict {
    if w.canary_failed_checks > u64::from(t.max_failed_checks) {
        return Verdict::Breach(format!(
            "{} failed health checks of canary targets (at most {} allowed)",
            w.canary_failed_checks, t.max_failed_checks
        ));
    }
    if w.canary_flows < u64::from(t.min_flows) {
        return Verdict::TooFewFlows(format!("only {} new canary flows in the window, {} needed to judge", w.canary_flows, t.min_flows));
    }
    // Hundredths of a percent, like the threshold: what clients saw fail, per new flow.
    let errors = w.canary_resets + w.canary_failed_connects;
    let error_rate = errors * u64::from(FULL_WEIGHT) / w.canary_flows.max(1);
    if error_rate > u64::from(t.max_error_rate) {
        return Verdict::Breach(format!(
            "error rate {}% ({} resets and {} failed connects of canary targets for {} new flows) above {}%",
            error_rate as f64 / 100.0,
            w.canary_resets,
            w.canary_failed_connects,
            w.canary_flows,
            f64::from(t.max_error_rate) / 100.0
        ));
    }
    let http_rate = (w.canary_http_responses > 0).then(|| w.canary_http_5xx * u64::from(FULL_WEIGHT) / w.canary_http_responses);
    if let (Some(max), Some(rate)) = (t.max_http_error_rate, http_rate) {
        if rate > u64::from(max) {
            return Verdict::Breach(format!(
                "HTTP 5xx rate {}% ({} of {} responses from canary targets) above {}%",
                rate as f64 / 100.0,
                w.canary_http_5xx,
                w.canary_http_responses,
                f64::from(max) / 100.0
            ));
        }
    }
    let canary_us = w.canary_connect_us();
    if let (Some(limit), Some(canary_us)) = (t.max_connect_latency, canary_us) {
        match limit {
            LatencyLimit::Absolute(max_us) if canary_us > max_us => {
                return Verdict::Breach(format!(
                    "canary connect latency {:.2}ms above {:.2}ms",
                    canary_us as f64 / 1000.0,
                    max_us as f64 / 1000.0
                ));
            }
            LatencyLimit::Relative(hundredths) => {
                if let Some(stable_us) = w.stable_connect_us() {
                    // A floor of 100 us keeps microsecond noise on a fast path from
                    // reading as a large factor.
                    let bound = stable_us.max(100) * u64::from(hundredths) / 100;
                    if canary_us > bound {
                        return Verdict::Breach(format!(
                            "canary connect latency {:.2}ms above {limit} the stable routes' {:.2}ms",
                            canary_us as f64 / 1000.0,
                            stable_us as f64 / 1000.0
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Verdict::Healthy(format!(
        "{} new canary flows, error rate {}%,{} connect {}",
        w.canary_flows,
        error_rate as f64 / 100.0,
        http_rate.map_or(String::new(), |r| format!(" HTTP 5xx {}% of {} responses,", r as f64 / 100.0, w.canary_http_responses)),
        match (canary_us, w.stable_connect_us()) {
            (Some(c), Some(s)) => format!("{:.2}ms (stable {:.2}ms)", c as f64 / 1000.0, s as f64 / 1000.0),
            (Some(c), None) => format!("{:.2}ms", c as f64 / 1000.0),
            _ => "n/a".into(),
        }
    ))
}

/// The weights of every route with the canary at `canary_weight`: the other routes share
/// the rest in proportion to their weights before the rollout (equally if those were all
/// 0), by largest remainder so the total is exactly 100%.
pub fn step_weights(routes: &[String], canary: &str, canary_weight: u32, stable: &BTreeMap<String, u32>) -> BTreeMap<String, u32> {
    let canary_weight = canary_weight.min(FULL_WEIGHT);
    let others: Vec<&String> = routes.iter().filter(|r| r.as_str() != canary).collect();
    let base: Vec<u64> = others.iter().map(|r| u64::from(stable.get(*r).copied().unwrap_or(0))).collect();
    let parts = largest_remainder(u64::from(FULL_WEIGHT - canary_weight), &base, true);
    let mut out: BTreeMap<String, u32> = others.into_iter().cloned().zip(parts.into_iter().map(|w| w as u32)).collect();
    out.insert(canary.to_string(), canary_weight);
    out
}

/// A rollout of one gateway's canary route (saved with the agent's state: a restarted
/// agent takes it up at the step it had reached).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rollout {
    pub gateway: String,
    pub spec: CanarySpec,
    pub state: RolloutState,
    /// Index in `spec.steps` of the weight in effect.
    pub step: usize,
    /// Why the rollout is where it is (last decision).
    pub reason: String,
    /// Weights of the routes before the rollout started (hundredths of a percent).
    pub stable_weights: BTreeMap<String, u32>,
    /// Seconds since the Unix epoch when the rollout started.
    pub started_unix: u64,
    /// The current analysis window (not saved: a restored rollout starts a new window).
    #[serde(skip, default = "Instant::now")]
    pub window_started: Instant,
    #[serde(skip)]
    pub window_base: Sample,
    /// The first step's weights are live (a rollout waiting for its pre-rollout webhooks
    /// has moved nothing yet).
    #[serde(default = "entered_by_default")]
    pub entered: bool,
    /// The operator approved the promotion (`splitter canary approve`).
    #[serde(default)]
    pub approved: bool,
    /// Windows in a row whose external metrics could not all be judged.
    #[serde(default)]
    pub inconclusive: u32,
    /// What the rollout waits for from outside (not saved: a restarted agent asks again).
    #[serde(skip)]
    pub awaiting: Option<Awaiting>,
    /// The promotion step its confirm-promotion webhooks held back (approving takes it).
    #[serde(skip)]
    pub held_promotion: Option<usize>,
    /// What the analysis cannot see for this gateway (see [`Gateway::unseen_signals`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<String>,
}

fn entered_by_default() -> bool {
    true
}

/// An answer from outside a rollout waits for before it moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Awaiting {
    /// Its pre-rollout webhooks, before the first step.
    PreRollout { id: u64 },
    /// Its external metrics, before `step`.
    Metrics { id: u64, step: usize, reason: String },
    /// Its step webhooks, before `step`.
    StepHooks { id: u64, step: usize, reason: String },
    /// Its confirm-promotion webhooks, before the last step.
    Confirm { id: u64, step: usize, reason: String },
}

impl Awaiting {
    pub fn id(&self) -> u64 {
        match self {
            Self::PreRollout { id } | Self::Metrics { id, .. } | Self::StepHooks { id, .. } | Self::Confirm { id, .. } => *id,
        }
    }
}

/// What a rollout wants done next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Intent {
    /// Nothing now.
    Hold,
    /// Too few flows to judge: another interval at the same step (worth an event).
    Wait(String),
    /// The canary to this step's weight (the last step promotes).
    Step { step: usize, reason: String },
    /// The canary to 0% at once, the other routes back to their weights before it.
    RollBack(String),
}

impl Rollout {
    /// A rollout about to take its first step; `stable_weights` are the weights before it.
    pub fn new(gateway: &str, spec: CanarySpec, stable_weights: BTreeMap<String, u32>, now: Instant) -> Self {
        Rollout {
            gateway: gateway.to_string(),
            spec,
            state: RolloutState::Progressing,
            step: 0,
            reason: "started".into(),
            stable_weights,
            started_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            window_started: now,
            window_base: Sample::default(),
            entered: true,
            approved: false,
            inconclusive: 0,
            awaiting: None,
            held_promotion: None,
            signals: None,
        }
    }

    /// The canary's weight at the current step.
    pub fn canary_weight(&self) -> u32 {
        self.spec.steps.get(self.step).copied().unwrap_or(0)
    }

    /// Progressing or paused: it still owns the gateway's weights.
    pub fn is_active(&self) -> bool {
        matches!(self.state, RolloutState::Progressing | RolloutState::Paused)
    }

    /// The weights of every route of `routes` at `step` (past the last: 100%).
    pub fn weights_at(&self, routes: &[String], step: usize) -> BTreeMap<String, u32> {
        let weight = self.spec.steps.get(step).copied().unwrap_or(FULL_WEIGHT);
        step_weights(routes, &self.spec.route, weight, &self.stable_weights)
    }

    /// The event that says the rollout started.
    pub fn started_message(&self) -> String {
        let steps: Vec<String> = self.spec.steps.iter().map(|s| format_weight(*s)).collect();
        format!(
            "started: route {} through [{}] every {}",
            self.spec.route,
            steps.join(", "),
            format_duration_us(self.spec.interval_ms * 1000)
        )
    }

    /// Judges the window from its base to `now_sample`: a breach rolls back at once; at the
    /// end of the interval, enough healthy traffic takes the next step, too little waits.
    pub fn judge(&self, now_sample: &Sample, now: Instant) -> Intent {
        if self.state != RolloutState::Progressing || !self.entered {
            return Intent::Hold;
        }
        let window = now_sample.since(&self.window_base);
        let elapsed = now.saturating_duration_since(self.window_started);
        let evidence = |why: String| format!("{why}, over a {:.1}s window at step {}", elapsed.as_secs_f64(), self.step + 1);
        match judge(&window, &self.spec.thresholds) {
            Verdict::Breach(reason) => Intent::RollBack(evidence(reason)),
            // Waiting for an answer from outside: only a breach acts (a breach while waiting
            // for a promotion's confirmation still rolls back).
            _ if self.awaiting.is_some() => Intent::Hold,
            _ if elapsed < std::time::Duration::from_millis(self.spec.interval_ms) => Intent::Hold,
            Verdict::TooFewFlows(why) => Intent::Wait(why),
            Verdict::Healthy(summary) => Intent::Step { step: self.step + 1, reason: format!("step {} passed: {summary}", self.step + 1) },
        }
    }

    /// Another interval at the same step, counting from the same base.
    pub fn waited(&mut self, why: &str, now: Instant) -> String {
        self.window_started = now;
        self.reason = format!("waiting: {why}");
        format!("waiting at step {}: {why}", self.step + 1)
    }

    /// The weights of `step` are live: a new window from `base`. Returns the event.
    pub fn entered(&mut self, step: usize, reason: String, base: Sample, now: Instant) -> String {
        let count = self.spec.steps.len();
        let last = step + 1 >= count;
        self.entered = true;
        self.awaiting = None;
        self.held_promotion = None;
        self.step = step.min(count.saturating_sub(1));
        self.window_started = now;
        self.window_base = base;
        let message = if last {
            self.state = RolloutState::Promoted;
            format!("promoted: {} at 100% ({reason})", self.spec.route)
        } else {
            format!("step {}/{count}: {} at {} ({reason})", step + 1, self.spec.route, format_weight(self.canary_weight()))
        };
        self.reason = reason;
        message
    }

    /// The stable weights are live again.
    pub fn rolled_back(&mut self, reason: String) {
        self.state = RolloutState::RolledBack;
        self.reason = reason;
    }

    /// The operator pauses: the weights hold until resumed.
    pub fn pause(&mut self, reason: &str) -> Result<(), String> {
        if self.state != RolloutState::Progressing {
            return Err(format!("the rollout of {} is {}, not progressing", self.gateway, self.state.name()));
        }
        self.state = RolloutState::Paused;
        self.reason = reason.to_string();
        Ok(())
    }

    /// Progressing again, judging a fresh window from `base`.
    pub fn resume(&mut self, base: Sample, now: Instant) -> Result<(), String> {
        if self.state != RolloutState::Paused {
            return Err(format!("the rollout of {} is {}, not paused", self.gateway, self.state.name()));
        }
        self.state = RolloutState::Progressing;
        self.reason = "resumed by the operator".into();
        self.window_started = now;
        self.window_base = base;
        Ok(())
    }

    /// One line: state, step, weight, last reason.
    pub fn describe(&self) -> String {
        format!(
            "{} at step {}/{} (canary {} at {}): {}",
            self.state.name(),
            self.step + 1,
            self.spec.steps.len(),
            self.spec.route,
            format_weight(self.canary_weight()),
            self.reason
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds { max_connect_latency: Some(LatencyLimit::Relative(200)), min_flows: 10, ..Thresholds::default() }
    }

    #[test]
    fn failed_checks_breach_even_without_traffic() {
        let w = Sample { canary_failed_checks: 2, ..Default::default() };
        assert!(matches!(judge(&w, &thresholds()), Verdict::Breach(r) if r.contains("failed health checks")));
    }

    #[test]
    fn too_few_flows_wait() {
        let w = Sample { canary_flows: 9, canary_resets: 9, ..Default::default() };
        assert!(matches!(judge(&w, &thresholds()), Verdict::TooFewFlows(_)));
    }

    #[test]
    fn resets_above_the_rate_breach() {
        let ok = Sample { canary_flows: 100, canary_resets: 5, ..Default::default() };
        assert!(matches!(judge(&ok, &thresholds()), Verdict::Healthy(_)), "5% is the limit itself");
        let bad = Sample { canary_flows: 100, canary_resets: 6, ..Default::default() };
        assert!(matches!(judge(&bad, &thresholds()), Verdict::Breach(r) if r.contains("error rate 6%")));
    }

    #[test]
    fn connect_latency_relative_and_absolute() {
        let w = |canary_ms: u64, stable_ms: u64| Sample {
            canary_flows: 50,
            canary_connects: 50,
            canary_connect_ns: 50 * canary_ms * 1_000_000,
            stable_connects: 100,
            stable_connect_ns: 100 * stable_ms * 1_000_000,
            ..Default::default()
        };
        assert!(matches!(judge(&w(3, 2), &thresholds()), Verdict::Healthy(_)));
        assert!(matches!(judge(&w(5, 2), &thresholds()), Verdict::Breach(r) if r.contains("2x")));
        let absolute = Thresholds { max_connect_latency: Some(LatencyLimit::Absolute(20_000)), ..thresholds() };
        assert!(matches!(judge(&w(30, 29), &absolute), Verdict::Breach(_)));
        assert!(matches!(judge(&w(10, 1), &absolute), Verdict::Healthy(_)));
    }

    #[test]
    fn step_weights_keep_the_stable_proportions() {
        let routes: Vec<String> = ["a", "b", "canary"].map(String::from).to_vec();
        let stable: BTreeMap<String, u32> = [("a".into(), 6000), ("b".into(), 3000), ("canary".into(), 1000)].into();
        let w = step_weights(&routes, "canary", 2500, &stable);
        assert_eq!(w["canary"], 2500);
        assert_eq!(w["a"] + w["b"], 7500);
        assert_eq!((w["a"], w["b"]), (5000, 2500), "6:3 of 75%");
        let zero: BTreeMap<String, u32> = [("a".into(), 0), ("b".into(), 0), ("canary".into(), 10000)].into();
        let w = step_weights(&routes, "canary", 0, &zero);
        assert_eq!((w["a"], w["b"], w["canary"]), (5000, 5000, 0), "equal when the others had nothing");
        let odd: BTreeMap<String, u32> = [("a".into(), 1), ("b".into(), 1), ("canary".into(), 0)].into();
        let w = step_weights(&routes, "canary", 1, &odd);
        assert_eq!(w.values().sum::<u32>(), 10000);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        /// Any step: the canary gets exactly its weight, the total is exactly 100%, and
        /// every other route gets the floor or ceiling of its proportional share of the rest
        /// (an equal share when they all had 0).
        #[test]
        fn step_weights_split_the_rest_in_proportion(
            before in proptest::collection::vec(0u32..=10_000, 1..6),
            canary_weight in 0u32..=12_000,
        ) {
            let routes: Vec<String> = (0..=before.len()).map(|i| format!("r{i}")).collect();
            let canary = routes[before.len()].clone();
            let stable: BTreeMap<String, u32> = routes.iter().cloned().zip(before.iter().copied().chain([0])).collect();
            let w = step_weights(&routes, &canary, canary_weight, &stable);
            let effective = canary_weight.min(FULL_WEIGHT);
            proptest::prop_assert_eq!(w[&canary], effective);
            proptest::prop_assert_eq!(w.values().sum::<u32>(), FULL_WEIGHT);
            let total: u64 = before.iter().map(|&b| u64::from(b)).sum();
            let rest = u64::from(FULL_WEIGHT - effective);
            for (route, &b) in routes.iter().zip(&before) {
                let (num, den) = if total == 0 { (rest, before.len() as u64) } else { (rest * u64::from(b), total) };
                let got = u64::from(w[route]);
                proptest::prop_assert!(got == num / den || got == num.div_ceil(den), "{route}: {got} of {num}/{den}");
            }
        }
    }

    fn spec() -> CanarySpec {
        CanarySpec {
            route: "canary".into(),
            steps: vec![1000, 5000, FULL_WEIGHT],
            interval_ms: 1000,
            thresholds: thresholds(),
            analysis: Default::default(),
        }
    }

    #[test]
    fn a_healthy_window_steps_only_after_the_interval() {
        let t0 = Instant::now();
        let r = Rollout::new("g", spec(), BTreeMap::new(), t0);
        let healthy = Sample { canary_flows: 50, ..Default::default() };
        assert_eq!(r.judge(&healthy, t0 + std::time::Duration::from_millis(999)), Intent::Hold);
        assert!(matches!(r.judge(&healthy, t0 + std::time::Duration::from_secs(1)), Intent::Step { step: 1, .. }));
        let few = Sample { canary_flows: 3, ..Default::default() };
        assert!(matches!(r.judge(&few, t0 + std::time::Duration::from_secs(1)), Intent::Wait(_)), "no traffic never advances");
    }

    #[test]
    fn a_breach_rolls_back_before_the_interval_ends() {
        let t0 = Instant::now();
        let r = Rollout::new("g", spec(), BTreeMap::new(), t0);
        let bad = Sample { canary_flows: 50, canary_resets: 40, ..Default::default() };
        assert!(matches!(r.judge(&bad, t0), Intent::RollBack(why) if why.contains("error rate")));
    }

    #[test]
    fn paused_rollouts_hold_and_state_changes_are_checked() {
        let t0 = Instant::now();
        let mut r = Rollout::new("g", spec(), BTreeMap::new(), t0);
        assert!(r.resume(Sample::default(), t0).is_err(), "not paused");
        r.pause("by hand").unwrap();
        assert!(r.pause("again").is_err());
        let bad = Sample { canary_flows: 50, canary_resets: 40, ..Default::default() };
        assert_eq!(r.judge(&bad, t0 + std::time::Duration::from_secs(5)), Intent::Hold);
        r.resume(Sample::default(), t0).unwrap();
        assert_eq!(r.state, RolloutState::Progressing);
    }

    #[test]
    fn entering_the_last_step_promotes() {
        let t0 = Instant::now();
        let mut r = Rollout::new("g", spec(), BTreeMap::new(), t0);
        assert!(r.entered(1, "ok".into(), Sample::default(), t0).starts_with("step 2/3: canary at 50%"));
        assert_eq!(r.state, RolloutState::Progressing);
        assert!(r.entered(2, "ok".into(), Sample::default(), t0).starts_with("promoted: canary at 100%"));
        assert_eq!((r.state, r.canary_weight()), (RolloutState::Promoted, FULL_WEIGHT));
    }
}
