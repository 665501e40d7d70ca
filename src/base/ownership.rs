//! Who owns what: the keyspaces of DESIGN.md's naming table, the
//! components that own them, and the bounds of the liveness lease every
//! component keeps. A leaf module: the ACL generator, the lease keeper, the
//! config checks and the clients all read it, so it imports nothing from
//! the rest of the crate.

use std::fmt;
use std::time::Duration;

/// Shortest lease TTL: the server expires per-message TTLs on a one-second
/// tick, and the holder renews three times per TTL.
pub const MIN_TTL: Duration = Duration::from_secs(3);

/// A logical keyspace of DESIGN.md's naming table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Keyspace {
    /// Stream `SENSORS`.
    Sensors,
    /// Stream `REJECTED`.
    Rejected,
    /// Core subjects `live.<site>.<sensor>`.
    Live,
    /// KV `presence`.
    Presence,
    /// KV `debounce`.
    Debounce,
    /// Stream `EVENTS`.
    Events,
    /// Request/reply `cmd.<site>.presence.<zone>`: the owner answers, a
    /// grant lets a client ask.
    Commands,
    /// Object store `snapshots`.
    Snapshots,
    /// KV `archive` (the upload outbox).
    Archive,
    /// Stream `AUDIT`: every service writes its own subject only.
    Audit,
    /// KV `owners`: every service writes its own key only.
    Owners,
}

impl Keyspace {
    pub const ALL: [Keyspace; 11] = [
        Keyspace::Sensors,
        Keyspace::Rejected,
        Keyspace::Live,
        Keyspace::Presence,
        Keyspace::Debounce,
        Keyspace::Events,
        Keyspace::Commands,
        Keyspace::Snapshots,
        Keyspace::Archive,
        Keyspace::Audit,
        Keyspace::Owners,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Keyspace::Sensors => "sensors",
            Keyspace::Rejected => "rejected",
            Keyspace::Live => "live",
            Keyspace::Presence => "presence",
            Keyspace::Debounce => "debounce",
            Keyspace::Events => "events",
            Keyspace::Commands => "commands",
            Keyspace::Snapshots => "snapshots",
            Keyspace::Archive => "archive",
            Keyspace::Audit => "audit",
            Keyspace::Owners => "owners",
        }
    }

    pub fn parse(s: &str) -> Option<Keyspace> {
        Keyspace::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Shared keyspaces have one writer per key or subject (each service
    /// its own) rather than one owner.
    pub fn is_shared(self) -> bool {
        matches!(self, Keyspace::Audit | Keyspace::Owners)
    }
}

impl fmt::Display for Keyspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A part of presenced a service runs; each owns fixed keyspaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Ingest,
    Engine,
    Archiver,
    /// `presenced restore`, run by hand with the daemon stopped: owns no
    /// keyspace, but may replace the engine's buckets (see
    /// docs/ARCHIVE.md, "Restore").
    Restore,
}

impl Component {
    pub const ALL: [Component; 4] = [
        Component::Ingest,
        Component::Engine,
        Component::Archiver,
        Component::Restore,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::Ingest => "ingest",
            Component::Engine => "engine",
            Component::Archiver => "archiver",
            Component::Restore => "restore",
        }
    }

    pub fn parse(s: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.name() == s)
    }

    /// The keyspaces this component writes (DESIGN.md's naming table).
    pub fn owns(self) -> &'static [Keyspace] {
        match self {
            Component::Ingest => &[Keyspace::Sensors, Keyspace::Rejected, Keyspace::Live],
            Component::Engine => &[
                Keyspace::Presence,
                Keyspace::Debounce,
                Keyspace::Events,
                Keyspace::Commands,
            ],
            Component::Archiver => &[Keyspace::Snapshots, Keyspace::Archive],
            // Replacing presence and debounce is a grant of its own (see
            // acl::render), not ownership: the engine stays their writer.
            Component::Restore => &[],
        }
    }

    /// What the component must read to work, beyond what it owns.
    pub fn needs(self) -> &'static [Keyspace] {
        match self {
            Component::Ingest => &[],
            // The engine consumes the observations ingest stored.
            Component::Engine => &[Keyspace::Sensors],
            // A snapshot reads the state buckets; the EVENTS window is
            // optional and granted with `reads = ["events"]`.
            Component::Archiver => &[Keyspace::Presence, Keyspace::Debounce, Keyspace::Owners],
            // The snapshot (object store), and the buckets it replaces
            // (it keeps a copy of them until the new data is complete).
            Component::Restore => &[Keyspace::Snapshots, Keyspace::Presence, Keyspace::Debounce],
        }
    }
}

/// Which instance of a service runs its engine, for status and metrics:
/// several instances may share a service and its engine's leader lease
/// (`store::leader`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Role {
    /// True while this instance holds the lease.
    pub active: bool,
    /// When this instance last took the lease (active) or last saw
    /// another holder take it (standby).
    pub since: Option<super::time::Timestamp>,
    /// The holder as `host/pid`, when known.
    pub holder: Option<String>,
    /// Whether that other holder's lease says it runs ingest.
    pub holder_ingests: bool,
}

impl Role {
    /// Another instance holds the lease and runs ingest, so this one's
    /// sources must not run (`ingest::start`). Not the same as
    /// `!active`: an instance whose renewals lapse (cut from the leaf)
    /// is not active but has seen nobody else take over yet, and a holder
    /// that runs the engine alone leaves the reading to the others.
    pub fn another_runs_ingest(&self) -> bool {
        !self.active && self.holder.is_some() && self.holder_ingests
    }

    /// Whether this instance's sources run now: once the election has
    /// said anything (`since`), unless another holder runs ingest.
    pub fn runs_sources(&self) -> bool {
        self.since.is_some() && !self.another_runs_ingest()
    }
}
