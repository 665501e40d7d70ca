//! `presenced get`: the presence of one zone.

use super::{ConfigArg, Context};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The zone id (or `person.<id>`).
    pub zone: String,
    /// The stored entry as JSON instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.config, Some("warn"))?;
    ctx.block_on(async {
        let conn = ctx.connect().await?;
        let client = conn.client.clone();
        let configured = presenced::client::configured_zones(&ctx.config);
        conn.run(
            false,
            presenced::client::get(client, &args.zone, args.json, configured.as_ref()),
        )
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}
