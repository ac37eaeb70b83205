//! Operator requests: each planned, committed through [`Controller::commit`], answered
//! with a typed [`Answer`] or an [`ApiError`].

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use log::info;

use super::{
    commit::{History, Planned},
    CanaryOp, Controller, Op,
};
use crate::{
    api::{Answer, ApiError, ExternalEvent, GatewaysAnswer, Info},
    datapath::Dataplane,
    gateway::{self, Document, Gateway, Target, WeightUpdate},
    rollout::RolloutState,
};

impl<D: Dataplane> Controller<D> {
    pub(super) fn dispatch(&mut self, op: Op) -> Result<Answer, ApiError> {
        match op {
            Op::List => Ok(self.list()),
            Op::Get(name) => {
                let g = self.configured.get(&name).ok_or_else(|| ApiError::no_gateway(&name))?;
                Ok(Answer::Gateways(GatewaysAnswer { views: vec![self.view(g)], single: true, ..Default::default() }))
            }
            Op::Apply { origin, text, path_name, validate_only } => {
                let answer = if validate_only {
                    self.validate_text(&origin, &text, path_name.as_deref())?
                } else {
                    self.apply_text(&origin, &text, path_name.as_deref(), None)?
                };
                Ok(match (path_name, answer) {
                    // A PUT names one gateway: its answer is that gateway, changed or not.
                    (Some(name), Answer::Gateways(mut answer)) if answer.views.iter().all(|v| v.gateway.name == name) => {
                        if answer.views.is_empty() {
                            let g = self.configured.get(&name).ok_or_else(|| ApiError::no_gateway(&name))?;
                            answer.views.push(self.view(g));
                        }
                        answer.single = true;
                        Answer::Gateways(answer)
                    }
                    (_, answer) => answer,
                })
            }
            Op::Delete(name) => self.delete(&name).map(|()| Answer::Text(format!("deleted gateway {name}\n"))),
            Op::Promote { gateway, route } => self.promote(&gateway, &route),
            Op::Rollback { gateway, flush } => self.restore_previous_weights(&gateway, flush),
            Op::Stats(name) => self.stats(name.as_deref()).map(Answer::Stats),
            Op::Metrics => self.metrics().map(Answer::Metrics),
            Op::Events { since, tags, event_type } => Ok(Answer::Events(self.events.matching(since, &tags, event_type.as_deref()))),
            Op::RecordEvent { event, origin } => self.record_event(event, &origin),
            Op::Info => Ok(Answer::Info(self.info())),
            Op::SyncConfig => {
                self.sync_config();
                Ok(Answer::Text("configuration synchronised\n".into()))
            }
            Op::Canary(op) => self.canary(op),
            Op::IfRevision { revision, op } => self.if_revision(revision, *op),
        }
    }

    /// Parses documents and applies them all, or none. `owner` marks the gateways as
    /// defined by that configuration file.
    pub(super) fn apply_text(
        &mut self,
        origin: &str,
        text: &str,
        path_name: Option<&str>,
        owner: Option<&Path>,
    ) -> Result<Answer, ApiError> {
        let changed = self.staged(origin, text, path_name)?;
        self.apply_changed(origin, changed, owner)
    }

    /// What applying the documents would do, checked against the datapath like a real
    /// change, with nothing changed: the answer a real apply would give.
    fn validate_text(&mut self, origin: &str, text: &str, path_name: Option<&str>) -> Result<Answer, ApiError> {
        let changed = self.staged(origin, text, path_name)?;
        let plan: Vec<Planned> = changed.iter().cloned().map(|g| self.plan(g)).collect();
        self.check_plan(&plan).map_err(|e| ApiError { message: format!("{origin}: {}", e.message), ..e })?;
        let views = plan.iter().map(|p| self.view(&p.live)).collect();
        let trailer = vec![if changed.is_empty() { "unchanged" } else { "validated only: nothing was changed" }.to_string()];
        Ok(Answer::Gateways(GatewaysAnswer { views, trailer, ..Default::default() }))
    }

    /// The gateways that the documents change, as they would be, built without changing
    /// anything (weights-only documents merged into what is configured).
    fn staged(&self, origin: &str, text: &str, path_name: Option<&str>) -> Result<Vec<Gateway>, ApiError> {
        let documents = gateway::parse_documents(origin, text).map_err(ApiError::invalid)?;
        if documents.is_empty() {
            return Err(ApiError::invalid(format!("{origin}: no gateway document")));
        }
        // The next state of every gateway touched, built without changing anything.
        let mut staged: BTreeMap<String, Gateway> = BTreeMap::new();
        for document in documents {
            let name = document.gateway_name().to_string();
            if let Some(path_name) = path_name.filter(|p| *p != name) {
                return Err(ApiError::invalid(format!("{origin}: name: the document is for gateway {name}, not {path_name}")));
            }
            let next = match document {
                Document::Gateway(g) => g,
                Document::Weights(update) => {
                    let current = staged.get(&name).or_else(|| self.configured.get(&name)).ok_or_else(|| {
                        ApiError::not_found(format!("{origin}: name: no gateway {name} to update (weights-only document)"))
                    })?;
                    current.apply_weights(&update, origin).map_err(|e| ApiError::invalid(e.locate_in(text)))?
                }
            };
            staged.insert(name, next);
        }
        Ok(staged.into_values().filter(|g| self.configured.get(&g.name).is_none_or(|c| !c.same_as(g))).collect())
    }

