//! The command line: one file per subcommand, each an `Args` (its clap
//! definition) and a `run` that calls the library. This module holds what
//! they share: the `--config` option, tracing, the runtime, the CLI's NATS
//! connection, and the exit codes (docs/OPERATIONS.md, "Exit codes").

pub mod acl;
pub mod acl_hub;
pub mod check_config;
pub mod cmd;
pub mod completions;
pub mod dashboard;
pub mod get;
pub mod keygen;
pub mod man;
pub mod nats_config;
pub mod provision;
pub mod provision_hub;
pub mod replay;
pub mod restore;
pub mod run;
pub mod sandbox;
pub mod snapshot;
pub mod snapshots;
pub mod status;
pub mod watch;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use presenced::config::Config;
use presenced::store;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Where a config is read from when neither `--config` nor
/// `$PRESENCED_CONFIG` names one. The NixOS module links each instance's
/// config to `/etc/presenced/<instance>.toml`.
pub const DEFAULT_CONFIG: &str = "/etc/presenced/presenced.toml";

/// The environment variable that names the config when `--config` does not.
pub const CONFIG_ENV: &str = "PRESENCED_CONFIG";

/// Exit code of a command that failed (the reason is on stderr). Usage
/// errors exit with 2 (clap's), and `status` has its own three codes.
pub const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(
    name = "presenced",
    version,
    about = "Presence detection for edge hosts, state in NATS JetStream",
    after_help = "Exit codes: 0 success, 1 the command failed (reason on stderr), \
                  2 wrong usage; `status`: 0 healthy, 1 degraded, 2 down."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run(run::Args),
    /// Check a config file; prints every problem with its field path.
    CheckConfig(check_config::Args),
    /// Create or update the site's streams, buckets and consumer (admin).
    Provision(provision::Args),
    /// Create or update the hub mirrors of one or more sites (hub admin).
    ProvisionHub(provision_hub::Args),
    /// Print the presence of matching zones, then every change.
    Watch(watch::Args),
    /// Print the health of the whole site: the daemon's /healthz (components,
    /// sources), leases, zones configured/stored/stale, the engine's backlog
    /// and, with [hub], the hub mirrors. Exit code 0 healthy, 1 degraded,
    /// 2 down (docs/OPERATIONS.md).
    Status(status::Args),
    /// Print the presence of one zone.
    Get(get::Args),
    /// Write a new NKEY user seed for SERVICE (mode 0600, never over an
    /// existing file) and print its public key.
    Keygen(keygen::Args),
    /// Print the nats-server `authorization` block of SITE generated from
    /// the ownership map in FILE.
    Acl(acl::Args),
    /// Print the hub's `authorization` block: the admin and each site's
    /// leafnode identity (from the `leafnode` key of its access file),
    /// each limited to its own site.
    AclHub(acl_hub::Args),
    /// Run a whole deployment on loopback: a 3-node hub, a leaf and the
    /// daemon per site, simulated sensors; Ctrl-C stops everything.
    Sandbox(sandbox::Args),
    /// Take a snapshot now and queue it for upload.
    Snapshot(snapshot::Args),
    /// List local and remote snapshots with state, size, age and sha256.
    Snapshots(snapshots::Args),
    /// Rebuild the snapshot's buckets on this leaf: signature, sha256 and
    /// every right checked first, the replaced contents kept until the
    /// new are complete (docs/ARCHIVE.md).
    Restore(restore::Args),
    /// Print the nats-server config of a leaf or a hub node rendered from
    /// a TOML description.
    NatsConfig(nats_config::Args),
    /// Send a command to the site's engine (manual override of a zone).
    #[command(subcommand)]
    Cmd(cmd::CmdArgs),
    /// Serve the fleet page: every site the hub mirrors, its zones from
    /// the mirror (docs/OPERATIONS.md, "Fleet page"). The config reaches
    /// the hub (a site's leaf or a hub server) as an identity that may
    /// read the mirrors.
    Dashboard(dashboard::Args),
    /// Replay recorded readings through the engine with a (candidate)
    /// config, offline and read-only.
    Replay(replay::ReplayArgs),
    /// Learn each evidence rule's p_true/p_false and each zone's prior
    /// from labelled time.
    Tune(replay::TuneArgs),
    /// Write one self-contained HTML file with a picture of every zone
    /// over a replayed range.
    Report(replay::ReportArgs),
    /// Print a shell completion script for presenced.
    Completions(completions::Args),
    /// Write presenced's man pages (one per subcommand), or print the
    /// main page.
    Man(man::Args),
    /// Print the version.
    Version,
}

/// Parses the command line and runs the subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run::run(a),
        Command::CheckConfig(a) => check_config::run(a),
        Command::Provision(a) => provision::run(a),
        Command::ProvisionHub(a) => provision_hub::run(a),
        Command::Watch(a) => watch::run(a),
        Command::Status(a) => Ok(status::run(a)),
        Command::Get(a) => get::run(a),
        Command::Keygen(a) => keygen::run(a),
        Command::Acl(a) => acl::run(a),
        Command::AclHub(a) => acl_hub::run(a),
        Command::Sandbox(a) => sandbox::run(a),
        Command::Snapshot(a) => snapshot::run(a),
        Command::Snapshots(a) => snapshots::run(a),
        Command::Restore(a) => restore::run(a),
        Command::NatsConfig(a) => nats_config::run(a),
        Command::Cmd(a) => cmd::run(a),
        Command::Dashboard(a) => dashboard::run(a),
        Command::Replay(a) => replay::replay(a),
        Command::Tune(a) => replay::tune(a),
        Command::Report(a) => replay::report(a),
        Command::Completions(a) => completions::run(a),
        Command::Man(a) => man::run(a),
        Command::Version => {
            println!("presenced {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("presenced: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `--config`/`-c`, the same for every command that reads a config.
#[derive(Clone, Debug, clap::Args)]
pub struct ConfigArg {
    /// The config file (TOML, docs/CONFIG.md): NATS connection, identity,
    /// site id and what runs.
    ///
    /// Without --config, the file $PRESENCED_CONFIG names, else
    /// /etc/presenced/presenced.toml (NixOS instances: /etc/presenced/<instance>.toml).
    #[arg(
        long,
        short,
        value_name = "FILE",
        env = CONFIG_ENV,
        default_value = DEFAULT_CONFIG
    )]
    pub config: PathBuf,
}

