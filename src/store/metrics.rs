//! The store's metrics: the connection to the leaf ([`LinkMetrics`]) and
//! the lease with the engine's leader role ([`LeaseMetrics`]). The daemon
//! registers both before it connects ([`declare`]), so that an instance
//! that cannot reach its leaf says so with zeros rather than with absent
//! families; the connection and [`super::keeper::start`] find them again
//! (and register them, when called without the daemon). `/healthz` and
//! the status page read them through [`crate::metrics::Metrics::handle`].

use crate::base::ownership::Role;
use crate::metrics::{counter_name, Collector, Count, Event, Flag, Metrics};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Registers the link's and the lease's families in `metrics`, the
/// leader role's too when the instance runs the engine (`leader`).
pub fn declare(metrics: &Metrics, leader: bool) -> (Arc<LinkMetrics>, Arc<LeaseMetrics>) {
    let link = metrics.handle_or_register::<LinkMetrics>();
    let lease = metrics.handle_or_register::<LeaseMetrics>();
    lease.leader.store(leader, Ordering::Relaxed);
    (link, lease)
}

/// The connection to the leaf nats-server.
#[derive(Debug, Default)]
pub struct LinkMetrics {
    pub connected: Flag,
    pub reconnects: Count,
    /// Operations nats-server refused for lack of permission (counted by
    /// the violation reporter the daemon wires to the connection).
    pub permission_violations: Count,
}

/// The connection to the leaf came back after a loss.
pub const NATS_RECONNECTED: Event = Event {
    name: "nats_reconnected",
    level: tracing::Level::INFO,
    message: "reconnected to nats-server",
    counter: "presenced_nats_reconnects_total",
};

/// nats-server refused an operation for lack of permission. Counted when
/// the server reports it; the daemon's audit task writes the line (rate
/// limited, folded, with its AUDIT record), a connection without one
/// writes it at once.
pub const PERMISSION_VIOLATION: Event = Event {
    name: "permission_violation",
    level: tracing::Level::ERROR,
    message: "permission violation: nats-server refused this operation; the ACL does not grant it to this service (see docs/SECURITY.md)",
    counter: "presenced_permission_violations_total",
};

/// This instance took the engine's leader lease and runs the engine.
pub const ENGINE_TAKEOVER: Event = Event {
    name: "engine_takeover",
    level: tracing::Level::INFO,
    message: "leader lease taken: this instance runs the service's engine or ingest (field runs); other instances of the service stand by",
    counter: "presenced_engine_takeovers_total",
};

impl Collector for LinkMetrics {
    fn collect(&self, r: &mut Registry) {
        r.register(
            "presenced_nats_connected",
            "1 while connected to the leaf nats-server.",
            self.connected.clone(),
        );
        r.register(
            counter_name("presenced_nats_reconnects_total"),
            "Connections to the leaf nats-server after the first.",
            self.reconnects.clone(),
        );
        r.register(
            counter_name("presenced_permission_violations_total"),
            "Publishes and subscriptions nats-server refused for lack of permission.",
            self.permission_violations.clone(),
        );
    }
}

/// This service's lease in KV `owners`; with the engine, also the leader
/// lease's role.
#[derive(Debug, Default)]
pub struct LeaseMetrics {
    /// The holder's view of its lease: its last renewal is younger than
    /// `lease.ttl`.
    pub held: Flag,
    /// Whether the lease is the engine's leader lease (its role families
    /// are exported only then).
    pub leader: AtomicBool,
    pub engine_active: Flag,
    pub engine_takeovers: Count,
    /// Active or standby, since when, who holds it.
    pub role: std::sync::RwLock<Option<Role>>,
}

impl LeaseMetrics {
    /// A copy of the engine's role, once the leader lease reported one.
    pub fn role(&self) -> Option<Role> {
        self.role.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Collector for LeaseMetrics {
    fn collect(&self, r: &mut Registry) {
        if self.leader.load(Ordering::Relaxed) {
            r.register(
                "presenced_engine_active",
                "1 while this instance holds the engine's leader lease and runs the engine; 0 on a standby.",
                self.engine_active.clone(),
            );
            r.register(
                counter_name("presenced_engine_takeovers_total"),
                "Times this instance took the engine's leader lease.",
                self.engine_takeovers.clone(),
            );
        }
        r.register(
            "presenced_lease_held",
            "1 while this service's lease in KV owners is held (last renewal younger than lease.ttl).",
            self.held.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_families_are_the_leader_leases_only() {
        let plain = Metrics::default();
        plain.register(Arc::new(LeaseMetrics::default()));
        let text = plain.render();
        assert!(text.contains("presenced_lease_held 0\n"), "{text}");
        assert!(!text.contains("presenced_engine_"), "{text}");

        let leader = Metrics::default();
        let (_, own) = declare(&leader, true);
        own.engine_active.store(true, Ordering::Relaxed);
        Metrics::inc(&own.engine_takeovers);
        let text = leader.render();
        assert!(text.contains("presenced_engine_active 1\n"), "{text}");
        assert!(
            text.contains(
                "# TYPE presenced_engine_takeovers counter\npresenced_engine_takeovers_total 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_reconnect_is_counted_where_it_is_logged() {
        let m = Metrics::default();
        let link = m.handle_or_register::<LinkMetrics>();
        crate::emit!(NATS_RECONNECTED, &link.reconnects);
        let text = m.render();
        assert!(
            text.contains("presenced_nats_reconnects_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("presenced_permission_violations_total 0\n"),
            "{text}"
        );
    }
}
