//! `presenced watch`: snapshot of matching zones, then every change.

use super::{ConfigArg, Context};
use presenced::client;
use presenced::naming::Site;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// KV key pattern: a zone id, `*` for one dot-separated token, `>` for
    /// the rest (`*` matches every zone, `person.*` every person).
    #[arg(default_value = ">")]
    pub pattern: String,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Read the hub's mirror of the site instead of the leaf.
    #[arg(long)]
    pub hub: bool,
    /// Site whose hub mirror to read (default: the config's site).
    #[arg(long, requires = "hub")]
    pub site: Option<String>,
    /// Print each accepted reading as it arrives (`live.<site>.<sensor>`;
    /// PATTERN matches sensors) instead of the zones.
    #[arg(long, conflicts_with = "hub")]
    pub live: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.config, Some("warn"))?;
    if args.live {
        let site = Site::new(&ctx.config.site)?;
        ctx.block_on(async {
            let conn = ctx.connect().await?;
            let client = conn.client.clone();
            conn.run(
                false,
                client::live::watch_live(client, &site, &args.pattern, args.json),
            )
            .await
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let source = match args.hub {
        false => client::Source::Leaf,
        true => client::Source::Hub(Site::new(args.site.as_deref().unwrap_or(&ctx.config.site))?),
    };
    ctx.block_on(async {
        let conn = ctx.connect().await?;
        let client = conn.client.clone();
        let configured = client::configured_zones(&ctx.config);
        conn.run(
            false,
            client::watch(
                client,
                source,
                &args.pattern,
                args.json,
                configured.as_ref(),
            ),
        )
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}
