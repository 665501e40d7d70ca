//! `presenced run`: the daemon.

use super::{ConfigArg, Context};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.config, None)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        site = %ctx.config.site,
        config = %ctx.path.display(),
        "starting"
    );
    let config = ctx.config.clone();
    ctx.block_on(presenced::daemon::run_file(config, Some(ctx.path.clone())))?;
    Ok(ExitCode::SUCCESS)
}
