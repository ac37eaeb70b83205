//! A Vamp blueprint or deployment pasted where a gateway is expected (top-level `clusters:`
//! or `gateways:`, as in the DC/OS simpleservice blueprint or the Vamp tutorial's
//! `PUT /api/v1/deployments/sava`): an error that says what it is and gives the gateway
//! document to write instead, on one line (YAML flow style, so it can be pasted as it is).

use super::Reader;
use crate::gateway::{
    yaml::{Node, NodeValue},
    ConfigError,
};

/// The value of `key` in a mapping node.
fn get<'n>(node: &'n Node, key: &str) -> Option<&'n Node> {
    let NodeValue::Mapping(entries) = &node.value else { return None };
    entries.iter().find(|(k, _)| k.scalar() == Some(key)).map(|(_, v)| v)
}

fn entries(node: Option<&Node>) -> &[(Node, Node)] {
    match node.map(|n| &n.value) {
        Some(NodeValue::Mapping(entries)) => entries,
        _ => &[],
    }
}

fn items(node: Option<&Node>) -> &[Node] {
    match node.map(|n| &n.value) {
        Some(NodeValue::Sequence(items)) => items,
        _ => &[],
    }
}

/// A double-quoted flow scalar.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// One service of a cluster: its name (the breed's), protocol and instance count.
struct Service {
    name: String,
    protocol: String,
    instances: usize,
}

fn services(cluster: &Node) -> Vec<Service> {
    items(get(cluster, "services"))
        .iter()
        .map(|service| {
            let breed = get(service, "breed");
            let name = breed
                .and_then(|b| b.scalar().map(str::to_owned).or_else(|| get(b, "name").and_then(Node::scalar).map(str::to_owned)))
                .unwrap_or_else(|| "SERVICE".into());
            let protocol = breed
                .and_then(|b| entries(get(b, "ports")).first().and_then(|(_, p)| p.scalar()))
                .and_then(|p| p.split_once('/').map(|(_, proto)| proto.to_owned()))
                .unwrap_or_else(|| "http".into());
            let instances = get(service, "scale")
                .and_then(|s| get(s, "instances"))
                .and_then(Node::scalar)
                .and_then(|n| n.parse().ok())
                .unwrap_or(1usize)
                .clamp(1, 16);
            Service { name, protocol, instances }
        })
        .collect()
}

impl Reader<'_> {
    /// The error for a blueprint or deployment, when `root` is one.
    pub(super) fn blueprint_error(&self, root: &Node) -> Option<ConfigError> {
        let clusters = get(root, "clusters");
        let gateways = get(root, "gateways");
        let NodeValue::Mapping(top) = &root.value else { return None };
        let key = top.iter().find(|(k, _)| matches!(k.scalar(), Some("clusters" | "gateways"))).map(|(k, _)| k)?;
        let deployment = get(root, "name").and_then(Node::scalar).unwrap_or("DEPLOYMENT");
        // Vamp's blueprint gateways: `PORT: CLUSTER/port`.
        let exposed: Vec<(String, String)> =
            entries(gateways).iter().filter_map(|(k, v)| Some((k.scalar()?.to_owned(), v.scalar().unwrap_or("").to_owned()))).collect();
        let mut suggestions = Vec::new();
        for (cluster_key, cluster) in entries(clusters) {
            let cluster_name = cluster_key.scalar().unwrap_or("CLUSTER");
            let services = services(cluster);
            let protocol = services.first().map_or("http", |s| s.protocol.as_str());
            let (port, name) = exposed
                .iter()
                .find(|(_, target)| target.starts_with(&format!("{cluster_name}/")))
                .map(|(port, target)| (port.clone(), target.clone()))
                .unwrap_or_else(|| ("PORT".into(), format!("{deployment}/{cluster_name}/port")));
            let written: Vec<(String, Option<String>)> = entries(get(cluster, "gateways").and_then(|g| get(g, "routes")))
                .iter()
                .filter_map(|(k, v)| Some((k.scalar()?.to_owned(), get(v, "weight").and_then(Node::scalar).map(str::to_owned))))
                .collect();
            let routes: Vec<(String, Option<String>)> =
                if written.is_empty() { services.iter().map(|s| (s.name.clone(), None)).collect() } else { written };
            let routes: Vec<String> = routes
                .iter()
                .map(|(route, weight)| {
                    let service = services.iter().find(|s| s.name == *route).or_else(|| services.iter().find(|s| route.contains(&s.name)));
                    let instances = service.map_or(1, |s| s.instances);
                    let targets = vec!["HOST:PORT"; instances].join(", ");
                    match weight {
                        Some(w) => format!("{}: {{weight: {}, targets: [{targets}]}}", quoted(route), quoted(w)),
                        None => format!("{}: {{targets: [{targets}]}}", quoted(route)),
                    }
                })
                .collect();
            suggestions.push(format!(
                "{{name: {}, port: {}, virtual_address: VIP, routes: {{{}}}}}",
                quoted(&name),
                quoted(&format!("{port}/{protocol}")),
                routes.join(", ")
            ));
        }
        if suggestions.is_empty() {
            suggestions.push(
                "{name: NAME, port: \"PORT/http\", virtual_address: VIP, routes: {ROUTE: {weight: \"100%\", targets: [HOST:PORT]}}}".into(),
            );
        }
        let field = key.scalar().unwrap_or("clusters");
        Some(self.error(
            Some(key.position),
            field,
            format!(
                "this is a Vamp blueprint or deployment (clusters of services), not a gateway document: the splitter needs the gateway \
                 with its targets; write instead (one document per gateway, HOST:PORT for each instance, VIP the address clients use): {}",
                suggestions.join(" --- ")
            ),
        ))
    }
}
