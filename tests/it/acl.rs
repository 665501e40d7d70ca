//! The generated ACL against a real nats-server: every identity × keyspace
//! × operation succeeds exactly where the ownership map allows it and is
//! refused by the server everywhere else.

use crate::support;

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use presenced::acl::access::{Access, Component, Keyspace};
use presenced::acl::violation::{self, Operation, Violation};
use presenced::naming::{self, Site};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{NatsOptions, NatsServer};
use tokio::sync::Notify;

const SITE: &str = "home";
/// The bytes a push consumer with flow control may have outstanding before
/// the server waits for a flow-control reply: nats-server starts a
/// consumer's window at 1/16 of its 32 MiB limit and sends the request
/// when half of it is out. Whatever it has sent stays delivered, so only a
/// read of more than the window plus one message proves that a reply got
/// through.
const FC_WINDOW: usize = 2 << 20;
/// An object larger than the window plus one chunk (128 KiB).
const OBJ_LARGE: usize = 3 << 20;
/// The size of the big KV values (below the 1 MiB message limit).
const BIG: usize = 700 << 10;
/// Value bytes a watch must see: more than the server sends without a
/// flow-control reply (the window, then one more message).
const WATCH_LARGE: usize = FC_WINDOW + BIG + 1;
/// For an operation to finish or be refused. Generous: every refusal is
/// reported at once, so only an allowed operation on a loaded machine can
/// take long, and cutting it short would misread it as refused.
const OP_DEADLINE: Duration = Duration::from_secs(30);
/// For the server's report of the barrier publish (see `Conn::settle`).
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
/// No identity may publish here: each refusal of it marks a point in the
/// stream of refusals the server reports on a connection.
const BARRIER: &str = "acl-test-barrier";

/// Identities of the matrix: (name, runs, reads). `admin` and `unknown`
/// are special.
const SERVICES: &[(&str, &[&str], &[&str])] = &[
    ("ingest", &["ingest"], &[]),
    ("engine", &["engine"], &[]),
    ("archiver", &["archiver"], &["events", "presence"]),
    (
        "dashboard",
        &[],
        &[
            "sensors", "presence", "events", "audit", "owners", "live", "commands",
        ],
    ),
];

struct Keys {
    seeds: BTreeMap<String, String>,
    access_toml: String,
}

fn keys() -> Keys {
    let mut seeds = BTreeMap::new();
    let mut toml = String::new();
    let mut new = |name: &str| {
        let kp = nkeys::KeyPair::new_user();
        seeds.insert(name.to_owned(), kp.seed().unwrap());
        kp.public_key()
    };
    let admin = new("admin");
    let _ = writeln!(toml, "admin = {{ nkey = \"{admin}\" }}");
    let leaf = new("leafnode");
    let _ = writeln!(toml, "leafnode = {{ nkey = \"{leaf}\" }}");
    for (name, runs, reads) in SERVICES {
        let key = new(name);
        let _ = writeln!(
            toml,
            "[services.{name}]\nnkey = \"{key}\"\nruns = {runs:?}\nreads = {reads:?}"
        );
    }
    new("unknown");
    Keys {
        seeds,
        access_toml: toml,
    }
}

/// A connection that records the violations the server reports.
struct Conn {
    name: String,
    client: async_nats::Client,
    js: jetstream::Context,
    violations: Arc<Mutex<Vec<Violation>>>,
    notify: Arc<Notify>,
    /// The daemon's audit of this connection's violations (services).
    audit: Option<violation::Audit>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The daemon's connection reconnects forever, and the audit task
        // holds a client: stop both, or every connection of every variant
        // of the necessity test would come back after each restart.
        if let Some(a) = self.audit.as_mut() {
            a.stop();
        }
        let client = self.client.clone();
        tokio::spawn(async move {
            let _ = client.drain().await;
        });
    }
}

/// Connects with a callback of the test's own.
async fn connect(server: &NatsServer, name: &str, seed: &str) -> Result<Conn, String> {
    let violations = Arc::new(Mutex::new(Vec::new()));
    let notify = Arc::new(Notify::new());
    let (v, n) = (violations.clone(), notify.clone());
    let mut opts = async_nats::ConnectOptions::new()
        .nkey(seed.to_owned())
        .max_reconnects(Some(1))
        .event_callback(move |event| {
            let (v, n) = (v.clone(), n.clone());
            async move {
                if let Some(found) = violation::from_event(&event) {
                    v.lock().unwrap().push(found);
                    n.notify_waiters();
                }
            }
        });
    if name != "admin" {
        opts = opts.custom_inbox_prefix(naming::inbox_prefix(name));
    }
    let client = opts
        .connect(server.url())
        .await
        .map_err(|e| e.to_string())?;
    Ok(conn(name, client, violations, notify, None))
}

fn conn(
    name: &str,
    client: async_nats::Client,
    violations: Arc<Mutex<Vec<Violation>>>,
    notify: Arc<Notify>,
    audit: Option<violation::Audit>,
) -> Conn {
    let js = jetstream::ContextBuilder::new()
        .timeout(OP_DEADLINE)
        .build(client.clone());
    Conn {
        name: name.to_owned(),
        client,
        js,
        violations,
        notify,
        audit,
    }
}

/// Connects a service as the daemon does (`store::connect_as`: its inbox
/// prefix, the violation callback, the audit task), with a tap between
/// the callback and the audit that records what the server reported.
async fn connect_service(
    server: &NatsServer,
    dir: &std::path::Path,
    name: &str,
    seed: &str,
) -> Conn {
    let seed_file = dir.join(format!("{name}.seed"));
    if !seed_file.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&seed_file)
            .unwrap();
        std::io::Write::write_all(&mut f, seed.as_bytes()).unwrap();
    }
    let cfg = presenced::config::NatsConfig {
        url: server.url(),
        request_timeout: OP_DEADLINE,
        nkey_seed_file: Some(seed_file),
        ..Default::default()
    };
    let (tap_tx, mut tap_rx) = violation::channel();
    let (audit_tx, audit_rx) = violation::channel();
    let who = presenced::store::connect::As {
        service: Some(name.to_owned()),
        violations: Some(tap_tx),
    };
    let metrics = Arc::new(presenced::metrics::Metrics::default());
    let client = presenced::store::connect_as(
        &cfg,
        &format!("acl-test-{name}"),
        Some(metrics),
        Some(OP_DEADLINE),
        &who,
    )
    .await
    .unwrap_or_else(|e| panic!("{name} cannot connect: {e}"));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let notify = Arc::new(Notify::new());
    let (v, n) = (violations.clone(), notify.clone());
    tokio::spawn(async move {
        while let Some(found) = tap_rx.recv().await {
            v.lock().unwrap().push(found.clone());
            n.notify_waiters();
            let _ = audit_tx.send(found);
        }
    });
    let audit = violation::spawn_audit(
        client.clone(),
        Site::new(SITE).unwrap(),
        name.to_owned(),
        audit_rx,
        None,
    );
    conn(name, client, violations, notify, Some(audit))
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Refused(String),
    Failed(String),
}

