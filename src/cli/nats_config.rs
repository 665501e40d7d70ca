//! `presenced nats-config`: a leaf's or hub node's nats-server config.

use presenced::natsconf::{HubNode, Leaf};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub kind: Kind,
}

/// Which server to render.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Kind {
    /// A site's leaf node (JetStream domain `leaf-<site>`).
    Leaf {
        /// TOML description of the leaf (see docs/OPERATIONS.md).
        file: PathBuf,
    },
    /// One node of the hub cluster (JetStream domain `hub`).
    Hub {
        /// TOML description of the hub node (see docs/OPERATIONS.md).
        file: PathBuf,
    },
}

/// The rendered config on stdout.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let text = match &args.kind {
        Kind::Leaf { file } => Leaf::load(file)?.render()?,
        Kind::Hub { file } => HubNode::load(file)?.render()?,
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}
