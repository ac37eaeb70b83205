//! Gateways: Vamp's gateway document extended with targets (see "Gateway YAML" in the
//! product contract), parsed and checked into [`Gateway`]s or weights-only
//! [`WeightUpdate`]s, with errors that name the file, line, column and field.
//!
//! Weights are integers in hundredths of a percent (`10000` is 100%): `10.5%` is `1050`.
//! Per-target shares ([`Gateway::weighted_targets`]) are in parts per million, fine enough
//! to split 80% evenly over 3 targets (266 667 ppm each) without visible rounding.

mod parse;
pub mod policy;
#[cfg(test)]
mod tests;
mod yaml;

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use serde::{Serialize, Serializer};
use splitter_common::table::TableTarget;

pub use parse::{check_name, format_weight, parse_weight, MAX_NAME_BYTES};

/// 100% in the unit of route weights (hundredths of a percent).
pub const FULL_WEIGHT: u32 = 10_000;

/// 100% in the unit of target shares (parts per million).
pub const FULL_SHARE_PPM: u32 = 1_000_000;

/// Most targets one gateway may have: what one table generation of the datapath holds, so
/// `splitter validate` refuses exactly what the agent would.
pub const MAX_TARGETS_PER_GATEWAY: usize = splitter_common::maps::MAX_TARGETS_PER_GATEWAY as usize;

/// Protocol of a gateway's port, as written. Vamp's `http` is TCP at L4; it is kept so that
/// what reads the gateway back (and the canary analysis) knows the service speaks HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Http,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Udp => "udp",
        }
    }

    /// The transport the datapath sees: TCP for `tcp` and `http`.
    pub fn is_udp(self) -> bool {
        self == Self::Udp
    }
}

/// What keeps a client on one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sticky {
    /// Each new flow is placed on its own (Vamp's `sticky: none`, the default).
    Flow,
    /// One client address keeps one target (`client`, or Vamp's `service` / `instance`).
    Client,
}

/// How packets reach the targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Mode {
    /// Source and destination rewritten: replies come back through the splitter (default).
    #[serde(rename = "fullnat")]
    FullNat,
    /// Only the destination rewritten: targets must route replies back via the splitter.
    #[serde(rename = "dnat")]
    Dnat,
    /// Direct server return: packets go to targets unchanged inside an outer IPv4 header
    /// (IP in IP); targets hold the VIP on a loopback, decapsulate, and answer clients
    /// directly.
    #[serde(rename = "dsr")]
    Dsr,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::FullNat => "fullnat",
            Self::Dnat => "dnat",
            Self::Dsr => "dsr",
        }
    }
}

/// A backend: IPv4 or IPv6 address and port. Written and read as `10.1.0.11:8080` or
/// `[2001:db8::11]:8080`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub addr: IpAddr,
    pub port: u16,
}

impl Target {
    /// The target's identity in the bucket table builder: address and port in one `u64`
    /// (an IPv6 address folded to 32 bits as the datapath folds it, with the top bit set),
    /// the same on every node.
    pub fn table_key(&self) -> u64 {
        match self.addr {
            IpAddr::V4(addr) => u64::from(u32::from(addr)) << 16 | u64::from(self.port),
            IpAddr::V6(addr) => {
                let folded = splitter_common::maps::Address::fold(splitter_common::maps::ipv6_words(addr.octets()));
                1 << 63 | u64::from(folded) << 16 | u64::from(self.port)
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::net::SocketAddr::from((self.addr, self.port)))
    }
}

impl FromStr for Target {
    type Err = String;

