//! `presenced provision-hub`: the hub mirrors of one or more sites.

use anyhow::Context as _;
use presenced::naming::Site;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Client URL(s) of the hub, comma separated.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// Site to create mirrors for; repeat for several sites.
    #[arg(long = "site", required = true)]
    pub sites: Vec<String>,
    /// Replicas of each mirror (3 on the 3-node hub).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// NKEY seed file of the hub's admin identity.
    #[arg(long, value_name = "FILE")]
    pub nkey_seed_file: Option<PathBuf>,
}

/// One line per mirror on stdout, problems on stderr; fails if any mirror
/// failed.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::init_tracing(Some("warn"));
    let sites = args
        .sites
        .iter()
        .map(|s| Site::new(s))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = presenced::config::NatsConfig {
        url: args.server.clone(),
        nkey_seed_file: args.nkey_seed_file.clone(),
        ..Default::default()
    };
    super::runtime()?.block_on(async {
        let hub = presenced::store::connect(
            &cfg,
            "presenced-provision-hub",
            None,
            Some(std::time::Duration::from_secs(10)),
        )
        .await
        .context("hub")?;
        let results = presenced::hub::mirrors::provision(&hub, &sites, args.replicas).await?;
        let mut failed = 0;
        for r in results {
            match r {
                Ok(outcome) => println!("{outcome}"),
                Err(e) => {
                    failed += 1;
                    eprintln!("presenced: {e}");
                }
            }
        }
        let _ = hub.flush().await;
        if failed > 0 {
            anyhow::bail!("{failed} mirror(s) could not be provisioned (see above)");
        }
        Ok(ExitCode::SUCCESS)
    })
}
