//! Leaf and hub benchmark: JetStream `sync_interval` against KV put rate,
//! hub mirror catch-up after a cut with 20,000 pending readings against the
//! raw mirror rate of a plain stream of the same size, and hub mirror lag
//! with 10 sites writing at once. Every figure is printed next to its raw
//! limit measured in the same run. Run with `cargo bench --bench topology`
//! (see docs/PERFORMANCE.md).

#[path = "../tests/support/mod.rs"]
mod support;

use async_nats::jetstream::{self, kv, stream};
use presenced::naming::{self, Site};
use presenced::natsconf::SyncInterval;
use presenced::store::publish::publish_all;
use std::time::{Duration, Instant};
use support::{leaf_of, Hub, NatsOptions, NatsServer};

const PENDING: u64 = 20_000;
const SITES: usize = 10;
/// Readings per second and site in the 10-site run.
const SITE_RATE: u64 = 500;
const SITE_SECONDS: u64 = 10;
const SYNC_ROUNDS: usize = 3;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn messages(subject: &str, n: u64) -> Vec<(String, jetstream::message::PublishMessage)> {
    (0..n)
        .map(|i| {
            (
                subject.to_owned(),
                jetstream::message::PublishMessage::build()
                    .payload(format!("{{\"v\":1,\"value\":{i}}}").into()),
            )
        })
        .collect()
}

