//! Engine failover through the real binary under the generated ACL: one
//! ingest instance and two instances of the engine service on one leaf.
//! The one holding the leader lease (`owners.engine`) runs the engine, the
//! other stands by; SIGKILL or freeze the active one while readings flow,
//! and the standby takes over within the lease TTL plus a second. EVENTS
//! and KV presence end up exactly as the pure core computes them from the
//! readings in SENSORS: no transition lost, duplicated or renumbered.

use crate::common;
use crate::support;

use common::*;
use presenced::engine::{self, Model, Transition};
use presenced::time::Timestamp;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{AclSite, Daemon, Mosquitto};

const TTL: Duration = Duration::from_secs(3);
const ZONE_COUNT: usize = 8;

fn zones() -> String {
    let mut out = String::new();
    for i in 0..ZONE_COUNT {
        out.push_str(&format!(
            "[zones.z{i}]\nprior = 0.1\noccupied_above = 0.6\nvacant_below = 0.3\narrive_after = \"0s\"\nleave_after = \"0s\"\n[[zones.z{i}.evidence]]\nsensor = \"s{i}\"\np_true = 0.95\np_false = 0.05\n\n"
        ));
    }
    out
}

fn head(service: &str, seed: &Path, nats: &str, http: u16) -> String {
    format!(
        "site = \"test\"\nservice = \"{service}\"\n\n[nats]\nurl = \"{nats}\"\nrequest_timeout = \"2s\"\nnkey_seed_file = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n[engine]\ndrain_timeout = \"5s\"\n\n[lease]\nttl = \"{}s\"\n",
        seed.display(),
        TTL.as_secs()
    )
}

struct Site {
    acl: AclSite,
    broker: Mosquitto,
    admin: async_nats::jetstream::Context,
    engine_cfg: [PathBuf; 2],
    engine_http: [SocketAddr; 2],
    _ingest: Daemon,
}

/// The ACL `presenced acl` generates for an `ingest` and an `engine`
/// service, provisioned by the admin, with the ingest instance running.
async fn site() -> Site {
    let broker = Mosquitto::start();
    let acl = AclSite::start(&[
        ("ingest", "runs = [\"ingest\"]"),
        ("engine", "runs = [\"engine\"]"),
    ]);
    let url = acl.url();
    let admin_cfg = acl.file(
        "admin.toml",
        &format!(
            "{}{}",
            head("admin", &acl.seed("admin"), &url, support::free_port()),
            zones()
        ),
    );
    provision(&admin_cfg);
    let ingest_http = support::free_port();
    let ingest_cfg = acl.file(
        "ingest.toml",
        &format!(
            "runs = [\"ingest\"]\n{}[mqtt.main]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive = \"5s\"\nreconnect_max = \"1s\"\n{}",
            head("ingest", &acl.seed("ingest"), &url, ingest_http),
            broker.port,
            motion_mapping(true)
        ),
    );
    let ingest_daemon = Daemon::start_at(&ingest_cfg, &[]);
    ingest_daemon.wait_healthy(
        SocketAddr::from(([127, 0, 0, 1], ingest_http)),
        Duration::from_secs(20),
    );
    let ports = [support::free_port(), support::free_port()];
    let engine_cfg = [0, 1].map(|i| {
        acl.file(
            &format!("engine-{i}.toml"),
            &format!(
                "{}{}",
                head("engine", &acl.seed("engine"), &url, ports[i]),
                zones()
            ),
        )
    });
    let admin = acl.js("admin").await;
    Site {
        acl,
        broker,
        admin,
        engine_cfg,
        engine_http: ports.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
        _ingest: ingest_daemon,
    }
}

fn engine_health(http: SocketAddr) -> serde_json::Value {
    support::http_get(http, "/healthz")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .map(|v| v["engine"].clone())
        .unwrap_or_default()
}

/// The last AUDIT record of `service` is its takeover (`<service>_takeover`)
/// from the instance `from` to the instance `to` (by PID); returned for
/// further checks.
async fn assert_takeover_audited(
    admin: &async_nats::jetstream::Context,
    service: &str,
    from: u32,
    to: u32,
) -> presenced::store::leader::TakeoverRecord {
    let audit = admin
        .get_stream("AUDIT")
        .await
        .unwrap()
        .get_last_raw_message_by_subject(
            &presenced::naming::Site::new("test")
                .unwrap()
                .audit_subject(service),
        )
        .await
        .expect("a takeover record in AUDIT");
    let record: presenced::store::leader::TakeoverRecord =
        serde_json::from_slice(&audit.payload).unwrap();
    assert_eq!(record.kind, format!("{service}_takeover"));
    assert!(record.to.ends_with(&format!("/{to}")), "{record:?}");
    assert!(
        record
            .from
            .as_deref()
            .is_some_and(|f| f.ends_with(&format!("/{from}"))),
        "{record:?}"
    );
    record
}

