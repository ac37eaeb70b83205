//! A spoofed SYN flood from one core against the splitter (full NAT, a pool of 4 source
//! addresses) and against nftables DNAT + masquerade on the same testbed: established
//! connections, new connections during the flood and after it, time to full recovery.
//! The same scenario as `tests/tests/flood_netns.rs`, which asserts the splitter's side.

use std::time::Duration;

use anyhow::Result;
use splitter_tests::{
    testbed::{Testbed, VIP},
    traffic::{flood_scenario, mac_of, FloodOutcome},
};

use super::{say, Options};

pub struct FloodResults {
    pub rows: Vec<(&'static str, FloodOutcome)>,
}

fn backends(bed: &mut Testbed) -> Result<()> {
    bed.start_backend("10.10.2.11", 8080, "1.0.0", &[])?;
    bed.start_backend("10.10.2.21", 8080, "1.1.0", &[])?;
    Ok(())
}

fn splitter_bed() -> Result<Testbed> {
    let mut bed = Testbed::new()?;
    backends(&mut bed)?;
    let pool = ["10.10.2.100", "10.10.2.101", "10.10.2.102", "10.10.2.103"];
    for addr in pool {
        bed.splitter.ip(&["addr", "add", &format!("{addr}/24"), "dev", "spl-b"])?;
    }
    bed.write_config(
        "sava.yaml",
        &format!(
            "name: sava\nport: 9050/http\nvirtual_address: {VIP}\nroutes:\n  a:\n    weight: 50%\n    targets: [10.10.2.11:8080]\n  b:\n    \
             weight: 50%\n    targets: [10.10.2.21:8080]\nsource:\n  addresses: [{}]\n  ports: 20000-59999\n",
            pool.join(", ")
        ),
    )?;
    bed.start_agent(&[])?;
    Ok(bed)
}

/// nftables DNAT (a random half to each backend) and masquerade, in the splitter's
/// namespace, with no agent.
fn nft_bed() -> Result<Testbed> {
    let mut bed = Testbed::new()?;
    backends(&mut bed)?;
    let ruleset = format!(
        "table ip flood {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         ip daddr {VIP} tcp dport 9050 dnat to numgen random mod 2 map {{ 0 : 10.10.2.11, 1 : 10.10.2.21 }} : 8080\n  }}\n  \
         chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip daddr 10.10.2.0/24 masquerade\n  }}\n}}\n"
    );
    let path = bed.run_dir.path().join("flood.nft");
    std::fs::write(&path, ruleset)?;
    bed.splitter.run("nft", &["-f", &path.display().to_string()])?;
    Ok(bed)
}

pub fn run(opts: Options) -> Result<FloodResults> {
    super::ensure_tools(&[("nft", "nftables")])?;
    let duration = if opts.quick { Duration::from_secs(4) } else { Duration::from_secs(8) };
    let mut rows = Vec::new();
    for (name, make) in
        [("splitter (full NAT, 4 source addresses)", splitter_bed as fn() -> Result<Testbed>), ("nftables DNAT + masquerade", nft_bed)]
    {
        say(format!("flood: {name}"));
        let bed = make()?;
        let mac = mac_of(&bed.splitter, "spl-c")?;
        let outcome = flood_scenario(&bed.client, "cli0", mac, 50, duration, Duration::from_secs(30))?;
        rows.push((name, outcome));
    }
    Ok(FloodResults { rows })
}

pub fn section(r: &FloodResults) -> String {
    let mut out = String::from(
        "| system | SYNs sent (per second, one core) | established broken / moved (of 50) | new connections during the flood: ok / failed | \
         within 30 s after: ok / failed | fully back after the flood |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for (name, o) in &r.rows {
        out.push_str(&format!(
            "| {name} | {} ({:.0}/s) | {} / {} | {} / {} | {} / {} | {} |\n",
            o.flood.frames,
            o.flood.per_second(),
            o.established_broken,
            o.established_moved,
            o.during_ok,
            o.during_failed.len(),
            o.after_ok,
            o.after_failed.len(),
            o.recovered_after_ms.map_or("not within 30 s".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0))
        ));
    }
    out
}
