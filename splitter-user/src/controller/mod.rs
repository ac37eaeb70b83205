//! The controller: the one owner of the datapath and of everything the agent decides.
//!
//! Everything reaches it through one inbox, one message at a time ([`Inbox`]): operator
//! requests from the control socket, health reports, configuration changes; timed work
//! (rollout analysis, conntrack expiry, a retried save) runs between them on a tick. So no
//! two changes ever interleave, and each change is planned, applied to the datapath, and
//! only then given its effects (history, events, rollouts, saved state) in [`commit`].

mod analysis;
mod cluster_sync;
mod commit;
mod config_sync;
mod operations;
mod rollouts;
#[cfg(test)]
mod tests;
mod views;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use log::{error, info, warn};
use splitter_common::conntrack::Timeouts;
use tokio::sync::oneshot;

use crate::{
    api::{ApiError, ExternalEvent, Reply},
    datapath::Dataplane,
    events::EventLog,
    gateway::{policy::CanarySpec, Gateway, Mode, Target},
    health::{CheckSpec, HealthBook, HealthReport},
    rollout::Rollout,
    state::{self, SavedState, WeightHistory},
};

/// How often the controller wakes for timed work (canary analysis).
pub const TICK: Duration = Duration::from_millis(250);
/// Housekeeping (a retry of a failed save, port-exhaustion reports) runs every this many
/// ticks (2 s).
const HOUSEKEEPING_EVERY_TICKS: u32 = 8;
/// Conntrack expiry runs at most this often...
const SWEEP_MIN_INTERVAL: Duration = Duration::from_secs(2);
/// ...and at least this often; in between, as rarely as keeps its own cost under
/// 1/[`SWEEP_COST_SHARE`] of a core (a full table takes tens of milliseconds to read).
const SWEEP_MAX_INTERVAL: Duration = Duration::from_secs(10);
const SWEEP_COST_SHARE: u32 = 100;
/// Port exhaustion is logged at most this often per gateway.
const EXHAUSTION_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Weight sets remembered per gateway for `rollback`.
pub const HISTORY_DEPTH: usize = 32;

/// An operator's request.
#[derive(Clone, Debug)]
pub enum Op {
    List,
    Get(String),
    /// Gateway documents (full or weights-only) from `origin`; with `path_name`, the
    /// documents must all be for that gateway (a PUT to its path). `validate_only`
    /// answers as if applied and changes nothing (Vamp's `validate_only=true`).
    Apply {
        origin: String,
        text: String,
        path_name: Option<String>,
        validate_only: bool,
    },
    Delete(String),
    Promote {
        gateway: String,
        route: String,
    },
    Rollback {
        gateway: String,
        flush: bool,
    },
    Stats(Option<String>),
    Metrics,
    /// Events after `since` carrying every tag of `tags` (and of `event_type`, if given).
    Events {
        since: u64,
        tags: Vec<String>,
        event_type: Option<String>,
    },
    /// An event a client records (Vamp's `POST /api/v1/events`), from `origin`.
    RecordEvent {
        event: ExternalEvent,
        origin: String,
    },
    /// What runs, since when (`GET /api/v1/info`).
    Info,
    /// Re-read the configuration path now (SIGHUP).
    SyncConfig,
    Canary(CanaryOp),
    /// A change taken only if every gateway it changes is still at this store revision
    /// (what the operator read with `get`): optimistic concurrency between operators.
    IfRevision {
        revision: i64,
        op: Box<Op>,
    },
}

#[derive(Clone, Debug)]
pub enum CanaryOp {
    Start {
        gateway: String,
        spec: CanarySpec,
    },
    Status(Option<String>),
    Pause(String),
    Resume(String),
    Abort(String),
    Promote(String),
    /// Approve the promotion (what a confirm-promotion webhook would say).
    Approve(String),
}

/// What the controller's inbox carries.
pub enum Inbox {
    Operator {
        op: Op,
        reply: oneshot::Sender<Result<Reply, ApiError>>,
    },
    Health(HealthReport),
    /// The watcher saw the configuration files change.
    ConfigChanged,
    /// An answer to a rollout's question (external metrics, webhooks).
    Check(crate::analysis::CheckReport),
    /// What the shared store says (`--store`).
    Store(crate::cluster::StoreUpdate),
    /// The agent is stopping: the controller returns (the store's tasks still hold
    /// senders, so the inbox would never close on its own).
    Stop,
}

