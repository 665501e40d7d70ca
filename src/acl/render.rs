//! The nats-server `authorization` block of a site, from the ownership map.
//!
//! Deny by default: each identity gets allow lists only, built from the
//! keyspaces it writes and reads. The JetStream API subjects per operation
//! are the ones the integration test `acl` proves necessary and sufficient
//! against a real server; change them only together with that test.

use super::access::{Access, Component, Keyspace, Service};
use crate::naming::{self, js, Site};
use crate::natsconf::auth::{self, Authorization, Credential};

/// One allow or deny entry with why it is there.
pub use crate::natsconf::auth::Rule;

/// The permissions of one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish_allow: Vec<Rule>,
    pub publish_deny: Vec<Rule>,
    pub subscribe_allow: Vec<Rule>,
}

impl Permissions {
    fn add(list: &mut Vec<Rule>, subject: String, why: &str) {
        if !list.iter().any(|r| r.subject == subject) {
            list.push(Rule {
                subject,
                why: why.to_owned(),
            });
        }
    }

    fn publish(&mut self, subject: String, why: &str) {
        Self::add(&mut self.publish_allow, subject, why);
    }

    fn deny(&mut self, subject: String, why: &str) {
        Self::add(&mut self.publish_deny, subject, why);
    }

    fn subscribe(&mut self, subject: String, why: &str) {
        Self::add(&mut self.subscribe_allow, subject, why);
    }
}

/// An identity in the generated block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// `service <name>`, `admin`.
    pub label: String,
    pub summary: String,
    pub nkey: String,
    pub permissions: Permissions,
}

