//! `presenced snapshots`: local and remote snapshots.

use super::{ConfigArg, Context};
use presenced::archive::commands::{self, Listing};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Check every copy's signature (against the archiver's key in
    /// --access) and read it to check its sha256.
    #[arg(long)]
    pub verify: bool,
    /// The ownership map (access file): whose signature to trust.
    #[arg(long, value_name = "FILE")]
    pub access: Option<PathBuf>,
    /// Accept snapshots whose signature cannot be checked (unsigned,
    /// or no --access); logged loudly. Never accepts a wrong one.
    #[arg(long)]
    pub allow_unsigned: bool,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.config, Some("warn"))?;
    let trust = args
        .verify
        .then(|| commands::trust(args.access.as_deref(), args.allow_unsigned))
        .transpose()?;
    let listing = ctx.block_on(commands::list(super::snapshot::target(&ctx.config), trust))?;
    print(&listing, args.json)?;
    if !listing.corrupt.is_empty() {
        anyhow::bail!(
            "{} corrupt or refused cop(y/ies):\n  {}",
            listing.corrupt.len(),
            listing.corrupt.join("\n  ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The listing as a table, or as JSON lines.
fn print(listing: &Listing, json: bool) -> anyhow::Result<()> {
    for e in &listing.unreadable {
        eprintln!("presenced: {e}");
    }
    if json {
        for r in &listing.rows {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "{:<58} {:>10} {:>10} {:>10} {:>8}  {:<12} {:<8} {:<8}",
        "SNAPSHOT", "LOCAL", "STATE", "REMOTE", "AGE", "SHA256", "L-OK", "R-OK"
    );
    for r in &listing.rows {
        let size = |s: Option<u64>| s.map_or("-".to_owned(), |n| n.to_string());
        let short = |v: &Option<String>| {
            v.as_deref().map_or("-".to_owned(), |s| {
                s.split(':').next().unwrap_or(s).to_owned()
            })
        };
        println!(
            "{:<58} {:>10} {:>10} {:>10} {:>8}  {:<12} {:<8} {:<8}",
            r.id,
            if r.local.as_deref() == Some("incomplete") {
                "partial".to_owned()
            } else {
                size(r.local_size)
            },
            r.state.as_deref().unwrap_or("-"),
            size(r.remote_size),
            r.age_seconds.map_or("-".to_owned(), |s| {
                humantime::format_duration(Duration::from_secs(s))
                    .to_string()
                    .split(' ')
                    .next()
                    .unwrap_or("-")
                    .to_owned()
            }),
            r.sha256
                .as_deref()
                .map_or("-", |s| s.get(..12).unwrap_or(s)),
            short(&r.local_verified),
            short(&r.remote_verified),
        );
        if let Some(e) = &r.last_error {
            println!("    last error: {e}");
        }
        for (copy, sig) in [
            ("local", &r.local_signature),
            ("remote", &r.remote_signature),
        ] {
            if let Some(s) = sig.as_deref().filter(|s| !s.starts_with("signed by")) {
                println!("    {copy} signature: {s}");
            }
        }
    }
    Ok(())
}
