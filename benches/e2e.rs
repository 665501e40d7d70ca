//! End-to-end benchmark of the real daemon against a real nats-server and
//! Mosquitto, each figure printed next to the raw limit measured in the same
//! run. Run with `cargo bench --bench e2e` (see docs/PERFORMANCE.md).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use async_nats::jetstream::{self, kv};
use common::*;
use futures::StreamExt;
use presenced::engine::ZoneState;
use presenced::store::publish::publish_all;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

fn zones_toml(n: usize) -> String {
    let mut out = String::with_capacity(n * 160);
    for i in 0..n {
        out.push_str(&format!(
            "[zones.z{i:05}]\narrive_after = \"0s\"\nleave_after = \"0s\"\n[[zones.z{i:05}.evidence]]\nsensor = \"s{i:05}\"\np_true = 0.95\np_false = 0.05\n"
        ));
    }
    out
}

/// (RSS in KiB, CPU seconds used so far) of a process, from /proc.
fn proc_usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (rss, ticks as f64 / hz)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn raw_kv(js: &jetstream::Context) -> (f64, f64, f64) {
    let store = js
        .create_key_value(kv::Config {
            bucket: "bench".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .expect("bench bucket");
    // Pipelined: the same windowed publisher the daemon uses.
    let n = 100_000;
    let msgs: Vec<_> = (0..n)
        .map(|i| {
            (
                format!("$KV.bench.k{}", i % 10_000),
                jetstream::message::PublishMessage::build()
                    .payload(format!("{{\"v\":{i}}}").into()),
            )
        })
        .collect();
    let t = Instant::now();
    let results = publish_all(js, msgs).await;
    let pipelined = n as f64 / t.elapsed().as_secs_f64();
    assert!(results.iter().all(|r| r.is_ok()));
    // One at a time.
    let mut lat = Vec::with_capacity(5000);
    let t = Instant::now();
    for i in 0..5000 {
        let s = Instant::now();
        store.put(format!("k{i}"), "x".into()).await.expect("put");
        lat.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    let serial = 5000.0 / t.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    (pipelined, serial, percentile(&lat, 0.99))
}

/// One open status page: `/` once, then `/events` read until the daemon
/// closes it, counting the bytes (a thread, like a browser's own
/// process: it does not compete with the benchmark's runtime).
fn open_page(http: SocketAddr, bytes: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::{Read, Write};
    let _ = support::http_get(http, "/");
    std::thread::spawn(move || {
        let Ok(mut s) = std::net::TcpStream::connect(http) else {
            return;
        };
        let req =
            format!("GET /events HTTP/1.1\r\nHost: {http}\r\nAccept: text/event-stream\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return;
        }
        let mut buf = [0u8; 65536];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            bytes.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let zones = 1000;
    let nats = NatsServer::start(NatsOptions::default());
    let mqtt = Mosquitto::start();
    let js = jetstream(&nats.url()).await;

    println!("presenced end-to-end benchmark (nats-server and Mosquitto on this host)\n");
    let (raw_pipelined, raw_serial, raw_p99) = raw_kv(&js).await;
    println!(
        "raw   KV put, pipelined (window {}):  {raw_pipelined:>9.0} /s",
        presenced::store::publish::WINDOW
    );
    println!("raw   KV put, one at a time:          {raw_serial:>9.0} /s   p99 {raw_p99:.2} ms");

    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let cfg = daemon_config(
        "bench",
        &nats.url(),
        mqtt.port,
        http_port,
        &motion_mapping(true),
        &zones_toml(zones),
    );
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg_path = cfg_dir.path().join("presenced.toml");
    std::fs::write(&cfg_path, &cfg).unwrap();
    provision(&cfg_path);
    let daemon = Daemon::start(&cfg, &[("RUST_LOG", "warn")]);
    daemon.wait_healthy(http, Duration::from_secs(30));
    let pid = daemon.pid();
    // Status pages open during the whole run (PRESENCED_BENCH_PAGES=10):
    // each loads `/` and then reads `/events` as a browser would.
    let pages: usize = std::env::var("PRESENCED_BENCH_PAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let page_bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..pages {
        open_page(http, page_bytes.clone());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, cpu0) = proc_usage(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss_idle, cpu1) = proc_usage(pid);
    let idle_cpu = (cpu1 - cpu0) / 5.0 * 100.0;

    // (b) saturation: as fast as the broker takes QoS 1 messages.
    let n: i64 = 200_000;
    let base = now_ms() + 3_600_000;
    let mut p = Publisher::connect(mqtt.port, "bench-pub").await;
    // A site has tens of zones; 1,000 is the stress case where a batch
    // touches most zones and KV writes barely coalesce.
    let mut rss_load = 0;
    let mut load_line = String::new();
    for (phase, spread) in [(0i64, 100usize), (1, zones)] {
        let sat = saturate(
            &js,
            &mut p,
            pid,
            [nats.pid(), mqtt.pid()],
            spread,
            n,
            base + phase * n,
        )
        .await;
        rss_load = rss_load.max(sat.rss_max);
        println!("--    readings spread over {spread} zones");
        println!(
            "mqtt  QoS 1 publish into Mosquitto:   {:>9.0} /s   (publisher side, same run)",
            sat.mqtt_rate
        );
        println!(
            "ingest MQTT in → stored in SENSORS:   {:>9.0} /s   (all stored after {:.1} s, all applied after {:.1} s)",
            n as f64 / sat.stored_at, sat.stored_at, sat.elapsed
        );
        println!(
            "e2e   MQTT in → presence KV written:   {:>9.0} /s   = {:.0}% of raw pipelined KV put  ({n} readings)",
            sat.e2e,
            sat.e2e / raw_pipelined * 100.0
        );
        load_line = format!(
            "under saturation {:.0}% (of one core); nats-server {:.0}%, mosquitto {:.0}% in the same window",
            sat.cpu[0], sat.cpu[1], sat.cpu[2]
        );
    }
    let base = base + 2 * n;

    // (c) latency at a moderate fixed rate: 1,000/s over 100 zones.
    let kvp = js.get_key_value("presence").await.unwrap();
    let mut watch = kvp.watch_all().await.unwrap();
    let sent: std::sync::Arc<std::sync::Mutex<HashMap<(String, i64), Instant>>> =
        Default::default();
    let sent2 = sent.clone();
    let rate_n = 10_000i64;
    let base2 = base + 1000;
    let pubber = tokio::spawn(async move {
        let mut p = Publisher::connect(mqtt.port, "bench-lat").await;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for i in 0..rate_n {
            tick.tick().await;
            let z = (i % 100) as usize;
            let ts = base2 + i;
            sent2
                .lock()
                .unwrap()
                .insert((format!("z{z:05}"), ts), Instant::now());
            p.publish(
                &format!("test/s{z:05}"),
                format!(r#"{{"occupancy":{},"ts":{ts}}}"#, i % 7 < 3),
            )
            .await;
        }
        p.flush(Duration::from_secs(30)).await;
        mqtt
    });
    let mut lat = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline && (lat.len() as i64) < rate_n {
        let Ok(Some(Ok(entry))) = tokio::time::timeout(Duration::from_secs(3), watch.next()).await
        else {
            break;
        };
        let seen = Instant::now();
        let Ok(z) = serde_json::from_slice::<ZoneState>(&entry.value) else {
            continue;
        };
        let Some(at) = z.evidence.first().and_then(|e| e.observed_at) else {
            continue;
        };
        if let Some(s) = sent.lock().unwrap().get(&(entry.key.clone(), at.0)) {
            lat.push(seen.duration_since(*s).as_secs_f64() * 1000.0);
        }
    }
    let _mqtt = pubber.await.unwrap();
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "lat   MQTT publish → KV update @1k/s:  p50 {:.2} ms  p99 {:.2} ms  ({} samples; raw KV put p99 {raw_p99:.2} ms)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len()
    );
    println!("cpu   daemon idle {idle_cpu:.1}%  {load_line}");
    if pages > 0 {
        println!(
            "page  {pages} status pages open throughout: {:.1} MB of events received",
            page_bytes.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
        );
    }
    println!(
        "rss   daemon idle {:.1} MB  under saturation {:.1} MB  ({zones} zones)",
        rss_idle as f64 / 1024.0,
        rss_load as f64 / 1024.0
    );
    drop(daemon);

    // (e) rehydration of 10,000 zones, and memory with them.
    let http_port = support::free_port();
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let cfg = daemon_config(
        "bench",
        &nats.url(),
        1,
        http_port,
        &motion_mapping(true),
        &zones_toml(10_000),
    );
    let mut d = Daemon::start(&cfg, &[("RUST_LOG", "info")]);
    d.wait_healthy(http, Duration::from_secs(60));
    d.restart();
    d.wait_healthy(http, Duration::from_secs(60));
    let log = d.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("state rehydrated"))
        .unwrap_or("");
    let ms: f64 = line
        .split("elapsed_ms=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss10k, _) = proc_usage(d.pid());
    println!("rehyd 10,000 zones from KV:           {ms:>9.0} ms");
    println!(
        "rss   daemon idle with 10,000 zones:  {:>9.1} MB",
        rss10k as f64 / 1024.0
    );
}

struct Saturation {
    mqtt_rate: f64,
    stored_at: f64,
    elapsed: f64,
    e2e: f64,
    /// CPU % of one core: daemon, then the other processes given.
    cpu: [f64; 3],
    rss_max: u64,
}

/// Publishes `n` readings as fast as the broker takes them, round-robin
/// over `spread` sensors (one zone each), and waits until the engine has
/// applied and acknowledged them all.
async fn saturate(
    js: &jetstream::Context,
    p: &mut Publisher,
    pid: u32,
    others: [u32; 2],
    spread: usize,
    n: i64,
    base: i64,
) -> Saturation {
    let sensors0 = stream_messages(js, "SENSORS").await;
    let cpu_a = [
        proc_usage(pid).1,
        proc_usage(others[0]).1,
        proc_usage(others[1]).1,
    ];
    let t = Instant::now();
    for i in 0..n {
        let z = i as usize % spread;
        let on = (i / spread as i64) % 2 == 0;
        p.publish(
            &format!("test/s{z:05}"),
            format!(r#"{{"occupancy":{on},"ts":{}}}"#, base + i),
        )
        .await;
    }
    p.flush(Duration::from_secs(300)).await;
    let mqtt_rate = n as f64 / t.elapsed().as_secs_f64();
    let total = sensors0 + n as u64;
    let mut stored_at = None;
    let mut rss_max = 0;
    loop {
        rss_max = rss_max.max(proc_usage(pid).0);
        if stored_at.is_none() && stream_messages(js, "SENSORS").await >= total {
            stored_at = Some(t.elapsed().as_secs_f64());
        }
        if engine_caught_up(js, total).await {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "daemon did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let cpu_b = [
        proc_usage(pid).1,
        proc_usage(others[0]).1,
        proc_usage(others[1]).1,
    ];
    let mut cpu = [0.0; 3];
    for i in 0..3 {
        cpu[i] = (cpu_b[i] - cpu_a[i]) / elapsed * 100.0;
    }
    Saturation {
        mqtt_rate,
        stored_at: stored_at.unwrap_or(elapsed),
        elapsed,
        e2e: n as f64 / elapsed,
        cpu,
        rss_max,
    }
}
