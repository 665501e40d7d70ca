//! `presenced snapshot`: a snapshot now, queued for upload.

use super::{ConfigArg, Context};
use presenced::archive::commands::{self, Target};
use presenced::config::Config;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.config, Some("warn"))?;
    let taken = ctx.block_on(commands::snapshot(target(&ctx.config)))?;
    let meta = &taken.meta;
    println!(
        "{}: {} bytes, {} records, sha256 {}",
        meta.id, meta.size, meta.records, meta.sha256
    );
    if taken.queued {
        println!("{}: queued for upload", meta.id);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the archive commands read of the config.
pub fn target(config: &Config) -> Target<'_> {
    Target {
        site: &config.site,
        service: &config.service,
        nats: &config.nats,
        archive: config.archive.as_ref(),
    }
}
