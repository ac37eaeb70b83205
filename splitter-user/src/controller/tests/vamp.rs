//! Vamp's clients: a gateway read as JSON and written back as it is, or with new weight
//! strings, changes exactly what they changed; `validate_only` changes nothing; events.

use proptest::prelude::*;

use super::*;
use crate::{
    api::{ExternalEvent, Format},
    controller::{EventBudget, Op},
    gateway::format_weight,
};

fn get_json(c: &mut TestController, name: &str) -> serde_json::Value {
    let reply = c.handle(Op::Get(name.into())).unwrap();
    serde_json::from_str(&reply.answer.render(Format::Json).1).unwrap()
}

fn put_json(c: &mut TestController, name: &str, body: &serde_json::Value) -> Result<Reply, ApiError> {
    c.handle(Op::Apply { origin: "PUT body".into(), text: body.to_string(), path_name: Some(name.into()), validate_only: false })
}

#[test]
fn the_json_is_in_vamps_shape() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    let v = get_json(&mut c, "sava");
    assert_eq!(v["port"], "9050/http");
    assert_eq!(v["routes"]["sava:1.1.0"]["weight"], "10%");
    assert_eq!(v["routes"]["sava:1.0.0"]["targets"], serde_json::json!(["10.1.0.11:8080", "10.1.0.12:8080"]));
    assert_eq!(v["sticky"], serde_json::Value::Null);
    assert_eq!((v["virtual_address"].as_str(), v["deployed"].as_bool()), (Some("10.0.0.10"), Some(true)));
    assert_eq!(v["lookup_name"].as_str().map(str::len), Some(32));
    assert_eq!(v["status"]["generation"], 1);
}

#[test]
fn a_vamp_client_moves_the_weights_with_strings() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    let mut v = get_json(&mut c, "sava");
    v["routes"]["sava:1.0.0"]["weight"] = "95%".into();
    v["routes"]["sava:1.1.0"]["weight"] = "5%".into();
    put_json(&mut c, "sava", &v).unwrap();
    assert_eq!(live_weights(&c, "sava"), w(&[("sava:1.0.0", 9500), ("sava:1.1.0", 500)]));
    let unchanged = get_json(&mut c, "sava");
    let generation_before = generation(&c, "sava");
    let reply = put_json(&mut c, "sava", &unchanged).unwrap();
    assert!(yaml(&reply).starts_with("name: \"sava\"\n") && yaml(&reply).ends_with("\n# unchanged\n"), "{}", yaml(&reply));
    assert_eq!(generation(&c, "sava"), generation_before);
}

#[test]
fn validate_only_answers_as_if_applied_and_changes_nothing() {
    let mut c = controller();
    apply(&mut c, SAVA).unwrap();
    let (switches, events) = (c.dataplane().switches, c.events().all().count());
    let text = weight_doc("sava", &[("sava:1.1.0", "40%")]);
    let reply = c.handle(Op::Apply { origin: "body".into(), text, path_name: Some("sava".into()), validate_only: true }).unwrap();
    let body = yaml(&reply);
    assert!(body.contains("weight: 40%") && body.ends_with("# validated only: nothing was changed\n"), "{body}");
    assert_eq!((c.dataplane().switches, c.events().all().count(), generation(&c, "sava")), (switches, events, Some(1)));
    assert_eq!(weights(&c, "sava")["sava:1.1.0"], 1000);
    let clash = OTHER.replace("10.0.0.20", "10.0.0.10").replace("80/tcp", "9050/tcp");
    let refused = c.handle(Op::Apply { origin: "body".into(), text: clash, path_name: None, validate_only: true }).unwrap_err();
    assert_eq!(refused.kind, ErrorKind::Conflict, "validated against the datapath like a real change");
}

