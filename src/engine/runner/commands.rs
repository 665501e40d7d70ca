//! Operator commands go through the same owner as the batches, so an
//! override never races a reading, and are answered only once durable.

use super::Runner;
use crate::engine::command::{self, Command, CommandError, ErrorKind, Reply};
use crate::engine::{clear_override, set_override};
use crate::naming;
use crate::time::Timestamp;
use async_nats::jetstream::kv;
use bytes::Bytes;
use std::collections::BTreeSet;
use std::time::Duration;

/// Command replies remembered for retries, at most.
const MAX_ANSWERED: usize = 10_000;

impl Runner {
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
    pub(super) async fn refresh_replies(&mut self) {
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
            "v": crate::engine::STATE_SCHEMA,
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

    /// Answers one command message.
    pub(super) async fn command(&mut self, client: &async_nats::Client, msg: async_nats::Message) {
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
