//! The agent's control logic, run by the one thread that owns the datapath: applies
//! gateway documents all-or-nothing, keeps weight history for rollback, follows the
//! configuration files, saves state, and answers stats and metrics.
//!
//! Requests arrive one at a time over a channel (from the control socket, signals, the
//! config watcher and timers), so no two changes ever interleave.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use splitter_common::conntrack::Timeouts;
use tokio::sync::oneshot;

use crate::{
    canary::{self, Rollout, RolloutState, Sample, Verdict},
    datapath::{describe_weights, Datapath, GatewayStats, Placement},
    events::EventLog,
    gateway::{self, policy::CanarySpec, ConfigError, Document, Gateway, Target, WeightUpdate},
    health::{CheckSpec, HealthBook, Transition},
    metrics,
};

/// How often the service thread wakes for timed work (canary analysis).
const TICK: Duration = Duration::from_millis(250);
/// Conntrack expiry runs every this many ticks (2 s).
const SWEEP_EVERY_TICKS: u32 = 8;

/// Weight sets remembered per gateway for `rollback`.
const HISTORY_DEPTH: usize = 32;

/// A request to the service.
pub enum Request {
    List,
    Get(String),
    /// Gateway documents (full or weights-only) from `origin`; with `path_name`, the
    /// documents must all be for that gateway (a PUT to its path).
    Apply { origin: String, text: String, path_name: Option<String> },
    Delete(String),
    Promote { gateway: String, route: String },
    Rollback { gateway: String, flush: bool },
    Stats(Option<String>),
    Metrics,
    /// Re-read the configuration path (SIGHUP, or a change seen by the watcher).
    SyncConfig,
    /// One health check's result.
    HealthResult { gateway: String, target: Target, result: Result<(), String> },
    /// Events after this id.
    Events { since: u64 },
    Canary(CanaryRequest),
}

pub enum CanaryRequest {
    Start { gateway: String, spec: CanarySpec },
    Status(Option<String>),
    Pause(String),
    Resume(String),
    Abort(String),
    Promote(String),
}

/// What a request produced.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Something the operator must know although the request succeeded (one line), e.g.
    /// that a change is live but could not be saved; sent as the `x-splitter-warning`
    /// header, printed by the CLI on stderr.
    pub warning: Option<String>,
}

impl Response {
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Self { status: 200, content_type, body, warning: None }
    }
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        // One line, as on the command line.
        Self { status, content_type: "text/plain", body: format!("{message}\n"), warning: None }
    }
}

pub struct Command {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
    /// Wants JSON rather than YAML.
    pub json: bool,
}

/// What survives an agent restart (saved atomically in the state directory).
#[derive(Default, Serialize, Deserialize)]
pub struct SavedState {
    /// Every applied gateway, as a document.
    pub gateways: Vec<String>,
    /// Where each gateway lives in the maps (ids, table buffers, counter slots).
    pub placements: BTreeMap<String, Placement>,
    /// Earlier weight sets per gateway, newest last (hundredths of a percent by route).
    pub history: BTreeMap<String, Vec<BTreeMap<String, u32>>>,
    /// Gateways defined by configuration files, and the file.
    pub from_config: BTreeMap<String, PathBuf>,
    /// Canary rollouts, running or ended (absent in states saved before rollouts were).
    #[serde(default)]
    pub rollouts: Vec<Rollout>,
    /// The text of each configuration file when it was last applied: a restarted agent
    /// re-applies only files edited since, so it keeps what a rollout did to the others.
    #[serde(default)]
    pub applied_files: BTreeMap<PathBuf, String>,
}

pub struct Service {
    datapath: Datapath,
    /// The gateways as configured (what `get` shows); the datapath holds them with the
    /// shares health allows.
    configured: BTreeMap<String, Gateway>,
    health: HealthBook,
    health_checks: Option<tokio::sync::mpsc::UnboundedSender<Vec<CheckSpec>>>,
    rollouts: BTreeMap<String, Rollout>,
    events: EventLog,
    state_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    timeouts: Timeouts,
    history: BTreeMap<String, Vec<BTreeMap<String, u32>>>,
    /// Gateways defined by configuration files, and the file that defines each.
    from_config: BTreeMap<String, PathBuf>,
    /// Configuration files that failed to load, with their one-line error.
    config_errors: BTreeMap<PathBuf, String>,
    /// The text of each configuration file when it was last applied.
    applied_texts: BTreeMap<PathBuf, String>,
    /// Per-target new-flow counts when each gateway's current weights took effect, for
    /// the observed share since then.
    baselines: BTreeMap<String, BTreeMap<String, u64>>,
    /// Why the last save of the state failed, while the running state is not saved (the
    /// save is retried on every change and every few seconds).
    state_error: Option<String>,
    /// Failed saves of the state since the agent started.
    state_save_errors: u64,
    /// A warning for the response to the request being handled.
    pending_warning: Option<String>,
    program_id: u32,
    started: Instant,
}

impl Service {
    pub fn new(datapath: Datapath, state_dir: Option<PathBuf>, config: Option<PathBuf>, timeouts: Timeouts, program_id: u32) -> Self {
        Self {
            datapath,
            configured: BTreeMap::new(),
            health: HealthBook::default(),
            health_checks: None,
            rollouts: BTreeMap::new(),
            events: EventLog::default(),
            state_dir,
            config,
            timeouts,
            history: BTreeMap::new(),
            from_config: BTreeMap::new(),
            config_errors: BTreeMap::new(),
            applied_texts: BTreeMap::new(),
            baselines: BTreeMap::new(),
            state_error: None,
            state_save_errors: 0,
            pending_warning: None,
            program_id,
            started: Instant::now(),
        }
    }

