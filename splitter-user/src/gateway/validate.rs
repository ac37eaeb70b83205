//! `splitter validate -f PATH`: checks gateway files offline, without an agent or privileges.

use std::{collections::BTreeMap, fs, io::Write as _, path::PathBuf};

use anyhow::Result;
use clap::Args;

use super::{load_path, ConfigError, Document, Gateway};

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
    for path in &args.paths {
        for (file, document) in load_path(path)? {
            let origin = file.display().to_string();
            let line = match document {
                Document::Gateway(gateway) => {
                    let targets: usize =
                        gateway.routes.iter().map(|route| route.targets.len()).sum();
                    let line = format!(
                        "{origin}: ok: gateway {} on {}:{}/{}, {} routes, {targets} targets",
                        gateway.name,
                        gateway.virtual_address,
                        gateway.port,
                        gateway.protocol.name(),
                        gateway.routes.len(),
                    );
                    gateways.insert(gateway.name.clone(), gateway);
                    line
                }
                Document::Weights(update) => match gateways.get(&update.name) {
                    Some(gateway) => {
                        let updated = gateway
                            .apply_weights(&update, &origin)
                            .map_err(|err| locate(err, &file))?;
                        let weights: Vec<String> = updated
                            .routes
                            .iter()
                            .map(|route| {
                                format!("{} {}", route.name, super::format_weight(route.weight))
                            })
                            .collect();
                        let line = format!(
                            "{origin}: ok: weights update for {}: {}",
                            update.name,
                            weights.join(", ")
                        );
                        gateways.insert(updated.name.clone(), updated);
                        line
                    }
                    None => format!("{origin}: ok: weights update for {}", update.name),
                },
            };
            // A closed stdout (e.g. `| head`) must not turn a valid file into a failure.
            let _ = writeln!(stdout, "{line}");
        }
    }
    Ok(())
}

/// Adds the line and column of an error found after parsing, from the file's text.
fn locate(err: ConfigError, file: &PathBuf) -> ConfigError {
    match fs::read_to_string(file) {
        Ok(text) => err.locate_in(&text),
        Err(_) => err,
    }
}