fn is_barrier(v: &Violation) -> bool {
    v.subject.starts_with(BARRIER)
}

impl Conn {
    fn count(&self) -> usize {
        self.violations.lock().unwrap().len()
    }

    /// The first refusal of the operation after the first `n` reports.
    fn refusal_since(&self, n: usize) -> Option<Violation> {
        let all = self.violations.lock().unwrap();
        all.iter().skip(n).find(|v| !is_barrier(v)).cloned()
    }

    async fn refusal_after(&self, n: usize) -> Violation {
        loop {
            let notified = self.notify.notified();
            if let Some(v) = self.refusal_since(n) {
                return v;
            }
            notified.await;
        }
    }

    /// Waits until the event callback has seen every refusal of what this
    /// connection published so far. The server answers a connection's
    /// messages in order and async-nats hands the reports to the callback
    /// in order, but on its own task: a flush returns when the server has
    /// answered, not when the callback has run. So publish something the
    /// server must refuse and wait for that report; every earlier one is
    /// in by then.
    async fn settle(&self) {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let subject = format!("{BARRIER}.{n}");
        let seen = || {
            self.violations
                .lock()
                .unwrap()
                .iter()
                .any(|v| v.subject == subject)
        };
        self.client
            .publish(subject.clone(), "".into())
            .await
            .unwrap();
        self.client.flush().await.unwrap();
        tokio::time::timeout(SETTLE_DEADLINE, async {
            loop {
                let notified = self.notify.notified();
                if seen() {
                    return;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{}: the server did not report the refused publish to {subject} within {SETTLE_DEADLINE:?}",
                self.name
            )
        });
    }

    /// Runs one operation: refused when the server refuses any of its
    /// messages (reported while it runs, or before the barrier after it),
    /// ok when it completes and nothing of it was refused.
    ///
    /// Steps the server refuses silently (an ack, a flow-control reply)
    /// must have a visible effect on the operation for this to hold: the
    /// operations wait for the ack to be confirmed and read past the
    /// flow-control window.
    async fn attempt<F>(&self, op: F) -> Outcome
    where
        F: std::future::Future<Output = Result<(), async_nats::Error>>,
    {
        let before = self.count();
        let result = tokio::select! {
            r = tokio::time::timeout(OP_DEADLINE, op) => match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timed out".to_owned()),
            },
            v = self.refusal_after(before) => {
                // Later reports of this operation stay with it.
                self.settle().await;
                return Outcome::Refused(v.subject);
            }
        };
        self.settle().await;
        if let Some(v) = self.refusal_since(before) {
            return Outcome::Refused(v.subject);
        }
        match result {
            None => Outcome::Ok,
            Some(e) => Outcome::Failed(e),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Put,
    Create,
    Update,
    Delete,
    Purge,
    Get,
    DirectGet,
    Watch,
    /// A watch of more data than a push consumer sends without a
    /// flow-control reply.
    WatchLarge,
    Keys,
    /// Reading a bucket through an ordered pull consumer (snapshots).
    KvPull,
    PutForeign,
    Publish,
    PublishForeign,
    Read,
    DurableFetch,
    /// Creating the engine's durable again (same config) through the
    /// named subject, with the filter after the name.
    DurableRewrite,
    /// The same without the filter in the subject.
    DurableRewriteUnfiltered,
    /// The ephemeral subject with the durable's name in the body (the
    /// server takes it as an update of the durable).
    RenameAttack,
    /// A raw pull request on the engine's durable consumer.
    RawPull,
    ObjPut,
    ObjGet,
    ObjGetLarge,
    ObjList,
    /// Put, then delete, an object of its own.
    ObjDelete,
    Subscribe,
    Request,
    Serve,
    StreamCreate,
    StreamDelete,
    /// Stream info of a hub mirror through the leaf link.
    MirrorInfo,
    /// Leader step-down of a hub mirror through the leaf link.
    MirrorNudge,
}

fn rows() -> Vec<(&'static str, Op)> {
    use Op::*;
    let mut rows = Vec::new();
    for k in ["presence", "debounce", "archive"] {
        for op in [
            Put, Create, Update, Delete, Purge, Get, DirectGet, Watch, WatchLarge, Keys, KvPull,
        ] {
            rows.push((k, op));
        }
    }
    for op in [
        Put, PutForeign, Get, DirectGet, Watch, WatchLarge, Keys, KvPull,
    ] {
        rows.push(("owners", op));
    }
    for k in ["sensors", "rejected", "events"] {
        for op in [Publish, DirectGet, Read] {
            rows.push((k, op));
        }
    }
    rows.push(("sensors", DurableFetch));
    rows.push(("sensors", DurableRewrite));
    rows.push(("sensors", DurableRewriteUnfiltered));
    rows.push(("sensors", RenameAttack));
    rows.push(("sensors", RawPull));
    for op in [Publish, PublishForeign, DirectGet, Read] {
        rows.push(("audit", op));
    }
    for op in [ObjPut, ObjGet, ObjGetLarge, ObjList, ObjDelete] {
        rows.push(("snapshots", op));
    }
    rows.push(("live", Publish));
    rows.push(("live", Subscribe));
    rows.push(("commands", Request));
    rows.push(("commands", Serve));
    rows.push(("jetstream", StreamCreate));
    rows.push(("jetstream", StreamDelete));
    for k in MIRRORS {
        rows.push((k, MirrorInfo));
        rows.push((k, MirrorNudge));
    }
    rows
}

/// Rows of the hub mirrors, by the leaf source they copy.
const MIRRORS: [&str; 4] = [
    "mirror-SENSORS",
    "mirror-EVENTS",
    "mirror-presence",
    "mirror-owners",
];

/// The hub stream of a `mirror-<source>` row.
fn mirror_stream(site: &Site, keyspace: &str) -> String {
    let source = keyspace.trim_start_matches("mirror-");
    presenced::hub::mirrors::mirrors(site)
        .into_iter()
        .find(|m| m.source == source)
        .unwrap_or_else(|| panic!("no mirror of {source}"))
        .stream()
}

/// What the ownership map allows.
fn expected(access: &Access, who: &str, keyspace: &str, op: Op) -> bool {
    use Op::*;
    if who == "unknown" {
        return false;
    }
    let admin = who == "admin";
    if keyspace == "jetstream" {
        return admin;
    }
    if keyspace.starts_with("mirror-") {
        // Only through the hub's domain prefix: the engine's `[hub]` and
        // the admin's `presenced status`, each granted its site's mirrors.
        return admin
            || access
                .service(who)
                .is_some_and(|s| s.runs(Component::Engine));
    }
    let k = Keyspace::parse(keyspace).unwrap();
    let svc = access.service(who);
    let owns = svc.is_some_and(|s| s.owns(k));
    let reads = admin || svc.is_some_and(|s| s.reads(k));
    match (k, op) {
        (Keyspace::Owners, Put) | (Keyspace::Audit, Publish) => svc.is_some(),
        (_, PutForeign | PublishForeign) => false,
        (_, Put | Create | Update | Delete | Purge | Publish | ObjPut | ObjDelete) => owns,
        (Keyspace::Sensors, DurableRewrite | DurableRewriteUnfiltered | RenameAttack) => admin,
        (Keyspace::Sensors, DurableFetch | RawPull) => {
            admin || svc.is_some_and(|s| s.runs(Component::Engine))
        }
        (Keyspace::Live, Subscribe) => svc.is_some_and(|s| s.reads(k)),
        (Keyspace::Commands, Request) => svc.is_some_and(|s| s.reads(k) && !s.owns(k)),
        (Keyspace::Commands, Serve) => owns,
        // A service reads its own key (the one a read targets): the
        // engine's and ingest's leader lease (store::leader) is a
        // compare-and-set on its revision.
        (Keyspace::Owners, Get | DirectGet) => {
            reads || svc.is_some_and(|s| s.runs(Component::Engine) || s.runs(Component::Ingest))
        }
        (
            _,
            Get | DirectGet | Watch | WatchLarge | Keys | KvPull | Read | ObjGet | ObjGetLarge
            | ObjList,
        ) => reads,
        _ => unreachable!("no row {keyspace}/{op:?}"),
    }
}

fn stream_of(keyspace: &str) -> &'static str {
    match keyspace {
        "sensors" => naming::SENSORS_STREAM,
        "rejected" => naming::REJECTED_STREAM,
        "events" => naming::EVENTS_STREAM,
        "audit" => naming::AUDIT_STREAM,
        other => panic!("{other} is not a stream"),
    }
}

fn bucket_of(keyspace: &str) -> &'static str {
    match keyspace {
        "presence" => naming::PRESENCE_BUCKET,
        "debounce" => naming::DEBOUNCE_BUCKET,
        "owners" => naming::OWNERS_BUCKET,
        "snapshots" => naming::SNAPSHOTS_OBJECT,
        "archive" => naming::ARCHIVE_BUCKET,
        other => panic!("{other} is not a bucket"),
    }
}

