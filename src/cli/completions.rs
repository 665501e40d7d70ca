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
    // Into memory first: the generator panics on a failed write (a reader
    // such as `head` that stops early).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "presenced", &mut script);
    super::print_bytes(&script)?;
    Ok(ExitCode::SUCCESS)
}
