//! Many nodes, one decision: with a shared store, every change an operator, a
//! configuration file or a rollout makes on this node is written to the store before it
//! counts (compare-and-swap on each gateway's revision), and undone here if the store
//! refuses it; changes written by other nodes arrive as [`StoreUpdate`]s and are applied as
//! they are. Only the node holding the driver's lease judges rollouts, on the counters of
//! every node.

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use log::{error, info, warn};

use super::{Controller, Op};
use crate::{
    api::{ApiError, StoreInfo},
    cluster::{self, Decision, GatewayRecord, NodeCounters, RecordWrite, Store, StoreError, StoreUpdate},
    datapath::Dataplane,
    gateway::{self, Document, Gateway},
    rollout::{Rollout, Sample},
    state::WeightHistory,
};

/// The controller's link to the shared store.
pub(super) struct ClusterLink {
    store: Box<dyn Store>,
    /// Per gateway, the store revision of the record this node last applied or wrote.
    revisions: BTreeMap<String, i64>,
    /// The newest store revision applied or written.
    revision: i64,
    /// Other nodes' counters.
    others: BTreeMap<String, NodeCounters>,
    /// What this node published last.
    published: Option<NodeCounters>,
    /// Whether this node drove the rollouts at the last tick.
    driving: bool,
    /// Why the store is out of reach, while it is.
    unreachable: Option<String>,
    /// A snapshot was applied since the agent started.
    synced: bool,
}

/// What a change may have to undo when the store refuses it.
struct Before {
    configured: BTreeMap<String, Gateway>,
    history: BTreeMap<String, WeightHistory>,
    rollouts: BTreeMap<String, Rollout>,
    from_config: BTreeMap<String, PathBuf>,
    applied_texts: BTreeMap<PathBuf, String>,
    config_errors: BTreeMap<PathBuf, String>,
    baselines: BTreeMap<String, BTreeMap<String, u64>>,
    last_event: u64,
}

impl Op {
    /// Whether the request changes gateways or rollouts (what goes through the store).
    pub fn writes(&self) -> bool {
        use super::CanaryOp;
        match self {
            Op::Apply { validate_only, .. } => !validate_only,
            Op::Delete(_) | Op::Promote { .. } | Op::Rollback { .. } | Op::SyncConfig => true,
            Op::Canary(op) => !matches!(op, CanaryOp::Status(_)),
            Op::IfRevision { op, .. } => op.writes(),
            Op::List | Op::Get(_) | Op::Stats(_) | Op::Metrics | Op::Events { .. } | Op::RecordEvent { .. } | Op::Info => false,
        }
    }
}

impl<D: Dataplane> Controller<D> {
    /// Follows a shared store from now on (its first snapshot arrives through the inbox).
    pub fn set_store(&mut self, store: Box<dyn Store>) {
        self.cluster = Some(ClusterLink {
            store,
            revisions: BTreeMap::new(),
            revision: 0,
            others: BTreeMap::new(),
            published: None,
            driving: false,
            unreachable: None,
            synced: false,
        });
    }

    pub(super) fn store_info(&self) -> Option<StoreInfo> {
        self.cluster.as_ref().map(|c| StoreInfo {
            url: c.store.url(),
            node: c.store.node().to_string(),
            reachable: c.unreachable.is_none() && c.synced,
            driving: c.driving,
            revision: c.revision,
        })
    }

    /// The store revision of a gateway's record as this node holds it.
    pub(super) fn store_revision(&self, name: &str) -> Option<i64> {
        self.cluster.as_ref().and_then(|c| c.revisions.get(name).copied())
    }

    /// `op`, taken only if every gateway it changes is at `revision` here and in the store.
    pub(super) fn if_revision(&mut self, revision: i64, op: Op) -> Result<crate::api::Answer, ApiError> {
        if self.cluster.is_none() {
            return Err(ApiError::invalid("if_revision: this agent shares no store (--store)"));
        }
        self.expected_revision = Some(revision);
        let answer = self.through_store(|c| c.dispatch(op));
        self.expected_revision = None;
        answer
    }

