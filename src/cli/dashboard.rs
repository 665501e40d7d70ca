//! `presenced dashboard`: the fleet page, every site the hub mirrors.

use super::{ConfigArg, Context};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(flatten)]
    pub options: presenced::page::fleet::DashboardArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.config, None)?;
    let config = ctx.config.clone();
    ctx.block_on(presenced::page::fleet::run(config, args.options))?;
    Ok(ExitCode::SUCCESS)
}
