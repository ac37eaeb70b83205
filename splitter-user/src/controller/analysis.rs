//! A rollout's questions to the outside (external metrics, webhooks) and what their answers
//! do: asked through the agent's analysis tasks, answered into the inbox, never waited for
//! on the controller's thread.

use std::time::Instant;

use super::Controller;
use crate::{
    analysis::{render_query, Check, CheckReport, CheckRequest, HookPayload, Outcome},
    datapath::Dataplane,
    gateway::{format_weight, policy::format_duration_us, policy::HookKind},
    rollout::{Awaiting, RolloutState},
};

impl<D: Dataplane> Controller<D> {
    /// Where questions for the outside go (the analysis tasks in the agent's runtime).
    pub fn set_checks(&mut self, sender: tokio::sync::mpsc::UnboundedSender<CheckRequest>) {
        self.checks = Some(sender);
    }

    fn ask(&mut self, gateway: &str, check: Check) -> u64 {
        self.next_check_id += 1;
        let id = self.next_check_id;
        if let Some(tx) = &self.checks {
            let _ = tx.send(CheckRequest { gateway: gateway.to_string(), id, check });
        }
        id
    }

    fn has_hooks(&self, gateway: &str, kind: HookKind) -> bool {
        self.rollouts.get(gateway).is_some_and(|r| r.spec.analysis.webhooks.iter().any(|w| w.kind == kind))
    }

    /// Calls the rollout's webhooks of `kind` about `step` (0-based); returns the request's id.
    pub(super) fn ask_hooks(&mut self, rollout: &crate::rollout::Rollout, kind: HookKind, step: usize) -> u64 {
        let hooks: Vec<_> = rollout.spec.analysis.webhooks.iter().filter(|w| w.kind == kind).cloned().collect();
        let weights = self
            .configured
            .get(&rollout.gateway)
            .map(|g| g.routes.iter().map(|r| (r.name.clone(), format_weight(r.weight))).collect())
            .unwrap_or_default();
        let payload = HookPayload {
            gateway: rollout.gateway.clone(),
            route: rollout.spec.route.clone(),
            kind: kind.name(),
            step: step + 1,
            steps: rollout.spec.steps.len(),
            weights,
            last_verdict: rollout.reason.clone(),
        };
        let gateway = rollout.gateway.clone();
        self.ask(&gateway, Check::Hooks(hooks, serde_json::to_value(payload).unwrap_or_default()))
    }

    /// Tells the rollout's informational webhooks of `kind` (post-rollout, rollback).
    pub(super) fn notify(&mut self, gateway: &str, kind: HookKind) {
        if !self.has_hooks(gateway, kind) {
            return;
        }
        if let Some(r) = self.rollouts.get(gateway).cloned() {
            let step = r.step;
            self.ask_hooks(&r, kind, step);
        }
    }

    /// The rollout would take `step`: first its external metrics, then its webhooks.
    pub(super) fn try_step(&mut self, gateway: &str, step: usize, reason: String) {
        let Some(r) = self.rollouts.get(gateway) else { return };
        if !r.spec.analysis.metrics.is_empty() {
            let targets: Vec<String> = self
                .configured
                .get(gateway)
                .map(|g| g.routes.iter().filter(|x| x.name == r.spec.route).flat_map(|x| x.targets.iter().map(|t| t.to_string())).collect())
                .unwrap_or_default();
            let interval = format_duration_us(r.spec.interval_ms * 1000);
            let metrics: Vec<_> = r
                .spec
                .analysis
                .metrics
                .iter()
                .map(|m| (m.clone(), render_query(&m.query, gateway, &r.spec.route, &targets, &interval)))
                .collect();
            let id = self.ask(gateway, Check::Metrics(metrics));
            if let Some(r) = self.rollouts.get_mut(gateway) {
                r.awaiting = Some(Awaiting::Metrics { id, step, reason });
            }
            return;
        }
        self.after_metrics(gateway, step, reason);
    }

    fn after_metrics(&mut self, gateway: &str, step: usize, reason: String) {
        let Some(r) = self.rollouts.get(gateway).cloned() else { return };
        let last = step + 1 >= r.spec.steps.len();
        if last && !r.approved && self.has_hooks(gateway, HookKind::ConfirmPromotion) {
            let id = self.ask_hooks(&r, HookKind::ConfirmPromotion, step);
            if let Some(r) = self.rollouts.get_mut(gateway) {
                r.awaiting = Some(Awaiting::Confirm { id, step, reason });
            }
            return;
        }
        if !last && self.has_hooks(gateway, HookKind::Step) {
            let id = self.ask_hooks(&r, HookKind::Step, step);
            if let Some(r) = self.rollouts.get_mut(gateway) {
                r.awaiting = Some(Awaiting::StepHooks { id, step, reason });
            }
            return;
        }
        self.set_step(gateway, step, reason);
    }

    /// The operator approves the promotion: a rollout waiting for its confirm-promotion
    /// webhooks is promoted at once; one not there yet will not wait for them.
    pub(super) fn approve(&mut self, gateway: &str) {
        let Some(r) = self.rollouts.get_mut(gateway) else { return };
        r.approved = true;
        self.events.push(gateway, "rollout", "promotion approved by the operator");
        let held = match r.awaiting.clone() {
            Some(Awaiting::Confirm { step, .. }) => Some(step),
            _ => r.held_promotion,
        };
        if let Some(step) = held {
            r.awaiting = None;
            r.held_promotion = None;
            self.set_step(gateway, step, "promotion approved by the operator".into());
        }
        self.unsaved = true;
    }

