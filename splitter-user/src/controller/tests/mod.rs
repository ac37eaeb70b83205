//! The controller against the in-memory datapath: no BPF, no privileges. Each test drives
//! it through its inbox operations and checks the datapath, history, events, rollouts and
//! saved state together.

mod analysis;
mod changes;
mod cluster;
mod config_files;
mod rollouts;
mod vamp;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use splitter_common::conntrack::Timeouts;

use super::{Controller, Op, Settings};
use crate::{
    api::{Answer, ApiError, ErrorKind, Reply},
    datapath::{Limits, MemoryDataplane},
    gateway::Target,
    state,
};

pub(super) const SAVA: &str = "\
name: sava
port: 9050/http
virtual_address: 10.0.0.10
routes:
  sava:1.0.0:
    weight: 90%
    targets: [10.1.0.11:8080, 10.1.0.12:8080]
  sava:1.1.0:
    weight: 10%
    targets: [10.1.0.21:8080]
";

pub(super) const OTHER: &str = "\
name: other
port: 80/tcp
virtual_address: 10.0.0.20
routes:
  a:
    weight: 50%
    targets: [10.1.1.1:80]
  b:
    weight: 50%
    targets: [10.1.1.2:80]
";

pub(super) type TestController = Controller<MemoryDataplane>;

pub(super) fn controller() -> TestController {
    controller_with(None, None)
}

pub(super) fn controller_with(state_dir: Option<PathBuf>, config: Option<PathBuf>) -> TestController {
    let limits = Limits { max_gateways: 4, conntrack_entries: 1024, ..Limits::DEFAULT };
    Controller::new(
        MemoryDataplane::new(limits),
        Settings { state_dir, config, timeouts: Timeouts::DEFAULT, program_id: 7, build: "test".into() },
    )
}

/// A directory of its own under the system's temporary directory, removed on drop.
pub(super) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "splitter-controller-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn apply(c: &mut TestController, text: &str) -> Result<Reply, ApiError> {
    c.handle(Op::Apply { origin: "test.yaml".into(), text: text.into(), path_name: None, validate_only: false })
}

pub(super) fn weight_doc(gateway: &str, weights: &[(&str, &str)]) -> String {
    let mut doc = format!("name: {gateway}\nroutes:\n");
    for (route, weight) in weights {
        doc.push_str(&format!("  {route}:\n    weight: {weight}\n"));
    }
    doc
}

/// The configured weights of a gateway (hundredths of a percent by route).
pub(super) fn weights(c: &TestController, gateway: &str) -> BTreeMap<String, u32> {
    super::weights_of(c.configured.get(gateway))
}

/// The weights the datapath holds for a gateway.
pub(super) fn live_weights(c: &TestController, gateway: &str) -> BTreeMap<String, u32> {
    super::weights_of(c.dataplane().live(gateway).map(|(g, _)| g))
}

pub(super) fn generation(c: &TestController, gateway: &str) -> Option<u64> {
    c.dataplane().live(gateway).map(|(_, generation)| generation)
}

pub(super) fn w(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
    pairs.iter().map(|(r, w)| (r.to_string(), *w)).collect()
}

pub(super) fn target(text: &str) -> Target {
    text.parse().unwrap()
}

pub(super) fn event_messages(c: &TestController) -> Vec<String> {
    c.events().all().map(|e| format!("{}: {}", e.kind, e.message)).collect()
}

pub(super) fn kind(result: Result<Reply, ApiError>) -> ErrorKind {
    match result {
        Ok(reply) => panic!("expected a refusal, got {:?}", reply.answer),
        Err(e) => e.kind,
    }
}

pub(super) fn yaml(reply: &Reply) -> String {
    reply.answer.render(crate::api::Format::Natural).1
}

pub(super) fn saved_text(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(state::STATE_FILE)).ok()
}

pub(super) fn rollouts(c: &mut TestController) -> Vec<crate::rollout::Rollout> {
    match c.handle(Op::Canary(super::CanaryOp::Status(None))).unwrap().answer {
        Answer::Rollouts(r) => r,
        other => panic!("expected rollouts, got {other:?}"),
    }
}
