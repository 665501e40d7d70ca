//! Health of a site's hub mirrors: lag in messages and seconds, last
//! contact, stall. The judgement ([`Tracker`]) is pure, fed with samples
//! and the time; [`sample`] reads the leaf's source and the hub's mirror,
//! and [`run`] polls, logs, counts and nudges.
//!
//! A mirror's own `lag` stays 0 while its source is unreachable, so lag is
//! computed here from both ends: the source's last sequence on the leaf
//! minus the mirror's (mirrors keep the source's sequence numbers).

use super::catchup;
use super::config::HubWatch;
use super::link::HubLink;
use super::metrics::{HubMetrics, MirrorEvent};
use super::mirrors::{self, Mirror};
use crate::naming::Site;
use async_nats::jetstream;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// One end of a mirror as read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    pub last_seq: u64,
    /// Unix time of the first and of the last message, milliseconds (0:
    /// empty).
    pub first_ms: i64,
    pub last_ms: i64,
}

/// The hub's view of a mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorEnd {
    pub end: End,
    /// Time since the hub last heard from the source (`active`).
    pub last_contact: Option<Duration>,
}

/// What one poll found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The leaf's stream, or why it could not be read.
    pub source: Result<End, String>,
    /// The hub's mirror, or why it could not be read (link down, hub
    /// without quorum, mirror missing).
    pub mirror: Result<MirrorEnd, String>,
}

/// How a mirror is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Holds everything its source holds.
    Current,
    /// Behind, but moving (or not behind for long).
    CatchingUp,
    /// No progress for `stall_after` while the source has more.
    Stalled,
    /// Not read yet, or neither end readable.
    Unknown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Current => "current",
            State::CatchingUp => "catching_up",
            State::Stalled => "stalled",
            State::Unknown => "unknown",
        }
    }
}

/// The report of one mirror: what `/healthz`, `/metrics` and
/// `presenced status` show.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Health {
    pub mirror: String,
    pub state: State,
    /// Messages the source has and the mirror lacks (from the last
    /// readings of both ends).
    pub lag_messages: Option<u64>,
    /// Age difference between the source's newest message and the
    /// mirror's newest, when behind.
    pub lag_seconds: Option<f64>,
    /// Time since the hub last heard from the source.
    pub last_contact_seconds: Option<f64>,
    /// Why a reading failed, if one did.
    pub error: Option<String>,
}

impl Health {
    /// The report as `/metrics` and `/healthz` store it.
    pub fn reading(&self) -> super::metrics::MirrorReading {
        super::metrics::MirrorReading {
            mirror: self.mirror.clone(),
            state: self.state.as_str(),
            lag_messages: self.lag_messages,
            lag_seconds: self.lag_seconds,
            last_contact_seconds: self.last_contact_seconds,
            error: self.error.clone(),
        }
    }
}

/// What the poller should do after a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    StallStarted,
    StallEnded,
    /// Behind and out of contact or not moving: ask the hub to restart the
    /// mirror.
    Nudge,
}

/// Judges one mirror across samples.
#[derive(Debug)]
pub struct Tracker {
    name: String,
    stall_after: Duration,
    nudge_after: Option<Duration>,
    last_mirror: Option<End>,
    last_source: Option<End>,
    /// Since when the mirror has been behind without progress.
    stuck_since: Option<Instant>,
    stalled: bool,
    last_nudge: Option<Instant>,
}

impl Tracker {
    pub fn new(name: &str, stall_after: Duration, nudge_after: Option<Duration>) -> Tracker {
        Tracker {
            name: name.to_owned(),
            stall_after,
            nudge_after,
            last_mirror: None,
            last_source: None,
            stuck_since: None,
            stalled: false,
            last_nudge: None,
        }
    }