/// A subject of `keyspace` with a stored message (for reads) or for a
/// write by `who`.
fn subject_of(site: &Site, keyspace: &str, who: &str) -> String {
    match keyspace {
        "sensors" => site.sensors_subject(&format!("s-{who}")),
        "rejected" => site.rejected_subject(&format!("s-{who}")),
        "events" => site.events_subject(&format!("z-{who}")),
        "audit" => site.audit_subject(who),
        "live" => site.live_subject("pir"),
        "commands" => site.cmd_subject("hall"),
        other => panic!("{other} has no subject"),
    }
}

/// The key reads target: in `owners`, a service's own key (each writes
/// only its own, and the leader lease reads it back); the engine's for
/// the admin and strangers.
fn read_key(keyspace: &str, who: &str) -> String {
    if keyspace != "owners" {
        "seed".to_owned()
    } else if who == "admin" || who == "unknown" {
        "engine".to_owned()
    } else {
        who.to_owned()
    }
}

fn big_value() -> bytes::Bytes {
    vec![b'x'; BIG].into()
}

type OpResult = Result<(), async_nats::Error>;

/// Core NATS has no acks: a publish or subscription counts as allowed when
/// the message arrives, refused when the server reports the violation.
struct Probe {
    /// Subscribed to every live subject by the owner (ingest).
    live_sink: tokio::sync::Mutex<async_nats::Subscriber>,
    ingest: async_nats::Client,
    dashboard: async_nats::Client,
}

async fn wait_for(sub: &mut async_nats::Subscriber, payload: &str) -> OpResult {
    while let Some(m) = sub.next().await {
        if m.payload.as_ref() == payload.as_bytes() {
            return Ok(());
        }
    }
    Err("subscription ended".into())
}

/// The engine answers every command (its grant: publish to the inboxes of
/// the identities granted `commands`).
async fn answer_commands(engine: async_nats::Client, site: Site) {
    let mut sub = engine.subscribe(site.cmd_filter()).await.unwrap();
    engine.flush().await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(());
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = engine.publish(reply, "answered".into()).await;
            }
        }
    });
    let _ = rx.await;
}

async fn kv_write(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
    expected: Option<u64>,
    operation: Option<&str>,
) -> Result<u64, async_nats::Error> {
    let mut msg = jetstream::message::PublishMessage::build().payload("v".into());
    if let Some(e) = expected {
        msg = msg.expected_last_subject_sequence(e);
    }
    if let Some(op) = operation {
        msg = msg.header("KV-Operation", op);
        if op == "PURGE" {
            msg = msg.header("Nats-Rollup", "sub");
        }
    }
    let ack = js
        .send_publish(naming::kv_subject(bucket, key), msg)
        .await?
        .await?;
    Ok(ack.sequence)
}

async fn first<S, T, E>(mut s: S) -> OpResult
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
    E: Into<async_nats::Error>,
{
    match s.next().await {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(e.into()),
        None => Err("stream ended without an item".into()),
    }
}

async fn direct_get(c: &Conn, stream: &str, subject: &str) -> OpResult {
    let reply = c
        .client
        .request(format!("$JS.API.DIRECT.GET.{stream}.{subject}"), "".into())
        .await?;
    match reply.status {
        Some(s) if s.as_u16() >= 300 => Err(format!("direct get status {s}").into()),
        _ => Ok(()),
    }
}