/// What the controller is given at start.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where the state is saved; none keeps nothing (`--ephemeral`).
    pub state_dir: Option<PathBuf>,
    /// The configuration path (`--config`).
    pub config: Option<PathBuf>,
    pub timeouts: Timeouts,
    /// The running XDP program's id, for `/metrics`.
    pub program_id: u32,
    /// The running program's build id (a digest of its object), for `get` and `/metrics`.
    pub build: String,
}

pub struct Controller<D: Dataplane> {
    dataplane: D,
    settings: Settings,
    /// The gateways as configured (what `get` shows); the datapath holds them with the
    /// shares health allows.
    configured: BTreeMap<String, Gateway>,
    health: HealthBook,
    health_checks: Option<tokio::sync::mpsc::UnboundedSender<Vec<CheckSpec>>>,
    rollouts: BTreeMap<String, Rollout>,
    events: EventLog,
    history: BTreeMap<String, WeightHistory>,
    /// Gateways defined by configuration files, and the file that defines each.
    from_config: BTreeMap<String, PathBuf>,
    /// Configuration files that failed to load, with their one-line error.
    config_errors: BTreeMap<PathBuf, String>,
    /// The text of each configuration file when it was last applied.
    applied_texts: BTreeMap<PathBuf, String>,
    /// Per-target new-flow counts when each gateway's current weights took effect, for
    /// the observed share since then.
    baselines: BTreeMap<String, BTreeMap<String, u64>>,
    /// Something changed that the saved state does not have yet.
    unsaved: bool,
    /// Why the last save failed, while the running state is not saved.
    state_error: Option<String>,
    /// Failed saves since the agent started.
    state_save_errors: u64,
    /// Successful saves since the agent started.
    state_saves: u64,
    /// External events a client may still record now (refilled over time).
    event_budget: EventBudget,
    /// Where rollouts' questions for the outside go, and the last request's id.
    checks: Option<tokio::sync::mpsc::UnboundedSender<crate::analysis::CheckRequest>>,
    next_check_id: u64,
    /// Per gateway, the failed claims counted at the last exhaustion report, and when.
    exhaustion_reported: BTreeMap<String, (u64, Instant)>,
    /// The shared store, with `--store`.
    cluster: Option<cluster_sync::ClusterLink>,
    /// The store revision the request being handled was made against (`if_revision`).
    expected_revision: Option<i64>,
    started: Instant,
}