/// (pipelined puts/s, one-at-a-time puts/s, p99 ms) on a fresh leaf.
async fn kv_rate(sync: SyncInterval) -> (f64, f64, f64) {
    let server = NatsServer::start(NatsOptions {
        sync_interval: Some(sync),
        ..Default::default()
    });
    let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let store = js
        .create_key_value(kv::Config {
            bucket: "bench".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let n = 50_000;
    let msgs: Vec<_> = (0..n)
        .map(|i| {
            (
                format!("$KV.bench.k{}", i % 1000),
                jetstream::message::PublishMessage::build()
                    .payload(format!("{{\"v\":{i}}}").into()),
            )
        })
        .collect();
    let t = Instant::now();
    let r = publish_all(&js, msgs).await;
    let pipelined = n as f64 / t.elapsed().as_secs_f64();
    assert!(r.iter().all(|r| r.is_ok()));
    let serial_n = 2000;
    let mut lat = Vec::with_capacity(serial_n);
    let t = Instant::now();
    for i in 0..serial_n {
        let s = Instant::now();
        store
            .put(format!("s{}", i % 100), "x".into())
            .await
            .unwrap();
        lat.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    let serial = serial_n as f64 / t.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    (pipelined, serial, percentile(&lat, 0.99))
}

async fn last_seq(js: &jetstream::Context, name: &str) -> u64 {
    match js.get_stream(name).await {
        Ok(s) => s.cached_info().state.last_sequence,
        Err(_) => 0,
    }
}

/// Polls until `name` on the hub holds `target`; the time of the first
/// progress past `from` and of completion.
async fn wait_mirror(
    js: &jetstream::Context,
    name: &str,
    from: u64,
    target: u64,
) -> (Instant, Instant) {
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let seq = last_seq(js, name).await;
        let now = Instant::now();
        if seq > from && first.is_none() {
            first = Some(now);
        }
        if seq >= target {
            return (first.unwrap_or(now), now);
        }
        assert!(now < deadline, "{name} stuck at {seq} of {target}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn provision_site(leaf: &NatsServer, hub_client: &async_nats::Client, site: &Site) {
    let client = async_nats::connect(leaf.url()).await.unwrap();
    presenced::store::provision::provision(&client, site)
        .await
        .unwrap();
    for r in presenced::hub::mirrors::provision(hub_client, std::slice::from_ref(site), 3)
        .await
        .unwrap()
    {
        r.unwrap();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("presenced leaf/hub benchmark (every server on this host, loopback)\n");

    // 1. sync_interval against KV put rate.
    let modes = [
        ("server default (2 min)", SyncInterval::ServerDefault),
        (
            "1s (presenced default)",
            SyncInterval::Every(Duration::from_secs(1)),
        ),
        ("always", SyncInterval::Always),
    ];
    // Rounds alternate the modes so that load from elsewhere on the
    // machine spreads over all of them; the median round is reported.
    let mut runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); modes.len()];
    for _ in 0..SYNC_ROUNDS {
        for (i, (_, mode)) in modes.iter().enumerate() {
            runs[i].push(kv_rate(*mode).await);
        }
    }
    let median = |v: &mut Vec<(f64, f64, f64)>| {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v[v.len() / 2]
    };
    let mut base = None;
    for ((label, _), mut r) in modes.iter().zip(runs) {
        let (pipelined, serial, p99) = median(&mut r);
        let b = *base.get_or_insert(pipelined);
        println!(
            "sync  {label:<24} KV put pipelined {pipelined:>8.0} /s ({:>3.0}% of server default)   one at a time {serial:>6.0} /s  p99 {p99:.2} ms  (median of {SYNC_ROUNDS})",
            pipelined / b * 100.0
        );
    }

    // 2. Catch-up after a cut against the raw mirror rate.
    let hub = Hub::start();
    let link = hub.link_proxies();
    let site = Site::new("bench").unwrap();
    let leaf = leaf_of(&site, link.urls());
    support::wait_until("the leaf is linked", Duration::from_secs(60), || {
        hub.leafnode_count() == 1
    });
    let hub_client = async_nats::connect(hub.client_urls()).await.unwrap();
    let hub_js = jetstream::new(hub_client.clone());
    provision_site(&leaf, &hub_client, &site).await;
    let leaf_client = async_nats::connect(leaf.url()).await.unwrap();
    let leaf_js = jetstream::new(leaf_client.clone());

    leaf_js
        .create_stream(stream::Config {
            name: "RAW".into(),
            subjects: vec!["raw.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(publish_all(&leaf_js, messages("raw.x", PENDING))
        .await
        .iter()
        .all(|r| r.is_ok()));
    let t = Instant::now();
    hub_js
        .create_stream(stream::Config {
            name: "RAW-bench".into(),
            num_replicas: 3,
            mirror: Some(stream::Source {
                name: "RAW".into(),
                external: Some(stream::External {
                    api_prefix: naming::domain_api_prefix(&site.leaf_domain()),
                    delivery_prefix: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let (first, done) = wait_mirror(&hub_js, "RAW-bench", 0, PENDING).await;
    let raw_rate = PENDING as f64 / (done - first).as_secs_f64();
    println!(
        "\nraw   R3 mirror of a plain {PENDING}-message stream: {raw_rate:>8.0} /s  ({:.2} s from creation)",
        (done - t).as_secs_f64()
    );

    let mirror = site.hub_mirror(naming::SENSORS_STREAM);
    let before = last_seq(&leaf_js, naming::SENSORS_STREAM).await;
    link.cut();
    support::wait_until("the link is down", Duration::from_secs(60), || {
        hub.leafnode_count() == 0
    });
    assert!(
        publish_all(&leaf_js, messages(&site.sensors_subject("s1"), PENDING))
            .await
            .iter()
            .all(|r| r.is_ok())
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    link.restore();
    let restored = Instant::now();
    support::wait_until("the link is back", Duration::from_secs(60), || {
        hub.leafnode_count() == 1
    });
    // What the daemon does: a leader step-down, again every `nudge_after`
    // (default 2 s) while the mirror has not moved. A step-down right after
    // the link's return does not always take: the new leader can still
    // fail to reach the leaf and fall back to the server's backoff.
    let via_leaf = presenced::hub::link::HubLink::new(
        leaf_client.clone(),
        site.clone(),
        Duration::from_secs(5),
    );
    let nudger = {
        let hub_js = hub_js.clone();
        let mirror = mirror.clone();
        tokio::spawn(async move {
            let mut nudges = Vec::new();
            while last_seq(&hub_js, &mirror).await <= before {
                nudges.push(restored.elapsed().as_secs_f64());
                let _ = presenced::hub::catchup::nudge(&via_leaf, &mirror).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            nudges
        })
    };
    let (first, done) = wait_mirror(&hub_js, &mirror, before, before + PENDING).await;
    let nudges: Vec<String> = nudger
        .await
        .unwrap()
        .iter()
        .map(|t| format!("{t:.2}"))
        .collect();
    let rate = PENDING as f64 / (done - first).as_secs_f64();
    println!(
        "catch SENSORS mirror after a cut, {PENDING} pending: {rate:>8.0} /s = {:.0}% of raw mirror rate; all on the hub {:.2} s after the link's return (nudges at {} s)",
        rate / raw_rate * 100.0,
        (done - restored).as_secs_f64(),
        nudges.join(", ")
    );
    drop(leaf);
    drop(link);

    // 3. Ten sites writing at once.
    let mut leaves = Vec::new();
    let mut sites = Vec::new();
    for i in 0..SITES {
        let s = Site::new(&format!("site{i}")).unwrap();
        let l = leaf_of(&s, hub.leafnode_urls());
        sites.push(s);
        leaves.push(l);
    }
    support::wait_until("every leaf is linked", Duration::from_secs(60), || {
        hub.leafnode_count() == SITES
    });
    for (l, s) in leaves.iter().zip(&sites) {
        provision_site(l, &hub_client, s).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    let mut leaf_jss = Vec::new();
    for (l, s) in leaves.iter().zip(&sites) {
        let js = jetstream::new(async_nats::connect(l.url()).await.unwrap());
        leaf_jss.push(js.clone());
        let subject = s.sensors_subject("s1");
        writers.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut n = 0u64;
            let mut acks = Vec::new();
            while start.elapsed() < Duration::from_secs(SITE_SECONDS) {
                let due = (start.elapsed().as_secs_f64() * SITE_RATE as f64) as u64;
                while n < due {
                    acks.push(
                        js.publish(subject.clone(), format!("{{\"v\":1,\"n\":{n}}}").into())
                            .await
                            .unwrap(),
                    );
                    n += 1;
                }
                if acks.len() > 256 {
                    for a in acks.drain(..) {
                        a.await.unwrap();
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for a in acks {
                a.await.unwrap();
            }
            n
        }));
    }
    // Lag sampled every 100 ms per site: messages and seconds.
    let sampler = {
        let leaf_jss = leaf_jss.clone();
        let hub_js = hub_js.clone();
        let names: Vec<String> = sites
            .iter()
            .map(|s| s.hub_mirror(naming::SENSORS_STREAM))
            .collect();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut lag_msgs = Vec::new();
            let mut lag_secs = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (ljs, name) in leaf_jss.iter().zip(&names) {
                    let (Ok(l), Ok(h)) = (
                        ljs.get_stream(naming::SENSORS_STREAM).await,
                        hub_js.get_stream(name).await,
                    ) else {
                        continue;
                    };
                    let (l, h) = (&l.cached_info().state, &h.cached_info().state);
                    let behind = l.last_sequence.saturating_sub(h.last_sequence);
                    lag_msgs.push(behind as f64);
                    let secs = if behind > 0 {
                        // From the mirror's newest message, or the source's
                        // oldest while the mirror is empty.
                        let from = if h.messages == 0 {
                            l.first_timestamp
                        } else {
                            h.last_timestamp
                        };
                        ((l.last_timestamp - from).as_seconds_f64()).max(0.0)
                    } else {
                        0.0
                    };
                    lag_secs.push(secs);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (lag_msgs, lag_secs)
        })
    };
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    let written = Instant::now();
    for (ljs, s) in leaf_jss.iter().zip(&sites) {
        let target = last_seq(ljs, naming::SENSORS_STREAM).await;
        wait_mirror(&hub_js, &s.hub_mirror(naming::SENSORS_STREAM), 0, target).await;
    }
    let drained = written.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut msgs, mut secs) = sampler.await.unwrap();
    msgs.sort_by(|a, b| a.total_cmp(b));
    secs.sort_by(|a, b| a.total_cmp(b));
    println!(
        "\nlag   {SITES} sites x {SITE_RATE} readings/s for {SITE_SECONDS} s ({total} readings, {} /s into the hub): mirror lag p50 {:.0} / p99 {:.0} / max {:.0} messages, p99 {:.3} s / max {:.3} s; every mirror complete {:.2} s after the last write",
        SITES as u64 * SITE_RATE,
        percentile(&msgs, 0.5),
        percentile(&msgs, 0.99),
        msgs.last().copied().unwrap_or(f64::NAN),
        percentile(&secs, 0.99),
        secs.last().copied().unwrap_or(f64::NAN),
        drained.as_secs_f64()
    );
}
