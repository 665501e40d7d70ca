//! `presenced status`: the health of the whole site, as an exit code too.

use super::{ConfigArg, Context};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// 0 healthy, 1 degraded, 2 down; a config that cannot be read is "down"
/// too, since nothing about the site can be said.
pub fn run(args: Args) -> ExitCode {
    let ctx = match Context::load(&args.config, Some("error")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("presenced: {e:#}");
            return ExitCode::from(2);
        }
    };
    ExitCode::from(ctx.block_on(presenced::client::status::run(&ctx.config, args.json)))
}