#[test]
fn external_events_are_recorded_bounded_and_rate_limited() {
    let mut c = controller();
    let event = |value: serde_json::Value| ExternalEvent {
        tags: vec!["gateways:sava".into(), "deployments:sava".into()],
        value,
        event_type: "canary".into(),
        timestamp: None,
    };
    c.handle(Op::RecordEvent { event: event("step 1".into()), origin: "vamp-runner".into() }).unwrap();
    let messages = event_messages(&c);
    assert_eq!(messages, ["external: canary: step 1 (tags: gateways:sava, deployments:sava; from vamp-runner)"]);
    let big = event(serde_json::Value::String("x".repeat(9000)));
    assert_eq!(kind(c.handle(Op::RecordEvent { event: big, origin: "t".into() })), ErrorKind::Invalid);
    let mut refused = 0;
    for i in 0..(EventBudget::BURST as usize + 10) {
        if c.handle(Op::RecordEvent { event: event(i.into()), origin: "t".into() }).is_err() {
            refused += 1;
        }
    }
    assert!(refused >= 10, "a burst beyond the budget is refused ({refused})");
    let Answer::Events(tagged) = c.handle(Op::Events { since: 0, tags: vec!["deployments:sava".into()], event_type: None }).unwrap().answer
    else {
        panic!("events")
    };
    assert!(tagged.iter().all(|e| e.kind == "external") && tagged.len() >= EventBudget::BURST as usize - 1);
}

/// A generated gateway: 1 to 4 routes with weights adding up to 100% (in hundredths of a
/// percent), 1 to 3 targets each, any stickiness and mode, with or without health checks.
fn gateway_text() -> impl Strategy<Value = String> {
    let shape = (1usize..=4, prop::bool::ANY, prop::bool::ANY, prop::bool::ANY);
    (shape, prop::collection::vec(0u32..=10_000, 4), prop::collection::vec(1usize..=3, 4)).prop_map(
        |((routes, sticky, dnat, checked), cuts, counts)| {
            let weights = split_100(&cuts[..routes]);
            let mut doc = format!(
                "name: gen/gw\nport: 8080/http\nvirtual_address: 10.0.0.50\nsticky: {}\nmode: {}\nroutes:\n",
                if sticky { "client" } else { "none" },
                if dnat { "dnat" } else { "fullnat" }
            );
            for (r, weight) in weights.iter().enumerate() {
                let targets: Vec<String> = (0..counts[r]).map(|t| format!("10.1.{r}.{}:80", t + 1)).collect();
                doc.push_str(&format!("  route-{r}:\n    weight: {}\n    targets: [{}]\n", format_weight(*weight), targets.join(", ")));
            }
            if checked {
                doc.push_str("health_check:\n  protocol: http\n  path: /health\n  port: 8081\n  interval: 2s\n  timeout: 500ms\n");
            }
            doc
        },
    )
}

/// Weights (hundredths of a percent) in proportion to `cuts` that add up to 100%.
fn split_100(cuts: &[u32]) -> Vec<u32> {
    let parts = splitter_common::apportion::largest_remainder(10_000, &cuts.iter().map(|c| u64::from(*c)).collect::<Vec<_>>(), true);
    parts.into_iter().map(|p| p as u32).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn put_of_get_changes_nothing_and_new_weights_change_only_weights(doc in gateway_text(), cuts in prop::collection::vec(0u32..=10_000, 4)) {
        let mut c = controller();
        apply(&mut c, &doc).unwrap();
        let before = c.configured["gen/gw"].clone();
        let (generation_before, switches) = (generation(&c, "gen/gw"), c.dataplane().switches);
        let json = get_json(&mut c, "gen/gw");
        let reply = put_json(&mut c, "gen/gw", &json).unwrap();
        prop_assert!(yaml(&reply).ends_with("\n# unchanged\n"), "the gateway as it runs, unchanged: {}", yaml(&reply));
        prop_assert_eq!((generation(&c, "gen/gw"), c.dataplane().switches), (generation_before, switches));

        let mut changed = json.clone();
        let names: Vec<String> = before.routes.iter().map(|r| r.name.clone()).collect();
        let new_weights = split_100(&cuts[..names.len()]);
        for (name, weight) in names.iter().zip(&new_weights) {
            changed["routes"][name]["weight"] = format_weight(*weight).into();
        }
        put_json(&mut c, "gen/gw", &changed).unwrap();
        let after = c.configured["gen/gw"].clone();
        let expected: BTreeMap<String, u32> = names.iter().cloned().zip(new_weights).collect();
        prop_assert_eq!(weights(&c, "gen/gw"), expected);
        let mut same_but_weights = after.clone();
        for (route, old) in same_but_weights.routes.iter_mut().zip(&before.routes) {
            route.weight = old.weight;
            route.explicit_weight = old.explicit_weight;
        }
        prop_assert_eq!(same_but_weights, before);
    }
}
