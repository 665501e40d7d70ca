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

mod commands;
mod commit;
mod rehydrate;

use super::feed::Publisher;
use super::fencing::Fencing;
use super::metrics::{EngineMetrics, REDELIVERY_SKIPPED};
use super::writer::InFlight;
use super::{
    advance, apply, next_deadline, Input, Model, Pending, Presence, Transition, ZoneState,
};
use crate::base::backoff::Backoff;
use crate::metrics::Metrics;
use crate::naming::{self, Site};
use crate::observation::Observation;
use crate::store::kv as kvstore;
use crate::time::Timestamp;
use async_nats::jetstream::{self, consumer::pull, kv};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A difference between the system clock's and the monotonic clock's
/// elapsed time over one engine beat at least this large is logged as a
/// clock step (NTP slews far slower than this).
const CLOCK_STEP_MS: i64 = 2_000;

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
    /// [`command::RETRY_WINDOW`](super::command::RETRY_WINDOW): a retry gets the original reply.
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

/// Missing provisioning is fixed by an operator, not by a restart.
impl crate::supervise::Failure for RunnerError {
    fn is_fatal(&self) -> bool {
        matches!(self, RunnerError::NotProvisioned { .. })
    }
}
