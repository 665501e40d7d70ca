//! The naming convention behind the ACLs: the only place where subjects,
//! stream, bucket, consumer and domain names are spelled.
//!
//! The daemon, the provisioner and (later) the ACL generator all derive their
//! names from here, so a rename cannot leave one of them behind. See the
//! naming table in `docs/ARCHITECTURE.md`.

use std::fmt;

/// Stream of observations, subjects `sensors.<site>.<sensor>`.
pub const SENSORS_STREAM: &str = "SENSORS";
/// Stream of presence transitions, subjects `events.<site>.presence.<zone>`,
/// and of the engine's takeover records, `events.<site>.takeover.<service>`.
pub const EVENTS_STREAM: &str = "EVENTS";
/// Stream of audit records, subjects `audit.events.<site>.<service>`.
pub const AUDIT_STREAM: &str = "AUDIT";
/// Stream of rejected input, subjects `rejected.<site>.<source>`.
pub const REJECTED_STREAM: &str = "REJECTED";
/// KV bucket with the presence of each zone, key `<zone>`.
pub const PRESENCE_BUCKET: &str = "presence";
/// KV bucket with the pending debounce deadline of each zone, key `<zone>`.
pub const DEBOUNCE_BUCKET: &str = "debounce";
/// KV bucket with the liveness lease of each service, key `<service>`.
pub const OWNERS_BUCKET: &str = "owners";
/// Durable pull consumer of the engine on `SENSORS`.
pub const ENGINE_CONSUMER: &str = "engine";
/// JetStream domain of the hub cluster.
pub const HUB_DOMAIN: &str = "hub";

/// Object store of the archiver's state snapshots, object
/// `<site>/<buckets>/<utc-timestamp>` (see [`snapshot_name`]).
pub const SNAPSHOTS_OBJECT: &str = "snapshots";
/// KV bucket of the archiver's upload outbox, key `<snapshot-id>`.
pub const ARCHIVE_BUCKET: &str = "archive";

/// Largest site id: it is embedded in domain and mirror names.
pub const MAX_SITE_LEN: usize = 32;

/// True for a sensor, zone, service or source id: `[a-z0-9_-]+`, no dots
/// (a dot would split a subject token) and at most 64 characters so
/// subjects stay short.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// True for a site id: `[a-z0-9-]+`, at most 32 characters. No `_`,
/// because site ids end up in host and container names.
pub fn is_site_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SITE_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("site id {0:?} is invalid: use [a-z0-9-], 1 to 32 characters")]
    Site(String),
    #[error("{kind} id {id:?} is invalid: use [a-z0-9_-], 1 to 64 characters, no dots")]
    Token { kind: &'static str, id: String },
}

/// Checks an id of the given kind ("sensor", "zone", ...).
pub fn check_token(kind: &'static str, id: &str) -> Result<(), NameError> {
    if is_token(id) {
        Ok(())
    } else {
        Err(NameError::Token {
            kind,
            id: id.to_owned(),
        })
    }
}

/// A validated site id and every name derived from it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Site(String);

