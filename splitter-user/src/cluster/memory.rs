//! A store in memory with etcd's semantics for what the agent uses (revisions,
//! compare-and-swap, watchers that see every write, their own included): several
//! controllers in one test process share one, with no etcd.

use std::{
    collections::BTreeMap,
    sync::{mpsc, Arc, Mutex, MutexGuard},
};

use super::{GatewayRecord, NodeCounters, RecordWrite, Store, StoreError, StoreUpdate};

#[derive(Default)]
struct Backend {
    revision: i64,
    gateways: BTreeMap<String, (i64, GatewayRecord)>,
    counters: BTreeMap<String, NodeCounters>,
    watchers: Vec<mpsc::Sender<StoreUpdate>>,
    driver: Option<String>,
    unreachable: bool,
}

impl Backend {
    fn tell(&mut self, update: &StoreUpdate) {
        self.watchers.retain(|w| w.send(update.clone()).is_ok());
    }

    fn snapshot(&self) -> StoreUpdate {
        StoreUpdate::Snapshot { revision: self.revision, gateways: self.gateways.clone(), counters: self.counters.clone() }
    }
}

/// The store itself; [`SharedMemory::join`] gives each node its handle.
#[derive(Clone, Default)]
pub struct SharedMemory(Arc<Mutex<Backend>>);

impl SharedMemory {
    fn backend(&self) -> MutexGuard<'_, Backend> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A node's handle, and what it hears (a snapshot first).
    pub fn join(&self, node: &str) -> (MemoryStore, mpsc::Receiver<StoreUpdate>) {
        let (tx, rx) = mpsc::channel();
        let mut backend = self.backend();
        let _ = tx.send(backend.snapshot());
        backend.watchers.push(tx);
        (MemoryStore { shared: self.clone(), node: node.to_string() }, rx)
    }

    /// Which node holds the driver's lease.
    pub fn set_driver(&self, node: Option<&str>) {
        self.backend().driver = node.map(str::to_string);
    }

    /// Takes the store out of reach (every watcher hears it) or brings it back (every
    /// watcher gets a snapshot).
    pub fn set_reachable(&self, reachable: bool) {
        let mut backend = self.backend();
        backend.unreachable = !reachable;
        let update = if reachable { backend.snapshot() } else { StoreUpdate::Unreachable(Some("connection refused".into())) };
        backend.tell(&update);
        if reachable {
            backend.tell(&StoreUpdate::Unreachable(None));
        }
    }

    /// The record of a gateway and its revision.
    pub fn gateway(&self, name: &str) -> Option<(i64, GatewayRecord)> {
        self.backend().gateways.get(name).cloned()
    }
}

pub struct MemoryStore {
    shared: SharedMemory,
    node: String,
}

impl Store for MemoryStore {
    fn url(&self) -> String {
        "memory://test".into()
    }

    fn node(&self) -> &str {
        &self.node
    }

    fn write(&mut self, writes: &[RecordWrite]) -> Result<i64, StoreError> {
        let mut backend = self.shared.backend();
        if backend.unreachable {
            return Err(StoreError::Unavailable("connection refused".into()));
        }
        let stale: Vec<String> =
            writes.iter().filter(|w| backend.gateways.get(&w.name).map_or(0, |(r, _)| *r) != w.expected).map(|w| w.name.clone()).collect();
        if !stale.is_empty() {
            return Err(StoreError::Conflict(stale));
        }
        backend.revision += 1;
        let revision = backend.revision;
        for w in writes {
            match &w.record {
                Some(record) => {
                    backend.gateways.insert(w.name.clone(), (revision, record.clone()));
                }
                None => {
                    backend.gateways.remove(&w.name);
                }
            }
            let update = StoreUpdate::Gateway { name: w.name.clone(), revision, record: w.record.clone() };
            backend.tell(&update);
        }
        Ok(revision)
    }

    fn publish_counters(&mut self, counters: &NodeCounters) {
        let mut backend = self.shared.backend();
        if backend.unreachable {
            return;
        }
        backend.counters.insert(self.node.clone(), counters.clone());
        let update = StoreUpdate::Counters { node: self.node.clone(), counters: counters.clone() };
        backend.tell(&update);
    }

    fn driving(&self) -> bool {
        let backend = self.shared.backend();
        !backend.unreachable && backend.driver.as_deref() == Some(self.node.as_str())
    }
}