    /// Where health-check updates go (the checker task in the agent's runtime).
    pub fn set_health_checks(&mut self, sender: tokio::sync::mpsc::UnboundedSender<Vec<CheckSpec>>) {
        self.health_checks = Some(sender);
        self.update_health_checks();
    }

    /// Restores the saved gateways: adopted as they are when the pinned datapath still
    /// holds them (`adopting`), applied otherwise; plus history and config ownership.
    pub fn restore(&mut self, saved: &SavedState, adopting: bool) -> Result<()> {
        // Each saved gateway on its own: one that no longer parses (say, a name an older
        // agent accepted) is reported and left out, the others are restored.
        let mut gateways = Vec::new();
        for text in &saved.gateways {
            match saved_gateways(&SavedState { gateways: vec![text.clone()], ..SavedState::default() }) {
                Ok(g) => gateways.extend(g),
                Err(e) => warn!("saved gateway not restored: {e:#}"),
            }
        }
        for gateway in gateways {
            let shares = gateway.weighted_targets();
            let adopted = adopting
                && saved.placements.get(&gateway.name).is_some_and(|p| self.datapath.adopt(&gateway, &shares, p));
            if !adopted {
                if let Err(e) = self.datapath.apply(&gateway, &shares) {
                    warn!("saved gateway {} not restored: {e:#}", gateway.name);
                    continue;
                }
            }
            self.configured.insert(gateway.name.clone(), gateway);
        }
        self.history = saved.history.clone();
        self.from_config = saved.from_config.clone();
        self.applied_texts = saved.applied_files.clone();
        self.update_health_checks();
        self.restore_rollouts(&saved.rollouts);
        Ok(())
    }

