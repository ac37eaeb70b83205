//! Reading gateway documents from the YAML node tree, with the weight rules.

mod blocks;
mod blueprint;
mod scalars;

pub use scalars::{check_name, format_weight, parse_weight, MAX_NAME_BYTES};
use scalars::{check_unicast, parse_port_number, parse_port_spec};
pub(in crate::gateway) use scalars::{effective_weights, parse_target};

use std::{collections::BTreeMap, net::IpAddr};

use super::{
    policy::{CanarySpec, HealthCheck, SourceSpec},
    yaml::{self, Node, NodeValue, Position},
    ConfigError, Document, Gateway, Mode, Protocol, Route, Sticky, Target, WeightUpdate, MAX_TARGETS_PER_GATEWAY,
};

/// A document with the positions needed by checks across documents.
pub(super) struct ParsedDocument {
    pub document: Document,
    pub name_position: Position,
}

/// What a gateway definition sets beside its routes, as read.
struct Policies {
    health_check: Option<HealthCheck>,
    canary: Option<(CanarySpec, Position)>,
    source: SourceSpec,
    connect_timeout_ms: Option<u32>,
}

/// Top-level fields of a gateway document.
const GATEWAY_FIELDS: &[&str] = &[
    "name",
    "port",
    "virtual_address",
    "sticky",
    "mode",
    "connect_timeout",
    "active",
    "filters",
    "routes",
    "health_check",
    "canary",
    "source",
];
const HEALTH_CHECK_FIELDS: &[&str] =
    &["protocol", "path", "expected_status", "port", "interval", "timeout", "unhealthy_threshold", "healthy_threshold"];
const CANARY_FIELDS: &[&str] = &[
    "route",
    "steps",
    "interval",
    "max_error_rate",
    "max_http_error_rate",
    "max_failed_checks",
    "max_connect_latency",
    "min_flows",
    "flush_on_rollback",
    "metrics",
    "max_inconclusive",
    "webhooks",
];
/// Fields of Vamp's gateway export that say nothing the splitter acts on: accepted, ignored.
/// `status` is the splitter's own live status in its JSON, read back in a round trip.
const GATEWAY_EXPORT_FIELDS: &[&str] = &["kind", "metadata", "lookup_name", "internal", "deployed", "virtual_hosts", "status"];
const ROUTE_FIELDS: &[&str] = &["weight", "targets", "instances", "filters"];
/// Route fields of Vamp's export; `condition` and `rewrites` are L7 and must be empty.
const ROUTE_EXPORT_FIELDS: &[&str] = &["lookup_name", "balance", "condition", "condition_strength", "rewrites"];
const INSTANCE_FIELDS: &[&str] = &["name", "host", "port"];
const INSTANCE_EXPORT_FIELDS: &[&str] = &["deployed"];

const L7_REFUSED: &str = "L7 filters cannot be applied at L4: the splitter places TCP/UDP flows, \
                          it does not look into HTTP requests (leave it out or empty)";

pub(super) fn parse_stream(origin: &str, text: &str) -> Result<Vec<ParsedDocument>, ConfigError> {
    let roots = yaml::parse_stream(text)
        .map_err(|err| ConfigError::at(origin, Some(err.position), "", format!("YAML syntax error: {}", err.message)))?;
    let reader = Reader { origin };
    let mut documents: Vec<ParsedDocument> = Vec::new();
    for root in roots.iter().filter(|root| !root.is_null()) {
        let parsed = reader.document(root)?;
        if let Document::Gateway(gateway) = &parsed.document {
            let earlier =
                documents.iter().find(|earlier| matches!(&earlier.document, Document::Gateway(other) if other.name == gateway.name));
            if let Some(earlier) = earlier {
                return Err(reader.error(
                    Some(parsed.name_position),
                    "name",
                    format!("gateway {} is defined twice (first at line {})", gateway.name, earlier.name_position.line),
                ));
            }
        }
        documents.push(parsed);
    }
    if documents.is_empty() {
        return Err(ConfigError::new(origin, "no gateway document (the input is empty)"));
    }
    Ok(documents)
}

