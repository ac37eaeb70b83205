//! `splitter`: the agent (privileged daemon) and the operator's CLI.

use std::{io, path::PathBuf};

use clap::{CommandFactory, Parser, Subcommand};
use splitter_user::{agent, client, decap, ui, validate};

/// `splitter --version`: the release and the commit it is built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SPLITTER_GIT_COMMIT"), ")");

/// XDP canary traffic splitter: weighted, connection-preserving splits of new flows
/// across versioned backends.
#[derive(Parser)]
#[command(name = "splitter", version = VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the privileged agent: load and attach the XDP program and keep it running.
    Agent(agent::AgentArgs),
    /// Check gateway files offline (no agent, no privileges): one "ok" line per document,
    /// or the first error as one line naming file, line, column and field.
    Validate(validate::ValidateArgs),
    /// Create or update gateways from files (full gateways or weights-only updates).
    Apply(client::ApplyArgs),
    /// Show gateways: routes, weights, targets (YAML, or `-o json`).
    Get(client::GetArgs),
    /// Remove a gateway (its established flows finish on their targets).
    Delete(client::DeleteArgs),
    /// Set route weights, e.g. `splitter weight sava/sava/port sava/sava/sava:1.1.0/port=20%`.
    Weight(client::WeightArgs),
    /// Promote a canary: the route takes 100%, every other route 0%.
    Promote(client::PromoteArgs),
    /// Back to the weights before the last change (`--flush` also moves established flows
    /// off the targets that lose weight).
    Rollback(client::RollbackArgs),
    /// Per route and target: flows, packets, bytes, observed share of new flows against
    /// the configured weight.
    Stats(client::StatsArgs),
    /// Automated progressive rollouts of a canary route.
    #[command(subcommand)]
    Canary(client::CanaryCommand),
    /// Weight changes, health changes and rollout decisions, with times and reasons.
    Events(client::EventsArgs),
    /// A live dashboard in the browser: gateways, weights against observed shares, health,
    /// rollouts and events, with weight sliders and rollout controls. Serves on loopback
    /// with a random token in the printed URL.
    Ui(ui::UiArgs),
    /// On a target of `mode: dsr` gateways whose kernel has no ipip device: attach the
    /// decapsulation program to the interfaces the splitter's packets arrive on, until
    /// SIGTERM (the target holds the VIP on its loopback).
    Decap(decap::DecapArgs),
    /// Print a shell completion script, e.g. `source <(splitter completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or with `--dir DIR` write splitter.1 and one page per
    /// command (splitter-apply.1, ...) there.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// The man pages: splitter.1, then splitter-COMMAND.1 for each command.
fn man_pages(dir: Option<PathBuf>) -> anyhow::Result<()> {
    let cli = Cli::command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cli).render(&mut io::stdout())?;
        return Ok(());
    };
    std::fs::create_dir_all(&dir)?;
    let mut pages = vec![("splitter".to_string(), cli.clone())];
    for sub in cli.get_subcommands() {
        let name = format!("splitter-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().bin_name(name)));
    }
    for (name, command) in pages {
        let mut page = Vec::new();
        clap_mangen::Man::new(command).title(name.clone()).render(&mut page)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_target(false).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => agent::run(args),
        Command::Validate(args) => validate::run(args),
        Command::Apply(args) => client::apply(args),
        Command::Get(args) => client::get(args),
        Command::Delete(args) => client::delete(args),
        Command::Weight(args) => client::weight(args),
        Command::Promote(args) => client::promote(args),
        Command::Rollback(args) => client::rollback(args),
        Command::Stats(args) => client::stats(args),
        Command::Canary(command) => client::canary(command),
        Command::Events(args) => client::events(args),
        Command::Ui(args) => ui::run(args),
        Command::Decap(args) => decap::run(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "splitter", &mut io::stdout());
            Ok(())
        }
        Command::Man { dir } => man_pages(dir),
    };
    if let Err(err) = result {
        // One line: the context chain joined with ": ".
        eprintln!("splitter: error: {err:#}");
        std::process::exit(1);
    }
}