    /// Runs `change`; with a store, then writes what it changed there, and undoes it here
    /// if the store refuses (a conflict, or the store out of reach).
    pub(super) fn through_store<T>(&mut self, change: impl FnOnce(&mut Self) -> Result<T, ApiError>) -> Result<T, ApiError> {
        if self.cluster.is_none() {
            return change(self);
        }
        let before = Before {
            configured: self.configured.clone(),
            history: self.history.clone(),
            rollouts: self.rollouts.clone(),
            from_config: self.from_config.clone(),
            applied_texts: self.applied_texts.clone(),
            config_errors: self.config_errors.clone(),
            baselines: self.baselines.clone(),
            last_event: self.events.last_id(),
        };
        let result = change(self);
        let writes = self.writes_since(&before);
        if writes.is_empty() {
            return result;
        }
        if let Some(revision) = self.expected_revision {
            // The operator's revision must be what this node changed, and the store's.
            let stale: Vec<String> = writes
                .iter()
                .filter(|w| self.cluster.as_ref().and_then(|c| c.revisions.get(&w.name)).is_some_and(|known| *known != revision))
                .map(|w| w.name.clone())
                .collect();
            if !stale.is_empty() {
                let names: Vec<String> = writes.iter().map(|w| w.name.clone()).collect();
                self.undo(before, &names);
                return Err(ApiError::conflict(format!(
                    "gateway {} is no longer at store revision {revision}: nothing was changed; read it again (`splitter get`) and retry",
                    stale.join(", ")
                )));
            }
        }
        let Some(link) = self.cluster.as_mut() else { return result };
        match link.store.write(&writes) {
            Ok(revision) => {
                for w in &writes {
                    match w.record {
                        Some(_) => link.revisions.insert(w.name.clone(), revision),
                        None => link.revisions.remove(&w.name),
                    };
                }
                link.revision = link.revision.max(revision);
                result
            }
            Err(e) => {
                let url = link.store.url();
                let names: Vec<String> = writes.iter().map(|w| w.name.clone()).collect();
                self.undo(before, &names);
                Err(match e {
                    StoreError::Conflict(names) => ApiError::conflict(format!(
                        "gateway {} was changed on another node since this node read it: nothing was changed; read it again (`splitter get`) and retry",
                        names.join(", ")
                    )),
                    StoreError::Unavailable(why) => ApiError::unavailable(format!(
                        "the store {url} cannot be reached ({why}): changes are refused until it is back; this node keeps forwarding with its last state"
                    )),
                })
            }
        }
    }

    /// The record of a gateway as this node has it now.
    fn record_of(&self, name: &str, since_event: u64) -> Option<GatewayRecord> {
        let g = self.configured.get(name)?;
        let decisions =
            self.events.since(since_event).iter().filter(|e| e.gateway == name && e.origin == "agent").map(Decision::from).collect();
        let writer = self.cluster.as_ref().map(|c| c.store.node().to_string()).unwrap_or_default();
        Some(GatewayRecord { decisions, writer, ..record_state(g, self.history.get(name), self.rollouts.get(name)) })
    }

    /// The store writes of what changed since `before`.
    fn writes_since(&self, before: &Before) -> Vec<RecordWrite> {
        let Some(link) = &self.cluster else { return Vec::new() };
        let old = |name: &str| before.configured.get(name).map(|g| record_state(g, before.history.get(name), before.rollouts.get(name)));
        let names: std::collections::BTreeSet<&String> = before.configured.keys().chain(self.configured.keys()).collect();
        names
            .into_iter()
            .filter_map(|name| {
                let (was, now) = (old(name), self.record_of(name, before.last_event));
                let same = match (&was, &now) {
                    (Some(a), Some(b)) => a.same_state(b),
                    (None, None) => true,
                    _ => false,
                };
                (!same).then(|| RecordWrite { name: name.clone(), expected: link.revisions.get(name).copied().unwrap_or(0), record: now })
            })
            .collect()
    }

    /// Puts the datapath and the books back as they were before a change the store refused.
    fn undo(&mut self, before: Before, names: &[String]) {
        for name in names {
            let restored = match before.configured.get(name) {
                Some(previous) => self.dataplane.apply(previous, &self.shares(previous)).map(drop),
                None => self.dataplane.remove(name),
            };
            if let Err(e) = restored {
                error!("could not restore gateway {name} after the store refused a change: {e:#}");
            }
        }
        let Before { configured, history, rollouts, from_config, applied_texts, config_errors, baselines, last_event } = before;
        self.configured = configured;
        self.history = history;
        self.rollouts = rollouts;
        self.from_config = from_config;
        self.applied_texts = applied_texts;
        self.config_errors = config_errors;
        self.baselines = baselines;
        self.events.forget_after(last_event);
        self.update_health_checks();
    }

