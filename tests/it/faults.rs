//! The fault campaign: real servers, the real binary, one fault per row.
//!
//! Every row starts a site (leaf nats-server, Mosquitto, the daemon, a
//! zone fed by one MQTT motion sensor, or a serial device), injects one
//! fault, and then holds the site to the same four promises:
//!
//! 1. the daemon is alive, or it exited non-zero with the cause in its log
//!    and was started again here as systemd's `Restart=on-failure` would;
//! 2. `/healthz` named the fault while it lasted (503 with a cause naming
//!    the component or source, or the detail field that covers it);
//! 3. no good reading was lost: every QoS 1 reading published before,
//!    during and after the fault is in `SENSORS` exactly once and the
//!    engine applied it to KV `presence` (QoS 0 readings count only from
//!    when the broker is back: a broker keeps no QoS 0 message);
//! 4. it recovered by itself: `/healthz` 200 again and readings flow.
//!
//! One test function per row, so nextest runs them side by side; the rows
//! that need exclusive resources say so in `.config/nextest.toml`.
//! docs/OPERATIONS.md "Failure modes" names the row behind each line.

use crate::common;
use crate::support;

use async_nats::jetstream;
use common::*;
use presenced::engine::Presence;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

const ZONES: &str = r#"
[zones.lab]
occupied_above = 0.6
arrive_after = "0s"
leave_after = "0s"
[[zones.lab.evidence]]
sensor = "lab_pir"
p_true = 0.95
p_false = 0.05

[zones.hall]
occupied_above = 0.6
arrive_after = "0s"
leave_after = "2s"
[[zones.hall.evidence]]
sensor = "hall_pir"
p_true = 0.95
p_false = 0.05
"#;

/// The `cause` of [`Site::supervise`] in rows where the daemon must not
/// exit at all: no log names it, so any exit fails the row.
const NO_EXIT: &str = "<the daemon was expected to keep running>";

/// How long a source link may be down before `/healthz` says degraded:
/// short, so rows see the fault named within seconds.
const GRACE: &str = "2s";

fn health(http: SocketAddr) -> Option<(u16, serde_json::Value)> {
    let (code, body) = support::http_get(http, "/healthz")?;
    Some((code, serde_json::from_str(&body).ok()?))
}