    /// Parses `IPV4:PORT` or `[IPV6]:PORT`; the error says what is wrong, without the input's location.
    fn from_str(text: &str) -> Result<Self, String> {
        parse::parse_target(text)
    }
}

impl Serialize for Target {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A route: one version of the service, with its share of the gateway's new flows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    pub name: String,
    /// The weight in effect, in hundredths of a percent: the explicit weight, or an equal
    /// share of what the weighted routes leave.
    pub weight: u32,
    /// The weight the document gave, if any, in hundredths of a percent.
    pub explicit_weight: Option<u32>,
    /// The instances of this version, in document order; the route's weight is spread
    /// evenly over them.
    pub targets: Vec<Target>,
}

/// A gateway: a VIP and port whose new flows are split over the routes by weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gateway {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub virtual_address: IpAddr,
    pub sticky: Sticky,
    pub mode: Mode,
    /// Sorted by name.
    pub routes: Vec<Route>,
    /// Checks of every target; unhealthy targets leave the table.
    pub health_check: Option<policy::HealthCheck>,
    /// An automated rollout to start when the gateway is applied.
    pub canary: Option<policy::CanarySpec>,
    /// Full-NAT source addresses and ports (`source:`).
    pub source: policy::SourceSpec,
    /// How long a target may leave a SYN unanswered before the connect counts as failed
    /// (`connect_timeout:`, milliseconds); `None`: the agent's `--connect-timeout`.
    pub connect_timeout_ms: Option<u32>,
}

/// A weights-only document: new weights for an existing gateway's routes, targets untouched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WeightUpdate {
    pub name: String,
    /// Route name and its weight in hundredths of a percent; `None` shares the remainder.
    /// In document order.
    pub weights: Vec<(String, Option<u32>)>,
}

/// One document of a gateway file.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(clippy::large_enum_variant, reason = "documents are parsed a few at a time, never stored in bulk")]
pub enum Document {
    /// Routes with targets: the whole gateway, created or replaced.
    Gateway(Gateway),
    /// No route lists targets: new weights for a gateway that already exists.
    Weights(WeightUpdate),
}

impl Document {
    /// The gateway the document is about.
    pub fn gateway_name(&self) -> &str {
        match self {
            Self::Gateway(gateway) => &gateway.name,
            Self::Weights(update) => &update.name,
        }
    }
}

/// Why a document was refused. Displays as one line:
/// `FILE:LINE:COLUMN: FIELD.PATH: what is wrong`, leaving out what is not known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file path, or e.g. "request body".
    pub origin: String,
    /// From 1.
    pub line: Option<usize>,
    /// From 1.
    pub column: Option<usize>,
    /// Where in the document, e.g. `routes.sava/sava/sava:1.1.0/port.weight`.
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    /// An error about the whole input, with no line or field.
    pub fn new(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Self { origin: origin.into(), line: None, column: None, field: None, message: message.into() }
    }

    /// An error about one field, where no position is known.
    pub fn for_field(origin: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: Some(field.into()), ..Self::new(origin, message) }
    }

    fn at(origin: &str, position: Option<yaml::Position>, field: &str, message: impl Into<String>) -> Self {
        Self {
            origin: origin.to_owned(),
            line: position.map(|p| p.line),
            column: position.map(|p| p.column),
            field: (!field.is_empty()).then(|| field.to_owned()),
            message: message.into(),
        }
    }

    /// Fills in the line and column from the source text of the document the error is
    /// about, when only the field is known (as for errors from [`Gateway::apply_weights`]).
    /// With several documents in `text`, the first one that has the field wins.
    pub fn locate_in(mut self, text: &str) -> Self {
        if self.line.is_some() {
            return self;
        }
        let Some(field) = &self.field else {
            return self;
        };
        let Ok(documents) = yaml::parse_stream(text) else {
            return self;
        };
        if let Some(position) = documents.iter().find_map(|root| yaml::locate(root, field)) {
            self.line = Some(position.line);
            self.column = Some(position.column);
        }
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, &self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            // A field path repeats the document's keys, which may hold line breaks.
            write_escaped(f, field)?;
            f.write_str(": ")?;
        }
        // One line whatever the message holds (e.g. a parser's multi-line explanation).
        let mut words = self.message.split_whitespace();
        if let Some(first) = words.next() {
            f.write_str(first)?;
            for word in words {
                write!(f, " {word}")?;
            }
        }
        Ok(())
    }
}

