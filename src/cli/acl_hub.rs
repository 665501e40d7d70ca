//! `presenced acl-hub`: the hub's `authorization` block.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Public NKEY of the hub's admin (provision-hub, inspection).
    #[arg(long, value_name = "NKEY")]
    pub admin_nkey: Option<String>,
    /// Public NKEY of a read-only viewer (`presenced dashboard`): reads
    /// every site's mirrors, changes nothing. Once per viewer.
    #[arg(long, value_name = "NKEY")]
    pub viewer_nkey: Vec<String>,
    /// SITE=ACCESS_FILE, once per site.
    #[arg(required = true, value_name = "SITE=ACCESS_FILE")]
    pub sites: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let text = presenced::acl::hub::render_files(
        args.admin_nkey.as_deref(),
        &args.viewer_nkey,
        &args.sites,
    )?;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}