    fn apply_changed(&mut self, origin: &str, changed: Vec<Gateway>, owner: Option<&Path>) -> Result<Answer, ApiError> {
        // Rollouts running before this change are taken over by it (one it starts is not).
        let running_before: Vec<String> =
            self.rollouts.values().filter(|r| r.state == RolloutState::Progressing).map(|r| r.gateway.clone()).collect();
        let plan: Vec<Planned> = changed.iter().cloned().map(|g| self.plan(g)).collect();
        let starts: Vec<String> = plan.iter().filter(|p| p.rollout.is_some()).map(|p| p.live.name.clone()).collect();
        self.commit(plan, History::Record, &format!("applied from {origin}"))
            .map_err(|e| ApiError { message: format!("{origin}: {}", e.message), ..e })?;
        for g in changed.iter().filter(|g| running_before.contains(&g.name) && !starts.contains(&g.name)) {
            self.pause_rollout_on_manual_change(&g.name);
        }
        if let Some(file) = owner {
            for g in &changed {
                self.from_config.insert(g.name.clone(), file.to_path_buf());
            }
        }
        let views = changed.iter().filter_map(|g| self.configured.get(&g.name)).map(|g| self.view(g)).collect();
        let trailer = if changed.is_empty() { vec!["unchanged".to_string()] } else { Vec::new() };
        Ok(Answer::Gateways(GatewaysAnswer { views, trailer, ..Default::default() }))
    }

    pub(super) fn delete(&mut self, name: &str) -> Result<(), ApiError> {
        if !self.configured.contains_key(name) {
            return Err(ApiError::no_gateway(name));
        }
        self.remove_gateway(name, "gateway deleted")
    }

    /// Takes a gateway out of the datapath and forgets it (its history, rollout, baseline,
    /// the file that defined it), with `event` as the reason.
    pub(super) fn remove_gateway(&mut self, name: &str, event: &str) -> Result<(), ApiError> {
        self.dataplane.remove(name).map_err(|e| ApiError::failed(format!("{e:#}")))?;
        self.configured.remove(name);
        self.history.remove(name);
        self.from_config.remove(name);
        self.baselines.remove(name);
        self.rollouts.remove(name);
        self.events.push(name, "config", event);
        self.update_health_checks();
        self.unsaved = true;
        Ok(())
    }

    /// The canary route takes 100%, every other route 0% (AWS's "promote canary").
    fn promote(&mut self, name: &str, route: &str) -> Result<Answer, ApiError> {
        let current = self.configured.get(name).ok_or_else(|| ApiError::no_gateway(name))?;
        if !current.routes.iter().any(|r| r.name == route) {
            let known: Vec<&str> = current.routes.iter().map(|r| r.name.as_str()).collect();
            return Err(ApiError::not_found(format!("gateway {name} has no route {route} (its routes: {})", known.join(", "))));
        }
        let weights = current.routes.iter().map(|r| (r.name.clone(), if r.name == route { gateway::FULL_WEIGHT } else { 0 })).collect();
        self.manual_weights(name, &weights, "promote", History::Record)
    }

    /// Back to the weights before the last change; `flush` also ends the established
    /// flows of the targets whose share went down.
    fn restore_previous_weights(&mut self, name: &str, flush: bool) -> Result<Answer, ApiError> {
        if !self.configured.contains_key(name) {
            return Err(ApiError::no_gateway(name));
        }
        let previous = self
            .history
            .get(name)
            .and_then(|h| h.last())
            .cloned()
            .ok_or_else(|| ApiError::conflict(format!("gateway {name} has no earlier weights to roll back to")))?;
        let before = self.dataplane.shares(name);
        let mut answer = self.manual_weights(name, &previous, "rollback", History::Skip)?;
        if let Some(history) = self.history.get_mut(name) {
            history.pop();
        }
        if !flush {
            return Ok(answer);
        }
        let after = self.dataplane.shares(name);
        let lost: Vec<Target> =
            before.iter().filter(|(t, share)| after.iter().find(|(a, _)| a == t).is_none_or(|(_, s)| s < share)).map(|(t, _)| *t).collect();
        let flows =
            self.dataplane.flush_flows(name, &lost).map_err(|e| ApiError::failed(format!("rolled back, but flushing failed: {e:#}")))?;
        info!("rollback of {name}: flushed {flows} established flow(s) from targets that lost weight");
        if let Answer::Gateways(g) = &mut answer {
            g.trailer.push(format!("flushed {flows} established flow(s)"));
        }
        Ok(answer)
    }

