//! The `health_check:` and `canary:` blocks of a gateway document.

use std::net::Ipv4Addr;

use splitter_common::maps::MAX_SOURCE_ADDRESSES;

use super::{
    scalars::{check_unicast, parse_port_number, parse_weight},
    Reader, CANARY_FIELDS, HEALTH_CHECK_FIELDS,
};
use crate::gateway::{
    policy::{self, Analysis, Bound, CanarySpec, CheckProtocol, HealthCheck, HookKind, MetricCheck, SourceSpec, Thresholds, Webhook},
    yaml::{Node, NodeValue, Position},
    ConfigError,
};

impl Reader<'_> {
    /// The `source:` block: full-NAT source addresses and port range, or a DSR gateway's
    /// outer source prefix.
    pub(super) fn source(&self, node: &Node) -> Result<SourceSpec, ConfigError> {
        let fields = self.fields(node, "source", &["addresses", "ports", "prefix"], &[])?;
        let mut spec = SourceSpec::default();
        if let Some(list) = fields.value("addresses") {
            let NodeValue::Sequence(items) = &list.value else {
                return Err(self.error(
                    Some(list.position),
                    "source.addresses",
                    format!("expected a list of IPv4 addresses, found {}", list.describe()),
                ));
            };
            if items.len() > MAX_SOURCE_ADDRESSES {
                return Err(self.error(
                    Some(list.position),
                    "source.addresses",
                    format!("{} addresses: at most {MAX_SOURCE_ADDRESSES}", items.len()),
                ));
            }
            for (i, item) in items.iter().enumerate() {
                let field = format!("source.addresses[{i}]");
                let text = self.scalar(item, &field, "an IPv4 address")?;
                let addr: Ipv4Addr =
                    text.trim().parse().map_err(|_| self.error(Some(item.position), &field, format!("`{text}` is not an IPv4 address")))?;
                check_unicast(addr).map_err(|why| self.error(Some(item.position), &field, why))?;
                if spec.addresses.contains(&addr) {
                    return Err(self.error(Some(item.position), &field, format!("{addr} listed twice")));
                }
                spec.addresses.push(addr);
            }
        }
        if let Some(n) = fields.value("ports") {
            let text = self.scalar(n, "source.ports", "a port range like 20000-29999")?;
            spec.ports = Some(policy::parse_port_range(text).map_err(|why| self.error(Some(n.position), "source.ports", why))?);
        }
        if let Some(n) = fields.value("prefix") {
            let text = self.scalar(n, "source.prefix", "a prefix like 10.100.0.0/24")?;
            let (addr, len) = policy::parse_prefix(text).map_err(|why| self.error(Some(n.position), "source.prefix", why))?;
            check_unicast(addr).map_err(|why| self.error(Some(n.position), "source.prefix", why))?;
            spec.prefix = Some((addr, len));
        }
        Ok(spec)
    }

    pub(super) fn health_check(&self, node: &Node) -> Result<HealthCheck, ConfigError> {
        let fields = self.fields(node, "health_check", HEALTH_CHECK_FIELDS, &[])?;
        let mut check = HealthCheck::default();
        if let Some(n) = fields.value("protocol") {
            check.protocol = self.choice(n, "health_check.protocol", &[("tcp", CheckProtocol::Tcp), ("http", CheckProtocol::Http)])?;
        }
        if let Some(n) = fields.value("path") {
            let path = self.scalar(n, "health_check.path", "an HTTP path like /health")?;
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(self.error(Some(n.position), "health_check.path", format!("`{path}` is not an HTTP path like /health")));
            }
            check.path = path.to_owned();
        }
        if let Some(n) = fields.value("expected_status") {
            check.expected_status = self.number(n, "health_check.expected_status", 100, 599)? as u16;
        }
        if let Some(n) = fields.value("port") {
            let text = self.scalar(n, "health_check.port", "a port number")?;
            check.port = Some(parse_port_number(text.trim()).map_err(|why| self.error(Some(n.position), "health_check.port", why))?);
        }
        if let Some(n) = fields.value("interval") {
            check.interval_ms = self.duration_us(n, "health_check.interval")?.div_ceil(1000);
        }
        if let Some(n) = fields.value("timeout") {
            check.timeout_ms = self.duration_us(n, "health_check.timeout")?.div_ceil(1000);
        }
        if let Some(n) = fields.value("unhealthy_threshold") {
            check.unhealthy_threshold = self.number(n, "health_check.unhealthy_threshold", 1, 100)? as u32;
        }
        if let Some(n) = fields.value("healthy_threshold") {
            check.healthy_threshold = self.number(n, "health_check.healthy_threshold", 1, 100)? as u32;
        }
        if check.timeout_ms > check.interval_ms {
            let position = fields.key_position("timeout").unwrap_or(node.position);
            return Err(self.error(Some(position), "health_check.timeout", "the timeout is longer than the interval"));
        }
        Ok(check)
    }

    pub(super) fn canary(&self, node: &Node) -> Result<(CanarySpec, Position), ConfigError> {
        let fields = self.fields(node, "canary", CANARY_FIELDS, &[])?;
        let route_node =
            fields.value("route").ok_or_else(|| self.error(Some(node.position), "canary.route", "missing: the route to roll out"))?;
        let route = self.name(route_node, "canary.route")?;
        let steps_node = fields
            .value("steps")
            .ok_or_else(|| self.error(Some(node.position), "canary.steps", "missing: the canary weights, like [5, 10, 25, 50, 100]"))?;
        let NodeValue::Sequence(items) = &steps_node.value else {
            return Err(self.error(
                Some(steps_node.position),
                "canary.steps",
                format!("expected a list of weights like [5, 10, 25, 50, 100], found {}", steps_node.describe()),
            ));
        };
        let mut steps = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let field = format!("canary.steps[{i}]");
            let text = self.scalar(item, &field, "a weight like 10%")?;
            steps.push(parse_weight(text).map_err(|why| self.error(Some(item.position), &field, why))?);
        }
        let interval_ms = match fields.value("interval") {
            Some(n) => self.duration_us(n, "canary.interval")?.div_ceil(1000),
            None => 30_000,
        };
        let mut thresholds = Thresholds::default();
        if let Some(n) = fields.value("max_error_rate") {
            let text = self.scalar(n, "canary.max_error_rate", "a percentage like 5%")?;
            thresholds.max_error_rate = parse_weight(text).map_err(|why| self.error(Some(n.position), "canary.max_error_rate", why))?;
        }
        if let Some(n) = fields.value("max_http_error_rate") {
            let text = self.scalar(n, "canary.max_http_error_rate", "a percentage like 5%")?;
            thresholds.max_http_error_rate =
                Some(parse_weight(text).map_err(|why| self.error(Some(n.position), "canary.max_http_error_rate", why))?);
        }
        if let Some(n) = fields.value("max_failed_checks") {
            thresholds.max_failed_checks = self.number(n, "canary.max_failed_checks", 0, 1000)? as u32;
        }
        if let Some(n) = fields.value("max_connect_latency") {
            let text = self.scalar(n, "canary.max_connect_latency", "a duration like 50ms or a factor like 2x")?;
            thresholds.max_connect_latency =
                Some(policy::parse_latency_limit(text).map_err(|why| self.error(Some(n.position), "canary.max_connect_latency", why))?);
        }
        if let Some(n) = fields.value("min_flows") {
            thresholds.min_flows = self.number(n, "canary.min_flows", 0, 1_000_000)? as u32;
        }
        if let Some(n) = fields.value("flush_on_rollback") {
            thresholds.flush_on_rollback = self.choice(n, "canary.flush_on_rollback", &[("true", true), ("false", false)])?;
        }
        let analysis = self.analysis(&fields)?;
        let spec = CanarySpec { route, steps, interval_ms, thresholds, analysis };
        if let Err(problem) = spec.check() {
            let position = match problem.field.strip_prefix("steps[").and_then(|i| i.trim_end_matches(']').parse::<usize>().ok()) {
                Some(i) => items.get(i).map(|item| item.position),
                None if problem.field == "steps" => Some(steps_node.position),
                None => fields.key_position(&problem.field).or(Some(node.position)),
            };
            return Err(self.error(position, &format!("canary.{}", problem.field), problem.message));
        }
        Ok((spec, route_node.position))
    }

    /// An integer in `min..=max`.
    fn number(&self, node: &Node, field: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
        let text = self.scalar(node, field, "a number")?;
        text.trim()
            .parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| self.error(Some(node.position), field, format!("`{text}` is not a whole number from {min} to {max}")))
    }

    /// `connect_timeout:`: from 100ms (a SYN-ACK is rarely faster to come back under load)
    /// to 60s (longer than any client waits).
    pub(super) fn connect_timeout(&self, node: &Node) -> Result<u32, ConfigError> {
        let us = self.duration_us(node, "connect_timeout")?;
        if !(100_000..=60_000_000).contains(&us) {
            return Err(self.error(Some(node.position), "connect_timeout", "must be between 100ms and 60s"));
        }
        Ok(us.div_ceil(1000) as u32)
    }

    fn duration_us(&self, node: &Node, field: &str) -> Result<u64, ConfigError> {
        let text = self.scalar(node, field, "a duration like 500ms or 30s")?;
        policy::parse_duration_us(text).map_err(|why| self.error(Some(node.position), field, why))
    }

    /// The `metrics:`, `max_inconclusive:` and `webhooks:` of a canary block.
    fn analysis(&self, fields: &super::Fields<'_>) -> Result<Analysis, ConfigError> {
        let mut analysis = Analysis { max_inconclusive: 3, ..Analysis::default() };
        if let Some(n) = fields.value("max_inconclusive") {
            analysis.max_inconclusive = self.number(n, "canary.max_inconclusive", 0, 1000)? as u32;
        }
        if let Some(list) = fields.value("metrics") {
            let NodeValue::Sequence(items) = &list.value else {
                return Err(self.error(
                    Some(list.position),
                    "canary.metrics",
                    format!("expected a list of metrics, found {}", list.describe()),
                ));
            };
            for (i, item) in items.iter().enumerate() {
                let field = format!("canary.metrics[{i}]");
                let m = self.fields(item, &field, &["name", "prometheus", "query", "min", "max"], &[])?;
                let text = |key: &str, what: &str| -> Result<String, ConfigError> {
                    let node = m
                        .value(key)
                        .ok_or_else(|| self.error(Some(item.position), &format!("{field}.{key}"), format!("missing: {what}")))?;
                    Ok(self.scalar(node, &format!("{field}.{key}"), what)?.to_string())
                };
                let bound = |key: &str| -> Result<Option<Bound>, ConfigError> {
                    let Some(node) = m.value(key) else { return Ok(None) };
                    let text = self.scalar(node, &format!("{field}.{key}"), "a number")?;
                    let value: f64 =
                        text.trim().parse().ok().filter(|v: &f64| v.is_finite()).ok_or_else(|| {
                            self.error(Some(node.position), &format!("{field}.{key}"), format!("`{text}` is not a number"))
                        })?;
                    Ok(Some(Bound(value)))
                };
                analysis.metrics.push(MetricCheck {
                    name: text("name", "the metric's name")?,
                    prometheus: text("prometheus", "the Prometheus address, like http://127.0.0.1:9090")?,
                    query: text("query", "a PromQL query")?,
                    min: bound("min")?,
                    max: bound("max")?,
                });
            }
        }
        if let Some(list) = fields.value("webhooks") {
            let NodeValue::Sequence(items) = &list.value else {
                return Err(self.error(
                    Some(list.position),
                    "canary.webhooks",
                    format!("expected a list of webhooks, found {}", list.describe()),
                ));
            };
            for (i, item) in items.iter().enumerate() {
                let field = format!("canary.webhooks[{i}]");
                let w = self.fields(item, &field, &["type", "url", "timeout", "retries"], &[])?;
                let kind_node = w.value("type").ok_or_else(|| self.error(Some(item.position), &format!("{field}.type"), "missing"))?;
                let kinds: Vec<(&str, HookKind)> = HookKind::ALL.iter().map(|k| (k.name(), *k)).collect();
                let kind = self.choice(kind_node, &format!("{field}.type"), &kinds)?;
                let url_node = w.value("url").ok_or_else(|| self.error(Some(item.position), &format!("{field}.url"), "missing"))?;
                let url = self.scalar(url_node, &format!("{field}.url"), "an http:// address")?.to_string();
                let timeout_ms = match w.value("timeout") {
                    Some(n) => self.duration_us(n, &format!("{field}.timeout"))?.div_ceil(1000),
                    None => 5000,
                };
                let retries = match w.value("retries") {
                    Some(n) => self.number(n, &format!("{field}.retries"), 0, 10)? as u32,
                    None => 0,
                };
                analysis.webhooks.push(Webhook { kind, url, timeout_ms, retries });
            }
        }
        Ok(analysis)
    }
}