impl<D: Dataplane> Controller<D> {
    pub fn new(dataplane: D, settings: Settings) -> Self {
        Self {
            dataplane,
            settings,
            configured: BTreeMap::new(),
            health: HealthBook::default(),
            health_checks: None,
            rollouts: BTreeMap::new(),
            events: EventLog::default(),
            history: BTreeMap::new(),
            from_config: BTreeMap::new(),
            config_errors: BTreeMap::new(),
            applied_texts: BTreeMap::new(),
            baselines: BTreeMap::new(),
            unsaved: false,
            state_error: None,
            state_save_errors: 0,
            state_saves: 0,
            event_budget: EventBudget::new(Instant::now()),
            exhaustion_reported: BTreeMap::new(),
            checks: None,
            next_check_id: 0,
            cluster: None,
            expected_revision: None,
            started: Instant::now(),
        }
    }

    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dataplane
    }

    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Where health-check updates go (the checker task in the agent's runtime).
    pub fn set_health_checks(&mut self, sender: tokio::sync::mpsc::UnboundedSender<Vec<CheckSpec>>) {
        self.health_checks = Some(sender);
        self.update_health_checks();
    }

    /// Restores the saved gateways: adopted as they are when the pinned datapath still
    /// holds them (`adopting`), applied otherwise; plus history, config ownership and
    /// rollouts.
    pub fn restore(&mut self, saved: &SavedState, adopting: bool) {
        let (gateways, unreadable) = saved.gateways();
        for why in unreadable {
            warn!("saved gateway not restored: {why}");
        }
        for gateway in gateways {
            let shares = gateway.weighted_targets();
            let adopted = adopting && saved.placements.get(&gateway.name).is_some_and(|p| self.dataplane.adopt(&gateway, &shares, p));
            if !adopted {
                if let Err(e) = self.dataplane.apply(&gateway, &shares) {
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
    }

    /// Serves the inbox until every sender is gone; timed work on every tick.
    pub fn run(mut self, inbox: mpsc::Receiver<Inbox>) {
        let mut next_tick = Instant::now() + TICK;
        let mut next_sweep = Instant::now() + SWEEP_MIN_INTERVAL;
        let mut ticks = 0u32;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match inbox.recv_timeout(wait) {
                Ok(Inbox::Operator { op, reply }) => {
                    let _ = reply.send(self.handle(op));
                }
                Ok(Inbox::Health(report)) => {
                    self.health_report(report);
                    self.save_if_changed();
                }
                Ok(Inbox::Check(report)) => {
                    let _ = self.through_store(|c| {
                        c.check_report(report);
                        Ok(())
                    });
                    self.save_if_changed();
                }
                Ok(Inbox::ConfigChanged) => {
                    let _ = self.through_store(|c| {
                        c.sync_config();
                        Ok(())
                    });
                    self.save_if_changed();
                }
                Ok(Inbox::Store(update)) => {
                    self.store_update(update);
                    self.save_if_changed();
                }
                Ok(Inbox::Stop) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    next_tick = Instant::now() + TICK;
                    ticks = ticks.wrapping_add(1);
                    self.tick(Instant::now());
                    if Instant::now() >= next_sweep {
                        let started = Instant::now();
                        if let Err(e) = self.dataplane.sweep_conntrack(&self.settings.timeouts) {
                            warn!("conntrack sweep: {e:#}");
                        }
                        let took = started.elapsed();
                        next_sweep = Instant::now() + (took * SWEEP_COST_SHARE).clamp(SWEEP_MIN_INTERVAL, SWEEP_MAX_INTERVAL);
                    }
                    if ticks.is_multiple_of(HOUSEKEEPING_EVERY_TICKS) {
                        if self.state_error.is_some() {
                            self.unsaved = true;
                        }
                        self.report_exhaustion(Instant::now());
                    }
                    self.save_if_changed();
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// One operator request, then one save if it changed anything; a failed save becomes
    /// the reply's warning (the change is live).
    pub fn handle(&mut self, op: Op) -> Result<Reply, ApiError> {
        let answer = match op {
            Op::IfRevision { revision, op } => self.if_revision(revision, *op),
            op if op.writes() => self.through_store(|c| c.dispatch(op)),
            op => self.dispatch(op),
        };
        let warning = self.save_if_changed();
        answer.map(|answer| Reply { answer, warning })
    }

    /// Timed work: judges every progressing rollout (with a store, only on the node
    /// driving them, and each decision written there first), publishes this node's
    /// counters.
    pub fn tick(&mut self, now: Instant) {
        if self.drives_rollouts() {
            let _ = self.through_store(|c| {
                c.advance_rollouts(now);
                Ok(())
            });
        }
        self.publish_counters();
    }

    /// Saves the state as it is now (at start, so the state directory always holds the
    /// agent's state once it is ready); a failure is logged and retried like any other.
    pub fn save_now(&mut self) {
        self.unsaved = true;
        self.save_if_changed();
    }

    /// Saves the state when something changed since the last save. A failure (full or
    /// read-only disk) keeps the running state: it is logged once and counted, `get` shows
    /// it, the save is retried every few seconds, and the warning is returned for the
    /// operator whose change it was.
    fn save_if_changed(&mut self) -> Option<String> {
        if !std::mem::take(&mut self.unsaved) {
            return None;
        }
        let dir = self.settings.state_dir.clone()?;
        match state::save(&dir, &self.saved_state()) {
            Ok(()) => {
                self.state_saves += 1;
                if let Some(earlier) = self.state_error.take() {
                    info!("state saved in {} again (after {earlier})", dir.display());
                }
                None
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
                self.state_error = Some(err.clone());
                Some(format!(
                    "the change is live, but the state could not be saved in {}: {err}; an agent restarted now would come back with the last saved state",
                    dir.display()
                ))
            }
        }
    }

    fn saved_state(&self) -> SavedState {
        SavedState {
            version: state::STATE_VERSION,
            gateways: self.configured.values().map(Gateway::to_yaml).collect(),
            placements: self.dataplane.placements(),
            history: self.history.clone(),
            from_config: self.from_config.clone(),
            rollouts: self.rollouts.values().cloned().collect(),
            applied_files: self.applied_texts.clone(),
        }
    }

    /// The shares of `gateway`'s targets, with unhealthy targets at 0.
    fn shares(&self, gateway: &Gateway) -> Vec<(Target, u32)> {
        gateway.shares_with_health(|t| self.health.is_healthy(&gateway.name, t))
    }

    /// Tells the checker which targets to check.
    fn update_health_checks(&mut self) {
        let specs: Vec<CheckSpec> = self
            .configured
            .values()
            .filter_map(|g| g.health_check.as_ref().map(|c| (g, c)))
            .flat_map(|(g, c)| {
                // A DSR target is checked through the tunnel, at the VIP it must serve (on
                // the check's own port, if it has one).
                let through_tunnel_to =
                    (g.mode == Mode::Dsr).then_some(std::net::SocketAddr::new(g.virtual_address, c.port.unwrap_or(g.port)));
                g.routes.iter().flat_map(|r| r.targets.iter()).map(move |t| CheckSpec {
                    gateway: g.name.clone(),
                    target: *t,
                    check: c.clone(),
                    through_tunnel_to,
                })
            })
            .collect();
        self.health.retain(&specs);
        if let Some(tx) = &self.health_checks {
            let _ = tx.send(specs);
        }
    }

    /// Logs, at most once per [`EXHAUSTION_REPORT_INTERVAL`] and gateway, new flows that got
    /// no source port or conntrack entry since the last report (dropped; clients retry):
    /// the gateway's full-NAT capacity is too small for its traffic (or a flood).
    fn report_exhaustion(&mut self, now: Instant) {
        let Ok(stats) = self.dataplane.stats() else { return };
        for g in stats {
            let (seen, at) = self.exhaustion_reported.get(&g.name).copied().unwrap_or((0, now - EXHAUSTION_REPORT_INTERVAL));
            if g.alloc_failed <= seen || now.duration_since(at) < EXHAUSTION_REPORT_INTERVAL {
                continue;
            }
            let source = self.configured.get(&g.name).map(|c| {
                let addresses = c.source.addresses.len().max(1);
                let ports = c
                    .source
                    .ports
                    .map_or(u32::from(splitter_common::flow::SNAT_PORT_MAX - splitter_common::flow::SNAT_PORT_MIN) + 1, |(a, b)| {
                        u32::from(b - a) + 1
                    });
                format!("{addresses} source address(es) x {ports} ports per target")
            });
            warn!(
                "gateway {}: {} new flows got no source port or conntrack entry in the last {}s and were dropped (capacity: {}); add source addresses or ports (`source:`) if this is not a flood",
                g.name,
                g.alloc_failed - seen,
                now.duration_since(at).as_secs(),
                source.unwrap_or_default()
            );
            self.exhaustion_reported.insert(g.name.clone(), (g.alloc_failed, now));
        }
    }

    /// Snapshot of each target's new flows: the observed share counts from here.
    fn reset_baseline(&mut self, name: &str) {
        let Ok(stats) = self.dataplane.stats() else { return };
        if let Some(g) = stats.iter().find(|g| g.name == name) {
            self.baselines.insert(name.to_string(), g.targets.iter().map(|t| (t.target.clone(), t.new_flows)).collect());
        }
    }
}

/// How many external events clients may record: a burst, then a steady rate, so that a
/// client looping on `POST /api/v1/events` cannot push the operator's own events out.
pub struct EventBudget {
    tokens: f64,
    at: Instant,
}

impl EventBudget {
    pub const BURST: f64 = 100.0;
    pub const PER_SECOND: f64 = 20.0;

    fn new(now: Instant) -> Self {
        Self { tokens: Self::BURST, at: now }
    }

    /// Takes one event's worth, if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * Self::PER_SECOND;
        self.tokens = (self.tokens + refill).min(Self::BURST);
        self.at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// The weights of a gateway's routes (none for no gateway).
pub fn weights_of(g: Option<&Gateway>) -> BTreeMap<String, u32> {
    g.map(|g| g.routes.iter().map(|r| (r.name.clone(), r.weight)).collect()).unwrap_or_default()
}
