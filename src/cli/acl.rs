//! `presenced acl`: a leaf's `authorization` block from the ownership map.

use presenced::naming::Site;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The ownership map (access file, docs/SECURITY.md).
    #[arg(long, value_name = "FILE")]
    pub access: PathBuf,
    /// The site whose leaf the block is for.
    #[arg(long)]
    pub site: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let site = Site::new(&args.site)?;
    let access = presenced::acl::access::Access::load(&args.access)?;
    print!("{}", presenced::acl::render::render(&access, &site));
    Ok(ExitCode::SUCCESS)
}
