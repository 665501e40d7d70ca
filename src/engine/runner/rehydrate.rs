//! A restarted or newly elected engine carries on exactly where the last
//! one stopped: zones come back from KV, not from memory, and what a
//! previous run received but never acknowledged is applied before anything
//! new.

use super::{missing, DebounceRecord, Runner, RunnerError, Slot};
use crate::engine::fencing::Fencing;
use crate::engine::metrics::EngineMetrics;
use crate::engine::standby;
use crate::engine::{initial_state, reconcile, Model, Pending, ZoneState};
use crate::naming::{self, Site};
use crate::store::kv as kvstore;
use crate::time::Timestamp;
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

impl Runner {
    /// [`Runner::start`] for the holder of the leader lease: every write
    /// asks `fence` first, and every zone's presence key is rewritten
    /// at once (same value, new revision), so a former holder's
    /// compare-and-set writes expect revisions that no longer exist.
    /// `warm` is a standby's followed state ([`standby`]): used
    /// when it has caught up with the buckets, else they are read in full.
    pub async fn start_fenced(
        js: jetstream::Context,
        site: Site,
        model: Arc<Model>,
        metrics: Arc<EngineMetrics>,
        batch: usize,
        fence: Option<crate::store::leader::Fence>,
        warm: Option<standby::Warm>,
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
            Some(w) => w.take(&presence, &debounce, standby::CATCH_UP).await,
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

    /// Applies the messages a previous instance had received but not acked.
    ///
    /// The server redelivers those only after the consumer's ack wait,
    /// while new messages flow at once; applied late they would be skipped
    /// as older than the zone's `last_seq`, and the ack of a later message
    /// (ack policy "all") would cover them. So the range between the ack
    /// floor and the last delivered sequence is read directly, in order,
    /// before the consumer is bound. Applying is idempotent, so a crash in
    /// here just does it again.
    pub(super) async fn catch_up(&mut self, floor: u64, delivered: u64) -> Result<(), RunnerError> {
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
}
