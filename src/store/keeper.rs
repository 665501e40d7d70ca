//! The lease's start inside the daemon: this service's key in KV
//! `owners`, kept while it runs; with the engine, also the leader lease.

use super::config::LeaseConfig;
use super::leader::{self, Fence, Role};
use super::lease::{self, Lease};
use crate::base::ownership::Component;
use crate::component::Ctx;
use crate::supervise::Stage;
use std::sync::atomic::Ordering;
use tokio::sync::watch;

/// Starts the lease (component `lease`, essential) for a service running
/// `runs`. With `leader` (the fence of the engine or the sources, and
/// where the role is reported), it is the leader lease ([`leader::keep`]); without, the
/// plain liveness lease. Returns whether the lease is held, which Home
/// Assistant waits for; metrics and `/healthz` show it too.
pub fn start(
    ctx: &mut Ctx<'_>,
    cfg: &LeaseConfig,
    runs: &[Component],
    leader: Option<(Fence, watch::Sender<Role>)>,
    role_rx: watch::Receiver<Role>,
) -> watch::Receiver<bool> {
    let (held_tx, held_rx) = watch::channel(false);
    let lease = Lease::new(ctx.service, runs, crate::time::Timestamp::now());
    let (js, ttl) = (ctx.js.clone(), cfg.ttl);
    // The engine's role families only where the engine runs: an
    // ingest-only service's lease leads its sources, and its role shows in
    // `/healthz` (`ingest.role`, `ingest.takeovers`) rather than under an
    // engine's metric names.
    let (_, own) = super::metrics::declare(ctx.metrics, runs.contains(&Component::Engine));
    let components = ctx.sup.registry();
    let stop = ctx.sup.stop_flag(Stage::Lease);
    let mut held = held_rx.clone();
    let mut role = role_rx;
    let audit = ctx.site.audit_subject(ctx.service);
    ctx.sup.spawn("lease", Stage::Lease, true, async move {
        let watcher = async {
            while held.changed().await.is_ok() {
                let now = *held.borrow_and_update();
                own.held.store(now, Ordering::Relaxed);
                if now {
                    components.running("lease");
                }
            }
        };
        if let Some((fence, role_tx)) = leader {
            let takeovers = own.engine_takeovers.clone();
            let (components, own) = (components.clone(), own.clone());
            let roles = async move {
                let mut seen = false;
                while role.changed().await.is_ok() {
                    let r = role.borrow_and_update().clone();
                    own.engine_active.store(r.active, Ordering::Relaxed);
                    if !seen {
                        seen = true;
                        components.running("lease");
                    }
                    *own.role.write().unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
            };
            tokio::join!(
                leader::keep(
                    js,
                    lease,
                    ttl,
                    fence,
                    audit,
                    stop,
                    leader::Reports {
                        role: role_tx,
                        held: held_tx,
                        takeovers,
                    },
                ),
                roles,
                watcher
            );
        } else {
            tokio::join!(lease::keep(js, lease, ttl, stop, held_tx), watcher);
        }
        Ok(())
    });
    held_rx
}
