//! `presenced completions <shell>`: generated from the clap definitions,
//! so they cannot drift from the command line (the Nix package installs
//! them).

use clap::CommandFactory as _;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The shell to complete for.
    pub shell: clap_complete::Shell,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cmd = super::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "presenced", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
