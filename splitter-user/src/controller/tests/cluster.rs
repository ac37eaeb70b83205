//! Several controllers sharing one store (in memory, with etcd's revisions and watches):
//! changes made on one node are live on the others, conflicting writes lose whole, an
//! unreachable store refuses changes and stops rollouts, one node drives the rollouts on
//! the counters of all.

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use super::{rollouts::spec, *};
use crate::{
    cluster::{memory::SharedMemory, StoreUpdate},
    controller::CanaryOp,
    rollout::RolloutState,
};

const CANARY: &str = "sava:1.1.0";

struct Node {
    c: TestController,
    heard: mpsc::Receiver<StoreUpdate>,
}

impl Node {
    fn join(store: &SharedMemory, name: &str) -> Self {
        let (handle, heard) = store.join(name);
        let mut c = controller();
        c.set_store(Box::new(handle));
        let mut node = Self { c, heard };
        node.hear();
        node
    }

    /// Applies everything the store said since the last call.
    fn hear(&mut self) {
        while let Ok(update) = self.heard.try_recv() {
            self.c.store_update(update);
        }
    }
}

fn three_nodes() -> (SharedMemory, Vec<Node>) {
    let store = SharedMemory::default();
    let nodes = ["a", "b", "c"].iter().map(|n| Node::join(&store, n)).collect();
    (store, nodes)
}

fn hear_all(nodes: &mut [Node]) {
    for n in nodes {
        n.hear();
    }
}

fn set_weights(c: &mut TestController, canary: &str) -> Result<Reply, ApiError> {
    let stable = format!("{}%", 100 - canary.trim_end_matches('%').parse::<u32>().unwrap());
    apply(c, &weight_doc("sava", &[("sava:1.0.0", &stable), (CANARY, canary)]))
}

#[test]
fn a_change_made_on_one_node_is_live_on_every_node_with_its_events() {
    let (store, mut nodes) = three_nodes();
    apply(&mut nodes[0].c, SAVA).unwrap();
    set_weights(&mut nodes[0].c, "30%").unwrap();
    hear_all(&mut nodes);
    let expected = w(&[("sava:1.0.0", 7000), (CANARY, 3000)]);
    for n in &nodes {
        assert_eq!(live_weights(&n.c, "sava"), expected, "the datapath of every node");
        assert_eq!(n.c.history["sava"], vec![w(&[("sava:1.0.0", 9000), (CANARY, 1000)])], "rollback works from any node");
    }
    let on_b: Vec<_> = nodes[1].c.events().all().filter(|e| e.kind == "weights").map(|e| (e.message.clone(), e.origin.clone())).collect();
    assert_eq!(on_b.len(), 2, "{on_b:?}");
    assert!(on_b.iter().all(|(_, origin)| origin == "agent a"), "{on_b:?}");
    // Rolled back on another node: back everywhere, history popped everywhere.
    nodes[2].c.handle(Op::Rollback { gateway: "sava".into(), flush: false }).unwrap();
    hear_all(&mut nodes);
    for n in &nodes {
        assert_eq!(live_weights(&n.c, "sava"), w(&[("sava:1.0.0", 9000), (CANARY, 1000)]));
        assert!(n.c.history["sava"].is_empty());
    }
    // Deleted on one, gone from all and from the store.
    nodes[1].c.handle(Op::Delete("sava".into())).unwrap();
    hear_all(&mut nodes);
    assert!(nodes.iter().all(|n| n.c.dataplane().live("sava").is_none()));
    assert!(store.gateway("sava").is_none());
}

