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

use anyhow::{Context, Result};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use splitter_common::conntrack::Timeouts;
use tokio::sync::oneshot;

use crate::{
    datapath::{Datapath, GatewayStats, Placement},
    gateway::{self, ConfigError, Document, Gateway, WeightUpdate},
    metrics,
};

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
    /// Periodic work: conntrack expiry.
    Sweep,
}

/// What a request produced.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn ok(content_type: &'static str, body: String) -> Self {
        Self { status: 200, content_type, body }
    }
    fn error(status: u16, message: impl std::fmt::Display) -> Self {
        // One line, as on the command line.
        Self { status, content_type: "text/plain", body: format!("{message}\n") }
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
}

pub struct Service {
    datapath: Datapath,
    state_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    timeouts: Timeouts,
    history: BTreeMap<String, Vec<BTreeMap<String, u32>>>,
    /// Gateways defined by configuration files, and the file that defines each.
    from_config: BTreeMap<String, PathBuf>,
    /// Configuration files that failed to load, with their one-line error.
    config_errors: BTreeMap<PathBuf, String>,
    /// Per-target new-flow counts when each gateway's current weights took effect, for
    /// the observed share since then.
    baselines: BTreeMap<String, BTreeMap<String, u64>>,
    program_id: u32,
    started: Instant,
}

impl Service {
    pub fn new(datapath: Datapath, state_dir: Option<PathBuf>, config: Option<PathBuf>, timeouts: Timeouts, program_id: u32) -> Self {
        Self {
            datapath,
            state_dir,
            config,
            timeouts,
            history: BTreeMap::new(),
            from_config: BTreeMap::new(),
            config_errors: BTreeMap::new(),
            baselines: BTreeMap::new(),
            program_id,
            started: Instant::now(),
        }
    }

    /// Restores history and config ownership from a saved state (the gateways themselves
    /// are restored by the caller, through the datapath).
    pub fn restore(&mut self, saved: &SavedState) {
        self.history = saved.history.clone();
        self.from_config = saved.from_config.clone();
    }