/// Writes `text` with control characters escaped (`\n`, `\u{1b}`), so it stays on one line.
fn write_escaped(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    for c in text.chars() {
        if c.is_control() {
            write!(f, "{}", c.escape_default())?;
        } else {
            write!(f, "{c}")?;
        }
    }
    Ok(())
}

impl std::error::Error for ConfigError {}

/// Parses and checks every document of a YAML stream (one document, or several separated
/// by `---`). `origin` names the input in errors. Any error refuses the whole input.
pub fn parse_documents(origin: &str, text: &str) -> Result<Vec<Document>, ConfigError> {
    Ok(parse::parse_stream(origin, text)?.into_iter().map(|parsed| parsed.document).collect())
}

/// Parses the documents of one configuration file, refusing a gateway that another file
/// already defines (`defined`: gateway name -> that file). The file's gateways are added
/// to `defined` only when the whole file is accepted.
pub fn parse_config_file(origin: &str, text: &str, defined: &mut BTreeMap<String, String>) -> Result<Vec<Document>, ConfigError> {
    let parsed = parse::parse_stream(origin, text)?;
    let mut mine: BTreeMap<String, String> = BTreeMap::new();
    for document in &parsed {
        if let Document::Gateway(gateway) = &document.document {
            let first = defined.get(&gateway.name).or_else(|| mine.get(&gateway.name));
            if let Some(first) = first {
                return Err(ConfigError::at(
                    origin,
                    Some(document.name_position),
                    "name",
                    format!("gateway {} is already defined in {first}", gateway.name),
                ));
            }
            mine.insert(gateway.name.clone(), origin.to_string());
        }
    }
    defined.extend(mine);
    Ok(parsed.into_iter().map(|parsed| parsed.document).collect())
}

impl Gateway {
    /// The gateway with the weights of a weights-only update. Routes the update names take
    /// its weight (or, without one, share the remainder); routes it does not name lose their
    /// explicit weight and share the remainder (Ambassador's rule), so an update that only
    /// says "canary: 20%" gives the other routes the remaining 80%. Targets are untouched.
    ///
    /// Errors carry the field path but no line (the update's text is not known here):
    /// [`ConfigError::locate_in`] adds it.
    pub fn apply_weights(&self, update: &WeightUpdate, origin: &str) -> Result<Gateway, ConfigError> {
        if update.name != self.name {
            return Err(ConfigError::for_field(
                origin,
                "name",
                format!("this weights update is for gateway {}, not {}", update.name, self.name),
            ));
        }
        let mut explicit: BTreeMap<&str, Option<u32>> = self.routes.iter().map(|route| (route.name.as_str(), None)).collect();
        let mut seen = Vec::new();
        for (route, weight) in &update.weights {
            let field = format!("routes.{route}");
            let Some(slot) = explicit.get_mut(route.as_str()) else {
                let known: Vec<&str> = self.routes.iter().map(|r| r.name.as_str()).collect();
                return Err(ConfigError::for_field(
                    origin,
                    field,
                    format!("unknown route {route} in gateway {} (its routes: {})", self.name, known.join(", ")),
                ));
            };
            if seen.contains(&route) {
                return Err(ConfigError::for_field(origin, field, "route listed twice"));
            }
            seen.push(route);
            if let Some(weight) = weight {
                if *weight > FULL_WEIGHT {
                    return Err(ConfigError::for_field(
                        origin,
                        format!("{field}.weight"),
                        format!("weight {} is more than 100%", format_weight(*weight)),
                    ));
                }
            }
            *slot = *weight;
        }
        let names: Vec<&str> = explicit.keys().copied().collect();
        let weights: Vec<Option<u32>> = explicit.values().copied().collect();
        let effective =
            parse::effective_weights(&names, &weights, true).map_err(|message| ConfigError::for_field(origin, "routes", message))?;
        // By name, so that a gateway built by hand with unsorted routes is updated right too.
        let by_name: BTreeMap<&str, (u32, Option<u32>)> = names.into_iter().zip(effective.into_iter().zip(weights)).collect();
        let mut gateway = self.clone();
        for route in &mut gateway.routes {
            if let Some(&(weight, explicit_weight)) = by_name.get(route.name.as_str()) {
                route.weight = weight;
                route.explicit_weight = explicit_weight;
            }
        }
        gateway.routes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(gateway)
    }