/// A command's loaded config with tracing set up and a runtime to run in.
pub struct Context {
    pub config: Config,
    pub path: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Context {
    /// Loads and validates the config, then logs at `level` (None: the
    /// config's `log.level`) unless `RUST_LOG` says otherwise.
    pub fn load(arg: &ConfigArg, level: Option<&str>) -> anyhow::Result<Context> {
        let config = Config::load_valid(&arg.config)?;
        init_tracing(level.or(config.log.level.as_deref()));
        Ok(Context {
            config,
            path: arg.config.clone(),
            rt: runtime()?,
        })
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Connects as the config's service, keeping what the server refuses.
    pub async fn connect(&self) -> anyhow::Result<CliConn> {
        let (tx, refused) = presenced::acl::violation::channel();
        let who = store::connect::As {
            service: Some(self.config.service.clone()),
            violations: Some(tx),
        };
        let client = store::connect_as(
            &self.config.nats,
            "presenced-cli",
            None,
            Some(Duration::from_secs(10)),
            &who,
        )
        .await?;
        Ok(CliConn {
            client,
            refused,
            service: self.config.service.clone(),
        })
    }
}

/// Writes `bytes` to stdout; a reader that stops early (`| head`) is not
/// an error.
pub fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to stdout"))
        }
        _ => Ok(()),
    }
}

/// See [`presenced::logging::init`].
pub fn init_tracing(level: Option<&str>) {
    presenced::logging::init(level);
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A CLI connection that keeps what the server refused it, so that a
/// failing command names the refusal (and the grant that would allow it)
/// instead of the timeout or missing bucket it shows up as.
pub struct CliConn {
    pub client: async_nats::Client,
    refused: presenced::acl::violation::Receiver,
    service: String,
}

impl CliConn {
    /// Runs `command`. A failure after a refusal is reported as that
    /// refusal; with `fatal`, the first refusal ends the command at once
    /// (nothing will answer a refused request).
    pub async fn run<T>(
        mut self,
        fatal: bool,
        command: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let explain = |v: &presenced::acl::violation::Violation| {
            anyhow::anyhow!("{}", presenced::acl::explain::explain(v, &self.service))
        };
        tokio::pin!(command);
        let result = tokio::select! {
            r = &mut command => r,
            Some(v) = self.refused.recv(), if fatal => return Err(explain(&v)),
        };
        match result {
            // A command that succeeded may still have been refused a part
            // (stale flags without `owners`), and said so itself.
            Ok(v) => Ok(v),
            Err(e) => {
                // The server reports refusals in order: after a round
                // trip, every refusal of what the command sent is in.
                let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
                tokio::task::yield_now().await;
                match self.refused.try_recv() {
                    // The refusal is the cause; what it made the command
                    // see (a timeout, "no bucket") would mislead.
                    Ok(v) => Err(explain(&v)),
                    Err(_) => Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// The arguments (and subcommands) of `cmd`, at any depth, that
    /// `--help` would show without a word of help.
    fn undocumented(cmd: &clap::Command) -> Vec<String> {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name()).trim().to_owned();
            if cmd.get_about().is_none() && path.contains(' ') {
                missing.push(format!("{path} (the subcommand)"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(cmd, "", &mut missing);
        missing
    }

    /// Every option and positional of every subcommand says what it is
    /// for in `--help` (and so in the man page and completions).
    #[test]
    fn every_argument_has_help() {
        let missing = undocumented(&Cli::command());
        assert!(missing.is_empty(), "without help text: {missing:#?}");
        // The check itself finds what it is for.
        let bare = clap::Command::new("x").subcommand(
            clap::Command::new("y")
                .about("documented")
                .arg(clap::Arg::new("quiet").long("quiet")),
        );
        assert_eq!(undocumented(&bare), ["x y quiet"]);
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every subcommand that reads a config takes it the same way:
    /// `--config`/`-c`, `$PRESENCED_CONFIG`, the default path.
    #[test]
    fn config_is_read_the_same_way_everywhere() {
        fn walk(cmd: &clap::Command, seen: &mut usize) {
            for arg in cmd.get_arguments() {
                if arg.get_id() == "config" {
                    *seen += 1;
                    assert_eq!(arg.get_short(), Some('c'), "{}", cmd.get_name());
                    assert_eq!(arg.get_long(), Some("config"), "{}", cmd.get_name());
                    assert_eq!(
                        arg.get_env().and_then(|e| e.to_str()),
                        Some(CONFIG_ENV),
                        "{}",
                        cmd.get_name()
                    );
                    assert_eq!(
                        arg.get_default_values(),
                        [std::ffi::OsStr::new(DEFAULT_CONFIG)],
                        "{}",
                        cmd.get_name()
                    );
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, seen);
            }
        }
        let mut seen = 0;
        walk(&Cli::command(), &mut seen);
        // run, check-config, provision, watch, status, get, snapshot,
        // snapshots, restore, cmd override/clear/forget, replay, tune,
        // report, dashboard.
        assert_eq!(seen, 16);
    }
}
