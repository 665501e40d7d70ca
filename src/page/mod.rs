//! The live status page on the daemon's HTTP listener: `/` renders every
//! zone and person and the daemon's health; `/events` pushes changes as
//! server-sent events; `/override` takes the override form.
//!
//! Zones come from a watch on KV `presence` (snapshot, then deltas, each
//! with its revision), health from [`crate::http::report`], the very
//! report `/healthz` answers. A page that reconnects, or a watch that is
//! restarted after nats-server comes back, sends zones again; every card
//! carries its revision so nothing older replaces something newer and
//! nothing is shown twice. See docs/OPERATIONS.md "Status page".

pub mod fleet;
pub mod form;
pub mod render;
pub mod timeline;

use crate::engine::command::{self, Request, COMMAND_SCHEMA};
use crate::engine::{Model, Presence, ZoneState};
use crate::metrics::Metrics;
use crate::naming::{self, Site};
use crate::time::Timestamp;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::future;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

const CSS: &str = include_str!("assets/page.css");
const JS: &str = include_str!("assets/page.js");

/// Updates queued per open page before it is counted as lagging (and
/// sent everything again).
const CHANNEL: usize = 1024;

/// Longest wait of the first page for the zones to be read.
const FIRST_LOAD_WAIT: Duration = Duration::from_secs(2);

/// Longest wait for the engine's reply to a command from the form.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Shortest time between two cards of one zone sent to the open pages. A
/// zone's first change after a quiet spell goes out at once; changes
/// within this interval wait and only the newest is sent (the page shows
/// the newest state either way). Without it every KV write was rendered,
/// encoded and sent to every page: ten pages on 1,000 busy zones cost a
/// quarter of the daemon's rate (docs/PERFORMANCE.md).
const CARD_INTERVAL: Duration = Duration::from_millis(500);

/// Cards per second, all zones together, for changes that leave a zone's
/// state as it was (confidence and evidence moving); a burst of as many
/// goes out at once. A zone whose state changed (vacant, arriving,
/// occupied, leaving) is held only by [`CARD_INTERVAL`]. Why: with the
/// interval alone, 1,000 busy zones still sent 2,000 cards a second to
/// every page, more than anyone reads and most of what the pages cost the
/// daemon; with the budget the waiting zones take turns, oldest first.
const CARD_BUDGET: f64 = 200.0;

/// How often waiting cards are looked at.
const CARD_TICK: Duration = Duration::from_millis(100);

/// Which cards went out when, which wait, and what is left of the budget.
struct Cards {
    /// When each zone's card last went out, and the state it showed.
    last: HashMap<String, (Instant, Presence)>,
    /// Zones with a newer value than their card, oldest first; `queued`
    /// holds the same keys.
    waiting: VecDeque<String>,
    queued: HashSet<String>,
    /// Cards [`CARD_BUDGET`] still allows now, refilled continuously.
    tokens: f64,
    refilled: Instant,
}

impl Default for Cards {
    fn default() -> Self {
        Cards {
            last: HashMap::new(),
            waiting: VecDeque::new(),
            queued: HashSet::new(),
            tokens: CARD_BUDGET,
            refilled: Instant::now(),
        }
    }
}

impl Cards {
    fn refill(&mut self, now: Instant) {
        let secs = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + secs * CARD_BUDGET).min(CARD_BUDGET);
        self.refilled = now;
    }

    /// Whether a card of `key`, now in `state`, may go out at `now`; if
    /// it may, it is counted as sent.
    fn take(&mut self, key: &str, state: Presence, now: Instant) -> bool {
        let due = match self.last.get(key) {
            None => true,
            Some((at, shown)) if now.duration_since(*at) >= CARD_INTERVAL => {
                if *shown != state {
                    true
                } else {
                    self.refill(now);
                    self.tokens >= 1.0
                }
            }
            Some(_) => false,
        };
        if due {
            if self.last.get(key).is_some_and(|(_, shown)| *shown == state) {
                self.tokens -= 1.0;
            }
            match self.last.get_mut(key) {
                Some(l) => *l = (now, state),
                None => {
                    self.last.insert(key.to_owned(), (now, state));
                }
            }
        }
        due
    }

    fn wait(&mut self, key: &str) {
        if !self.queued.contains(key) {
            self.queued.insert(key.to_owned());
            self.waiting.push_back(key.to_owned());
        }
    }

    fn clear(&mut self) {
        self.waiting.clear();
        self.queued.clear();
    }
}

/// One change pushed to every open page.
#[derive(Clone, Debug)]
enum Update {
    /// `data`: the event's JSON, encoded once for every page.
    Zone {
        data: Arc<str>,
    },
    Gone {
        key: String,
        revision: u64,
    },
    Health(Arc<str>),
    Link,
    /// The bucket starts over (recreated): pages load afresh.
    Reset,
}

/// What is known of one key of KV `presence`.
struct Entry {
    revision: u64,
    /// The zone's state, read at once (the timeline and the card budget
    /// need it).
    state: Presence,
    /// The value as stored, parsed in full only when a card is rendered:
    /// at most a few times a second per zone, where the zone may be
    /// written thousands of times.
    value: Bytes,
}

/// The part of a `presence` value read on every write.
#[derive(serde::Deserialize)]
struct Head {
    state: Presence,
    since: Timestamp,
}

/// The NATS side, once the daemon has connected.
struct Nats {
    client: async_nats::Client,
}

