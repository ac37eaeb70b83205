//! The store in etcd (v3 API): a runtime of its own follows the prefix (a snapshot, then a
//! watch from the snapshot's revision; both again after any failure), campaigns for the
//! driver's lease, and publishes this node's counters; the controller's writes are
//! transactions comparing each key's revision, awaited on that runtime.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use log::{info, warn};

use super::{GatewayRecord, NodeCounters, RecordWrite, Store, StoreError, StoreUpdate, StoreUrl};

/// How long a write, a read or a connection attempt may take before the store counts as
/// out of reach.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The driver's lease: another agent takes over at most this long (plus one
/// [`CAMPAIGN_EVERY`]) after the driver stops renewing it.
const DRIVER_LEASE_TTL_SECONDS: i64 = 3;
const CAMPAIGN_EVERY: Duration = Duration::from_millis(500);
/// Wait between attempts to reach the store again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

type ClientSlot = Arc<Mutex<Option<Client>>>;

pub struct EtcdStore {
    url: StoreUrl,
    node: String,
    runtime: tokio::runtime::Runtime,
    client: ClientSlot,
    driving: Arc<AtomicBool>,
    publishing: Arc<AtomicBool>,
}

impl EtcdStore {
    /// Starts following the store at `url` as `node`; `tell` hears every update (and
    /// returns false once nobody listens, which stops the following).
    pub fn start(url: StoreUrl, node: String, tell: impl Fn(StoreUpdate) -> bool + Send + Sync + 'static) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("store")
            .enable_all()
            .build()
            .context("starting the store's runtime")?;
        let client: ClientSlot = Arc::default();
        let driving = Arc::new(AtomicBool::new(false));
        runtime.spawn(follow(url.clone(), client.clone(), tell));
        runtime.spawn(campaign(url.clone(), node.clone(), client.clone(), driving.clone()));
        Ok(Self { url, node, runtime, client, driving, publishing: Arc::default() })
    }

    fn client(&self) -> Option<Client> {
        self.client.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl Store for EtcdStore {
    fn url(&self) -> String {
        self.url.display()
    }

    fn node(&self) -> &str {
        &self.node
    }

    fn write(&mut self, writes: &[RecordWrite]) -> Result<i64, StoreError> {
        let Some(mut client) = self.client() else {
            return Err(StoreError::Unavailable("not connected".into()));
        };
        let mut compares = Vec::new();
        let mut operations = Vec::new();
        for w in writes {
            let key = self.url.gateway_key(&w.name);
            compares.push(if w.expected == 0 {
                Compare::version(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.clone(), CompareOp::Equal, w.expected)
            });
            operations.push(match &w.record {
                Some(record) => TxnOp::put(key, serde_json::to_vec(record).unwrap_or_default(), None),
                None => TxnOp::delete(key, None),
            });
        }
        let txn = Txn::new().when(compares).and_then(operations);
        let response = self
            .runtime
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await })
            .map_err(|_| StoreError::Unavailable(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())))?
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        if !response.succeeded() {
            return Err(StoreError::Conflict(writes.iter().map(|w| w.name.clone()).collect()));
        }
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    fn publish_counters(&mut self, counters: &NodeCounters) {
        let Some(mut client) = self.client() else { return };
        if self.publishing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (key, value, publishing) =
            (self.url.counters_key(&self.node), serde_json::to_vec(counters).unwrap_or_default(), self.publishing.clone());
        self.runtime.spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, client.put(key, value, None)).await;
            publishing.store(false, Ordering::Release);
        });
    }

    fn driving(&self) -> bool {
        self.driving.load(Ordering::Acquire)
    }
}

async fn connect(url: &StoreUrl) -> Result<Client, String> {
    let options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), REQUEST_TIMEOUT)
        .with_keep_alive_while_idle(true);
    match tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(&url.endpoints, Some(options))).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())),
    }
}