/// Runs one cell of the matrix.
async fn run(
    c: &Conn,
    site: &Site,
    revisions: &Mutex<BTreeMap<String, u64>>,
    probe: &Probe,
    keyspace: &str,
    op: Op,
) -> Outcome {
    let who = c.name.as_str();
    let js = &c.js;
    match op {
        Op::Put if keyspace == "owners" => {
            // As a client does it: bind the bucket, put its own key.
            c.attempt(async {
                let store = js.get_key_value(naming::OWNERS_BUCKET).await?;
                // Large, so that a watch of the bucket needs flow control.
                store.put(who, big_value()).await?;
                Ok(())
            })
            .await
        }
        Op::Put => {
            let key = format!("put-{who}");
            c.attempt(async {
                kv_write(js, bucket_of(keyspace), &key, None, None).await?;
                Ok(())
            })
            .await
        }
        Op::PutForeign => {
            c.attempt(async {
                kv_write(js, bucket_of(keyspace), "someone-else", None, None).await?;
                Ok(())
            })
            .await
        }
        Op::Create => {
            // A new key every time: the necessity test repeats the matrix.
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            c.attempt(async {
                kv_write(
                    js,
                    bucket_of(keyspace),
                    &format!("new-{who}-{n}"),
                    Some(0),
                    None,
                )
                .await?;
                Ok(())
            })
            .await
        }
        Op::Update => {
            let key = format!("upd-{who}");
            let at = format!("{}/{key}", bucket_of(keyspace));
            let rev = revisions.lock().unwrap()[&at];
            c.attempt(async {
                let new = kv_write(js, bucket_of(keyspace), &key, Some(rev), None).await?;
                revisions.lock().unwrap().insert(at.clone(), new);
                Ok(())
            })
            .await
        }
        Op::Delete => {
            c.attempt(async {
                kv_write(
                    js,
                    bucket_of(keyspace),
                    &format!("del-{who}"),
                    None,
                    Some("DEL"),
                )
                .await?;
                Ok(())
            })
            .await
        }
        Op::Purge => {
            c.attempt(async {
                kv_write(
                    js,
                    bucket_of(keyspace),
                    &format!("pur-{who}"),
                    None,
                    Some("PURGE"),
                )
                .await?;
                Ok(())
            })
            .await
        }
        Op::Get => {
            c.attempt(async {
                let store = js.get_key_value(bucket_of(keyspace)).await?;
                store
                    .get(read_key(keyspace, who))
                    .await?
                    .ok_or("key seed not found")?;
                Ok(())
            })
            .await
        }
        Op::DirectGet => {
            let (stream, subject) = match keyspace {
                "presence" | "debounce" | "owners" | "archive" => (
                    naming::kv_stream(bucket_of(keyspace)),
                    naming::kv_subject(bucket_of(keyspace), &read_key(keyspace, who)),
                ),
                "audit" => (
                    naming::AUDIT_STREAM.to_owned(),
                    site.audit_subject("engine"),
                ),
                k => (stream_of(k).to_owned(), subject_of(site, k, "seed")),
            };
            c.attempt(direct_get(c, &stream, &subject)).await
        }
        Op::Watch => {
            c.attempt(async {
                let store = js.get_key_value(bucket_of(keyspace)).await?;
                first(store.watch_with_history(">").await?).await
            })
            .await
        }
        Op::WatchLarge => {
            c.attempt(async {
                let store = js.get_key_value(bucket_of(keyspace)).await?;
                let mut watch = store.watch_with_history(">").await?;
                let mut bytes = 0;
                while bytes < WATCH_LARGE {
                    match watch.next().await {
                        Some(e) => bytes += e?.value.len(),
                        None => return Err("watch ended".into()),
                    }
                }
                Ok(())
            })
            .await
        }
        Op::Keys => {
            c.attempt(async {
                let store = js.get_key_value(bucket_of(keyspace)).await?;
                first(store.keys().await?).await
            })
            .await
        }
        Op::KvPull => {
            let stream_name = naming::kv_stream(bucket_of(keyspace));
            c.attempt(async {
                let s = js.get_stream(stream_name).await?;
                let consumer = s
                    .create_consumer(jetstream::consumer::pull::OrderedConfig {
                        deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                        filter_subject: naming::kv_filter(bucket_of(keyspace)),
                        ..Default::default()
                    })
                    .await?;
                first(consumer.messages().await?).await
            })
            .await
        }
        Op::Publish if keyspace == "live" => {
            let payload = format!("live-from-{who}");
            c.attempt(async {
                c.client
                    .publish(site.live_subject("pir"), payload.clone().into())
                    .await?;
                wait_for(&mut *probe.live_sink.lock().await, &payload).await
            })
            .await
        }
        Op::Publish | Op::PublishForeign => {
            let subject = if op == Op::PublishForeign {
                site.audit_subject("someone-else")
            } else {
                subject_of(site, keyspace, who)
            };
            c.attempt(async {
                js.publish(subject, "{}".into()).await?.await?;
                Ok(())
            })
            .await
        }
        Op::Read => {
            let stream_name = stream_of(keyspace);
            c.attempt(async {
                let s = js.get_stream(stream_name).await?;
                // SENSORS readers may create named consumers with a
                // filter only.
                let sensors = stream_name == naming::SENSORS_STREAM;
                let consumer = s
                    .create_consumer(jetstream::consumer::pull::OrderedConfig {
                        name: sensors
                            .then(|| presenced::store::consumer_name(c.client.clone(), who)),
                        filter_subject: if sensors {
                            site.sensors_filter()
                        } else {
                            String::new()
                        },
                        ..Default::default()
                    })
                    .await?;
                first(consumer.messages().await?).await
            })
            .await
        }
        Op::DurableRewrite | Op::DurableRewriteUnfiltered | Op::RenameAttack => {
            // The engine's own config, so that where it is allowed (the
            // admin) the durable does not change: an update to the same
            // config is a no-op the server confirms.
            use jetstream::consumer::IntoConsumerConfig as _;
            let config = presenced::engine::runner::consumer_config(site).into_consumer_config();
            let mut body_config = serde_json::to_value(&config).unwrap();
            body_config["name"] = serde_json::json!(naming::ENGINE_CONSUMER);
            if op == Op::RenameAttack {
                // The server refuses `durable_name` here; `name` it takes.
                if let Some(o) = body_config.as_object_mut() {
                    o.remove("durable_name");
                }
            }
            let subject = match op {
                Op::DurableRewrite => format!(
                    "$JS.API.CONSUMER.CREATE.SENSORS.engine.{}",
                    site.sensors_filter()
                ),
                Op::DurableRewriteUnfiltered => "$JS.API.CONSUMER.CREATE.SENSORS.engine".to_owned(),
                // No name in the subject, the durable's in the body.
                _ => "$JS.API.CONSUMER.CREATE.SENSORS".to_owned(),
            };
            let body = serde_json::json!({"stream_name": "SENSORS", "config": body_config});
            c.attempt(async {
                let reply = c
                    .client
                    .request(subject, serde_json::to_vec(&body)?.into())
                    .await?;
                let v: serde_json::Value = serde_json::from_slice(&reply.payload)?;
                if v.get("error").is_some() {
                    return Err(format!("server error: {v}").into());
                }
                Ok(())
            })
            .await
        }
        Op::DurableFetch => {
            // Something to fetch and ack, whatever earlier fetches took.
            let ingest = jetstream::new(probe.ingest.clone());
            if let Ok(ack) = ingest
                .publish(site.sensors_subject("fetch"), "{}".into())
                .await
            {
                let _ = ack.await;
            }
            c.attempt(async {
                let s = js.get_stream(naming::SENSORS_STREAM).await?;
                let consumer = s
                    .get_consumer::<jetstream::consumer::pull::Config>(naming::ENGINE_CONSUMER)
                    .await?;
                let mut batch = consumer
                    .fetch()
                    .max_messages(1)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await?;
                // An ack is fire-and-forget; the server refuses one
                // without effect on the fetch. Asking the server to
                // confirm it (same subject, same grant) makes an allowed
                // ack visible.
                match batch.next().await {
                    Some(m) => m?.double_ack().await?,
                    None => return Err("nothing fetched".into()),
                }
                Ok(())
            })
            .await
        }
        Op::RawPull => {
            let subject =
                naming::js::consumer_next(naming::SENSORS_STREAM, naming::ENGINE_CONSUMER);
            c.attempt(async {
                let inbox = c.client.new_inbox();
                let mut sub = c.client.subscribe(inbox.clone()).await?;
                c.client
                    .publish_with_reply(subject, inbox, r#"{"batch":1,"expires":500000000}"#.into())
                    .await?;
                // A message, or a status reply when none is pending.
                sub.next().await.ok_or("no reply to the pull request")?;
                Ok(())
            })
            .await
        }
        Op::ObjPut => {
            c.attempt(async {
                let store = js.get_object_store(bucket_of(keyspace)).await?;
                let mut data: &[u8] = b"snapshot";
                store.put(format!("obj-{who}").as_str(), &mut data).await?;
                Ok(())
            })
            .await
        }
        Op::ObjGet => {
            c.attempt(async {
                use tokio::io::AsyncReadExt;
                let store = js.get_object_store(bucket_of(keyspace)).await?;
                let mut obj = store.get("seed").await?;
                let mut buf = Vec::new();
                obj.read_to_end(&mut buf).await?;
                if buf != b"seed" {
                    return Err("object content differs".into());
                }
                Ok(())
            })
            .await
        }
        Op::ObjGetLarge => {
            c.attempt(async {
                use tokio::io::AsyncReadExt;
                let store = js.get_object_store(bucket_of(keyspace)).await?;
                let mut obj = store.get("big").await?;
                let mut buf = Vec::new();
                obj.read_to_end(&mut buf).await?;
                if buf.len() != OBJ_LARGE {
                    return Err("object size differs".into());
                }
                Ok(())
            })
            .await
        }
        Op::ObjList => {
            c.attempt(async {
                let store = js.get_object_store(bucket_of(keyspace)).await?;
                first(store.list().await?).await
            })
            .await
        }
        Op::ObjDelete => {
            c.attempt(async {
                let store = js.get_object_store(bucket_of(keyspace)).await?;
                let name = format!("del-{who}");
                let mut data: &[u8] = b"doomed";
                store.put(name.as_str(), &mut data).await?;
                store.delete(name.as_str()).await?;
                Ok(())
            })
            .await
        }
        Op::Serve if keyspace == "commands" => {
            // Receive a request and answer it: the answer goes to the
            // asker's inbox, which is all the owner may publish besides
            // its keyspaces.
            let subject = site.cmd_subject(&format!("serve-{who}"));
            let payload = format!("commands-to-{who}");
            let asker = &probe.dashboard;
            c.attempt(async {
                let mut sub = c.client.subscribe(site.cmd_filter()).await?;
                c.client.flush().await?;
                let inbox = asker.new_inbox();
                let mut answers = asker.subscribe(inbox.clone()).await?;
                asker.flush().await?;
                // Republished until it arrives: core NATS may drop one.
                let reply = loop {
                    asker
                        .publish_with_reply(subject.clone(), inbox.clone(), payload.clone().into())
                        .await?;
                    asker.flush().await?;
                    let wait = async {
                        while let Some(m) = sub.next().await {
                            if m.payload.as_ref() == payload.as_bytes() {
                                return m.reply;
                            }
                        }
                        None
                    };
                    if let Ok(r) = tokio::time::timeout(Duration::from_millis(250), wait).await {
                        break r.ok_or("request without a reply subject")?;
                    }
                };
                c.client.publish(reply, "served".into()).await?;
                c.client.flush().await?;
                while let Some(m) = answers.next().await {
                    if m.payload.as_ref() == b"served" {
                        return Ok(());
                    }
                }
                Err("answers ended".into())
            })
            .await
        }
        Op::Subscribe | Op::Serve => {
            let (filter, subject, sender) = if keyspace == "live" {
                (site.live_filter(), site.live_subject("pir"), &probe.ingest)
            } else {
                (
                    site.cmd_filter(),
                    site.cmd_subject(&format!("serve-{who}")),
                    &probe.dashboard,
                )
            };
            let payload = format!("{keyspace}-to-{who}");
            c.attempt(async {
                let mut sub = c.client.subscribe(filter).await?;
                c.client.flush().await?;
                // Republished until it arrives: core NATS may drop one.
                loop {
                    sender
                        .publish(subject.clone(), payload.clone().into())
                        .await?;
                    sender.flush().await?;
                    let wait = wait_for(&mut sub, &payload);
                    if let Ok(r) = tokio::time::timeout(Duration::from_millis(250), wait).await {
                        return r;
                    }
                }
            })
            .await
        }
        Op::Request => {
            c.attempt(async {
                let reply = c
                    .client
                    .request(site.cmd_subject("hall"), "{}".into())
                    .await?;
                if reply.payload.as_ref() != b"answered" {
                    return Err("unexpected answer".into());
                }
                Ok(())
            })
            .await
        }
        Op::StreamCreate => {
            c.attempt(async {
                js.create_stream(stream::Config {
                    name: format!("SCRATCH-{who}"),
                    subjects: vec![format!("scratch.{who}")],
                    ..Default::default()
                })
                .await?;
                Ok(())
            })
            .await
        }
        Op::StreamDelete => {
            c.attempt(async {
                js.delete_stream(format!("DOOMED-{who}")).await?;
                Ok(())
            })
            .await
        }
        Op::MirrorInfo | Op::MirrorNudge => {
            // This leaf has no hub: an allowed request finds no responder
            // at once, a refused one is a violation. What is tested is
            // whether the leaf lets it through.
            let stream = mirror_stream(site, keyspace);
            let subject = if op == Op::MirrorInfo {
                naming::js::hub_stream_info(&stream)
            } else {
                naming::js::hub_stream_leader_stepdown(&stream)
            };
            c.attempt(async {
                match c.client.request(subject, "{}".into()).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
                    Err(e) => Err(e.into()),
                }
            })
            .await
        }
    }
}