impl Site {
    pub fn new(id: &str) -> Result<Self, NameError> {
        if is_site_id(id) {
            Ok(Site(id.to_owned()))
        } else {
            Err(NameError::Site(id.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// JetStream domain of this site's leaf node.
    pub fn leaf_domain(&self) -> String {
        format!("leaf-{}", self.0)
    }

    /// Subject of one sensor's observations.
    pub fn sensors_subject(&self, sensor: &str) -> String {
        format!("sensors.{}.{}", self.0, sensor)
    }

    /// Every observation subject of this site.
    pub fn sensors_filter(&self) -> String {
        format!("sensors.{}.>", self.0)
    }

    /// Subject of one zone's transitions.
    pub fn events_subject(&self, zone: &str) -> String {
        format!("events.{}.presence.{}", self.0, zone)
    }

    /// Every subject of this site's `EVENTS`: transitions and takeover
    /// records.
    pub fn events_filter(&self) -> String {
        format!("events.{}.>", self.0)
    }

    /// Every transition subject of this site (no takeover records): what
    /// readers that count or replay transitions consume.
    pub fn transitions_filter(&self) -> String {
        format!("events.{}.presence.>", self.0)
    }

    /// Subject of the engine service's takeover records in `EVENTS`: one
    /// per acquisition of its leader lease, with the old and new holder.
    /// Beside the zones' subjects, never one of them, so no reader takes a
    /// takeover for a transition.
    pub fn takeover_subject(&self, service: &str) -> String {
        format!("events.{}.takeover.{}", self.0, service)
    }

    /// Every takeover subject of this site (the server-side fence of
    /// `EVENTS` checks the last sequence under it).
    pub fn takeover_filter(&self) -> String {
        format!("events.{}.takeover.>", self.0)
    }

    /// Whether an `EVENTS` subject holds a transition (and not a takeover
    /// record or anything newer).
    pub fn is_transition_subject(&self, subject: &str) -> bool {
        subject
            .strip_prefix("events.")
            .and_then(|r| r.strip_prefix(self.0.as_str()))
            .and_then(|r| r.strip_prefix(".presence."))
            .is_some_and(|zone| !zone.is_empty())
    }

    /// Subject of the rejected input of one source.
    pub fn rejected_subject(&self, source: &str) -> String {
        format!("rejected.{}.{}", self.0, source)
    }

    pub fn rejected_filter(&self) -> String {
        format!("rejected.{}.>", self.0)
    }

    /// Subject a service writes its audit records to.
    pub fn audit_subject(&self, service: &str) -> String {
        format!("audit.events.{}.{}", self.0, service)
    }

    pub fn audit_filter(&self) -> String {
        format!("audit.events.{}.>", self.0)
    }

    /// Core NATS subject of a sensor's live readings (no persistence).
    pub fn live_subject(&self, sensor: &str) -> String {
        format!("live.{}.{}", self.0, sensor)
    }

    /// Request/reply subject of commands for one zone.
    pub fn cmd_subject(&self, zone: &str) -> String {
        format!("cmd.{}.presence.{}", self.0, zone)
    }

    /// Every command subject of this site.
    pub fn cmd_filter(&self) -> String {
        format!("cmd.{}.presence.>", self.0)
    }

    /// The zone a command subject is for: the rest after
    /// `cmd.<site>.presence.`, which is not a valid zone id when it has
    /// more tokens; `None` for a subject of another site or keyspace.
    pub fn cmd_zone<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix("cmd.")?
            .strip_prefix(self.0.as_str())?
            .strip_prefix(".presence.")
    }

    /// Every live reading subject of this site.
    pub fn live_filter(&self) -> String {
        format!("live.{}.>", self.0)
    }

    /// Name of a hub mirror of one of this site's streams or buckets, e.g.
    /// `SENSORS-<site>` or `presence-<site>` (and `snapshots-<site>` for
    /// the object store).
    pub fn hub_mirror(&self, source: &str) -> String {
        format!("{}-{}", source, self.0)
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// JetStream API prefix of a domain as seen from another domain across a
/// leafnode link: how a hub mirror names its source on a leaf, and how the
/// daemon reaches the hub (`$JS.hub.API`).
pub fn domain_api_prefix(domain: &str) -> String {
    format!("$JS.{domain}.API")
}

/// KV `presence` key of a person: `person.<id>`. The dot keeps people
/// apart from zones, whose ids are single tokens, so a person and a zone
/// may share an id.
pub fn person_key(person: &str) -> String {
    format!("{PERSON_KEY_PREFIX}{person}")
}

/// What every person's key in KV `presence` starts with.
pub const PERSON_KEY_PREFIX: &str = "person.";

/// True for a key of KV `presence`: a zone id, or `person.<id>`.
pub fn is_presence_key(key: &str) -> bool {
    is_token(key) || key.strip_prefix(PERSON_KEY_PREFIX).is_some_and(is_token)
}

/// Name of the stream behind a KV bucket.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// Subject of one key of a KV bucket, as the server stores it.
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// Every key subject of a KV bucket.
pub fn kv_filter(bucket: &str) -> String {
    format!("$KV.{bucket}.>")
}

/// Name of the stream behind an object store bucket.
pub fn obj_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}

/// Every chunk and metadata subject of an object store bucket.
pub fn obj_filter(bucket: &str) -> String {
    format!("$O.{bucket}.>")
}

/// Inbox prefix of a service's connections. Replies (JetStream API
/// answers, KV watch deliveries) go to inboxes; a per-service prefix lets
/// the ACL grant each service only its own, so nobody reads another
/// service's replies.
pub fn inbox_prefix(service: &str) -> String {
    format!("_INBOX.{service}")
}

/// Subjects of the JetStream API (local to the connected server, no
/// domain prefix), as the ACL generator grants them.
pub mod js {
    /// Everything in the JetStream API.
    pub const API_ALL: &str = "$JS.API.>";
    /// Every acknowledgement subject.
    pub const ACK_ALL: &str = "$JS.ACK.>";
    /// Every flow-control reply subject.
    pub const FC_ALL: &str = "$JS.FC.>";

    pub fn stream_info(stream: &str) -> String {
        format!("$JS.API.STREAM.INFO.{stream}")
    }

    pub fn stream_purge(stream: &str) -> String {
        format!("$JS.API.STREAM.PURGE.{stream}")
    }

    /// Direct get of the last message of a subject, the subject in the
    /// request's subject (how KV get reads a key).
    pub fn direct_get_last(stream: &str) -> String {
        format!("$JS.API.DIRECT.GET.{stream}.>")
    }

    /// Creating an ephemeral consumer on `stream` (the server names it,
    /// and refuses a durable name on this subject): how ordered consumers,
    /// KV watches and object reads start.
    pub fn consumer_create_ephemeral(stream: &str) -> String {
        format!("$JS.API.CONSUMER.CREATE.{stream}")
    }

    /// Creating a named consumer with a filter subject on `stream` (`*`
    /// for any name): `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`.
    /// On this form the server refuses a body whose `name` or
    /// `durable_name` differs from the subject's, and a filter that
    /// differs from the subject's: granting it with the durable's name
    /// denied keeps a reader off the durable, which the ephemeral form
    /// does not (it takes `"name":"<durable>"` in the body as an update
    /// of the durable).
    pub fn consumer_create_named(stream: &str, consumer: &str) -> String {
        format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>")
    }

    pub fn consumer_info(stream: &str, consumer: &str) -> String {
        format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}")
    }

    /// Pull requests of a consumer (`*` for any).
    pub fn consumer_next(stream: &str, consumer: &str) -> String {
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}")
    }

    /// Acknowledgements of a consumer's messages (`*` for any).
    pub fn ack(stream: &str, consumer: &str) -> String {
        format!("$JS.ACK.{stream}.{consumer}.>")
    }

    /// Stream info of a hub stream, asked through the leafnode link (the
    /// hub's domain prefix): how the daemon reads a hub mirror's health.
    pub fn hub_stream_info(stream: &str) -> String {
        format!(
            "{}.STREAM.INFO.{stream}",
            super::domain_api_prefix(super::HUB_DOMAIN)
        )
    }

    /// Leader step-down of a hub stream through the leafnode link: how the
    /// daemon makes a mirror resume after the link comes back.
    pub fn hub_stream_leader_stepdown(stream: &str) -> String {
        format!(
            "{}.STREAM.LEADER.STEPDOWN.{stream}",
            super::domain_api_prefix(super::HUB_DOMAIN)
        )
    }

    /// Flow-control replies of push consumers on `stream`.
    pub fn flow_control(stream: &str) -> String {
        format!("$JS.FC.{stream}.>")
    }

    /// Everything in the JetStream API of `domain`, addressed by its
    /// domain prefix (how `watch --hub` reaches the hub's mirrors).
    pub fn domain_api_all(domain: &str) -> String {
        format!("$JS.{domain}.API.>")
    }
}

/// Name of a snapshot: `<site>/<buckets>/<utc-timestamp>`, where
/// `<buckets>` is the sorted names of what it holds joined by `_`
/// (`debounce_events_owners_presence`) and the timestamp is
/// `YYYYMMDDTHHMMSS.mmmZ`. The same string is the object name in
/// `snapshots`, the outbox key in `archive` and (after the prefix) the S3
/// key, so one id follows a snapshot everywhere; it sorts by time within a
/// site and bucket set.
pub fn snapshot_name(site: &Site, buckets: &[&str], utc_stamp: &str) -> String {
    let mut b: Vec<&str> = buckets.to_vec();
    b.sort_unstable();
    b.dedup();
    format!("{}/{}/{}", site.as_str(), b.join("_"), utc_stamp)
}

/// Subjects that cross the leafnode link between a site's leaf and the
/// hub, as the hub's grant for the site's leafnode identity names them.
pub mod leaf {
    use super::Site;

    /// The site's JetStream API as the hub reaches it (`$JS.<domain>.API`):
    /// what hub mirrors of the site's streams and buckets source from.
    pub fn js_api(site: &Site) -> String {
        format!("$JS.{}.API.>", site.leaf_domain())
    }

    /// Replies of a leaf's JetStream to the hub's requests (the hub's
    /// server-side request inboxes). nats-server names these itself
    /// (`$JSC.R.<random>`), with no per-site prefix; the random token only
    /// travels to the leaf the request was for.
    pub const JS_REPLIES: &str = "$JSC.R.>";

    /// Delivery prefix of the hub mirrors of `site` (the mirror's
    /// `external.deliver`): the server delivers to `<prefix>.M.<random>`,
    /// so the hub can let each site's leaf deliver to its own mirrors only.
    pub fn mirror_delivery_prefix(site: &Site) -> String {
        format!("$JS.M.{}", site.as_str())
    }

    /// Every delivery subject of the hub mirrors of `site`.
    pub fn mirror_deliveries(site: &Site) -> String {
        format!("{}.>", mirror_delivery_prefix(site))
    }

    /// Inbox prefix of the hub admin's requests to `site`'s leaf
    /// (`provision-hub` reading the mirror sources): the leaf may answer
    /// there and nowhere else among the hub's inboxes.
    pub fn admin_reply_prefix(site: &Site) -> String {
        format!("_INBOX.hub-admin.{}", site.as_str())
    }

    /// Token that marks the inboxes of a site's requests to the hub
    /// (`[hub]` health, nudges, `presenced status`): `_INBOX.<service>.hub-<site>.<id>`.
    pub fn hub_reply_token(site: &Site) -> String {
        format!("hub-{}", site.as_str())
    }

    /// The inboxes the hub may send answers to down `site`'s link: with a
    /// service's inbox prefix (`_INBOX.<service>.hub-<site>.>`) or the
    /// default one (`_INBOX.hub-<site>.>`).
    pub fn hub_replies(site: &Site) -> [String; 2] {
        let t = hub_reply_token(site);
        [format!("_INBOX.*.{t}.>"), format!("_INBOX.{t}.>")]
    }
    /// Loop detection between servers.
    pub const LOOP_DETECTION: &str = "$LDS.>";
}

/// `Nats-Msg-Id` of a zone's n-th transition: stable across restarts, so a
/// transition published twice around a crash is stored once.
pub fn transition_msg_id(site: &Site, zone: &str, number: u64) -> String {
    format!("{}.{}.{}", site.as_str(), zone, number)
}

/// `Nats-Msg-Id` of a takeover record: the lease revision the take
/// wrote is unique per acquisition, so a retried publish is a duplicate.
/// Four dot-separated tokens, where a transition's id has three (zone
/// ids hold no dots), so the two never collide.
pub fn takeover_msg_id(site: &Site, service: &str, lease_revision: u64) -> String {
    format!("{}.takeover.{}.{}", site.as_str(), service, lease_revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_ids() {
        assert!(Site::new("home-1").is_ok());
        assert!(Site::new("").is_err());
        assert!(Site::new("Home").is_err());
        assert!(
            Site::new("a_b").is_err(),
            "underscore is not allowed in site ids"
        );
        assert!(Site::new(&"a".repeat(33)).is_err());
        assert!(Site::new(&"a".repeat(32)).is_ok());
    }

    #[test]
    fn tokens() {
        assert!(is_token("kitchen_motion-2"));
        assert!(!is_token("kitchen.motion"));
        assert!(!is_token("kitchen motion"));
        assert!(!is_token("*"));
        assert!(!is_token(">"));
        assert!(!is_token(""));
    }

    #[test]
    fn derived_names() {
        let s = Site::new("home").unwrap();
        assert_eq!(s.leaf_domain(), "leaf-home");
        assert_eq!(s.sensors_subject("pir"), "sensors.home.pir");
        assert_eq!(s.events_subject("hall"), "events.home.presence.hall");
        assert_eq!(s.takeover_subject("engine"), "events.home.takeover.engine");
        assert!(s.is_transition_subject(&s.events_subject("hall")));
        assert!(!s.is_transition_subject(&s.takeover_subject("engine")));
        assert!(!s.is_transition_subject("events.homer.presence.hall"));
        assert!(!s.is_transition_subject("events.home.presence."));
        assert_eq!(s.rejected_subject("mqtt-main"), "rejected.home.mqtt-main");
        assert_eq!(s.audit_subject("engine"), "audit.events.home.engine");
        assert_eq!(s.cmd_subject("hall"), "cmd.home.presence.hall");
        assert_eq!(s.cmd_zone(&s.cmd_subject("hall")), Some("hall"));
        assert_eq!(s.cmd_zone("cmd.home.presence.a.b"), Some("a.b"));
        assert_eq!(s.cmd_zone("cmd.homer.presence.hall"), None);
        assert_eq!(s.cmd_zone("cmd.home.debounce.hall"), None);
        assert_eq!(s.live_subject("pir"), "live.home.pir");
        assert_eq!(s.hub_mirror("presence"), "presence-home");
        assert_eq!(domain_api_prefix(&s.leaf_domain()), "$JS.leaf-home.API");
        assert_eq!(kv_subject(PRESENCE_BUCKET, "hall"), "$KV.presence.hall");
        assert_eq!(
            snapshot_name(&s, &["presence", "debounce"], "20261130T015800.123Z"),
            "home/debounce_presence/20261130T015800.123Z"
        );
        assert_eq!(
            js::hub_stream_info("SENSORS-home"),
            "$JS.hub.API.STREAM.INFO.SENSORS-home"
        );
        assert_eq!(person_key("alice"), "person.alice");
        assert!(is_presence_key("hall"));
        assert!(is_presence_key("person.alice"));
        assert!(!is_presence_key("person."));
        assert!(!is_presence_key("person.a.b"));
        assert!(!is_presence_key("room.alice"));
    }
}
