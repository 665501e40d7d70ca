//! The engine's start inside the daemon: stand by until this instance
//! holds the leader lease, then rehydrate, bind the consumer and run,
//! fenced by the lease.

use super::config::EngineConfig;
use super::runner::Runner;
use super::Model;
use crate::component::Ctx;
use crate::naming;
use crate::store::leader::{Fence, Role};
use crate::supervise::{self, Stage};
use async_nats::jetstream;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Starts the engine (component `engine`, essential) on `model`; SIGHUP
/// reloads arrive through `models`. It runs only while `role` says this
/// instance is active, and every write is checked against `fence`.
/// Returns the engine's status line once it has rehydrated and bound its
/// consumer (`None` until then): READY waits for it.
pub fn start(
    ctx: &mut Ctx<'_>,
    cfg: &EngineConfig,
    model: Arc<Model>,
    models: watch::Receiver<Arc<Model>>,
    fence: Fence,
    role: watch::Receiver<Role>,
) -> watch::Receiver<Option<String>> {
    let (engine_ready_tx, engine_ready_rx) = watch::channel::<Option<String>>(None);
    let (js, site, metrics, batch) = (
        ctx.js.clone(),
        ctx.site.clone(),
        ctx.metrics.clone(),
        cfg.batch,
    );
    let stop = ctx.sup.stop_flag(Stage::Work);
    let (model_rx, mut role) = (models, role);
    ctx.sup.spawn("engine", Stage::Work, true, async move {
        let ready = Arc::new(engine_ready_tx);
        let mut started_once = false;
        loop {
            // Stand by until this instance holds the lease, following
            // the state meanwhile (engine::standby).
            let warm = super::standby::Warm::start(js.clone());
            let mut waiting = stop.clone();
            let keeper_gone = tokio::select! {
                r = role.wait_for(|r| r.active) => r.is_err(),
                _ = waiting.wait_for(|s| *s) => return Ok(()),
            };
            if keeper_gone {
                // The lease stage stops first on a graceful stop (its
                // release closes the fence, which may have ended a run
                // above). Not a failure: wait for this stage's own stop.
                let _ = waiting.wait_for(|s| *s).await;
                return Ok(());
            }
            let runner = match Runner::start_fenced(
                js.clone(),
                site.clone(),
                model.clone(),
                metrics.clone(),
                batch,
                Some(fence.clone()),
                Some(warm),
            )
            .await
            {
                Ok(r) => r,
                Err(e) if !started_once => {
                    return Err(supervise::classify(e).context("engine start"))
                }
                Err(e) => {
                    // A takeover during a flaky leaf: give the lease
                    // back rather than hold it without running.
                    tracing::warn!(error = %e, "engine start after a takeover failed; stepping down and trying again");
                    fence.revoke();
                    let _ = role.wait_for(|r| !r.active).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            started_once = true;
            release_startup_memory();
            let consumer = js
                .get_stream(naming::SENSORS_STREAM)
                .await
                .map_err(|e| {
                    supervise::fatal(anyhow::anyhow!(
                        "stream SENSORS is missing on the leaf ({e}): run `presenced provision` first"
                    ))
                })?
                .get_consumer::<jetstream::consumer::pull::Config>(naming::ENGINE_CONSUMER)
                .await
                .map_err(|e| {
                    supervise::fatal(anyhow::anyhow!(
                        "consumer `engine` on SENSORS is missing ({e}): run `presenced provision` first"
                    ))
                })?;
            let ready = ready.clone();
            runner
                .run_reloadable(consumer, stop.clone(), model_rx.clone(), move |r: &Runner| {
                    ready.send_replace(Some(r.status_line()));
                })
                .await
                .map_err(|e| supervise::classify(e).context("engine failed"))?;
            if *stop.borrow() {
                return Ok(());
            }
            // Fenced: wait for the keeper to step down before looking
            // at the role again.
            let _ = role.wait_for(|r| !r.active).await;
            tracing::warn!("engine stopped writing: the leader lease is lost; this instance stands by");
        }
    });
    engine_ready_rx
}

/// Rehydration reads every zone at once; glibc keeps that peak mapped
/// unless asked, and an edge host's daemon runs for months at its idle
/// size, not its start-up peak.
fn release_startup_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}
