//! `presenced replay`, `tune` and `report`: the pure engine over a range of
//! SENSORS with a (candidate) config, offline and read-only
//! (docs/TUNING.md). Their arguments and work are in
//! `presenced::replay::cli`; this is the thin entry of each.

use std::process::ExitCode;

pub use presenced::replay::cli::{ReplayArgs, ReportArgs, TuneArgs};

pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    super::init_tracing(Some("warn"));
    super::runtime()?.block_on(presenced::replay::cli::replay(args))?;
    Ok(ExitCode::SUCCESS)
}

pub fn tune(args: TuneArgs) -> anyhow::Result<ExitCode> {
    super::init_tracing(Some("warn"));
    super::runtime()?.block_on(presenced::replay::cli::tune(args))?;
    Ok(ExitCode::SUCCESS)
}

pub fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    super::init_tracing(Some("warn"));
    super::runtime()?.block_on(presenced::replay::cli::report(args))?;
    Ok(ExitCode::SUCCESS)
}
