//! A change to the running configuration, all or nothing: planned without touching
//! anything, applied to the datapath (put back as it was if any map write fails), and only
//! then given its effects: the configuration, weight history, events, rollouts started by
//! the change, health checks, and (after the request) one save.

use std::time::Instant;

use log::error;

use super::{weights_of, Controller, HISTORY_DEPTH};
use crate::{
    api::ApiError,
    datapath::{describe_weights, Dataplane},
    gateway::{policy::HookKind, Gateway, WeightUpdate},
    rollout::{Awaiting, Rollout},
};

/// The HTTP 5xx rate a canary of an HTTP gateway may show unless its spec says otherwise
/// (hundredths of a percent: 5%, Flagger's default request-success rate of 95%).
pub const DEFAULT_MAX_HTTP_ERROR_RATE: u32 = 500;

/// One gateway's next state in a change.
pub(super) struct Planned {
    /// What goes live (for a rollout starting with the change: at its first step).
    pub live: Gateway,
    /// A rollout this change starts, with the weights it rolls back to.
    pub rollout: Option<Rollout>,
    /// Why a canary block of the document starts no rollout (an event, not a refusal).
    pub not_started: Option<String>,
}

impl Planned {
    pub fn plain(live: Gateway) -> Self {
        Self { live, rollout: None, not_started: None }
    }
}

/// Whether the weights a change replaces go into the history (`rollback` returns to them).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum History {
    Record,
    Skip,
}

impl<D: Dataplane> Controller<D> {
    /// The plan for a gateway document: when it brings a new canary block, the rollout it
    /// starts and the gateway at the rollout's first step.
    pub(super) fn plan(&self, gateway: Gateway) -> Planned {
        let before = self.configured.get(&gateway.name);
        let Some(spec) = gateway.canary.clone() else { return Planned::plain(gateway) };
        if before.is_some_and(|b| b.canary.as_ref() == Some(&spec)) {
            return Planned::plain(gateway);
        }
        match self.rollout_for(&gateway, spec) {
            Ok((live, rollout)) => Planned { live, rollout: Some(rollout), not_started: None },
            Err(e) => Planned { live: gateway, rollout: None, not_started: Some(e.message) },
        }
    }

    /// A rollout of `gateway` by `spec` and the gateway at its first step; refused when
    /// the spec does not fit the gateway or a rollout of it is already under way.
    pub(super) fn rollout_for(&self, gateway: &Gateway, spec: crate::gateway::policy::CanarySpec) -> Result<(Gateway, Rollout), ApiError> {
        spec.check().map_err(|p| ApiError::invalid(format!("canary.{}: {}", p.field, p.message)))?;
        let name = &gateway.name;
        if !gateway.routes.iter().any(|r| r.name == spec.route) {
            let known: Vec<&str> = gateway.routes.iter().map(|r| r.name.as_str()).collect();
            return Err(ApiError::not_found(format!("gateway {name} has no route {} (its routes: {})", spec.route, known.join(", "))));
        }
        if gateway.routes.len() < 2 {
            return Err(ApiError::conflict(format!("gateway {name} has no other route to fall back to")));
        }
        if let Some(r) = self.rollouts.get(name).filter(|r| r.is_active()) {
            return Err(ApiError::conflict(format!("a rollout of {name} is already {} (abort it first)", r.state.name())));
        }
        let mut spec = spec;
        if gateway.protocol == crate::gateway::Protocol::Http && spec.thresholds.max_http_error_rate.is_none() {
            // HTTP gateways judge their responses too, by default.
            spec.thresholds.max_http_error_rate = Some(DEFAULT_MAX_HTTP_ERROR_RATE);
        }
        let mut rollout = Rollout::new(name, spec, weights_of(Some(gateway)), Instant::now());
        rollout.signals = gateway.unseen_signals().map(str::to_owned);
        if rollout.spec.analysis.webhooks.iter().any(|w| w.kind == HookKind::PreRollout) {
            // Nothing moves before the pre-rollout webhooks pass.
            let mut rollout = rollout;
            rollout.entered = false;
            return Ok((gateway.clone(), rollout));
        }
        let live = with_weights(gateway, &rollout.weights_at(&route_names(gateway), 0), "canary step 1")?;
        Ok((live, rollout))
    }