/// May the form send commands? Unknown until the ownership table is read.
const MAY_UNKNOWN: u8 = 0;
const MAY_YES: u8 = 1;
const MAY_NO: u8 = 2;

/// The page's state, shared by the HTTP handlers and the watch task.
pub struct Page {
    site: Site,
    service: String,
    metrics: Arc<Metrics>,
    /// Thresholds per zone; a zone the local config lacks (another
    /// instance's) is shown without them.
    model: Arc<Model>,
    /// `http.page_commands`: the operator allows the form on this listener.
    commands_configured: bool,
    /// The ownership table grants this identity `commands` (or there is
    /// no table: a site without ACLs).
    may_command: AtomicU8,
    /// The ownership table grants this identity reads of KV `presence`
    /// (or there is no table); known before the page follows anything.
    may_read_zones: AtomicU8,
    csrf: String,
    zones: RwLock<BTreeMap<String, Entry>>,
    /// The watch has delivered the whole snapshot and is following.
    watching: AtomicBool,
    nats: OnceLock<Nats>,
    tx: broadcast::Sender<Update>,
    health: RwLock<Arc<str>>,
    /// Cancelled when the daemon stops: open event streams end then, or
    /// the HTTP server's graceful shutdown would wait for every open page
    /// until the drain timeout.
    closing: tokio_util::sync::CancellationToken,
    /// Set by the first page request: until then nothing is followed, so
    /// an appliance nobody looks at pays nothing for its page.
    wanted: tokio::sync::Notify,
    /// True once the first snapshot of KV `presence` is in: the first
    /// page waits for it (briefly) so that it is complete, form included.
    loaded: watch::Sender<bool>,
    /// (when, rejects counter) over the last minute.
    reject_samples: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
    /// The last hour of each zone ([`timeline`]).
    timelines: RwLock<std::collections::HashMap<String, timeline::History>>,
    cards: std::sync::Mutex<Cards>,
}