    /// Like [`Gateway::weighted_targets`], with the targets `healthy` refuses at 0: a
    /// route's weight is spread over its healthy targets; a route with none gives its weight
    /// to the routes that have some, in proportion to their weights (equally if those are
    /// all at 0). If no route has a healthy target, the configured shares stand (better
    /// some traffic to targets the checks doubt than none at all). Every target is listed,
    /// in the same order as `weighted_targets`; the shares add up to [`FULL_SHARE_PPM`]
    /// whenever the weights add up to 100%.
    pub fn shares_with_health(&self, healthy: impl Fn(&Target) -> bool) -> Vec<(Target, u32)> {
        let alive: Vec<bool> = self.routes.iter().map(|r| r.targets.iter().any(&healthy)).collect();
        if !alive.contains(&true) {
            return self.weighted_targets();
        }
        let weights: Vec<u64> = self.routes.iter().map(|r| u64::from(r.weight.min(FULL_WEIGHT))).collect();
        let alive_total: u64 = weights.iter().zip(&alive).filter(|(_, a)| **a).map(|(w, _)| *w).sum();
        let alive_count = alive.iter().filter(|a| **a).count() as u64;
        let total_ppm = u64::from(FULL_SHARE_PPM) * weights.iter().sum::<u64>() / u64::from(FULL_WEIGHT);
        // Each alive route's ppm, by largest remainder so they add up exactly.
        let exact: Vec<(u64, u64)> = weights
            .iter()
            .zip(&alive)
            .map(|(w, a)| match (*a, alive_total) {
                (false, _) => (0, 0),
                (true, 0) => (total_ppm / alive_count, total_ppm % alive_count * 1_000_000 / alive_count),
                (true, t) => (total_ppm * w / t, total_ppm * w % t * 1_000_000 / t),
            })
            .collect();
        let mut route_ppm: Vec<u64> = exact.iter().map(|(q, _)| *q).collect();
        let mut leftover = total_ppm - route_ppm.iter().sum::<u64>();
        let mut order: Vec<usize> = (0..route_ppm.len()).filter(|i| alive[*i]).collect();
        order.sort_by(|a, b| exact[*b].1.cmp(&exact[*a].1).then(a.cmp(b)));
        for i in order {
            if leftover == 0 {
                break;
            }
            route_ppm[i] += 1;
            leftover -= 1;
        }
        let mut shares = Vec::new();
        for (route, ppm) in self.routes.iter().zip(route_ppm) {
            let healthy_targets = route.targets.iter().filter(|t| healthy(t)).count() as u64;
            let (base, extra) = ppm.checked_div(healthy_targets).map_or((0, 0), |base| (base, ppm % healthy_targets));
            let mut given = 0;
            for target in &route.targets {
                let share = if healthy(target) {
                    given += 1;
                    base + u64::from(given <= extra)
                } else {
                    0
                };
                shares.push((*target, share as u32));
            }
        }
        shares
    }