#[test]
fn of_two_conflicting_writes_exactly_one_wins_and_the_loser_changes_nothing() {
    let (store, mut nodes) = three_nodes();
    apply(&mut nodes[0].c, SAVA).unwrap();
    hear_all(&mut nodes);
    // Both nodes read revision R; A writes first, B has not heard of it yet.
    set_weights(&mut nodes[0].c, "40%").unwrap();
    let events_before = event_messages(&nodes[1].c);
    let generation_before = generation(&nodes[1].c, "sava");
    let err = set_weights(&mut nodes[1].c, "60%").unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict);
    assert_eq!(
        err.message,
        "gateway sava was changed on another node since this node read it: nothing was changed; read it again (`splitter get`) and retry"
    );
    assert_eq!(live_weights(&nodes[1].c, "sava"), w(&[("sava:1.0.0", 9000), (CANARY, 1000)]), "the loser's datapath is as it was");
    assert_eq!(event_messages(&nodes[1].c), events_before, "nor did it record anything");
    assert!(nodes[1].c.history.get("sava").is_none_or(Vec::is_empty));
    assert_ne!(generation(&nodes[1].c, "sava"), None);
    let _ = generation_before;
    let (_, record) = store.gateway("sava").unwrap();
    assert_eq!(record.writer, "a");
    // Once it has heard, the same change is taken.
    hear_all(&mut nodes);
    assert_eq!(live_weights(&nodes[1].c, "sava"), w(&[("sava:1.0.0", 6000), (CANARY, 4000)]));
    set_weights(&mut nodes[1].c, "60%").unwrap();
    hear_all(&mut nodes);
    assert!(nodes.iter().all(|n| live_weights(&n.c, "sava") == w(&[("sava:1.0.0", 4000), (CANARY, 6000)])));
}

#[test]
fn with_the_store_out_of_reach_changes_are_refused_rollouts_stop_and_it_resyncs_after() {
    let (store, mut nodes) = three_nodes();
    store.set_driver(Some("a"));
    apply(&mut nodes[0].c, SAVA).unwrap();
    nodes[0].c.handle(Op::Canary(CanaryOp::Start { gateway: "sava".into(), spec: spec(&[20, 50, 100]) })).unwrap();
    hear_all(&mut nodes);
    nodes[0].c.tick(Instant::now());
    store.set_reachable(false);
    hear_all(&mut nodes);
    let err = set_weights(&mut nodes[1].c, "50%").unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(
        err.message.starts_with("the store memory://test cannot be reached (connection refused): changes are refused until it is back;"),
        "{}",
        err.message
    );
    assert!(!err.message.contains('\n'));
    assert_eq!(live_weights(&nodes[1].c, "sava"), w(&[("sava:1.0.0", 8000), (CANARY, 2000)]));
    // Healthy canary traffic on the driver: no step without the store.
    nodes[0].c.dataplane_mut().traffic("sava", target("10.1.0.21:8080")).new_flows += 50;
    for _ in 0..3 {
        nodes[0].c.tick(Instant::now() + Duration::from_millis(1001));
    }
    assert_eq!(live_weights(&nodes[0].c, "sava")[CANARY], 2000, "the driver took no step");
    assert_eq!(rollouts(&mut nodes[0].c)[0].step, 0);
    // Back: every node converges, the rollout goes on.
    store.set_reachable(true);
    hear_all(&mut nodes);
    set_weights(&mut nodes[1].c, "50%").unwrap();
    hear_all(&mut nodes);
    assert!(nodes.iter().all(|n| live_weights(&n.c, "sava")[CANARY] == 5000));
}