impl Page {
    /// `stop` turning true ends every open event stream.
    pub fn new(
        site: Site,
        service: String,
        metrics: Arc<Metrics>,
        model: Arc<Model>,
        commands_configured: bool,
        mut stop: watch::Receiver<bool>,
    ) -> Arc<Page> {
        let (tx, _) = broadcast::channel(CHANNEL);
        let closing = tokio_util::sync::CancellationToken::new();
        let token = closing.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            token.cancel();
        });
        Arc::new(Page {
            closing,
            wanted: tokio::sync::Notify::new(),
            loaded: watch::Sender::new(false),
            timelines: RwLock::new(Default::default()),
            cards: Default::default(),
            reject_samples: Default::default(),
            site,
            service,
            metrics,
            model,
            commands_configured,
            may_command: AtomicU8::new(MAY_UNKNOWN),
            may_read_zones: AtomicU8::new(MAY_UNKNOWN),
            csrf: form::new_token(),
            zones: RwLock::new(BTreeMap::new()),
            watching: AtomicBool::new(false),
            nats: OnceLock::new(),
            tx,
            health: RwLock::new(Arc::from("")),
        })
    }

    /// `live` while the watch follows KV `presence` over a connected
    /// client, `loading` until its first snapshot is in, else
    /// `reconnecting`.
    fn link(&self) -> &'static str {
        let connected = self
            .metrics
            .handle::<crate::store::metrics::LinkMetrics>()
            .is_some_and(|l| l.connected.load(Ordering::Relaxed));
        if !connected {
            "reconnecting"
        } else if self.watching.load(Ordering::Relaxed) {
            "live"
        } else {
            "loading"
        }
    }

    /// A page was asked for: start following (once; a stored permit
    /// covers a request made before the follower waits).
    fn want(&self) {
        self.wanted.notify_one();
    }

    /// Whether this instance may read KV `presence` for the page: a read
    /// the ACL refuses would stop the daemon, so only where it is known
    /// to be granted: the engine owns the bucket; any other identity only
    /// when the stored ownership table lists `presence` in its reads (or
    /// no table is stored: a site without ACLs).
    fn shows_zones(&self) -> bool {
        self.runs("engine") || self.may_read_zones.load(Ordering::Relaxed) == MAY_YES
    }

    fn runs(&self, component: &str) -> bool {
        self.metrics
            .runs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|r| r == component)
    }

    fn commands_on(&self) -> bool {
        self.commands_configured
            && self.may_command.load(Ordering::Relaxed) == MAY_YES
            && self.nats.get().is_some()
    }

    fn card(&self, key: &str, e: &Entry, now: Timestamp) -> String {
        let bar = self
            .timelines
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|h| timeline::svg(h, now))
            .unwrap_or_default();
        match serde_json::from_slice::<ZoneState>(&e.value) {
            Ok(state) => render::zone_card(
                key,
                &state,
                e.revision,
                self.model.zones.get(key),
                now,
                &bar,
            ),
            Err(error) => {
                tracing::warn!(%key, revision = e.revision, %error, "status page: unreadable value in KV presence");
                render::unreadable_card(key, e.revision, &error.to_string())
            }
        }
    }

    fn render_health(&self, now: Timestamp) -> String {
        let (_, mut report) = crate::http::report(&self.metrics);
        if report["ingest"].is_object() {
            report["ingest"]["rejects_last_minute"] = self.rejects_last_minute().into();
            if let Some(ingest) = self
                .metrics
                .handle::<crate::ingest::metrics::IngestMetrics>()
            {
                let live = ingest.live.read().unwrap_or_else(|p| p.into_inner());
                report["live"] = live.values().cloned().collect::<Vec<_>>().into();
            }
        }
        render::health(&report, now)
    }

    /// Rejects in the last minute, from the counter sampled each time
    /// health is rendered (every second while a page is open); `None`
    /// until a minute of samples is held.
    fn rejects_last_minute(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let count = self
            .metrics
            .handle::<crate::ingest::metrics::IngestMetrics>()
            .map_or(0, |i| i.rejects.load(Ordering::Relaxed));
        let mut samples = self
            .reject_samples
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_millis(900))
        {
            samples.push_back((now, count));
        }
        while samples.len() > 1
            && samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(60))
        {
            samples.pop_front();
        }
        let (t0, c0) = *samples.front()?;
        (now.duration_since(t0) >= Duration::from_secs(59)).then(|| count.saturating_sub(c0))
    }

    /// Starts following KV `presence` and refreshing health, once the
    /// daemon is connected; ends when `stop` turns true.
    pub async fn follow(
        self: Arc<Self>,
        client: async_nats::Client,
        js: async_nats::jetstream::Context,
        mut stop: watch::Receiver<bool>,
    ) {
        let _ = self.nats.set(Nats {
            client: client.clone(),
        });
        let page = self.clone();
        let health = async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            let mut link = "";
            loop {
                every.tick().await;
                if page.tx.receiver_count() == 0 {
                    // No page open: nothing to refresh.
                    link = "";
                    page.health
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone_from(&Arc::from(""));
                    continue;
                }
                let html: Arc<str> = Arc::from(page.render_health(Timestamp::now()));
                let changed = {
                    let mut h = page.health.write().unwrap_or_else(|p| p.into_inner());
                    let changed = **h != *html;
                    *h = html.clone();
                    changed
                };
                if changed {
                    let _ = page.tx.send(Update::Health(html));
                }
                let now = page.link();
                if now != link {
                    link = now;
                    let _ = page.tx.send(Update::Link);
                }
            }
        };
        let page = self.clone();
        let table = async move {
            // The ownership table decides whether the form may send
            // commands; read again until an answer comes.
            loop {
                let stream = naming::kv_stream(naming::OWNERS_BUCKET);
                match crate::acl::published::read(&js, &stream).await {
                    Ok(t) => {
                        let granted =
                            |f: &dyn Fn(&crate::store::published::PublishedService) -> bool| {
                                t.as_ref()
                                    .is_none_or(|t| t.services.get(&page.service).is_some_and(f))
                            };
                        let may = granted(&|s| s.commands);
                        let reads = granted(&|s| s.reads.iter().any(|r| r == "presence"));
                        page.may_read_zones
                            .store(if reads { MAY_YES } else { MAY_NO }, Ordering::Relaxed);
                        page.may_command
                            .store(if may { MAY_YES } else { MAY_NO }, Ordering::Relaxed);
                        tracing::info!(
                            commands = may,
                            "status page: override form {}",
                            if may {
                                "allowed by the ownership table"
                            } else {
                                "read-only: this identity is not granted commands"
                            }
                        );
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "status page: cannot read the ownership table yet");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
            page.wanted.notified().await;
            if page.shows_zones() {
                page.watch(client, js).await;
            } else {
                // Health only: nothing to follow, nothing to wait for.
                page.loaded.send_replace(true);
                page.watching.store(true, Ordering::Relaxed);
                let _ = page.tx.send(Update::Link);
                std::future::pending::<()>().await;
            }
        };
        let page = self.clone();
        let cards = async move {
            let mut every = tokio::time::interval(CARD_TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                page.flush_cards();
            }
        };
        tokio::select! {
            _ = health => {}
            _ = cards => {}
            _ = table => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }

    /// Follows KV `presence` for as long as the daemon runs, with the
    /// clients' own follower ([`crate::client::follow`]): it recovers from
    /// a nats-server restart by resuming after the last revision seen,
    /// and never needs a grant beyond reading the bucket (async-nats' KV
    /// watcher deletes its old consumer on recovery, which the generated
    /// ACL refuses and which would stop the daemon).
    async fn watch(&self, client: async_nats::Client, js: async_nats::jetstream::Context) {
        use crate::client::follow::{Bucket, Event as Followed, Follower};
        let stream = naming::kv_stream(naming::PRESENCE_BUCKET);
        let bucket = loop {
            match Bucket::find(&js, &stream).await {
                Ok(b) => break b,
                Err(error) => {
                    tracing::debug!(%error, "status page: KV presence not there yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        // The last hour from EVENTS, where this instance owns the stream.
        let runs_engine = self.runs("engine");
        if runs_engine {
            match timeline::read(&js, &self.site, Timestamp::now()).await {
                Ok(seeded) => {
                    let mut t = self.timelines.write().unwrap_or_else(|p| p.into_inner());
                    t.extend(seeded);
                }
                Err(error) => {
                    tracing::warn!(%error, "status page: cannot read the last hour of EVENTS; timelines start now")
                }
            }
        }
        // Where this instance runs the engine, its commits come in memory
        // ([`crate::engine::feed`]) and KV is followed only until the feed
        // is known to carry on from where KV is (or again after the feed
        // lagged or closed).
        let mut feed = self
            .metrics
            .handle::<crate::engine::metrics::EngineMetrics>()
            .map(|m| m.feed.watch());
        let follower = |after: Option<u64>| {
            let f = Follower::new(client.clone(), js.clone(), bucket.clone(), ">", false);
            match after {
                Some(seen) => f.after(seen),
                None => f,
            }
        };
        let mut kv = Some(follower(None));
        let mut rx: Option<broadcast::Receiver<crate::engine::feed::Batch>> = None;
        // The first revision the feed delivered since it was (re)joined,
        // and the newest it delivered.
        let mut feed_from: Option<u64> = None;
        let mut feed_seen: u64 = 0;
        // A snapshot after a reset replaces everything: keys not in it are
        // gone, and revisions may start over (a recreated bucket).
        let mut fresh: Option<std::collections::BTreeSet<String>> = None;
        enum Step {
            Kv(Followed),
            Feed(Result<crate::engine::feed::Batch, broadcast::error::RecvError>),
            FeedOpened,
        }
        loop {
            if rx.is_none() {
                if let Some(open) = feed.as_mut().and_then(|w| w.borrow_and_update().clone()) {
                    rx = Some(open.subscribe());
                    feed_from = None;
                }
            }
            let step = tokio::select! {
                e = async {
                    match kv.as_mut() {
                        Some(f) => f.next().await,
                        None => std::future::pending().await,
                    }
                } => Step::Kv(e),
                r = async {
                    match rx.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => Step::Feed(r),
                opened = async {
                    match feed.as_mut() {
                        Some(w) => w.changed().await,
                        None => std::future::pending().await,
                    }
                }, if rx.is_none() => {
                    if opened.is_err() {
                        feed = None;
                    }
                    Step::FeedOpened
                }
            };
            match step {
                Step::Kv(Followed::Entry(e)) => {
                    if let Some(seen) = fresh.as_mut() {
                        seen.insert(e.key.clone());
                    }
                    self.apply(e, fresh.is_some());
                }
                Step::Kv(Followed::Reset) => {
                    fresh = Some(Default::default());
                    self.zones
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .values_mut()
                        .for_each(|e| e.revision = 0);
                    let _ = self.tx.send(Update::Reset);
                }
                Step::Kv(Followed::SnapshotDone) => {
                    if let Some(seen) = fresh.take() {
                        self.zones
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|k, _| seen.contains(k));
                    }
                    self.loaded.send_replace(true);
                    if !self.watching.swap(true, Ordering::Relaxed) {
                        let _ = self.tx.send(Update::Link);
                    }
                }
                Step::Feed(Ok(batch)) => {
                    use crate::client::follow::{Entry, Op};
                    if let Some(first) = batch.first() {
                        feed_from.get_or_insert(first.revision);
                    }
                    for c in batch.iter() {
                        feed_seen = feed_seen.max(c.revision);
                        let (op, value) = match &c.value {
                            Some(v) => (Op::Put, v.clone()),
                            None => (Op::Delete, Bytes::new()),
                        };
                        self.apply(
                            Entry {
                                key: c.key.clone(),
                                revision: c.revision,
                                op,
                                value,
                            },
                            false,
                        );
                    }
                }
                Step::Feed(Err(lost)) => {
                    // Lagged: what was missed is in KV, after the newest
                    // revision the feed delivered. Closed: the engine
                    // stopped writing here, or wrote around the feed.
                    if matches!(lost, broadcast::error::RecvError::Closed) {
                        rx = None;
                    }
                    tracing::debug!(error = %lost, after = feed_seen, "status page: following KV presence again");
                    feed_from = None;
                    if kv.is_none() {
                        kv = Some(follower(Some(feed_seen)));
                    }
                }
                Step::FeedOpened => {}
            }
            // KV has delivered everything before the feed's first batch:
            // from here the feed alone is complete.
            let caught_up = kv.as_ref().is_some_and(|f| {
                fresh.is_none()
                    && self.watching.load(Ordering::Relaxed)
                    && feed_from.is_some_and(|from| f.last_seen().is_some_and(|s| s + 1 >= from))
            });
            if caught_up {
                tracing::debug!(
                    kv_seen = ?kv.as_ref().and_then(|f| f.last_seen()),
                    feed_from = ?feed_from,
                    "status page: KV has caught up with the engine's feed; reading the feed alone"
                );
                kv = None;
            }
        }
    }

    fn apply(&self, entry: crate::client::follow::Entry, resetting: bool) {
        use crate::client::follow::Op;
        let key = entry.key;
        let revision = entry.revision;
        let update = {
            let mut zones = self.zones.write().unwrap_or_else(|p| p.into_inner());
            let held = zones.get(&key);
            if revision <= held.map_or(0, |e| e.revision) && !resetting {
                None
            } else {
                match entry.op {
                    Op::Put => match serde_json::from_slice::<Head>(&entry.value) {
                        Ok(head) => {
                            if held.map(|e| e.state) != Some(head.state) {
                                timeline::record(
                                    self.timelines
                                        .write()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .entry(key.clone())
                                        .or_default(),
                                    head.since,
                                    head.state,
                                    Timestamp::now(),
                                );
                            }
                            let e = Entry {
                                revision,
                                state: head.state,
                                value: entry.value,
                            };
                            // Rendered only for open pages: with none, a
                            // burst costs reading the state alone.
                            let update = (self.tx.receiver_count() > 0
                                && self.card_due(&key, head.state))
                            .then(|| self.zone_update(&key, &e, Timestamp::now()));
                            zones.insert(key, e);
                            update
                        }
                        Err(error) => {
                            tracing::warn!(%key, revision, %error, "status page: unreadable value in KV presence; not shown");
                            None
                        }
                    },
                    Op::Delete | Op::Purge => {
                        zones.remove(&key);
                        Some(Update::Gone { key, revision })
                    }
                }
            }
        };
        if let Some(u) = update {
            let _ = self.tx.send(u);
        }
    }

    /// A zone's card as an update for the open pages.
    fn zone_update(&self, key: &str, e: &Entry, now: Timestamp) -> Update {
        let data = serde_json::json!({
            "id": render::card_id(key),
            "key": key,
            "list": Self::list_of(key),
            "rev": e.revision,
            "html": self.card(key, e, now),
        })
        .to_string();
        Update::Zone {
            data: Arc::from(data),
        }
    }

    /// Whether `key`'s card, now showing `state`, may go out now; if not,
    /// it waits and [`Page::flush_cards`] sends its newest value later.
    fn card_due(&self, key: &str, state: Presence) -> bool {
        let mut cards = self.cards.lock().unwrap_or_else(|p| p.into_inner());
        let due = cards.take(key, state, Instant::now());
        if due {
            // Sent now: a turn it still has in the queue is skipped.
            cards.queued.remove(key);
        } else {
            cards.wait(key);
        }
        due
    }

    /// Sends the waiting cards that may go out now ([`Cards::take`]),
    /// each with the zone's newest value; the others keep their turn.
    fn flush_cards(&self) {
        let now = Instant::now();
        let at = Timestamp::now();
        let updates: Vec<Update> = {
            // Zones before cards, the order `apply` takes them in.
            let zones = self.zones.read().unwrap_or_else(|p| p.into_inner());
            let mut cards = self.cards.lock().unwrap_or_else(|p| p.into_inner());
            if self.tx.receiver_count() == 0 {
                cards.clear();
                return;
            }
            if cards.waiting.is_empty() {
                return;
            }
            let mut updates = Vec::new();
            let waiting = std::mem::take(&mut cards.waiting);
            // A key sent out of turn and waiting again has two places in
            // the queue: the first one counts.
            let mut seen = HashSet::with_capacity(waiting.len());
            for key in waiting {
                if !cards.queued.contains(&key) || !seen.insert(key.clone()) {
                    continue;
                }
                let Some(e) = zones.get(&key) else {
                    cards.queued.remove(&key);
                    continue;
                };
                if cards.take(&key, e.state, now) {
                    cards.queued.remove(&key);
                    updates.push(self.zone_update(&key, e, at));
                } else {
                    cards.waiting.push_back(key);
                }
            }
            updates
        };
        for u in updates {
            let _ = self.tx.send(u);
        }
    }

    fn list_of(key: &str) -> &'static str {
        if key.starts_with(naming::PERSON_KEY_PREFIX) {
            "persons"
        } else {
            "zones"
        }
    }

    fn link_event(&self) -> Event {
        Event::default().event("link").data(
            serde_json::json!({ "state": self.link(), "now": Timestamp::now().millis() })
                .to_string(),
        )
    }

    fn event_of(&self, u: &Update) -> Event {
        match u {
            Update::Zone { data } => Event::default().event("zone").data(&**data),
            Update::Gone { key, revision } => Event::default().event("gone").data(
                serde_json::json!({ "id": render::card_id(key), "rev": revision }).to_string(),
            ),
            Update::Health(html) => Event::default().event("health").data(&**html),
            Update::Link => self.link_event(),
            Update::Reset => Event::default().event("reset").data("{}"),
        }
    }

    /// Everything a page needs to be current: the link, every zone newer
    /// than revision `after` (what the page was rendered with: KV
    /// revisions grow across all keys), health. Each card is rendered
    /// as the page takes it: all of them at once, for ten pages opening
    /// (or falling behind) together on 1,000 zones, were megabytes held
    /// until sent, and the heap kept the peak.
    fn snapshot(self: &Arc<Self>, after: u64) -> BoxStream<'static, Event> {
        let keys: Vec<String> = {
            let zones = self.zones.read().unwrap_or_else(|p| p.into_inner());
            zones
                .iter()
                .filter(|(_, e)| e.revision > after)
                .map(|(key, _)| key.clone())
                .collect()
        };
        let link = self.link_event();
        let (cards, last) = (Arc::clone(self), Arc::clone(self));
        futures::stream::once(future::ready(link))
            .chain(
                futures::stream::iter(keys)
                    .filter_map(move |key| future::ready(cards.zone_event(&key))),
            )
            .chain(futures::stream::once(future::ready(())).map(move |()| {
                let html = last.render_health(Timestamp::now());
                last.event_of(&Update::Health(Arc::from(html)))
            }))
            .boxed()
    }

    /// The card of zone `key` as it is now; `None` once it is gone.
    fn zone_event(&self, key: &str) -> Option<Event> {
        let zones = self.zones.read().unwrap_or_else(|p| p.into_inner());
        let update = self.zone_update(key, zones.get(key)?, Timestamp::now());
        drop(zones);
        Some(self.event_of(&update))
    }

    fn index(&self) -> String {
        let now = Timestamp::now();
        let mut zones = String::new();
        let mut persons = String::new();
        let mut keys = Vec::new();
        let mut newest = 0;
        {
            let held = self.zones.read().unwrap_or_else(|p| p.into_inner());
            for (key, e) in held.iter() {
                newest = newest.max(e.revision);
                let list = if Self::list_of(key) == "persons" {
                    &mut persons
                } else {
                    &mut zones
                };
                list.push_str(&self.card(key, e, now));
                keys.push(key.clone());
            }
        }
        for key in self.model.zones.keys() {
            if !keys.contains(key) {
                keys.push(key.clone());
            }
        }
        keys.sort();
        let site = render::esc(self.site.as_str());
        let link = self.link();
        let form = self.form_html(&keys);
        if !self.shows_zones() {
            zones = "<li class=\"note\" id=\"no-zones\">This instance does not run the engine: its page shows its own health; the zones are on the page of the instance that runs the engine.</li>".into();
        }
        format!(
            "<!doctype html>\n<html lang=\"en\" data-now=\"{now_ms}\" data-link=\"{link}\" data-rev=\"{newest}\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>presenced · {site}</title><link rel=\"stylesheet\" href=\"page.css\"></head><body><a href=\"#zones-h\" class=\"note\">skip to zones</a><header><h1>presenced · site {site}</h1><p>stream: <span id=\"link\" class=\"{link}\" role=\"status\" aria-live=\"polite\">{link}</span></p></header><main><section aria-labelledby=\"zones-h\"><h2 id=\"zones-h\">Zones</h2><ul id=\"zones\" class=\"grid\">{zones}</ul></section><section aria-labelledby=\"persons-h\"><h2 id=\"persons-h\">People</h2><ul id=\"persons\" class=\"grid\">{persons}</ul></section>{health}{form}</main><script src=\"page.js\"></script></body></html>\n",
            now_ms = now.millis(),
            health = self.render_health(now),
        )
    }

    fn form_html(&self, keys: &[String]) -> String {
        if !self.commands_on() {
            return "<section aria-labelledby=\"ovr-h\"><h2 id=\"ovr-h\">Override</h2><p class=\"note\" id=\"readonly\">Read-only: overrides are sent with <code>presenced cmd</code>. The form appears when <code>http.page_commands</code> is set and this daemon's identity is granted <code>commands</code>.</p></section>".into();
        }
        let options: String = keys
            .iter()
            .map(|k| format!("<option>{}</option>", render::esc(k)))
            .collect();
        format!(
            "<section aria-labelledby=\"ovr-h\"><h2 id=\"ovr-h\">Override</h2><form method=\"post\" action=\"override\" id=\"override\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><label>zone <select name=\"zone\" required>{options}</select></label><fieldset><legend>hold</legend><label><input type=\"radio\" name=\"state\" value=\"occupied\" checked> occupied</label><label><input type=\"radio\" name=\"state\" value=\"vacant\"> vacant</label></fieldset><label>for <input name=\"for\" value=\"30m\" required aria-describedby=\"for-note\"></label><span class=\"note\" id=\"for-note\">e.g. 30m, 2h (at most 30 days)</span><label>by <input name=\"by\" required autocomplete=\"username\"></label><label>why <input name=\"reason\"></label><div><button name=\"op\" value=\"override\">hold</button> <button name=\"op\" value=\"clear\" formnovalidate>clear override</button></div></form></section>",
            csrf = self.csrf
        )
    }

    /// Validates the form and sends the command `presenced cmd` sends.
    async fn command(
        &self,
        fields: BTreeMap<String, String>,
    ) -> Result<String, (StatusCode, String)> {
        let bad = |field: &'static str, problem: String| {
            (
                StatusCode::BAD_REQUEST,
                form::FormError::Field { field, problem }.to_string(),
            )
        };
        let given = fields.get("csrf").map(String::as_str).unwrap_or("");
        if !form::token_matches(&self.csrf, given) {
            return Err((
                StatusCode::FORBIDDEN,
                "refused: the form's token is missing or stale; reload the page".into(),
            ));
        }
        let field = |k: &str| fields.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let zone = field("zone").ok_or_else(|| bad("zone", "required".into()))?;
        if !naming::is_presence_key(zone) {
            return Err(bad(
                "zone",
                format!("{zone:?} is not a zone id nor a person key"),
            ));
        }
        let by = field("by").ok_or_else(|| bad("by", "required: who holds the zone".into()))?;
        let op = field("op").unwrap_or("override");
        let request = match op {
            "override" => Request {
                v: COMMAND_SCHEMA,
                op: "override".into(),
                state: Some(
                    field("state")
                        .ok_or_else(|| bad("state", "required: occupied or vacant".into()))?
                        .to_owned(),
                ),
                duration: Some(
                    field("for")
                        .ok_or_else(|| bad("for", "required, e.g. 30m".into()))?
                        .to_owned(),
                ),
                by: Some(by.to_owned()),
                reason: field("reason").map(str::to_owned),
                ..Request::default()
            },
            "clear" => Request {
                v: COMMAND_SCHEMA,
                op: "clear".into(),
                by: Some(by.to_owned()),
                ..Request::default()
            },
            other => return Err(bad("op", format!("{other:?} is not override or clear"))),
        };
        if let Err(e) = command::validate(&request) {
            let f = match e.kind {
                command::ErrorKind::BadState => "state",
                command::ErrorKind::BadDuration
                | command::ErrorKind::ZeroDuration
                | command::ErrorKind::DurationTooLong => "for",
                _ => "by or reason",
            };
            return Err(bad(f, e.to_string()));
        }
        let nats = self.nats.get().ok_or_else(|| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not connected to nats-server yet".to_owned(),
            )
        })?;
        let reply =
            crate::client::command::send(&nats.client, &self.site, zone, &request, COMMAND_TIMEOUT)
                .await
                .map_err(|e| (StatusCode::BAD_GATEWAY, format!("{e:#}")))?;
        if let Some(e) = &reply.error {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "the engine refused the command ({}): {}",
                    e.kind.as_str(),
                    e.message
                ),
            ));
        }
        tracing::info!(zone, by, op, "status page: command applied");
        Ok(crate::client::command::describe(&reply))
    }
}