/// Follows the prefix for ever: connect, snapshot, watch; after a failure, says so once
/// and starts again.
async fn follow(url: StoreUrl, slot: ClientSlot, tell: impl Fn(StoreUpdate) -> bool) {
    let mut out_of_reach: Option<String> = None;
    loop {
        let failure = match connect(&url).await {
            Err(e) => e,
            Ok(client) => {
                *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(client.clone());
                match snapshot_and_watch(&url, client, &tell, &mut out_of_reach).await {
                    Ok(()) => return,
                    Err(e) => e,
                }
            }
        };
        if out_of_reach.is_none() {
            warn!("store {} out of reach: {failure}; forwarding with the last state, changes refused until it is back", url.display());
            if !tell(StoreUpdate::Unreachable(Some(failure.clone()))) {
                return;
            }
        }
        out_of_reach = Some(failure);
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// One pass: every key under the prefix, then every change after it. Returns only when
/// nobody listens any more (`Ok`) or the store failed (`Err`).
async fn snapshot_and_watch(
    url: &StoreUrl,
    mut client: Client,
    tell: &impl Fn(StoreUpdate) -> bool,
    out_of_reach: &mut Option<String>,
) -> Result<(), String> {
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.get(url.prefix.clone(), Some(GetOptions::new().with_prefix())))
        .await
        .map_err(|_| "no answer to a read".to_string())?
        .map_err(|e| e.to_string())?;
    let revision = response.header().map_or(0, |h| h.revision());
    let (mut gateways, mut counters) = (BTreeMap::new(), BTreeMap::new());
    for kv in response.kvs() {
        match classify(url, kv.key(), Some(kv.value())) {
            Some(Key::Gateway(name, Some(record))) => {
                gateways.insert(name, (kv.mod_revision(), record));
            }
            Some(Key::Counters(node, Some(c))) => {
                counters.insert(node, c);
            }
            _ => {}
        }
    }
    if !tell(StoreUpdate::Snapshot { revision, gateways, counters }) {
        return Ok(());
    }
    if out_of_reach.take().is_some() {
        info!("store {} reached again at revision {revision}", url.display());
        if !tell(StoreUpdate::Unreachable(None)) {
            return Ok(());
        }
    }
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = client.watch(url.prefix.clone(), Some(options)).await.map_err(|e| e.to_string())?;
    loop {
        let Some(message) = stream.message().await.map_err(|e| e.to_string())? else {
            return Err("the watch ended".into());
        };
        if message.canceled() {
            return Err(format!("the watch was cancelled: {}", message.cancel_reason()));
        }
        for event in message.events() {
            let Some(kv) = event.kv() else { continue };
            let value = (event.event_type() == EventType::Put).then(|| kv.value());
            let update = match classify(url, kv.key(), value) {
                Some(Key::Gateway(name, record)) => StoreUpdate::Gateway { name, revision: kv.mod_revision(), record },
                Some(Key::Counters(node, Some(counters))) => StoreUpdate::Counters { node, counters },
                _ => continue,
            };
            if !tell(update) {
                return Ok(());
            }
        }
    }
}

enum Key {
    Gateway(String, Option<GatewayRecord>),
    Counters(String, Option<NodeCounters>),
}

/// What a key under the prefix is, with its value read (none for a deletion; a value that
/// does not read is skipped with a warning).
fn classify(url: &StoreUrl, key: &[u8], value: Option<&[u8]>) -> Option<Key> {
    let key = std::str::from_utf8(key).ok()?;
    if let Some(name) = key.strip_prefix(&url.gateways_prefix()) {
        let record = match value.map(serde_json::from_slice::<GatewayRecord>) {
            None => None,
            Some(Ok(record)) => Some(record),
            Some(Err(e)) => {
                warn!("store key {key}: not a gateway record ({e}); ignored");
                return None;
            }
        };
        return Some(Key::Gateway(name.to_string(), record));
    }
    let node = key.strip_prefix(&url.counters_prefix())?;
    Some(Key::Counters(node.to_string(), value.and_then(|v| serde_json::from_slice(v).ok())))
}

/// Campaigns for the driver's key for ever: held on a lease this agent keeps alive;
/// `driving` is true only while the key is this agent's and the last renewal succeeded.
async fn campaign(url: StoreUrl, node: String, slot: ClientSlot, driving: Arc<AtomicBool>) {
    loop {
        let client = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some(client) = client {
            if let Err(e) = hold_lease(&url, &node, client, &driving).await {
                if driving.swap(false, Ordering::AcqRel) {
                    warn!("no longer driving the rollouts: {e}");
                }
            }
        }
        tokio::time::sleep(CAMPAIGN_EVERY).await;
    }
}

/// One lease: campaign with it and keep it alive until a renewal fails.
async fn hold_lease(url: &StoreUrl, node: &str, mut client: Client, driving: &AtomicBool) -> Result<(), String> {
    let timed = |what: &'static str| move |_| format!("no answer to {what}");
    let lease = tokio::time::timeout(REQUEST_TIMEOUT, client.lease_grant(DRIVER_LEASE_TTL_SECONDS, None))
        .await
        .map_err(timed("a lease grant"))?
        .map_err(|e| e.to_string())?
        .id();
    let (mut keeper, mut renewals) = client.lease_keep_alive(lease).await.map_err(|e| e.to_string())?;
    let key = url.driver_key();
    loop {
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), node.as_bytes().to_vec(), Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key.clone(), None)]);
        let response =
            tokio::time::timeout(REQUEST_TIMEOUT, client.txn(txn)).await.map_err(timed("the campaign"))?.map_err(|e| e.to_string())?;
        let holds = response.succeeded()
            || response.op_responses().iter().any(|r| match r {
                etcd_client::TxnOpResponse::Get(get) => get.kvs().iter().any(|kv| kv.lease() == lease),
                _ => false,
            });
        tokio::time::timeout(REQUEST_TIMEOUT, keeper.keep_alive()).await.map_err(timed("a renewal"))?.map_err(|e| e.to_string())?;
        let renewed = tokio::time::timeout(REQUEST_TIMEOUT, renewals.message())
            .await
            .map_err(timed("a renewal"))?
            .map_err(|e| e.to_string())?
            .is_some_and(|r| r.ttl() > 0);
        if !renewed {
            return Err("the lease expired".into());
        }
        if driving.swap(holds, Ordering::AcqRel) != holds {
            if holds {
                info!("driving the rollouts (the store's driver lease is this node's)");
            } else {
                info!("another node drives the rollouts");
            }
        }
        tokio::time::sleep(CAMPAIGN_EVERY).await;
    }
}
