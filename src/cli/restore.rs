//! `presenced restore`: a snapshot's buckets rebuilt on this leaf.

use super::{ConfigArg, Context};
use presenced::archive::commands;
use presenced::archive::sign::Checked;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The snapshot id, as `presenced snapshots` lists it.
    #[arg(required_unless_present = "from_file")]
    pub snapshot: Option<String>,
    /// Read the snapshot from S3 instead of the object store.
    #[arg(long)]
    pub from_s3: bool,
    /// Restore a file in the snapshot format (the copy a failed
    /// restore kept); it is unsigned, so --allow-unsigned is needed.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["snapshot", "from_s3"])]
    pub from_file: Option<PathBuf>,
    /// Replace buckets that are not empty.
    #[arg(long)]
    pub force: bool,
    /// The ownership map (access file): the archiver's key there is
    /// the one the snapshot must be signed with.
    #[arg(long, value_name = "FILE")]
    pub access: Option<PathBuf>,
    /// Restore a snapshot whose signature cannot be checked
    /// (unsigned, or no --access); logged loudly. Never one signed by
    /// another key.
    #[arg(long)]
    pub allow_unsigned: bool,
    /// Where the contents a --force restore replaces are saved
    /// (default: the temp directory).
    #[arg(long, value_name = "DIR")]
    pub backup_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let ctx = Context::load(&args.config, Some("warn"))?;
    let restore = commands::RestoreArgs {
        id: args.snapshot,
        from_s3: args.from_s3,
        from_file: args.from_file,
        force: args.force,
        trust: commands::trust(args.access.as_deref(), args.allow_unsigned)?,
        backup_dir: args.backup_dir,
    };
    let report = ctx.block_on(commands::restore(
        super::snapshot::target(&ctx.config),
        restore,
    ))?;
    match &report.signature {
        Checked::Signed { signer } => println!("{}: signature of {signer} verified", report.id),
        Checked::Unchecked(why) => println!(
            "{}: SIGNATURE NOT CHECKED (--allow-unsigned): {why}",
            report.id
        ),
    }
    if let Some(b) = &report.backup {
        println!("previous contents saved to {}", b.display());
    }
    for b in &report.purged {
        println!("{b}: purged and replaced (--force)");
    }
    for (b, n) in &report.buckets {
        println!("{b}: {n} keys restored");
    }
    println!(
        "{}: restored (sha256 {} verified)",
        report.id, report.sha256
    );
    Ok(ExitCode::SUCCESS)
}