    /// Every target with its share of the gateway's new flows, in parts per million: each
    /// route's weight spread evenly over its targets (3 instances at 80% get 266 667, 266 667
    /// and 266 666). The shares of a gateway add up to [`FULL_SHARE_PPM`]. Routes by name,
    /// targets in their document order.
    pub fn weighted_targets(&self) -> Vec<(Target, u32)> {
        let mut shares = Vec::new();
        for route in &self.routes {
            let Ok(count) = u32::try_from(route.targets.len()) else {
                continue;
            };
            if count == 0 {
                continue;
            }
            let route_ppm = route.weight.min(FULL_WEIGHT) * (FULL_SHARE_PPM / FULL_WEIGHT);
            let base = route_ppm / count;
            // The few parts per million that do not divide evenly go to the first targets.
            let extra = (route_ppm % count) as usize;
            for (position, target) in route.targets.iter().enumerate() {
                shares.push((*target, base + u32::from(position < extra)));
            }
        }
        shares
    }

    /// The input of [`splitter_common::table::build_bucket_table`]: the targets of
    /// [`Self::weighted_targets`] in the same order, with their shares as weights.
    pub fn table_targets(&self) -> Vec<TableTarget> {
        self.weighted_targets().into_iter().map(|(target, share)| TableTarget { key: target.table_key(), weight: share }).collect()
    }

    /// The same gateway in effect: equal but for which route weights were written and which
    /// were the rest shared out (a client that writes every weight back, as Vamp's do,
    /// changes nothing when they are the weights in effect).
    pub fn same_as(&self, other: &Gateway) -> bool {
        let unwritten = |g: &Gateway| {
            let mut g = g.clone();
            for route in &mut g.routes {
                route.explicit_weight = None;
            }
            g
        };
        unwritten(self) == unwritten(other)
    }

