//! `/metrics`: the Prometheus text exposition format (version 0.0.4).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use crate::api::GatewayStats;

/// Everything one scrape reports.
pub struct Snapshot<'a> {
    pub gateways: &'a [GatewayStats],
    /// Configured weight (hundredths of a percent) of each route, by gateway.
    pub route_weights: &'a BTreeMap<String, Vec<(String, u32)>>,
    /// Packet classes and forwarding outcomes, by name.
    pub packets: &'a [(&'static str, u64)],
    pub conntrack_entries: usize,
    pub conntrack_capacity: u32,
    pub half_open_entries: usize,
    pub half_open_capacity: u32,
    /// Flow-state events by name (half-open flows started, promoted, expired, taken over;
    /// established flows missed).
    pub flow_events: &'a [(&'static str, u64)],
    /// Build id of the running program.
    pub build: &'a str,
    pub program_id: u32,
    /// Automated rollouts: gateway, state, canary weight (hundredths of a percent).
    pub rollouts: &'a [(String, &'static str, u32)],
    pub config_errors: usize,
    /// Failed saves of the state since the agent started.
    pub state_save_errors: u64,
    /// The running state is not saved (the last save failed).
    pub state_unsaved: bool,
    pub uptime: Duration,
}

/// A metric family being written: HELP and TYPE once, then samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Self { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(s: &Snapshot<'_>) -> String {
    let mut out = String::new();

    type TargetField = fn(&crate::api::TargetStats) -> u64;
    let target_counters: [(&str, &str, TargetField); 8] = [
        ("splitter_target_new_flows_total", "New flows assigned to the target.", |t| t.new_flows),
        ("splitter_target_packets_to_target_total", "Packets forwarded from clients to the target.", |t| t.packets_to_target),
        ("splitter_target_bytes_to_target_total", "Bytes (IP length) forwarded from clients to the target.", |t| t.bytes_to_target),
        ("splitter_target_packets_from_target_total", "Packets forwarded from the target to clients.", |t| t.packets_from_target),
        ("splitter_target_bytes_from_target_total", "Bytes (IP length) forwarded from the target to clients.", |t| t.bytes_from_target),
        ("splitter_target_resets_total", "TCP resets sent by the target.", |t| t.resets_from_target),
        ("splitter_target_connects_total", "TCP connection setups completed by the target (SYN-ACK seen).", |t| t.connects),
        (
            "splitter_target_failed_connects_total",
            "New flows whose SYN the target refused (RST), answered with anything but a SYN-ACK, or left unanswered for the connect timeout.",
            |t| t.failed_connects,
        ),
    ];
    for (name, help, field) in target_counters {
        let mut f = Family::new(&mut out, name, "counter", help);
        for g in s.gateways {
            for t in &g.targets {
                f.sample(name, &[("gateway", &g.name), ("route", &t.route), ("target", &t.target)], field(t));
            }
        }
    }
    {
        let name = "splitter_target_http_responses_total";
        let mut f =
            Family::new(&mut out, name, "counter", "HTTP responses of the target by status class (gateways whose port is PORT/http).");
        for g in s.gateways {
            for t in &g.targets {
                for (class, n) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().zip(t.http_responses) {
                    f.sample(name, &[("gateway", &g.name), ("route", &t.route), ("target", &t.target), ("class", class)], n);
                }
            }
        }
    }
    {
        let name = "splitter_target_connect_seconds_total";
        let mut f = Family::new(&mut out, name, "counter", "Sum of SYN to SYN-ACK times of the target's connection setups, in seconds.");
        for g in s.gateways {
            for t in &g.targets {
                f.sample(name, &[("gateway", &g.name), ("route", &t.route), ("target", &t.target)], t.connect_ns_total as f64 / 1e9);
            }
        }
    }
    {
        let name = "splitter_target_configured_share_percent";
        let mut f = Family::new(&mut out, name, "gauge", "Share of the gateway's new flows the target should get, in percent.");
        for g in s.gateways {
            for t in &g.targets {
                f.sample(name, &[("gateway", &g.name), ("route", &t.route), ("target", &t.target)], t.configured_share);
            }
        }
    }
    {
        let name = "splitter_target_observed_share_percent";
        let mut f = Family::new(
            &mut out,
            name,
            "gauge",
            "Share of the gateway's new flows the target got since the current weights took effect, in percent.",
        );
        for g in s.gateways {
            for t in &g.targets {
                if let Some(share) = t.observed_share {
                    f.sample(name, &[("gateway", &g.name), ("route", &t.route), ("target", &t.target)], share);
                }
            }
        }
    }
    {
        let name = "splitter_route_weight_percent";
        let mut f = Family::new(&mut out, name, "gauge", "Configured weight of the route, in percent.");
        for (gateway, routes) in s.route_weights {
            for (route, weight) in routes {
                f.sample(name, &[("gateway", gateway), ("route", route)], f64::from(*weight) / 100.0);
            }
        }
    }
    type GatewayField = fn(&GatewayStats) -> u64;
    let gateway_counters: [(&str, &str, GatewayField); 4] = [
        ("splitter_gateway_new_flows_total", "New flows assigned to a target.", |g| g.new_flows),
        (
            "splitter_gateway_no_target_packets_total",
            "Packets for the gateway that found no target with weight (passed to the kernel).",
            |g| g.no_target,
        ),
        ("splitter_gateway_conntrack_miss_total", "Mid-stream TCP packets of flows conntrack did not know (re-created).", |g| {
            g.conntrack_miss
        }),
        ("splitter_gateway_alloc_failed_total", "New flows that got no conntrack entry or source port (dropped; clients retry).", |g| {
            g.alloc_failed
        }),
    ];
    for (name, help, field) in gateway_counters {
        let mut f = Family::new(&mut out, name, "counter", help);
        for g in s.gateways {
            f.sample(name, &[("gateway", &g.name)], field(g));
        }
    }
    {
        let name = "splitter_gateway_table_generation";
        let mut f = Family::new(&mut out, name, "gauge", "Generation of the gateway's live bucket table (increases with every change).");
        for g in s.gateways {
            f.sample(name, &[("gateway", &g.name)], g.generation);
        }
    }
    {
        let name = "splitter_gateway_table_fingerprint";
        let mut f = Family::new(
            &mut out,
            name,
            "gauge",
            "1, labelled with the digest of the gateway's live bucket table and its targets: nodes that split alike show the same.",
        );
        for g in s.gateways {
            f.sample(name, &[("gateway", &g.name), ("fingerprint", &g.table_fingerprint)], 1u64);
        }
    }
    {
        let name = "splitter_packets_total";
        let mut f = Family::new(
            &mut out,
            name,
            "counter",
            "Packets seen by the XDP program, by class, and what happened to translated packets, by outcome.",
        );
        for (what, value) in s.packets {
            f.sample(name, &[("kind", what)], value);
        }
    }
    {
        let name = "splitter_target_healthy";
        let mut f =
            Family::new(&mut out, name, "gauge", "1 when the target passes its health checks (or has none), 0 when it left the table.");
        for g in s.gateways {
            for t in &g.targets {
                let healthy = t.health.as_deref().is_none_or(|h| h == "healthy");
                f.sample(name, &[("gateway", &g.name), ("route", &t.route), ("target", &t.target)], u8::from(healthy));
            }
        }
    }
    {
        let name = "splitter_target_failed_checks_total";
        let mut f = Family::new(&mut out, name, "counter", "Failed health checks of the target.");
        for g in s.gateways {
            for t in &g.targets {
                f.sample(name, &[("gateway", &g.name), ("route", &t.route), ("target", &t.target)], t.failed_checks);
            }
        }
    }
    {
        let name = "splitter_target_connect_latency_seconds";
        let mut f = Family::new(&mut out, name, "gauge", "Mean SYN to SYN-ACK time of the target's connection setups, in seconds.");
        for g in s.gateways {
            for t in &g.targets {
                if t.connects > 0 {
                    f.sample(
                        name,
                        &[("gateway", &g.name), ("route", &t.route), ("target", &t.target)],
                        t.connect_ns_total as f64 / t.connects as f64 / 1e9,
                    );
                }
            }
        }
    }
    {
        let name = "splitter_rollout_canary_weight_percent";
        let mut f =
            Family::new(&mut out, name, "gauge", "Canary weight of the gateway's automated rollout, in percent, labelled with its state.");
        for (gateway, state, weight) in s.rollouts {
            f.sample(name, &[("gateway", gateway), ("state", state)], f64::from(*weight) / 100.0);
        }
    }
    Family::new(&mut out, "splitter_conntrack_entries", "gauge", "Conntrack entries in use (two per flow).").sample(
        "splitter_conntrack_entries",
        &[],
        s.conntrack_entries,
    );
    Family::new(&mut out, "splitter_conntrack_capacity", "gauge", "Conntrack capacity in entries.").sample(
        "splitter_conntrack_capacity",
        &[],
        s.conntrack_capacity,
    );
    Family::new(&mut out, "splitter_half_open_entries", "gauge", "Half-open table entries in use (two per TCP flow in its handshake).")
        .sample("splitter_half_open_entries", &[], s.half_open_entries);
    Family::new(&mut out, "splitter_half_open_capacity", "gauge", "Half-open table capacity in entries.").sample(
        "splitter_half_open_capacity",
        &[],
        s.half_open_capacity,
    );
    {
        let name = "splitter_flow_events_total";
        let mut f = Family::new(
            &mut out,
            name,
            "counter",
            "Flow-state events: half_open_started (a SYN), half_open_promoted (handshake completed), half_open_expired (timed out, \
             port given back), half_open_taken_over (port taken under a flood's pressure), established_missed (a non-SYN TCP packet \
             found no state: an evicted established flow, re-created by the table).",
        );
        for (event, value) in s.flow_events {
            f.sample(name, &[("event", event)], value);
        }
    }
    Family::new(
        &mut out,
        "splitter_datapath_info",
        "gauge",
        "The running datapath: its program's build id and map layout version (always 1).",
    )
    .sample("splitter_datapath_info", &[("build", s.build), ("layout", &splitter_common::LAYOUT_VERSION.to_string())], 1);
    Family::new(&mut out, "splitter_program_id", "gauge", "Kernel id of the attached XDP program (changes when the program is reloaded).")
        .sample("splitter_program_id", &[], s.program_id);
    Family::new(&mut out, "splitter_config_errors", "gauge", "Configuration files that failed to load and were not applied.").sample(
        "splitter_config_errors",
        &[],
        s.config_errors,
    );
    Family::new(
        &mut out,
        "splitter_state_save_errors_total",
        "counter",
        "Failed saves of the agent's state (full or read-only disk) since it started.",
    )
    .sample("splitter_state_save_errors_total", &[], s.state_save_errors);
    Family::new(
        &mut out,
        "splitter_state_saved",
        "gauge",
        "1 when the running state is saved, 0 when the last save failed (a restarted agent would come back with older state).",
    )
    .sample("splitter_state_saved", &[], u8::from(!s.state_unsaved));
    Family::new(&mut out, "splitter_agent_uptime_seconds", "gauge", "Seconds since this agent started.").sample(
        "splitter_agent_uptime_seconds",
        &[],
        s.uptime.as_secs_f64(),
    );
    out
}