    /// Serves requests until every sender is gone; sweeps conntrack every 2 s.
    pub fn run(mut self, commands: mpsc::Receiver<Command>) {
        let sweep_every = Duration::from_secs(2);
        let mut next_sweep = Instant::now() + sweep_every;
        loop {
            let wait = next_sweep.saturating_duration_since(Instant::now());
            match commands.recv_timeout(wait) {
                Ok(cmd) => {
                    let response = self.handle(cmd.request, cmd.json);
                    let _ = cmd.reply.send(response);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.handle(Request::Sweep, false);
                    next_sweep = Instant::now() + sweep_every;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    pub fn handle(&mut self, request: Request, json: bool) -> Response {
        match request {
            Request::List => self.list(json),
            Request::Get(name) => match self.datapath.gateway(&name) {
                Some(g) => render_gateways(&[g.clone()], json, false),
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
            Request::Sweep => {
                if let Err(e) = self.datapath.sweep_conntrack(&self.timeouts) {
                    warn!("conntrack sweep: {e:#}");
                }
                Response::ok("text/plain", String::new())
            }
        }
    }

    fn list(&self, json: bool) -> Response {
        let gateways: Vec<Gateway> =
            self.datapath.gateway_names().iter().filter_map(|n| self.datapath.gateway(n).cloned()).collect();
        let mut response = render_gateways(&gateways, json, true);
        if !json && !self.config_errors.is_empty() {
            let mut notes = String::new();
            for (file, err) in &self.config_errors {
                notes.push_str(&format!("# configuration file {} not applied: {err}\n", file.display()));
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
                    let Some(current) = staged.get(&name).or_else(|| self.datapath.gateway(&name)) else {
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
            staged.into_values().filter(|g| self.datapath.gateway(&g.name) != Some(g)).collect();
        if let Err(e) = self.commit(&changed, true) {
            return Response::error(409, format!("{origin}: {e:#}"));
        }
        if let Some(file) = owner {
            for g in &changed {
                self.from_config.insert(g.name.clone(), file.to_path_buf());
            }
        }
        self.save();
        let applied: Vec<String> = changed.iter().map(|g| g.name.clone()).collect();
        let gateways: Vec<Gateway> = applied.iter().filter_map(|n| self.datapath.gateway(n).cloned()).collect();
        let mut response = render_gateways(&gateways, false, true);
        if applied.is_empty() {
            response.body = "# unchanged\n".into();
        }
        response
    }

    /// Makes `gateways` live, all or none: every one is checked against the datapath
    /// first; if a map write still fails, the ones already switched are put back.
    fn commit(&mut self, gateways: &[Gateway], record_history: bool) -> Result<()> {
        for g in gateways {
            self.datapath.check(g, gateways)?;
        }
        let mut done: Vec<(String, Option<Gateway>)> = Vec::new();
        for g in gateways {
            let before = self.datapath.gateway(&g.name).cloned();
            if let Err(e) = self.datapath.apply(g) {
                for (name, previous) in done.into_iter().rev() {
                    let restored = match previous {
                        Some(p) => self.datapath.apply(&p).map(drop),
                        None => self.datapath.remove(&name),
                    };
                    if let Err(r) = restored {
                        error!("could not restore gateway {name} after a failed change: {r:#}");
                    }
                }
                return Err(e);
            }
            if weights_of(before.as_ref()) != weights_of(Some(g)) {
                if let (true, Some(previous)) = (record_history, before.as_ref()) {
                    let history = self.history.entry(g.name.clone()).or_default();
                    history.push(weights_of(Some(previous)));
                    if history.len() > HISTORY_DEPTH {
                        history.remove(0);
                    }
                }
                self.reset_baseline(&g.name);
            }
            done.push((g.name.clone(), before));
        }
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Response {
        if self.datapath.gateway(name).is_none() {
            return Response::error(404, format!("no gateway {name}"));
        }
        if let Err(e) = self.datapath.remove(name) {
            return Response::error(500, format!("{e:#}"));
        }
        self.history.remove(name);
        self.from_config.remove(name);
        self.baselines.remove(name);
        self.save();
        Response::ok("text/plain", format!("deleted gateway {name}\n"))
    }

    /// The canary route takes 100%, every other route 0% (AWS's "promote canary").
    fn promote(&mut self, name: &str, route: &str) -> Response {
        let Some(current) = self.datapath.gateway(name) else {
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
        self.apply_update(&update, "promote", true)
    }

    /// Back to the weights before the last change; `flush` also ends the established
    /// flows of routes that lose all their weight.
    fn rollback(&mut self, name: &str, flush: bool) -> Response {
        if self.datapath.gateway(name).is_none() {
            return Response::error(404, format!("no gateway {name}"));
        }
        let Some(previous) = self.history.get_mut(name).and_then(Vec::pop) else {
            return Response::error(409, format!("gateway {name} has no earlier weights to roll back to"));
        };
        let update = WeightUpdate {
            name: name.to_string(),
            weights: previous.into_iter().map(|(route, w)| (route, Some(w))).collect(),
        };
        let response = self.apply_update(&update, "rollback", false);
        if response.status != 200 || !flush {
            return response;
        }
        match self.datapath.flush_zero_weight_flows(name) {
            Ok(flows) => {
                info!("rollback of {name}: flushed {flows} established flow(s) from routes at 0%");
                Response { body: format!("{}# flushed {flows} established flow(s)\n", response.body), ..response }
            }
            Err(e) => Response::error(500, format!("rolled back, but flushing failed: {e:#}")),
        }
    }

    fn apply_update(&mut self, update: &WeightUpdate, origin: &str, record_history: bool) -> Response {
        let Some(current) = self.datapath.gateway(&update.name) else {
            return Response::error(404, format!("no gateway {}", update.name));
        };
        let next = match current.apply_weights(update, origin) {
            Ok(g) => g,
            Err(e) => return Response::error(400, e),
        };
        if let Err(e) = self.commit(std::slice::from_ref(&next), record_history) {
            return Response::error(409, format!("{e:#}"));
        }
        self.save();
        render_gateways(&[next], false, false)
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
            }
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
                .datapath
                .gateway_names()
                .into_iter()
                .filter_map(|n| {
                    let g = self.datapath.gateway(&n)?;
                    Some((n, g.routes.iter().map(|r| (r.name.clone(), r.weight)).collect()))
                })
                .collect();
            Ok(metrics::render(&metrics::Snapshot {
                gateways: &stats,
                route_weights: &weights,
                packets: &self.datapath.packet_counters()?,
                conntrack_entries: self.datapath.conntrack_entries(),
                conntrack_capacity: self.datapath.conntrack_capacity(),
                program_id: self.program_id,
                config_errors: self.config_errors.len(),
                uptime: self.started.elapsed(),
            }))
        })();
        match result {
            Ok(text) => Response::ok("text/plain; version=0.0.4", text),
            Err(e) => Response::error(500, format!("{e:#}")),
        }
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
                    let response = self.apply_text(&origin, &text, None, Some(file));
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
        self.from_config = defined;
        self.save();
    }

    /// Saves the state atomically: temporary file, fsync, rename, fsync of the directory.
    fn save(&self) {
        let Some(dir) = &self.state_dir else { return };
        let state = SavedState {
            gateways: self
                .datapath
                .gateway_names()
                .iter()
                .filter_map(|n| self.datapath.gateway(n).map(Gateway::to_yaml))
                .collect(),
            placements: self.datapath.placements(),
            history: self.history.clone(),
            from_config: self.from_config.clone(),
        };
        if let Err(e) = write_atomically(&dir.join(STATE_FILE), serde_json::to_string_pretty(&state).unwrap_or_default().as_bytes()) {
            error!("cannot save state in {}: {e:#}", dir.display());
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
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()?;
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

fn render_gateways(gateways: &[Gateway], json: bool, list: bool) -> Response {
    if json {
        let value = if list { serde_json::to_string(gateways) } else { serde_json::to_string(&gateways[0]) };
        return Response::ok("application/json", value.unwrap_or_default());
    }
    let docs: Vec<String> = gateways.iter().map(Gateway::to_yaml).collect();
    Response::ok("application/yaml", docs.join("---\n"))
}
