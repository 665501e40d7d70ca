//! The fleet page: `presenced dashboard` serves every site the hub
//! mirrors, read from the mirrors only (JetStream domain `hub`), so it
//! works while a site is cut off and says how stale each copy is.
//!
//! `/` lists the sites: reachable or stale (time since the hub last heard
//! from the site's leaf), mirror lag, zones occupied, the last
//! transition. `/site/<site>` shows that site's zones from its mirror of
//! KV `presence`. Both are pushed live by server-sent events (`/events`):
//! each section is re-rendered when what it shows changed.

use super::render::{self, esc, span};
use crate::client::follow::{Bucket, Event as Followed, Follower, Op};
use crate::engine::{Presence, Transition, ZoneState};
use crate::naming::{self, Site};
use crate::time::Timestamp;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::broadcast;

/// `presenced dashboard`'s options; its config (read as every command's,
/// `src/cli/`) reaches the hub: a site's leaf (through its leaf link) or a
/// hub server, with an identity that may read the mirrors.
#[derive(Clone, Debug, clap::Args)]
pub struct DashboardArgs {
    /// Where to serve the fleet page.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub listen: SocketAddr,
    /// Sites to show; default: every site with a mirror of KV presence on
    /// the hub (listing streams needs `$JS.hub.API.STREAM.NAMES`).
    #[arg(long = "site")]
    pub sites: Vec<String>,
    /// A site whose leaf the hub has not heard from for this long is
    /// shown stale.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub stale_after: Duration,
}

/// What the hub knows of one site.
#[derive(Default)]
struct SiteView {
    /// Lag (messages) and time since last contact of the presence
    /// mirror, or why they cannot be read.
    mirror: Option<Result<(u64, Option<Duration>), String>>,
    zones: BTreeMap<String, (u64, ZoneState)>,
    last: Option<Transition>,
}

struct Fleet {
    js: async_nats::jetstream::Context,
    client: async_nats::Client,
    stale_after: Duration,
    sites: RwLock<BTreeMap<String, SiteView>>,
    /// Section id → last HTML sent, so only changes are pushed.
    sent: Mutex<HashMap<String, Arc<str>>>,
    tx: broadcast::Sender<(String, Arc<str>)>,
    /// Cancelled on Ctrl-C/SIGTERM: open event streams end, so the
    /// graceful shutdown does not wait for every open page.
    closing: tokio_util::sync::CancellationToken,
}

impl Fleet {
    fn fleet_table(&self) -> String {
        let sites = self.sites.read().unwrap_or_else(|p| p.into_inner());
        let now = Timestamp::now();
        let mut h = String::from("<div id=\"fleet\" class=\"scroll\"><table><caption class=\"note\">from the hub mirrors</caption><thead><tr><th scope=\"col\">site</th><th scope=\"col\">hub copy</th><th scope=\"col\">mirror lag</th><th scope=\"col\">zones occupied</th><th scope=\"col\">last transition</th></tr></thead><tbody>");
        for (name, v) in sites.iter() {
            let (state, lag) = match &v.mirror {
                None => (
                    "<span class=\"note\">reading…</span>".to_owned(),
                    "–".to_owned(),
                ),
                Some(Err(e)) => (
                    format!(
                        "<span class=\"down\">unreachable</span> <span class=\"note\">{}</span>",
                        esc(e)
                    ),
                    "–".to_owned(),
                ),
                Some(Ok((lag, active))) => {
                    let fresh = active.is_some_and(|a| a <= self.stale_after);
                    let contact = active
                        .map(|a| format!("{} ago", span(a.as_secs() as i64)))
                        .unwrap_or_else(|| "never".into());
                    (
                        if fresh {
                            format!("<span class=\"up\">reachable</span> <span class=\"note\">last contact {contact}</span>")
                        } else {
                            format!("<span class=\"down\">stale</span> <span class=\"note\">last contact {contact}</span>")
                        },
                        format!("{lag} messages"),
                    )
                }
            };
            let zones: Vec<_> = v
                .zones
                .iter()
                .filter(|(k, _)| !k.starts_with(naming::PERSON_KEY_PREFIX))
                .collect();
            let occupied = zones
                .iter()
                .filter(|(_, (_, z))| z.state == Presence::Occupied)
                .count();
            let last = v
                .last
                .as_ref()
                .map(|t| {
                    format!(
                        "{} {} → {}, {} ago",
                        esc(&t.zone),
                        t.from.as_str(),
                        t.to.as_str(),
                        span((now.millis() - t.at.millis()) / 1000)
                    )
                })
                .unwrap_or_else(|| "none".into());
            h.push_str(&format!(
                "<tr id=\"site-row-{id}\"><th scope=\"row\"><a href=\"site/{id}\">{id}</a></th><td>{state}</td><td>{lag}</td><td class=\"occupied\">{occupied} of {total}</td><td>{last}</td></tr>",
                id = esc(name),
                total = zones.len(),
            ));
        }
        if sites.is_empty() {
            h.push_str("<tr><td colspan=\"5\">no site mirrored on the hub yet</td></tr>");
        }
        h.push_str("</tbody></table></div>");
        h
    }

