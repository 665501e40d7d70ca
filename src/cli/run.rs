//! `presenced run`: the daemon.

use super::{ConfigArg, Context};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub config: ConfigArg,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    one_heap_arena();
    let ctx = Context::load(&args.config, None)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        site = %ctx.config.site,
        config = %ctx.path.display(),
        "starting"
    );
    // Moved, not cloned: the daemon drops the parsed zones once compiled,
    // and a copy kept here would hold them (megabytes with thousands of
    // zones) for the daemon's whole life.
    let Context { config, path, rt } = ctx;
    rt.block_on(presenced::daemon::run_file(config, Some(path)))?;
    Ok(ExitCode::SUCCESS)
}

/// glibc gives each thread that contends for the heap an arena of its own
/// (up to 8 per core), and memory freed in one arena is not reused by
/// another: with 10,000 zones the idle daemon held 34-35 MB resident with
/// its three arenas, 30 MB with one (docs/PERFORMANCE.md). The daemon runs
/// a few threads, and glibc's per-thread cache serves small allocations
/// without taking the arena's lock; under a saturating publisher the one
/// arena cost about a seventh of the end-to-end rate in the benchmark, far
/// above what a site sends. `MALLOC_ARENA_MAX` in the environment still
/// decides when set.
fn one_heap_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes the allocator's tuning; it is
        // called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
