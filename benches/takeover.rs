//! Engine failover benchmark (issue 15's "Speed"): takeover time after a
//! SIGKILL (same PID namespace: the dead-process shortcut; another PID
//! namespace: the lease lapse) and after a freeze (SIGSTOP), and the
//! engine's rate over a backlog of readings with and without a standby
//! following it, all in one run against a real nats-server.
//!
//! `cargo bench --bench takeover`; the size comes from the environment so
//! a small run checks the bench itself: `PRESENCED_BENCH_TAKEOVER_READINGS`
//! (default 200,000), `PRESENCED_BENCH_TAKEOVER_ZONES` (default 100) and
//! `PRESENCED_BENCH_TAKEOVER_TTL_S` (lease TTL, default 3), and
//! `PRESENCED_BENCH_TAKEOVER_ROUNDS` (alternating drains alone and with a
//! standby, default 7; the median of the rounds' differences is the
//! standby's cost). See
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
use support::process::proc_usage;
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
    /// Alternating drains alone and with a standby; the medians compare.
    rounds: u64,
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

/// One timed drain: the active engine's rate, and the CPU seconds the
/// active engine, the standby (if any) and nats-server used meanwhile.
struct Drain {
    rate: f64,
    cpu_active: f64,
    cpu_standby: f64,
    cpu_server: f64,
    secs: f64,
}

/// Readings per second the active engine applies over a stored backlog
/// of `b.readings`, with or without a standby beside it, on a fresh
/// server. The backlog is published while the active engine is frozen
/// (SIGSTOP, with a lease TTL that outlasts the publish) and timed from
/// its SIGCONT to its last acknowledgement: the drain alone, not the
/// publish.
async fn rate(b: &Bench, standby: bool) -> Drain {
    let long_lease = Bench {
        ttl: 120,
        readings: b.readings,
        zones: b.zones,
        rounds: 1,
    };
    let l = leaf(&long_lease).await;
    let a = start(&l.cfg[0], l.http[0], "active");
    let s = standby.then(|| start(&l.cfg[1], l.http[1], "standby"));
    let a_pid = libc::pid_t::try_from(a.pid()).expect("pid");
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(a_pid, libc::SIGSTOP) };
    publish(&l.js, b, 0, b.readings).await;
    let cpu = |pid: Option<u32>| pid.map_or(0.0, |p| proc_usage(p).1);
    let s_pid = s.as_ref().map(Daemon::pid);
    let before = (cpu(Some(a.pid())), cpu(s_pid), cpu(Some(l.nats.pid())));
    let t = Instant::now();
    // SAFETY: as above.
    unsafe { libc::kill(a_pid, libc::SIGCONT) };
    while !engine_caught_up(&l.js, b.readings).await {
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "engine did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(
        role(l.http[0]),
        "active",
        "the drained engine stayed the holder"
    );
    Drain {
        rate: b.readings as f64 / secs,
        cpu_active: cpu(Some(a.pid())) - before.0,
        cpu_standby: cpu(s_pid) - before.1,
        cpu_server: cpu(Some(l.nats.pid())) - before.2,
        secs,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let b = Bench {
        readings: env("PRESENCED_BENCH_TAKEOVER_READINGS", 200_000),
        zones: env("PRESENCED_BENCH_TAKEOVER_ZONES", 100),
        ttl: env("PRESENCED_BENCH_TAKEOVER_TTL_S", 3),
        rounds: env("PRESENCED_BENCH_TAKEOVER_ROUNDS", 7).max(1),
    };
    println!(
        "presenced engine failover benchmark ({} readings, {} zones, lease TTL {} s; nats-server on this host)\n",
        b.readings, b.zones, b.ttl
    );

    // Alternating rounds on fresh servers: one drain of each kind is
    // within the noise of the machine.
    let mut alone = Vec::new();
    let mut beside = Vec::new();
    let mut ratios = Vec::new();
    let (mut standby_cpu, mut active_cpu) = (0.0, 0.0);
    // nats-server's CPU per CPU second of the active engine: both grow
    // alike when the machine is slow, so their ratio shows the work a
    // standby adds to the server through the noise the rates carry.
    let mut server_per = [Vec::new(), Vec::new()];
    for round in 1..=b.rounds {
        let mut pair = [0.0; 2];
        for standby in [false, true] {
            let d = rate(&b, standby).await;
            println!(
                "round {round} {:<16} {:>9.0} readings/s  ({:.2} s; CPU s: active {:.2}, standby {:.2}, nats-server {:.2})",
                if standby { "with a standby:" } else { "engine alone:" },
                d.rate,
                d.secs,
                d.cpu_active,
                d.cpu_standby,
                d.cpu_server
            );
            pair[usize::from(standby)] = d.rate;
            server_per[usize::from(standby)].push(d.cpu_server / d.cpu_active.max(0.01));
            if standby {
                standby_cpu += d.cpu_standby;
                active_cpu += d.cpu_active;
                beside.push(d.rate);
            } else {
                alone.push(d.rate);
            }
        }
        ratios.push(pair[1] / pair[0] - 1.0);
    }
    println!(
        "rate  engine alone (median):        {:>9.0} readings/s",
        median(alone)
    );
    println!(
        "rate  engine with a standby (median): {:>7.0} readings/s",
        median(beside)
    );
    println!(
        "rate  a standby's cost (median of the rounds' differences): {:+.1}%",
        median(ratios) * 100.0
    );
    let [server_alone, server_beside] = server_per.map(median);
    println!(
        "cpu   nats-server per CPU s of the active engine (median): alone {server_alone:.3}, with a standby {server_beside:.3} ({:+.1}%)",
        (server_beside / server_alone - 1.0) * 100.0
    );
    println!(
        "cpu   the standby used {standby_cpu:.2} CPU s while the active engine used {active_cpu:.2} ({:.1}%)",
        standby_cpu / active_cpu.max(f64::MIN_POSITIVE) * 100.0
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