    /// A weight change by hand: committed, then it takes over from a running rollout.
    fn manual_weights(&mut self, name: &str, weights: &BTreeMap<String, u32>, origin: &str, history: History) -> Result<Answer, ApiError> {
        let current = self.configured.get(name).ok_or_else(|| ApiError::no_gateway(name))?;
        let update = WeightUpdate { name: name.to_string(), weights: weights.iter().map(|(r, w)| (r.clone(), Some(*w))).collect() };
        let next = current.apply_weights(&update, origin).map_err(ApiError::invalid)?;
        self.commit(vec![Planned::plain(next)], history, origin)?;
        self.pause_rollout_on_manual_change(name);
        let g = &self.configured[name];
        Ok(Answer::Gateways(GatewaysAnswer { views: vec![self.view(g)], single: true, ..Default::default() }))
    }

    /// A manual weight change takes over from a running rollout.
    fn pause_rollout_on_manual_change(&mut self, gateway: &str) {
        if let Some(r) = self.rollouts.get_mut(gateway) {
            if r.pause("paused: the weights were changed by hand").is_ok() {
                self.events.push(gateway, "rollout", "paused: the weights were changed by hand");
                self.unsaved = true;
            }
        }
    }

    fn canary(&mut self, op: CanaryOp) -> Result<Answer, ApiError> {
        let no_rollout = |g: &str| ApiError::not_found(format!("no rollout for gateway {g}"));
        match op {
            CanaryOp::Start { gateway, spec } => {
                let g = self.configured.get(&gateway).ok_or_else(|| ApiError::no_gateway(&gateway))?;
                let (live, rollout) = self.rollout_for(g, spec)?;
                let plan = Planned { live, rollout: Some(rollout), not_started: None };
                self.commit(vec![plan], History::Skip, "canary start")?;
            }
            CanaryOp::Status(name) => {
                let rollouts: Vec<_> = self.rollouts.values().filter(|r| name.as_ref().is_none_or(|n| &r.gateway == n)).cloned().collect();
                if let (Some(n), true) = (&name, rollouts.is_empty()) {
                    return Err(no_rollout(n));
                }
                return Ok(Answer::Rollouts(rollouts));
            }
            CanaryOp::Pause(g) => {
                let r = self.rollouts.get_mut(&g).ok_or_else(|| no_rollout(&g))?;
                r.pause("paused by the operator").map_err(ApiError::conflict)?;
                self.events.push(&g, "rollout", "paused by the operator");
                self.unsaved = true;
            }
            CanaryOp::Resume(g) => {
                let route = self.rollouts.get(&g).ok_or_else(|| no_rollout(&g))?.spec.route.clone();
                let base = self.sample(&g, &route);
                let r = self.rollouts.get_mut(&g).ok_or_else(|| no_rollout(&g))?;
                r.resume(base, std::time::Instant::now()).map_err(ApiError::conflict)?;
                self.events.push(&g, "rollout", "resumed by the operator");
                self.unsaved = true;
            }
            CanaryOp::Abort(g) => {
                if !self.rollouts.contains_key(&g) {
                    return Err(no_rollout(&g));
                }
                self.roll_back_canary(&g, "aborted by the operator".into());
            }
            CanaryOp::Approve(g) => {
                if !self.rollouts.contains_key(&g) {
                    return Err(no_rollout(&g));
                }
                self.approve(&g);
            }
            CanaryOp::Promote(g) => {
                let r = self.rollouts.get(&g).ok_or_else(|| no_rollout(&g))?;
                let last = r.spec.steps.len() - 1;
                self.set_step(&g, last, "promoted by the operator".into());
            }
        }
        Ok(Answer::Rollouts(self.rollouts.values().cloned().collect()))
    }

    /// Records a client's event (bounded in size and rate).
    fn record_event(&mut self, event: ExternalEvent, origin: &str) -> Result<Answer, ApiError> {
        event.check().map_err(ApiError::invalid)?;
        if !self.event_budget.take(Instant::now()) {
            return Err(ApiError::too_many(format!(
                "more than {} external events a second: try again later",
                super::EventBudget::PER_SECOND
            )));
        }
        self.events.push_external(event, origin);
        let recorded = self.events.all().last().cloned().into_iter().collect();
        Ok(Answer::Events(recorded))
    }

    fn info(&self) -> Info {
        let uptime = Duration::from_secs(self.started.elapsed().as_secs());
        let started = SystemTime::now() - self.started.elapsed();
        Info {
            name: "splitter".into(),
            message: "splitter agent: XDP canary traffic splitter".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: humantime::format_rfc3339_seconds(started).to_string(),
            uptime: humantime::format_duration(uptime).to_string(),
            uptime_seconds: uptime.as_secs(),
            gateways: self.configured.len(),
            program_id: self.settings.program_id,
            build: self.settings.build.clone(),
            layout: splitter_common::LAYOUT_VERSION,
            store: self.store_info(),
        }
    }
}