struct Reader<'a> {
    origin: &'a str,
}

/// A mapping's entries by field name: (key node, value node).
pub(super) struct Fields<'n> {
    entries: BTreeMap<&'n str, (&'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    fn value(&self, name: &str) -> Option<&'n Node> {
        self.entries.get(name).map(|(_, value)| *value).filter(|value| !value.is_null())
    }

    fn key_position(&self, name: &str) -> Option<Position> {
        self.entries.get(name).map(|(key, _)| key.position)
    }
}

/// A route as written, before the checks across routes.
struct RouteDocument<'n> {
    name: String,
    key: &'n Node,
    weight: Option<u32>,
    /// `None` when the route lists neither targets nor instances.
    targets: Option<Vec<(Target, &'n Node, String)>>,
}

impl<'a> Reader<'a> {
    fn error(&self, position: Option<Position>, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.origin, position, field, message)
    }

    fn document(&self, root: &Node) -> Result<ParsedDocument, ConfigError> {
        if !matches!(root.value, NodeValue::Mapping(_)) {
            return Err(self.error(
                Some(root.position),
                "",
                format!("a gateway document is a mapping with name, port and routes, found {}", root.describe()),
            ));
        }
        if let Some(err) = self.blueprint_error(root) {
            return Err(err);
        }
        let fields = self.fields(root, "", GATEWAY_FIELDS, GATEWAY_EXPORT_FIELDS)?;

        let name_node =
            fields.value("name").ok_or_else(|| self.error(Some(root.position), "name", "missing: every gateway document needs a name"))?;
        let name = self.name(name_node, "name")?;

        let port = match fields.value("port") {
            Some(node) => {
                let text = self.scalar(node, "port", "a port like 9050/http")?;
                Some(parse_port_spec(text).map_err(|why| self.error(Some(node.position), "port", why))?)
            }
            None => None,
        };
        let virtual_address = match fields.value("virtual_address") {
            Some(node) => {
                let text = self.scalar(node, "virtual_address", "an IPv4 or IPv6 address")?;
                let addr: IpAddr = text
                    .trim()
                    .parse()
                    .map_err(|_| self.error(Some(node.position), "virtual_address", format!("`{text}` is not an IPv4 or IPv6 address")))?;
                check_unicast(addr).map_err(|why| self.error(Some(node.position), "virtual_address", why))?;
                Some(addr)
            }
            None => None,
        };
        let sticky = match fields.value("sticky") {
            None => None,
            // Vamp writes `sticky: null` for no stickiness.
            Some(node) if node.is_null() => Some(Sticky::Flow),
            Some(node) => Some(self.choice(
                node,
                "sticky",
                &[("none", Sticky::Flow), ("client", Sticky::Client), ("service", Sticky::Client), ("instance", Sticky::Client)],
            )?),
        };
        let mode = match fields.value("mode") {
            None => None,
            Some(node) => Some(self.choice(node, "mode", &[("fullnat", Mode::FullNat), ("dnat", Mode::Dnat), ("dsr", Mode::Dsr)])?),
        };
        self.refuse_l7(fields.value("filters"), "filters")?;
        let health_check = fields.value("health_check").map(|n| self.health_check(n)).transpose()?;
        let canary = fields.value("canary").map(|n| self.canary(n)).transpose()?;
        let source = fields.value("source").map(|n| self.source(n)).transpose()?;
        let connect_timeout_ms = fields.value("connect_timeout").map(|n| self.connect_timeout(n)).transpose()?;
        if let (Some(Mode::Dnat), Some(node)) = (mode, fields.value("source")) {
            return Err(self.error(
                Some(node.position),
                "source",
                "only full NAT rewrites the source: mode dnat keeps the client's address",
            ));
        }
        if let (Some(spec), Some(node)) = (&source, fields.value("source")) {
            let dsr = mode == Some(Mode::Dsr);
            if dsr && (!spec.addresses.is_empty() || spec.ports.is_some()) {
                return Err(self.error(
                    Some(node.position),
                    "source",
                    "mode dsr sends the client's packet unchanged: only `prefix` (the outer header's source addresses) applies",
                ));
            }
            if !dsr && spec.prefix.is_some() {
                return Err(self.error(
                    Some(node.position),
                    "source.prefix",
                    "only mode dsr has an outer header whose source a prefix sets",
                ));
            }
        }

        let routes_node = fields.value("routes").ok_or_else(|| {
            let position = fields.key_position("routes").unwrap_or(root.position);
            self.error(Some(position), "routes", "missing: a gateway needs at least one route")
        })?;
        let routes_position = fields.key_position("routes");
        let routes = self.routes(routes_node)?;

        let has_targets = routes.iter().any(|route| route.targets.is_some());
        let document = if has_targets {
            let policies = Policies { health_check, canary, source: source.unwrap_or_default(), connect_timeout_ms };
            self.gateway(root, &fields, name, port, virtual_address, sticky, mode, routes, routes_position, policies)?
        } else {
            // A weights-only update: it may repeat the port (Vamp's own update does) but must
            // not look like it changes what only a full definition sets.
            for field in ["virtual_address", "sticky", "mode", "connect_timeout", "health_check", "canary", "source"] {
                if fields.value(field).is_some() {
                    return Err(self.error(
                        fields.key_position(field),
                        field,
                        "no route lists targets, so this is a weights-only update, which cannot set \
                         this field: give every route its targets to define the gateway",
                    ));
                }
            }
            let mut sorted: Vec<(&str, Option<u32>)> = routes.iter().map(|route| (route.name.as_str(), route.weight)).collect();
            sorted.sort_unstable();
            let names: Vec<&str> = sorted.iter().map(|(name, _)| *name).collect();
            let weights: Vec<Option<u32>> = sorted.iter().map(|(_, weight)| *weight).collect();
            effective_weights(&names, &weights, false).map_err(|why| self.error(routes_position, "routes", why))?;
            Document::Weights(WeightUpdate { name, weights: routes.into_iter().map(|route| (route.name, route.weight)).collect() })
        };
        Ok(ParsedDocument { document, name_position: name_node.position })
    }

    #[expect(clippy::too_many_arguments, reason = "the top-level fields of a document, each already read")]
    fn gateway(
        &self,
        root: &Node,
        fields: &Fields<'_>,
        name: String,
        port: Option<(u16, Protocol)>,
        virtual_address: Option<IpAddr>,
        sticky: Option<Sticky>,
        mode: Option<Mode>,
        routes: Vec<RouteDocument<'_>>,
        routes_position: Option<Position>,
        policies: Policies,
    ) -> Result<Document, ConfigError> {
        let Policies { health_check, canary, source, connect_timeout_ms } = policies;
        let (port, protocol) = port.ok_or_else(|| {
            self.error(
                fields.key_position("port").or(Some(root.position)),
                "port",
                "missing: a gateway needs its port, like port: 9050/http",
            )
        })?;
        let virtual_address = virtual_address.ok_or_else(|| {
            self.error(
                fields.key_position("virtual_address").or(Some(root.position)),
                "virtual_address",
                "missing: a gateway needs its virtual address (the VIP), like virtual_address: 10.0.0.10",
            )
        })?;

        if virtual_address.is_ipv6() && (!source.addresses.is_empty() || source.prefix.is_some()) {
            return Err(self.error(
                fields.key_position("source").or(Some(root.position)),
                "source",
                format!(
                    "source addresses and prefixes are IPv4, and the virtual address {virtual_address} is IPv6: an IPv6 \
                     gateway's packets leave from the node's own address (source.ports may be set)"
                ),
            ));
        }

        // Every route needs targets, and a target belongs to one route only.
        let mut first_seen: BTreeMap<Target, String> = BTreeMap::new();
        for route in &routes {
            let route_field = format!("routes.{}", route.name);
            let Some(targets) = &route.targets else {
                return Err(self.error(
                    Some(route.key.position),
                    &route_field,
                    "no targets, while other routes have some: in a gateway definition every route \
                     lists its targets (or instances); a weights-only update lists none",
                ));
            };
            for (target, node, field) in targets {
                if target.addr.is_ipv4() != virtual_address.is_ipv4() {
                    return Err(self.error(
                        Some(node.position),
                        field,
                        format!(
                            "target {target} is not of the family of the virtual address {virtual_address}: a gateway \
                             forwards IPv4 to IPv4 and IPv6 to IPv6"
                        ),
                    ));
                }
                if let Some(first) = first_seen.insert(*target, field.clone()) {
                    return Err(self.error(Some(node.position), field, format!("duplicate target {target} (already at {first})")));
                }
                if mode == Some(Mode::Dsr) && target.port != port {
                    return Err(self.error(
                        Some(node.position),
                        field,
                        format!(
                            "target {target}: mode dsr delivers the client's packet unchanged, so a target serves the \
                             gateway's port {} (on the VIP, held on its loopback)",
                            port
                        ),
                    ));
                }
            }
        }
        if first_seen.len() > MAX_TARGETS_PER_GATEWAY {
            return Err(self.error(
                routes_position,
                "routes",
                format!("{} targets: at most {MAX_TARGETS_PER_GATEWAY} per gateway", first_seen.len()),
            ));
        }

        let mut routes = routes;
        routes.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<&str> = routes.iter().map(|route| route.name.as_str()).collect();
        let weights: Vec<Option<u32>> = routes.iter().map(|route| route.weight).collect();
        let effective = effective_weights(&names, &weights, true).map_err(|why| self.error(routes_position, "routes", why))?;
        let routes = routes
            .into_iter()
            .zip(effective)
            .map(|(route, weight)| Route {
                name: route.name,
                weight,
                explicit_weight: route.weight,
                targets: route.targets.unwrap_or_default().into_iter().map(|(target, _, _)| target).collect(),
            })
            .collect::<Vec<Route>>();
        let canary = match canary {
            Some((spec, position)) => {
                if !routes.iter().any(|r| r.name == spec.route) {
                    let known: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
                    return Err(self.error(
                        Some(position),
                        "canary.route",
                        format!("no route {} in this gateway (its routes: {})", spec.route, known.join(", ")),
                    ));
                }
                if routes.len() < 2 {
                    return Err(self.error(Some(position), "canary.route", "a canary needs another route to fall back to"));
                }
                Some(spec)
            }
            None => None,
        };
        Ok(Document::Gateway(Gateway {
            name,
            port,
            protocol,
            virtual_address,
            sticky: sticky.unwrap_or(Sticky::Flow),
            mode: mode.unwrap_or(Mode::FullNat),
            routes,
            health_check,
            canary,
            source,
            connect_timeout_ms,
        }))
    }

    fn routes<'n>(&self, node: &'n Node) -> Result<Vec<RouteDocument<'n>>, ConfigError> {
        let NodeValue::Mapping(entries) = &node.value else {
            return Err(self.error(
                Some(node.position),
                "routes",
                format!("expected a mapping of route names to routes, found {}", node.describe()),
            ));
        };
        if entries.is_empty() {
            return Err(self.error(Some(node.position), "routes", "empty: a gateway needs at least one route"));
        }
        let mut routes: Vec<RouteDocument<'n>> = Vec::new();
        for (key, value) in entries {
            let name = self.name(key, "routes")?;
            let field = format!("routes.{name}");
            if let Some(first) = routes.iter().find(|route| route.name == name) {
                return Err(self.error(
                    Some(key.position),
                    &field,
                    format!("route listed twice (first at line {})", first.key.position.line),
                ));
            }
            routes.push(self.route(name, key, value, &field)?);
        }
        Ok(routes)
    }

    fn route<'n>(&self, name: String, key: &'n Node, node: &'n Node, field: &str) -> Result<RouteDocument<'n>, ConfigError> {
        if node.is_null() {
            return Ok(RouteDocument { name, key, weight: None, targets: None });
        }
        if !matches!(node.value, NodeValue::Mapping(_)) {
            return Err(self.error(
                Some(node.position),
                field,
                format!("expected a mapping with weight and targets, found {}", node.describe()),
            ));
        }
        let fields = self.fields(node, field, ROUTE_FIELDS, ROUTE_EXPORT_FIELDS)?;
        let weight = match fields.value("weight") {
            Some(node) => {
                let weight_field = format!("{field}.weight");
                let text = self.scalar(node, &weight_field, "a percentage like 90%")?;
                Some(parse_weight(text).map_err(|why| self.error(Some(node.position), &weight_field, why))?)
            }
            None => None,
        };
        self.refuse_l7(fields.value("filters"), &format!("{field}.filters"))?;
        self.refuse_l7(fields.value("rewrites"), &format!("{field}.rewrites"))?;
        self.refuse_l7(fields.value("condition"), &format!("{field}.condition"))?;

        let targets = match (fields.value("targets"), fields.value("instances")) {
            (Some(_), Some(_)) => {
                return Err(self.error(
                    fields.key_position("instances"),
                    &format!("{field}.instances"),
                    "a route lists either targets or instances, not both",
                ))
            }
            (Some(list), None) => Some(self.targets(list, &format!("{field}.targets"))?),
            (None, Some(list)) => Some(self.instances(list, &format!("{field}.instances"))?),
            (None, None) => None,
        };
        Ok(RouteDocument { name, key, weight, targets })
    }

    fn targets<'n>(&self, node: &'n Node, field: &str) -> Result<Vec<(Target, &'n Node, String)>, ConfigError> {
        let items = self.non_empty_list(node, field, "targets like [10.1.0.11:8080]")?;
        let mut targets = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let item_field = format!("{field}[{index}]");
            let text = self.scalar(item, &item_field, "a target like 10.1.0.11:8080")?;
            let target = parse_target(text).map_err(|why| self.error(Some(item.position), &item_field, why))?;
            targets.push((target, item, item_field));
        }
        Ok(targets)
    }

    /// Vamp's `instances: [{name: ..., host: 10.1.0.11, port: 31463}]`.
    fn instances<'n>(&self, node: &'n Node, field: &str) -> Result<Vec<(Target, &'n Node, String)>, ConfigError> {
        let items = self.non_empty_list(node, field, "instances like [{host: 10.1.0.11, port: 31463}]")?;
        let mut targets = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let item_field = format!("{field}[{index}]");
            if !matches!(item.value, NodeValue::Mapping(_)) {
                return Err(self.error(
                    Some(item.position),
                    &item_field,
                    format!("expected an instance like {{host: 10.1.0.11, port: 31463}}, found {}", item.describe()),
                ));
            }
            let fields = self.fields(item, &item_field, INSTANCE_FIELDS, INSTANCE_EXPORT_FIELDS)?;
            if let Some(name) = fields.value("name") {
                self.scalar(name, &format!("{item_field}.name"), "a name")?;
            }
            let host_field = format!("{item_field}.host");
            let host = fields
                .value("host")
                .ok_or_else(|| self.error(Some(item.position), &host_field, "missing: an instance needs its host address"))?;
            let host_text = self.scalar(host, &host_field, "an IPv4 or IPv6 address")?;
            let addr: IpAddr = host_text.trim().parse().map_err(|_| {
                self.error(
                    Some(host.position),
                    &host_field,
                    format!("`{host_text}` is not an IPv4 or IPv6 address (the splitter forwards to addresses, not names)"),
                )
            })?;
            check_unicast(addr).map_err(|why| self.error(Some(host.position), &host_field, why))?;
            let port_field = format!("{item_field}.port");
            let port =
                fields.value("port").ok_or_else(|| self.error(Some(item.position), &port_field, "missing: an instance needs its port"))?;
            let port_text = self.scalar(port, &port_field, "a port number")?;
            let port_number = parse_port_number(port_text.trim()).map_err(|why| self.error(Some(port.position), &port_field, why))?;
            targets.push((Target { addr, port: port_number }, item, item_field));
        }
        Ok(targets)
    }

    fn non_empty_list<'n>(&self, node: &'n Node, field: &str, example: &str) -> Result<&'n [Node], ConfigError> {
        match &node.value {
            NodeValue::Sequence(items) if items.is_empty() => Err(self.error(
                Some(node.position),
                field,
                format!("empty list: give {example}, or leave it out for a weights-only update"),
            )),
            NodeValue::Sequence(items) => Ok(items),
            _ => Err(self.error(Some(node.position), field, format!("expected a list of {example}, found {}", node.describe()))),
        }
    }

    /// Refuses a non-empty L7 setting (`filters`, `rewrites`, `condition`).
    fn refuse_l7(&self, node: Option<&Node>, field: &str) -> Result<(), ConfigError> {
        let Some(node) = node else { return Ok(()) };
        let empty = match &node.value {
            NodeValue::Sequence(items) => items.is_empty(),
            NodeValue::Mapping(entries) => entries.is_empty(),
            NodeValue::Scalar { text, .. } => text.trim().is_empty(),
        };
        if empty {
            Ok(())
        } else {
            Err(self.error(Some(node.position), field, L7_REFUSED))
        }
    }

    /// A gateway or route name: a non-empty scalar without white space or control characters
    /// (names appear in API paths and CLI arguments), path-like segments separated by `/`
    /// (`sava/sava/port`), none of them empty, `.` or `..`, at most [`MAX_NAME_BYTES`].
    fn name(&self, node: &Node, field: &str) -> Result<String, ConfigError> {
        let text = self.scalar(node, field, "a name like sava/sava/port")?;
        check_name(text).map_err(|message| self.error(Some(node.position), field, message))?;
        Ok(text.to_owned())
    }

    /// One of a few words, e.g. `sticky: client`.
    fn choice<T: Copy>(&self, node: &Node, field: &str, choices: &[(&str, T)]) -> Result<T, ConfigError> {
        let words: Vec<&str> = choices.iter().map(|(word, _)| *word).collect();
        let expected = match words.split_last() {
            Some((last, [])) => (*last).to_owned(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        let text = self.scalar(node, field, &expected)?;
        choices
            .iter()
            .find(|(word, _)| *word == text)
            .map(|(_, value)| *value)
            .ok_or_else(|| self.error(Some(node.position), field, format!("unknown value `{text}`: expected {expected}")))
    }

    /// A scalar's text, or an error saying what was expected instead.
    fn scalar<'n>(&self, node: &'n Node, field: &str, expected: &str) -> Result<&'n str, ConfigError> {
        node.scalar().ok_or_else(|| self.error(Some(node.position), field, format!("expected {expected}, found {}", node.describe())))
    }

    /// The entries of a mapping node, refusing duplicate keys and unknown fields.
    fn fields<'n>(&self, node: &'n Node, path: &str, known: &[&str], ignored: &[&str]) -> Result<Fields<'n>, ConfigError> {
        let NodeValue::Mapping(entries) = &node.value else {
            return Err(self.error(Some(node.position), path, format!("expected a mapping, found {}", node.describe())));
        };
        let join = |key: &str| {
            if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            }
        };
        let mut fields = Fields { entries: BTreeMap::new() };
        for (key, value) in entries {
            let Some(name) = key.scalar() else {
                return Err(self.error(Some(key.position), path, format!("a key must be a name, found {}", key.describe())));
            };
            if !known.contains(&name) && !ignored.contains(&name) {
                return Err(self.error(
                    Some(key.position),
                    &join(name),
                    format!("unknown field `{name}`, expected one of: {}", known.join(", ")),
                ));
            }
            if let Some((first, _)) = fields.entries.insert(name, (key, value)) {
                return Err(self.error(
                    Some(key.position),
                    &join(name),
                    format!("duplicate field `{name}` (first at line {})", first.position.line),
                ));
            }
        }
        Ok(fields)
    }
}
