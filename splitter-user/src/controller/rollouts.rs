//! Carrying out what rollouts want ([`Intent`]): a step's weights, a rollback, a wait;
//! each weight change through [`Controller::commit`], so a failed one changes nothing.

use std::{collections::BTreeMap, time::Instant};

use log::warn;

use super::{
    commit::{route_names, with_weights, History, Planned},
    Controller,
};
use crate::{
    api::GatewayStats,
    cluster::{self, NodeCounters, RouteCounters},
    datapath::Dataplane,
    gateway::{policy::HookKind, Target},
    rollout::{step_weights, Intent, Rollout, RolloutState, Sample},
};

impl<D: Dataplane> Controller<D> {
    /// The counters the analysis compares, now: this node's, and with a store every other
    /// node's as published.
    pub(super) fn sample(&self, gateway: &str, canary_route: &str) -> Sample {
        let mut s = Sample::default();
        let stats = self.dataplane.stats().unwrap_or_default();
        let local = NodeCounters::from([(gateway.to_string(), self.route_counters(gateway, &stats))]);
        cluster::add_counters(&mut s, &local, gateway, canary_route);
        self.add_other_nodes(&mut s, gateway, canary_route);
        s
    }

    /// This node's counters of `gateway` by route: what the datapath counted for each
    /// target, and the failed health checks of each configured route.
    pub(super) fn route_counters(&self, gateway: &str, stats: &[GatewayStats]) -> BTreeMap<String, RouteCounters> {
        let mut routes: BTreeMap<String, RouteCounters> = BTreeMap::new();
        for t in stats.iter().filter(|g| g.name == gateway).flat_map(|g| &g.targets) {
            let c = routes.entry(t.route.clone()).or_default();
            c.flows += t.new_flows;
            c.resets += t.resets_from_target;
            c.failed_connects += t.failed_connects;
            c.http_responses += t.http_responses.iter().sum::<u64>();
            c.http_5xx += t.http_responses[4];
            c.connects += t.connects;
            c.connect_ns += t.connect_ns_total;
        }
        for route in self.configured.get(gateway).into_iter().flat_map(|g| &g.routes) {
            routes.entry(route.name.clone()).or_default().failed_checks = self.health.failed_checks(gateway, &route.targets);
        }
        routes
    }

    pub(super) fn route_targets(&self, gateway: &str, route: &str) -> Vec<Target> {
        self.configured
            .get(gateway)
            .map(|g| g.routes.iter().filter(|r| r.name == route).flat_map(|r| r.targets.clone()).collect())
            .unwrap_or_default()
    }

    /// The gateway and canary route of every progressing rollout.
    pub(super) fn progressing_rollouts(&self) -> Vec<(String, String)> {
        self.rollouts.values().filter(|r| r.state == RolloutState::Progressing).map(|r| (r.gateway.clone(), r.spec.route.clone())).collect()
    }

    /// Judges every progressing rollout and carries out what each wants.
    pub(super) fn advance_rollouts(&mut self, now: Instant) {
        for (gateway, route) in self.progressing_rollouts() {
            let sample = self.sample(&gateway, &route);
            let Some(r) = self.rollouts.get_mut(&gateway) else { continue };
            match r.judge(&sample, now) {
                Intent::Hold => {}
                Intent::Wait(why) => {
                    let message = r.waited(&why, now);
                    self.events.push(&gateway, "rollout", message);
                    self.unsaved = true;
                }
                Intent::Step { step, reason } => self.try_step(&gateway, step, reason),
                Intent::RollBack(reason) => self.roll_back_canary(&gateway, reason),
            }
        }
    }