/// An MQTT publisher that may send messages up to MQTT's maximum size and
/// counts the broker's PUBACKs; it keeps its session and queues publishes
/// while the broker is away, as a well-behaved sensor gateway does.
struct Pub {
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    sent: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Pub {
    fn connect(port: u16, login: Option<(&str, &str)>) -> Pub {
        let mut opts = MqttOptions::new("fault-pub", "127.0.0.1", port);
        if let Some((user, password)) = login {
            opts.set_credentials(user, password);
        }
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(false);
        opts.set_inflight(1000);
        opts.set_max_packet_size(300 << 20, 300 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let acked = Arc::new(AtomicU64::new(0));
        let a = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Pub {
            client,
            acked,
            sent: 0,
            task,
        }
    }

    async fn publish(&mut self, qos: QoS, payload: Vec<u8>) {
        self.publish_to("test/lab_pir", qos, payload).await;
    }

    async fn publish_to(&mut self, topic: &str, qos: QoS, payload: Vec<u8>) {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .expect("queue MQTT publish");
        if qos == QoS::AtLeastOnce {
            self.sent += 1;
        }
    }

    async fn flush(&self, deadline: Duration) {
        eventually("the broker acked every publish", deadline, || async {
            self.acked.load(Ordering::Relaxed) >= self.sent
        })
        .await;
    }
}

impl Drop for Pub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a row changes in the standard site.
#[derive(Default)]
struct Setup {
    nats: NatsOptions,
    /// Mosquitto config lines (see [`Mosquitto::start_with`]).
    mosquitto: String,
    /// Lines added to `[mqtt.main]`.
    source_extra: String,
    /// Lines added to `[ingest]`.
    ingest_extra: String,
    /// Raw TOML appended to the daemon config.
    daemon_extra: String,
    /// Environment of the daemon process.
    env: Vec<(String, String)>,
    /// The broker requires a login; the daemon reads its password from
    /// `password_file` ([`Site::secret`]).
    mqtt_login: bool,
    /// Size of a tmpfs mounted as the leaf's JetStream store (`16m`).
    store_tmpfs: Option<&'static str>,
}

/// One site under test, and the bookkeeping of what must be kept.
struct Site {
    nats: NatsServer,
    /// Unmounted after the leaf is gone (fields drop in order).
    _tmpfs: Option<Tmpfs>,
    mqtt: Mosquitto,
    http: SocketAddr,
    daemon: Daemon,
    js: jetstream::Context,
    publisher: Pub,
    /// The value of the last good reading published.
    last: bool,
    /// QoS 0 good readings published while the broker was up.
    qos0: u64,
    /// Good readings sent by a serial device while it was plugged in.
    serial: u64,
    /// Exits the "supervisor" saw and restarted from.
    restarts: Vec<String>,
    /// The daemon's MQTT password file (with [`Setup::mqtt_login`]).
    secret: PathBuf,
    /// Config, secrets; outlives the daemon's restarts.
    _dir: tempfile::TempDir,
}

impl Site {
    async fn start(setup: Setup) -> Site {
        let mut nats = NatsServer::start(setup.nats);
        let tmpfs = setup.store_tmpfs.map(|size| {
            nats.stop();
            let t = Tmpfs::mount(&nats.store_dir, size);
            nats.start_again();
            t
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = dir.path().join("mqtt-password");
        let mut mosquitto = setup.mosquitto.clone();
        let mut source_extra = setup.source_extra.clone();
        if setup.mqtt_login {
            let users = dir.path().join("mosquitto-users");
            let out = Command::new("mosquitto_passwd")
                .args(["-b", "-c"])
                .arg(&users)
                .args(["presenced", "s3cret-pw"])
                .output()
                .expect("run mosquitto_passwd");
            assert!(out.status.success(), "{out:?}");
            std::fs::write(&secret, "s3cret-pw\n").expect("write the password file");
            mosquitto.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                users.display()
            ));
            source_extra.push_str(&format!(
                "username = \"presenced\"\npassword_file = {:?}\n",
                secret.display().to_string()
            ));
        }
        let mqtt = Mosquitto::start_with(&mosquitto);
        let http_port = support::free_port();
        let cfg = format!(
            "{}\n[health]\nsource_grace = \"{GRACE}\"\n\n{}",
            daemon_config(
                "test",
                &nats.url(),
                mqtt.port,
                http_port,
                &format!("{source_extra}\n{}", motion_mapping(false)),
                ZONES
            ),
            setup.daemon_extra
        )
        .replace(
            "reject_log_every = \"1s\"\n",
            &format!("reject_log_every = \"1s\"\n{}\n", setup.ingest_extra),
        );
        let path = dir.path().join("presenced.toml");
        std::fs::write(&path, cfg).expect("write config");
        provision(&path);
        let env: Vec<(&str, &str)> = setup
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let daemon = Daemon::start_at(&path, &env);
        let http = SocketAddr::from(([127, 0, 0, 1], http_port));
        daemon.wait_healthy(http, Duration::from_secs(20));
        let js = jetstream(&nats.url()).await;
        let publisher = Pub::connect(
            mqtt.port,
            setup.mqtt_login.then_some(("presenced", "s3cret-pw")),
        );
        let mut site = Site {
            nats,
            _tmpfs: tmpfs,
            mqtt,
            http,
            daemon,
            js,
            publisher,
            last: false,
            qos0: 0,
            serial: 0,
            restarts: Vec::new(),
            secret,
            _dir: dir,
        };
        // The daemon has subscribed once a reading comes through.
        site.reading().await;
        site.all_kept(Duration::from_secs(15)).await;
        site
    }

    /// One good QoS 1 reading, the opposite of the last.
    async fn reading(&mut self) {
        self.last = !self.last;
        let payload = format!(r#"{{"occupancy":{}}}"#, self.last);
        self.publisher
            .publish(QoS::AtLeastOnce, payload.into_bytes())
            .await;
    }

    /// One good QoS 0 reading, the opposite of the last.
    async fn reading_qos0(&mut self) {
        self.last = !self.last;
        let payload = format!(r#"{{"occupancy":{}}}"#, self.last);
        self.publisher
            .publish(QoS::AtMostOnce, payload.into_bytes())
            .await;
        self.qos0 += 1;
    }

    /// One good reading from a serial device (JSON lines), the opposite of
    /// the last.
    fn serial_reading(&mut self, master: &mut std::fs::File) {
        self.last = !self.last;
        let line = format!("{{\"sensor\":\"lab_pir\",\"value\":{}}}\r\n", self.last);
        support::pty::send(master, line.as_bytes());
        self.serial += 1;
    }

    /// Restart=on-failure: a daemon that exited non-zero is started again
    /// (its cause must be in the log); one that exited 0 is a failure of
    /// the row, since systemd would leave it stopped.
    fn supervise(&mut self, cause: &str) {
        if let Some(status) = self.daemon.exit_status() {
            assert!(
                !status.success(),
                "the daemon exited 0 during a fault: systemd would not restart it; log:\n{}",
                self.daemon.log_tail()
            );
            // The cause is in what this run logged last.
            let tail = self.daemon.log_tail();
            let line = tail
                .lines()
                .rev()
                .find(|l| l.contains("ERROR") || l.contains("Error"))
                .unwrap_or_else(|| panic!("exit {status} without an error logged:\n{tail}"))
                .to_owned();
            assert!(
                tail.contains(cause),
                "the log of the exit does not name {cause:?}:\n{tail}"
            );
            self.restarts.push(line);
            self.daemon.restart();
        }
    }

    /// Waits until `/healthz` answers 503 with a cause containing `cause`
    /// (or, with `field`, until that JSON pointer equals `value`), while
    /// supervising; returns the health body that named the fault.
    fn fault_named(
        &mut self,
        cause: &str,
        field: Option<(&str, serde_json::Value)>,
        deadline: Duration,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            self.supervise(cause);
            if let Some((code, h)) = health(self.http) {
                let named = match &field {
                    Some((pointer, value)) => h.pointer(pointer) == Some(value),
                    None => {
                        code == 503
                            && cause
                                .split('|')
                                .any(|c| h["causes"].to_string().contains(c))
                    }
                };
                if named {
                    return h;
                }
            }
            assert!(
                start.elapsed() < deadline,
                "/healthz never named {cause:?} within {deadline:?}: {:?}; log:\n{}",
                health(self.http),
                self.daemon.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `/healthz` is 200 again, supervising meanwhile.
    fn healthy_again(&mut self, cause: &str, deadline: Duration) {
        let start = Instant::now();
        loop {
            self.supervise(cause);
            if let Some((200, _)) = health(self.http) {
                return;
            }
            assert!(
                start.elapsed() < deadline,
                "not healthy again within {deadline:?}: {:?}; log:\n{}",
                health(self.http),
                self.daemon.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every good reading is in SENSORS exactly once and applied to KV
    /// `presence`: the count matches what the broker acknowledged (plus
    /// the QoS 0 readings that count), the engine consumer has nothing
    /// pending, and the zone shows the last reading.
    async fn all_kept(&self, deadline: Duration) {
        self.publisher.flush(deadline).await;
        let want = self.publisher.sent + self.qos0 + self.serial;
        let start = Instant::now();
        loop {
            let stored = stream_messages(&self.js, "SENSORS").await;
            assert!(
                stored <= want,
                "{stored} readings in SENSORS, only {want} published: duplicates"
            );
            let zone = zone(&self.js, "lab").await;
            let want_state = if self.last {
                Presence::Occupied
            } else {
                Presence::Vacant
            };
            if stored == want
                && engine_caught_up(&self.js, want).await
                && zone
                    .as_ref()
                    .is_some_and(|z| z.state == want_state && z.last_seq == want)
            {
                return;
            }
            assert!(
                start.elapsed() < deadline,
                "{stored} of {want} readings in SENSORS, zone {zone:?} (want {want_state:?} at seq {want}); log:\n{}",
                self.daemon.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Promise 4: healthy, and a fresh reading goes all the way.
    async fn recovered(&mut self, cause: &str) {
        self.healthy_again(cause, Duration::from_secs(60));
        self.reading().await;
        self.all_kept(Duration::from_secs(30)).await;
        assert!(
            !self.daemon.log().contains("panicked"),
            "{}",
            self.daemon.log_tail()
        );
    }
}

/// Row 1: oversized MQTT payloads. tests/it/bad_input.rs runs the whole
/// matrix (1, 2 and 16 MiB at QoS 0 and 1, what REJECTED keeps); here the
/// two cheapest sizes ride along with readings to show nothing good is
/// lost around them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row1_oversized_payloads_are_rejected_and_nothing_good_is_lost() {
    let mut s = Site::start(Setup::default()).await;
    s.reading().await;
    s.publisher
        .publish(QoS::AtMostOnce, vec![b'{'; 1 << 20])
        .await;
    s.reading_qos0().await;
    s.publisher
        .publish(QoS::AtLeastOnce, vec![b'{'; 2 << 20])
        .await;
    // The oversized QoS 1 message is acknowledged but not a reading.
    s.publisher.sent -= 1;
    s.reading().await;
    // Acked count includes the oversized one: wait for all three PUBACKs.
    eventually(
        "the broker acked the QoS 1 ones",
        Duration::from_secs(30),
        || async { s.publisher.acked.load(Ordering::Relaxed) > s.publisher.sent },
    )
    .await;
    eventually(
        "two records in REJECTED",
        Duration::from_secs(30),
        || async { stream_messages(&s.js, "REJECTED").await == 2 },
    )
    .await;
    let h = s.fault_named(
        "rejects",
        Some(("/ingest/rejects", serde_json::json!(2))),
        Duration::from_secs(5),
    );
    assert_eq!(
        h["status"], "healthy",
        "bad input is not a fault of the site: {h:#}"
    );
    assert!(s.daemon.is_running());
    s.all_kept(Duration::from_secs(30)).await;
    s.recovered(NO_EXIT).await;
}

/// Row 2: the broker killed (SIGKILL) and started again. Mosquitto runs
/// with persistence, as a deployed broker should, so the daemon's
/// persistent session (and its subscription) survives the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row2_mqtt_broker_killed_and_restarted() {
    let store = tempfile::tempdir().unwrap();
    let mut s = Site::start(Setup {
        mosquitto: persistent_broker(store.path()),
        ..Default::default()
    })
    .await;
    // Let the broker save the daemon's session before the crash.
    broker_saved_session(store.path());
    s.mqtt.kill();
    // Readings while the broker is away stay with the publisher.
    s.reading().await;
    s.reading().await;
    s.fault_named(
        "source main (mqtt) link down",
        None,
        Duration::from_secs(15),
    );
    assert!(s.daemon.is_running(), "{}", s.daemon.log_tail());
    s.mqtt.restart();
    s.reading().await;
    s.recovered("source.mqtt.main").await;
    // QoS 0 readings count from when the broker is back and the daemon
    // is subscribed (healthy) again.
    s.reading_qos0().await;
    s.reading().await;
    s.all_kept(Duration::from_secs(30)).await;
    assert!(s.restarts.is_empty(), "{:?}", s.restarts);
    let log = s.daemon.log();
    assert_eq!(
        log.matches("MQTT broker unreachable; retrying").count(),
        1,
        "one warning per outage:\n{log}"
    );
}

/// A tmpfs of a fixed size mounted on a directory; unmounted (and the
/// directory removed) on `Drop`.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs (the row needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// Sends SIGCONT to a stopped process when dropped, so a failing row never
/// leaves a frozen server behind.
struct Frozen(libc::pid_t);

impl Frozen {
    fn freeze(pid: u32) -> Frozen {
        let pid = libc::pid_t::try_from(pid).expect("a pid");
        // SAFETY: kill(2) on our own child; no memory is touched.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

/// Row 3: the leaf frozen with SIGSTOP for 30 s (a hung server: the TCP
/// connection stays open, nothing answers), then SIGCONT. Readings keep
/// coming once a second throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row3_leaf_frozen_30s_then_continued() {
    let mut s = Site::start(Setup::default()).await;
    let frozen = Frozen::freeze(s.nats.pid());
    let start = Instant::now();
    let mut named = None;
    while start.elapsed() < Duration::from_secs(30) {
        s.reading().await;
        s.supervise(NO_EXIT);
        if let Some((503, h)) = health(s.http) {
            if named.is_none()
                && h["causes"]
                    .to_string()
                    .contains("ingest cannot store input in SENSORS")
            {
                named = Some((start.elapsed(), h));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (after, h) = named.unwrap_or_else(|| {
        panic!(
            "/healthz never named the stalled ingest: {:?}",
            health(s.http)
        )
    });
    assert!(
        after < Duration::from_secs(10),
        "named only after {after:?}"
    );
    eprintln!("row 3: /healthz named the stalled ingest {after:?} into the freeze");
    assert_eq!(h["status"], "down", "{h:#}");
    assert!(h["ingest"]["buffer_depth"].is_u64(), "{h:#}");
    assert!(s.daemon.is_running(), "{}", s.daemon.log_tail());
    drop(frozen);
    let continued = Instant::now();
    s.recovered(NO_EXIT).await;
    eprintln!(
        "row 3: {} readings kept; healthy and caught up {:?} after SIGCONT",
        s.publisher.sent,
        continued.elapsed()
    );
    assert!(s.restarts.is_empty(), "{:?}", s.restarts);
    let log = s.daemon.log();
    assert!(log.contains("stream SENSORS reachable again"), "{log}");
}

/// Mosquitto lines for a broker that keeps sessions across a crash, as a
/// deployed one should (saved every second).
/// Waits until Mosquitto has written its persistence file twice after
/// this call, so the daemon's session (subscribed before the call) is on
/// disk. A fixed sleep is not enough on a loaded machine: a broker killed
/// before its autosave comes back without the session, and the readings
/// sent before the daemon subscribes again are dropped by the broker.
fn broker_saved_session(dir: &Path) {
    let db = dir.join("mosquitto.db");
    let modified = || std::fs::metadata(&db).and_then(|m| m.modified()).ok();
    let mut seen = modified();
    let mut saves = 0;
    let start = Instant::now();
    while saves < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "Mosquitto did not save {} twice within 20 s",
            db.display()
        );
        std::thread::sleep(Duration::from_millis(50));
        let now = modified();
        if now.is_some() && now != seen {
            saves += 1;
            seen = now;
        }
    }
}

fn persistent_broker(dir: &Path) -> String {
    format!(
        "persistence true\npersistence_location {}/\nautosave_interval 1\n",
        dir.display()
    )
}

/// Row 8: the MQTT password file removed while the daemon runs, then a
/// reconnect forced (the broker restarted). Decided behaviour: secrets are
/// read once, at start; the running daemon keeps the credential it read
/// and reconnects with it. The next start (a reboot, a crash) fails loudly
/// naming the file, exits non-zero, and is healthy again as soon as the
/// file is back; the broker's session holds the readings meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row8_secret_file_removed_while_running() {
    let store = tempfile::tempdir().unwrap();
    let mut s = Site::start(Setup {
        mqtt_login: true,
        mosquitto: persistent_broker(store.path()),
        ..Default::default()
    })
    .await;
    broker_saved_session(store.path());
    std::fs::remove_file(&s.secret).unwrap();
    s.mqtt.stop();
    s.reading().await;
    s.fault_named(
        "source main (mqtt) link down",
        None,
        Duration::from_secs(15),
    );
    s.mqtt.restart();
    s.recovered(NO_EXIT).await;
    assert!(s.restarts.is_empty(), "{:?}", s.restarts);
    assert!(s.daemon.is_running());

    // The next start cannot read the secret: it says so and exits
    // non-zero, never healthy; systemd would retry it.
    s.daemon.restart();
    let start = Instant::now();
    let status = loop {
        if let Some((code, h)) = health(s.http) {
            assert_ne!(code, 200, "healthy without its secret: {h:#}");
        }
        if let Some(status) = s.daemon.exit_status() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{}",
            s.daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "{status:?}");
    let tail = s.daemon.log_tail();
    let want = format!(
        "mqtt.main.password_file: cannot read {}",
        s.secret.display()
    );
    assert!(tail.contains(&want), "{tail}");
    // Readings meanwhile wait in the broker's session.
    s.reading().await;
    s.reading().await;

    // The file back: the next restart is healthy and nothing was lost.
    std::fs::write(&s.secret, "s3cret-pw\n").unwrap();
    s.daemon.restart();
    s.recovered(NO_EXIT).await;
}

/// Row 7: a serial device unplugged (the pty closed and its stable link
/// removed, as udev does) and replugged (a new pty behind the same link).
/// The MQTT source goes on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row7_serial_device_unplugged_and_replugged() {
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("usb-Espressif_ESP32-if00");
    let first = support::pty::Pty::open();
    first.link_at(&link);
    let mut s = Site::start(Setup {
        daemon_extra: format!(
            "[serial.esp]\ndevice = {:?}\nframing = \"json_lines\"\nreconnect_max = \"200ms\"\n",
            link.display().to_string()
        ),
        ..Default::default()
    })
    .await;
    s.daemon
        .wait_for_log("serial device open", Duration::from_secs(10));
    let mut master = first.master();
    s.serial_reading(&mut master);
    s.all_kept(Duration::from_secs(15)).await;

    // Unplug.
    drop(master);
    drop(first);
    std::fs::remove_file(&link).unwrap();
    let h = s.fault_named(
        "source esp (serial) link down",
        None,
        Duration::from_secs(15),
    );
    assert_eq!(h["status"], "degraded", "{h:#}");
    // The other source is unaffected.
    s.reading().await;
    s.all_kept(Duration::from_secs(15)).await;
    assert!(s.daemon.is_running());

    // Replug behind the same link.
    let second = support::pty::Pty::open();
    second.link_at(&link);
    s.daemon
        .wait_for_log("serial device back", Duration::from_secs(15));
    s.healthy_again(NO_EXIT, Duration::from_secs(15));
    let mut master = second.master();
    s.serial_reading(&mut master);
    s.all_kept(Duration::from_secs(15)).await;
    s.recovered(NO_EXIT).await;
    assert!(s.restarts.is_empty(), "{:?}", s.restarts);
    assert_eq!(stream_messages(&s.js, "REJECTED").await, 0);
}

/// Row 4: the leaf's JetStream store runs out of space (an 8 MiB tmpfs
/// as its store dir, filled by another writer), while readings keep
/// coming. nats-server keeps a stream's write error after space is freed
/// (seen with 2.15.1: `no space left on device` on every write until a
/// restart), so the operator frees space and restarts the leaf; the daemon
/// needs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row4_leaf_store_out_of_space() {
    let mut s = Site::start(Setup {
        store_tmpfs: Some("8m"),
        ..Default::default()
    })
    .await;
    let filler = s.nats.store_dir.join("filler");
    // dd stops with ENOSPC once the tmpfs is full: that is the point.
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .arg("bs=64k")
        .output()
        .expect("run dd");
    // Readings until the full store shows (the first few still fit in
    // pages the streams' files already hold).
    let start = Instant::now();
    let h = loop {
        s.reading().await;
        s.supervise(NO_EXIT);
        if let Some((503, h)) = health(s.http) {
            break h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never unhealthy with a full store: {:?}",
            health(s.http)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let causes = h["causes"].to_string();
    assert!(
        causes.contains("engine cannot commit transitions")
            || causes.contains("ingest cannot store input in SENSORS"),
        "{h:#}"
    );
    assert_eq!(h["status"], "down", "{h:#}");
    assert!(s.nats.log().contains("no space left on device"));
    // Both writers stall and say so; readings keep coming meanwhile.
    for _ in 0..5 {
        s.reading().await;
    }
    s.fault_named("engine cannot commit", None, Duration::from_secs(20));
    s.fault_named(
        "ingest cannot store input in SENSORS",
        None,
        Duration::from_secs(20),
    );
    assert!(s.daemon.is_running(), "{}", s.daemon.log_tail());

    // The operator frees space and restarts the leaf.
    std::fs::remove_file(&filler).unwrap();
    s.nats.restart();
    s.recovered(NO_EXIT).await;
    assert!(s.restarts.is_empty(), "{:?}", s.restarts);
}

/// Polls `/healthz` until the JSON pointer `field` satisfies `check`,
/// with the daemon still running.
fn health_field(
    s: &mut Site,
    field: &str,
    what: &str,
    deadline: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        s.supervise(NO_EXIT);
        if let Some((_, h)) = health(s.http) {
            if h.pointer(field).is_some_and(&check) {
                return h;
            }
        }
        assert!(
            start.elapsed() < deadline,
            "{what}: {field} never did within {deadline:?}: {:?}; log:\n{}",
            health(s.http),
            s.daemon.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Row 6: the S3 endpoint stalls (a proxy in front of SeaweedFS accepts
/// and never answers), then returns errors (SeaweedFS stopped), then
/// comes back. Snapshots are taken every 2 s; S3 timeout 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row6_s3_endpoint_stalls_then_fails() {
    let mut weed = support::Seaweed::start();
    let proxy = support::Proxy::start(
        weed.endpoint()
            .trim_start_matches("http://")
            .parse()
            .expect("a socket address"),
    );
    let keys = tempfile::tempdir().unwrap();
    let s3 = weed
        .config_section(keys.path(), "faults")
        .replace(
            &weed.endpoint(),
            &format!("http://127.0.0.1:{}", proxy.port),
        )
        .replace("timeout = \"10s\"", "timeout = \"2s\"");
    let mut s = Site::start(Setup {
        daemon_extra: format!(
            "[archive]\nevery = \"2s\"\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n{s3}"
        ),
        ..Default::default()
    })
    .await;
    let uploaded = |h: &serde_json::Value| h.as_u64().unwrap_or(0);
    let first = health_field(
        &mut s,
        "/archive/last_upload_unix",
        "a first upload",
        Duration::from_secs(30),
        |v| uploaded(v) > 0,
    );
    assert_eq!(first["archive"]["s3_ok"], true, "{first:#}");

    for (fault, inject) in [("stall", 0), ("errors", 1)] {
        if inject == 0 {
            proxy.stall();
        } else {
            weed.stop();
        }
        let h = health_field(
            &mut s,
            "/archive/s3_ok",
            fault,
            Duration::from_secs(30),
            |v| v == false,
        );
        let failures = h["archive"]["upload_failures"].as_u64().unwrap_or(0);
        assert!(failures > 0, "{h:#}");
        // The pipeline does not wait for S3.
        assert_eq!(
            h["status"], "healthy",
            "S3 is detail, not the site's health: {h:#}"
        );
        s.reading().await;
        s.all_kept(Duration::from_secs(15)).await;
        let pending = health_field(
            &mut s,
            "/archive/pending",
            "snapshots wait",
            Duration::from_secs(15),
            |v| v.as_u64() > Some(0),
        );
        assert!(s.daemon.is_running());
        // Back.
        let before = uploaded(&pending["archive"]["last_upload_unix"]);
        if inject == 0 {
            proxy.restore();
        } else {
            weed.restart();
        }
        health_field(
            &mut s,
            "/archive/s3_ok",
            "S3 back",
            Duration::from_secs(60),
            |v| v == true,
        );
        let h = health_field(
            &mut s,
            "/archive/pending",
            "backlog uploaded",
            Duration::from_secs(60),
            |v| v.as_u64() == Some(0),
        );
        assert!(
            uploaded(&h["archive"]["last_upload_unix"]) >= before,
            "{h:#}"
        );
    }
    s.recovered(NO_EXIT).await;
    assert!(s.restarts.is_empty(), "{:?}", s.restarts);
}

/// `$LIBFAKETIME`, else the multi-threaded libfaketime that Debian's
/// `faketime` package installs under `/usr/lib/<triplet>/faketime/`.
fn libfaketime() -> PathBuf {
    if let Some(path) = std::env::var_os("LIBFAKETIME") {
        return PathBuf::from(path);
    }
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("libfaketime not found: run scripts/setup.sh (apt faketime)"))
}

/// The daemon's own clock, stepped through libfaketime: its
/// `FAKETIME_TIMESTAMP_FILE` holds an offset from the real clock that
/// every `clock_gettime(CLOCK_REALTIME)` of the daemon re-reads
/// (`FAKETIME_NO_CACHE=1`); `CLOCK_MONOTONIC` stays real
/// (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as in a real step of the system
/// clock. Nothing else on the machine sees the change.
struct FakeClock {
    lib: PathBuf,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl FakeClock {
    fn new() -> FakeClock {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("faketime");
        std::fs::write(&file, "+0\n").unwrap();
        FakeClock {
            lib: libfaketime(),
            file,
            _dir: dir,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.lib.display().to_string()),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.file.display().to_string(),
            ),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    }

    /// Sets the daemon's clock to real time plus `offset` (`+1d`, `-1h`).
    fn step(&self, offset: &str) {
        std::fs::write(&self.file, format!("{offset}\n")).unwrap();
    }
}

/// Row 5: the system clock stepped, as the daemon sees it (libfaketime;
/// the machine's clock is not touched, nats-server and the test keep real
/// time): a day forward, then 20 s back. Readings carry no device time
/// (the daemon stamps them), as most Zigbee2MQTT and Home Assistant
/// sensors. Zone `hall` leaves after a 2 s debounce. `/healthz` names a
/// step back once zone clocks lead the system clock by more than
/// `ingest.max_clock_skew` (device times may lead that much): 10 s here,
/// 5 min by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row5_clock_stepped_forward_then_back() {
    let clock = FakeClock::new();
    let mut s = Site::start(Setup {
        env: clock.env(),
        ingest_extra: "max_clock_skew = \"10s\"".into(),
        ..Default::default()
    })
    .await;

    // A day forward: readings are stamped a day ahead; zones follow.
    clock.step("+86400s");
    s.daemon
        .wait_for_log("the system clock was stepped", Duration::from_secs(15));
    let hall = |on: bool| format!(r#"{{"occupancy":{on}}}"#).into_bytes();
    s.publisher
        .publish_to("test/hall_pir", QoS::AtLeastOnce, hall(false))
        .await;
    s.reading().await;
    s.reading().await;
    s.all_kept(Duration::from_secs(15)).await;
    let (code, h) = health(s.http).unwrap();
    assert_eq!(code, 200, "{h:#}");

    // 20 s back: zone clocks stay ahead of the system clock; health says
    // so while it lasts.
    clock.step("+86380s");
    let h = s.fault_named("zone clock", None, Duration::from_secs(15));
    assert_eq!(h["status"], "degraded", "{h:#}");
    assert!(
        h["causes"]
            .to_string()
            .contains("ahead of the system clock"),
        "{h:#}"
    );
    // Readings are still applied (at the zone's clock), none is lost.
    s.reading().await;
    s.reading().await;
    s.all_kept(Duration::from_secs(15)).await;
    // A debounce timer set now fires late by what the clock lost.
    s.publisher
        .publish_to("test/hall_pir", QoS::AtLeastOnce, hall(true))
        .await;
    s.publisher
        .publish_to("test/hall_pir", QoS::AtLeastOnce, hall(false))
        .await;
    s.reading().await;
    s.all_kept(Duration::from_secs(15)).await;
    let left_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let h = zone(&s.js, "hall").await.unwrap();
    assert_eq!(
        h.state,
        Presence::Leaving,
        "a 2 s debounce fired on time: {h:?}"
    );

    // The system clock catches up: healthy again by itself, the timer
    // fired, readings flow.
    s.healthy_again(NO_EXIT, Duration::from_secs(40));
    eventually("hall vacant", Duration::from_secs(30), || async {
        zone(&s.js, "hall")
            .await
            .is_some_and(|z| z.state == Presence::Vacant)
    })
    .await;
    assert!(
        left_at.elapsed() > Duration::from_secs(10),
        "the debounce fired after {:?}",
        left_at.elapsed()
    );
    eprintln!(
        "row 5: a 2 s debounce set after a 20 s step back fired within {:?}",
        left_at.elapsed()
    );
    s.recovered(NO_EXIT).await;
    assert!(s.restarts.is_empty(), "{:?}", s.restarts);
}
