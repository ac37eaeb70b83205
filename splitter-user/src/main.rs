//! `splitter`: the agent (privileged daemon) and the operator's CLI.

mod agent;
mod datapath;
mod gateway;
mod system;

use clap::{Parser, Subcommand};

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
    Validate(gateway::validate::ValidateArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => agent::run(args),
        Command::Validate(args) => gateway::validate::run(args),
    };
    if let Err(err) = result {
        // One line: the context chain joined with ": ".
        eprintln!("splitter: error: {err:#}");
        std::process::exit(1);
    }
}
