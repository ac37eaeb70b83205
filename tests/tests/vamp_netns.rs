//! Vamp's clients against the control socket, unchanged: the vamp-runner canary-release
//! workflow (GET the gateway as JSON with `?page=1`, read the route weight strings, set new
//! ones in the returned object, PUT it back as JSON, POST an event) moves the live split
//! step by step, real traffic following every step; `validate_only` changes nothing.

use splitter_tests::{
    privileged,
    testbed::{sava_gateway, Testbed, SAVA_CANARY as CANARY, SAVA_STABLE as STABLE},
};

/// Vamp's internal gateway name, slashes and all.
const GATEWAY: &str = "sava/sava/port";
const URL: &str = "http://splitter/api/v1/gateways/sava/sava/port";

fn bed() -> Testbed {
    let mut bed = Testbed::new().unwrap();
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[]).unwrap();
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[]).unwrap();
    bed.write_config("sava.yaml", &sava_gateway(GATEWAY, 9050, "100%", "0%", "10.10.2.21:8080", "")).unwrap();
    bed.start_agent(&[]).unwrap();
    bed
}

/// The GET of a Vamp client: JSON, first page.
fn get_gateway(bed: &Testbed) -> serde_json::Value {
    let (body, code) = bed.curl(&["-H", "Accept: application/json", &format!("{URL}?page=1")]);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn put_gateway(bed: &Testbed, gateway: &serde_json::Value, query: &str) -> (String, u16) {
    bed.curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "-H",
        "Accept: application/json",
        "-A",
        "vamp-runner",
        "--data-binary",
        &gateway.to_string(),
        &format!("{URL}{query}"),
    ])
}

fn weight_of(gateway: &serde_json::Value, route: &str) -> String {
    gateway["routes"][route]["weight"].as_str().unwrap_or_else(|| panic!("no weight string for {route} in {gateway}")).to_string()
}

/// The canary's observed share is within 4.5 standard deviations (and a point) of `percent`.
fn assert_share(bed: &Testbed, percent: f64) {
    let n = 400;
    let seen = bed.sample(9050, n);
    let canary = seen.get("1.1.0").copied().unwrap_or(0) as f64;
    let observed = 100.0 * canary / n as f64;
    let sigma = (percent * (100.0 - percent) / n as f64).sqrt();
    println!("canary at {percent}%: observed {observed:.1}% of {n} (sigma {sigma:.2}) {seen:?}");
    assert!((observed - percent).abs() <= 4.5 * sigma + 1.0, "canary at {percent}%: observed {observed:.1}% ({seen:?})");
}

#[test]
fn the_vamp_runner_canary_workflow_moves_the_live_split() {
    if !privileged("the_vamp_runner_canary_workflow_moves_the_live_split") {
        return;
    }
    let bed = bed();
    assert_share(&bed, 0.0);
    for canary in [5u32, 25, 50, 75, 100] {
        let mut gateway = get_gateway(&bed);
        // As the recipe does: read the weights as strings, then write new ones.
        let stable_before: f64 = weight_of(&gateway, STABLE).trim_end_matches('%').parse().unwrap();
        let canary_before: f64 = weight_of(&gateway, CANARY).trim_end_matches('%').parse().unwrap();
        assert_eq!(stable_before + canary_before, 100.0);
        gateway["routes"][STABLE]["weight"] = format!("{}%", 100 - canary).into();
        gateway["routes"][CANARY]["weight"] = format!("{canary}%").into();
        let (body, code) = put_gateway(&bed, &gateway, "");
        assert_eq!(code, 200, "{body}");
        let event = serde_json::json!({"tags": ["gateways:sava/sava/port", "canary"], "value": format!("canary at {canary}%"), "type": "canary-progress"});
        let (body, code) = bed.curl(&[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-A",
            "vamp-runner",
            "--data-binary",
            &event.to_string(),
            "http://splitter/api/v1/events",
        ]);
        assert_eq!(code, 200, "{body}");
        assert_eq!(weight_of(&get_gateway(&bed), CANARY), format!("{canary}%"));
        assert_share(&bed, f64::from(canary));
    }
    // Rolled back by writing the weights back.
    let mut gateway = get_gateway(&bed);
    gateway["routes"][STABLE]["weight"] = "100%".into();
    gateway["routes"][CANARY]["weight"] = "0%".into();
    let (body, code) = put_gateway(&bed, &gateway, "");
    assert_eq!(code, 200, "{body}");
    assert_share(&bed, 0.0);

    // The recorded progress is in the event log, in Vamp's shape and in `splitter events`.
    let (body, code) = bed.curl(&["http://splitter/api/v1/events?tag=canary&type=canary-progress"]);
    assert_eq!(code, 200, "{body}");
    let events: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let values: Vec<&str> = events.iter().map(|e| e["value"].as_str().unwrap()).collect();
    assert_eq!(values, ["canary at 5%", "canary at 25%", "canary at 50%", "canary at 75%", "canary at 100%"]);
    assert!(events.iter().all(|e| e["tags"][0] == "gateways:sava/sava/port" && e["timestamp"].as_str().is_some_and(|t| t.ends_with('Z'))));
    let cli = bed.cli_ok(&["events", GATEWAY]).unwrap();
    assert!(cli.contains("external: canary-progress: canary at 50% (tags: gateways:sava/sava/port, canary; from vamp-runner)"), "{cli}");
}

#[test]
fn validate_only_changes_nothing_and_lists_page() {
    if !privileged("validate_only_changes_nothing_and_lists_page") {
        return;
    }
    let bed = bed();
    let before = get_gateway(&bed);
    let generation = before["status"]["generation"].as_u64().unwrap();
    let mut half = before.clone();
    half["routes"][STABLE]["weight"] = "50%".into();
    half["routes"][CANARY]["weight"] = "50%".into();
    let (body, code) = put_gateway(&bed, &half, "?validate_only=true");
    assert_eq!(code, 200, "{body}");
    let answered: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(weight_of(&answered, CANARY), "50%", "answered as if applied, as the one gateway a PUT names");
    let after = get_gateway(&bed);
    assert_eq!((weight_of(&after, CANARY), after["status"]["generation"].as_u64()), ("0%".to_string(), Some(generation)));
    assert!(bed.cli_ok(&["get", GATEWAY]).unwrap().contains("weight: 0%"));
    assert_share(&bed, 0.0);

    // A refusal is Vamp's status with a message.
    let (body, code) = bed.curl(&["-H", "Accept: application/json", "http://splitter/api/v1/gateways/nope"]);
    assert_eq!(code, 404);
    let refusal: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(refusal["message"], "no gateway nope");
    // Lists page like Vamp's.
    let (body, _) = bed.curl(&["-H", "Accept: application/json", "http://splitter/api/v1/gateways?page=1&per_page=1"]);
    let page: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(page.len(), 1);
    let (body, _) = bed.curl(&["-H", "Accept: application/json", "http://splitter/api/v1/gateways?page=2"]);
    assert_eq!(body, "[]");
    let (body, code) = bed.curl(&["http://splitter/api/v1/info"]);
    assert_eq!(code, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((info["name"].as_str(), info["gateways"].as_u64()), (Some("splitter"), Some(1)));
}
