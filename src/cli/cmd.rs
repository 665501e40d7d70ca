//! `presenced cmd`: sends a command to the site's engine over
//! `cmd.<site>.presence.<zone>` and prints its reply.
//!
//! The request is validated here with the engine's own checks first, so a
//! typo is caught before it travels; the engine checks again (other
//! clients, e.g. `nats req`, send raw JSON).

use super::{ConfigArg, Context};
use presenced::client::command::{describe, send};
use presenced::engine::command::{self, Request, COMMAND_SCHEMA};
use presenced::naming::{self, Site};
use std::process::ExitCode;
use std::time::Duration;

/// Options every command takes.
#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print the engine's reply as JSON.
    #[arg(long)]
    pub json: bool,
    /// Longest wait for the engine's reply.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Who sends it, recorded with the override (default: $USER).
    #[arg(long)]
    pub by: Option<String>,
}

/// `presenced cmd ...`
#[derive(Clone, Debug, clap::Subcommand)]
pub enum CmdArgs {
    /// Hold ZONE occupied or vacant for a while, whatever the sensors say;
    /// then the sensors decide again, through the normal debounce.
    Override {
        /// The zone (or `person.<id>` key) the command is for.
        zone: String,
        /// `occupied` or `vacant`.
        state: String,
        /// How long, e.g. `30m`, `2h` (at most 30 days).
        #[arg(long = "for")]
        duration: String,
        /// Why, recorded with the override.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// End ZONE's override now; the sensors decide again.
    Clear {
        /// The zone (or `person.<id>` key) the command is for.
        zone: String,
        #[command(flatten)]
        common: Common,
    },
    /// Remove ZONE, which the config no longer has, from KV presence and
    /// debounce; the engine records the removal in EVENTS. Refused for a
    /// configured zone.
    Forget {
        /// The zone (or `person.<id>` key) the command is for.
        zone: String,
        #[command(flatten)]
        common: Common,
    },
}

impl CmdArgs {
    pub fn common(&self) -> &Common {
        match self {
            CmdArgs::Override { common, .. }
            | CmdArgs::Clear { common, .. }
            | CmdArgs::Forget { common, .. } => common,
        }
    }

    fn zone(&self) -> &str {
        match self {
            CmdArgs::Override { zone, .. }
            | CmdArgs::Clear { zone, .. }
            | CmdArgs::Forget { zone, .. } => zone,
        }
    }

    /// The request this invocation sends.
    pub fn request(&self) -> Request {
        let by = self.common().by.clone().or_else(default_sender);
        match self {
            CmdArgs::Override {
                state,
                duration,
                reason,
                ..
            } => Request {
                v: COMMAND_SCHEMA,
                op: "override".into(),
                state: Some(state.clone()),
                duration: Some(duration.clone()),
                by,
                reason: reason.clone(),
                id: None,
            },
            CmdArgs::Clear { .. } => Request {
                v: COMMAND_SCHEMA,
                op: "clear".into(),
                by,
                ..Request::default()
            },
            CmdArgs::Forget { .. } => Request {
                v: COMMAND_SCHEMA,
                op: "forget".into(),
                by,
                ..Request::default()
            },
        }
    }
}

fn default_sender() -> Option<String> {
    ["USER", "LOGNAME"]
        .into_iter()
        .find_map(|k| std::env::var(k).ok())
        .filter(|u| !u.trim().is_empty())
}

/// `presenced cmd`: connects, then [`send_and_print`]; the first refusal
/// by the server ends it (nothing answers a refused request).
pub fn run(args: CmdArgs) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.common().config, Some("warn"))?;
    ctx.block_on(async {
        let conn = ctx.connect().await?;
        let client = conn.client.clone();
        conn.run(true, send_and_print(client, &ctx.config.site, &args))
            .await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Validates, sends, prints; an error reply is an error.
async fn send_and_print(
    client: async_nats::Client,
    site: &str,
    args: &CmdArgs,
) -> anyhow::Result<()> {
    let site = Site::new(site)?;
    let zone = args.zone();
    if !naming::is_presence_key(zone) {
        anyhow::bail!(
            "{zone:?} is not a zone id ([a-z0-9_-], 1 to 64 characters) nor a person key (person.<id>)"
        );
    }
    let request = args.request();
    command::validate(&request).map_err(|e| anyhow::anyhow!("{}: {}", e.kind.as_str(), e))?;
    let common = args.common();
    let reply = send(&client, &site, zone, &request, common.timeout).await?;
    if common.json {
        println!("{}", serde_json::to_string(&reply)?);
    }
    if let Some(e) = &reply.error {
        anyhow::bail!(
            "the engine refused the command ({}): {}",
            e.kind.as_str(),
            e.message
        );
    }
    if !common.json {
        if matches!(args, CmdArgs::Forget { .. }) {
            println!(
                "{zone}: removed from KV presence and debounce (recorded in EVENTS, rev {})",
                reply.revision.unwrap_or(0)
            );
        } else {
            println!("{}", describe(&reply));
        }
    }
    Ok(())
}