    /// What the store says.
    pub fn store_update(&mut self, update: StoreUpdate) {
        if self.cluster.is_none() {
            return;
        }
        match update {
            StoreUpdate::Snapshot { revision, gateways, counters } => self.apply_snapshot(revision, gateways, counters),
            StoreUpdate::Gateway { name, revision, record } => {
                let known = self.cluster.as_ref().and_then(|c| c.revisions.get(&name).copied()).unwrap_or(0);
                if revision > known {
                    self.apply_record(&name, revision, record.as_ref(), true);
                }
                if !self.config_errors.is_empty() {
                    // A file refused for a conflict may fit now.
                    let _ = self.through_store(|c| {
                        c.sync_config();
                        Ok(())
                    });
                }
            }
            StoreUpdate::Counters { node, counters } => {
                if let Some(link) = self.cluster.as_mut().filter(|c| c.store.node() != node) {
                    link.others.insert(node, counters);
                }
            }
            StoreUpdate::Unreachable(why) => {
                if let Some(link) = self.cluster.as_mut() {
                    link.unreachable = why;
                }
            }
        }
    }

    fn apply_snapshot(
        &mut self,
        revision: i64,
        gateways: BTreeMap<String, (i64, GatewayRecord)>,
        counters: BTreeMap<String, NodeCounters>,
    ) {
        let Some(link) = self.cluster.as_mut() else { return };
        let first = !link.synced;
        link.synced = true;
        link.unreachable = None;
        link.revision = link.revision.max(revision);
        let node = link.store.node().to_string();
        link.others = counters.into_iter().filter(|(n, _)| *n != node).collect();
        let local_only: Vec<String> = self.configured.keys().filter(|n| !gateways.contains_key(*n)).cloned().collect();
        if first && gateways.is_empty() && !local_only.is_empty() {
            self.seed_store(&local_only);
        } else {
            for name in local_only {
                self.apply_record(&name, revision, None, false);
            }
        }
        for (name, (at, record)) in &gateways {
            let known = self.cluster.as_ref().and_then(|c| c.revisions.get(name).copied()).unwrap_or(0);
            if *at > known {
                self.apply_record(name, *at, Some(record), false);
            }
        }
        info!("in step with the store at revision {revision}: {} gateway(s)", gateways.len());
        // Files this node could not write while the store was out of reach.
        let _ = self.through_store(|c| {
            c.sync_config();
            Ok(())
        });
    }

    /// An empty store, reached for the first time, takes this node's gateways.
    fn seed_store(&mut self, names: &[String]) {
        let writes: Vec<RecordWrite> = names
            .iter()
            .filter_map(|n| self.record_of(n, u64::MAX).map(|record| RecordWrite { name: n.clone(), expected: 0, record: Some(record) }))
            .collect();
        let Some(link) = self.cluster.as_mut() else { return };
        match link.store.write(&writes) {
            Ok(revision) => {
                info!("the store was empty: it now holds this node's {} gateway(s)", writes.len());
                for w in &writes {
                    link.revisions.insert(w.name.clone(), revision);
                }
                link.revision = link.revision.max(revision);
            }
            Err(e) => warn!("the store was empty, and this node's gateways could not be written there: {e:?}"),
        }
    }

