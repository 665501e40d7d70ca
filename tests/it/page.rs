//! The status page in a real browser: headless Chromium over WebDriver
//! against the real daemon, nats-server and Mosquitto under the ACL
//! `presenced acl` generates; and the fleet page (`presenced dashboard`)
//! against the real 3-node hub under the authorization `presenced acl-hub`
//! generates, run as the hub's admin, with two sites' leaves linked as
//! their leafnode identities.
//! Each test saves a screenshot under `target/page-tests/` as its artifact.

use crate::common;
use crate::support;

use common::*;
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::browser::Browser;
use support::{http_get, AclSite, Daemon, Mosquitto};

const ZONES: &str = r#"
[zones.lab]
occupied_above = 0.6
vacant_below = 0.3
arrive_after = "0s"
leave_after = "0s"
[[zones.lab.evidence]]
sensor = "lab_pir"
p_true = 0.95
p_false = 0.05
"#;

/// How the site is deployed: one instance running everything, or the
/// page on an ingest-only instance whose identity may send commands.
#[derive(PartialEq, Debug, Clone, Copy)]
enum Layout {
    Single,
    Split,
    /// The page on an ingest-only instance granted nothing beyond ingest,
    /// without `page_commands`.
    SplitPlain,
    /// The page on an ingest-only instance granted `commands` but not
    /// `presence`, with `page_commands` on.
    SplitCommandsOnly,
}

struct World {
    /// The instance serving the page; then the engine one, when split.
    _daemons: Vec<Daemon>,
    /// The admin's JetStream context.
    js: async_nats::jetstream::Context,
    broker: Mosquitto,
    /// The site under the generated ACL: its server, seeds and configs.
    acl: AclSite,
    /// The config file of the instance serving the page.
    page_config: PathBuf,
    page: SocketAddr,
}

/// A config's common part; [`AclSite`] adds the identity (`service`, its
/// seed file).
fn head(nats: &str, http: u16, page_commands: bool) -> String {
    format!(
        "site = \"test\"\n\n[nats]\nurl = \"{nats}\"\nrequest_timeout = \"2s\"\n\n[http]\nlisten = \"127.0.0.1:{http}\"\npage_commands = {page_commands}\n\n[health]\nsource_grace = \"1s\"\n\n[engine]\ndrain_timeout = \"5s\"\n",
    )
}

fn mqtt(port: u16) -> String {
    format!(
        "[mqtt.main]\nhost = \"127.0.0.1\"\nport = {port}\nkeep_alive = \"5s\"\nreconnect_max = \"1s\"\n{}",
        motion_mapping(true)
    )
}

async fn world(layout: Layout) -> World {
    world_with(layout, ZONES).await
}

/// [`world`] with other zones (TOML) in the engine's config.
async fn world_with(layout: Layout, zones: &str) -> World {
    let broker = Mosquitto::start();
    let ingest_only = "runs = [\"ingest\"]";
    let engine = ("engine", "runs = [\"engine\"]");
    let grants: Vec<(&str, &str)> = match layout {
        Layout::Single => vec![("presenced", "runs = [\"ingest\", \"engine\"]")],
        Layout::Split => vec![
            (
                "presenced",
                "runs = [\"ingest\"]\nreads = [\"commands\", \"presence\"]",
            ),
            engine,
        ],
        Layout::SplitCommandsOnly => vec![
            ("presenced", "runs = [\"ingest\"]\nreads = [\"commands\"]"),
            engine,
        ],
        Layout::SplitPlain => vec![("plain", ingest_only), engine],
    };
    let acl = AclSite::start(&grants);
    let url = acl.url();
    acl.provision_with_access(&format!(
        "{}{zones}",
        head(&url, support::free_port(), true)
    ));
    let port = support::free_port();
    let page = SocketAddr::from(([127, 0, 0, 1], port));
    // The page is served by the first identity: the whole pipeline, or
    // the ingest-only half of a split site.
    let service = grants[0].0;
    let page_commands = service != "plain";
    let mut daemons = Vec::new();
    let page_config = if layout == Layout::Single {
        let text = format!(
            "{}{}{zones}",
            head(&url, port, page_commands),
            mqtt(broker.port)
        );
        acl.config_file(&text, service)
    } else {
        // The ingest-only half: sources, no zones.
        let text = format!(
            "{ingest_only}\n{}{}",
            head(&url, port, page_commands),
            mqtt(broker.port)
        );
        acl.config_file(&text, service)
    };
    daemons.push(Daemon::start_at(&page_config, &[]));
    if layout != Layout::Single {
        let engine_port = support::free_port();
        let text = format!("{}{zones}", head(&url, engine_port, true));
        daemons.push(acl.daemon(&text, "engine"));
        daemons[1].wait_healthy(
            SocketAddr::from(([127, 0, 0, 1], engine_port)),
            Duration::from_secs(20),
        );
    }
    daemons[0].wait_healthy(page, Duration::from_secs(20));
    let js = acl.js("admin").await;
    World {
        _daemons: daemons,
        js,
        broker,
        acl,
        page_config,
        page,
    }
}