#[test]
fn one_node_drives_a_rollout_on_every_node_s_counters_and_another_takes_over() {
    let (store, mut nodes) = three_nodes();
    store.set_driver(Some("a"));
    apply(&mut nodes[0].c, SAVA).unwrap();
    hear_all(&mut nodes);
    // Started on B: A drives it.
    nodes[1].c.handle(Op::Canary(CanaryOp::Start { gateway: "sava".into(), spec: spec(&[20, 50, 100]) })).unwrap();
    hear_all(&mut nodes);
    for n in nodes.iter_mut() {
        n.c.tick(Instant::now());
    }
    hear_all(&mut nodes);
    // The canary's flows are on C only: A steps on C's counters.
    nodes[2].c.dataplane_mut().traffic("sava", target("10.1.0.21:8080")).new_flows += 30;
    nodes[2].c.tick(Instant::now());
    hear_all(&mut nodes);
    nodes[1].c.tick(after_an_interval());
    hear_all(&mut nodes);
    assert_eq!(live_weights(&nodes[1].c, "sava")[CANARY], 2000, "B does not drive, though it has C's counters");
    nodes[0].c.tick(after_an_interval());
    hear_all(&mut nodes);
    for n in nodes.iter_mut() {
        assert_eq!(live_weights(&n.c, "sava")[CANARY], 5000);
        assert_eq!(rollouts(&mut n.c)[0].step, 1);
    }
    // A stops holding the lease: B takes over at the same step...
    store.set_driver(Some("b"));
    nodes[1].c.tick(Instant::now());
    assert!(
        event_messages(&nodes[1].c).contains(&"rollout: driven by node b from step 2/3".to_string()),
        "{:#?}",
        event_messages(&nodes[1].c)
    );
    nodes[0].c.tick(after_an_interval());
    assert_eq!(rollouts(&mut nodes[0].c)[0].step, 1, "A no longer steps");
    // ...and a failing canary seen on C rolls back on all.
    let t = nodes[2].c.dataplane_mut().traffic("sava", target("10.1.0.21:8080"));
    t.new_flows += 20;
    t.failed_connects += 10;
    nodes[2].c.tick(Instant::now());
    hear_all(&mut nodes);
    nodes[1].c.tick(Instant::now());
    hear_all(&mut nodes);
    for n in nodes.iter_mut() {
        assert_eq!(rollouts(&mut n.c)[0].state, RolloutState::RolledBack);
        assert_eq!(live_weights(&n.c, "sava"), w(&[("sava:1.0.0", 9000), (CANARY, 1000)]));
        let rolled_back: Vec<_> = n.c.events().all().filter(|e| e.message.starts_with("rolled back: ")).collect();
        assert_eq!(rolled_back.len(), 1, "every node records the one decision");
    }
}

#[test]
fn an_empty_store_takes_the_first_node_s_gateways_and_a_later_node_takes_the_store_s() {
    let store = SharedMemory::default();
    let mut a = controller();
    apply(&mut a, SAVA).unwrap();
    let (handle, heard) = store.join("a");
    a.set_store(Box::new(handle));
    let mut a = Node { c: a, heard };
    a.hear();
    assert_eq!(store.gateway("sava").unwrap().1.writer, "a");
    let mut b = controller();
    apply(&mut b, OTHER).unwrap();
    let (handle, heard) = store.join("b");
    b.set_store(Box::new(handle));
    let mut b = Node { c: b, heard };
    b.hear();
    assert!(b.c.dataplane().live("sava").is_some());
    assert!(b.c.dataplane().live("other").is_none(), "the store's gateways win over a joining node's");
}

fn after_an_interval() -> Instant {
    Instant::now() + Duration::from_millis(1001)
}

#[test]
fn a_change_made_against_a_revision_read_earlier_loses_to_one_made_since() {
    let (store, mut nodes) = three_nodes();
    apply(&mut nodes[0].c, SAVA).unwrap();
    hear_all(&mut nodes);
    let read = store.gateway("sava").unwrap().0;
    let with_revision = |canary: &str| Op::IfRevision {
        revision: read,
        op: Box::new(Op::Apply {
            origin: "op".into(),
            text: weight_doc("sava", &[(CANARY, canary)]),
            path_name: None,
            validate_only: false,
        }),
    };
    nodes[0].c.handle(with_revision("50%")).unwrap();
    hear_all(&mut nodes);
    // B has heard of A's change, but its operator read the gateway before it.
    let err = nodes[1].c.handle(with_revision("30%")).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict);
    assert_eq!(
        err.message,
        format!("gateway sava is no longer at store revision {read}: nothing was changed; read it again (`splitter get`) and retry")
    );
    assert_eq!(store.gateway("sava").unwrap().1.writer, "a");
    assert_eq!(live_weights(&nodes[1].c, "sava")[CANARY], 5000);
    let err = controller().handle(with_revision("30%")).unwrap_err();
    assert_eq!(err.message, "if_revision: this agent shares no store (--store)");
}