    fn site_zones(&self, site: &str) -> Option<String> {
        let sites = self.sites.read().unwrap_or_else(|p| p.into_inner());
        let v = sites.get(site)?;
        let now = Timestamp::now();
        let mut h = format!("<ul id=\"site-{}\" class=\"grid\">", esc(site));
        for (key, (rev, z)) in &v.zones {
            h.push_str(&render::zone_card(key, z, *rev, None, now, ""));
        }
        h.push_str("</ul>");
        Some(h)
    }

    /// Re-renders the fleet table and `site`'s zones; pushes what changed.
    fn push(&self, site: &str) {
        let mut sections = vec![("fleet".to_owned(), self.fleet_table())];
        if let Some(z) = self.site_zones(site) {
            sections.push((format!("site-{site}"), z));
        }
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        for (id, html) in sections {
            if sent.get(&id).is_some_and(|old| **old == *html) {
                continue;
            }
            let html: Arc<str> = Arc::from(html);
            sent.insert(id.clone(), html.clone());
            let _ = self.tx.send((id, html));
        }
    }

    /// Follows one site's mirror of KV presence for good.
    async fn follow(self: Arc<Self>, site: String) {
        let stream = naming::kv_stream(&format!("{}-{site}", naming::PRESENCE_BUCKET));
        let bucket = loop {
            match Bucket::find(&self.js, &stream).await {
                Ok(b) => break b,
                Err(error) => {
                    tracing::debug!(%site, %error, "dashboard: mirror not readable yet");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        let mut f = Follower::new(self.client.clone(), self.js.clone(), bucket, ">", false);
        loop {
            match f.next().await {
                Followed::Entry(e) => {
                    {
                        let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
                        let v = sites.entry(site.clone()).or_default();
                        match e.op {
                            Op::Put => {
                                if let Ok(z) = serde_json::from_slice::<ZoneState>(&e.value) {
                                    v.zones.insert(e.key, (e.revision, z));
                                }
                            }
                            Op::Delete | Op::Purge => {
                                v.zones.remove(&e.key);
                            }
                        }
                    }
                    self.push(&site);
                }
                Followed::Reset => {
                    let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
                    sites.entry(site.clone()).or_default().zones.clear();
                }
                Followed::SnapshotDone => self.push(&site),
            }
        }
    }

    /// Mirror lag and contact, and the last transition, of one site.
    async fn poll(&self, site: &str) {
        let stream = naming::kv_stream(&format!("{}-{site}", naming::PRESENCE_BUCKET));
        let mirror = match self.js.get_stream(&stream).await {
            Ok(mut s) => match s.info().await {
                Ok(info) => match &info.mirror {
                    Some(m) => Ok((m.lag, m.active)),
                    None => Err(format!("{stream} is not a mirror")),
                },
                Err(e) => Err(format!("{stream}: {e}")),
            },
            Err(e) => Err(format!("{stream}: {e}")),
        };
        let events = format!("{}-{site}", naming::EVENTS_STREAM);
        let mut last = None;
        if let Ok(mut s) = self.js.get_stream(&events).await {
            if let Ok(info) = s.info().await {
                let seq = info.state.last_sequence;
                if info.state.messages > 0 {
                    if let Ok(m) = s.get_raw_message(seq).await {
                        // A takeover record is no transition: the site
                        // keeps the last one shown.
                        let transition = Site::new(site)
                            .is_ok_and(|st| st.is_transition_subject(m.subject.as_str()));
                        if transition {
                            last = serde_json::from_slice::<Transition>(&m.payload).ok();
                        }
                    }
                }
            }
        }
        {
            let mut sites = self.sites.write().unwrap_or_else(|p| p.into_inner());
            let v = sites.entry(site.to_owned()).or_default();
            v.mirror = Some(mirror);
            if last.is_some() {
                v.last = last;
            }
        }
        self.push(site);
    }

    /// Sites named on the command line, else every `KV_presence-<site>`.
    async fn discover(&self, named: &[Site]) -> Vec<String> {
        if !named.is_empty() {
            return named.iter().map(|s| s.as_str().to_owned()).collect();
        }
        let prefix = format!("{}-", naming::kv_stream(naming::PRESENCE_BUCKET));
        let mut out = Vec::new();
        let mut names = self.js.stream_names();
        while let Some(n) = names.next().await {
            match n {
                Ok(n) => {
                    if let Some(site) = n.strip_prefix(&prefix) {
                        if Site::new(site).is_ok() {
                            out.push(site.to_owned());
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "dashboard: cannot list the hub's streams; name the sites with --site");
                    break;
                }
            }
        }
        out
    }
}

const HEAD: &str = "<!doctype html>\n<html lang=\"en\" data-link=\"live\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">";

fn html(code: StatusCode, body: String) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

async fn index(State(f): State<Arc<Fleet>>) -> Response {
    html(
        StatusCode::OK,
        format!(
            "{HEAD}<title>presenced · fleet</title><link rel=\"stylesheet\" href=\"page.css\"></head><body><header><h1>presenced · fleet</h1><p>stream: <span id=\"link\" class=\"live\" role=\"status\" aria-live=\"polite\">live</span></p></header><main><h2>Sites</h2>{}</main><script src=\"page.js\"></script></body></html>\n",
            f.fleet_table()
        ),
    )
}

async fn site_page(State(f): State<Arc<Fleet>>, Path(site): Path<String>) -> Response {
    let Some(zones) = f.site_zones(&site) else {
        return (
            StatusCode::NOT_FOUND,
            format!("not found: no site {site:?} on the hub\n"),
        )
            .into_response();
    };
    html(
        StatusCode::OK,
        format!(
            "{HEAD}<title>presenced · {s} (hub copy)</title><link rel=\"stylesheet\" href=\"../page.css\"></head><body><header><h1>site {s} <span class=\"note\">from its hub mirror</span></h1><p><a href=\"../\">all sites</a> · stream: <span id=\"link\" class=\"live\" role=\"status\" aria-live=\"polite\">live</span></p></header><main><h2>Zones and people</h2>{zones}</main><script src=\"../page.js\" data-events=\"../events\"></script></body></html>\n",
            s = esc(&site)
        ),
    )
}

async fn events(State(f): State<Arc<Fleet>>) -> impl IntoResponse {
    let rx = f.tx.subscribe();
    let first: Vec<(String, Arc<str>)> = f
        .sent
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let section = |(id, html): (String, Arc<str>)| {
        Event::default()
            .event("section")
            .data(serde_json::json!({ "id": id, "html": &*html }).to_string())
    };
    let link = Event::default()
        .event("link")
        .data(serde_json::json!({ "state": "live", "now": Timestamp::now().millis() }).to_string());
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(s) => return Some((s, rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .map(section);
    let stream = futures::stream::iter(std::iter::once(link).chain(first.into_iter().map(section)))
        .chain(rest)
        .take_until(f.closing.clone().cancelled_owned())
        .map(Ok::<_, Infallible>);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn not_found(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("not found: {} (try /)\n", uri.path()),
    )
        .into_response()
}

fn router(f: Arc<Fleet>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/site/{site}", get(site_page))
        .route("/events", get(events))
        .route(
            "/page.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    super::CSS,
                )
            }),
        )
        .route(
            "/page.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    super::JS,
                )
            }),
        )
        .fallback(not_found)
        .with_state(f)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `presenced dashboard`: serves the fleet page until SIGTERM or Ctrl-C.
pub async fn run(cfg: crate::config::Config, args: DashboardArgs) -> anyhow::Result<()> {
    let named = args
        .sites
        .iter()
        .map(|s| Site::new(s))
        .collect::<Result<Vec<_>, _>>()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let who: crate::store::connect::As = crate::store::connect::As {
        // Its own inbox prefix, whoever it runs as: the hub's viewer
        // identity is granted replies there only.
        service: Some(crate::acl::render::DASHBOARD_INBOX.to_owned()),
        violations: None,
    };
    let client =
        crate::store::connect_as(&cfg.nats, "presenced-dashboard", None, None, &who).await?;
    let js = async_nats::jetstream::with_domain(client.clone(), naming::HUB_DOMAIN);
    let (tx, _) = broadcast::channel(256);
    let fleet = Arc::new(Fleet {
        js,
        client,
        stale_after: args.stale_after,
        sites: RwLock::new(BTreeMap::new()),
        sent: Mutex::new(HashMap::new()),
        tx,
        closing: tokio_util::sync::CancellationToken::new(),
    });
    tracing::info!(listen = %args.listen, "serving the fleet page");
    let f = fleet.clone();
    let work = async move {
        let mut following = std::collections::BTreeSet::new();
        let mut every = tokio::time::interval(Duration::from_secs(1));
        let mut round = 0u64;
        let mut sites = Vec::new();
        loop {
            every.tick().await;
            if round % 5 == 0 {
                sites = f.discover(&named).await;
            }
            round += 1;
            for site in &sites {
                if following.insert(site.clone()) {
                    tokio::spawn(f.clone().follow(site.clone()));
                }
                f.poll(site).await;
            }
        }
    };
    tokio::spawn(work);
    let closing = fleet.closing.clone();
    axum::serve(listener, router(fleet))
        .with_graceful_shutdown(async move {
            terminated().await;
            closing.cancel();
        })
        .await?;
    Ok(())
}
