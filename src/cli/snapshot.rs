//! `presenced snapshot`: a snapshot now, queued for upload.

use super::{ConfigArg, Context};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.config, Some("warn"))?;
    ctx.block_on(presenced::archive::cli::snapshot(ctx.config.clone()))?;
    Ok(ExitCode::SUCCESS)
}