    /// Takes a sample taken at `now`; the health and what to do.
    pub fn observe(&mut self, sample: &Sample, now: Instant) -> (Health, Vec<Event>) {
        let mut errors = Vec::new();
        if let Ok(s) = &sample.source {
            self.last_source = Some(*s);
        } else if let Err(e) = &sample.source {
            errors.push(format!("leaf: {e}"));
        }
        let mut last_contact = None;
        let mut progressed = false;
        match &sample.mirror {
            Ok(m) => {
                progressed = self
                    .last_mirror
                    .is_some_and(|prev| m.end.last_seq > prev.last_seq);
                last_contact = m.last_contact;
                self.last_mirror = Some(m.end);
            }
            Err(e) => errors.push(format!("hub: {e}")),
        }
        let lag = match (self.last_source, self.last_mirror) {
            (Some(s), Some(m)) => Some((
                s.last_seq.saturating_sub(m.last_seq),
                if s.last_seq > m.last_seq {
                    // The span of the source the mirror lacks: from the
                    // mirror's newest message, or the source's oldest when
                    // the mirror is still empty.
                    let from = if m.last_seq == 0 {
                        s.first_ms
                    } else {
                        m.last_ms
                    };
                    ((s.last_ms - from).max(0) as f64) / 1000.0
                } else {
                    0.0
                },
            )),
            _ => None,
        };
        let behind = lag.is_some_and(|(n, _)| n > 0);
        if !behind || progressed {
            self.stuck_since = None;
        }
        if behind && self.stuck_since.is_none() {
            // First seen behind: the hub's own last contact says how long
            // it has been without news, so one sample can already tell.
            let since = if progressed {
                now
            } else {
                last_contact.and_then(|c| now.checked_sub(c)).unwrap_or(now)
            };
            self.stuck_since = Some(since);
        }
        let stuck_for = self.stuck_since.map(|t| now.saturating_duration_since(t));
        let stalled = stuck_for.is_some_and(|d| d >= self.stall_after);
        let mut events = Vec::new();
        if stalled != self.stalled {
            events.push(if stalled {
                Event::StallStarted
            } else {
                Event::StallEnded
            });
            self.stalled = stalled;
        }
        // A nudge needs the hub reachable now, a mirror behind and either
        // without contact or without progress for nudge_after, and none in
        // the last nudge_after. Progress counts, not contact alone: after a
        // step-down the new leader may report contact with the leaf and
        // still wait out the server's retry backoff before it copies
        // anything, and that wait is what the nudge exists to cut short.
        if let (Some(after), Ok(m)) = (self.nudge_after, &sample.mirror) {
            let out_of_contact = m.last_contact.is_none_or(|c| c >= after);
            let no_progress = stuck_for.is_some_and(|d| d >= after);
            let cooled = self
                .last_nudge
                .is_none_or(|t| now.saturating_duration_since(t) >= after);
            if behind && !progressed && (out_of_contact || no_progress) && cooled {
                self.last_nudge = Some(now);
                events.push(Event::Nudge);
            }
        }
        let state = if lag.is_none() {
            State::Unknown
        } else if stalled {
            State::Stalled
        } else if behind {
            State::CatchingUp
        } else {
            State::Current
        };
        let health = Health {
            mirror: self.name.clone(),
            state,
            lag_messages: lag.map(|(n, _)| n),
            lag_seconds: lag.map(|(_, s)| s),
            last_contact_seconds: last_contact.map(|d| d.as_secs_f64()),
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        };
        (health, events)
    }
}

fn end(info: &jetstream::stream::Info) -> End {
    if info.state.messages == 0 {
        return End {
            last_seq: info.state.last_sequence,
            first_ms: 0,
            last_ms: 0,
        };
    }
    End {
        last_seq: info.state.last_sequence,
        first_ms: (info.state.first_timestamp.unix_timestamp_nanos() / 1_000_000) as i64,
        last_ms: (info.state.last_timestamp.unix_timestamp_nanos() / 1_000_000) as i64,
    }
}

/// Reads both ends of `mirror`: `leaf` is the site's JetStream, `hub` the
/// hub through the leaf link.
pub async fn sample(leaf: &jetstream::Context, hub: &HubLink, mirror: &Mirror) -> Sample {
    let source_name = mirror.source_stream();
    let mirror_name = mirror.stream();
    let (source, hub_side) =
        tokio::join!(leaf.get_stream(&source_name), hub.stream_info(&mirror_name));
    Sample {
        source: source
            .map(|s| end(s.cached_info()))
            .map_err(|e| format!("stream {source_name}: {e}")),
        mirror: hub_side
            .map(|info| MirrorEnd {
                end: end(&info),
                last_contact: info.mirror.as_ref().and_then(|m| m.active),
            })
            .map_err(|e| format!("mirror {mirror_name}: {e}")),
    }
}

/// The leaf's JetStream context and the hub through the leaf's link (on
/// inboxes naming `site`, which the hub's ACL answers on), with a request
/// timeout below the poll interval so one slow hub cannot pile polls up.
pub fn contexts(
    client: &async_nats::Client,
    site: &Site,
    poll: Duration,
) -> (jetstream::Context, HubLink) {
    let timeout = poll.max(Duration::from_millis(500));
    let leaf = jetstream::ContextBuilder::new()
        .timeout(timeout)
        .build(client.clone());
    let hub = HubLink::new(client.clone(), site.clone(), timeout);
    (leaf, hub)
}

