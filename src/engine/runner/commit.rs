//! Nothing is acknowledged before it is durable: this is where a batch's
//! transitions reach `EVENTS` and its zone states KV, in the order that
//! makes a crash at any point safe to redeliver.

use super::{DebounceRecord, Runner};
use crate::base::backoff::Backoff;
use crate::engine::feed::Committed;
use crate::engine::metrics::{KV_CONFLICT, KV_CONFLICTS_FENCED};
use crate::engine::writer::{Commit, InFlight};
use crate::engine::{reconcile, Transition, ZoneState};
use crate::metrics::Metrics;
use crate::naming;
use crate::observation::Observation;
use crate::store::kv::{self as kvstore, CasWrite};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

impl Runner {
    /// Applies the last part of a batch and starts its commit
    /// ([`crate::engine::writer`]): its `EVENTS` publishes go out now, together
    /// with the KV writes of the batch before, whose acks are awaited
    /// (then that batch is acknowledged); this batch's KV writes and ack
    /// wait for the next batch or [`Runner::flush`].
    pub(super) async fn pipeline(
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
    pub(super) async fn flush(&mut self) {
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
                        v: crate::engine::STATE_SCHEMA,
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

    /// Makes transitions and zone states durable, retrying until they are.
    /// A compare-and-set conflict means the stored value is not what we
    /// last wrote: the zone is reloaded from KV (it is the authority) and
    /// an error is logged, since the engine should be the only writer.
    pub(super) async fn commit_with_retry(
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
    /// record ([`Fencing::events_refused`](crate::engine::fencing::Fencing::events_refused)). The first error, if any.
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
                            v: crate::engine::STATE_SCHEMA,
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
}