fn text(code: StatusCode, body: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body + "\n",
    )
        .into_response()
}

async fn index(State(p): State<Arc<Page>>, headers: HeaderMap) -> Response {
    p.want();
    // The first page after a start waits for the zones (milliseconds);
    // a leaf that is away does not hold it longer than this.
    let mut loaded = p.loaded.subscribe();
    let _ = tokio::time::timeout(FIRST_LOAD_WAIT, loaded.wait_for(|l| *l)).await;
    let body = p.index();
    let mut response = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // Nothing on the page comes from elsewhere, and nothing may.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::VARY, "Accept-Encoding"),
        ],
        body.clone(),
    )
        .into_response();
    // A site with many zones has a long page of near-identical cards:
    // gzip takes it well under a tenth (every browser asks for it).
    if body.len() >= GZIP_ABOVE && accepts_gzip(&headers) {
        if let Some(z) = gzip(body.as_bytes()) {
            *response.body_mut() = axum::body::Body::from(z);
            response.headers_mut().insert(
                header::CONTENT_ENCODING,
                axum::http::HeaderValue::from_static("gzip"),
            );
        }
    }
    response
}

/// Pages shorter than this are sent as they are.
const GZIP_ABOVE: usize = 16 * 1024;

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            let mut parts = e.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|q| q.trim().replace(' ', "") == "q=0");
            name.eq_ignore_ascii_case("gzip") && !refused
        })
}

