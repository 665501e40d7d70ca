//! `presenced restore`: a snapshot's buckets rebuilt on this leaf.

use super::{ConfigArg, Context};
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
    let restore = presenced::archive::cli::RestoreArgs {
        id: args.snapshot,
        from_s3: args.from_s3,
        from_file: args.from_file,
        force: args.force,
        trust: presenced::archive::cli::trust(args.access.as_deref(), args.allow_unsigned)?,
        backup_dir: args.backup_dir,
    };
    ctx.block_on(presenced::archive::cli::restore(
        ctx.config.clone(),
        restore,
    ))?;
    Ok(ExitCode::SUCCESS)
}
