//! `splitter validate -f PATH`: checks gateway files offline, without an agent or privileges.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Result;
use clap::Args;

use crate::{
    config,
    gateway::{format_weight, ConfigError, Document, Gateway},
};

#[derive(Args)]
pub struct ValidateArgs {
    /// A gateway file, or a directory of *.yaml / *.yml files (repeat for several). A
    /// weights-only update is checked against a gateway defined earlier in the same run,
    /// e.g. `-f config -f config/updates`, and on its own otherwise.
    #[arg(short = 'f', long = "file", value_name = "PATH", required = true)]
    paths: Vec<PathBuf>,
}

/// Prints one `ok` line per document on stdout; stops at the first error, returned as the
/// one-line [`ConfigError`].
pub fn run(args: ValidateArgs) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    let mut gateways: BTreeMap<String, Gateway> = BTreeMap::new();
    let mut defined = BTreeMap::new();
    for path in &args.paths {
        let scanned = config::scan(path, &mut defined)?;
        if scanned.is_empty() {
            let what = if path.is_dir() { "no *.yaml or *.yml file in this directory" } else { "no such file" };
            return Err(ConfigError::new(path.display().to_string(), what).into());
        }
        for file in scanned {
            let origin = file.path.display().to_string();
            for document in file.documents? {
                validated_line(&mut stdout, &mut gateways, &origin, &file.text, document)?;
            }
        }
    }
    Ok(())
}

/// Checks one document (a weights-only update against the gateway defined earlier in the
/// run) and prints its `ok` line.
fn validated_line(
    stdout: &mut impl std::io::Write,
    gateways: &mut BTreeMap<String, Gateway>,
    origin: &str,
    text: &str,
    document: Document,
) -> Result<()> {
    let line = match document {
        Document::Gateway(gateway) => {
            let targets: usize = gateway.routes.iter().map(|route| route.targets.len()).sum();
            let line = format!(
                "{origin}: ok: gateway {} on {}:{}/{}, {} routes, {targets} targets",
                gateway.name,
                gateway.virtual_address,
                gateway.port,
                gateway.protocol.name(),
                gateway.routes.len(),
            );
            if let Some(warning) = gateway.dsr_canary_warning() {
                eprintln!("{origin}: {warning}");
            }
            gateways.insert(gateway.name.clone(), gateway);
            line
        }
        Document::Weights(update) => match gateways.get(&update.name) {
            Some(gateway) => {
                let updated = gateway.apply_weights(&update, origin).map_err(|err| err.locate_in(text))?;
                let weights: Vec<String> =
                    updated.routes.iter().map(|route| format!("{} {}", route.name, format_weight(route.weight))).collect();
                let line = format!("{origin}: ok: weights update for {}: {}", update.name, weights.join(", "));
                gateways.insert(updated.name.clone(), updated);
                line
            }
            None => format!("{origin}: ok: weights update for {}", update.name),
        },
    };
    // A closed stdout (e.g. `| head`) must not turn a valid file into a failure.
    let _ = writeln!(stdout, "{line}");
    Ok(())
}