fn gzip(data: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write as _;
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(data).ok()?;
    z.finish().ok()
}

async fn css() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS)
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        JS,
    )
}

/// The event stream: everything current first, then each change. A page
/// that falls behind gets everything again (its revisions drop what it
/// already shows).
async fn events(State(p): State<Arc<Page>>, uri: Uri) -> impl IntoResponse {
    p.want();
    // `after`: the newest revision the page was rendered with; only what
    // changed since is sent again (a page of 1,000 zones is not resent
    // whole to every new page).
    let after = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("after="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let rx = p.tx.subscribe();
    let first = p.snapshot(after);
    let page = p.clone();
    let rest = futures::stream::unfold((rx, page), |(mut rx, page)| async move {
        let events = match rx.recv().await {
            Ok(u) => futures::stream::once(future::ready(page.event_of(&u))).boxed(),
            Err(broadcast::error::RecvError::Lagged(_)) => page.snapshot(0),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((events, (rx, page)))
    })
    .flatten();
    let stream = first
        .chain(rest)
        .take_until(p.closing.clone().cancelled_owned())
        .map(Ok::<_, Infallible>);
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn override_post(
    State(p): State<Arc<Page>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    if let Err(e) = form::check_length(&headers) {
        let code = if headers.contains_key(header::CONTENT_LENGTH) {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::LENGTH_REQUIRED
        };
        return text(code, e.to_string());
    }
    if !p.commands_on() {
        return text(
            StatusCode::FORBIDDEN,
            "refused: this page is read-only (http.page_commands is off, or this identity is not granted commands)".into(),
        );
    }
    if let Err(e) = form::check_origin(&headers) {
        return text(StatusCode::FORBIDDEN, e.to_string());
    }
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected application/x-www-form-urlencoded".into(),
        );
    }
    let bytes: Bytes = match axum::body::to_bytes(body, form::MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("form body refused: {e}"),
            )
        }
    };
    let fields = match form::parse(&bytes) {
        Ok(f) => f,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match p.command(fields).await {
        Ok(_) => (StatusCode::SEE_OTHER, [(header::LOCATION, "./")]).into_response(),
        Err((code, msg)) => text(code, msg),
    }
}

