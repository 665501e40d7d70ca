//! `presenced provision`: the site's streams, buckets and the engine's
//! consumer, created or updated; one `created`/`unchanged`/`updated` line
//! each, as `provision-hub` reports mirrors.

use super::{ConfigArg, Context};
use anyhow::Context as _;
use presenced::naming::{self, Site};
use presenced::store::provision::{action_between, Provisioned};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The ownership map (`presenced acl`'s input): stores what each
    /// service runs and who may send commands, which clients' stale
    /// flags and the engine's replies go by.
    #[arg(long, value_name = "FILE")]
    pub access: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.config, None)?;
    let table = match &args.access {
        Some(path) => Some(presenced::acl::published::Published::from_access(
            &presenced::acl::access::Access::load(path)?,
        )),
        None => None,
    };
    ctx.block_on(async {
        let site = Site::new(&ctx.config.site)?;
        let conn = ctx.connect().await?;
        let client = conn.client.clone();
        conn.run(false, async move {
            let done =
                presenced::store::provision::provision_with(&client, &site, table.as_ref()).await?;
            for p in done {
                println!("{p}");
            }
            let js = async_nats::jetstream::new(client.clone());
            let stream = js.get_stream(naming::SENSORS_STREAM).await?;
            let before = stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                    naming::ENGINE_CONSUMER,
                )
                .await
                .ok()
                .map(|c| c.cached_info().config.clone());
            let consumer = stream
                .create_consumer(presenced::engine::runner::consumer_config(&site))
                .await
                .context("cannot create or update consumer engine on SENSORS")?;
            let action = action_between(before.as_ref(), &consumer.cached_info().config);
            let line = Provisioned {
                kind: "consumer",
                name: format!("{} on {}", naming::ENGINE_CONSUMER, naming::SENSORS_STREAM),
                action,
            };
            println!("{line}");
            client.flush().await?;
            Ok(())
        })
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}