    /// Moves the canary to `step` (the last step promotes); if its weights cannot be
    /// applied, the rollout rolls back.
    pub(super) fn set_step(&mut self, gateway: &str, step: usize, reason: String) {
        let (Some(r), Some(g)) = (self.rollouts.get(gateway), self.configured.get(gateway)) else { return };
        let (count, route) = (r.spec.steps.len(), r.spec.route.clone());
        let next = with_weights(g, &r.weights_at(&route_names(g), step), "canary step");
        let applied =
            next.and_then(|next| self.commit(vec![Planned::plain(next)], History::Skip, &format!("canary step {}/{count}", step + 1)));
        if let Err(e) = applied {
            self.roll_back_canary(gateway, format!("the weights of step {} could not be applied: {e}", step + 1));
            return;
        }
        let base = self.sample(gateway, &route);
        let mut promoted = false;
        if let Some(r) = self.rollouts.get_mut(gateway) {
            let message = r.entered(step, reason, base, Instant::now());
            promoted = r.state == RolloutState::Promoted;
            self.events.push(gateway, "rollout", message);
        }
        self.unsaved = true;
        if promoted {
            self.notify(gateway, HookKind::PostRollout);
        }
    }

    /// Back to the stable routes at once: the canary at 0%, its flows flushed if asked.
    pub(super) fn roll_back_canary(&mut self, gateway: &str, reason: String) {
        let (Some(r), Some(g)) = (self.rollouts.get(gateway), self.configured.get(gateway)) else { return };
        let (canary, flush) = (r.spec.route.clone(), r.spec.thresholds.flush_on_rollback);
        // Back to exactly the weights before the rollout (the canary at its old weight, as Argo
        // Rollouts' abort does), unless the routes changed since.
        let routes = route_names(g);
        let exact = routes.iter().all(|n| r.stable_weights.contains_key(n)) && r.stable_weights.len() == routes.len();
        let weights = if exact { r.stable_weights.clone() } else { step_weights(&routes, &canary, 0, &r.stable_weights) };
        let next = with_weights(g, &weights, "canary rolled back");
        let applied = next.and_then(|next| self.commit(vec![Planned::plain(next)], History::Skip, "canary rolled back"));
        let mut message = format!("rolled back: {reason}");
        match applied {
            Err(e) => message.push_str(&format!(" (the stable weights could not be applied: {e})")),
            Ok(()) if flush => {
                let targets = self.route_targets(gateway, &canary);
                match self.dataplane.flush_flows(gateway, &targets) {
                    Ok(n) => message.push_str(&format!("; {n} canary flow(s) flushed")),
                    Err(e) => message.push_str(&format!("; flushing failed: {e:#}")),
                }
            }
            Ok(()) => {}
        }
        if let Some(r) = self.rollouts.get_mut(gateway) {
            r.awaiting = None;
            r.rolled_back(reason);
        }
        self.events.push(gateway, "rollout", message);
        self.unsaved = true;
        self.notify(gateway, HookKind::Rollback);
    }

    /// Takes up the saved rollouts of restored gateways where they were: a progressing one
    /// judges a fresh window at its step (the counters before the restart are not
    /// compared), a paused one waits for the operator.
    pub(super) fn restore_rollouts(&mut self, saved: &[Rollout]) {
        for rollout in saved {
            let Some(g) = self.configured.get(&rollout.gateway) else {
                warn!("saved rollout of {} not restored: the gateway was not restored", rollout.gateway);
                continue;
            };
            if !g.routes.iter().any(|r| r.name == rollout.spec.route) {
                warn!("saved rollout of {} not restored: no route {}", rollout.gateway, rollout.spec.route);
                continue;
            }
            let mut r = rollout.clone();
            r.window_started = Instant::now();
            r.window_base = self.sample(&r.gateway, &r.spec.route);
            if r.is_active() {
                let count = r.spec.steps.len();
                self.events.push(
                    &r.gateway,
                    "rollout",
                    format!("taken up after an agent restart: {} at step {}/{count}", r.state.name(), r.step + 1),
                );
            }
            self.rollouts.insert(r.gateway.clone(), r);
        }
    }
}