/// Polls every mirror of `site` until `stop`: updates `metrics`, logs a
/// stall at WARN once when it starts and at INFO when it ends, and nudges
/// mirrors that are behind and out of contact or not moving (when enabled).
pub async fn run(
    client: async_nats::Client,
    site: Site,
    cfg: HubWatch,
    metrics: Arc<HubMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let (leaf, hub) = contexts(&client, &site, cfg.poll_interval);
    let list = mirrors::mirrors(&site);
    let nudge_after = cfg.nudge.then_some(cfg.nudge_after);
    let mut trackers: Vec<Tracker> = list
        .iter()
        .map(|m| Tracker::new(&m.name, cfg.stall_after, nudge_after))
        .collect();
    let mut every = tokio::time::interval(cfg.poll_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let samples = futures::future::join_all(list.iter().map(|m| sample(&leaf, &hub, m))).await;
        let now = Instant::now();
        let mut report = Vec::with_capacity(list.len());
        for ((mirror, tracker), s) in list.iter().zip(&mut trackers).zip(&samples) {
            let (health, events) = tracker.observe(s, now);
            for event in events {
                match event {
                    Event::StallStarted => crate::emit!(
                        super::metrics::MIRROR_STALLED,
                        metrics.counter(&mirror.name, MirrorEvent::Stall);
                        mirror = %mirror.name,
                        lag_messages = ?health.lag_messages,
                        last_contact_s = ?health.last_contact_seconds,
                        error = ?health.error.as_deref()
                    ),
                    Event::StallEnded => {
                        tracing::info!(mirror = %mirror.name, "hub mirror moving again")
                    }
                    Event::Nudge => match catchup::nudge(&hub, &mirror.stream()).await {
                        Ok(()) => crate::emit!(
                            super::metrics::MIRROR_NUDGED,
                            metrics.counter(&mirror.name, MirrorEvent::Nudge);
                            mirror = %mirror.name,
                            last_contact_s = ?health.last_contact_seconds,
                            lag_messages = ?health.lag_messages
                        ),
                        Err(e) => {
                            tracing::debug!(mirror = %mirror.name, error = %e, "nudge not accepted")
                        }
                    },
                }
            }
            report.push(health);
        }
        let reachable = samples.iter().any(|s| s.mirror.is_ok());
        metrics.set_mirrors(reachable, report.iter().map(Health::reading).collect());
    }
}

/// `presenced status`: one reading of every mirror, judged as the daemon
/// judges it.
pub async fn status(client: &async_nats::Client, site: &Site, cfg: &HubWatch) -> Vec<Health> {
    let (leaf, hub) = contexts(client, site, cfg.poll_interval);
    let now = Instant::now();
    let mut out = Vec::new();
    for m in mirrors::mirrors(site) {
        let s = sample(&leaf, &hub, &m).await;
        let mut t = Tracker::new(&m.name, cfg.stall_after, None);
        out.push(t.observe(&s, now).0);
    }
    out
}

