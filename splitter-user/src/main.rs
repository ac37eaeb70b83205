//! `splitter`: the agent (privileged daemon) and the operator's CLI.

use clap::{Parser, Subcommand};
use splitter_user::{agent, client, validate};

/// XDP canary traffic splitter: weighted, connection-preserving splits of new flows
/// across versioned backends.
#[derive(Parser)]
#[command(name = "splitter", version, about, long_about = None)]
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
    };
    if let Err(err) = result {
        // One line: the context chain joined with ": ".
        eprintln!("splitter: error: {err:#}");
        std::process::exit(1);
    }
}