fn render_with_cli(access_path: &std::path::Path) -> String {
    let out = support::daemon::run_presenced(
        &[
            "acl",
            "--access",
            access_path.to_str().unwrap(),
            "--site",
            SITE,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "presenced acl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct World {
    server: NatsServer,
    access: Access,
    keys: Keys,
    conf: String,
    dir: tempfile::TempDir,
}

fn world() -> World {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.toml");
    std::fs::write(&path, &keys.access_toml).unwrap();
    let conf = render_with_cli(&path);
    assert_eq!(
        conf,
        render_with_cli(&path),
        "the generated file is not deterministic"
    );
    let access = Access::load(&path).unwrap();
    let server = NatsServer::start(NatsOptions {
        domain: Some(Site::new(SITE).unwrap().leaf_domain()),
        extra: conf.clone(),
        ..Default::default()
    });
    World {
        server,
        access,
        keys,
        conf,
        dir,
    }
}

/// Streams, buckets, object stores and the engine consumer, as admin.
async fn provision(admin: &Conn, site: &Site) {
    presenced::store::provision::provision(&admin.client, site)
        .await
        .unwrap();
    // `provision` creates KV owners (leases with per-message TTLs).
    let js = &admin.js;
    js.get_stream(naming::SENSORS_STREAM)
        .await
        .unwrap()
        .create_consumer(presenced::engine::runner::consumer_config(site))
        .await
        .unwrap();
    for who in [
        "ingest",
        "engine",
        "archiver",
        "dashboard",
        "admin",
        "unknown",
    ] {
        js.create_stream(stream::Config {
            name: format!("DOOMED-{who}"),
            subjects: vec![format!("doomed.{who}")],
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// What each keyspace holds before the matrix runs, written by its owner.
async fn seed(conns: &BTreeMap<String, Conn>, site: &Site) -> Mutex<BTreeMap<String, u64>> {
    let mut revisions = BTreeMap::new();
    let engine = &conns["engine"];
    let ingest = &conns["ingest"];
    let archiver = &conns["archiver"];
    let pub_js = |c: &Conn, subject: String| {
        let js = c.js.clone();
        async move {
            js.publish(subject, "{}".into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    for (bucket, owner) in [
        (naming::PRESENCE_BUCKET, engine),
        (naming::DEBOUNCE_BUCKET, engine),
        (naming::ARCHIVE_BUCKET, archiver),
    ] {
        let store = owner.js.get_key_value(bucket).await.unwrap();
        store.put("seed", "{}".into()).await.unwrap();
        for i in 0..5 {
            store.put(format!("big-{i}"), big_value()).await.unwrap();
        }
        for who in conns.keys().map(String::as_str).chain(["unknown"]) {
            for prefix in ["upd", "del", "pur"] {
                let rev = store
                    .put(format!("{prefix}-{who}"), "{}".into())
                    .await
                    .unwrap();
                revisions.insert(format!("{bucket}/{prefix}-{who}"), rev);
            }
        }
    }
    for (name, c) in conns {
        if name != "admin" {
            let store = c.js.get_key_value(naming::OWNERS_BUCKET).await;
            // Binding the bucket is part of every service's grant.
            let store = store.unwrap_or_else(|e| panic!("{name} cannot bind owners: {e}"));
            store.put(name.as_str(), big_value()).await.unwrap();
        }
    }
    for _ in 0..40 {
        pub_js(ingest, subject_of(site, "sensors", "seed")).await;
    }
    pub_js(ingest, subject_of(site, "rejected", "seed")).await;
    pub_js(engine, subject_of(site, "events", "seed")).await;
    pub_js(engine, site.audit_subject("engine")).await;
    {
        let store = archiver
            .js
            .get_object_store(naming::SNAPSHOTS_OBJECT)
            .await
            .unwrap();
        let mut data: &[u8] = b"seed";
        store.put("seed", &mut data).await.unwrap();
        let big = vec![b'o'; OBJ_LARGE];
        store.put("big", &mut big.as_slice()).await.unwrap();
    }
    Mutex::new(revisions)
}

fn print_matrix(
    who: &[&str],
    cells: &BTreeMap<(String, Op, String), (bool, Outcome)>,
) -> (String, usize) {
    let mut out = String::new();
    let mut wrong = 0;
    let _ = write!(out, "{:<26}", "keyspace/op");
    for w in who {
        let _ = write!(out, "{w:>11}");
    }
    out.push('\n');
    let mut details = String::new();
    for (k, op) in rows() {
        let _ = write!(out, "{:<26}", format!("{k}/{op:?}"));
        for w in who {
            let (exp, got) = &cells[&(k.to_owned(), op, (*w).to_owned())];
            let ok = matches!(got, Outcome::Ok);
            let good = *exp == ok && !matches!(got, Outcome::Failed(_));
            let mark = match got {
                Outcome::Ok => "ok",
                Outcome::Refused(_) => "--",
                Outcome::Failed(_) => "ERR",
            };
            let _ = write!(
                out,
                "{:>11}",
                if good {
                    mark.to_owned()
                } else {
                    format!("!{mark}")
                }
            );
            if !good {
                wrong += 1;
                let _ = writeln!(
                    details,
                    "{k}/{op:?} as {w}: expected {}, got {got:?}",
                    if *exp { "ok" } else { "refused" }
                );
            }
        }
        out.push('\n');
    }
    (out + "\n" + &details, wrong)
}

/// How services connect: as the daemon does (with its audit), or plainly
/// (the necessity test, which reconnects for every variant and has no use
/// for the audit).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Daemon,
    Plain,
}

async fn connect_all(w: &World, via: Via) -> BTreeMap<String, Conn> {
    let mut conns = BTreeMap::new();
    for name in ["admin", "ingest", "engine", "archiver", "dashboard"] {
        let seed = &w.keys.seeds[name];
        let c = if name != "admin" && via == Via::Daemon {
            connect_service(&w.server, w.dir.path(), name, seed).await
        } else {
            connect(&w.server, name, seed)
                .await
                .unwrap_or_else(|e| panic!("{name} cannot connect: {e}\n{}", w.conf))
        };
        conns.insert(name.to_owned(), c);
    }
    conns
}

async fn probe(conns: &BTreeMap<String, Conn>, site: &Site) -> Probe {
    answer_commands(conns["engine"].client.clone(), site.clone()).await;
    let ingest = conns["ingest"].client.clone();
    let live_sink = ingest.subscribe(site.live_filter()).await.unwrap();
    ingest.flush().await.unwrap();
    Probe {
        live_sink: tokio::sync::Mutex::new(live_sink),
        ingest,
        dashboard: conns["dashboard"].client.clone(),
    }
}

/// Every row for one identity.
async fn column(
    c: &Conn,
    site: &Site,
    revisions: &Mutex<BTreeMap<String, u64>>,
    probe: &Probe,
) -> Vec<Outcome> {
    let mut out = Vec::new();
    for (k, op) in rows() {
        out.push(run(c, site, revisions, probe, k, op).await);
    }
    out
}

/// Narrowing: each allow rule of each service is removed in turn, and some
/// operation the service could do must then be refused (the rule is
/// needed); each deny rule is removed and some refused operation must then
/// succeed. Together with the matrix this shows the rules are exactly what
/// the operations need.
///
/// An allow rule also counts as needed when the server refuses, during
/// the matrix or while the connections are set up, something it allowed:
/// a subscription made once (the reply inbox, a live subscription) is
/// refused in the first operation that makes it, and a later operation
/// that relies on it would only time out. A daemon stops on any refusal,
/// so a step that is refused is a step that is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_generated_rule_is_needed_by_some_operation() {
    let mut w = world();
    let site = Site::new(SITE).unwrap();
    let users = presenced::acl::render::users(&w.access, &site);
    let revisions = {
        let conns = connect_all(&w, Via::Plain).await;
        provision(&conns["admin"], &site).await;
        seed(&conns, &site).await
    };
    let base_config = std::fs::read_to_string(w.server.config_path()).unwrap();
    // The baseline: outcomes are decided by the server (confirmations and
    // its refusal reports), not by timing, so one pass is the truth, and
    // it must be what the ownership map says.
    let mut baseline: BTreeMap<String, Vec<Outcome>> = BTreeMap::new();
    {
        let conns = connect_all(&w, Via::Plain).await;
        let probe = probe(&conns, &site).await;
        let mut cells = BTreeMap::new();
        for (name, _, _) in SERVICES {
            let col = column(&conns[*name], &site, &revisions, &probe).await;
            for ((k, op), got) in rows().into_iter().zip(&col) {
                let exp = expected(&w.access, name, k, op);
                cells.insert((k.to_owned(), op, (*name).to_owned()), (exp, got.clone()));
            }
            baseline.insert((*name).to_owned(), col);
        }
        let names: Vec<&str> = SERVICES.iter().map(|(n, _, _)| *n).collect();
        let (matrix, wrong) = print_matrix(&names, &cells);
        assert_eq!(
            wrong, 0,
            "baseline under the full ACL differs from the ownership map:\n{matrix}"
        );
    }
    let mut unneeded = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let Some(name) = user.label.strip_prefix("service ") else {
            continue; // admin: broad by design (provisioning and inspection)
        };
        let p = &user.permissions;
        let variants = (0..p.publish_allow.len())
            .map(|j| ("publish allow", j))
            .chain((0..p.publish_deny.len()).map(|j| ("publish deny", j)))
            .chain((0..p.subscribe_allow.len()).map(|j| ("subscribe allow", j)));
        for (list, j) in variants {
            let mut variant = users.clone();
            let perms = &mut variant[i].permissions;
            let removed = match list {
                "publish allow" => perms.publish_allow.remove(j),
                "publish deny" => perms.publish_deny.remove(j),
                _ => perms.subscribe_allow.remove(j),
            };
            let conf = presenced::acl::render::render_users(&variant, &site, None);
            std::fs::write(w.server.config_path(), base_config.replace(&w.conf, &conf)).unwrap();
            w.server.restart();
            let conns = connect_all(&w, Via::Plain).await;
            let probe = probe(&conns, &site).await;
            let c = &conns[name];
            let deny = &variant[i].permissions.publish_deny;
            let refused_by_removed = || {
                let all = c.violations.lock().unwrap();
                all.iter()
                    .any(|v| allowed_only_by(list, &removed.subject, deny, v))
            };
            let mut needed = false;
            for ((k, op), base) in rows().into_iter().zip(&baseline[name]) {
                let now = run(c, &site, &revisions, &probe, k, op).await;
                if changed(list, base, &now) || refused_by_removed() {
                    needed = true;
                    break;
                }
            }
            if !needed {
                unneeded.push(format!("{name}: {list} {}", removed.subject));
            }
        }
    }
    assert!(
        unneeded.is_empty(),
        "rules no operation needs (remove them from src/acl/render.rs):\n{}",
        unneeded.join("\n")
    );
}

/// Whether `v` is a refusal of something the removed allow rule `rule`
/// allowed under the full ACL (it matches the rule and no deny rule).
fn allowed_only_by(
    list: &str,
    rule: &str,
    deny: &[presenced::acl::render::Rule],
    v: &Violation,
) -> bool {
    let operation = match list {
        "publish allow" => Operation::Publish,
        "subscribe allow" => Operation::Subscribe,
        _ => return false,
    };
    v.operation == operation
        && !is_barrier(v)
        && subject_matches(rule, &v.subject)
        && !(operation == Operation::Publish
            && deny.iter().any(|d| subject_matches(&d.subject, &v.subject)))
}

/// Whether NATS subject pattern `pattern` covers `subject` (itself a
/// pattern when a subscription was refused: its wildcards must be matched
/// by wildcards of `pattern`).
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[test]
fn subject_patterns_cover_what_they_should() {
    assert!(subject_matches("_INBOX.engine.>", "_INBOX.engine.abc.*"));
    assert!(subject_matches(
        "$JS.ACK.SENSORS.engine.>",
        "$JS.ACK.SENSORS.engine.1.2.3"
    ));
    assert!(subject_matches(
        "$JS.API.CONSUMER.MSG.NEXT.EVENTS.*",
        "$JS.API.CONSUMER.MSG.NEXT.EVENTS.x"
    ));
    assert!(subject_matches("live.home.>", "live.home.>"));
    assert!(!subject_matches("live.home.*", "live.home.>"));
    assert!(!subject_matches("$KV.owners.engine", "$KV.owners.ingest"));
    assert!(!subject_matches("$KV.owners.engine", "$KV.owners.engine.x"));
    assert!(!subject_matches("_INBOX.engine.>", "_INBOX.engine"));
}

/// Whether removing a rule changed an outcome the way it must.
fn changed(list: &str, base: &Outcome, now: &Outcome) -> bool {
    match list {
        "publish deny" => matches!(base, Outcome::Refused(_)) && matches!(now, Outcome::Ok),
        _ => matches!(base, Outcome::Ok) && !matches!(now, Outcome::Ok),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_keyspace_and_operation_is_allowed_exactly_where_the_map_says() {
    let log = capture_log();
    let w = world();
    let site = Site::new(SITE).unwrap();
    let conns = connect_all(&w, Via::Daemon).await;
    let unknown = connect(&w.server, "unknown", &w.keys.seeds["unknown"]).await;
    let err = unknown.err().expect("an identity not in the map connected");
    assert!(err.to_lowercase().contains("authorization"), "{err}");

    provision(&conns["admin"], &site).await;
    let revisions = seed(&conns, &site).await;
    for (name, c) in &conns {
        assert_eq!(
            c.count(),
            0,
            "{name} hit violations while seeding: {:?}",
            c.violations.lock().unwrap()
        );
    }
    let probe = probe(&conns, &site).await;
    let who = [
        "ingest",
        "engine",
        "archiver",
        "dashboard",
        "admin",
        "unknown",
    ];
    let mut cells = BTreeMap::new();
    for (k, op) in rows() {
        for w_name in who {
            let exp = expected(&w.access, w_name, k, op);
            let got = match conns.get(w_name) {
                Some(c) => run(c, &site, &revisions, &probe, k, op).await,
                None => Outcome::Refused("cannot connect".to_owned()),
            };
            cells.insert((k.to_owned(), op, w_name.to_owned()), (exp, got));
        }
    }
    let (matrix, wrong) = print_matrix(&who, &cells);
    println!("{matrix}");
    assert_eq!(
        wrong, 0,
        "permission matrix differs from the ownership map:\n{matrix}\ngenerated config:\n{}",
        w.conf
    );

    // Every refusal the server reported to a service's connection (the
    // refused operations and the barriers between them) has exactly one
    // AUDIT record and one ERROR line, in order, naming the service.
    let admin_js = &conns["admin"].js;
    for (name, _, _) in SERVICES {
        let c = &conns[*name];
        c.settle().await;
        let reported: Vec<(String, Operation)> = c
            .violations
            .lock()
            .unwrap()
            .iter()
            .map(|v| (v.subject.clone(), v.operation))
            .collect();
        assert!(
            reported.iter().any(|(s, _)| !s.starts_with(BARRIER)),
            "{name} was refused nothing"
        );
        let subject = site.audit_subject(name);
        let mut records = Vec::new();
        let deadline = tokio::time::Instant::now() + SETTLE_DEADLINE;
        while records.len() < reported.len() && tokio::time::Instant::now() < deadline {
            records = support::audit::violation_records(admin_js, &subject).await;
        }
        let got: Vec<(String, Operation)> = records
            .iter()
            .map(|r| (r.subject.clone(), r.operation))
            .collect();
        assert_eq!(
            got, reported,
            "AUDIT records of {name} differ from the refusals the server reported"
        );
        for r in &records {
            assert_eq!(
                (r.service.as_str(), r.site.as_str(), r.count),
                (*name, SITE, 1),
                "{r:?}"
            );
        }
        let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| {
                l.contains("ERROR")
                    && l.contains("permission violation")
                    && l.contains(&format!("service=\"{name}\""))
            })
            .map(|l| {
                let at = l.find(" subject=").expect("subject field") + " subject=".len();
                l[at..].split(' ').next().unwrap().to_owned()
            })
            .collect();
        let subjects: Vec<String> = reported.iter().map(|(s, _)| s.clone()).collect();
        assert_eq!(
            lines, subjects,
            "ERROR lines of {name} differ from the refusals the server reported"
        );
        println!(
            "{name}: {} refusals (operations and barriers), each with one AUDIT record and one ERROR line",
            reported.len()
        );
    }
}

/// Captures the test's log (the audit task's ERROR lines).
#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_log() -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let writer = Capture(buf.clone());
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("one subscriber per test process");
    buf
}

/// A service refused a thousand times as fast as it can: the audit stays
/// bounded (the burst, then the rate) and keeps the count (the records'
/// `count` add up to every refusal the server reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_is_audited_bounded_without_losing_the_count() {
    use presenced::acl::audit_limit::{BURST, PER_SECOND};
    const FLOOD: usize = 1000;
    let w = world();
    let site = Site::new(SITE).unwrap();
    let admin = connect(&w.server, "admin", &w.keys.seeds["admin"])
        .await
        .unwrap();
    provision(&admin, &site).await;
    let ingest = connect_service(&w.server, w.dir.path(), "ingest", &w.keys.seeds["ingest"]).await;
    let subject = naming::kv_subject(naming::PRESENCE_BUCKET, "flood");
    let start = std::time::Instant::now();
    // In batches, each awaited until the callback has seen it: the client
    // library drops server errors beyond a queue of 128.
    for batch in 0..FLOOD / 50 {
        for _ in 0..50 {
            ingest
                .client
                .publish(subject.clone(), "x".into())
                .await
                .unwrap();
        }
        ingest.client.flush().await.unwrap();
        let want = (batch + 1) * 50;
        tokio::time::timeout(SETTLE_DEADLINE, async {
            loop {
                let notified = ingest.notify.notified();
                if ingest.count() >= want {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("the server reports every refusal");
    }
    let elapsed = start.elapsed();
    assert_eq!(ingest.count(), FLOOD, "refusals reported");
    let audit_subject = site.audit_subject("ingest");
    let deadline = tokio::time::Instant::now() + SETTLE_DEADLINE;
    let records = loop {
        let records = support::audit::violation_records(&admin.js, &audit_subject).await;
        let total: u64 = records.iter().map(|r| r.count).sum();
        if total >= FLOOD as u64 || tokio::time::Instant::now() >= deadline {
            break records;
        }
    };
    let total: u64 = records.iter().map(|r| r.count).sum();
    assert_eq!(
        total, FLOOD as u64,
        "the records' counts add up to every refusal"
    );
    assert!(records
        .iter()
        .all(|r| r.subject == subject && r.service == "ingest"));
    let bound = BURST as usize + (elapsed.as_secs_f64().ceil() as usize + 1) * PER_SECOND as usize;
    assert!(
        records.len() <= bound && records.len() < FLOOD,
        "{} records for {FLOOD} refusals in {elapsed:?} (bound {bound})",
        records.len()
    );
    println!(
        "{FLOOD} refusals in {elapsed:?}: {} AUDIT records, counts adding up to {total}",
        records.len()
    );
}
