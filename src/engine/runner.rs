//! The engine's I/O shell: consumes `SENSORS`, runs the pure core, and makes
//! the effects durable before acknowledging.
//!
//! Order of effects for a batch: transitions to `EVENTS` (deterministic
//! `Nats-Msg-Id`), then compare-and-set writes of `presence` (the
//! authority, carrying the last applied stream sequence) and `debounce` (a
//! projection of the pending deadlines, repaired at start), then one ack
//! for the whole batch (ack policy "all"). A crash anywhere in between
//! redelivers the batch; already applied observations are skipped by
//! sequence and republished transitions are dropped as duplicates, so the
//! trajectory is the same as if the daemon had never stopped. Consecutive
//! batches overlap ([`super::writer`]): one batch's KV writes go out with
//! the next batch's `EVENTS` publishes, each batch's own order unchanged.
//!
//! Commands (`cmd.<site>.presence.<zone>`, request/reply) are handled in
//! the same loop as the batches, so one owner changes zone state at a
//! time. A command is applied through the core, committed like a batch
//! (EVENTS, then the zone value carrying the override and its end), and
//! only then answered: a reply means the result is durable. A crash
//! before the commit loses the command and the client sees no reply.

use super::command::{self, Command, CommandError, ErrorKind, Reply};
use super::metrics::{EngineMetrics, KV_CONFLICT, KV_CONFLICTS_FENCED, REDELIVERY_SKIPPED};
use super::{
    advance, apply, clear_override, initial_state, next_deadline, reconcile, set_override, Input,
    Model, Pending, Presence, Transition, ZoneState,
};
use crate::base::backoff::Backoff;
use crate::metrics::Metrics;

/// A difference between the system clock's and the monotonic clock's
/// elapsed time over one engine beat at least this large is logged as a
/// clock step (NTP slews far slower than this).
const CLOCK_STEP_MS: i64 = 2_000;

/// Command replies remembered for retries, at most.
const MAX_ANSWERED: usize = 10_000;
use super::feed::{Committed, Publisher};
use super::fencing::Fencing;
use super::writer::{Commit, InFlight};
use crate::naming::{self, Site};
use crate::observation::Observation;
use crate::store::kv::{self as kvstore, CasWrite};
use crate::time::Timestamp;
use async_nats::jetstream::{self, consumer::pull, kv};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("{what} is missing on the leaf: run `presenced provision` first")]
    NotProvisioned {
        what: String,
        source: async_nats::Error,
    },
    #[error("cannot rehydrate: {0}")]
    Rehydrate(#[from] kvstore::KvError),
    #[error("consuming SENSORS failed: {0}")]
    Consume(async_nats::Error),
    #[error("cannot subscribe to commands on {subject}: {source}")]
    Commands {
        subject: String,
        source: async_nats::SubscribeError,
    },
}

/// The value of key `<zone>` in KV `debounce`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DebounceRecord {
    pub v: u32,
    pub zone: String,
    pub to: Presence,
    pub deadline: Timestamp,
}

/// One zone's state with the revisions its next writes must expect.
struct Slot {
    state: ZoneState,
    presence_rev: u64,
    debounce_rev: u64,
    /// What KV `debounce` holds for this zone now.
    debounce: Option<Pending>,
}

/// The consumer config the engine needs; provisioning creates it.
pub fn consumer_config(site: &Site) -> pull::Config {
    pull::Config {
        durable_name: Some(naming::ENGINE_CONSUMER.to_owned()),
        description: Some("presence engine".to_owned()),
        filter_subject: site.sensors_filter(),
        ack_policy: jetstream::consumer::AckPolicy::All,
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        ack_wait: Duration::from_secs(30),
        max_deliver: -1,
        max_ack_pending: 100_000,
        ..Default::default()
    }
}

pub struct Runner {
    js: jetstream::Context,
    site: Site,
    model: Arc<Model>,
    presence: kv::Store,
    debounce: kv::Store,
    slots: BTreeMap<String, Slot>,
    /// (deadline, zone) of every zone with a next deadline.
    timers: BTreeSet<(Timestamp, String)>,
    /// Each zone's entry in `timers`, to replace it without a scan.
    scheduled: HashMap<String, Timestamp>,
    metrics: Arc<EngineMetrics>,
    batch: usize,
    /// Per zone, the highest transition number counted in
    /// `presenced_transitions_total`.
    counted: HashMap<String, u64>,
    /// Observations in SENSORS not yet delivered to us, as last reported;
    /// timers fire on the wall clock only when this is 0, so a backlog is
    /// applied in observation-time order first.
    backlog: u64,
    /// Who may get command replies: the ownership table stored at
    /// provisioning, and when it was last read.
    replies: Option<crate::store::published::Published>,
    replies_read: Option<tokio::time::Instant>,
    /// The permission to write under a leader lease (several engines per
    /// site, [`super::fencing`]); once closed nothing more is written and
    /// the run loop returns.
    fencing: Fencing,
    /// (consumer sequence, stream sequence) of the last delivery this
    /// runner got from the durable consumer; a jump in the consumer
    /// sequence means deliveries went to another puller.
    last_delivery: Option<(u64, u64)>,
    /// Replies to commands that carried an id, by (subject, id), for
    /// [`command::RETRY_WINDOW`]: a retry gets the original reply.
    answered: HashMap<(String, String), (tokio::time::Instant, Bytes)>,
    /// The last batch's commit, its `EVENTS` publishes out
    /// ([`super::writer`]): completed with the next batch or as soon as
    /// none is waiting, and before any other write.
    in_flight: Option<InFlight>,
    /// Each commit's `presence` writes once durable, for the status page
    /// in this process ([`super::feed`]).
    feed: Publisher,
}

fn missing(what: &str, source: impl Into<async_nats::Error>) -> RunnerError {
    RunnerError::NotProvisioned {
        what: what.to_owned(),
        source: source.into(),
    }
}

impl Runner {
    /// Rehydrates every zone from KV and repairs `debounce`; emits nothing
    /// (a restart never flips a zone by itself).
    pub async fn start(
        js: jetstream::Context,
        site: Site,
        model: Arc<Model>,
        metrics: Arc<EngineMetrics>,
        batch: usize,
    ) -> Result<Runner, RunnerError> {
        Runner::start_fenced(js, site, model, metrics, batch, None, None).await
    }