    /// An answer from outside: recorded as events, then acted on if the rollout waits for it.
    pub fn check_report(&mut self, report: CheckReport) {
        let CheckReport { gateway, id, outcome } = report;
        let Some(r) = self.rollouts.get_mut(&gateway) else { return };
        let awaiting = r.awaiting.clone().filter(|a| a.id() == id);
        if awaiting.is_some() {
            r.awaiting = None;
        }
        let kind = match &awaiting {
            Some(Awaiting::PreRollout { .. }) => "pre-rollout",
            Some(Awaiting::StepHooks { .. }) => "step",
            Some(Awaiting::Confirm { .. }) => "confirm-promotion",
            _ => "notification",
        };
        if let Outcome::Hooks(answers) = &outcome {
            for (url, answer) in answers {
                let message = match answer {
                    Ok(status) => format!("webhook {kind} {url} answered {status}"),
                    Err(e) => format!("webhook {kind} {url} failed: {e}"),
                };
                self.events.push(&gateway, "webhook", message);
            }
        }
        let Some(awaiting) = awaiting else { return };
        let failed_hook = |outcome: &Outcome| match outcome {
            Outcome::Hooks(answers) => answers.iter().find_map(|(url, a)| match a {
                Ok(s) if (200..300).contains(s) => None,
                Ok(s) => Some(format!("{kind} webhook {url} answered {s}")),
                Err(e) => Some(format!("{kind} webhook {url} failed: {e}")),
            }),
            Outcome::Metrics(_) => None,
        };
        self.unsaved = true;
        match awaiting {
            Awaiting::PreRollout { .. } => match failed_hook(&outcome) {
                None => self.set_step(&gateway, 0, "pre-rollout webhooks passed".into()),
                Some(why) => {
                    if let Some(r) = self.rollouts.get_mut(&gateway) {
                        r.rolled_back(format!("{why}: stopped before any weight moved"));
                    }
                    self.events.push(&gateway, "rollout", format!("rolled back: {why}: stopped before any weight moved"));
                    self.notify(&gateway, HookKind::Rollback);
                }
            },
            Awaiting::StepHooks { step, reason, .. } => match failed_hook(&outcome) {
                None => self.set_step(&gateway, step, format!("{reason}; step webhooks passed")),
                Some(why) => self.roll_back_canary(&gateway, why),
            },
            Awaiting::Confirm { step, reason, .. } => match failed_hook(&outcome) {
                None => self.set_step(&gateway, step, format!("{reason}; promotion confirmed by webhook")),
                Some(why) => {
                    let waited = self.rollouts.get_mut(&gateway).map(|r| {
                        r.held_promotion = Some(step);
                        r.waited(&format!("promotion not confirmed: {why} (`splitter canary approve {gateway}` promotes)"), Instant::now())
                    });
                    if let Some(message) = waited {
                        self.events.push(&gateway, "rollout", message);
                    }
                }
            },
            Awaiting::Metrics { step, reason, .. } => {
                let Outcome::Metrics(values) = outcome else { return };
                self.judge_metrics(&gateway, step, reason, values);
            }
        }
    }

    fn judge_metrics(&mut self, gateway: &str, step: usize, reason: String, values: Vec<(String, Result<f64, String>)>) {
        let Some(r) = self.rollouts.get(gateway) else { return };
        if r.state != RolloutState::Progressing {
            return;
        }
        let window = format!("over a {:.1}s window at step {}", r.window_started.elapsed().as_secs_f64(), r.step + 1);
        let mut inconclusive = Vec::new();
        let mut summary = Vec::new();
        for (name, value) in &values {
            let Some(spec) = r.spec.analysis.metrics.iter().find(|m| &m.name == name) else { continue };
            match value {
                Ok(v) => {
                    if let Some(max) = spec.max.filter(|max| *v > max.0) {
                        let why = format!("metric {name} = {v} above its max {} ({}), {window}", max.0, spec.query);
                        return self.roll_back_canary(gateway, why);
                    }
                    if let Some(min) = spec.min.filter(|min| *v < min.0) {
                        let why = format!("metric {name} = {v} below its min {} ({}), {window}", min.0, spec.query);
                        return self.roll_back_canary(gateway, why);
                    }
                    summary.push(format!("{name} = {v}"));
                }
                Err(e) => inconclusive.push(format!("{name}: {e}")),
            }
        }
        let max_inconclusive = r.spec.analysis.max_inconclusive;
        if inconclusive.is_empty() {
            if let Some(r) = self.rollouts.get_mut(gateway) {
                r.inconclusive = 0;
            }
            return self.after_metrics(gateway, step, format!("{reason}; metrics {}", summary.join(", ")));
        }
        let Some(r) = self.rollouts.get_mut(gateway) else { return };
        r.inconclusive += 1;
        let count = r.inconclusive;
        if count > max_inconclusive {
            let why = format!("external metrics inconclusive for {count} windows in a row ({}), {window}", inconclusive.join("; "));
            return self.roll_back_canary(gateway, why);
        }
        let message = r.waited(
            &format!("external metrics inconclusive ({}), {count} of {max_inconclusive} windows allowed", inconclusive.join("; ")),
            Instant::now(),
        );
        self.events.push(gateway, "rollout", message);
    }
}