/// The table `presenced status` prints.
pub fn table(report: &[Health]) -> String {
    let mut out = format!(
        "{:<24} {:<12} {:>10} {:>10} {:>14}  {}\n",
        "mirror", "state", "lag msgs", "lag s", "last contact", "error"
    );
    let num = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    let secs = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for h in report {
        out.push_str(&format!(
            "{:<24} {:<12} {:>10} {:>10} {:>14}  {}\n",
            h.mirror,
            h.state.as_str(),
            num(h.lag_messages),
            secs(h.lag_seconds),
            secs(h.last_contact_seconds).to_string() + "s",
            h.error.as_deref().unwrap_or("")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(seq: u64, ms: i64) -> End {
        End {
            last_seq: seq,
            first_ms: 1000,
            last_ms: ms,
        }
    }

    fn ok(source: u64, mirror: u64, contact_s: u64) -> Sample {
        Sample {
            source: Ok(end(source, source as i64 * 1000)),
            mirror: Ok(MirrorEnd {
                end: end(mirror, mirror as i64 * 1000),
                last_contact: Some(Duration::from_secs(contact_s)),
            }),
        }
    }

    const STALL: Duration = Duration::from_secs(30);
    const NUDGE: Duration = Duration::from_secs(2);

    #[tokio::test(start_paused = true)]
    async fn current_mirror_is_current() {
        let mut t = Tracker::new("SENSORS-home", STALL, Some(NUDGE));
        let (h, ev) = t.observe(&ok(10, 10, 0), Instant::now());
        assert_eq!(h.state, State::Current);
        assert_eq!(h.lag_messages, Some(0));
        assert_eq!(h.lag_seconds, Some(0.0));
        assert!(ev.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn behind_without_progress_stalls_once_and_recovers() {
        let mut t = Tracker::new("m", STALL, None);
        let start = Instant::now();
        let (h, ev) = t.observe(&ok(20, 10, 0), start);
        assert_eq!(
            (h.state, h.lag_messages, h.lag_seconds),
            (State::CatchingUp, Some(10), Some(10.0))
        );
        assert!(ev.is_empty());
        let (h, ev) = t.observe(&ok(25, 10, 29), start + Duration::from_secs(29));
        assert_eq!(h.state, State::CatchingUp);
        assert!(ev.is_empty());
        let (h, ev) = t.observe(&ok(30, 10, 30), start + Duration::from_secs(30));
        assert_eq!(h.state, State::Stalled);
        assert_eq!(ev, [Event::StallStarted]);
        let (_, ev) = t.observe(&ok(31, 10, 31), start + Duration::from_secs(31));
        assert!(ev.is_empty(), "a stall is reported once");
        let (h, ev) = t.observe(&ok(31, 31, 0), start + Duration::from_secs(32));
        assert_eq!(h.state, State::Current);
        assert_eq!(ev, [Event::StallEnded]);
    }

    #[tokio::test(start_paused = true)]
    async fn progress_is_not_a_stall() {
        let mut t = Tracker::new("m", STALL, None);
        let start = Instant::now();
        for i in 0..100u64 {
            let (h, ev) = t.observe(
                &ok(1000 + i * 10, 500 + i * 5, 0),
                start + Duration::from_secs(i),
            );
            assert_eq!(h.state, State::CatchingUp);
            assert!(ev.is_empty());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_hub_while_the_leaf_moves_on_is_a_stall() {
        let mut t = Tracker::new("m", STALL, Some(NUDGE));
        let start = Instant::now();
        t.observe(&ok(10, 10, 0), start);
        let down = |source: u64| Sample {
            source: Ok(end(source, source as i64 * 1000)),
            mirror: Err("no responders".into()),
        };
        let (h, ev) = t.observe(&down(11), start + Duration::from_secs(1));
        assert_eq!(h.state, State::CatchingUp);
        assert_eq!(h.lag_messages, Some(1));
        assert!(h.error.as_deref().unwrap().contains("no responders"));
        assert!(ev.is_empty(), "no nudge without a hub to ask");
        let (h, ev) = t.observe(&down(40), start + Duration::from_secs(31));
        assert_eq!(h.state, State::Stalled);
        assert_eq!(ev, [Event::StallStarted]);
    }

    #[tokio::test(start_paused = true)]
    async fn link_return_is_nudged_once_per_interval() {
        let mut t = Tracker::new("m", STALL, Some(NUDGE));
        let start = Instant::now();
        t.observe(&ok(10, 10, 0), start);
        // Back after 10 s: behind, out of contact for 10 s.
        let (_, ev) = t.observe(&ok(50, 10, 10), start + Duration::from_secs(10));
        assert_eq!(ev, [Event::Nudge]);
        let (_, ev) = t.observe(&ok(50, 10, 11), start + Duration::from_secs(11));
        assert!(ev.is_empty(), "cooling down");
        let (_, ev) = t.observe(&ok(50, 10, 12), start + Duration::from_secs(12));
        assert_eq!(ev, [Event::Nudge]);
        // Moving again: no nudge.
        let (_, ev) = t.observe(&ok(60, 40, 0), start + Duration::from_secs(15));
        assert!(ev.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn in_contact_but_not_moving_is_nudged_too() {
        let mut t = Tracker::new("m", STALL, Some(NUDGE));
        let start = Instant::now();
        t.observe(&ok(10, 10, 0), start);
        // The hub reports fresh contact, yet the mirror copies nothing.
        let (_, ev) = t.observe(&ok(50, 10, 0), start + Duration::from_millis(100));
        assert!(ev.is_empty(), "just fell behind: no nudge yet");
        let (_, ev) = t.observe(&ok(50, 10, 0), start + NUDGE + Duration::from_millis(100));
        assert_eq!(ev, [Event::Nudge]);
        // Progress clears it.
        let (_, ev) = t.observe(&ok(60, 55, 0), start + NUDGE * 3);
        assert!(ev.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_mirror_lags_by_the_sources_whole_span() {
        let mut t = Tracker::new("m", STALL, None);
        let (h, _) = t.observe(&ok(50, 0, 0), Instant::now());
        assert_eq!(h.lag_messages, Some(50));
        assert_eq!(h.lag_seconds, Some(49.0));
    }

    #[tokio::test(start_paused = true)]
    async fn one_sample_judges_by_the_hubs_last_contact() {
        let mut t = Tracker::new("m", STALL, None);
        let (h, _) = t.observe(&ok(50, 10, 45), Instant::now());
        assert_eq!(h.state, State::Stalled);
    }
}
