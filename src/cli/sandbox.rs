//! `presenced sandbox`: a whole deployment on loopback.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Simulated sites, each with its own leaf and daemon.
    #[arg(long, default_value_t = 1)]
    pub sites: usize,
    /// State, keys and logs (default: .sandbox in the working directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Start from empty state (removes a previous sandbox's directory).
    #[arg(long)]
    pub fresh: bool,
    /// Simulated people per site.
    #[arg(long, default_value_t = 2)]
    pub people: usize,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_tracing(Some("warn"));
    presenced::sandbox::run(presenced::sandbox::Options {
        sites: args.sites,
        dir: args.dir,
        seconds: args.seconds,
        fresh: args.fresh,
        people: args.people,
    })?;
    Ok(ExitCode::SUCCESS)
}