impl World {
    fn url(&self) -> String {
        format!("http://{}/", self.page)
    }

    async fn pir(&self, id: &str, on: bool) {
        let mut p = Publisher::connect(self.broker.port, id).await;
        p.publish(
            "test/lab_pir",
            format!(r#"{{"occupancy":{on},"ts":{}}}"#, now_ms()),
        )
        .await;
        p.flush(Duration::from_secs(5)).await;
    }

    /// Opens the page and waits until the stream is live and the zone
    /// card is shown; marks the window so a reload would be noticed.
    fn open(&self, b: &Browser) {
        b.goto(&self.url());
        b.wait_for(
            "the event stream live",
            Duration::from_secs(10),
            "return document.documentElement.dataset.link === 'live'",
        );
        b.eval("window.__notReloaded = true; return 1", json!([]));
    }
}

fn shot(b: &Browser, name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/page-tests")
        .join(format!("{name}.png"));
    b.screenshot(&path);
    path
}

/// The state the lab card shows (an expression; `undefined` without one).
const LAB: &str = "(document.getElementById('z-lab') || { dataset: {} }).dataset.state";

/// The text of the element `css` as the DOM holds it.
fn content(b: &Browser, css: &str) -> String {
    b.eval(
        "var e = document.querySelector(arguments[0]); return e ? e.textContent : ''",
        json!([css]),
    )
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_loads_and_a_reading_over_mqtt_changes_the_zone_within_a_second_without_reload() {
    let w = world(Layout::Single).await;
    // The page as served: self-contained, small, with its parts named.
    let (code, html) = http_get(w.page, "/").expect("GET /");
    assert_eq!(code, 200);
    assert!(html.len() < 100 * 1024, "page is {} bytes", html.len());
    for bad in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "@import",
    ] {
        assert!(!html.contains(bad), "external asset ({bad}) in {html}");
    }
    let (_, js) = http_get(w.page, "/page.js").unwrap();
    let (_, css) = http_get(w.page, "/page.css").unwrap();
    assert!(html.len() + js.len() + css.len() < 100 * 1024);
    eprintln!(
        "page: {} bytes of HTML (no zone stored yet), {} of script, {} of style",
        html.len(),
        js.len(),
        css.len()
    );
    assert!(html.contains("<html lang=\"en\""), "{html}");
    // Not granted commands in this layout: read-only.
    assert!(html.contains("id=\"readonly\""), "{html}");
    let (code, body) = http_get(w.page, "/no/such/page").unwrap();
    assert_eq!(code, 404);
    assert!(
        body.contains("not found: /no/such/page") && body.len() < 200,
        "{body}"
    );

    let b = Browser::start();
    w.pir("page-pub-0", false).await;
    eventually("lab vacant in KV", Duration::from_secs(15), || async {
        zone(&w.js, "lab")
            .await
            .is_some_and(|z| z.state == presenced::engine::Presence::Vacant)
    })
    .await;
    w.open(&b);
    b.wait_for(
        "lab shown vacant",
        Duration::from_secs(5),
        &format!("return {LAB} === 'vacant'"),
    );
    assert_eq!(content(&b, "h1"), "presenced · site test");
    assert!(
        content(&b, "#z-lab").contains("lab_pir: false"),
        "{}",
        content(&b, "#z-lab")
    );
    assert!(b.find("#z-lab meter").is_some(), "confidence bar");
    assert!(b.find("#src-main").is_some(), "source row");

    let start = Instant::now();
    w.pir("page-pub-1", true).await;
    b.wait_for(
        "lab shown occupied",
        Duration::from_secs(5),
        &format!("return {LAB} === 'occupied'"),
    );
    let took = start.elapsed();
    assert_eq!(
        b.eval("return window.__notReloaded === true", json!([])),
        json!(true),
        "the page was reloaded"
    );
    eprintln!("MQTT reading to the page: {took:?}");
    let path = shot(&b, "site-occupied");
    assert!(
        took < Duration::from_secs(1),
        "MQTT reading to page took {took:?} (screenshot {})",
        path.display()
    );
    // The reading itself, as it arrived (live.<site>.<sensor>).
    b.wait_for(
        "the live reading of lab_pir",
        Duration::from_secs(5),
        "var v = document.querySelector('#live-lab_pir .value'); return v && v.textContent === 'true'",
    );
    // Rejected input shows with its reason, pushed like the rest.
    let mut p = Publisher::connect(w.broker.port, "page-pub-2").await;
    p.publish("test/lab_pir", "not json").await;
    p.flush(Duration::from_secs(5)).await;
    let rejects = b.wait_for(
        "the reject shown with its reason",
        Duration::from_secs(10),
        "var r = document.getElementById('rejects'); return r && r.textContent.indexOf('test/lab_pir') >= 0 ? r.textContent : null",
    );
    assert!(
        rejects.as_str().unwrap().starts_with("1 since start; last"),
        "{rejects}"
    );
    assert!(
        b.find("#z-lab svg.tl rect.s-occupied").is_some(),
        "the last-hour bar shows the occupied spell"
    );
    assert!(
        content(&b, "#z-lab").contains("×19.00 towards occupied"),
        "{}",
        content(&b, "#z-lab")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_from_the_form_applies_and_shows_who_and_until() {
    let w = world(Layout::Split).await;
    w.pir("page-ovr-0", false).await;
    eventually("lab in KV", Duration::from_secs(15), || async {
        zone(&w.js, "lab").await.is_some()
    })
    .await;
    let b = Browser::start();
    w.open(&b);
    b.wait_for(
        "the form (this identity is granted commands)",
        Duration::from_secs(10),
        "return !!document.getElementById('override')",
    );
    b.fill("input[name=by]", "alice");
    b.fill("input[name=reason]", "cleaning");
    b.fill("input[name=for]", "45m");
    b.click("button[value=override]");
    b.wait_for(
        "override shown",
        Duration::from_secs(10),
        "var o = document.querySelector('#z-lab .by'); return o ? o.textContent : null",
    );
    let text = content(&b, "#z-lab");
    assert!(
        text.contains("held occupied by alice (cleaning) until"),
        "{text}"
    );
    assert_eq!(
        b.eval(&format!("return {LAB}"), json!([])),
        json!("occupied"),
        "the held state"
    );
    let until = b.eval(
        "return document.querySelector('#z-lab .until').getAttribute('datetime')",
        json!([]),
    );
    shot(&b, "site-override");
    // The real effect: the engine holds the zone, as `presenced cmd` would.
    let z = zone(&w.js, "lab").await.expect("lab");
    let o = z.manual.expect("override in KV presence");
    assert_eq!(o.by, "alice");
    assert_eq!(o.reason.as_deref(), Some("cleaning"));
    assert_eq!(json!(o.until.to_string()), until);
    let left = o.until.millis() - now_ms();
    assert!(
        (44 * 60_000..=45 * 60_000).contains(&left),
        "{left} ms left"
    );

    // Bad input: a field named, a foreign origin and a big body refused.
    let post = |body: &str, origin: &str, length: Option<usize>| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(w.page).unwrap();
        let len = length.unwrap_or(body.len());
        let req = format!(
            "POST /override HTTP/1.1\r\nHost: {}\r\nOrigin: {origin}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}",
            w.page
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = String::new();
        let _ = s.read_to_string(&mut raw);
        support::http::parse_response(&raw).unwrap()
    };
    let token = b.eval(
        "return document.querySelector('input[name=csrf]').value",
        json!([]),
    );
    let token = token.as_str().unwrap();
    let ours = format!("http://{}", w.page);
    let (code, body) = post(
        &format!("csrf={token}&zone=lab&state=occupied&for=soon&by=x"),
        &ours,
        None,
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("field for"), "{body}");
    let (code, body) = post(
        &format!("csrf={token}&zone=lab&state=occupied&for=1m"),
        &ours,
        None,
    );
    assert_eq!((code, body.contains("field by")), (400, true), "{body}");
    let (code, body) = post(
        &format!("csrf={token}&zone=lab&state=occupied&for=1m&by=x"),
        "http://evil.example",
        None,
    );
    assert_eq!(code, 403, "{body}");
    let (code, body) = post(
        "zone=lab&state=occupied&for=1m&by=x&csrf=wrong",
        &ours,
        None,
    );
    assert_eq!(code, 403, "{body}");
    // Announced as 1 MB, nothing sent: refused on the header alone.
    let (code, body) = post("", &ours, Some(1 << 20));
    assert_eq!(code, 413, "{body}");
    let z = zone(&w.js, "lab").await.expect("lab");
    assert_eq!(
        z.manual.map(|o| o.by),
        Some("alice".to_owned()),
        "bad posts changed nothing"
    );
}

/// Beside the engine, the page takes the engine's commits in memory once
/// it has caught up from KV (engine::feed): its KV consumer is no longer
/// bound, the engine counts one feed reader, and readings still show.
/// Fails if the page keeps following KV `presence` through nats-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_the_engine_the_page_takes_commits_in_memory_not_through_kv() {
    use futures::StreamExt;
    let w = world(Layout::Single).await;
    w.pir("page-feed-0", false).await;
    eventually("lab in KV", Duration::from_secs(15), || async {
        zone(&w.js, "lab").await.is_some()
    })
    .await;
    let b = Browser::start();
    w.open(&b);
    // A commit after the page joined the feed ends its catching up.
    w.pir("page-feed-1", true).await;
    b.wait_for(
        "lab shown occupied",
        Duration::from_secs(5),
        &format!("return {LAB} === 'occupied'"),
    );
    let bound = || async {
        let stream = w.js.get_stream("KV_presence").await.unwrap();
        let mut consumers = stream.consumers();
        let mut bound = 0;
        while let Some(info) = consumers.next().await {
            bound += usize::from(info.unwrap().push_bound);
        }
        bound
    };
    eventually(
        "no consumer of KV presence bound",
        Duration::from_secs(10),
        || async { bound().await == 0 },
    )
    .await;
    let (_, metrics) = http_get(w.page, "/metrics").unwrap();
    assert!(
        metrics.contains("\npresenced_engine_feed_readers 1\n"),
        "{metrics}"
    );
    w.pir("page-feed-2", false).await;
    b.wait_for(
        "lab shown vacant again, from the feed",
        Duration::from_secs(5),
        &format!("return {LAB} === 'vacant'"),
    );
    assert_eq!(bound().await, 0, "still not following KV");
    assert_eq!(
        b.eval(
            "return document.querySelectorAll('[id=z-lab]').length",
            json!([])
        ),
        json!(1)
    );
    shot(&b, "site-from-the-feed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_source_shows_as_down() {
    let mut w = world(Layout::Single).await;
    // Occupied, then vacant again, before any page is open: the page's
    // last-hour bar can only know the occupied spell from EVENTS.
    for (i, on, want) in [
        (1, true, presenced::engine::Presence::Occupied),
        (2, false, presenced::engine::Presence::Vacant),
    ] {
        w.pir(&format!("page-src-{i}"), on).await;
        eventually("lab moved", Duration::from_secs(15), || async {
            zone(&w.js, "lab").await.is_some_and(|z| z.state == want)
        })
        .await;
    }
    let b = Browser::start();
    w.open(&b);
    b.wait_for(
        "lab shown vacant",
        Duration::from_secs(5),
        &format!("return {LAB} === 'vacant'"),
    );
    assert!(
        b.find("#z-lab svg.tl rect.s-occupied").is_some()
            && b.find("#z-lab svg.tl rect.s-vacant").is_some(),
        "the last hour from EVENTS: {}",
        content(&b, "#z-lab")
    );
    let up = "var r = document.getElementById('src-main'); return r ? r.dataset.up : null";
    b.wait_for(
        "source main up",
        Duration::from_secs(10),
        &format!("return (function(){{{up}}})() === 'true'"),
    );
    w.broker.stop();
    b.wait_for(
        "source main down",
        Duration::from_secs(15),
        &format!("return (function(){{{up}}})() === 'false'"),
    );
    let text = content(&b, "#src-main");
    assert!(text.contains("down"), "{text}");
    b.wait_for(
        "health degraded",
        Duration::from_secs(10),
        "return document.querySelector('#health-h').textContent.indexOf('degraded') >= 0",
    );
    assert_eq!(
        b.eval("return window.__notReloaded === true", json!([])),
        json!(true)
    );
    shot(&b, "site-source-down");

    // An open page does not hold the daemon's stop: its event stream ends
    // with the drain instead of waiting out the drain timeout.
    let start = Instant::now();
    let status = w._daemons[0].terminate();
    assert!(status.success(), "{status:?}");
    let log = w._daemons[0].log();
    assert!(
        !log.contains("drain did not finish"),
        "stop took {:?}: {log}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_says_reconnecting_while_nats_is_down_then_catches_up_without_duplicates() {
    let mut w = world(Layout::Single).await;
    w.pir("page-nats-0", false).await;
    eventually("lab in KV", Duration::from_secs(15), || async {
        zone(&w.js, "lab").await.is_some()
    })
    .await;
    let b = Browser::start();
    w.open(&b);
    b.wait_for(
        "lab shown",
        Duration::from_secs(5),
        &format!("return {LAB} !== undefined"),
    );
    w.acl.nats.stop();
    b.wait_for(
        "reconnecting shown",
        Duration::from_secs(10),
        "return document.getElementById('link').textContent === 'reconnecting'",
    );
    shot(&b, "site-reconnecting");
    // A reading taken while nats-server is away: ingest holds it, and the
    // page catches up once it is applied.
    w.pir("page-nats-1", true).await;
    assert_eq!(
        b.eval(&format!("return {LAB}"), json!([])),
        json!("vacant"),
        "nothing applied while the leaf is away"
    );
    w.acl.nats.start_again();
    let back = Instant::now() + Duration::from_secs(30);
    while http_get(w.page, "/healthz").map(|(c, _)| c) != Some(200) {
        assert!(
            Instant::now() < back,
            "daemon not healthy after nats-server came back: {:?}\n{}",
            http_get(w.page, "/healthz"),
            w._daemons[0].log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.wait_for(
        "live again",
        Duration::from_secs(30),
        "return document.getElementById('link').textContent === 'live'",
    );
    b.wait_for(
        "lab occupied after the restart",
        Duration::from_secs(15),
        &format!("return {LAB} === 'occupied'"),
    );
    let cards = b.eval(
        "return document.querySelectorAll('#zones > li').length + ':' + document.querySelectorAll('[id=z-lab]').length",
        json!([]),
    );
    assert_eq!(cards, json!("1:1"), "one card per zone, no duplicate");
    assert_eq!(
        b.eval("return window.__notReloaded === true", json!([])),
        json!(true)
    );
    shot(&b, "site-after-restart");
}

/// `presenced dashboard`, killed on drop.
struct Dashboard(std::process::Child);

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fleet page as deployed: the 3-node hub under the authorization
/// `presenced acl-hub` generates, each site's leaf linked as its leafnode
/// identity, the mirrors made by `provision-hub` as the hub's admin, and
/// the dashboard run as that admin (the identity an operator has on the
/// hub). Nothing it does is refused: the sites are listed from their
/// mirrors and follow them live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_lists_sites_from_the_3_node_hubs_mirrors_live_and_opens_a_sites_zones() {
    use presenced::acl::identity;
    use presenced::naming::Site;
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let seed_path = |who: &str| dir.path().join(format!("{who}.seed"));
    let key = |who: &str| {
        identity::keygen(who, &seed_path(who))
            .unwrap_or_else(|e| panic!("keygen {who}: {e}"))
            .public_key
    };
    let hub_admin = key("hub-admin");
    let hub_viewer = key("hub-viewer");
    // Each site's access file names its leafnode identity; acl-hub makes
    // the hub's authorization from them, with a read-only viewer for the
    // dashboard.
    let mut acl_hub = vec![
        "acl-hub".to_owned(),
        "--admin-nkey".to_owned(),
        hub_admin.clone(),
        "--viewer-nkey".to_owned(),
        hub_viewer.clone(),
    ];
    for site in ["a", "b"] {
        let access = dir.path().join(format!("{site}-access.toml"));
        let leafnode = key(&format!("{site}-leafnode"));
        std::fs::write(&access, format!("leafnode = {{ nkey = \"{leafnode}\" }}\n")).unwrap();
        acl_hub.push(format!("{site}={}", access.display()));
    }
    let args: Vec<&str> = acl_hub.iter().map(String::as_str).collect();
    let out = support::daemon::run_presenced(&args, &[]);
    assert!(
        out.status.success(),
        "acl-hub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let authorization = String::from_utf8(out.stdout).unwrap();
    // The real 3-node hub (R3 mirrors) under it, each site's leaf linked
    // to every node as its leafnode identity.
    let hub = support::Hub::start_authorized(3, &authorization);
    let leaf = |site: &str| {
        let seed = identity::read_seed(&seed_path(&format!("{site}-leafnode"))).unwrap();
        support::leaf_of_as(&Site::new(site).unwrap(), hub.leafnode_urls(), &seed)
    };
    let leaf_a = leaf("a");
    let mut leaf_b = leaf("b");
    let http_a = support::free_port();
    let cfg_a = dir.path().join("a.toml");
    std::fs::write(
        &cfg_a,
        daemon_config(
            "a",
            &leaf_a.url(),
            broker.port,
            http_a,
            &motion_mapping(true),
            ZONES,
        ),
    )
    .unwrap();
    let cfg_b = dir.path().join("b.toml");
    // Site b has no zones: an ingest-only instance.
    std::fs::write(
        &cfg_b,
        "runs = [\"ingest\"]\n".to_owned()
            + &daemon_config(
                "b",
                &leaf_b.url(),
                broker.port,
                support::free_port(),
                &motion_mapping(true),
                "",
            ),
    )
    .unwrap();
    provision(&cfg_a);
    provision(&cfg_b);
    // provision-hub reads each site's sources over its link, which comes
    // up a moment after the leaf starts.
    let hub_seed = seed_path("hub-admin");
    let servers = hub.client_urls().join(",");
    let provision_hub = [
        "provision-hub",
        "--server",
        &servers,
        "--site",
        "a",
        "--site",
        "b",
        "--nkey-seed-file",
        hub_seed.to_str().unwrap(),
    ];
    let mut last = String::new();
    support::wait_until(
        "provision-hub as the hub's admin",
        Duration::from_secs(30),
        || {
            let out = support::daemon::run_presenced(&provision_hub, &[]);
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            out.status.success()
        },
    );
    assert!(!last.contains("permission"), "{last}");
    let d = Daemon::start_at(&cfg_a, &[]);
    d.wait_healthy(
        SocketAddr::from(([127, 0, 0, 1], http_a)),
        Duration::from_secs(20),
    );

    // The dashboard reads the hub directly as the read-only viewer; sites
    // found from the mirrors.
    let viewer_seed = seed_path("hub-viewer");
    let cfg_hub = dir.path().join("hub.toml");
    std::fs::write(
        &cfg_hub,
        client_config("a", &servers).replace(
            "[nats]\n",
            &format!("[nats]\nnkey_seed_file = \"{}\"\n", viewer_seed.display()),
        ),
    )
    .unwrap();
    let port = support::free_port();
    let log = std::fs::File::create(dir.path().join("dashboard.log")).unwrap();
    let _dash = Dashboard(
        std::process::Command::new(support::presenced_bin())
            .args(["dashboard", "--config", cfg_hub.to_str().unwrap()])
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--stale-after",
                "3s",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    support::wait_until("the dashboard answers", Duration::from_secs(10), || {
        http_get(addr, "/").is_some_and(|(c, _)| c == 200)
    });
    let b = Browser::start();
    b.goto(&format!("http://{addr}/"));
    let row = |site: &str| {
        format!("var r = document.getElementById('site-row-{site}'); return r ? r.textContent : ''")
    };
    for site in ["a", "b"] {
        b.wait_for(
            &format!("site {site} reachable"),
            Duration::from_secs(20),
            &format!(
                "return (function(){{{}}})().indexOf('reachable') >= 0",
                row(site)
            ),
        );
    }
    b.eval("window.__notReloaded = true; return 1", json!([]));

    // A reading on site a reaches the fleet page through the mirror.
    let mut p = Publisher::connect(broker.port, "fleet-pub").await;
    p.publish(
        "test/lab_pir",
        format!(r#"{{"occupancy":true,"ts":{}}}"#, now_ms()),
    )
    .await;
    p.flush(Duration::from_secs(5)).await;
    let text = b.wait_for(
        "site a: 1 of 1 occupied and its last transition",
        Duration::from_secs(15),
        &format!(
            "var t = (function(){{{}}})(); return t.indexOf('1 of 1') >= 0 && t.indexOf('→ occupied') >= 0 ? t : null",
            row("a")
        ),
    );
    assert!(text.as_str().unwrap().contains("lab"), "{text}");

    // Site b's leaf goes away: its hub copy turns stale.
    leaf_b.stop();
    b.wait_for(
        "site b stale",
        Duration::from_secs(30),
        &format!(
            "return (function(){{{}}})().indexOf('stale') >= 0",
            row("b")
        ),
    );
    assert_eq!(
        b.eval("return window.__notReloaded === true", json!([])),
        json!(true)
    );
    shot(&b, "fleet");

    // A click opens site a's zones, read from its mirror.
    b.click("#site-row-a a");
    b.wait_for(
        "site a's zones from the hub",
        Duration::from_secs(10),
        &format!("return {LAB} === 'occupied'"),
    );
    assert!(content(&b, "h1").contains("site a"));
    shot(&b, "fleet-site-a");
    let (code, body) = http_get(addr, "/site/nope").unwrap();
    assert_eq!(code, 404, "{body}");
    // The hub refused the viewer nothing along the way.
    let log = std::fs::read_to_string(dir.path().join("dashboard.log")).unwrap();
    for refused in ["ermission", "cannot list"] {
        assert!(!log.contains(refused), "{log}");
    }
    // And the viewer changes nothing: deleting a mirror, creating a stream
    // or a durable consumer as it is refused, the mirror still there.
    let viewer = async_nats::ConnectOptions::with_nkey(
        identity::read_seed(&viewer_seed).unwrap().trim().to_owned(),
    )
    .custom_inbox_prefix("_INBOX.dashboard")
    .request_timeout(Some(Duration::from_secs(2)))
    .connect(hub.client_urls())
    .await
    .unwrap();
    let vjs = async_nats::jetstream::with_domain(viewer, "hub");
    let mirror = Site::new("a").unwrap().hub_mirror("SENSORS");
    assert!(
        vjs.delete_stream(&mirror).await.is_err(),
        "viewer deleted {mirror}"
    );
    assert!(
        vjs.create_stream(async_nats::jetstream::stream::Config {
            name: "VIEWER_MADE".into(),
            subjects: vec!["viewer.made".into()],
            ..Default::default()
        })
        .await
        .is_err(),
        "viewer created a stream"
    );
    let stream = vjs.get_stream(&mirror).await.unwrap();
    assert!(
        stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("viewer-durable".into()),
                ..Default::default()
            })
            .await
            .is_err(),
        "viewer created a durable consumer"
    );
    let admin = hub_admin_js(&hub, &hub_seed).await;
    assert!(
        admin.get_stream(&mirror).await.is_ok(),
        "{mirror} still there"
    );
    assert!(admin.get_stream("VIEWER_MADE").await.is_err());
}

async fn hub_admin_js(
    hub: &support::Hub,
    seed: &std::path::Path,
) -> async_nats::jetstream::Context {
    let client = async_nats::ConnectOptions::with_nkey(
        presenced::acl::identity::read_seed(seed)
            .unwrap()
            .trim()
            .to_owned(),
    )
    .connect(hub.client_urls())
    .await
    .unwrap();
    async_nats::jetstream::with_domain(client, "hub")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_an_instance_not_granted_the_zones_shows_its_health_and_reads_nothing_refused() {
    not_granted_the_zones(Layout::SplitPlain, true).await;
}

/// `page_commands` on and `commands` granted, but not `presence`: the page
/// must not read the zones either (a refused read stops the daemon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_allowed_commands_but_not_the_zones_reads_nothing_refused() {
    not_granted_the_zones(Layout::SplitCommandsOnly, false).await;
}

async fn not_granted_the_zones(layout: Layout, read_only: bool) {
    let w = world(layout).await;
    w.pir("page-plain-0", true).await;
    eventually(
        "lab decided by the engine instance",
        Duration::from_secs(15),
        || async { zone(&w.js, "lab").await.is_some() },
    )
    .await;
    let b = Browser::start();
    w.open(&b);
    assert!(b.find("#no-zones").is_some(), "{}", content(&b, "main"));
    assert!(b.find("#z-lab").is_none(), "no zone read without a grant");
    assert!(b.find("#src-main").is_some(), "its own sources are shown");
    assert_eq!(b.find("#readonly").is_some(), read_only, "read-only");
    shot(&b, &format!("site-{layout:?}"));
    // Opening the page asked nats-server for nothing this identity lacks:
    // a refusal would have stopped the daemon.
    b.goto(&w.url());
    support::wait_until("health still answered", Duration::from_secs(5), || {
        http_get(w.page, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    let log = w._daemons[0].log();
    assert!(!log.contains("permission violation"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_live_prints_each_accepted_reading_under_the_generated_acl() {
    let w = world(Layout::Single).await;
    let watch = common::watch::Watch::start(&w.page_config, &["--live"]);
    // The header is printed once the subscription is in place.
    support::wait_until("watch --live subscribed", Duration::from_secs(10), || {
        watch.text().iter().any(|l| l.starts_with("sensor"))
    });
    w.pir("page-live-0", true).await;
    support::wait_until("the reading printed", Duration::from_secs(10), || {
        watch.text().iter().any(|l| l.starts_with("lab_pir"))
    });
    let line = watch
        .text()
        .into_iter()
        .find(|l| l.starts_with("lab_pir"))
        .unwrap();
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((cols[1], cols[3]), ("true", "main"), "{line}");
    assert!(cols[2].ends_with('Z'), "{line}");
    // A rejected payload is not a reading: nothing more is printed for it.
    let mut p = Publisher::connect(w.broker.port, "page-live-1").await;
    p.publish("test/lab_pir", "not json").await;
    p.flush(Duration::from_secs(5)).await;
    w.pir("page-live-2", false).await;
    support::wait_until("the second reading", Duration::from_secs(10), || {
        watch
            .text()
            .iter()
            .filter(|l| l.starts_with("lab_pir"))
            .count()
            >= 2
    });
    let lines: Vec<String> = watch
        .text()
        .into_iter()
        .filter(|l| l.starts_with("lab_pir"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].split_whitespace().nth(1) == Some("false"),
        "{lines:?}"
    );
    assert!(!w._daemons[0].log().contains("permission violation"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_of_a_thousand_zones_loads_in_under_100_kb() {
    use std::io::{Read, Write};
    let zones: String = (0..1000)
        .map(|i| {
            format!(
                "[zones.room-{i:04}]\noccupied_above = 0.6\narrive_after = \"0s\"\nleave_after = \"0s\"\n[[zones.room-{i:04}.evidence]]\nsensor = \"room-{i:04}_pir\"\np_true = 0.95\np_false = 0.05\n"
            )
        })
        .collect();
    let w = world_with(Layout::Single, &zones).await;
    // One reading per zone, a third of them occupied.
    let mut p = Publisher::connect(w.broker.port, "page-1000").await;
    for i in 0..1000 {
        p.publish(
            &format!("test/room-{i:04}_pir"),
            format!(r#"{{"occupancy":{},"ts":{}}}"#, i % 3 == 0, now_ms()),
        )
        .await;
    }
    p.flush(Duration::from_secs(20)).await;
    // As a browser asks for it.
    let fetch = || {
        let mut s = std::net::TcpStream::connect(w.page).unwrap();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nAccept-Encoding: gzip, deflate, br\r\nConnection: close\r\n\r\n",
            w.page
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        (head, raw[split + 4..].to_vec())
    };
    let revision_of = |page: &str| -> u64 {
        page.split("data-rev=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|r| r.parse().ok())
            .expect("data-rev on the page")
    };
    // Until every zone is listed and the engine has settled (the newest
    // revision the same twice in a row, half a second apart).
    let mut page = String::new();
    let mut sent;
    let mut last_rev = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "the page never listed 1000 settled zones"
        );
        let (head, body) = fetch();
        assert!(head.contains("content-encoding: gzip"), "{head}");
        sent = body.len();
        page.clear();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut page)
            .unwrap();
        let rev = revision_of(&page);
        if page.matches("class=\"zone\"").count() >= 1000 && last_rev == Some(rev) {
            break;
        }
        last_rev = Some(rev);
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("1000 zones: {} bytes of HTML, {sent} sent", page.len());
    assert!(sent < 100 * 1024, "{sent} bytes sent for 1000 zones");
    // The page's event stream starts after the revisions it was rendered
    // with: the 1,000 cards are not sent a second time.
    let rev = revision_of(&page);
    let first_burst = |after: u64| {
        let mut s = std::net::TcpStream::connect(w.page).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let req = format!(
            "GET /events?after={after} HTTP/1.1\r\nHost: {}\r\n\r\n",
            w.page
        );
        s.write_all(req.as_bytes()).unwrap();
        // The stream never ends (health follows every second): read what
        // comes in the first 1.5 s.
        let mut raw = Vec::new();
        let mut buf = [0u8; 65536];
        let end = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < end {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&raw).matches("event: zone").count()
    };
    assert_eq!(
        first_burst(rev),
        0,
        "nothing changed since the page was rendered"
    );
    assert!(
        first_burst(0) >= 1000,
        "a page with nothing asks for everything"
    );
    // And in the browser: every card there, the whole load under 100 KB.
    let b = Browser::start();
    w.open(&b);
    let n = b.eval(
        "return document.querySelectorAll('#zones > li').length",
        json!([]),
    );
    assert!(n.as_u64().unwrap() >= 1000, "{n}");
    let weight = b.eval(
        "return performance.getEntries().reduce(function (s, e) { return s + (e.transferSize || 0); }, 0)",
        json!([]),
    );
    assert!(
        weight.as_u64().unwrap() < 100 * 1024,
        "page, script and style: {weight} bytes"
    );
    eprintln!("1000 zones in Chromium: {weight} bytes transferred");
    shot(&b, "site-1000-zones");
}