    /// [`Runner::start`] for the holder of the leader lease: every write
    /// asks `fence` first, and every zone's presence key is rewritten
    /// at once (same value, new revision), so a former holder's
    /// compare-and-set writes expect revisions that no longer exist.
    /// `warm` is a standby's followed state ([`super::standby`]): used
    /// when it has caught up with the buckets, else they are read in full.
    pub async fn start_fenced(
        js: jetstream::Context,
        site: Site,
        model: Arc<Model>,
        metrics: Arc<EngineMetrics>,
        batch: usize,
        fence: Option<crate::store::leader::Fence>,
        warm: Option<super::standby::Warm>,
    ) -> Result<Runner, RunnerError> {
        let presence = js
            .get_key_value(naming::PRESENCE_BUCKET)
            .await
            .map_err(|e| missing("KV bucket presence", e))?;
        let debounce = js
            .get_key_value(naming::DEBOUNCE_BUCKET)
            .await
            .map_err(|e| missing("KV bucket debounce", e))?;
        // The takeover goes on record first: from here on the former
        // holder's EVENTS publishes are refused by the server, and as it
        // publishes before it writes KV, the state read below is one
        // whose transitions are all in EVENTS.
        let mut fencing = Fencing::new(fence);
        fencing.begin(&js, &site).await;
        let started = std::time::Instant::now();
        let followed = match warm {
            Some(w) => w.take(&presence, &debounce, super::standby::CATCH_UP).await,
            None => None,
        };
        let was_warm = followed.is_some();
        let (stored, stored_debounce) = match followed {
            Some(r) => (r.presence, r.debounce),
            None => (
                kvstore::load_all(&presence, naming::PRESENCE_BUCKET).await?,
                kvstore::load_all(&debounce, naming::DEBOUNCE_BUCKET).await?,
            ),
        };
        let now = Timestamp::now();
        let mut slots = BTreeMap::new();
        for (zone, zm) in &model.zones {
            let current = stored.get(zone);
            let mut state = match current.and_then(|c| c.value.as_ref()) {
                Some(bytes) => match serde_json::from_slice::<ZoneState>(bytes) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(zone = %zone, error = %e, "stored presence value is unreadable; starting the zone afresh");
                        initial_state(zm, now)
                    }
                },
                None => initial_state(zm, now),
            };
            reconcile(zm, &mut state);
            let d = stored_debounce.get(zone);
            let debounce_value = d
                .and_then(|c| c.value.as_ref())
                .and_then(|b| serde_json::from_slice::<DebounceRecord>(b).ok())
                .map(|r| Pending {
                    to: r.to,
                    deadline: r.deadline,
                });
            slots.insert(
                zone.clone(),
                Slot {
                    state,
                    presence_rev: current.map_or(0, |c| c.revision),
                    debounce_rev: d.map_or(0, |c| c.revision),
                    debounce: debounce_value,
                },
            );
        }
        let unconfigured: Vec<&String> = stored
            .iter()
            .filter(|(k, c)| c.value.is_some() && !model.zones.contains_key(*k))
            .map(|(k, _)| k)
            .collect();
        if !unconfigured.is_empty() {
            tracing::warn!(
                zones = ?unconfigured,
                "KV presence holds zones the config no longer has: `presenced watch` and `get` show them as unconfigured; remove each with `presenced forget-zone <zone>` as the admin"
            );
        }
        tracing::info!(
            zones = slots.len(),
            stored = stored.len(),
            warm = was_warm,
            elapsed_ms = started.elapsed().as_millis() as u64,
            elapsed_us = started.elapsed().as_micros() as u64,
            "state rehydrated"
        );
        let feed = metrics.feed.open();
        let mut runner = Runner {
            feed,
            js,
            site,
            model,
            presence,
            debounce,
            slots,
            timers: BTreeSet::new(),
            scheduled: HashMap::new(),
            metrics,
            batch: batch.max(1),
            counted: HashMap::new(),
            backlog: 0,
            replies: None,
            replies_read: None,
            fencing,
            last_delivery: None,
            answered: HashMap::new(),
            in_flight: None,
        };
        let zones: Vec<String> = runner.slots.keys().cloned().collect();
        for z in &zones {
            runner.reschedule(z);
        }
        // Repair the projection (a crash between the two writes) and store
        // zones that are new in the config.
        let dirty: BTreeSet<String> = runner
            .slots
            .iter()
            .filter(|(_, s)| {
                runner.fencing.leased() || s.presence_rev == 0 || s.debounce != s.state.pending
            })
            .map(|(z, _)| z.clone())
            .collect();
        runner.commit_with_retry(dirty, Vec::new()).await;
        runner.update_gauges();
        Ok(runner)
    }

    fn reschedule(&mut self, zone: &str) {
        let Some(slot) = self.slots.get(zone) else {
            return;
        };
        let next = self
            .model
            .zones
            .get(zone)
            .and_then(|zm| next_deadline(zm, &slot.state));
        if self.scheduled.get(zone) == next.as_ref() {
            return;
        }
        if let Some(old) = self.scheduled.remove(zone) {
            self.timers.remove(&(old, zone.to_owned()));
        }
        if let Some(d) = next {
            self.timers.insert((d, zone.to_owned()));
            self.scheduled.insert(zone.to_owned(), d);
        }
    }

    fn update_gauges(&self) {
        let occupied = self
            .slots
            .values()
            .filter(|s| matches!(s.state.state, Presence::Occupied | Presence::Leaving))
            .count();
        Metrics::set(&self.metrics.zones_occupied, occupied as u64);
        Metrics::set(&self.metrics.zones, self.slots.len() as u64);
        Metrics::set(&self.metrics.consumer_pending, self.backlog);
        let newest = self.slots.values().map(|s| s.state.clock.0).max();
        Metrics::set(
            &self.metrics.zone_clock_max_ms,
            newest.unwrap_or(0).max(0) as u64,
        );
    }

    /// One-line summary for systemd's STATUS=.
    pub fn status_line(&self) -> String {
        let occupied: Vec<&str> = self
            .slots
            .iter()
            .filter(|(_, s)| s.state.state == Presence::Occupied)
            .map(|(z, _)| z.as_str())
            .take(5)
            .collect();
        format!(
            "{} zones, {} occupied{}{}; backlog {}",
            self.slots.len(),
            self.metrics
                .zones_occupied
                .load(std::sync::atomic::Ordering::Relaxed),
            if occupied.is_empty() { "" } else { ": " },
            occupied.join(" "),
            self.backlog
        )
    }

    /// Reads the stream sequence and observation of each message.
    fn decode(&mut self, messages: &[jetstream::Message]) -> Vec<(u64, Observation)> {
        let mut inputs: Vec<(u64, Observation)> = Vec::with_capacity(messages.len());
        for msg in messages {
            let Ok(info) = msg.info() else {
                tracing::error!(subject = %msg.subject, "message without JetStream metadata on the engine consumer; skipped");
                continue;
            };
            self.backlog = info.pending;
            match serde_json::from_slice::<Observation>(&msg.payload) {
                Ok(obs) => inputs.push((info.stream_sequence, obs)),
                Err(e) => tracing::error!(
                    subject = %msg.subject,
                    seq = info.stream_sequence,
                    error = %e,
                    "unreadable observation in SENSORS; skipped (it stays in the stream for inspection)"
                ),
            }
        }
        inputs
    }

    /// Applies a batch of messages from `SENSORS` and acks it once durable.
    ///
    /// A delivery whose consumer sequence jumps past the last one this
    /// runner got means the consumer gave messages to another puller in
    /// between: a former engine instance whose pull requests outlived its
    /// lease (frozen, or cut from the leaf). It will never apply or ack
    /// them, and acking past them (ack policy "all") would drop them; so
    /// that stretch of the stream is read directly and applied in order
    /// first.
    async fn process(&mut self, messages: Vec<jetstream::Message>) {
        let mut segment_start = 0;
        for i in 0..messages.len() {
            let Ok(info) = messages[i].info() else {
                continue;
            };
            let (cseq, sseq) = (info.consumer_sequence, info.stream_sequence);
            let gap = self
                .last_delivery
                .filter(|(c, s)| cseq > c + 1 && sseq > s + 1)
                .map(|(_, s)| (s, sseq - 1));
            self.last_delivery = Some(match self.last_delivery {
                Some((c, s)) => (c.max(cseq), s.max(sseq)),
                None => (cseq, sseq),
            });
            if let Some((after, _)) = gap {
                let inputs = self.decode(&messages[segment_start..i]);
                self.apply_inputs(inputs).await;
                // One read for the rest of the batch, our own deliveries
                // included (they are then skipped by sequence): a hung
                // puller gets every other delivery, and a read per gap
                // would be one reader per message.
                let rest: Vec<_> = messages[i..].iter().filter_map(|m| m.info().ok()).collect();
                let to = rest.iter().map(|r| r.stream_sequence).max().unwrap_or(sseq);
                if let Some(last) = rest.last() {
                    self.backlog = last.pending;
                }
                self.last_delivery = rest.iter().fold(self.last_delivery, |acc, r| {
                    acc.map(|(c, s)| (c.max(r.consumer_sequence), s.max(r.stream_sequence)))
                });
                segment_start = messages.len();
                tracing::warn!(
                    from = after + 1,
                    to,
                    "deliveries of the engine consumer went to another puller (a former engine instance); reading them from SENSORS before acknowledging past them"
                );
                if let Err(e) = self.catch_up(after, to).await {
                    tracing::warn!(error = %e, "cannot read the deliveries another puller got; not acknowledging, the consumer redelivers them");
                    return;
                }
                if self.fencing.is_fenced() {
                    return;
                }
                break;
            }
        }
        let inputs = self.decode(&messages[segment_start..]);
        let last = messages.into_iter().last();
        self.pipeline(inputs, last).await;
        self.update_gauges();
    }

    /// Applies the last part of a batch and starts its commit
    /// ([`super::writer`]): its `EVENTS` publishes go out now, together
    /// with the KV writes of the batch before, whose acks are awaited
    /// (then that batch is acknowledged); this batch's KV writes and ack
    /// wait for the next batch or [`Runner::flush`].
    async fn pipeline(
        &mut self,
        inputs: Vec<(u64, Observation)>,
        last: Option<jetstream::Message>,
    ) {
        let (dirty, transitions) = self.apply_core(&inputs);
        let commit = self.plan(dirty, transitions, last);
        if !commit.encoded {
            // Never seen: the sequential commit, which logs and retries
            // as for any other failure.
            self.flush().await;
            self.commit_with_retry(commit.dirty, commit.transitions)
                .await;
            self.ack_batch(commit.ack).await;
            return;
        }
        let next = match self.in_flight.take() {
            Some(previous) => self.advance(previous, Some(commit)).await,
            None => {
                if !self.may_write() {
                    tracing::warn!(
                        zones = commit.dirty.len(),
                        transitions = commit.transitions.len(),
                        "not written: this instance no longer holds the engine's leader lease (fenced); the new holder applies these readings"
                    );
                    return;
                }
                if !commit.events.is_empty() {
                    Metrics::inc(&self.metrics.write_rounds);
                }
                Some(InFlight::send(&self.js, commit).await)
            }
        };
        // A batch without transitions has nothing to wait for before its
        // KV writes: they go out now, as before.
        self.in_flight = match next {
            Some(n) if !n.has_events() => self.advance(n, None).await,
            other => other,
        };
    }

    /// Completes the commit in flight, if any: every write before this
    /// point durable and acknowledged before another commit starts.
    async fn flush(&mut self) {
        if let Some(previous) = self.in_flight.take() {
            self.in_flight = self.advance(previous, None).await;
        }
    }

    /// Completes `previous`: reads its `EVENTS` acks, then sends its KV
    /// writes together with `next`'s `EVENTS` publishes, awaits the KV
    /// acks and acknowledges `previous`'s batch. Returns `next` in
    /// flight. On any failure both are committed as one by the
    /// sequential [`Runner::commit_with_retry`] (republished transitions
    /// are duplicates `EVENTS` drops) and nothing stays in flight.
    async fn advance(&mut self, previous: InFlight, next: Option<Commit>) -> Option<InFlight> {
        let (commit, acks) = previous.settle().await;
        if self.confirm(&commit.transitions, acks).await.is_err() {
            self.fall_back(commit.dirty, commit.transitions, commit.ack, next)
                .await;
            return None;
        }
        if !self.may_write() {
            tracing::warn!(
                zones = commit.dirty.len(),
                "not written: this instance no longer holds the engine's leader lease (fenced); the new holder applies these readings"
            );
            return None;
        }
        let (presence, debounce) = self.cas_writes(&commit);
        if !presence.is_empty()
            || !debounce.is_empty()
            || next.as_ref().is_some_and(|n| !n.events.is_empty())
        {
            Metrics::inc(&self.metrics.write_rounds);
        }
        let js = self.js.clone();
        let ((presence_results, debounce_results), next) = futures::join!(
            async {
                futures::join!(
                    kvstore::write_batch(&js, naming::PRESENCE_BUCKET, presence),
                    kvstore::write_batch(&js, naming::DEBOUNCE_BUCKET, debounce)
                )
            },
            async {
                match next {
                    Some(n) => Some(InFlight::send(&js, n).await),
                    None => None,
                }
            }
        );
        let mut failed = BTreeSet::new();
        for (bucket, r) in presence_results
            .into_iter()
            .map(|r| (naming::PRESENCE_BUCKET, r))
            .chain(
                debounce_results
                    .into_iter()
                    .map(|r| (naming::DEBOUNCE_BUCKET, r)),
            )
        {
            match r.result {
                Ok(rev) => {
                    Metrics::inc(&self.metrics.kv_writes);
                    if let Some(slot) = self.slots.get_mut(&r.key) {
                        if bucket == naming::PRESENCE_BUCKET {
                            slot.presence_rev = rev;
                        } else {
                            slot.debounce_rev = rev;
                            if let Some(p) = commit.debounce_of(&r.key) {
                                slot.debounce = p;
                            }
                        }
                    }
                }
                // Conflicts and errors alike are left to the sequential
                // commit, which meets them again and handles them as it
                // always did (reload, or stop under a lease).
                Err(e) => {
                    tracing::debug!(bucket, error = %e, "pipelined KV write failed; committing sequentially");
                    failed.insert(r.key);
                }
            }
        }
        if !failed.is_empty() {
            crate::metrics::stalled(
                &self.metrics.stalled,
                format!(
                    "KV presence or debounce: {} zone(s) not written",
                    failed.len()
                ),
            );
            self.fall_back(failed, Vec::new(), commit.ack, next.map(|n| n.commit))
                .await;
            return None;
        }
        crate::metrics::unstalled(&self.metrics.stalled);
        if self.feed.wanted() {
            self.feed_written(commit.presence.iter().map(|(z, v)| (z, v)));
        }
        for z in &commit.dirty {
            self.reschedule(z);
        }
        self.ack_batch(commit.ack).await;
        next
    }

    /// Hands `written` (zone, value) to the feed with the revisions the
    /// leaf gave them, as the zones' slots now record.
    fn feed_written<'a>(&self, written: impl Iterator<Item = (&'a String, &'a Bytes)>) {
        let mut batch: Vec<Committed> = written
            .filter_map(|(zone, value)| {
                self.slots.get(zone).map(|s| Committed {
                    key: zone.clone(),
                    revision: s.presence_rev,
                    value: Some(value.clone()),
                })
            })
            .collect();
        batch.sort_unstable_by_key(|c| c.revision);
        self.feed.send(batch);
    }

    /// The sequential commit of what a failed pipelined one left: the
    /// zones and transitions not known durable plus the next batch (in
    /// flight or planned), then one ack for both.
    async fn fall_back(
        &mut self,
        mut dirty: BTreeSet<String>,
        mut transitions: Vec<Transition>,
        mut ack: Option<jetstream::Message>,
        next: Option<Commit>,
    ) {
        if let Some(n) = next {
            dirty.extend(n.dirty);
            transitions.extend(n.transitions);
            ack = n.ack.or(ack);
        }
        self.commit_with_retry(dirty, transitions).await;
        self.ack_batch(ack).await;
    }

    /// Acknowledges a batch whose effects are durable (ack policy "all":
    /// its last message covers it), unless this instance was fenced.
    async fn ack_batch(&mut self, last: Option<jetstream::Message>) {
        if self.fencing.is_fenced() {
            // Not durable here: the new holder applies these (its
            // catch-up reads from the consumer's ack floor).
            return;
        }
        if let Some(last) = last {
            if let Err(e) = last.ack().await {
                // The batch is durable; a lost ack only means redelivery,
                // which is skipped by sequence.
                tracing::warn!(error = %e, "ack of a SENSORS batch failed; it will be redelivered and skipped");
            }
        }
    }

    /// Encodes a batch's writes as of now (the zones' states move on with
    /// the next batch). A `debounce` write is planned where the zone's
    /// pending deadline differs from what KV will hold once the commit
    /// in flight is durable.
    fn plan(
        &self,
        dirty: BTreeSet<String>,
        transitions: Vec<Transition>,
        ack: Option<jetstream::Message>,
    ) -> Commit {
        let mut events = Vec::with_capacity(transitions.len());
        let mut presence = Vec::with_capacity(dirty.len());
        let mut debounce = Vec::new();
        let mut ok = true;
        for t in &transitions {
            match serde_json::to_vec(t) {
                Ok(payload) => events.push((
                    self.site.events_subject(&t.zone),
                    self.fencing.events_message(
                        Bytes::from(payload),
                        naming::transition_msg_id(&self.site, &t.zone, t.number),
                    ),
                )),
                Err(_) => ok = false,
            }
        }
        for zone in &dirty {
            let Some(slot) = self.slots.get(zone) else {
                continue;
            };
            match serde_json::to_vec(&slot.state) {
                Ok(v) => presence.push((zone.clone(), Bytes::from(v))),
                Err(_) => ok = false,
            }
            let stored = self
                .in_flight
                .as_ref()
                .and_then(|f| f.commit.debounce_of(zone))
                .unwrap_or(slot.debounce);
            if stored != slot.state.pending {
                let value = match slot.state.pending {
                    Some(p) => match serde_json::to_vec(&DebounceRecord {
                        v: super::STATE_SCHEMA,
                        zone: zone.clone(),
                        to: p.to,
                        deadline: p.deadline,
                    }) {
                        Ok(v) => Some(Bytes::from(v)),
                        Err(_) => {
                            ok = false;
                            None
                        }
                    },
                    None => None,
                };
                debounce.push((zone.clone(), value, slot.state.pending));
            }
        }
        Commit {
            transitions,
            events,
            dirty,
            presence,
            debounce,
            ack,
            encoded: ok,
        }
    }

    /// A commit's KV writes with the revisions the keys have now (the
    /// commit before is durable).
    fn cas_writes(&self, commit: &Commit) -> (Vec<CasWrite>, Vec<CasWrite>) {
        let rev = |zone: &str, presence: bool| {
            self.slots.get(zone).map_or(0, |s| {
                if presence {
                    s.presence_rev
                } else {
                    s.debounce_rev
                }
            })
        };
        let presence = commit
            .presence
            .iter()
            .map(|(zone, value)| CasWrite {
                key: zone.clone(),
                value: Some(value.clone()),
                expected: rev(zone, true),
            })
            .collect();
        let debounce = commit
            .debounce
            .iter()
            .map(|(zone, value, _)| CasWrite {
                key: zone.clone(),
                value: value.clone(),
                expected: rev(zone, false),
            })
            .collect();
        (presence, debounce)
    }

    /// Applies observations in stream order and makes the effects durable
    /// (sequentially, after the commit in flight).
    async fn apply_inputs(&mut self, inputs: Vec<(u64, Observation)>) {
        self.flush().await;
        let (dirty, transitions) = self.apply_core(&inputs);
        self.commit_with_retry(dirty, transitions).await;
    }

    /// Runs observations through the core in stream order: the zones
    /// changed and the transitions, nothing written yet.
    fn apply_core(&mut self, inputs: &[(u64, Observation)]) -> (BTreeSet<String>, Vec<Transition>) {
        if !inputs.is_empty() {
            Metrics::inc(&self.metrics.batches);
        }
        Metrics::add(&self.metrics.observations, inputs.len() as u64);
        let mut transitions = Vec::new();
        let mut dirty = BTreeSet::new();
        for (seq, obs) in inputs {
            let Some(zones) = self.model.by_sensor.get(&obs.sensor) else {
                continue;
            };
            for zone in zones {
                let (Some(zm), Some(slot)) = (self.model.zones.get(zone), self.slots.get_mut(zone))
                else {
                    continue;
                };
                if *seq <= slot.state.last_seq {
                    crate::emit!(REDELIVERY_SKIPPED, &self.metrics.redeliveries; zone = %zone, seq, last_seq = slot.state.last_seq);
                    continue;
                }
                let input = Input {
                    seq: *seq,
                    sensor: &obs.sensor,
                    value: obs.value,
                    at: obs.observed_at,
                };
                transitions.extend(apply(zm, &mut slot.state, &input));
                dirty.insert(zone.clone());
            }
        }
        (dirty, transitions)
    }

    /// Whether writes may go out: always without a leader lease; with one,
    /// while its fence is valid ([`Fencing::may_write`]).
    fn may_write(&mut self) -> bool {
        self.fencing.may_write()
    }

    /// Fires every timer due by `now` (in deadline order across zones).
    pub async fn tick(&mut self, now: Timestamp) {
        self.flush().await;
        let due: Vec<String> = self
            .timers
            .iter()
            .take_while(|(d, _)| *d <= now)
            .map(|(_, z)| z.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let mut transitions = Vec::new();
        let mut dirty = BTreeSet::new();
        for zone in due {
            let (Some(zm), Some(slot)) = (self.model.zones.get(&zone), self.slots.get_mut(&zone))
            else {
                continue;
            };
            transitions.extend(advance(zm, &mut slot.state, now));
            dirty.insert(zone);
        }
        transitions.sort_by(|a, b| (a.at, &a.zone, a.number).cmp(&(b.at, &b.zone, b.number)));
        self.commit_with_retry(dirty, transitions).await;
        self.update_gauges();
    }

    /// Makes transitions and zone states durable, retrying until they are.
    /// A compare-and-set conflict means the stored value is not what we
    /// last wrote: the zone is reloaded from KV (it is the authority) and
    /// an error is logged, since the engine should be the only writer.
    async fn commit_with_retry(
        &mut self,
        mut dirty: BTreeSet<String>,
        transitions: Vec<Transition>,
    ) {
        let touched = dirty.clone();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        let mut events = transitions;
        let mut logged = false;
        loop {
            crate::systemd::watchdog();
            if !self.may_write() {
                tracing::warn!(
                    zones = dirty.len(),
                    transitions = events.len(),
                    "not written: this instance no longer holds the engine's leader lease (fenced); the new holder applies these readings"
                );
                return;
            }
            if let Err(e) = self.publish_transitions(&events).await {
                crate::metrics::stalled(&self.metrics.stalled, format!("EVENTS: {e}"));
                if !logged {
                    tracing::warn!(error = %e, "cannot publish transitions to EVENTS; retrying");
                    logged = true;
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            events.clear();
            match self.write_states(&dirty).await {
                Ok(()) => break,
                Err(remaining) => {
                    crate::metrics::stalled(
                        &self.metrics.stalled,
                        format!(
                            "KV presence or debounce: {} zone(s) not written",
                            remaining.len()
                        ),
                    );
                    dirty = remaining;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        if logged {
            tracing::info!("EVENTS reachable again");
        }
        crate::metrics::unstalled(&self.metrics.stalled);
        for z in &touched {
            self.reschedule(z);
        }
    }

    async fn publish_transitions(
        &mut self,
        transitions: &[Transition],
    ) -> Result<(), async_nats::Error> {
        let mut messages = Vec::with_capacity(transitions.len());
        for t in transitions {
            let payload = serde_json::to_vec(t)?;
            let msg = self.fencing.events_message(
                Bytes::from(payload),
                naming::transition_msg_id(&self.site, &t.zone, t.number),
            );
            messages.push((self.site.events_subject(&t.zone), msg));
        }
        if !messages.is_empty() {
            Metrics::inc(&self.metrics.write_rounds);
        }
        let acks = crate::store::publish::publish_all(&self.js, messages).await;
        self.confirm(transitions, acks).await
    }

    /// Reads the `EVENTS` acks of `transitions`: counts the ones stored,
    /// and on a refusal by the server-side fence checks the takeover
    /// record ([`Fencing::events_refused`]). The first error, if any.
    async fn confirm(
        &mut self,
        transitions: &[Transition],
        acks: Vec<Result<jetstream::publish::PublishAck, jetstream::context::PublishError>>,
    ) -> Result<(), async_nats::Error> {
        let mut first_error = None;
        let mut sequences = Vec::with_capacity(transitions.len());
        for (t, ack) in transitions.iter().zip(acks) {
            sequences.push(ack.as_ref().map_or(0, |a| a.sequence));
            match ack {
                // Counted once per transition, when EVENTS first confirms
                // holding it: a retry after a lost ack gets `duplicate`
                // for a message this process has not counted yet, and a
                // batch retried after a partial failure must not count
                // the ones already confirmed again.
                Ok(_) => {
                    let counted = self.counted.entry(t.zone.clone()).or_insert(0);
                    if t.number > *counted {
                        *counted = t.number;
                        Metrics::inc(&self.metrics.transitions);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            if self.fencing.is_fence_refusal(e.kind()) {
                self.fencing.events_refused(&self.js, &self.site).await;
            }
            return Err(e.into());
        }
        // The sequence tells when EVENTS stored it: a holder frozen with
        // publishes on the wire logs them only when it wakes, possibly
        // after a takeover, and its sequence shows they landed before.
        for (t, sequence) in transitions.iter().zip(sequences) {
            tracing::info!(zone = %t.zone, from = t.from.as_str(), to = t.to.as_str(), at = %t.at, confidence = t.confidence, number = t.number, sequence, "transition");
        }
        Ok(())
    }

    /// Writes presence and debounce for `dirty` zones. Returns the zones
    /// that still need writing (after a failure or a reload).
    async fn write_states(&mut self, dirty: &BTreeSet<String>) -> Result<(), BTreeSet<String>> {
        if dirty.is_empty() {
            return Ok(());
        }
        let mut presence_writes = Vec::with_capacity(dirty.len());
        let mut debounce_writes = Vec::new();
        for zone in dirty {
            let Some(slot) = self.slots.get(zone) else {
                continue;
            };
            let value = serde_json::to_vec(&slot.state)
                .map(Bytes::from)
                .map_err(|_| dirty.clone())?;
            presence_writes.push(CasWrite {
                key: zone.clone(),
                value: Some(value),
                expected: slot.presence_rev,
            });
            if slot.debounce != slot.state.pending {
                let value = match slot.state.pending {
                    Some(p) => Some(Bytes::from(
                        serde_json::to_vec(&DebounceRecord {
                            v: super::STATE_SCHEMA,
                            zone: zone.clone(),
                            to: p.to,
                            deadline: p.deadline,
                        })
                        .map_err(|_| dirty.clone())?,
                    )),
                    None => None,
                };
                debounce_writes.push(CasWrite {
                    key: zone.clone(),
                    value,
                    expected: slot.debounce_rev,
                });
            }
        }
        Metrics::inc(&self.metrics.write_rounds);
        let fed: Option<HashMap<String, Bytes>> = self.feed.wanted().then(|| {
            presence_writes
                .iter()
                .filter_map(|w| w.value.clone().map(|v| (w.key.clone(), v)))
                .collect()
        });
        let mut written = Vec::new();
        let (presence_results, debounce_results) = futures::join!(
            kvstore::write_batch(&self.js, naming::PRESENCE_BUCKET, presence_writes),
            kvstore::write_batch(&self.js, naming::DEBOUNCE_BUCKET, debounce_writes)
        );
        let mut retry = BTreeSet::new();
        let mut conflicts = Vec::new();
        let results = presence_results
            .into_iter()
            .map(|r| (naming::PRESENCE_BUCKET, r))
            .chain(
                debounce_results
                    .into_iter()
                    .map(|r| (naming::DEBOUNCE_BUCKET, r)),
            );
        for (bucket, r) in results {
            match r.result {
                Ok(rev) => {
                    Metrics::inc(&self.metrics.kv_writes);
                    if let Some(slot) = self.slots.get_mut(&r.key) {
                        if bucket == naming::PRESENCE_BUCKET {
                            slot.presence_rev = rev;
                            if fed.is_some() {
                                written.push(r.key.clone());
                            }
                        } else {
                            slot.debounce_rev = rev;
                            slot.debounce = slot.state.pending;
                        }
                    }
                }
                Err(e) if e.is_conflict() => conflicts.push((bucket, r.key)),
                Err(e) => {
                    tracing::warn!(bucket, error = %e, "KV write failed; retrying");
                    retry.insert(r.key);
                }
            }
        }
        if let Some(values) = &fed {
            self.feed_written(written.iter().filter_map(|z| values.get(z).map(|v| (z, v))));
        }
        if !conflicts.is_empty() && self.fencing.leased() {
            // With a leader lease the engine is the one writer: a
            // changed revision means another holder wrote (it rewrites
            // every zone at takeover). Stop writing.
            crate::emit!(
                KV_CONFLICTS_FENCED,
                &self.metrics.kv_conflicts,
                by = conflicts.len() as u64;
                conflicts = conflicts.len(),
                first = ?conflicts.first()
            );
            self.fencing.stop();
            return Ok(());
        }
        for (bucket, key) in conflicts {
            crate::emit!(KV_CONFLICT, &self.metrics.kv_conflicts; bucket, key = %key);
            self.reload(bucket, &key).await;
            retry.insert(key);
        }
        if retry.is_empty() {
            Ok(())
        } else {
            Err(retry)
        }
    }

    /// Re-reads one key after a conflict and adopts its revision (and, for
    /// presence, its state if it is at least as far along as ours).
    async fn reload(&mut self, bucket: &str, zone: &str) {
        let store = if bucket == naming::PRESENCE_BUCKET {
            &self.presence
        } else {
            &self.debounce
        };
        let entry = match store.entry(zone).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(bucket, zone, error = %e, "cannot re-read key after conflict");
                return;
            }
        };
        let Some(slot) = self.slots.get_mut(zone) else {
            return;
        };
        let revision = entry.as_ref().map_or(0, |e| e.revision);
        if bucket == naming::PRESENCE_BUCKET {
            slot.presence_rev = revision;
            if let (true, Some(e)) = (self.feed.wanted(), entry.as_ref()) {
                self.feed.send(vec![Committed {
                    key: zone.to_owned(),
                    revision,
                    value: (e.operation == kv::Operation::Put).then(|| e.value.clone()),
                }]);
            }
            let stored = entry
                .filter(|e| e.operation == kv::Operation::Put)
                .and_then(|e| serde_json::from_slice::<ZoneState>(&e.value).ok());
            if let Some(stored) = stored {
                if stored.last_seq >= slot.state.last_seq && stored.clock >= slot.state.clock {
                    slot.state = stored;
                    if let Some(zm) = self.model.zones.get(zone) {
                        reconcile(zm, &mut slot.state);
                    }
                }
            }
        } else {
            slot.debounce_rev = revision;
            slot.debounce = None;
        }
    }

    /// Applies the messages a previous instance had received but not acked.
    ///
    /// The server redelivers those only after the consumer's ack wait,
    /// while new messages flow at once; applied late they would be skipped
    /// as older than the zone's `last_seq`, and the ack of a later message
    /// (ack policy "all") would cover them. So the range between the ack
    /// floor and the last delivered sequence is read directly, in order,
    /// before the consumer is bound. Applying is idempotent, so a crash in
    /// here just does it again.
    async fn catch_up(&mut self, floor: u64, delivered: u64) -> Result<(), RunnerError> {
        if delivered <= floor {
            return Ok(());
        }
        tracing::info!(
            from = floor + 1,
            to = delivered,
            "applying observations a previous run received but did not acknowledge"
        );
        let stream = self
            .js
            .get_stream(naming::SENSORS_STREAM)
            .await
            .map_err(|e| missing("stream SENSORS", e))?;
        let reader = stream
            .create_consumer(pull::OrderedConfig {
                // Named: readers of SENSORS may create named consumers
                // only (the ACL keeps them off the durable that way).
                name: Some(crate::store::consumer_name(
                    self.js.client(),
                    "engine-catchup",
                )),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: floor + 1,
                },
                filter_subject: self.site.sensors_filter(),
                ..Default::default()
            })
            .await
            .map_err(|e| RunnerError::Consume(e.into()))?;
        let mut messages = reader
            .messages()
            .await
            .map_err(|e| RunnerError::Consume(e.into()))?;
        let mut batch = Vec::with_capacity(self.batch);
        let mut done = false;
        while !done {
            match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
                Ok(Some(Ok(msg))) => {
                    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX);
                    if seq <= delivered {
                        batch.push(msg);
                    }
                    done = seq >= delivered;
                }
                Ok(Some(Err(e))) => return Err(RunnerError::Consume(e.into())),
                // The range may have aged out of the stream: nothing left.
                Ok(None) | Err(_) => done = true,
            }
            if batch.len() >= self.batch || (done && !batch.is_empty()) {
                let msgs = std::mem::take(&mut batch);
                let inputs = self.decode(&msgs);
                self.apply_inputs(inputs).await;
            }
        }
        Ok(())
    }

    /// Validates and applies one command, makes the result durable, and
    /// builds the reply.
    async fn execute(&mut self, subject: &str, payload: &[u8]) -> Result<Reply, CommandError> {
        // Before the core changes anything: a failed flush commits the
        // zones' current states.
        self.flush().await;
        if let Ok(Command::Forget { by }) = command::parse(payload) {
            return self.forget(subject, &by).await;
        }
        let zone = self
            .site
            .cmd_zone(subject)
            .filter(|z| self.slots.contains_key(*z))
            .ok_or_else(|| CommandError {
                kind: ErrorKind::UnknownZone,
                message: format!(
                    "subject {subject:?}: no zone {:?} is configured on site {} (zones: {})",
                    self.site.cmd_zone(subject).unwrap_or(subject),
                    self.site,
                    zone_list(self.slots.keys())
                ),
            })?
            .to_owned();
        let command = command::parse(payload)?;
        let (Some(zm), Some(slot)) = (self.model.zones.get(&zone), self.slots.get_mut(&zone))
        else {
            return Err(CommandError {
                kind: ErrorKind::UnknownZone,
                message: format!("zone {zone:?} has no model"),
            });
        };
        let now = Timestamp::now();
        let (changed, transitions) = match &command {
            Command::Override(request) => (true, set_override(zm, &mut slot.state, request, now)),
            Command::Clear { by } => clear_override(zm, &mut slot.state, by, now),
            Command::Forget { .. } => (false, Vec::new()),
        };
        self.commit_with_retry(BTreeSet::from([zone.clone()]), transitions)
            .await;
        self.update_gauges();
        if self.fencing.is_fenced() {
            return Err(CommandError {
                kind: ErrorKind::Unavailable,
                message: "this engine lost its leader lease before the command was durable; not applied here".into(),
            });
        }
        let slot = self.slots.get(&zone).ok_or_else(|| CommandError {
            kind: ErrorKind::Unavailable,
            message: format!("zone {zone:?} vanished while committing"),
        })?;
        match &command {
            Command::Override(r) => tracing::info!(
                zone = %zone,
                state = r.state.as_str(),
                until = ?slot.state.manual.as_ref().map(|m| m.until.to_string()),
                by = %r.by,
                reason = r.reason.as_deref().unwrap_or(""),
                "manual override applied"
            ),
            Command::Clear { by } => {
                tracing::info!(zone = %zone, by = %by, changed, state = slot.state.state.as_str(), "manual override cleared")
            }
            Command::Forget { .. } => {}
        }
        Ok(Reply::done(&slot.state, changed, slot.presence_rev))
    }

    /// (Re)reads the ownership table, at most once a second: a command
    /// with a reply subject nobody may get makes the engine look again
    /// (the table may have been provisioned since), a flood of them does
    /// not turn into a flood of stream info requests.
    async fn refresh_replies(&mut self) {
        let now = tokio::time::Instant::now();
        if self
            .replies_read
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.replies_read = Some(now);
        let stream = naming::kv_stream(naming::OWNERS_BUCKET);
        match crate::store::published::read(&self.js, &stream).await {
            Ok(table) => self.replies = table,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the ownership table; keeping the last one read")
            }
        }
    }

    /// Whether `reply` may receive a command's answer, per the ownership
    /// table (read again once when it says no).
    async fn reply_allowed(&mut self, reply: &str) -> bool {
        use crate::store::published::reply_allowed;
        if reply_allowed(reply, self.replies.as_ref()) {
            return true;
        }
        self.refresh_replies().await;
        reply_allowed(reply, self.replies.as_ref())
    }

    /// Answers one command message.
    /// Removes an unconfigured zone from KV presence and debounce, the
    /// removal first recorded in EVENTS (`{"removed": true, ...}` with the
    /// last stored state), so the audit trail says who removed what when.
    async fn forget(&mut self, subject: &str, by: &str) -> Result<Reply, CommandError> {
        self.flush().await;
        let unavailable = |what: &str, e: &dyn std::fmt::Display| CommandError {
            kind: ErrorKind::Unavailable,
            message: format!("{what}: {e}"),
        };
        let zone = self
            .site
            .cmd_zone(subject)
            .filter(|z| naming::is_presence_key(z))
            .ok_or_else(|| CommandError {
                kind: ErrorKind::UnknownZone,
                message: format!("subject {subject:?} names no zone"),
            })?
            .to_owned();
        if self.slots.contains_key(&zone) {
            return Err(CommandError {
                kind: ErrorKind::BadField,
                message: format!(
                    "zone {zone:?} is configured: remove it from the config and restart the engine first"
                ),
            });
        }
        let entry = self
            .presence
            .entry(&zone)
            .await
            .map_err(|e| unavailable("cannot read KV presence", &e))?
            .filter(|e| e.operation == kv::Operation::Put)
            .ok_or_else(|| CommandError {
                kind: ErrorKind::UnknownZone,
                message: format!("zone {zone:?} has no state in KV presence"),
            })?;
        let last: serde_json::Value =
            serde_json::from_slice(&entry.value).unwrap_or(serde_json::Value::Null);
        let record = serde_json::json!({
            "v": super::STATE_SCHEMA,
            "zone": zone,
            "removed": true,
            "at": Timestamp::now(),
            "by": by,
            "revision": entry.revision,
            "last": last,
        });
        let msg = self.fencing.events_message(
            Bytes::from(record.to_string()),
            format!("{}.{}.removed.{}", self.site.as_str(), zone, entry.revision),
        );
        let stored = async {
            self.js
                .send_publish(self.site.events_subject(&zone), msg)
                .await?
                .await
        };
        if let Err(e) = stored.await {
            if self.fencing.is_fence_refusal(e.kind()) {
                self.fencing.events_refused(&self.js, &self.site).await;
            }
            return Err(unavailable("cannot record the removal in EVENTS", &e));
        }
        self.presence
            .purge(&zone)
            .await
            .map_err(|e| unavailable("cannot remove the key from KV presence", &e))?;
        // The purge's revision is not known here: the page goes back to
        // KV, which has it.
        self.feed.restart();
        if let Err(e) = self.debounce.purge(&zone).await {
            tracing::warn!(zone = %zone, error = %e, "cannot remove the key from KV debounce");
        }
        tracing::info!(zone = %zone, by = %by, revision = entry.revision, "unconfigured zone removed from KV presence (recorded in EVENTS)");
        let mut reply = Reply::error(
            Some(&zone),
            CommandError {
                kind: ErrorKind::Unavailable,
                message: String::new(),
            },
        );
        reply.ok = true;
        reply.error = None;
        reply.changed = Some(true);
        reply.revision = Some(entry.revision);
        Ok(reply)
    }

    async fn command(&mut self, client: &async_nats::Client, msg: async_nats::Message) {
        if !self.may_write() {
            // The holder answers (commands are plain subscriptions, every
            // engine sees them): a refusal from here would race its reply.
            tracing::info!(subject = %msg.subject, "command not answered: this instance no longer holds the engine's leader lease");
            return;
        }
        // A reply subject is where the engine will publish: never
        // anywhere but the inbox of an identity granted `commands`. The
        // command is refused before it changes anything, and not
        // answered (an answer would be the write the sender is after).
        if let Some(reply_to) = &msg.reply {
            if !self.reply_allowed(reply_to.as_str()).await {
                tracing::warn!(subject = %msg.subject, reply = %reply_to, "command refused: its reply subject is not the inbox of an identity granted commands in the ownership map; not applied, not answered");
                return;
            }
        }
        let id = command::command_id(&msg.payload).map(|id| (msg.subject.to_string(), id));
        let now = tokio::time::Instant::now();
        self.answered
            .retain(|_, (at, _)| now.duration_since(*at) < command::RETRY_WINDOW);
        if let Some(key) = &id {
            if let Some((_, body)) = self.answered.get(key) {
                tracing::info!(subject = %msg.subject, id = %key.1, "command retried within the window: answered with the original reply, not applied again");
                if let Some(reply_to) = msg.reply {
                    if let Err(e) = client.publish(reply_to, body.clone()).await {
                        tracing::warn!(subject = %msg.subject, error = %e, "cannot send a command reply");
                    }
                }
                return;
            }
        }
        let reply = match self.execute(&msg.subject, &msg.payload).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, kind = e.kind.as_str(), error = %e.message, "command refused");
                Reply::error(self.site.cmd_zone(&msg.subject), e)
            }
        };
        let Some(reply_to) = msg.reply else {
            tracing::warn!(subject = %msg.subject, ok = reply.ok, "command without a reply subject (send it as a request to see the result)");
            return;
        };
        let body = match serde_json::to_vec(&reply) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a command reply");
                return;
            }
        };
        if let Some(key) = id.filter(|_| !self.fencing.is_fenced()) {
            // Bounded: a flood of distinct ids forgets the oldest first.
            if self.answered.len() >= MAX_ANSWERED {
                if let Some(oldest) = self
                    .answered
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
                {
                    self.answered.remove(&oldest);
                }
            }
            self.answered.insert(key, (now, body.clone()));
        }
        if let Err(e) = client.publish(reply_to, body).await {
            tracing::warn!(subject = %msg.subject, error = %e, "cannot send a command reply");
        }
    }

    /// Consumes `SENSORS` and fires timers until `shutdown` turns true.
    pub async fn run(
        self,
        consumer: jetstream::consumer::Consumer<pull::Config>,
        shutdown: watch::Receiver<bool>,
        on_ready: impl FnMut(&Runner),
    ) -> Result<(), RunnerError> {
        let (_keep, models) = watch::channel(self.model.clone());
        self.run_reloadable(consumer, shutdown, models, on_ready)
            .await
    }

    /// Swaps in a model of the same zones (SIGHUP: thresholds, evidence,
    /// debounce times changed); refuses one that adds or removes zones,
    /// whose slots only a restart rehydrates.
    pub fn set_model(&mut self, model: Arc<Model>) -> Result<(), String> {
        if !model.zones.keys().eq(self.model.zones.keys()) {
            return Err("the set of zones changed: a restart is needed".into());
        }
        self.model = model;
        let zones: Vec<String> = self.slots.keys().cloned().collect();
        for z in &zones {
            self.reschedule(z);
        }
        Ok(())
    }

    /// [`Runner::run`], taking a new model from `models` whenever one is
    /// sent (see [`Runner::set_model`]).
    pub async fn run_reloadable(
        mut self,
        consumer: jetstream::consumer::Consumer<pull::Config>,
        mut shutdown: watch::Receiver<bool>,
        mut models: watch::Receiver<Arc<Model>>,
        mut on_ready: impl FnMut(&Runner),
    ) -> Result<(), RunnerError> {
        let mut models_open = true;
        let mut info = consumer.clone();
        let info = info
            .info()
            .await
            .map_err(|e| RunnerError::Consume(e.into()))?;
        self.catch_up(
            info.ack_floor.stream_sequence,
            info.delivered.stream_sequence,
        )
        .await?;
        self.last_delivery = Some((
            info.delivered.consumer_sequence,
            info.delivered.stream_sequence,
        ));
        self.backlog = info.num_pending;
        let client = self.js.client();
        self.refresh_replies().await;
        let cmd_subject = self.site.cmd_filter();
        let mut commands = client
            .subscribe(cmd_subject.clone())
            .await
            .map_err(|source| RunnerError::Commands {
                subject: cmd_subject,
                source,
            })?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.batch)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| RunnerError::Consume(e.into()))?;
        on_ready(&self);
        // Wakes the loop often enough to feed the watchdog when idle, and
        // to refresh the status line.
        let status_period = Duration::from_secs(5);
        let beat = crate::systemd::watchdog_period()
            .unwrap_or(status_period)
            .min(status_period);
        let mut heartbeat = tokio::time::interval(beat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_status = tokio::time::Instant::now();
        // The system clock against the monotonic one, once per beat: a
        // step shows as a difference between their elapsed times.
        let mut last_beat = (std::time::Instant::now(), Timestamp::now());
        // Waits after a consumer error, reset by the next message.
        let mut consume_retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let mut fence_check = tokio::time::interval(crate::store::leader::POLL);
        fence_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let fenced_mode = self.fencing.leased();
        loop {
            if !self.may_write() {
                tracing::warn!("engine stopped: this instance no longer holds the leader lease; nothing more is written or acknowledged");
                break;
            }
            let next = if self.backlog == 0 {
                self.timers.first().map(|(d, _)| *d)
            } else {
                None
            };
            let sleep_for = next
                .map(
                    |d| Duration::from_millis(d.0.saturating_sub(Timestamp::now().0).max(0) as u64),
                )
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                r = models.changed(), if models_open => match r {
                    Ok(()) => {
                        let model = models.borrow_and_update().clone();
                        match self.set_model(model) {
                            Ok(()) => tracing::info!("zone and evidence configuration reloaded"),
                            Err(e) => tracing::warn!(reason = %e, "new zone configuration not applied"),
                        }
                    }
                    Err(_) => models_open = false,
                },
                // Before SENSORS: commands are rare, and a steady flood of
                // observations must not starve them (the select is biased).
                Some(msg) = commands.next() => self.command(&client, msg).await,
                m = messages.next() => match m {
                    Some(Ok(first)) => {
                        consume_retry.reset();
                        let mut batch = vec![first];
                        while batch.len() < self.batch {
                            match messages.next().now_or_never() {
                                Some(Some(Ok(m))) => batch.push(m),
                                Some(Some(Err(e))) => { tracing::warn!(error = %e, "SENSORS consumer"); break }
                                _ => break,
                            }
                        }
                        self.process(batch).await;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "SENSORS consumer: waiting for the server");
                        tokio::time::sleep(consume_retry.next_delay()).await;
                    }
                    None => return Err(RunnerError::Consume("SENSORS consumer stream ended".into())),
                },
                // No next batch yet: the one in flight completes as soon
                // as its EVENTS publishes are stored (its KV writes could
                // not go out before), unless a batch arrives first.
                _ = super::writer::stored(&mut self.in_flight), if self.in_flight.is_some() => self.flush().await,
                _ = tokio::time::sleep(sleep_for) => self.tick(Timestamp::now()).await,
                _ = fence_check.tick(), if fenced_mode => {}
                _ = heartbeat.tick() => {
                    let beat_at = (std::time::Instant::now(), Timestamp::now());
                    let step_ms = (beat_at.1 .0 - last_beat.1 .0)
                        - beat_at.0.duration_since(last_beat.0).as_millis() as i64;
                    if step_ms.abs() >= CLOCK_STEP_MS {
                        tracing::warn!(
                            step_ms,
                            "the system clock was stepped; zone clocks never run backwards, so after a step back debounce timers and overrides fire that much late"
                        );
                    }
                    last_beat = beat_at;
                    if last_status.elapsed() >= status_period {
                        crate::systemd::status(&self.status_line());
                        last_status = tokio::time::Instant::now();
                    }
                }
            }
            crate::systemd::watchdog();
        }
        self.flush().await;
        Ok(())
    }
}

/// A short list of zone names for an error message.
fn zone_list<'a>(zones: impl Iterator<Item = &'a String>) -> String {
    let mut names: Vec<&str> = zones.map(String::as_str).take(11).collect();
    if names.len() > 10 {
        names.truncate(10);
        names.push("...");
    }
    names.join(", ")
}

/// Missing provisioning is fixed by an operator, not by a restart.
impl crate::supervise::Failure for RunnerError {
    fn is_fatal(&self) -> bool {
        matches!(self, RunnerError::NotProvisioned { .. })
    }
}