    /// Makes this node hold `record` for `name` (none: no such gateway); `replay` records
    /// the writer's decisions as this node's events.
    fn apply_record(&mut self, name: &str, revision: i64, record: Option<&GatewayRecord>, replay: bool) {
        if let Some(link) = self.cluster.as_mut() {
            link.revision = link.revision.max(revision);
            match record {
                Some(_) => link.revisions.insert(name.to_string(), revision),
                None => link.revisions.remove(name),
            };
        }
        let Some(record) = record else {
            if self.configured.contains_key(name) {
                if let Err(e) = self.remove_gateway(name, "gateway deleted (by another node, through the store)") {
                    error!("gateway {name}: deleted in the store, but not here: {e}");
                }
            }
            return;
        };
        let gateway = match gateway::parse_documents(&format!("store record of {name}"), &record.document) {
            Ok(documents) => documents.into_iter().find_map(|d| match d {
                Document::Gateway(g) if g.name == name => Some(g),
                _ => None,
            }),
            Err(e) => {
                error!("gateway {name} in the store does not read here ({e}); this node keeps its own");
                return;
            }
        };
        let Some(gateway) = gateway else {
            error!("gateway {name} in the store has no document for it; this node keeps its own");
            return;
        };
        let weights_changed = super::weights_of(self.configured.get(name)) != super::weights_of(Some(&gateway));
        if self.configured.get(name).is_none_or(|c| !c.same_as(&gateway)) {
            let shares = self.shares(&gateway);
            if let Err(e) = self
                .dataplane
                .check(&gateway, &shares, std::slice::from_ref(&gateway))
                .and_then(|()| self.dataplane.apply(&gateway, &shares).map(drop))
            {
                error!(
                    "gateway {name} from the store (revision {revision}) cannot be applied on this node: {e:#}; it keeps the earlier one"
                );
                return;
            }
        }
        self.configured.insert(name.to_string(), gateway);
        self.history.insert(name.to_string(), record.history.clone());
        match record.rollout() {
            Some(mut rollout) => {
                rollout.window_started = Instant::now();
                rollout.window_base = self.sample(name, &rollout.spec.route);
                self.rollouts.insert(name.to_string(), rollout);
            }
            None => {
                self.rollouts.remove(name);
            }
        }
        if replay {
            for d in &record.decisions {
                self.events.push_from(name, &d.kind, &d.message, &record.writer);
            }
        }
        if weights_changed {
            self.reset_baseline(name);
        }
        self.update_health_checks();
        self.unsaved = true;
    }

    /// This node's counters of every gateway, by route.
    fn node_counters(&self) -> NodeCounters {
        let Ok(stats) = self.dataplane.stats() else { return NodeCounters::new() };
        stats.iter().map(|g| (g.name.clone(), self.route_counters(&g.name, &stats))).collect()
    }

    /// Publishes this node's counters when they changed.
    pub(super) fn publish_counters(&mut self) {
        if self.cluster.is_none() {
            return;
        }
        let counters = self.node_counters();
        let Some(link) = self.cluster.as_mut() else { return };
        if link.unreachable.is_some() || link.published.as_ref() == Some(&counters) {
            return;
        }
        link.store.publish_counters(&counters);
        link.published = Some(counters);
    }

    /// Adds the other nodes' counters of `gateway` to this node's `sample`.
    pub(super) fn add_other_nodes(&self, sample: &mut Sample, gateway: &str, canary_route: &str) {
        if let Some(link) = &self.cluster {
            for counters in link.others.values() {
                cluster::add_counters(sample, counters, gateway, canary_route);
            }
        }
    }

    /// Whether this node judges the rollouts now: always alone, with a store only while
    /// it holds the driver's lease. Taking over starts a fresh analysis window at each
    /// rollout's step.
    pub(super) fn drives_rollouts(&mut self) -> bool {
        let Some(link) = self.cluster.as_mut() else { return true };
        let driving = link.store.driving() && link.unreachable.is_none() && link.synced;
        let took_over = driving && !link.driving;
        link.driving = driving;
        if took_over {
            let node = link.store.node().to_string();
            for (gateway, route) in self.progressing_rollouts() {
                let base = self.sample(&gateway, &route);
                if let Some(r) = self.rollouts.get_mut(&gateway) {
                    r.window_started = Instant::now();
                    r.window_base = base;
                    let message = format!("driven by node {node} from step {}/{}", r.step + 1, r.spec.steps.len());
                    self.events.push(&gateway, "rollout", message);
                }
            }
        }
        driving
    }
}

/// A gateway's record without the change's decisions and writer (what `same_state`
/// compares).
fn record_state(g: &Gateway, history: Option<&WeightHistory>, rollout: Option<&Rollout>) -> GatewayRecord {
    GatewayRecord {
        document: g.to_yaml(),
        history: history.cloned().unwrap_or_default(),
        rollout: rollout.and_then(|r| serde_json::to_value(r).ok()),
        decisions: Vec::new(),
        writer: String::new(),
    }
}