    /// Makes the planned gateways live, all or none; on success gives the change its
    /// effects. `reason` goes into the weight events.
    pub(super) fn commit(&mut self, plan: Vec<Planned>, history: History, reason: &str) -> Result<(), ApiError> {
        self.check_plan(&plan)?;
        let batch: Vec<Gateway> = plan.iter().map(|p| p.live.clone()).collect();
        let mut switched: Vec<&Gateway> = Vec::new();
        for g in &batch {
            if let Err(e) = self.dataplane.apply(g, &self.shares(g)) {
                self.put_back(&switched);
                return Err(ApiError::conflict(format!("{e:#}")));
            }
            switched.push(g);
        }
        let now = Instant::now();
        for planned in plan {
            self.take_effect(planned, history, reason, now);
        }
        self.update_health_checks();
        self.unsaved = true;
        Ok(())
    }

    /// Whether the datapath would take every planned gateway, changing nothing.
    pub(super) fn check_plan(&self, plan: &[Planned]) -> Result<(), ApiError> {
        let batch: Vec<Gateway> = plan.iter().map(|p| p.live.clone()).collect();
        for g in &batch {
            self.dataplane.check(g, &self.shares(g), &batch).map_err(|e| ApiError::conflict(format!("{e:#}")))?;
        }
        Ok(())
    }

    /// After a failed map write: the gateways already switched go back to what is
    /// configured (nothing of the change was recorded anywhere else yet).
    fn put_back(&mut self, switched: &[&Gateway]) {
        for g in switched.iter().rev() {
            let restored = match self.configured.get(&g.name) {
                Some(previous) => self.dataplane.apply(previous, &self.shares(previous)).map(drop),
                None => self.dataplane.remove(&g.name),
            };
            if let Err(e) = restored {
                error!("could not restore gateway {} after a failed change: {e:#}", g.name);
            }
        }
    }

    fn take_effect(&mut self, planned: Planned, history: History, reason: &str, now: Instant) {
        let Planned { live, rollout, not_started } = planned;
        let name = live.name.clone();
        let before = self.configured.insert(name.clone(), live.clone());
        if let Some(why) = not_started {
            self.events.push(&name, "rollout", format!("not started: {why}"));
        }
        // The document's own weights, before a rollout starting with it moved them.
        let document_weights = rollout.as_ref().map(|r| r.stable_weights.clone());
        let weights_changed = weights_of(before.as_ref()) != weights_of(Some(&live));
        if history == History::Record {
            if let Some(previous) = &before {
                if document_weights.as_ref().unwrap_or(&weights_of(Some(&live))) != &weights_of(Some(previous)) {
                    self.push_history(&name, weights_of(Some(previous)));
                }
            }
        }
        if let Some(mut rollout) = rollout {
            // What a manual `rollback` returns to: the weights before the rollout.
            self.push_history(&name, rollout.stable_weights.clone());
            self.events.push(&name, "rollout", rollout.started_message());
            if !rollout.entered {
                let id = self.ask_hooks(&rollout, HookKind::PreRollout, 0);
                rollout.awaiting = Some(Awaiting::PreRollout { id });
                rollout.reason = "waiting for the pre-rollout webhooks".into();
                self.events.push(&name, "rollout", "waiting for the pre-rollout webhooks before the first step");
                self.rollouts.insert(name, rollout);
                return;
            }
            self.events.push(
                &name,
                "weights",
                format!("{} ({reason}, canary step 1/{})", describe_weights(&live), rollout.spec.steps.len()),
            );
            self.reset_baseline(&name);
            let base = self.sample(&name, &rollout.spec.route);
            let message = rollout.entered(0, "first step".into(), base, now);
            self.events.push(&name, "rollout", message);
            self.rollouts.insert(name, rollout);
            return;
        }
        if weights_changed {
            self.reset_baseline(&name);
            self.events.push(&name, "weights", format!("{} ({reason})", describe_weights(&live)));
        }
    }

    fn push_history(&mut self, name: &str, weights: std::collections::BTreeMap<String, u32>) {
        let history = self.history.entry(name.to_string()).or_default();
        history.push(weights);
        if history.len() > HISTORY_DEPTH {
            history.remove(0);
        }
    }
}

/// The route names of a gateway, in its order.
pub(super) fn route_names(g: &Gateway) -> Vec<String> {
    g.routes.iter().map(|r| r.name.clone()).collect()
}

/// `g` with every route at the given weight.
pub(super) fn with_weights(g: &Gateway, weights: &std::collections::BTreeMap<String, u32>, origin: &str) -> Result<Gateway, ApiError> {
    let update = WeightUpdate { name: g.name.clone(), weights: weights.iter().map(|(r, w)| (r.clone(), Some(*w))).collect() };
    g.apply_weights(&update, origin).map_err(ApiError::invalid)
}
