//! What the controller shows: gateways with their live status, stats with observed
//! shares, `/metrics`; and what health reports change.

use std::collections::BTreeMap;

use log::error;

use super::Controller;
use crate::{
    api::{Answer, ApiError, GatewayStats, GatewayStatus, GatewayView, GatewaysAnswer},
    datapath::{layout::describe_fingerprint, Dataplane},
    gateway::{Gateway, Target},
    health::{HealthReport, Transition},
    metrics,
};

impl<D: Dataplane> Controller<D> {
    pub(super) fn list(&self) -> Answer {
        let views = self.configured.values().map(|g| self.view(g)).collect();
        let mut notes: Vec<String> =
            self.config_errors.iter().map(|(file, err)| format!("configuration file {} not applied: {err}", file.display())).collect();
        if let (Some(err), Some(dir)) = (&self.state_error, &self.settings.state_dir) {
            notes.push(format!(
                "state not saved in {}: {err}; an agent restarted now would come back with the last saved state",
                dir.display()
            ));
        }
        Answer::Gateways(GatewaysAnswer { views, notes, ..Default::default() })
    }

    pub(super) fn view(&self, g: &Gateway) -> GatewayView {
        let health = g
            .routes
            .iter()
            .flat_map(|r| r.targets.iter())
            .filter_map(|t| self.health.get(&g.name, t).map(|h| (t.to_string(), h.describe())))
            .collect();
        GatewayView {
            gateway: g.clone(),
            status: GatewayStatus {
                health,
                rollout: self.rollouts.get(&g.name).cloned(),
                generation: self.dataplane.placements().get(&g.name).map(|p| p.generation),
                table_fingerprint: self.dataplane.placements().get(&g.name).map(|p| describe_fingerprint(p.fingerprint)),
                store_revision: self.store_revision(&g.name),
                datapath: format!(
                    "program {} build {} layout {}",
                    self.settings.program_id,
                    self.settings.build,
                    splitter_common::LAYOUT_VERSION
                ),
            },
        }
    }

    /// Stats of every gateway (or one), with the observed shares since the last change,
    /// health, and the rollout.
    pub(super) fn stats(&self, name: Option<&str>) -> Result<Vec<GatewayStats>, ApiError> {
        let mut stats = self.dataplane.stats().map_err(|e| ApiError::failed(format!("{e:#}")))?;
        if let Some(name) = name {
            stats.retain(|g| g.name == name);
            if stats.is_empty() {
                return Err(ApiError::no_gateway(name));
            }
        }
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
                t.observed_share = (total > 0).then(|| 100.0 * n as f64 / total as f64);
                let health = t.target.parse::<Target>().ok().and_then(|tg| self.health.get(&g.name, &tg));
                t.health = health.map(|h| h.describe());
                t.failed_checks = health.map_or(0, |h| h.failed_checks);
            }
            g.rollout = self.rollouts.get(&g.name).map(|r| r.describe());
        }
        Ok(stats)
    }

    pub(super) fn metrics(&self) -> Result<String, ApiError> {
        let failed = |e: anyhow::Error| ApiError::failed(format!("{e:#}"));
        let stats = self.stats(None)?;
        let weights: BTreeMap<String, Vec<(String, u32)>> =
            self.configured.iter().map(|(n, g)| (n.clone(), g.routes.iter().map(|r| (r.name.clone(), r.weight)).collect())).collect();
        let rollouts: Vec<(String, &'static str, u32)> =
            self.rollouts.values().map(|r| (r.gateway.clone(), r.state.name(), r.canary_weight())).collect();
        Ok(metrics::render(&metrics::Snapshot {
            gateways: &stats,
            route_weights: &weights,
            packets: &self.dataplane.packet_counters().map_err(failed)?,
            conntrack_entries: self.dataplane.conntrack_entries(),
            conntrack_capacity: self.dataplane.conntrack_capacity(),
            half_open_entries: self.dataplane.half_open_entries(),
            half_open_capacity: self.dataplane.half_open_capacity(),
            flow_events: &self.dataplane.flow_events().map_err(failed)?,
            build: &self.settings.build,
            program_id: self.settings.program_id,
            rollouts: &rollouts,
            config_errors: self.config_errors.len(),
            state_save_errors: self.state_save_errors,
            state_unsaved: self.state_error.is_some(),
            uptime: self.started.elapsed(),
        }))
    }

    /// One check's result: a target crossing its threshold changes the gateway's table
    /// first, so the event tells what is already live.
    pub fn health_report(&mut self, report: HealthReport) {
        let HealthReport { gateway, target, result } = report;
        let Some(check) = self.configured.get(&gateway).and_then(|g| g.health_check.clone()) else { return };
        let error = result.as_ref().err().cloned();
        let message = match self.health.record(&gateway, target, result, (check.unhealthy_threshold, check.healthy_threshold)) {
            Transition::None => return,
            Transition::BecameUnhealthy => {
                format!("target {target} unhealthy after {} failed checks: {}", check.unhealthy_threshold, error.unwrap_or_default())
            }
            Transition::BecameHealthy => format!("target {target} healthy again after {} passed checks", check.healthy_threshold),
        };
        if let Some(g) = self.configured.get(&gateway).cloned() {
            if let Err(e) = self.dataplane.apply(&g, &self.shares(&g)) {
                error!("gateway {gateway}: applying the health-adjusted shares failed: {e:#}");
            }
        }
        self.reset_baseline(&gateway);
        self.events.push(&gateway, "health", message);
        self.unsaved = true;
    }
}
