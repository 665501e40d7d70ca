//! `presenced snapshots`: local and remote snapshots.

use super::{ConfigArg, Context};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Check every copy's signature (against the archiver's key in
    /// --access) and read it to check its sha256.
    #[arg(long)]
    pub verify: bool,
    /// The ownership map (access file): whose signature to trust.
    #[arg(long, value_name = "FILE")]
    pub access: Option<PathBuf>,
    /// Accept snapshots whose signature cannot be checked (unsigned,
    /// or no --access); logged loudly. Never accepts a wrong one.
    #[arg(long)]
    pub allow_unsigned: bool,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.config, Some("warn"))?;
    let trust = args
        .verify
        .then(|| presenced::archive::cli::trust(args.access.as_deref(), args.allow_unsigned))
        .transpose()?;
    ctx.block_on(presenced::archive::cli::list(
        ctx.config.clone(),
        trust,
        args.json,
    ))?;
    Ok(ExitCode::SUCCESS)
}
