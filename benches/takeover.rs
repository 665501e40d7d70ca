//! Engine failover benchmark (issue 15's "Speed"): takeover time after a
//! SIGKILL (same PID namespace: the dead-process shortcut; another PID
//! namespace: the lease lapse) and after a freeze (SIGSTOP), and the
//! engine's rate over a backlog of readings with and without a standby
//! following it, all in one run against a real nats-server.
//!
//! `cargo bench --bench takeover`; the size comes from the environment so
//! a small run checks the bench itself: `PRESENCED_BENCH_TAKEOVER_READINGS`
//! (default 200,000), `PRESENCED_BENCH_TAKEOVER_ZONES` (default 100) and
//! `PRESENCED_BENCH_TAKEOVER_TTL_S` (lease TTL, default 3). See
//! docs/PERFORMANCE.md.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use async_nats::jetstream::{self, message::PublishMessage};
use common::*;
use presenced::observation::{Observation, Reading, OBSERVATION_SCHEMA};
use presenced::store::publish::publish_all;
use presenced::time::Timestamp;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{Daemon, NatsOptions, NatsServer};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

struct Bench {
    readings: u64,
    zones: u64,
    ttl: u64,
}

/// One leaf with the site provisioned and two engine-only configs of one
/// service (each its own HTTP port).
struct Leaf {
    nats: NatsServer,
    js: jetstream::Context,
    _dir: tempfile::TempDir,
    cfg: [PathBuf; 2],
    http: [SocketAddr; 2],
}

fn config(b: &Bench, url: &str, http: u16) -> String {
    let mut text = format!(
        "site = \"bench\"\nservice = \"engine\"\nruns = [\"engine\"]\n\n[nats]\nurl = \"{url}\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n[lease]\nttl = \"{}s\"\n\n",
        b.ttl
    );
    for z in 0..b.zones {
        text.push_str(&format!(
            "[zones.z{z}]\narrive_after = \"0s\"\nleave_after = \"0s\"\nevidence = [{{ sensor = \"s{z}\", p_true = 0.95, p_false = 0.05 }}]\n\n"
        ));
    }
    text
}

async fn leaf(b: &Bench) -> Leaf {
    let nats = NatsServer::start(NatsOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = [support::free_port(), support::free_port()];
    let cfg = [0, 1].map(|i| {
        let p = dir.path().join(format!("engine-{i}.toml"));
        std::fs::write(&p, config(b, &nats.url(), ports[i])).expect("config");
        p
    });
    provision(&cfg[0]);
    let js = jetstream(&nats.url()).await;
    Leaf {
        nats,
        js,
        _dir: dir,
        cfg,
        http: ports.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
    }
}

fn role(http: SocketAddr) -> String {
    support::http_get(http, "/healthz")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|v| v["engine"]["role"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// When `http` first reports `want`, polled every 2 ms.
fn wait_role(http: SocketAddr, want: &str, deadline: Duration) -> Instant {
    let start = Instant::now();
    loop {
        if role(http) == want {
            return Instant::now();
        }
        assert!(
            start.elapsed() < deadline,
            "{http} not {want} within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn start(path: &Path, http: SocketAddr, want: &str) -> Daemon {
    let d = Daemon::start_at(path, &[("RUST_LOG", "warn")]);
    d.wait_healthy(http, Duration::from_secs(60));
    wait_role(http, want, Duration::from_secs(30));
    d
}

/// `n` readings into SENSORS (pipelined), round robin over the zones'
/// sensors, each zone alternating so every reading is a transition.
async fn publish(js: &jetstream::Context, b: &Bench, from: u64, n: u64) {
    let now = Timestamp::now();
    let msgs: Vec<_> = (from..from + n)
        .map(|i| {
            let z = i % b.zones;
            let obs = Observation {
                v: OBSERVATION_SCHEMA,
                sensor: format!("s{z}"),
                value: Reading::Bool((i / b.zones) % 2 == 0),
                observed_at: Timestamp(now.0 + i as i64),
                id: format!("bench-{i}"),
                source: "bench".into(),
                delivery: None,
            };
            (
                format!("sensors.bench.s{z}"),
                PublishMessage::build()
                    .payload(serde_json::to_vec(&obs).expect("json").into())
                    .message_id(obs.id.clone()),
            )
        })
        .collect();
    let results = publish_all(js, msgs).await;
    assert!(results.iter().all(|r| r.is_ok()), "publish into SENSORS");
}

/// Readings per second the active engine applies over a backlog of
/// `b.readings`, with or without a standby following it.
async fn rate(b: &Bench, standby: bool) -> f64 {
    let l = leaf(b).await;
    let _a = start(&l.cfg[0], l.http[0], "active");
    let _b = standby.then(|| start(&l.cfg[1], l.http[1], "standby"));
    publish(&l.js, b, 0, b.readings).await;
    let t = Instant::now();
    while !engine_caught_up(&l.js, b.readings).await {
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "engine did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = &l.nats;
    b.readings as f64 / t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let b = Bench {
        readings: env("PRESENCED_BENCH_TAKEOVER_READINGS", 200_000),
        zones: env("PRESENCED_BENCH_TAKEOVER_ZONES", 100),
        ttl: env("PRESENCED_BENCH_TAKEOVER_TTL_S", 3),
    };
    println!(
        "presenced engine failover benchmark ({} readings, {} zones, lease TTL {} s; nats-server on this host)\n",
        b.readings, b.zones, b.ttl
    );

    let alone = rate(&b, false).await;
    let beside = rate(&b, true).await;
    println!("rate  engine alone:                 {alone:>9.0} readings/s");
    println!(
        "rate  engine with a standby:        {beside:>9.0} readings/s  ({:+.1}%)",
        (beside / alone - 1.0) * 100.0
    );

    // Takeovers on one leaf, with state to take over.
    let l = leaf(&b).await;
    let mut a = start(&l.cfg[0], l.http[0], "active");
    publish(&l.js, &b, 0, b.readings.min(10_000)).await;
    let mut s = start(&l.cfg[1], l.http[1], "standby");

    a.kill9();
    let t = Instant::now();
    let took = wait_role(l.http[1], "active", Duration::from_secs(b.ttl + 10)) - t;
    println!(
        "takeover after SIGKILL, same PID namespace:      {:>7.3} s",
        took.as_secs_f64()
    );

    let a2 = start(&l.cfg[0], l.http[0], "standby");
    let pid = libc::pid_t::try_from(s.pid()).expect("pid");
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t = Instant::now();
    let took = wait_role(l.http[0], "active", Duration::from_secs(b.ttl + 10)) - t;
    println!(
        "takeover after SIGSTOP:                          {:>7.3} s",
        took.as_secs_f64()
    );
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_role(l.http[1], "standby", Duration::from_secs(10));
    s.kill9();
    drop(a2);

    let mut x = Daemon::start_in_own_pid_namespace(&l.cfg[1]);
    x.wait_healthy(l.http[1], Duration::from_secs(60));
    wait_role(l.http[1], "active", Duration::from_secs(b.ttl + 10));
    let _y = start(&l.cfg[0], l.http[0], "standby");
    x.kill9();
    let t = Instant::now();
    let took = wait_role(l.http[0], "active", Duration::from_secs(b.ttl + 10)) - t;
    println!(
        "takeover after SIGKILL, another PID namespace:   {:>7.3} s  (goal: under TTL + 1 s = {} s)",
        took.as_secs_f64(),
        b.ttl + 1
    );
}