fn wait_role(http: SocketAddr, role: &str, deadline: Duration) -> Instant {
    let start = Instant::now();
    loop {
        if engine_health(http)["role"] == role {
            return Instant::now();
        }
        assert!(
            start.elapsed() < deadline,
            "{http} not {role} within {deadline:?}: {}",
            engine_health(http)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Publishes `count` readings (QoS 0, as sensors do) at 100 per second
/// across the zones' sensors; each zone alternates true and false.
fn readings(port: u16, count: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut p = Publisher::connect(port, "failover-pub").await;
        let base = now_ms();
        for i in 0..count {
            let z = i % ZONE_COUNT;
            let v = (i / ZONE_COUNT) % 2 == 0;
            p.publish_qos0(
                &format!("test/s{z}"),
                format!(r#"{{"occupancy":{v},"ts":{}}}"#, base + i as i64),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        p.flush(Duration::from_secs(10)).await;
    })
}

/// The transitions and final states the pure core computes from what
/// SENSORS holds, in stream order: what an uninterrupted engine writes.
async fn expected(
    js: &async_nats::jetstream::Context,
    config: &Path,
) -> (Vec<Transition>, Vec<engine::ZoneState>) {
    let cfg = presenced::config::Config::load(config).unwrap();
    let model = Model::from_config(&cfg);
    let mut states: std::collections::BTreeMap<String, engine::ZoneState> = model
        .zones
        .iter()
        .map(|(z, zm)| (z.clone(), engine::initial_state(zm, Timestamp(0))))
        .collect();
    let mut out = Vec::new();
    for m in read_stream(js, "SENSORS").await {
        let seq = m.info().unwrap().stream_sequence;
        let o: presenced::observation::Observation = serde_json::from_slice(&m.payload).unwrap();
        for z in model.by_sensor.get(&o.sensor).into_iter().flatten() {
            let input = engine::Input {
                seq,
                sensor: &o.sensor,
                value: o.value,
                at: o.observed_at,
            };
            out.extend(engine::apply(
                &model.zones[z],
                states.get_mut(z).unwrap(),
                &input,
            ));
        }
    }
    (out, states.into_values().collect())
}

fn key(t: &Transition) -> (String, u64, String, String, i64) {
    (
        t.zone.clone(),
        t.number,
        t.from.as_str().to_owned(),
        t.to.as_str().to_owned(),
        t.at.millis(),
    )
}

/// EVENTS and KV presence equal the pure core's run over SENSORS.
async fn assert_trajectory(s: &Site, total: u64) {
    let js = &s.admin;
    eventually("every reading stored", Duration::from_secs(20), || async {
        stream_messages(js, "SENSORS").await >= total
    })
    .await;
    assert_eq!(
        stream_messages(js, "SENSORS").await,
        total,
        "no reading stored twice"
    );
    eventually(
        "the engine applied everything",
        Duration::from_secs(30),
        || async { engine_caught_up(js, total).await },
    )
    .await;
    let (want, states) = expected(js, &s.engine_cfg[0]).await;
    assert!(
        want.len() > 100,
        "the readings make transitions: {}",
        want.len()
    );
    let got = events(js).await;
    let got_keys: Vec<_> = got.iter().map(key).collect();
    let want_keys: Vec<_> = want.iter().map(key).collect();
    let mut sorted_got = got_keys.clone();
    sorted_got.sort();
    let mut sorted_want = want_keys.clone();
    sorted_want.sort();
    assert_eq!(
        sorted_got.len(),
        sorted_want.len(),
        "as many transitions in EVENTS as the uninterrupted trajectory"
    );
    assert_eq!(
        sorted_got, sorted_want,
        "EVENTS holds exactly the uninterrupted trajectory"
    );
    for want in states {
        let stored = zone(js, &want.zone).await.expect("zone stored");
        assert_eq!(stored.state, want.state, "{}", want.zone);
        assert_eq!(stored.transitions, want.transitions, "{}", want.zone);
        assert_eq!(stored.last_seq, want.last_seq, "{}", want.zone);
    }
}

fn start_engine(s: &Site, i: usize) -> Daemon {
    let d = Daemon::start_at(&s.engine_cfg[i], &[]);
    d.wait_healthy(s.engine_http[i], Duration::from_secs(20));
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_within_ttl_plus_one_second_after_a_sigkill_and_loses_nothing() {
    let s = site().await;
    let mut a = start_engine(&s, 0);
    wait_role(s.engine_http[0], "active", Duration::from_secs(10));
    let b = start_engine(&s, 1);
    wait_role(s.engine_http[1], "standby", Duration::from_secs(10));
    assert_eq!(engine_health(s.engine_http[0])["role"], "active");

    let total = 1200;
    let publisher = readings(s.broker.port, total);
    eventually("readings flowing", Duration::from_secs(10), || async {
        stream_messages(&s.admin, "SENSORS").await > 200
    })
    .await;
    let a_pid = a.pid();
    a.kill9();
    let killed = Instant::now();
    let killed_at = Timestamp::now();
    let took = wait_role(s.engine_http[1], "active", TTL + Duration::from_secs(5)) - killed;
    eprintln!("takeover {took:?} after SIGKILL (TTL {TTL:?})");
    assert!(
        took <= TTL + Duration::from_secs(1),
        "standby active {took:?} after the SIGKILL, more than TTL + 1 s"
    );
    // The standby followed the state: it started from it, warm, soon
    // after recording the takeover.
    b.wait_for_log("state rehydrated", Duration::from_secs(5));
    let log = b.log();
    let rehydrated = log_line(&log, "state rehydrated");
    eprintln!(
        "takeover recorded in EVENTS {} ms after SIGKILL, state rehydrated {} ms after; {rehydrated}",
        log_time(&log, "takeover recorded in EVENTS").0 - killed_at.0,
        log_time(&log, "state rehydrated").0 - killed_at.0
    );
    assert!(rehydrated.contains("warm=true"), "{rehydrated}");
    publisher.await.unwrap();
    assert_trajectory(&s, total as u64).await;
    let h = engine_health(s.engine_http[1]);
    assert_eq!(h["takeovers"], 1, "{h}");
    assert!(
        h["holder"]
            .as_str()
            .is_some_and(|x| x.ends_with(&format!("/{}", b.pid()))),
        "{h}"
    );
    let (_, metrics) = support::http_get(s.engine_http[1], "/metrics").unwrap();
    assert!(metrics.contains("presenced_engine_active 1\n"), "{metrics}");
    assert!(
        metrics.contains("presenced_engine_takeovers_total 1\n"),
        "{metrics}"
    );
    // The takeover is on record, old and new holder.
    let record = assert_takeover_audited(&s.admin, "engine", a_pid, b.pid()).await;
    // Both instances run on this host in one PID namespace: the standby
    // sees that the holder's process is gone and takes the lease without
    // waiting for its TTL. (Across hosts or PID namespaces it waits for
    // the lapse: the freeze test shows that path.)
    assert_eq!(
        record.reason,
        "the holder was a process of this host that no longer exists"
    );
    // And in EVENTS, beside the zones' subjects: the first holder's
    // acquisition (nobody before it) and exactly one takeover naming
    // both holders; none of it counted as a transition above.
    let takeovers = takeover_records(&s.admin).await;
    assert_eq!(takeovers.len(), 2, "{takeovers:?}");
    assert_eq!(takeovers[0].from, None, "{takeovers:?}");
    assert!(
        takeovers[0].to.ends_with(&format!("/{a_pid}")),
        "{takeovers:?}"
    );
    let both: Vec<_> = takeovers
        .iter()
        .filter(|r| {
            r.from
                .as_deref()
                .is_some_and(|f| f.ends_with(&format!("/{a_pid}")))
                && r.to.ends_with(&format!("/{}", b.pid()))
        })
        .collect();
    assert_eq!(
        both.len(),
        1,
        "one record names both holders: {takeovers:?}"
    );
    assert_eq!(both[0].revision, record.revision, "the take AUDIT recorded");
    assert!(both[0].time.millis() > 0);
    // A replay of the same readings agrees with EVENTS: the takeover
    // records are not transitions to it either.
    let out = support::daemon::run_presenced(
        &[
            "replay",
            "--config",
            s.acl.dir.path().join("admin.toml").to_str().unwrap(),
            "--from-seq",
            "1",
            "--diff",
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("diff against EVENTS: identical"), "{text}");
    let log = b.log();
    assert!(log.contains("leader lease taken"), "{log}");
    assert!(log.contains("takeover recorded in EVENTS"), "{log}");
    assert!(!log.contains("Permissions Violation"), "{log}");
}

/// The first line of a daemon log that contains `needle`.
fn log_line<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"))
}

/// The time stamp (the first word, RFC 3339) of that line.
fn log_time(log: &str, needle: &str) -> Timestamp {
    let line = log_line(log, needle);
    let word = line.split_whitespace().next().unwrap_or_default();
    Timestamp::parse_rfc3339(word).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// The takeover records in EVENTS (`events.test.takeover.engine`), in
/// stream order.
async fn takeover_records(
    js: &async_nats::jetstream::Context,
) -> Vec<presenced::store::leader::TakeoverRecord> {
    let site = presenced::naming::Site::new("test").unwrap();
    read_stream(js, "EVENTS")
        .await
        .iter()
        .filter(|m| m.subject.as_str() == site.takeover_subject("engine"))
        .map(|m| serde_json::from_slice(&m.payload).expect("takeover record JSON"))
        .collect()
}

fn signal(d: &Daemon, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(d.pid()).unwrap();
    // SAFETY: a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// The highest stream sequence any zone in KV presence has applied.
async fn applied(js: &async_nats::jetstream::Context) -> u64 {
    let mut max = 0;
    for i in 0..ZONE_COUNT {
        if let Some(z) = zone(js, &format!("z{i}")).await {
            max = max.max(z.last_seq);
        }
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_is_fenced_when_it_wakes_and_stands_by() {
    let s = site().await;
    let a = start_engine(&s, 0);
    wait_role(s.engine_http[0], "active", Duration::from_secs(10));
    let b = start_engine(&s, 1);
    wait_role(s.engine_http[1], "standby", Duration::from_secs(10));

    let total = 1500;
    let publisher = readings(s.broker.port, total);
    eventually("readings flowing", Duration::from_secs(10), || async {
        stream_messages(&s.admin, "SENSORS").await > 200
    })
    .await;
    signal(&a, libc::SIGSTOP);
    let frozen = Instant::now();
    let took = wait_role(s.engine_http[1], "active", TTL + Duration::from_secs(5)) - frozen;
    eprintln!("takeover {took:?} after SIGSTOP (TTL {TTL:?})");
    assert!(
        took <= TTL + Duration::from_secs(1),
        "standby active {took:?} after the freeze, more than TTL + 1 s"
    );
    // The new holder applies readings while the old one is still frozen.
    let stored = stream_messages(&s.admin, "SENSORS").await;
    eventually(
        "the new holder applies readings",
        Duration::from_secs(10),
        || async { applied(&s.admin).await > stored + 50 },
    )
    .await;
    let log_before = a.log().len();
    signal(&a, libc::SIGCONT);
    // The old holder notices at once, writes nothing, and stands by,
    // while readings keep flowing.
    a.wait_for_log("stepped down, writes are fenced", Duration::from_secs(5));
    wait_role(s.engine_http[0], "standby", Duration::from_secs(5));
    assert!(
        stream_messages(&s.admin, "SENSORS").await < total as u64,
        "readings were still flowing when the old holder woke up"
    );
    publisher.await.unwrap();
    assert_trajectory(&s, total as u64).await;
    let after = a.log()[log_before..].to_owned();
    assert!(
        !after.contains("takeover recorded"),
        "the thawed holder recorded no takeover: {after}"
    );
    let records = takeover_sequences(&s.admin).await;
    assert_eq!(records.len(), 2, "{records:?}");
    // The runner logs `transition` once EVENTS acknowledged it. A holder
    // frozen with publishes on the wire gets their acknowledgements, and
    // logs them, only when it wakes: each must have been stored before the
    // new holder's takeover record, none after.
    for line in after
        .lines()
        .filter(|l| l.contains("engine::runner: transition "))
    {
        let sequence: u64 = line
            .split("sequence=")
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("a transition line without its sequence: {line}"));
        assert!(
            sequence < records[1].0,
            "the thawed holder published a transition after the takeover (sequence {sequence}, takeover at {}): {after}",
            records[1].0
        );
    }
    assert_eq!(engine_health(s.engine_http[0])["role"], "standby");
    assert_eq!(engine_health(s.engine_http[1])["role"], "active");
    let blog = b.log();
    assert!(
        !blog.contains("another engine holds the leader lease and wrote these keys"),
        "the new holder never met another writer: {blog}"
    );
    eprintln!("old holder after SIGCONT:\n{after}");
    eprintln!(
        "stretches the new holder read past the old one's pulls: {}",
        blog.matches("went to another puller").count()
    );
    for log in [a.log(), blog] {
        assert!(!log.contains("Permissions Violation"), "{log}");
    }
    // The server-side fence of EVENTS: a publish as the thawed holder
    // would send it had it been frozen between its fence check and the
    // publish (the engine's identity, the old tenure's takeover record as
    // the expected last one) is refused; the new tenure's is accepted.
    assert!(records[0].1.to.ends_with(&format!("/{}", a.pid())));
    assert!(records[1].1.to.ends_with(&format!("/{}", b.pid())));
    let engine = engine_js(&s).await;
    let stale = fenced_publish(&engine, "events.test.presence.z0", records[0].0).await;
    assert!(
        matches!(&stale, Err(e) if e.kind() == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence),
        "a publish of the old tenure is refused: {stale:?}"
    );
    let current = fenced_publish(&engine, "events.test.probe", records[1].0).await;
    assert!(current.is_ok(), "the new tenure's is stored: {current:?}");
    assert_eq!(
        events(&s.admin).await.len(),
        expected(&s.admin, &s.engine_cfg[0]).await.0.len(),
        "nothing of the old tenure reached the zones' subjects"
    );
}

/// The engine service's JetStream context (its identity and inboxes).
async fn engine_js(s: &Site) -> async_nats::jetstream::Context {
    s.acl.js("engine").await
}

/// Publishes to `subject` expecting `seq` as the last message under the
/// takeover subject, as the engine fences its EVENTS publishes.
async fn fenced_publish(
    js: &async_nats::jetstream::Context,
    subject: &str,
    seq: u64,
) -> Result<async_nats::jetstream::publish::PublishAck, async_nats::jetstream::context::PublishError>
{
    let msg = async_nats::jetstream::message::PublishMessage::build()
        .payload(r#"{"probe":true}"#.into())
        .expected_last_subject_sequence(seq)
        .header(
            "Nats-Expected-Last-Subject-Sequence-Subject",
            "events.test.takeover.engine",
        );
    js.send_publish(subject.to_owned(), msg).await?.await
}

/// The takeover records in EVENTS with their stream sequences.
async fn takeover_sequences(
    js: &async_nats::jetstream::Context,
) -> Vec<(u64, presenced::store::leader::TakeoverRecord)> {
    read_stream(js, "EVENTS")
        .await
        .iter()
        .filter(|m| m.subject.as_str() == "events.test.takeover.engine")
        .map(|m| {
            (
                m.info().unwrap().stream_sequence,
                serde_json::from_slice(&m.payload).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_by_hand_moves_the_engine_to_one_writer_and_loses_nothing() {
    let s = site().await;
    let a = start_engine(&s, 0);
    wait_role(s.engine_http[0], "active", Duration::from_secs(10));
    let b = start_engine(&s, 1);
    wait_role(s.engine_http[1], "standby", Duration::from_secs(10));
    let total = 1000;
    let publisher = readings(s.broker.port, total);
    eventually("readings flowing", Duration::from_secs(10), || async {
        stream_messages(&s.admin, "SENSORS").await > 200
    })
    .await;
    let owners = by_hand(&s).await;
    owners.delete("engine").await.unwrap();
    // The standby takes the free lease; the holder's next renewal (or
    // write) is refused and it stands by: one writer again.
    wait_role(s.engine_http[1], "active", Duration::from_secs(3));
    a.wait_for_log("stepped down", Duration::from_secs(3));
    wait_role(s.engine_http[0], "standby", Duration::from_secs(3));
    publisher.await.unwrap();
    assert_trajectory(&s, total as u64).await;
    let alog = a.log();
    // Whichever of its writes met the new holder first: the lease
    // renewal, a zone's compare-and-set, or EVENTS' server-side fence
    // (the new holder's takeover record is newer than its own).
    assert!(
        alog.contains("renewal refused")
            || alog.contains("another engine holds the leader lease")
            || alog.contains("EVENTS refused a publish"),
        "the old holder says why it stepped down: {alog}"
    );
    assert_eq!(engine_health(s.engine_http[0])["role"], "standby");
    assert_eq!(engine_health(s.engine_http[1])["role"], "active");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_lease_value_is_taken_by_one_instance_only_once_it_stays_unchanged_past_the_ttl(
) {
    let s = site().await;
    let owners = by_hand(&s).await;
    owners.put("engine", "not a lease".into()).await.unwrap();
    let started = Instant::now();
    let a = Daemon::start_at(&s.engine_cfg[0], &[]);
    let b = Daemon::start_at(&s.engine_cfg[1], &[]);
    a.wait_for_log("is not a lease", Duration::from_secs(10));
    b.wait_for_log("is not a lease", Duration::from_secs(10));
    // Nobody runs the engine while the value may be someone's.
    let first = eventually_role_any(&s, Duration::from_secs(15));
    let waited = first - started;
    eprintln!("unreadable lease taken {waited:?} after the start");
    assert!(
        waited > TTL + presenced::store::lease::CLOCK_SKEW,
        "taken after {waited:?}: before the value stayed unchanged for TTL + skew"
    );
    // Exactly one of the two took it.
    std::thread::sleep(Duration::from_secs(1));
    let roles: Vec<_> = s
        .engine_http
        .iter()
        .map(|h| engine_health(*h)["role"].clone())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| *r == "active").count(),
        1,
        "one writer: {roles:?}"
    );
    assert_eq!(
        roles.iter().filter(|r| *r == "standby").count(),
        1,
        "{roles:?}"
    );
    let taken = a
        .log()
        .contains("an unreadable lease value unchanged for longer than the TTL")
        || b.log()
            .contains("an unreadable lease value unchanged for longer than the TTL");
    assert!(taken, "the taker says what it did");
}

/// KV `owners` as a person at the site reaches it with the engine
/// service's credentials (under the generated ACL nobody else may write
/// `owners.engine`, the admin included).
async fn by_hand(s: &Site) -> async_nats::jetstream::kv::Store {
    s.acl
        .js("engine")
        .await
        .get_key_value("owners")
        .await
        .unwrap()
}

/// When either engine instance first reports itself active.
fn eventually_role_any(s: &Site, deadline: Duration) -> Instant {
    let start = Instant::now();
    loop {
        if s.engine_http
            .iter()
            .any(|h| engine_health(*h)["role"] == "active")
        {
            return Instant::now();
        }
        assert!(start.elapsed() < deadline, "no instance took the lease");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The active instance in a PID namespace of its own (another container
/// or host, as far as the standby can tell): after its SIGKILL the
/// standby cannot see that the process is gone and takes over when the
/// lease lapses, within the TTL plus a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_pid_namespaces_a_standby_takes_over_when_the_lease_lapses_within_ttl_plus_one_second(
) {
    let s = site().await;
    let mut a = Daemon::start_in_own_pid_namespace(&s.engine_cfg[0]);
    a.wait_healthy(s.engine_http[0], Duration::from_secs(20));
    wait_role(s.engine_http[0], "active", Duration::from_secs(10));
    let b = start_engine(&s, 1);
    wait_role(s.engine_http[1], "standby", Duration::from_secs(10));

    let total = 1200;
    let publisher = readings(s.broker.port, total);
    eventually("readings flowing", Duration::from_secs(10), || async {
        stream_messages(&s.admin, "SENSORS").await > 200
    })
    .await;
    a.kill9();
    let killed = Instant::now();
    let took = wait_role(s.engine_http[1], "active", TTL + Duration::from_secs(5)) - killed;
    eprintln!("takeover {took:?} after SIGKILL in another PID namespace (TTL {TTL:?})");
    assert!(
        took <= TTL + Duration::from_secs(1),
        "standby active {took:?} after the SIGKILL, more than TTL + 1 s"
    );
    assert!(
        took >= Duration::from_secs(1),
        "taken {took:?} after the kill: before the lease could have lapsed"
    );
    publisher.await.unwrap();
    assert_trajectory(&s, total as u64).await;
    let log = b.log();
    assert!(
        log.contains("the lease was released or ran out"),
        "taken on the lapse: {log}"
    );
    assert!(!log.contains("Permissions Violation"), "{log}");
}

/// The active instance cut from the leaf (its connection hangs: bytes go
/// nowhere, nothing is closed) while readings flow: the standby takes over
/// within the TTL plus a second; when the link comes back the former
/// holder stands by, and nothing is lost or written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_instance_cut_from_the_leaf_is_replaced_and_stands_by_when_the_link_returns() {
    let s = site().await;
    let nats_addr: SocketAddr = s.acl.url().trim_start_matches("nats://").parse().unwrap();
    let proxy = support::Proxy::start(nats_addr);
    let via_proxy = std::fs::read_to_string(&s.engine_cfg[0])
        .unwrap()
        .replace(&s.acl.url(), &format!("nats://127.0.0.1:{}", proxy.port));
    let a_cfg = s.acl.file("engine-proxied.toml", &via_proxy);
    let a = Daemon::start_at(&a_cfg, &[]);
    a.wait_healthy(s.engine_http[0], Duration::from_secs(20));
    wait_role(s.engine_http[0], "active", Duration::from_secs(10));
    let b = start_engine(&s, 1);
    wait_role(s.engine_http[1], "standby", Duration::from_secs(10));

    let total = 1500;
    let publisher = readings(s.broker.port, total);
    eventually("readings flowing", Duration::from_secs(10), || async {
        stream_messages(&s.admin, "SENSORS").await > 200
    })
    .await;
    proxy.stall();
    let cut = Instant::now();
    let took = wait_role(s.engine_http[1], "active", TTL + Duration::from_secs(5)) - cut;
    eprintln!("takeover {took:?} after the cut (TTL {TTL:?})");
    assert!(
        took <= TTL + Duration::from_secs(1),
        "standby active {took:?} after the cut, more than TTL + 1 s"
    );
    // The cut-off holder has stopped writing by itself (its fence closed).
    a.wait_for_log("stepped down, writes are fenced", Duration::from_secs(5));
    proxy.restore();
    a.wait_for_log(
        "standby: another instance runs the engine",
        Duration::from_secs(15),
    );
    assert_eq!(engine_health(s.engine_http[0])["role"], "standby");
    publisher.await.unwrap();
    assert_trajectory(&s, total as u64).await;
    assert_eq!(engine_health(s.engine_http[1])["role"], "active");
    for log in [a.log(), b.log()] {
        assert!(!log.contains("Permissions Violation"), "{log}");
    }
    eprintln!(
        "stretches the new holder read past the old one's pulls: {}",
        b.log().matches("went to another puller").count()
    );
}

/// Several SIGKILLs of the active instance in a row while readings flow,
/// the killed one restarted as the standby each time: EVENTS and KV
/// presence equal an uninterrupted run of the pure core over SENSORS, and
/// EVENTS holds one takeover record per acquisition, each taking over
/// from the holder before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_sigkill_takeovers_in_a_row_lose_and_duplicate_nothing() {
    const KILLS: usize = 4;
    let s = site().await;
    let mut instances = [Some(start_engine(&s, 0)), None];
    wait_role(s.engine_http[0], "active", Duration::from_secs(10));
    instances[1] = Some(start_engine(&s, 1));
    wait_role(s.engine_http[1], "standby", Duration::from_secs(10));

    let total = 2000;
    let publisher = readings(s.broker.port, total);
    let mut active = 0;
    let mut holders = vec![instances[0].as_ref().unwrap().pid()];
    for k in 0..KILLS {
        // Let the holder apply some readings first.
        let stored = stream_messages(&s.admin, "SENSORS").await;
        eventually("readings applied", Duration::from_secs(10), || async {
            applied(&s.admin).await > stored + 40
        })
        .await;
        let mut victim = instances[active].take().unwrap();
        victim.kill9();
        let killed = Instant::now();
        let standby = 1 - active;
        let took = wait_role(
            s.engine_http[standby],
            "active",
            TTL + Duration::from_secs(5),
        ) - killed;
        eprintln!("takeover {} after SIGKILL: {took:?}", k + 1);
        assert!(took <= TTL + Duration::from_secs(1), "{took:?}");
        holders.push(instances[standby].as_ref().unwrap().pid());
        drop(victim);
        instances[active] = Some(start_engine(&s, active));
        wait_role(s.engine_http[active], "standby", Duration::from_secs(10));
        active = standby;
    }
    assert!(
        stream_messages(&s.admin, "SENSORS").await < total as u64,
        "readings were still flowing at the last takeover"
    );
    publisher.await.unwrap();
    assert_trajectory(&s, total as u64).await;
    let records = takeover_records(&s.admin).await;
    assert_eq!(records.len(), KILLS + 1, "{records:?}");
    assert_eq!(records[0].from, None, "{records:?}");
    for (i, r) in records.iter().enumerate() {
        assert!(
            r.to.ends_with(&format!("/{}", holders[i])),
            "{i}: {records:?}"
        );
        if i > 0 {
            assert_eq!(
                r.from.as_deref(),
                Some(records[i - 1].to.as_str()),
                "{records:?}"
            );
            assert!(r.revision > records[i - 1].revision, "{records:?}");
        }
    }
    for d in instances.iter().flatten() {
        let log = d.log();
        assert!(!log.contains("Permissions Violation"), "{log}");
    }
}

/// Two instances of one ingest service on one broker and leaf, under the
/// generated ACL: `<service>-<i>.toml` with the same service, the same
/// MQTT source (so the same client id, the default) and its own HTTP port.
struct IngestPair {
    _acl: AclSite,
    broker: Mosquitto,
    admin: async_nats::jetstream::Context,
    cfg: [PathBuf; 2],
    http: [SocketAddr; 2],
}

async fn ingest_pair() -> IngestPair {
    let broker = Mosquitto::start();
    let acl = AclSite::start(&[("ingest", "runs = [\"ingest\"]")]);
    let url = acl.url();
    let admin_cfg = acl.file(
        "admin.toml",
        &format!(
            "{}{}",
            head("admin", &acl.seed("admin"), &url, support::free_port()),
            zones()
        ),
    );
    provision(&admin_cfg);
    let ports = [support::free_port(), support::free_port()];
    // No device time stamp: identical readings are identical payloads.
    let cfg = [0, 1].map(|i| {
        acl.file(
            &format!("ingest-{i}.toml"),
            &format!(
                "runs = [\"ingest\"]\n{}[mqtt.main]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive = \"5s\"\nreconnect_max = \"1s\"\n{}",
                head("ingest", &acl.seed("ingest"), &url, ports[i]),
                broker.port,
                motion_mapping(false)
            ),
        )
    });
    let admin = acl.js("admin").await;
    IngestPair {
        _acl: acl,
        broker,
        admin,
        cfg,
        http: ports.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
    }
}

fn health(http: SocketAddr) -> serde_json::Value {
    support::http_get(http, "/healthz")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .unwrap_or_default()
}

/// Waits until the instance at `http` says its ingest is `role` and, when
/// active, its MQTT source is connected (subscribed: a QoS 0 reading sent
/// then reaches it). Returns when it saw the role.
fn wait_ingest(http: SocketAddr, role: &str, deadline: Duration) -> Instant {
    let start = Instant::now();
    let mut seen = None;
    loop {
        let h = health(http);
        if h["ingest"]["role"] == role {
            seen.get_or_insert_with(Instant::now);
            let linked = h["sources"]
                .as_array()
                .is_some_and(|s| s.iter().all(|s| s["up"] == true));
            if role != "active" || linked {
                return seen.unwrap_or_else(Instant::now);
            }
        }
        assert!(
            start.elapsed() < deadline,
            "{http} ingest not {role} (with its source linked) within {deadline:?}: {h:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `n` identical QoS 0 readings and `n` identical QoS 1 readings
/// (repeats are readings of their own: a PIR saying "occupied" again),
/// then one distinct QoS 1 reading; returns how many were sent.
async fn repeated_readings(p: &mut Publisher, n: usize, last: u64) -> u64 {
    for _ in 0..n {
        p.publish_qos0("test/s0", r#"{"occupancy":true}"#).await;
        p.publish("test/s1", r#"{"occupancy":true}"#).await;
    }
    p.publish("test/s2", format!(r#"{{"occupancy":{}}}"#, last % 2 == 0))
        .await;
    (2 * n + 1) as u64
}

/// Waits until SENSORS holds exactly `want` readings and still does
/// after the survivor's `observations_stored` has caught up; fails at once
/// on more (a reading stored twice).
async fn stored_exactly(js: &async_nats::jetstream::Context, want: u64, what: &str) {
    let start = Instant::now();
    loop {
        let n = stream_messages(js, "SENSORS").await;
        assert!(
            n <= want,
            "{what}: {n} readings in SENSORS, {want} sent: a reading stored twice"
        );
        if n == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: {n} of {want} readings in SENSORS"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingest_instances_of_one_service_store_each_reading_once_and_the_survivor_keeps_all() {
    let s = ingest_pair().await;
    let mut a = Daemon::start_at(&s.cfg[0], &[]);
    a.wait_healthy(s.http[0], Duration::from_secs(20));
    wait_ingest(s.http[0], "active", Duration::from_secs(10));
    let mut b = Daemon::start_at(&s.cfg[1], &[]);
    b.wait_healthy(s.http[1], Duration::from_secs(20));
    wait_ingest(s.http[1], "standby", Duration::from_secs(10));

    // Both say they share the work: in the log, in /healthz, in status.
    a.wait_for_log(
        "source started: this instance holds the service's lease",
        Duration::from_secs(5),
    );
    b.wait_for_log(
        "source standing by: this service's ingest is shared with another instance",
        Duration::from_secs(5),
    );
    b.wait_for_log(
        "this one shares the work as its standby",
        Duration::from_secs(5),
    );
    let (ha, hb) = (health(s.http[0]), health(s.http[1]));
    assert_eq!(ha["status"], "healthy", "{ha:#}");
    assert_eq!(hb["status"], "healthy", "a standby is healthy: {hb:#}");
    assert!(
        ha["ingest"]["shared"]
            .as_str()
            .is_some_and(|t| t.contains("other instances of the service stand by")),
        "{ha:#}"
    );
    assert!(
        hb["ingest"]["shared"]
            .as_str()
            .is_some_and(|t| t.contains("shared with the instance holding the service's lease")),
        "{hb:#}"
    );
    assert!(
        hb["ingest"]["holder"]
            .as_str()
            .is_some_and(|h| h.ends_with(&format!("/{}", a.pid()))),
        "{hb:#}"
    );
    let out =
        support::daemon::run_presenced(&["status", "--config", s.cfg[1].to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("  ingest: standby since") && text.contains("shared with the instance"),
        "presenced status:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Readings at QoS 0 and 1, repeats included: each stored once.
    let mut p = Publisher::connect(s.broker.port, "ingest-pair-pub").await;
    let mut want = repeated_readings(&mut p, 50, 0).await;
    p.flush(Duration::from_secs(10)).await;
    stored_exactly(&s.admin, want, "two instances running").await;
    assert_eq!(
        health(s.http[1])["ingest"]["observations_stored"],
        0,
        "the standby read nothing"
    );

    // SIGKILL the active one while QoS 1 readings keep coming: the broker
    // keeps them in the session (one client id) for the survivor.
    let a_pid = a.pid();
    let sender = tokio::spawn(async move {
        for i in 0..100u64 {
            p.publish("test/s3", format!(r#"{{"occupancy":{}}}"#, i % 2 == 0))
                .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        p
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.kill9();
    let killed = Instant::now();
    let took = wait_ingest(s.http[1], "active", TTL + Duration::from_secs(5)) - killed;
    eprintln!("ingest takeover {took:?} after SIGKILL (TTL {TTL:?})");
    assert!(took <= TTL + Duration::from_secs(1), "{took:?}");
    let mut p = sender.await.unwrap();
    want += 100;
    want += repeated_readings(&mut p, 50, 1).await;
    p.flush(Duration::from_secs(10)).await;
    stored_exactly(&s.admin, want, "after the SIGKILL, on the survivor").await;
    b.wait_for_log("leader lease taken", Duration::from_secs(1));
    assert!(b.log().contains("runs=ingest"), "{}", b.log_tail());
    let hb = health(s.http[1]);
    assert_eq!(hb["ingest"]["takeovers"], 1, "{hb:#}");
    assert_takeover_audited(&s.admin, "ingest", a_pid, b.pid()).await;

    // The other way round, with AUDIT stalled: a takeover does not wait
    // for its AUDIT record. AUDIT made again with `no_ack`: it stores the
    // record and never acknowledges it, so the publish waits out its
    // timeout.
    a.restart();
    wait_ingest(s.http[0], "standby", Duration::from_secs(20));
    s.admin.delete_stream("AUDIT").await.unwrap();
    let audit = s
        .admin
        .create_stream(async_nats::jetstream::stream::Config {
            name: "AUDIT".into(),
            subjects: vec!["audit.events.test.>".into()],
            no_ack: true,
            ..Default::default()
        })
        .await
        .unwrap();
    b.kill9();
    let killed = Instant::now();
    let took = wait_ingest(s.http[0], "active", TTL + Duration::from_secs(5)) - killed;
    eprintln!("ingest takeover {took:?} after SIGKILL with AUDIT stalled");
    let subject = presenced::naming::Site::new("test")
        .unwrap()
        .audit_subject("ingest");
    eventually(
        "the takeover record stored in AUDIT",
        Duration::from_secs(5),
        || async {
            audit
                .get_last_raw_message_by_subject(&subject)
                .await
                .is_ok()
        },
    )
    .await;
    let stalled = audit
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    assert!(
        serde_json::from_slice::<presenced::store::leader::TakeoverRecord>(&stalled.payload)
            .is_ok_and(|r| r.to.ends_with(&format!("/{}", a.pid()))),
        "{stalled:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "the takeover waited for the stalled AUDIT write: {took:?}"
    );
    // The record's ack times out (the client's request timeout or the
    // keeper's own, both 2 s) long after the takeover; either way the
    // failure is logged.
    a.wait_for_log("takeover in AUDIT", Duration::from_secs(5));
    assert!(
        a.log().contains("leader lease taken\" says it)"),
        "{}",
        a.log_tail()
    );
    let mut p = Publisher::connect(s.broker.port, "ingest-pair-pub-2").await;
    want += repeated_readings(&mut p, 20, 2).await;
    p.flush(Duration::from_secs(10)).await;
    stored_exactly(&s.admin, want, "after the second SIGKILL").await;
}

/// The NixOS `standbyOf` shape: one instance runs ingest and the engine,
/// its standby the engine alone. After a takeover by the engine-only
/// standby, the restarted first instance stands by for the engine but
/// reads: the holder does not run ingest, so nobody else would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_only_holder_leaves_the_reading_to_the_instance_that_runs_ingest() {
    let broker = Mosquitto::start();
    let acl = AclSite::start(&[("main", "runs = [\"ingest\", \"engine\"]")]);
    let url = acl.url();
    provision(&acl.file(
        "admin.toml",
        &format!(
            "{}{}",
            head("admin", &acl.seed("admin"), &url, support::free_port()),
            zones()
        ),
    ));
    let ports = [support::free_port(), support::free_port()];
    let http = ports.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    let both = acl.file(
        "main.toml",
        &format!(
            "{}{}[mqtt.main]\nhost = \"127.0.0.1\"\nport = {}\nkeep_alive = \"5s\"\nreconnect_max = \"1s\"\n{}",
            head("main", &acl.seed("main"), &url, ports[0]),
            zones(),
            broker.port,
            motion_mapping(false)
        ),
    );
    let engine_only = acl.file(
        "main-standby.toml",
        &format!(
            "runs = [\"engine\"]\n{}{}",
            head("main", &acl.seed("main"), &url, ports[1]),
            zones()
        ),
    );
    let admin = acl.js("admin").await;
    let mut a = Daemon::start_at(&both, &[]);
    a.wait_healthy(http[0], Duration::from_secs(20));
    wait_ingest(http[0], "active", Duration::from_secs(10));
    let b = Daemon::start_at(&engine_only, &[]);
    b.wait_healthy(http[1], Duration::from_secs(20));
    wait_role(http[1], "standby", Duration::from_secs(10));
    let mut p = Publisher::connect(broker.port, "mixed-pub").await;
    let mut want = repeated_readings(&mut p, 10, 0).await;
    p.flush(Duration::from_secs(10)).await;
    stored_exactly(&admin, want, "the first instance reads").await;

    a.kill9();
    wait_role(http[1], "active", TTL + Duration::from_secs(5));
    a.restart();
    wait_role(http[0], "standby", Duration::from_secs(20));
    a.wait_for_log(
        "the lease holder does not run ingest, which this instance runs",
        Duration::from_secs(5),
    );
    a.wait_for_log(
        "source started: the instance holding the service's lease does not run ingest",
        Duration::from_secs(10),
    );
    a.wait_healthy(http[0], Duration::from_secs(20));
    let h = health(http[0]);
    assert!(
        h["ingest"]["shared"]
            .as_str()
            .is_some_and(|t| t.contains("the lease holder does not run ingest")),
        "{h:#}"
    );
    want += repeated_readings(&mut p, 10, 1).await;
    p.flush(Duration::from_secs(10)).await;
    stored_exactly(&admin, want, "the restarted first instance reads").await;
    eventually(
        "the engine-only holder applies them",
        Duration::from_secs(15),
        || async { engine_caught_up(&admin, want).await },
    )
    .await;
}

/// The ingest holder frozen (SIGSTOP) past its lease while QoS 1 and
/// QoS 0 readings keep coming: the standby takes the lease and the broker
/// session; the thawed holder sees it, stops its source and stands by.
/// Every QoS 1 reading is stored exactly once (QoS 0 ones sent while no
/// instance was subscribed may be dropped by the broker, never doubled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_holder_frozen_past_its_lease_hands_over_without_storing_a_reading_twice() {
    let s = ingest_pair().await;
    let a = Daemon::start_at(&s.cfg[0], &[]);
    a.wait_healthy(s.http[0], Duration::from_secs(20));
    wait_ingest(s.http[0], "active", Duration::from_secs(10));
    let b = Daemon::start_at(&s.cfg[1], &[]);
    b.wait_healthy(s.http[1], Duration::from_secs(20));
    wait_ingest(s.http[1], "standby", Duration::from_secs(10));

    let (qos1, qos0) = (800u64, 800u64);
    let port = s.broker.port;
    let sender = tokio::spawn(async move {
        let mut p = Publisher::connect(port, "frozen-ingest-pub").await;
        for i in 0..qos1 {
            // Identical payloads: repeats are readings.
            p.publish("test/s1", r#"{"occupancy":true}"#).await;
            p.publish_qos0("test/s0", r#"{"occupancy":true}"#).await;
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        p.flush(Duration::from_secs(30)).await;
        p
    });
    eventually("readings flowing", Duration::from_secs(10), || async {
        stream_messages(&s.admin, "SENSORS").await > 100
    })
    .await;
    signal(&a, libc::SIGSTOP);
    let frozen = Instant::now();
    let took = wait_ingest(s.http[1], "active", TTL + Duration::from_secs(5)) - frozen;
    eprintln!("ingest takeover {took:?} after SIGSTOP (TTL {TTL:?})");
    assert!(took <= TTL + Duration::from_secs(1), "{took:?}");
    let stored = stream_messages(&s.admin, "SENSORS").await;
    eventually(
        "the new holder stores readings",
        Duration::from_secs(10),
        || async { stream_messages(&s.admin, "SENSORS").await > stored + 50 },
    )
    .await;
    signal(&a, libc::SIGCONT);
    a.wait_for_log(
        "source stopped: another instance took the service's lease",
        Duration::from_secs(5),
    );
    wait_ingest(s.http[0], "standby", Duration::from_secs(5));
    let _p = sender.await.unwrap();
    // Everything the broker acknowledged reached the survivor: wait for
    // every QoS 1 reading, then check no reading of either kind twice.
    use futures::StreamExt;
    let js = s.admin.clone();
    let count = |subject: &'static str| {
        let js = js.clone();
        async move {
            let stream = js.get_stream("SENSORS").await.unwrap();
            let info = stream
                .info_with_subjects(subject)
                .await
                .unwrap()
                .next()
                .await;
            match info {
                Some(Ok((_, n))) => n as u64,
                _ => 0,
            }
        }
    };
    eventually(
        "every QoS 1 reading stored",
        Duration::from_secs(30),
        || async {
            let n = count("sensors.test.s1").await;
            assert!(
                n <= qos1,
                "{n} QoS 1 readings stored, {qos1} sent: one stored twice"
            );
            n == qos1
        },
    )
    .await;
    let n0 = count("sensors.test.s0").await;
    eprintln!("QoS 0: {n0} of {qos0} stored across the freeze");
    assert!(
        n0 <= qos0,
        "{n0} QoS 0 readings stored, {qos0} sent: one stored twice"
    );
    assert_eq!(health(s.http[1])["ingest"]["role"], "active");
}
