//! What survives an agent restart: the applied gateways, where they live in the maps,
//! weight history, which file defines which gateway, rollouts. Saved as one JSON file,
//! atomically (temporary file, fsync, rename, fsync of the directory).

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::Placement,
    gateway::{self, Document, Gateway},
    rollout::Rollout,
};

pub const STATE_FILE: &str = "state.json";

/// The version this agent writes. States without one are version 1 (they have the same
/// shape); a newer one is refused rather than half understood.
pub const STATE_VERSION: u32 = 1;

fn version_one() -> u32 {
    1
}

/// Earlier weight sets of one gateway, newest last (hundredths of a percent by route).
pub type WeightHistory = Vec<BTreeMap<String, u32>>;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SavedState {
    #[serde(default = "version_one")]
    pub version: u32,
    /// Every applied gateway, as a document.
    pub gateways: Vec<String>,
    /// Where each gateway lives in the maps (ids, table buffers, counter slots).
    pub placements: BTreeMap<String, Placement>,
    pub history: BTreeMap<String, WeightHistory>,
    /// Gateways defined by configuration files, and the file.
    pub from_config: BTreeMap<String, PathBuf>,
    /// Canary rollouts, running or ended.
    #[serde(default)]
    pub rollouts: Vec<Rollout>,
    /// The text of each configuration file when it was last applied: a restarted agent
    /// re-applies only files edited since, so it keeps what a rollout did to the others.
    #[serde(default)]
    pub applied_files: BTreeMap<PathBuf, String>,
}

impl SavedState {
    /// The saved gateways that still parse; each one that does not is returned with why
    /// (say, a name an older agent accepted), so the others can still be restored.
    pub fn gateways(&self) -> (Vec<Gateway>, Vec<String>) {
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for text in &self.gateways {
            match gateway::parse_documents("saved state", text) {
                Ok(documents) => ok.extend(documents.into_iter().filter_map(|d| match d {
                    Document::Gateway(g) => Some(g),
                    Document::Weights(_) => None,
                })),
                Err(e) => bad.push(e.to_string()),
            }
        }
        (ok, bad)
    }
}

/// Reads the saved state in `dir`, if any.
pub fn load(dir: &Path) -> Result<Option<SavedState>> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let state: SavedState = serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?;
    if state.version > STATE_VERSION {
        bail!(
            "{}: state version {} is newer than this agent's {STATE_VERSION}; run the newer agent or move the file away",
            path.display(),
            state.version
        );
    }
    Ok(Some(state))
}

/// Writes the state into `dir` atomically.
pub fn save(dir: &Path, state: &SavedState) -> Result<()> {
    let text = serde_json::to_string_pretty(state).context("encoding the state")?;
    write_atomically(&dir.join(STATE_FILE), text.as_bytes())
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        gateway::policy::CanarySpec,
        rollout::{RolloutState, Sample},
    };

    /// A state saved by an agent from before rollouts and applied files were saved still
    /// loads (with none of either), and a saved rollout comes back as it was.
    #[test]
    fn saved_states_old_and_new_load() {
        let old: SavedState = serde_json::from_str(r#"{"gateways":[],"placements":{},"history":{},"from_config":{}}"#).unwrap();
        assert!(old.rollouts.is_empty() && old.applied_files.is_empty());
        assert_eq!(old.version, 1);

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
            entered: true,
            approved: false,
            inconclusive: 0,
            awaiting: None,
            held_promotion: None,
            signals: None,
        };
        let state = SavedState { rollouts: vec![rollout.clone()], ..SavedState::default() };
        let back: SavedState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let r = &back.rollouts[0];
        assert_eq!(
            (&r.gateway, &r.spec, r.state, r.step, &r.stable_weights),
            (&rollout.gateway, &rollout.spec, rollout.state, 1, &rollout.stable_weights)
        );
        assert_eq!(r.window_base, Sample::default(), "the analysis window is not saved");
    }

    #[test]
    fn a_newer_state_is_refused_and_a_saved_one_reads_back() {
        let dir = std::env::temp_dir().join(format!("splitter-state-test-{}", std::process::id()));
        let state =
            SavedState { version: STATE_VERSION, from_config: [("g".into(), "/etc/g.yaml".into())].into(), ..SavedState::default() };
        save(&dir, &state).unwrap();
        assert_eq!(load(&dir).unwrap().unwrap().from_config, state.from_config);
        fs::write(dir.join(STATE_FILE), r#"{"version":99,"gateways":[],"placements":{},"history":{},"from_config":{}}"#).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("state version 99 is newer"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