async fn not_found(uri: Uri) -> Response {
    text(
        StatusCode::NOT_FOUND,
        format!("not found: {} (try / , /healthz or /metrics)", uri.path()),
    )
}

/// The page's routes, to merge into the HTTP listener's router; the
/// fallback answers every other path with a short 404.
pub fn router(page: Arc<Page>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/page.css", get(css))
        .route("/page.js", get(js))
        .route("/events", get(events))
        .route(
            "/override",
            post(override_post).layer(DefaultBodyLimit::max(form::MAX_BODY)),
        )
        .fallback(not_found)
        .with_state(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_only_when_asked_for_and_not_refused() {
        let h = |v: &'static str| {
            let mut m = HeaderMap::new();
            m.insert(
                header::ACCEPT_ENCODING,
                axum::http::HeaderValue::from_static(v),
            );
            m
        };
        assert!(accepts_gzip(&h("gzip, deflate, br, zstd")));
        assert!(accepts_gzip(&h("br;q=1.0, GZIP;q=0.5")));
        assert!(!accepts_gzip(&h("gzip;q=0, br")));
        assert!(!accepts_gzip(&h("identity")));
        assert!(!accepts_gzip(&HeaderMap::new()));
        let text = "<li>zone</li>".repeat(1000);
        let z = gzip(text.as_bytes()).unwrap();
        assert!(z.len() * 10 < text.len(), "{} of {}", z.len(), text.len());
    }

    /// A page of site `home` with no zones configured, and the sender
    /// that would stop it (kept for as long as the page is used).
    fn test_page() -> (Arc<Page>, watch::Sender<bool>) {
        let (stop_tx, stop) = watch::channel(false);
        let page = Page::new(
            Site::new("home").unwrap(),
            "presenced".into(),
            Arc::new(Metrics::default()),
            Arc::new(Model::default()),
            false,
            stop,
        );
        (page, stop_tx)
    }

    /// A KV `presence` put of `zone` at `revision`, in `state` with
    /// `confidence`.
    fn put(
        zone: &str,
        revision: u64,
        state: Presence,
        confidence: f64,
    ) -> crate::client::follow::Entry {
        let model = crate::engine::ZoneModel {
            zone: zone.into(),
            prior: 0.1,
            occupied_above: 0.7,
            vacant_below: 0.3,
            arrive_after: Duration::ZERO,
            leave_after: Duration::ZERO,
            rules: Vec::new(),
        };
        let mut z = crate::engine::initial_state(&model, Timestamp(1_000));
        z.state = state;
        z.confidence = confidence;
        crate::client::follow::Entry {
            key: zone.into(),
            revision,
            op: crate::client::follow::Op::Put,
            value: serde_json::to_vec(&z).unwrap().into(),
        }
    }

    /// A zone's first change goes to the open pages at once; changes
    /// within [`CARD_INTERVAL`] wait, and only the newest is sent.
    #[tokio::test]
    async fn a_busy_zone_sends_its_first_card_at_once_then_only_its_newest() {
        let (page, _stop_tx) = test_page();
        let mut rx = page.tx.subscribe();
        let put =
            |revision: u64, confidence: f64| put("hall", revision, Presence::Vacant, confidence);
        let rev = |u: Update| match u {
            Update::Zone { data } => serde_json::from_str::<serde_json::Value>(&data).unwrap()
                ["rev"]
                .as_u64()
                .unwrap(),
            other => panic!("not a zone: {other:?}"),
        };
        page.apply(put(1, 0.2), false);
        assert_eq!(rev(rx.try_recv().expect("first card at once")), 1);
        page.apply(put(2, 0.4), false);
        page.apply(put(3, 0.6), false);
        page.flush_cards();
        assert!(rx.try_recv().is_err(), "a card within the interval");
        tokio::time::sleep(CARD_INTERVAL).await;
        page.flush_cards();
        assert_eq!(rev(rx.try_recv().expect("the newest card")), 3);
        assert!(rx.try_recv().is_err(), "one card for two changes");
        // Waiting cards wait for pages: with none open they are dropped.
        page.apply(put(4, 0.8), false);
        drop(rx);
        page.flush_cards();
        assert!(page
            .cards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .waiting
            .is_empty());
    }

    /// Cards the budget allows over `d`, rounded up, plus one for the
    /// instant between reading the clock and applying.
    fn budget_for(d: Duration) -> usize {
        (d.as_secs_f64() * CARD_BUDGET).ceil() as usize + 1
    }

    /// Changes that leave a zone's state as it was share a page-wide
    /// budget of cards, oldest waiting first; a state change is held only
    /// by the zone's own interval.
    #[tokio::test]
    async fn many_busy_zones_share_the_card_budget_and_state_changes_skip_it() {
        let (page, _stop_tx) = test_page();
        let mut rx = page.tx.subscribe();
        let put = |zone: &str, revision: u64, state: Presence| {
            put(zone, revision, state, revision as f64 / 1e6)
        };
        let drain = |rx: &mut broadcast::Receiver<Update>| {
            let mut keys = Vec::new();
            while let Ok(Update::Zone { data }) = rx.try_recv() {
                let v: serde_json::Value = serde_json::from_str(&data).unwrap();
                keys.push(v["key"].as_str().unwrap().to_owned());
            }
            keys
        };
        let zones = 3 * CARD_BUDGET as u64;
        let zone = |i: u64| format!("z{i:04}");
        let mut rev = 0;
        for i in 0..zones {
            rev += 1;
            page.apply(put(&zone(i), rev, Presence::Vacant), false);
        }
        assert_eq!(
            drain(&mut rx).len() as u64,
            zones,
            "each zone's first card at once"
        );
        tokio::time::sleep(CARD_INTERVAL).await;
        // The budget refills while the cards are applied: on a loaded
        // machine that takes long enough to count.
        let applying = std::time::Instant::now();
        for i in 0..zones {
            rev += 1;
            page.apply(put(&zone(i), rev, Presence::Vacant), false);
        }
        let refilled = budget_for(applying.elapsed());
        let burst = drain(&mut rx);
        assert!(
            (CARD_BUDGET as usize..=CARD_BUDGET as usize + refilled).contains(&burst.len()),
            "one budget's worth at once (+{refilled} refilled), not {}",
            burst.len()
        );
        let first_waiting = (0..zones).map(zone).find(|z| !burst.contains(z)).unwrap();
        // A waiting zone whose state changes goes out at once, budget or not.
        let last = (0..zones)
            .rev()
            .map(zone)
            .find(|z| !burst.contains(z))
            .unwrap();
        rev += 1;
        page.apply(put(&last, rev, Presence::Occupied), false);
        assert_eq!(
            drain(&mut rx),
            [last],
            "a state change is not held by the budget"
        );
        // The rest take turns, oldest first, as the budget refills.
        let waited = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(250)).await;
        page.flush_cards();
        let most = budget_for(waited.elapsed());
        let sent = drain(&mut rx);
        assert!(
            (40..=most).contains(&sent.len()),
            "a quarter second of budget (at most {most} for the time taken), not {}",
            sent.len()
        );
        assert_eq!(sent[0], first_waiting, "the oldest waiting first");
        assert!(
            sent.windows(2).all(|w| w[0] < w[1]),
            "in the order they waited"
        );
    }
}
