//! The generated ACL against a real nats-server: every identity × keyspace
//! × operation succeeds exactly where the ownership map allows it and is
//! refused by the server everywhere else.

mod support;

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use presenced::acl::access::{Access, Component, Keyspace};
use presenced::acl::violation::{self, Violation};
use presenced::naming::{self, Site};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{NatsOptions, NatsServer};
use tokio::sync::Notify;

const SITE: &str = "home";
/// More than a push consumer delivers before it waits for a flow-control
/// reply.
const LARGE: usize = 1 << 20;
/// A watch of this much data needs flow-control replies.
const WATCH_LARGE: usize = 2 << 20;
const OP_DEADLINE: Duration = Duration::from_secs(5);

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
}

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
    let js = jetstream::ContextBuilder::new()
        .timeout(OP_DEADLINE)
        .build(client.clone());
    Ok(Conn {
        name: name.to_owned(),
        client,
        js,
        violations,
        notify,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Refused(String),
    Failed(String),
}

impl Conn {
    fn count(&self) -> usize {
        self.violations.lock().unwrap().len()
    }

    async fn violation_after(&self, n: usize) -> Violation {
        loop {
            let notified = self.notify.notified();
            if let Some(v) = self.violations.lock().unwrap().get(n) {
                return v.clone();
            }
            notified.await;
        }
    }

    /// Runs one operation: refused when the server reports a violation
    /// while it runs (or by the flush after it), ok when it completes.
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
            v = self.violation_after(before) => return Outcome::Refused(v.subject),
        };
        // A refusal of a later step may arrive after the step "succeeded".
        let _ = self.client.flush().await;
        if let Some(v) = self.violations.lock().unwrap().get(before) {
            return Outcome::Refused(v.subject.clone());
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
    rows
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
    let k = Keyspace::parse(keyspace).unwrap();
    let svc = access.service(who);
    let owns = svc.is_some_and(|s| s.owns(k));
    let reads = admin || svc.is_some_and(|s| s.reads(k));
    match (k, op) {
        (Keyspace::Owners, Put) | (Keyspace::Audit, Publish) => svc.is_some(),
        (_, PutForeign | PublishForeign) => false,
        (_, Put | Create | Update | Delete | Purge | Publish | ObjPut | ObjDelete) => owns,
        (Keyspace::Sensors, DurableFetch | RawPull) => {
            admin || svc.is_some_and(|s| s.runs(Component::Engine))
        }
        (Keyspace::Live, Subscribe) => svc.is_some_and(|s| s.reads(k)),
        (Keyspace::Commands, Request) => svc.is_some_and(|s| s.reads(k) && !s.owns(k)),
        (Keyspace::Commands, Serve) => owns,
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

/// The key reads target: each service writes only its own owners key.
fn read_key(keyspace: &str) -> &'static str {
    if keyspace == "owners" {
        "engine"
    } else {
        "seed"
    }
}

fn big_value() -> bytes::Bytes {
    vec![b'x'; 700 << 10].into()
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

/// The engine answers every command (its grant: allow_responses).
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
                    .get(read_key(keyspace))
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
                    naming::kv_subject(bucket_of(keyspace), read_key(keyspace)),
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
                let consumer = s
                    .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
                    .await?;
                first(consumer.messages().await?).await
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
                match batch.next().await {
                    Some(m) => m?.ack().await?,
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
                if buf.len() != 3 * LARGE {
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
    _dir: tempfile::TempDir,
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
        _dir: dir,
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
        let big = vec![b'o'; 3 * LARGE];
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

async fn connect_all(w: &World) -> BTreeMap<String, Conn> {
    let mut conns = BTreeMap::new();
    for name in ["admin", "ingest", "engine", "archiver", "dashboard"] {
        let c = connect(&w.server, name, &w.keys.seeds[name])
            .await
            .unwrap_or_else(|e| panic!("{name} cannot connect: {e}\n{}", w.conf));
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
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_generated_rule_is_needed_by_some_operation() {
    let mut w = world();
    let site = Site::new(SITE).unwrap();
    let users = presenced::acl::render::users(&w.access, &site);
    let revisions = {
        let conns = connect_all(&w).await;
        provision(&conns["admin"], &site).await;
        seed(&conns, &site).await
    };
    let base_config = std::fs::read_to_string(w.server.config_path()).unwrap();
    // Two baseline passes, an operation counting as allowed if it
    // succeeded in either: a request that timed out once on a loaded
    // machine must not make the rule it needs look unneeded.
    let mut baseline: BTreeMap<String, Vec<Outcome>> = BTreeMap::new();
    for _ in 0..2 {
        let conns = connect_all(&w).await;
        let probe = probe(&conns, &site).await;
        for (name, _, _) in SERVICES {
            let col = column(&conns[*name], &site, &revisions, &probe).await;
            match baseline.get_mut(*name) {
                None => {
                    baseline.insert((*name).to_owned(), col);
                }
                Some(prev) => {
                    for (p, n) in prev.iter_mut().zip(col) {
                        if !matches!(p, Outcome::Ok) && matches!(n, Outcome::Ok) {
                            *p = n;
                        }
                    }
                }
            }
        }
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
            // allow_responses also lets a service reply to acks and flow
            // control: prove each rule without it.
            perms.allow_responses = false;
            let removed = match list {
                "publish allow" => perms.publish_allow.remove(j),
                "publish deny" => perms.publish_deny.remove(j),
                _ => perms.subscribe_allow.remove(j),
            };
            let conf = presenced::acl::render::render_users(&variant, &site, None);
            std::fs::write(w.server.config_path(), base_config.replace(&w.conf, &conf)).unwrap();
            w.server.restart();
            let conns = connect_all(&w).await;
            let probe = probe(&conns, &site).await;
            let mut needed = false;
            for ((k, op), base) in rows().into_iter().zip(&baseline[name]) {
                let now = run(&conns[name], &site, &revisions, &probe, k, op).await;
                if changed(list, base, &now) {
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

/// Whether removing a rule changed an outcome the way it must.
fn changed(list: &str, base: &Outcome, now: &Outcome) -> bool {
    match list {
        "publish deny" => matches!(base, Outcome::Refused(_)) && matches!(now, Outcome::Ok),
        // A refused inbox subscription shows as requests that time out.
        _ => matches!(base, Outcome::Ok) && !matches!(now, Outcome::Ok),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_keyspace_and_operation_is_allowed_exactly_where_the_map_says() {
    let w = world();
    let site = Site::new(SITE).unwrap();
    let conns = connect_all(&w).await;
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
}
