//! `presenced check-config`: every problem of a config at once.

use super::{ConfigArg, EXIT_FAILURE};
use presenced::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The config file to check; the same as --config, which it overrides
    /// (the form scripts and the NixOS module have used).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Prints a one-line summary, or every problem on stderr and exits 1.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let file = args.file.unwrap_or(args.config.config);
    match Config::load_valid(&file) {
        Ok(cfg) => {
            let runs: Vec<&str> = cfg.components().iter().map(|c| c.name()).collect();
            println!(
                "{}: ok (site {}, runs {}, {} zone(s), {} person(s), {} MQTT source(s), {} serial source(s))",
                file.display(),
                cfg.site,
                if runs.is_empty() { "nothing".to_owned() } else { runs.join("+") },
                cfg.zones.len(),
                cfg.persons.len(),
                cfg.mqtt.len(),
                cfg.serial.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // The problems are the output: no `presenced:` prefix.
            eprintln!("{e}");
            Ok(ExitCode::from(EXIT_FAILURE))
        }
    }
}