/// How a keyspace is stored.
enum Store {
    Stream {
        name: &'static str,
        filter: String,
    },
    Kv(&'static str),
    Object(&'static str),
    /// Core NATS subjects, no persistence.
    Core(String),
    /// Request/reply subjects: the owner answers.
    Requests(String),
}

fn store(k: Keyspace, site: &Site) -> Store {
    match k {
        Keyspace::Sensors => Store::Stream {
            name: naming::SENSORS_STREAM,
            filter: site.sensors_filter(),
        },
        Keyspace::Rejected => Store::Stream {
            name: naming::REJECTED_STREAM,
            filter: site.rejected_filter(),
        },
        Keyspace::Events => Store::Stream {
            name: naming::EVENTS_STREAM,
            filter: site.events_filter(),
        },
        Keyspace::Audit => Store::Stream {
            name: naming::AUDIT_STREAM,
            filter: site.audit_filter(),
        },
        Keyspace::Presence => Store::Kv(naming::PRESENCE_BUCKET),
        Keyspace::Debounce => Store::Kv(naming::DEBOUNCE_BUCKET),
        Keyspace::Owners => Store::Kv(naming::OWNERS_BUCKET),
        Keyspace::Snapshots => Store::Object(naming::SNAPSHOTS_OBJECT),
        Keyspace::Archive => Store::Kv(naming::ARCHIVE_BUCKET),
        Keyspace::Live => Store::Core(site.live_filter()),
        Keyspace::Commands => Store::Requests(site.cmd_filter()),
    }
}

/// Grants reading a stream: stream info, ordered consumers (pulled
/// without acks or flow control) and direct get of a subject's last
/// message.
///
/// On `SENSORS`, the stream with a durable consumer, readers create
/// named consumers with a filter subject only (the subject names the
/// consumer and its filter, and the server checks the body against
/// both), with the durable's name denied: the
/// ephemeral form would take `"name":"engine"` in the body as an update
/// of the engine's consumer. The other streams have no durable.
fn read_stream(p: &mut Permissions, stream: &str, why: &str) {
    p.publish(js::stream_info(stream), why);
    if stream == naming::SENSORS_STREAM {
        p.publish(js::consumer_create_named(stream, "*"), why);
        p.deny(
            js::consumer_create_named(stream, naming::ENGINE_CONSUMER),
            "sensors: the engine's durable consumer is created and changed by the admin only",
        );
    } else {
        p.publish(js::consumer_create_ephemeral(stream), why);
    }
    p.publish(js::consumer_next(stream, "*"), why);
    p.publish(js::direct_get_last(stream), why);
}

/// Grants reading a KV bucket: bucket status, get (direct get of the
/// key's last message), watch/keys (ordered push consumers) and ordered
/// pull consumers (how snapshots read a bucket in bounded batches).
fn read_kv(p: &mut Permissions, bucket: &str, why: &str) {
    let stream = naming::kv_stream(bucket);
    p.publish(js::stream_info(&stream), why);
    p.publish(js::direct_get_last(&stream), why);
    p.publish(js::consumer_create_ephemeral(&stream), why);
    p.publish(js::flow_control(&stream), why);
    p.publish(js::consumer_next(&stream, "*"), why);
}

/// Grants reading an object store: info, metadata and chunks (direct get
/// and ordered consumers).
fn read_object(p: &mut Permissions, bucket: &str, why: &str) {
    let stream = naming::obj_stream(bucket);
    p.publish(js::stream_info(&stream), why);
    p.publish(js::direct_get_last(&stream), why);
    p.publish(js::consumer_create_ephemeral(&stream), why);
    p.publish(js::flow_control(&stream), why);
}

fn write(p: &mut Permissions, k: Keyspace, site: &Site) {
    let why = format!("{k}: write (owner)");
    let why = why.as_str();
    match store(k, site) {
        Store::Stream { filter, .. } => p.publish(filter, why),
        Store::Kv(bucket) => p.publish(naming::kv_filter(bucket), why),
        Store::Object(bucket) => {
            p.publish(naming::obj_filter(bucket), why);
            // Replacing or deleting an object purges its chunks.
            p.publish(js::stream_purge(&naming::obj_stream(bucket)), why);
        }
        Store::Core(filter) => p.publish(filter, why),
        // Replies go to the inbox prefixes of the identities granted
        // `commands` only (see `service_permissions`): nats-server's
        // `allow_responses` would let the answerer publish once to any
        // reply subject, and it can send itself requests.
        Store::Requests(filter) => p.subscribe(filter, "commands: receive requests (owner)"),
    }
}

fn read(p: &mut Permissions, k: Keyspace, site: &Site, owner: bool) {
    let why = if owner {
        format!("{k}: read (owner)")
    } else {
        format!("{k}: read (granted)")
    };
    let why = why.as_str();
    match store(k, site) {
        Store::Stream { name, .. } => read_stream(p, name, why),
        Store::Kv(bucket) => read_kv(p, bucket, why),
        Store::Object(bucket) => read_object(p, bucket, why),
        Store::Core(filter) => p.subscribe(filter, why),
        // Asking is the reader's side of a request/reply keyspace.
        Store::Requests(filter) if !owner => p.publish(filter, why),
        Store::Requests(_) => {}
    }
}

/// The permissions of one service of `access`.
pub fn service_permissions(access: &Access, service: &Service, site: &Site) -> Permissions {
    let mut p = Permissions::default();
    p.subscribe(
        format!("{}.>", naming::inbox_prefix(&service.name)),
        "replies to this service's requests (its own inbox prefix only)",
    );
    for &k in &service.owns {
        write(&mut p, k, site);
    }
    // Shared keyspaces: this service's own subject and key only.
    p.publish(
        site.audit_subject(&service.name),
        "audit: this service's own records",
    );
    p.publish(
        naming::kv_subject(naming::OWNERS_BUCKET, &service.name),
        "owners: this service's own key",
    );
    p.publish(
        js::stream_info(&naming::kv_stream(naming::OWNERS_BUCKET)),
        "owners: bind the bucket to write its own key",
    );
    if service.runs(Component::Engine) || service.runs(Component::Ingest) {
        // The leader lease (store::leader, the engine's and ingest's): a
        // standby reads the key to take it by compare-and-set on its
        // revision. Its own key only.
        p.publish(
            format!(
                "$JS.API.DIRECT.GET.{}.{}",
                naming::kv_stream(naming::OWNERS_BUCKET),
                naming::kv_subject(naming::OWNERS_BUCKET, &service.name)
            ),
            "owners: read its own key (the leader lease of the engine and ingest)",
        );
    }
    for &k in &service.owns {
        read(&mut p, k, site, true);
    }
    if service.owns(Keyspace::Commands) {
        for asker in access
            .services
            .iter()
            .filter(|s| s.reads.contains(&Keyspace::Commands))
        {
            p.publish(
                format!("{}.>", naming::inbox_prefix(&asker.name)),
                "commands: replies, to the inboxes of identities granted commands only",
            );
        }
    }
    for &k in &service.reads {
        read(&mut p, k, site, false);
    }
    if service.reads(Keyspace::Sensors) {
        if service.runs(Component::Engine) {
            // Pull requests are covered by the stream read grant.
            let why = "sensors: the engine's durable consumer (bind, ack)";
            p.publish(
                js::consumer_info(naming::SENSORS_STREAM, naming::ENGINE_CONSUMER),
                why,
            );
            p.publish(
                js::ack(naming::SENSORS_STREAM, naming::ENGINE_CONSUMER),
                why,
            );
        } else {
            // Pulling from the engine's durable consumer would take its
            // messages away.
            p.deny(
                js::consumer_next(naming::SENSORS_STREAM, naming::ENGINE_CONSUMER),
                "sensors: the engine's consumer is the engine's alone",
            );
        }
    }
    if service.runs(Component::Restore) {
        // Restore replaces the engine's buckets: put every key, purge the
        // stream (before, and to roll back). Nothing else.
        // The buckets of archive::restore::RESTORABLE.
        for bucket in [naming::PRESENCE_BUCKET, naming::DEBOUNCE_BUCKET] {
            let why = "restore: replace this bucket (put, purge)";
            p.publish(naming::kv_filter(bucket), why);
            p.publish(js::stream_purge(&naming::kv_stream(bucket)), why);
        }
    }
    if service.runs(Component::Engine) {
        // `[hub]` runs beside the engine: it reads each hub mirror through
        // the leaf link and restarts one after the link comes back. The
        // leaf-side sources it compares with are already readable.
        let why = "hub mirrors: health through the leaf link, restart after the link returns";
        for m in crate::hub::mirrors::mirrors(site) {
            p.publish(js::hub_stream_info(&m.stream()), why);
            p.publish(js::hub_stream_leader_stepdown(&m.stream()), why);
        }
    }
    p
}

/// The admin's permissions: the whole JetStream API (create, inspect,
/// read) but no publish to any keyspace.
pub fn admin_permissions() -> Permissions {
    let mut p = Permissions::default();
    p.publish(
        js::API_ALL.to_owned(),
        "provisioning and inspection: the JetStream API",
    );
    p.publish(js::ACK_ALL.to_owned(), "inspection: acks of its consumers");
    p.publish(
        js::FC_ALL.to_owned(),
        "inspection: flow control of its watches",
    );
    p.subscribe("_INBOX.>".to_owned(), "replies (any inbox prefix)");
    p
}

/// A hub viewer's permissions: the reads of the hub's JetStream API that
/// the fleet page makes (stream names and info, direct
/// and stored-message gets, ephemeral consumers for watches and their
/// pulls and flow control), answers on the `dashboard` inbox prefix only.
/// No stream, consumer or key can be created by name, changed or deleted.
pub fn viewer_permissions() -> Permissions {
    let mut p = Permissions::default();
    let why = "the fleet page: read the hub's mirrors";
    // The dashboard asks through the hub's domain prefix (`$JS.hub.API`);
    // a hub node maps that onto its local API before it checks
    // permissions, so the local form is what is granted.
    for rest in [
        "INFO",
        "STREAM.NAMES",
        "STREAM.LIST",
        "STREAM.INFO.*",
        "STREAM.MSG.GET.*",
        "DIRECT.GET.*",
        "DIRECT.GET.*.>",
        "CONSUMER.CREATE.*",
        "CONSUMER.MSG.NEXT.*.*",
    ] {
        p.publish(format!("$JS.API.{rest}"), why);
    }
    p.publish(
        js::FC_ALL.to_owned(),
        "the fleet page: flow control of its watches",
    );
    p.subscribe(
        format!("{}.>", naming::inbox_prefix(DASHBOARD_INBOX)),
        "answers and watch deliveries of presenced dashboard",
    );
    p
}

/// The inbox prefix `presenced dashboard` connects with
/// (`_INBOX.dashboard`), whoever it runs as: a viewer is granted that one.
pub const DASHBOARD_INBOX: &str = "dashboard";

/// The leaf admin's permissions: [`admin_permissions`], plus the health
/// of the site's own hub mirrors through the leaf link, so that one
/// identity (the operator's `presenced status`) sees the whole site. The
/// hub's ACL limits the link to the site's own mirrors in any case.
fn leaf_admin_permissions(site: &Site) -> Permissions {
    let mut p = admin_permissions();
    let why = "presenced status: health of this site's hub mirrors through the leaf link";
    for m in crate::hub::mirrors::mirrors(site) {
        p.publish(js::hub_stream_info(&m.stream()), why);
        p.publish(js::hub_stream_leader_stepdown(&m.stream()), why);
    }
    p
}

/// Every identity of the site, admin first, then services by name.
pub fn users(access: &Access, site: &Site) -> Vec<User> {
    let mut out = Vec::new();
    if let Some(nkey) = &access.admin {
        out.push(User {
            label: "admin".to_owned(),
            summary: "provisioning and inspection; writes no keyspace".to_owned(),
            nkey: nkey.clone(),
            permissions: leaf_admin_permissions(site),
        });
    }
    for s in &access.services {
        let names = |ks: &[Keyspace]| {
            if ks.is_empty() {
                "-".to_owned()
            } else {
                ks.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
            }
        };
        let runs: Vec<&str> = s.runs.iter().map(|c| c.name()).collect();
        out.push(User {
            label: format!("service {}", s.name),
            summary: format!(
                "runs {}; writes {}; reads {}",
                if runs.is_empty() {
                    "-".to_owned()
                } else {
                    runs.join(", ")
                },
                names(&s.owns),
                names(&s.reads)
            ),
            nkey: s.nkey.clone(),
            permissions: service_permissions(access, s, site),
        });
    }
    out
}

/// The leaf streams the hub mirrors (SENSORS, EVENTS, KV presence and
/// owners): their mirror consumers need flow-control replies.
fn mirrored_streams() -> [String; 4] {
    [
        naming::SENSORS_STREAM.to_owned(),
        naming::EVENTS_STREAM.to_owned(),
        naming::kv_stream(naming::PRESENCE_BUCKET),
        naming::kv_stream(naming::OWNERS_BUCKET),
    ]
}

/// What the hub lets a site's leafnode connection do, on the user the leaf
/// authenticates as (the NKEY from the access file's `leafnode`). On a
/// leafnode connection "publish" is what the leaf may send into the hub
/// and "subscribe" what the hub may send down to the leaf, so: the hub may
/// call this site's JetStream API only (its mirrors of the site), and the
/// leaf may answer, deliver to this site's mirrors (their per-site
/// delivery prefix) and take their flow-control replies; the site may ask
/// the hub about its own mirrors only (`[hub]` health and nudges,
/// `presenced status`) and get the answers on inboxes naming the site.
/// Another site's API, mirrors, keyspaces and replies stay out of reach.
pub fn leafnode_permissions(site: &Site) -> Permissions {
    use crate::naming::leaf;
    let mut p = Permissions::default();
    let why = "hub mirrors of this site: answers and deliveries of its JetStream";
    p.publish(leaf::JS_REPLIES.to_owned(), why);
    p.publish(leaf::mirror_deliveries(site), why);
    p.publish(
        format!("{}.>", leaf::admin_reply_prefix(site)),
        "answers to the hub admin's requests to this site (provision-hub reads the mirror sources)",
    );
    let why = "[hub] and presenced status of this site: health and nudges of its own mirrors";
    for m in crate::hub::mirrors::mirrors(site) {
        p.publish(js::hub_stream_info(&m.stream()), why);
        p.publish(js::hub_stream_leader_stepdown(&m.stream()), why);
    }
    for s in leaf::hub_replies(site) {
        p.subscribe(
            s,
            "answers of the hub to this site's requests (inboxes naming the site)",
        );
    }
    p.subscribe(
        leaf::js_api(site),
        "hub mirrors of this site: requests to this site's JetStream only",
    );
    // The server names the source stream, not the site, in these
    // subjects; the replies carry no data.
    for stream in mirrored_streams() {
        p.subscribe(
            js::flow_control(&stream),
            "hub mirrors of this site: flow-control replies to the mirror consumers",
        );
    }
    p.subscribe(
        leaf::LOOP_DETECTION.to_owned(),
        "leafnode protocol: loop detection",
    );
    p
}

/// The `authorization { users = [...] }` block; the same input gives the
/// same bytes.
pub fn render(access: &Access, site: &Site) -> String {
    render_users(&users(access, site), site, access.leafnode.as_deref())
}

/// A client of the leaf's own MQTT listener. MQTT has no NKEYs, so these
/// authenticate with a user name and password, are limited to MQTT
/// connections, and get allow lists like every other identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttUser {
    pub user: String,
    /// Plain text or a bcrypt hash (`nats-server passwd`); the rendered
    /// file holds its bcrypt hash only.
    pub password: String,
    pub summary: String,
    /// NATS subjects (MQTT topics with `/` as `.`) it may publish to.
    pub publish: Vec<String>,
    /// NATS subjects it may subscribe to.
    pub subscribe: Vec<String>,
}

/// Cost of the bcrypt hashes written for MQTT passwords: what
/// `nats-server passwd` uses. The server checks a password against it at
/// each MQTT CONNECT (tens of milliseconds), not per message.
pub const BCRYPT_COST: u32 = 11;

/// True for a bcrypt hash as nats-server recognises one.
pub fn is_bcrypt(password: &str) -> bool {
    ["$2a$", "$2b$", "$2y$"]
        .iter()
        .any(|p| password.starts_with(p))
}

/// The bcrypt hash nats-server is given for an MQTT password: a config
/// file holding it gives away no password. A hash passes through.
pub fn password_hash(password: &str) -> Result<String, bcrypt::BcryptError> {
    if is_bcrypt(password) {
        return Ok(password.to_owned());
    }
    Ok(bcrypt::hash_with_result(password, BCRYPT_COST)?.format_for_version(bcrypt::Version::TwoA))
}

/// [`render`] plus the MQTT users of the leaf's MQTT listener, their
/// passwords as bcrypt hashes (never in plain text; a fresh salt each
/// time, so unlike [`render`] the bytes differ between runs).
pub fn render_with_mqtt(
    access: &Access,
    site: &Site,
    mqtt: &[MqttUser],
) -> Result<String, bcrypt::BcryptError> {
    let mut auth = authorization(&users(access, site), site, access.leafnode.as_deref());
    for m in mqtt {
        let rules = |subjects: &[String], why: &str| -> Vec<Rule> {
            subjects
                .iter()
                .map(|s| Rule {
                    subject: s.clone(),
                    why: why.to_owned(),
                })
                .collect()
        };
        auth.users.push(auth::User {
            comment: format!("MQTT user {}: {}", m.user, m.summary),
            credential: Credential::Password {
                user: m.user.clone(),
                bcrypt: password_hash(&m.password)?,
            },
            connection_types: vec!["MQTT".to_owned()],
            publish_allow: rules(&m.publish, "MQTT topics it publishes"),
            publish_deny: Vec::new(),
            subscribe_allow: rules(&m.subscribe, "MQTT topics it subscribes to"),
        });
    }
    Ok(auth::render(&auth))
}

/// One user of the hub's block: allow lists only (deny by default);
/// `leafnode_only` admits the key on leafnode connections alone.
fn hub_user(comment: &str, nkey: &str, leafnode_only: bool, p: Permissions) -> auth::User {
    auth::User {
        comment: comment.to_owned(),
        credential: Credential::Nkey(nkey.to_owned()),
        connection_types: if leafnode_only {
            vec!["LEAFNODE".to_owned()]
        } else {
            Vec::new()
        },
        publish_allow: p.publish_allow,
        publish_deny: Vec::new(),
        subscribe_allow: p.subscribe_allow,
    }
}

/// The hub's `authorization` block: the admin (provisions the mirrors,
/// inspects) and each site's leafnode identity, which may connect as a
/// leafnode only. Without it anyone reaching the hub's leafnode port could
/// join as a site.
pub fn render_hub(admin: Option<&str>, leafnodes: &[(Site, String)]) -> String {
    render_hub_with_viewers(admin, &[], leafnodes)
}

/// [`render_hub`] with read-only viewers: identities that may look at
/// every site's mirrors (`presenced dashboard`, `watch --hub`) and change
/// nothing on the hub.
pub fn render_hub_with_viewers(
    admin: Option<&str>,
    viewers: &[String],
    leafnodes: &[(Site, String)],
) -> String {
    let mut auth = Authorization {
        header: vec!["nats-server authorization of the hub, generated by presenced.".to_owned()],
        users: Vec::new(),
    };
    if let Some(admin) = admin {
        let mut p = admin_permissions();
        p.publish(
            js::domain_api_all(naming::HUB_DOMAIN),
            "the hub's JetStream API by its domain prefix (watch --hub)",
        );
        for (site, _) in leafnodes {
            p.publish(
                js::domain_api_all(&site.leaf_domain()),
                "each site's JetStream over its leafnode link (provision-hub reads the mirror sources)",
            );
        }
        auth.users.push(hub_user(
            "admin: provisions the hub mirrors, inspects; writes no keyspace",
            admin,
            false,
            p,
        ));
    }
    for viewer in viewers {
        auth.users.push(hub_user(
            "viewer: reads every site's hub mirrors (presenced dashboard); creates, changes and deletes nothing",
            viewer,
            false,
            viewer_permissions(),
        ));
    }
    for (site, nkey) in leafnodes {
        auth.users.push(hub_user(
            &format!("leafnode of site {site}: hub mirrors of this site only"),
            nkey,
            true,
            leafnode_permissions(site),
        ));
    }
    auth::render(&auth)
}

/// Renders given users (the test that proves each rule necessary renders
/// variants with one rule removed).
pub fn render_users(users: &[User], site: &Site, leafnode: Option<&str>) -> String {
    auth::render(&authorization(users, site, leafnode))
}

/// The site's block as a description, for [`render_users`] and
/// [`render_with_mqtt`] (which adds its MQTT users before rendering).
fn authorization(users: &[User], site: &Site, leafnode: Option<&str>) -> Authorization {
    let mut header = vec![
        format!("nats-server authorization of site {site}, generated by `presenced acl`."),
        "Deny by default: an identity may publish and subscribe only where listed.".to_owned(),
        "Each keyspace has one writer; reads beyond a service's own are granted in the access file.".to_owned(),
        "Services connect with inbox prefix _INBOX.<service>, so none can read another's replies.".to_owned(),
    ];
    if let Some(leaf) = leafnode {
        header.push(format!(
            "Leafnode identity of this site (accepted by the hub's leafnodes.authorization): {leaf}"
        ));
    }
    Authorization {
        header,
        users: users
            .iter()
            .map(|u| auth::User {
                comment: format!("{}: {}", u.label, u.summary),
                credential: Credential::Nkey(u.nkey.clone()),
                connection_types: Vec::new(),
                publish_allow: u.permissions.publish_allow.clone(),
                publish_deny: u.permissions.publish_deny.clone(),
                subscribe_allow: u.permissions.subscribe_allow.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        let k = || nkeys::KeyPair::new_user().public_key();
        let text = format!(
            "admin = {{ nkey = \"{}\" }}\n[services.presenced]\nnkey = \"{}\"\nruns = [\"ingest\", \"engine\"]\n[services.dashboard]\nnkey = \"{}\"\nreads = [\"presence\", \"sensors\", \"commands\"]\n",
            k(),
            k(),
            k()
        );
        Access::parse(&text, "access.toml").unwrap()
    }

    #[test]
    fn a_leafnode_may_serve_only_its_own_site_to_the_hub() {
        let home = Site::new("home").unwrap();
        let p = leafnode_permissions(&home);
        let sub: Vec<&str> = p
            .subscribe_allow
            .iter()
            .map(|r| r.subject.as_str())
            .collect();
        assert!(sub.contains(&"$JS.leaf-home.API.>"), "{sub:?}");
        assert!(!sub.iter().any(|s| *s == ">" || s.contains("leaf-away")));
        let text = render_hub(None, &[(home.clone(), "UKEY".to_owned())]);
        assert_eq!(text, render_hub(None, &[(home, "UKEY".to_owned())]));
        assert!(text.contains("nkey: \"UKEY\""), "{text}");
        assert!(text.contains("\"$JS.M.home.>\""), "{text}");
        assert!(
            !text.contains("\"$JS.M.>\"") && !text.contains("\"_INBOX.>\""),
            "{text}"
        );
        assert!(text.contains("\"_INBOX.*.hub-home.>\""), "{text}");
        assert!(
            text.contains("\"$JS.hub.API.STREAM.INFO.KV_presence-home\""),
            "{text}"
        );
    }

    #[test]
    fn mqtt_users_join_the_list_with_mqtt_only_connections() {
        let a = access();
        let site = Site::new("home").unwrap();
        let m = MqttUser {
            user: "sensors".into(),
            password: "pw".into(),
            summary: "sensors".into(),
            publish: vec!["dev.>".into()],
            subscribe: vec![],
        };
        let out = render_with_mqtt(&a, &site, std::slice::from_ref(&m)).unwrap();
        assert!(out.starts_with(&render(&a, &site)[..200]));
        assert!(out.ends_with("  ]\n}\n"), "{out}");
        assert_eq!(out.matches("authorization {").count(), 1);
        let tail = &out[out.find("MQTT user sensors").unwrap()..];
        assert!(tail.contains("user: \"sensors\"") && !out.contains("\"pw\""));
        let at = tail.find("password: \"").unwrap() + "password: \"".len();
        let hash = &tail[at..at + tail[at..].find('"').unwrap()];
        assert!(hash.starts_with("$2a$11$"), "{hash}");
        assert!(bcrypt::verify("pw", hash).unwrap());
        assert_eq!(password_hash(hash).unwrap(), hash);
        assert!(tail.contains("allowed_connection_types: [\"MQTT\"]"));
        assert!(tail.contains("\"dev.>\""));
        // Nothing to subscribe to: deny all, not an empty (open) list.
        assert!(tail.contains("deny: [\">\"]"), "{tail}");
        assert_eq!(render_with_mqtt(&a, &site, &[]).unwrap(), render(&a, &site));
    }

    #[test]
    fn the_hub_admits_leafnodes_as_leafnodes_only() {
        let leaf = nkeys::KeyPair::new_user().public_key();
        let admin = nkeys::KeyPair::new_user().public_key();
        let site = Site::new("home").unwrap();
        let out = render_hub(Some(&admin), &[(site, leaf.clone())]);
        let at = out.find(&leaf).unwrap();
        assert!(out[at..].contains("allowed_connection_types: [\"LEAFNODE\"]"));
        assert!(out.contains("\"$JS.hub.API.>\"") && out.contains("\"$JS.leaf-home.API.>\""));
        assert!(out.contains(&admin));
    }

    /// Whether NATS pattern `pattern` matches concrete subject `subject`.
    fn covers(pattern: &str, subject: &str) -> bool {
        let mut p = pattern.split('.');
        let mut s = subject.split('.');
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn a_hub_viewer_may_read_and_nothing_else() {
        let viewer = nkeys::KeyPair::new_user().public_key();
        let leaf = nkeys::KeyPair::new_user().public_key();
        let out = render_hub_with_viewers(
            None,
            std::slice::from_ref(&viewer),
            &[(Site::new("home").unwrap(), leaf)],
        );
        assert!(out.contains(&viewer), "{out}");
        let p = viewer_permissions();
        for op in [
            "$JS.API.STREAM.CREATE.X",
            "$JS.API.STREAM.UPDATE.X",
            "$JS.API.STREAM.DELETE.X",
            "$JS.API.STREAM.PURGE.X",
            "$JS.API.STREAM.MSG.DELETE.X",
            "$JS.API.CONSUMER.CREATE.X.durable.>",
            "$JS.API.CONSUMER.DURABLE.CREATE.X.d",
            "$JS.API.CONSUMER.DELETE.X.d",
            "$JS.API.STREAM.LEADER.STEPDOWN.X",
            "$KV.presence.z",
            "_INBOX.admin.x",
        ] {
            assert!(
                !p.publish_allow
                    .iter()
                    .chain(&p.subscribe_allow)
                    .any(|r| covers(&r.subject, op)),
                "viewer may {op}"
            );
        }
        for op in ["$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.X"] {
            assert!(
                p.publish_allow.iter().any(|r| covers(&r.subject, op)),
                "viewer may not {op}"
            );
        }
    }

    #[test]
    fn the_restore_role_may_replace_the_engine_buckets_and_nothing_else() {
        let k = || nkeys::KeyPair::new_user().public_key();
        let text = format!(
            "[services.presenced]\nnkey = \"{}\"\nruns = [\"ingest\", \"engine\"]\n[services.restore]\nnkey = \"{}\"\nruns = [\"restore\"]\n",
            k(),
            k()
        );
        let a = Access::parse(&text, "access.toml").unwrap();
        let r = a.service("restore").unwrap();
        assert!(r.owns.is_empty(), "restore owns no keyspace: {r:?}");
        let site = Site::new("home").unwrap();
        let p = service_permissions(&a, r, &site);
        let allow: Vec<&str> = p.publish_allow.iter().map(|r| r.subject.as_str()).collect();
        for s in [
            "$KV.presence.>",
            "$KV.debounce.>",
            "$JS.API.STREAM.PURGE.KV_presence",
            "$JS.API.STREAM.PURGE.KV_debounce",
            "$JS.API.STREAM.INFO.OBJ_snapshots",
            "$JS.API.CONSUMER.CREATE.KV_presence",
        ] {
            assert!(allow.contains(&s), "{s} missing: {allow:?}");
        }
        assert!(
            !allow.iter().any(|s| s.contains("owners.>")
                || s.starts_with("$O.")
                || s.contains("PURGE.KV_owners")
                || s.starts_with("events.")),
            "{allow:?}"
        );
        assert!(
            !allow.iter().any(|s| s.starts_with("_INBOX.")),
            "restore answers no one: {allow:?}"
        );
    }

    #[test]
    fn rendering_is_deterministic() {
        let a = access();
        let site = Site::new("home").unwrap();
        assert_eq!(render(&a, &site), render(&a, &site));
    }

    #[test]
    fn writes_only_where_owned_and_reads_only_where_granted() {
        let a = access();
        let site = Site::new("home").unwrap();
        let d = service_permissions(&a, a.service("dashboard").unwrap(), &site);
        let allow: Vec<&str> = d.publish_allow.iter().map(|r| r.subject.as_str()).collect();
        assert!(
            !allow.iter().any(|s| s.starts_with("$KV.presence")),
            "{allow:?}"
        );
        assert!(allow.contains(&"$JS.API.DIRECT.GET.KV_presence.>"));
        assert!(
            !allow.iter().any(|s| s.contains("KV_debounce")),
            "{allow:?}"
        );
        assert!(allow.contains(&"$KV.owners.dashboard"));
        assert!(d
            .publish_deny
            .iter()
            .any(|r| r.subject == "$JS.API.CONSUMER.MSG.NEXT.SENSORS.engine"));
        let p = service_permissions(&a, a.service("presenced").unwrap(), &site);
        // No allow_responses: replies to the commands grantees' inboxes.
        assert!(!render(&a, &site).contains("allow_responses"));
        assert!(p
            .publish_allow
            .iter()
            .any(|r| r.subject == "_INBOX.dashboard.>"));
        assert!(p
            .publish_allow
            .iter()
            .any(|r| r.subject == "sensors.home.>"));
        // The engine binds its durable; only the admin creates or changes it.
        let deny: Vec<&str> = p.publish_deny.iter().map(|r| r.subject.as_str()).collect();
        assert_eq!(deny, ["$JS.API.CONSUMER.CREATE.SENSORS.engine.>"]);
        assert!(!allow.contains(&"$JS.API.CONSUMER.CREATE.SENSORS"));
        assert!(allow.contains(&"$JS.API.CONSUMER.CREATE.SENSORS.*.>"));
    }
}