    /// The gateway as a document that parses back to an equal gateway.
    /// What a rollout of this gateway cannot see: a DSR gateway's replies bypass the
    /// splitter.
    pub fn unseen_signals(&self) -> Option<&'static str> {
        (self.mode == Mode::Dsr).then_some(
            "mode dsr: replies bypass the splitter, so the analysis sees no resets, connect latency or HTTP status from \
             the targets (failed connects still count, from clients' repeated SYNs); it relies on health checks and \
             canary metrics",
        )
    }

    /// A warning for a DSR canary that has neither health checks nor external metrics to
    /// judge it by.
    pub fn dsr_canary_warning(&self) -> Option<String> {
        let canary = self.canary.as_ref()?;
        (self.mode == Mode::Dsr && self.health_check.is_none() && canary.analysis.metrics.is_empty()).then(|| {
            format!(
                "warning: gateway {}: its canary runs blind to the replies (mode dsr: they bypass the splitter); add a \
                 health_check or canary metrics",
                self.name
            )
        })
    }

    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "name: {}", quoted(&self.name));
        let _ = writeln!(out, "port: {}/{}", self.port, self.protocol.name());
        let _ = writeln!(out, "virtual_address: {}", self.virtual_address);
        let sticky = match self.sticky {
            Sticky::Flow => "none",
            Sticky::Client => "client",
        };
        let _ = writeln!(out, "sticky: {sticky}");
        let _ = writeln!(out, "mode: {}", self.mode.name());
        if let Some(ms) = self.connect_timeout_ms {
            let _ = writeln!(out, "connect_timeout: {}", policy::format_duration_us(u64::from(ms) * 1000));
        }
        out.push_str("routes:\n");
        for route in &self.routes {
            let _ = writeln!(out, "  {}:", quoted(&route.name));
            match route.explicit_weight {
                Some(weight) => {
                    let _ = writeln!(out, "    weight: {}", format_weight(weight));
                }
                None => {
                    let _ = writeln!(out, "    # no weight: takes {} (its share of the rest)", format_weight(route.weight));
                }
            }
            // `[` opens a YAML sequence: an IPv6 target is quoted.
            let targets: Vec<String> =
                route.targets.iter().map(|t| if t.addr.is_ipv6() { format!("\"{t}\"") } else { t.to_string() }).collect();
            let _ = writeln!(out, "    targets: [{}]", targets.join(", "));
        }
        if let Some(check) = &self.health_check {
            out.push_str("health_check:\n");
            match check.protocol {
                policy::CheckProtocol::Tcp => out.push_str("  protocol: tcp\n"),
                policy::CheckProtocol::Http => {
                    let _ =
                        writeln!(out, "  protocol: http\n  path: {}\n  expected_status: {}", quoted(&check.path), check.expected_status);
                }
            }
            if let Some(port) = check.port {
                let _ = writeln!(out, "  port: {port}");
            }
            let _ = writeln!(out, "  interval: {}", policy::format_duration_us(check.interval_ms * 1000));
            let _ = writeln!(out, "  timeout: {}", policy::format_duration_us(check.timeout_ms * 1000));
            let _ = writeln!(out, "  unhealthy_threshold: {}", check.unhealthy_threshold);
            let _ = writeln!(out, "  healthy_threshold: {}", check.healthy_threshold);
        }
        if !self.source.is_empty() {
            out.push_str("source:\n");
            if !self.source.addresses.is_empty() {
                let addrs: Vec<String> = self.source.addresses.iter().map(Ipv4Addr::to_string).collect();
                let _ = writeln!(out, "  addresses: [{}]", addrs.join(", "));
            }
            if let Some((first, last)) = self.source.ports {
                let _ = writeln!(out, "  ports: {first}-{last}");
            }
            if let Some((addr, len)) = self.source.prefix {
                let _ = writeln!(out, "  prefix: {addr}/{len}");
            }
        }
        if let Some(canary) = &self.canary {
            let steps: Vec<String> = canary.steps.iter().map(|s| format_weight(*s)).collect();
            let t = &canary.thresholds;
            let _ = writeln!(out, "canary:\n  route: {}\n  steps: [{}]", quoted(&canary.route), steps.join(", "));
            let _ = writeln!(out, "  interval: {}", policy::format_duration_us(canary.interval_ms * 1000));
            let _ = writeln!(out, "  max_error_rate: {}", format_weight(t.max_error_rate));
            if let Some(rate) = t.max_http_error_rate {
                let _ = writeln!(out, "  max_http_error_rate: {}", format_weight(rate));
            }
            let _ = writeln!(out, "  max_failed_checks: {}", t.max_failed_checks);
            if let Some(limit) = t.max_connect_latency {
                let _ = writeln!(out, "  max_connect_latency: {limit}");
            }
            let _ = writeln!(out, "  min_flows: {}", t.min_flows);
            let _ = writeln!(out, "  flush_on_rollback: {}", t.flush_on_rollback);
            let a = &canary.analysis;
            if !a.metrics.is_empty() || a.max_inconclusive != 3 {
                let _ = writeln!(out, "  max_inconclusive: {}", a.max_inconclusive);
            }
            if !a.metrics.is_empty() {
                out.push_str("  metrics:\n");
                for m in &a.metrics {
                    let _ = writeln!(
                        out,
                        "    - name: {}\n      prometheus: {}\n      query: {}",
                        quoted(&m.name),
                        quoted(&m.prometheus),
                        quoted(&m.query)
                    );
                    if let Some(min) = m.min {
                        let _ = writeln!(out, "      min: {}", min.0);
                    }
                    if let Some(max) = m.max {
                        let _ = writeln!(out, "      max: {}", max.0);
                    }
                }
            }
            if !a.webhooks.is_empty() {
                out.push_str("  webhooks:\n");
                for w in &a.webhooks {
                    let _ = writeln!(
                        out,
                        "    - type: {}\n      url: {}\n      timeout: {}\n      retries: {}",
                        w.kind.name(),
                        quoted(&w.url),
                        policy::format_duration_us(w.timeout_ms * 1000),
                        w.retries
                    );
                }
            }
        }
        out
    }
}

/// A YAML double-quoted string: names may hold `:`, `#` or anything else.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
