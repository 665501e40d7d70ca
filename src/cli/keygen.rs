//! `presenced keygen`: a new NKEY user seed.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The service the seed is for (a name in the access file).
    pub service: String,
    /// Where to write the seed (mode 0600; an existing file is never
    /// overwritten).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let g = presenced::acl::identity::keygen(&args.service, &args.out)?;
    eprintln!(
        "{}: seed of service {} written (mode 0600); its public key:",
        g.path.display(),
        g.service
    );
    println!("{}", g.public_key);
    Ok(ExitCode::SUCCESS)
}
