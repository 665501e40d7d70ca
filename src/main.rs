//! The `presenced` binary: command line, config, tracing; the work happens
//! in the library.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use presenced::config::Config;
use presenced::naming::Site;
use presenced::{client, daemon, store};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "presenced",
    version,
    about = "Presence detection for edge hosts, state in NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file; prints every problem with its field path.
    CheckConfig { file: PathBuf },
    /// Create or update the site's streams, buckets and consumer (admin).
    Provision {
        #[arg(long, short)]
        config: PathBuf,
        /// The ownership map (`presenced acl`'s input): stores what each
        /// service runs and who may send commands, which clients' stale
        /// flags and the engine's replies go by.
        #[arg(long)]
        access: Option<PathBuf>,
    },
    /// Create or update the hub mirrors of one or more sites (hub admin).
    ProvisionHub(presenced::hub::mirrors::ProvisionHubArgs),
    /// Serve the fleet page: every site the hub mirrors, its zones from
    /// the mirror (docs/OPERATIONS.md, "Fleet page").
    Dashboard(presenced::page::fleet::DashboardArgs),
    /// Print the presence of matching zones, then every change.
    Watch {
        #[arg(long, short)]
        config: PathBuf,
        /// KV key pattern (`*` one token, `>` the rest).
        #[arg(default_value = ">")]
        pattern: String,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Read the hub's mirror of the site instead of the leaf.
        #[arg(long)]
        hub: bool,
        /// Site whose hub mirror to read (default: the config's site).
        #[arg(long, requires = "hub")]
        site: Option<String>,
        /// Print each accepted reading as it arrives (`live.<site>.<sensor>`;
        /// PATTERN matches sensors) instead of the zones.
        #[arg(long, conflicts_with = "hub")]
        live: bool,
    },
    /// Print the health of the whole site: the daemon's /healthz (components,
    /// sources), leases, zones configured/stored/stale, the engine's backlog
    /// and, with [hub], the hub mirrors. Exit code 0 healthy, 1 degraded,
    /// 2 down (docs/OPERATIONS.md).
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the presence of one zone.
    Get {
        #[arg(long, short)]
        config: PathBuf,
        zone: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a new NKEY user seed for SERVICE (mode 0600, never over an
    /// existing file) and print its public key.
    Keygen {
        service: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the nats-server `authorization` block of SITE generated from
    /// the ownership map in FILE.
    Acl {
        #[arg(long)]
        access: PathBuf,
        #[arg(long)]
        site: String,
    },
    /// Print the hub's `authorization` block: the admin and each site's
    /// leafnode identity (from the `leafnode` key of its access file),
    /// each limited to its own site.
    AclHub {
        /// Public NKEY of the hub's admin (provision-hub, inspection).
        #[arg(long)]
        admin_nkey: Option<String>,
        /// SITE=ACCESS_FILE, once per site.
        #[arg(required = true)]
        sites: Vec<String>,
    },
    /// Run a whole deployment on loopback: a 3-node hub, a leaf and the
    /// daemon per site, simulated sensors; Ctrl-C stops everything.
    Sandbox {
        /// Simulated sites, each with its own leaf and daemon.
        #[arg(long, default_value_t = 1)]
        sites: usize,
        /// State, keys and logs (default: .sandbox in the working directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        seconds: Option<u64>,
        /// Start from empty state (removes a previous sandbox's directory).
        #[arg(long)]
        fresh: bool,
        /// Simulated people per site.
        #[arg(long, default_value_t = 2)]
        people: usize,
    },
    /// Take a snapshot now and queue it for upload.
    Snapshot {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List local and remote snapshots with state, size, age and sha256.
    Snapshots {
        #[arg(long, short)]
        config: PathBuf,
        /// Check every copy's signature (against the archiver's key in
        /// --access) and read it to check its sha256.
        #[arg(long)]
        verify: bool,
        /// The ownership map (access file): whose signature to trust.
        #[arg(long, value_name = "FILE")]
        access: Option<PathBuf>,
        /// Accept snapshots whose signature cannot be checked (unsigned,
        /// or no --access); logged loudly. Never accepts a wrong one.
        #[arg(long)]
        allow_unsigned: bool,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the snapshot's buckets on this leaf: signature, sha256 and
    /// every right checked first, the replaced contents kept until the
    /// new are complete (docs/ARCHIVE.md).
    Restore {
        #[arg(long, short)]
        config: PathBuf,
        /// The snapshot id, as `presenced snapshots` lists it.
        #[arg(required_unless_present = "from_file")]
        snapshot: Option<String>,
        /// Read the snapshot from S3 instead of the object store.
        #[arg(long)]
        from_s3: bool,
        /// Restore a file in the snapshot format (the copy a failed
        /// restore kept); it is unsigned, so --allow-unsigned is needed.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["snapshot", "from_s3"])]
        from_file: Option<PathBuf>,
        /// Replace buckets that are not empty.
        #[arg(long)]
        force: bool,
        /// The ownership map (access file): the archiver's key there is
        /// the one the snapshot must be signed with.
        #[arg(long, value_name = "FILE")]
        access: Option<PathBuf>,
        /// Restore a snapshot whose signature cannot be checked
        /// (unsigned, or no --access); logged loudly. Never one signed by
        /// another key.
        #[arg(long)]
        allow_unsigned: bool,
        /// Where the contents a --force restore replaces are saved
        /// (default: the temp directory).
        #[arg(long, value_name = "DIR")]
        backup_dir: Option<PathBuf>,
    },
    /// Print the nats-server config of a leaf or a hub node rendered from
    /// a TOML description.
    NatsConfig {
        #[command(subcommand)]
        kind: presenced::natsconf::Kind,
    },
    /// Send a command to the site's engine (manual override of a zone).
    #[command(subcommand)]
    Cmd(presenced::cmd::CmdArgs),
    /// Print the version.
    Version,
}

fn init_tracing(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| level.and_then(|l| EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"));
    // journald adds its own timestamps and does not render ANSI colours.
    let tty = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(tty)
        .with_writer(std::io::stderr)
        .init();
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Ok(Config::load_valid(path)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A CLI connection that keeps what the server refused it, so that a
/// failing command names the refusal (and the grant that would allow it)
/// instead of the timeout or missing bucket it shows up as.
struct CliConn {
    client: async_nats::Client,
    refused: presenced::acl::violation::Receiver,
    service: String,
}

async fn connect_cli(config: &Config) -> anyhow::Result<CliConn> {
    let (tx, refused) = presenced::acl::violation::channel();
    let who = store::connect::As {
        service: Some(config.service.clone()),
        violations: Some(tx),
    };
    let client = store::connect_as(
        &config.nats,
        "presenced-cli",
        None,
        Some(Duration::from_secs(10)),
        &who,
    )
    .await?;
    Ok(CliConn {
        client,
        refused,
        service: config.service.clone(),
    })
}

impl CliConn {
    /// Runs `command`. A failure after a refusal is reported as that
    /// refusal; with `fatal`, the first refusal ends the command at once
    /// (nothing will answer a refused request).
    async fn run<T>(
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sandbox { sites, dir, seconds, fresh, people } => {
            init_tracing(Some("warn"));
            presenced::sandbox::run(presenced::sandbox::Options { sites, dir, seconds, fresh, people })
                .map_err(Into::into)
        }
        Command::Version => {
            println!("presenced {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Keygen { service, out } => presenced::acl::identity::keygen(&service, &out)
            .map(|g| {
                eprintln!("{}: seed of service {} written (mode 0600); its public key:", g.path.display(), g.service);
                println!("{}", g.public_key);
            })
            .map_err(Into::into),
        Command::Acl { access, site } => (|| {
            let site = Site::new(&site)?;
            let access = presenced::acl::access::Access::load(&access)?;
            print!("{}", presenced::acl::render::render(&access, &site));
            Ok(())
        })(),
        Command::AclHub { admin_nkey, sites } => presenced::acl::hub::render_files(admin_nkey.as_deref(), &sites)
            .map(|text| print!("{text}"))
            .map_err(Into::into),
        Command::NatsConfig { kind } => presenced::natsconf::run(&kind).map_err(Into::into),
        Command::CheckConfig { file } => match Config::load_valid(&file) {
            Ok(cfg) => {
                println!(
                    "{}: ok (site {}, runs {}, {} zone(s), {} person(s), {} MQTT source(s), {} serial source(s))",
                    file.display(),
                    cfg.site,
                    {
                        let runs: Vec<&str> = cfg.components().iter().map(|c| c.name()).collect();
                        if runs.is_empty() { "nothing".to_owned() } else { runs.join("+") }
                    },
                    cfg.zones.len(),
                    cfg.persons.len(),
                    cfg.mqtt.len(),
                    cfg.serial.len()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        Command::Run { config } => load(&config).and_then(|cfg| {
            init_tracing(cfg.log.level.as_deref());
            tracing::info!(version = env!("CARGO_PKG_VERSION"), site = %cfg.site, config = %config.display(), "starting");
            runtime()?.block_on(daemon::run_file(cfg, Some(config.clone())))
        }),
        Command::Provision { config, access } => load(&config).and_then(|cfg| {
            init_tracing(cfg.log.level.as_deref());
            let table = match &access {
                Some(path) => Some(presenced::acl::published::Published::from_access(
                    &presenced::acl::access::Access::load(path)?,
                )),
                None => None,
            };
            runtime()?.block_on(async {
                let site = Site::new(&cfg.site)?;
                let conn = connect_cli(&cfg).await?;
                let client = conn.client.clone();
                conn.run(false, async move {
                let done = store::provision::provision_with(&client, &site, table.as_ref()).await?;
                for p in done {
                    println!("{} {}: ok", p.kind, p.name);
                }
                let js = async_nats::jetstream::new(client.clone());
                let stream = js.get_stream(presenced::naming::SENSORS_STREAM).await?;
                stream
                    .create_consumer(presenced::engine::runner::consumer_config(&site))
                    .await
                    .context("cannot create or update consumer engine on SENSORS")?;
                println!("consumer {} on {}: ok", presenced::naming::ENGINE_CONSUMER, presenced::naming::SENSORS_STREAM);
                client.flush().await?;
                Ok(())
                }).await
            })
        }),
        Command::ProvisionHub(args) => (|| {
            init_tracing(Some("warn"));
            Ok(runtime()?.block_on(presenced::hub::mirrors::provision_hub_cli(&args))?)
        })(),
        Command::Dashboard(args) => load(&args.config).and_then(|cfg| {
            init_tracing(cfg.log.level.as_deref());
            runtime()?.block_on(presenced::page::fleet::run(cfg, args))
        }),
        Command::Watch { config, pattern, json, hub, site, live } => load(&config).and_then(|cfg| {
            init_tracing(Some("warn"));
            if live {
                let site = Site::new(&cfg.site)?;
                return runtime()?.block_on(async {
                    let conn = connect_cli(&cfg).await?;
                    let client = conn.client.clone();
                    conn.run(false, client::live::watch_live(client, &site, &pattern, json)).await
                });
            }
            let source = match hub {
                false => client::Source::Leaf,
                true => client::Source::Hub(Site::new(site.as_deref().unwrap_or(&cfg.site))?),
            };
            runtime()?.block_on(async {
                let conn = connect_cli(&cfg).await?;
                let client = conn.client.clone();
                let configured = client::configured_zones(&cfg);
                conn.run(false, client::watch(client, source, &pattern, json, configured.as_ref())).await
            })
        }),
        Command::Cmd(args) => load(&args.common().config).and_then(|cfg| {
            init_tracing(Some("warn"));
            runtime()?.block_on(async {
                let conn = connect_cli(&cfg).await?;
                let client = conn.client.clone();
                conn.run(true, presenced::cmd::run(client, &cfg.site, &args)).await
            })
        }),
        Command::Snapshot { config } => load(&config).and_then(|cfg| {
            init_tracing(Some("warn"));
            runtime()?.block_on(presenced::archive::cli::snapshot(cfg))
        }),
        Command::Snapshots { config, verify, access, allow_unsigned, json } => load(&config).and_then(|cfg| {
            init_tracing(Some("warn"));
            let trust = verify
                .then(|| presenced::archive::cli::trust(access.as_deref(), allow_unsigned))
                .transpose()?;
            runtime()?.block_on(presenced::archive::cli::list(cfg, trust, json))
        }),
        Command::Restore { config, snapshot, from_s3, from_file, force, access, allow_unsigned, backup_dir } => load(&config).and_then(|cfg| {
            init_tracing(Some("warn"));
            let args = presenced::archive::cli::RestoreArgs {
                id: snapshot,
                from_s3,
                from_file,
                force,
                trust: presenced::archive::cli::trust(access.as_deref(), allow_unsigned)?,
                backup_dir,
            };
            runtime()?.block_on(presenced::archive::cli::restore(cfg, args))
        }),
        Command::Status { config, json } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("presenced: {e:#}");
                    return ExitCode::from(2);
                }
            };
            init_tracing(Some("error"));
            return match runtime() {
                Ok(rt) => ExitCode::from(rt.block_on(client::status::run(&cfg, json))),
                Err(e) => {
                    eprintln!("presenced: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Command::Get { config, zone, json } => load(&config).and_then(|cfg| {
            init_tracing(Some("warn"));
            runtime()?.block_on(async {
                let conn = connect_cli(&cfg).await?;
                let client = conn.client.clone();
                let configured = client::configured_zones(&cfg);
                conn.run(false, client::get(client, &zone, json, configured.as_ref())).await
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("presenced: {e:#}");
            ExitCode::FAILURE
        }
    }
}