    /// Takes up the saved rollouts of restored gateways where they were: a progressing one
    /// judges a fresh window at its step (the counters before the restart are not
    /// compared), a paused one waits for the operator.
    fn restore_rollouts(&mut self, saved: &[Rollout]) {
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
            if matches!(r.state, RolloutState::Progressing | RolloutState::Paused) {
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

    /// Serves requests until every sender is gone; timed work on every tick.
    pub fn run(mut self, commands: mpsc::Receiver<Command>) {
        let mut next_tick = Instant::now() + TICK;
        let mut ticks = 0u32;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match commands.recv_timeout(wait) {
                Ok(cmd) => {
                    self.pending_warning = None;
                    let mut response = self.handle(cmd.request, cmd.json);
                    if let Some(warning) = self.pending_warning.take() {
                        response.warning = Some(warning);
                    }
                    let _ = cmd.reply.send(response);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    next_tick = Instant::now() + TICK;
                    ticks = ticks.wrapping_add(1);
                    self.advance_rollouts();
                    if ticks.is_multiple_of(SWEEP_EVERY_TICKS) {
                        if let Err(e) = self.datapath.sweep_conntrack(&self.timeouts) {
                            warn!("conntrack sweep: {e:#}");
                        }
                        if self.state_error.is_some() {
                            self.save();
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    pub fn handle(&mut self, request: Request, json: bool) -> Response {
        match request {
            Request::List => self.list(json),
            Request::Get(name) => match self.configured.get(&name) {
                Some(g) => self.render(std::slice::from_ref(g), json, false),
                None => Response::error(404, format!("no gateway {name}")),
            },
            Request::Apply { origin, text, path_name } => self.apply_text(&origin, &text, path_name.as_deref(), None),
            Request::Delete(name) => self.delete(&name),
            Request::Promote { gateway, route } => self.promote(&gateway, &route),
            Request::Rollback { gateway, flush } => self.rollback(&gateway, flush),
            Request::Stats(name) => self.stats(name.as_deref()),
            Request::Metrics => self.metrics(),
            Request::SyncConfig => {
                self.sync_config();
                Response::ok("text/plain", "configuration synchronised\n".into())
            }
            Request::HealthResult { gateway, target, result } => {
                self.health_result(&gateway, target, result);
                Response::ok("text/plain", String::new())
            }
            Request::Events { since } => {
                Response::ok("application/json", serde_json::to_string(&self.events.since(since)).unwrap_or_default())
            }
            Request::Canary(request) => self.canary(request),
        }
    }

    fn list(&self, json: bool) -> Response {
        let gateways: Vec<Gateway> = self.configured.values().cloned().collect();
        let mut response = self.render(&gateways, json, true);
        if !json && (!self.config_errors.is_empty() || self.state_error.is_some()) {
            let mut notes = String::new();
            for (file, err) in &self.config_errors {
                notes.push_str(&format!("# configuration file {} not applied: {err}\n", file.display()));
            }
            if let (Some(err), Some(dir)) = (&self.state_error, &self.state_dir) {
                notes.push_str(&format!(
                    "# state not saved in {}: {err}; an agent restarted now would come back with the last saved state\n",
                    dir.display()
                ));
            }
            response.body = notes + &response.body;
        }
        response
    }

    /// Parses documents and applies them all, or none. `owner` marks the gateways as
    /// defined by that configuration file.
    fn apply_text(&mut self, origin: &str, text: &str, path_name: Option<&str>, owner: Option<&Path>) -> Response {
        let documents = match gateway::parse_documents(origin, text) {
            Ok(d) => d,
            Err(e) => return Response::error(400, e),
        };
        if documents.is_empty() {
            return Response::error(400, format!("{origin}: no gateway document"));
        }
        // The next state of every gateway touched, built without changing anything.
        let mut staged: BTreeMap<String, Gateway> = BTreeMap::new();
        for document in documents {
            let name = document.gateway_name().to_string();
            if let Some(path_name) = path_name {
                if name != path_name {
                    return Response::error(400, format!("{origin}: name: the document is for gateway {name}, not {path_name}"));
                }
            }
            let next = match document {
                Document::Gateway(g) => g,
                Document::Weights(update) => {
                    let Some(current) = staged.get(&name).or_else(|| self.configured.get(&name)) else {
                        return Response::error(404, format!("{origin}: name: no gateway {name} to update (weights-only document)"));
                    };
                    match current.apply_weights(&update, origin) {
                        Ok(g) => g,
                        Err(e) => return Response::error(400, e.locate_in(text)),
                    }
                }
            };
            staged.insert(name, next);
        }
        let changed: Vec<Gateway> =
            staged.into_values().filter(|g| self.configured.get(&g.name) != Some(g)).collect();
        // Rollouts running before this change are taken over by it (a rollout this very
        // document starts is not).
        let running_before: Vec<String> = self
            .rollouts
            .values()
            .filter(|r| r.state == RolloutState::Progressing)
            .map(|r| r.gateway.clone())
            .collect();
        if let Err(e) = self.commit(&changed, true, &format!("applied from {origin}")) {
            return Response::error(409, format!("{origin}: {e:#}"));
        }
        for g in changed.iter().filter(|g| running_before.contains(&g.name)) {
            self.pause_rollout_on_manual_change(&g.name);
        }
        if let Some(file) = owner {
            for g in &changed {
                self.from_config.insert(g.name.clone(), file.to_path_buf());
            }
        }
        self.save();
        let applied: Vec<String> = changed.iter().map(|g| g.name.clone()).collect();
        let gateways: Vec<Gateway> = applied.iter().filter_map(|n| self.configured.get(n).cloned()).collect();
        let mut response = self.render(&gateways, false, true);
        if applied.is_empty() {
            response.body = "# unchanged\n".into();
        }
        response
    }

    /// The shares of `gateway`'s targets, with unhealthy targets at 0.
    fn shares(&self, gateway: &Gateway) -> Vec<(Target, u32)> {
        gateway.shares_with_health(|t| self.health.is_healthy(&gateway.name, t))
    }

    /// Makes `gateways` the configuration, all or none: every one is checked against the
    /// datapath first; if a map write still fails, the ones already switched are put back.
    fn commit(&mut self, gateways: &[Gateway], record_history: bool, reason: &str) -> Result<()> {
        for g in gateways {
            self.datapath.check(g, &self.shares(g), gateways)?;
        }
        let mut done: Vec<(String, Option<Gateway>)> = Vec::new();
        for g in gateways {
            let before = self.configured.get(&g.name).cloned();
            if let Err(e) = self.datapath.apply(g, &self.shares(g)) {
                for (name, previous) in done.into_iter().rev() {
                    let restored = match &previous {
                        Some(p) => self.datapath.apply(p, &self.shares(p)).map(drop),
                        None => self.datapath.remove(&name),
                    };
                    match previous {
                        Some(p) => {
                            self.configured.insert(name.clone(), p);
                        }
                        None => {
                            self.configured.remove(&name);
                        }
                    }
                    if let Err(r) = restored {
                        error!("could not restore gateway {name} after a failed change: {r:#}");
                    }
                }
                return Err(e);
            }
            self.configured.insert(g.name.clone(), g.clone());
            if weights_of(before.as_ref()) != weights_of(Some(g)) {
                if let (true, Some(previous)) = (record_history, before.as_ref()) {
                    let history = self.history.entry(g.name.clone()).or_default();
                    history.push(weights_of(Some(previous)));
                    if history.len() > HISTORY_DEPTH {
                        history.remove(0);
                    }
                }
                self.reset_baseline(&g.name);
                self.events.push(&g.name, "weights", format!("{} ({reason})", describe_weights(g)));
            }
            if g.canary.is_some() && before.as_ref().map(|b| &b.canary) != Some(&g.canary) {
                if let Some(spec) = g.canary.clone() {
                    let name = g.name.clone();
                    if let Err(e) = self.start_rollout(&name, spec) {
                        self.events.push(&name, "rollout", format!("not started: {e:#}"));
                    }
                }
            }
            done.push((g.name.clone(), before));
        }
        self.update_health_checks();
        Ok(())
    }

    /// Re-applies a gateway with the shares its targets' health allows now.
    fn refresh(&mut self, name: &str) {
        let Some(g) = self.configured.get(name).cloned() else { return };
        if let Err(e) = self.datapath.apply(&g, &self.shares(&g)) {
            error!("gateway {name}: applying the health-adjusted shares failed: {e:#}");
        }
    }

    /// Tells the checker which targets to check.
    fn update_health_checks(&mut self) {
        let specs: Vec<CheckSpec> = self
            .configured
            .values()
            .filter_map(|g| g.health_check.as_ref().map(|c| (g, c)))
            .flat_map(|(g, c)| {
                g.routes.iter().flat_map(|r| r.targets.iter()).map(|t| CheckSpec {
                    gateway: g.name.clone(),
                    target: *t,
                    check: c.clone(),
                })
            })
            .collect();
        self.health.retain(&specs);
        if let Some(tx) = &self.health_checks {
            let _ = tx.send(specs);
        }
    }

    fn health_result(&mut self, gateway: &str, target: Target, result: Result<(), String>) {
        let Some(check) = self.configured.get(gateway).and_then(|g| g.health_check.clone()) else { return };
        let error = result.as_ref().err().cloned();
        match self.health.record(gateway, target, result, (check.unhealthy_threshold, check.healthy_threshold)) {
            Transition::None => {}
            // The table changes first, so the event tells what is already live.
            Transition::BecameUnhealthy => {
                self.refresh(gateway);
                self.reset_baseline(gateway);
                self.events.push(
                    gateway,
                    "health",
                    format!("target {target} unhealthy after {} failed checks: {}", check.unhealthy_threshold, error.unwrap_or_default()),
                );
            }
            Transition::BecameHealthy => {
                self.refresh(gateway);
                self.reset_baseline(gateway);
                self.events.push(gateway, "health", format!("target {target} healthy again after {} passed checks", check.healthy_threshold));
            }
        }
    }

    fn delete(&mut self, name: &str) -> Response {
        if !self.configured.contains_key(name) {
            return Response::error(404, format!("no gateway {name}"));
        }
        if let Err(e) = self.datapath.remove(name) {
            return Response::error(500, format!("{e:#}"));
        }
        self.configured.remove(name);
        self.history.remove(name);
        self.from_config.remove(name);
        self.baselines.remove(name);
        self.rollouts.remove(name);
        self.events.push(name, "config", "gateway deleted");
        self.update_health_checks();
        self.save();
        Response::ok("text/plain", format!("deleted gateway {name}\n"))
    }

    /// The canary route takes 100%, every other route 0% (AWS's "promote canary").
    fn promote(&mut self, name: &str, route: &str) -> Response {
        let Some(current) = self.configured.get(name) else {
            return Response::error(404, format!("no gateway {name}"));
        };
        if !current.routes.iter().any(|r| r.name == route) {
            let known: Vec<&str> = current.routes.iter().map(|r| r.name.as_str()).collect();
            return Response::error(404, format!("gateway {name} has no route {route} (its routes: {})", known.join(", ")));
        }
        let update = WeightUpdate {
            name: name.to_string(),
            weights: current
                .routes
                .iter()
                .map(|r| (r.name.clone(), Some(if r.name == route { gateway::FULL_WEIGHT } else { 0 })))
                .collect(),
        };
        self.pause_rollout_on_manual_change(name);
        self.apply_update(&update, "promote", true)
    }

    /// Back to the weights before the last change; `flush` also ends the established
    /// flows of routes that lose all their weight.
    fn rollback(&mut self, name: &str, flush: bool) -> Response {
        if !self.configured.contains_key(name) {
            return Response::error(404, format!("no gateway {name}"));
        }
        let Some(previous) = self.history.get_mut(name).and_then(Vec::pop) else {
            return Response::error(409, format!("gateway {name} has no earlier weights to roll back to"));
        };
        let update = WeightUpdate {
            name: name.to_string(),
            weights: previous.into_iter().map(|(route, w)| (route, Some(w))).collect(),
        };
        self.pause_rollout_on_manual_change(name);
        let before = self.datapath.shares(name);
        let response = self.apply_update(&update, "rollback", false);
        if response.status != 200 || !flush {
            return response;
        }
        // The targets whose share went down lose their established flows too.
        let after = self.datapath.shares(name);
        let lost: Vec<Target> = before
            .iter()
            .filter(|(t, share)| after.iter().find(|(a, _)| a == t).is_none_or(|(_, s)| s < share))
            .map(|(t, _)| *t)
            .collect();
        match self.datapath.flush_flows(name, &lost) {
            Ok(flows) => {
                info!("rollback of {name}: flushed {flows} established flow(s) from targets that lost weight");
                Response { body: format!("{}# flushed {flows} established flow(s)\n", response.body), ..response }
            }
            Err(e) => Response::error(500, format!("rolled back, but flushing failed: {e:#}")),
        }
    }

    fn apply_update(&mut self, update: &WeightUpdate, origin: &str, record_history: bool) -> Response {
        let Some(current) = self.configured.get(&update.name) else {
            return Response::error(404, format!("no gateway {}", update.name));
        };
        let next = match current.apply_weights(update, origin) {
            Ok(g) => g,
            Err(e) => return Response::error(400, e),
        };
        if let Err(e) = self.commit(std::slice::from_ref(&next), record_history, origin) {
            return Response::error(409, format!("{e:#}"));
        }
        self.save();
        self.render(&[next], false, false)
    }

    fn stats_with_shares(&self) -> Result<Vec<GatewayStats>> {
        let mut stats = self.datapath.stats()?;
        for g in &mut stats {
            let baseline = self.baselines.get(&g.name);
            let since: Vec<u64> = g
                .targets
                .iter()
                .map(|t| t.new_flows.saturating_sub(baseline.and_then(|b| b.get(&t.target)).copied().unwrap_or(0)))
                .collect();
            let total: u64 = since.iter().sum();
            g.new_flows_since_change = total;
            for (t, n) in g.targets.iter_mut().zip(since) {
                t.new_flows_since_change = n;
                t.observed_share = if total > 0 { Some(100.0 * n as f64 / total as f64) } else { None };
                let target: Option<Target> = t.target.parse().ok();
                t.health = target.and_then(|tg| self.health.get(&g.name, &tg)).map(|h| h.describe());
                t.failed_checks = target.and_then(|tg| self.health.get(&g.name, &tg)).map_or(0, |h| h.failed_checks);
            }
            g.rollout = self.rollouts.get(&g.name).map(describe_rollout);
        }
        Ok(stats)
    }

    fn stats(&self, name: Option<&str>) -> Response {
        match self.stats_with_shares() {
            Ok(mut stats) => {
                if let Some(name) = name {
                    stats.retain(|g| g.name == name);
                    if stats.is_empty() {
                        return Response::error(404, format!("no gateway {name}"));
                    }
                }
                Response::ok("application/json", serde_json::to_string(&stats).unwrap_or_default())
            }
            Err(e) => Response::error(500, format!("{e:#}")),
        }
    }

    fn metrics(&self) -> Response {
        let result = (|| -> Result<String> {
            let stats = self.stats_with_shares()?;
            let weights: BTreeMap<String, Vec<(String, u32)>> = self
                .configured
                .iter()
                .map(|(n, g)| (n.clone(), g.routes.iter().map(|r| (r.name.clone(), r.weight)).collect()))
                .collect();
            let rollouts: Vec<(String, &'static str, u32)> =
                self.rollouts.values().map(|r| (r.gateway.clone(), r.state.name(), r.canary_weight())).collect();
            Ok(metrics::render(&metrics::Snapshot {
                gateways: &stats,
                route_weights: &weights,
                packets: &self.datapath.packet_counters()?,
                conntrack_entries: self.datapath.conntrack_entries(),
                conntrack_capacity: self.datapath.conntrack_capacity(),
                program_id: self.program_id,
                rollouts: &rollouts,
                config_errors: self.config_errors.len(),
                state_save_errors: self.state_save_errors,
                state_unsaved: self.state_error.is_some(),
                uptime: self.started.elapsed(),
            }))
        })();
        match result {
            Ok(text) => Response::ok("text/plain; version=0.0.4", text),
            Err(e) => Response::error(500, format!("{e:#}")),
        }
    }

    /// Gateways as YAML documents (with their live status as comments, so the output can
    /// be applied again) or JSON.
    fn render(&self, gateways: &[Gateway], json: bool, list: bool) -> Response {
        if json {
            let with_status: Vec<serde_json::Value> = gateways
                .iter()
                .map(|g| {
                    let mut v = serde_json::to_value(g).unwrap_or_default();
                    v["status"] = self.status(g);
                    v
                })
                .collect();
            let value = if list { serde_json::to_string(&with_status) } else { serde_json::to_string(&with_status[0]) };
            return Response::ok("application/json", value.unwrap_or_default());
        }
        let docs: Vec<String> = gateways
            .iter()
            .map(|g| {
                let mut doc = g.to_yaml();
                for line in self.status_lines(g) {
                    doc.push_str(&format!("# {line}\n"));
                }
                doc
            })
            .collect();
        Response::ok("application/yaml", docs.join("---\n"))
    }

    fn status(&self, g: &Gateway) -> serde_json::Value {
        let health: BTreeMap<String, String> = g
            .routes
            .iter()
            .flat_map(|r| r.targets.iter())
            .filter_map(|t| self.health.get(&g.name, t).map(|h| (t.to_string(), h.describe())))
            .collect();
        serde_json::json!({
            "health": health,
            "rollout": self.rollouts.get(&g.name),
            "generation": self.datapath.placements().get(&g.name).map(|p| p.generation),
        })
    }

    fn status_lines(&self, g: &Gateway) -> Vec<String> {
        let mut lines = Vec::new();
        let health: Vec<String> = g
            .routes
            .iter()
            .flat_map(|r| r.targets.iter())
            .filter_map(|t| self.health.get(&g.name, t).map(|h| format!("{t} {}", h.describe())))
            .collect();
        if !health.is_empty() {
            lines.push(format!("health: {}", health.join("; ")));
        }
        if let Some(r) = self.rollouts.get(&g.name) {
            lines.push(format!("rollout: {}", describe_rollout(r)));
        }
        lines
    }

    /// Snapshot of each target's new flows: the observed share counts from here.
    fn reset_baseline(&mut self, name: &str) {
        let Ok(stats) = self.datapath.stats() else { return };
        if let Some(g) = stats.iter().find(|g| g.name == name) {
            self.baselines
                .insert(name.to_string(), g.targets.iter().map(|t| (t.target.clone(), t.new_flows)).collect());
        }
    }

    /// Applies the configuration files: each file is validated and applied on its own
    /// (like a PUT); a broken file changes nothing and is reported; gateways whose file
    /// no longer defines them are removed.
    pub fn sync_config(&mut self) {
        let Some(config) = self.config.clone() else { return };
        let files = config_files(&config);
        let mut defined: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut broken: BTreeMap<PathBuf, String> = BTreeMap::new();
        let mut applied = false;
        for file in &files {
            let origin = file.display().to_string();
            let text = match fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    broken.insert(file.clone(), format!("{origin}: cannot read: {e}"));
                    continue;
                }
            };
            match gateway::parse_documents(&origin, &text) {
                Ok(documents) => {
                    let names: Vec<String> = documents.iter().map(|d| d.gateway_name().to_string()).collect();
                    // A file applied before and unchanged since stays as it is live: a
                    // rollout may have moved its weights, and an edit of another file must
                    // not undo that.
                    if self.applied_texts.get(file) == Some(&text) && names.iter().all(|n| self.configured.contains_key(n)) {
                        for n in names {
                            defined.insert(n, file.clone());
                        }
                        continue;
                    }
                    let response = self.apply_text(&origin, &text, None, Some(file));
                    if response.status == 200 {
                        self.applied_texts.insert(file.clone(), text.clone());
                        applied = true;
                    }
                    if response.status != 200 {
                        broken.insert(file.clone(), response.body.trim_end().to_string());
                        // Its gateways stay as they are: not removed below either.
                        for n in names {
                            if self.from_config.get(&n) == Some(file) {
                                defined.insert(n, file.clone());
                            }
                        }
                    } else {
                        for n in names {
                            defined.insert(n, file.clone());
                        }
                    }
                }
                Err(e) => {
                    broken.insert(file.clone(), e.to_string());
                    for (n, f) in &self.from_config {
                        if f == file {
                            defined.insert(n.clone(), f.clone());
                        }
                    }
                }
            }
        }
        for (file, err) in &broken {
            if self.config_errors.get(file) != Some(err) {
                error!("configuration file not applied, nothing changed: {err}");
            }
        }
        for file in self.config_errors.keys() {
            if !broken.contains_key(file) {
                info!("configuration file {} is valid again", file.display());
            }
        }
        self.config_errors = broken;
        let gone: Vec<String> =
            self.from_config.keys().filter(|n| !defined.contains_key(*n)).cloned().collect();
        for name in gone {
            info!("gateway {name}: its configuration file no longer defines it; removing");
            let _ = self.delete(&name);
        }
        if applied {
            // The applied texts are part of the state (saved with the change itself, they
            // were recorded only after it).
            self.save();
        }
        self.from_config = defined;
        self.save();
    }

    /// Saves the state atomically: temporary file, fsync, rename, fsync of the directory.
    /// A failure (full or read-only disk) keeps the running state as it is: the change is
    /// live, the response to the request carries a warning, the error is logged once and
    /// counted, `get` shows it, and the save is retried on every later change and every
    /// few seconds.
    fn save(&mut self) {
        let Some(dir) = self.state_dir.clone() else { return };
        let state = SavedState {
            gateways: self.configured.values().map(Gateway::to_yaml).collect(),
            placements: self.datapath.placements(),
            history: self.history.clone(),
            from_config: self.from_config.clone(),
            rollouts: self.rollouts.values().cloned().collect(),
            applied_files: self.applied_texts.clone(),
        };
        match write_atomically(&dir.join(STATE_FILE), serde_json::to_string_pretty(&state).unwrap_or_default().as_bytes()) {
            Ok(()) => {
                if let Some(earlier) = self.state_error.take() {
                    info!("state saved in {} again (after {earlier})", dir.display());
                }
            }
            Err(e) => {
                let err = format!("{e:#}");
                self.state_save_errors += 1;
                if self.state_error.as_ref() != Some(&err) {
                    error!(
                        "cannot save state in {}: {err}; the running state is kept, an agent restarted now would come back with the last saved state; retrying on every change",
                        dir.display()
                    );
                }
                self.pending_warning = Some(format!(
                    "the change is live, but the state could not be saved in {}: {err}; an agent restarted now would come back with the last saved state",
                    dir.display()
                ));
                self.state_error = Some(err);
            }
        }
    }
}

pub const STATE_FILE: &str = "state.json";

/// Reads the saved state, if any.
pub fn load_state(dir: &Path) -> Result<Option<SavedState>> {
    let path = dir.join(STATE_FILE);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Parses the gateways of a saved state.
pub fn saved_gateways(saved: &SavedState) -> Result<Vec<Gateway>> {
    let mut out = Vec::new();
    for text in &saved.gateways {
        for doc in gateway::parse_documents("saved state", text).map_err(|e: ConfigError| anyhow::anyhow!("{e}"))? {
            if let Document::Gateway(g) = doc {
                out.push(g);
            }
        }
    }
    Ok(out)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("state file has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    let written = (|| -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// The gateway files under a configuration path (a file, or `*.yaml`/`*.yml` in a
/// directory, hidden files skipped), sorted.
pub fn config_files(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() {
        return if path.exists() { vec![path.to_path_buf()] } else { Vec::new() };
    }
    let mut files: Vec<PathBuf> = fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml")) && p.is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// A fingerprint of the configuration files (names, sizes, modification times and
/// contents), to notice any change.
pub fn config_fingerprint(path: &Path) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    for file in config_files(path) {
        file.hash(&mut hasher);
        fs::read(&file).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}

fn weights_of(g: Option<&Gateway>) -> BTreeMap<String, u32> {
    g.map(|g| g.routes.iter().map(|r| (r.name.clone(), r.weight)).collect()).unwrap_or_default()
}


/// One line about a rollout: state, step, weight, last reason.
pub fn describe_rollout(r: &Rollout) -> String {
    format!(
        "{} at step {}/{} (canary {} at {}): {}",
        r.state.name(),
        r.step + 1,
        r.spec.steps.len(),
        r.spec.route,
        gateway::format_weight(r.canary_weight()),
        r.reason
    )
}

/// Automated rollouts, driven from the service thread.
impl Service {
    fn canary(&mut self, request: CanaryRequest) -> Response {
        let result = match request {
            CanaryRequest::Start { gateway, spec } => self.start_rollout(&gateway, spec),
            CanaryRequest::Status(name) => {
                let rollouts: Vec<&Rollout> =
                    self.rollouts.values().filter(|r| name.as_ref().is_none_or(|n| &r.gateway == n)).collect();
                if let (Some(n), true) = (&name, rollouts.is_empty()) {
                    return Response::error(404, format!("no rollout for gateway {n}"));
                }
                return Response::ok("application/json", serde_json::to_string(&rollouts).unwrap_or_default());
            }
            CanaryRequest::Pause(g) => self.with_rollout(&g, |s, r| {
                if r.state != RolloutState::Progressing {
                    bail!("the rollout of {g} is {}, not progressing", r.state.name());
                }
                r.state = RolloutState::Paused;
                r.reason = "paused by the operator".into();
                s.events.push(&g, "rollout", "paused by the operator");
                Ok(())
            }),
            CanaryRequest::Resume(g) => {
                let base = self.rollouts.get(&g).map(|r| self.sample(&g, &r.spec.route));
                self.with_rollout(&g, |s, r| {
                    if r.state != RolloutState::Paused {
                        bail!("the rollout of {g} is {}, not paused", r.state.name());
                    }
                    r.state = RolloutState::Progressing;
                    r.reason = "resumed by the operator".into();
                    r.window_started = Instant::now();
                    r.window_base = base.unwrap_or_default();
                    s.events.push(&g, "rollout", "resumed by the operator");
                    Ok(())
                })
            }
            CanaryRequest::Abort(g) => {
                if !self.rollouts.contains_key(&g) {
                    return Response::error(404, format!("no rollout for gateway {g}"));
                }
                self.roll_back(&g, "aborted by the operator".into());
                Ok(())
            }
            CanaryRequest::Promote(g) => {
                let Some(r) = self.rollouts.get(&g) else {
                    return Response::error(404, format!("no rollout for gateway {g}"));
                };
                let last = r.spec.steps.len() - 1;
                self.set_step(&g, last, "promoted by the operator".into());
                Ok(())
            }
        };
        match result {
            Ok(()) => {
                self.save();
                Response::ok("application/json", serde_json::to_string(&self.rollouts.values().collect::<Vec<_>>()).unwrap_or_default())
            }
            Err(e) => Response::error(409, format!("{e:#}")),
        }
    }

    fn with_rollout(&mut self, gateway: &str, f: impl FnOnce(&mut Self, &mut Rollout) -> Result<()>) -> Result<()> {
        let mut r = self.rollouts.remove(gateway).with_context(|| format!("no rollout for gateway {gateway}"))?;
        let result = f(self, &mut r);
        self.rollouts.insert(gateway.to_string(), r);
        result
    }

    /// Starts (or restarts) a rollout: the canary takes the first step at once.
    fn start_rollout(&mut self, gateway: &str, spec: CanarySpec) -> Result<()> {
        let g = self.configured.get(gateway).with_context(|| format!("no gateway {gateway}"))?;
        if !g.routes.iter().any(|r| r.name == spec.route) {
            let known: Vec<&str> = g.routes.iter().map(|r| r.name.as_str()).collect();
            bail!("gateway {gateway} has no route {} (its routes: {})", spec.route, known.join(", "));
        }
        if g.routes.len() < 2 {
            bail!("gateway {gateway} has no other route to fall back to");
        }
        if spec.steps.is_empty() || spec.steps.last() != Some(&gateway::FULL_WEIGHT) {
            bail!("the steps must end at 100%");
        }
        if let Some(r) = self.rollouts.get(gateway) {
            if matches!(r.state, RolloutState::Progressing | RolloutState::Paused) {
                bail!("a rollout of {gateway} is already {} (abort it first)", r.state.name());
            }
        }
        let stable = weights_of(Some(g));
        let steps: Vec<String> = spec.steps.iter().map(|s| gateway::format_weight(*s)).collect();
        self.events.push(
            gateway,
            "rollout",
            format!(
                "started: route {} through [{}] every {}",
                spec.route,
                steps.join(", "),
                gateway::policy::format_duration_us(spec.interval_ms * 1000)
            ),
        );
        let rollout = Rollout {
            gateway: gateway.to_string(),
            spec,
            state: RolloutState::Progressing,
            step: 0,
            reason: "started".into(),
            stable_weights: stable,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            window_started: Instant::now(),
            window_base: Sample::default(),
        };
        self.rollouts.insert(gateway.to_string(), rollout);
        // The weights before the rollout are what a manual `rollback` returns to.
        let before = self.configured.get(gateway).map(|g| weights_of(Some(g)));
        if let Some(before) = before {
            self.history.entry(gateway.to_string()).or_default().push(before);
        }
        self.set_step(gateway, 0, "first step".into());
        Ok(())
    }

    /// Moves the canary to `step` (the last step promotes).
    fn set_step(&mut self, gateway: &str, step: usize, reason: String) {
        let Some(r) = self.rollouts.get(gateway) else { return };
        let weight = r.spec.steps.get(step).copied().unwrap_or(gateway::FULL_WEIGHT);
        let last = step + 1 >= r.spec.steps.len();
        let canary = r.spec.route.clone();
        let stable = r.stable_weights.clone();
        let count = r.spec.steps.len();
        if let Err(e) = self.set_weights(gateway, &canary, weight, &stable, &format!("canary step {}/{count}", step + 1)) {
            self.roll_back(gateway, format!("the weights of step {} could not be applied: {e:#}", step + 1));
            return;
        }
        let base = self.sample(gateway, &canary);
        if let Some(r) = self.rollouts.get_mut(gateway) {
            r.step = step;
            r.window_started = Instant::now();
            r.window_base = base;
            r.reason = reason.clone();
            if last {
                r.state = RolloutState::Promoted;
            }
        }
        let message = if last {
            format!("promoted: {canary} at 100% ({reason})")
        } else {
            format!("step {}/{count}: {canary} at {} ({reason})", step + 1, gateway::format_weight(weight))
        };
        self.events.push(gateway, "rollout", message);
        // The weights were saved before the rollout recorded its new step: save both.
        self.save();
    }

    fn set_weights(&mut self, gateway: &str, canary: &str, weight: u32, stable: &BTreeMap<String, u32>, reason: &str) -> Result<()> {
        let g = self.configured.get(gateway).with_context(|| format!("no gateway {gateway}"))?;
        let routes: Vec<String> = g.routes.iter().map(|r| r.name.clone()).collect();
        let weights = canary::step_weights(&routes, canary, weight, stable);
        let update = WeightUpdate { name: gateway.to_string(), weights: weights.into_iter().map(|(r, w)| (r, Some(w))).collect() };
        let next = g.apply_weights(&update, reason).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.commit(std::slice::from_ref(&next), false, reason)?;
        self.save();
        Ok(())
    }

    /// Back to the stable routes at once: the canary at 0%, its flows flushed if asked.
    fn roll_back(&mut self, gateway: &str, reason: String) {
        let Some(r) = self.rollouts.get(gateway) else { return };
        let (canary, stable, flush) = (r.spec.route.clone(), r.stable_weights.clone(), r.spec.thresholds.flush_on_rollback);
        let applied = self.set_weights(gateway, &canary, 0, &stable, "canary rolled back");
        let mut message = format!("rolled back: {reason}");
        if let Err(e) = applied {
            message.push_str(&format!(" (the stable weights could not be applied: {e:#})"));
        } else if flush {
            let canary_targets: Vec<Target> = self
                .configured
                .get(gateway)
                .map(|g| g.routes.iter().filter(|r| r.name == canary).flat_map(|r| r.targets.clone()).collect())
                .unwrap_or_default();
            match self.datapath.flush_flows(gateway, &canary_targets) {
                Ok(n) => message.push_str(&format!("; {n} canary flow(s) flushed")),
                Err(e) => message.push_str(&format!("; flushing failed: {e:#}")),
            }
        }
        if let Some(r) = self.rollouts.get_mut(gateway) {
            r.state = RolloutState::RolledBack;
            r.reason = reason;
        }
        self.events.push(gateway, "rollout", message);
        self.save();
    }

    /// A manual weight change takes over from a running rollout.
    fn pause_rollout_on_manual_change(&mut self, gateway: &str) {
        if let Some(r) = self.rollouts.get_mut(gateway) {
            if r.state == RolloutState::Progressing {
                r.state = RolloutState::Paused;
                r.reason = "paused: the weights were changed by hand".into();
                self.events.push(gateway, "rollout", "paused: the weights were changed by hand");
            }
        }
    }

    /// The counters the analysis compares, now.
    fn sample(&self, gateway: &str, canary_route: &str) -> Sample {
        let mut s = Sample::default();
        let Ok(stats) = self.datapath.stats() else { return s };
        let Some(g) = stats.iter().find(|g| g.name == gateway) else { return s };
        for t in &g.targets {
            if t.route == canary_route {
                s.canary_flows += t.new_flows;
                s.canary_resets += t.resets_from_target;
                s.canary_connects += t.connects;
                s.canary_connect_ns += t.connect_ns_total;
            } else {
                s.stable_connects += t.connects;
                s.stable_connect_ns += t.connect_ns_total;
            }
        }
        if let Some(config) = self.configured.get(gateway) {
            let targets: Vec<Target> =
                config.routes.iter().filter(|r| r.name == canary_route).flat_map(|r| r.targets.clone()).collect();
            s.canary_failed_checks = self.health.failed_checks(gateway, &targets);
        }
        s
    }

    /// Judges every progressing rollout: a breach rolls back at once; at the end of a
    /// window, enough healthy traffic advances a step, too little waits.
    fn advance_rollouts(&mut self) {
        let progressing: Vec<String> =
            self.rollouts.values().filter(|r| r.state == RolloutState::Progressing).map(|r| r.gateway.clone()).collect();
        for gateway in progressing {
            let Some(r) = self.rollouts.get(&gateway) else { continue };
            let window = self.sample(&gateway, &r.spec.route).since(&r.window_base);
            let elapsed = r.window_started.elapsed();
            let interval = Duration::from_millis(r.spec.interval_ms);
            let step = r.step;
            match canary::judge(&window, &r.spec.thresholds) {
                Verdict::Breach(reason) => self.roll_back(&gateway, reason),
                _ if elapsed < interval => {}
                Verdict::TooFewFlows(why) => {
                    self.events.push(&gateway, "rollout", format!("waiting at step {}: {why}", step + 1));
                    if let Some(r) = self.rollouts.get_mut(&gateway) {
                        // Keep counting from the same base; judge again after another interval.
                        r.window_started = Instant::now();
                        r.reason = format!("waiting: {why}");
                    }
                }
                Verdict::Healthy(summary) => self.set_step(&gateway, step + 1, format!("step {} passed: {summary}", step + 1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state saved by an agent from before rollouts and applied files were saved still
    /// loads (with none of either), and a saved rollout comes back as it was.
    #[test]
    fn saved_states_old_and_new_load() {
        let old: SavedState = serde_json::from_str(r#"{"gateways":[],"placements":{},"history":{},"from_config":{}}"#).unwrap();
        assert!(old.rollouts.is_empty() && old.applied_files.is_empty());

        let spec: CanarySpec = serde_json::from_str(
            r#"{"route":"r/b","steps":[2500,10000],"interval_ms":1000,"thresholds":{"max_error_rate":500,"max_failed_checks":1,"min_flows":20,"max_connect_latency":null,"flush_on_rollback":false}}"#,
        )
        .unwrap();
        let rollout = Rollout {
            gateway: "g".into(),
            spec,
            state: RolloutState::Paused,
            step: 1,
            reason: "paused by the operator".into(),
            stable_weights: [("r/a".to_string(), 10_000), ("r/b".to_string(), 0)].into(),
            started_unix: 1_795_000_000,
            window_started: Instant::now(),
            window_base: Sample { canary_flows: 7, ..Sample::default() },
        };
        let state = SavedState { rollouts: vec![rollout.clone()], ..SavedState::default() };
        let back: SavedState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let r = &back.rollouts[0];
        assert_eq!((&r.gateway, &r.spec, r.state, r.step, &r.stable_weights), (&rollout.gateway, &rollout.spec, rollout.state, 1, &rollout.stable_weights));
        assert_eq!(r.window_base, Sample::default(), "the analysis window is not saved");
    }
}
