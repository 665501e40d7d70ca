//! Following a KV bucket's stream with an ordered push consumer that this
//! module re-creates itself, so a client survives a server restart or a
//! cut leaf/hub link without a gap or a duplicate.
//!
//! async-nats' own KV watcher can hang for good after a server restart
//! (the server forgets the ephemeral consumer and the watcher keeps
//! waiting). Here the consumer sends idle heartbeats; silence for
//! [`SILENCE`], a consumer sequence gap, a heartbeat that reports more
//! deliveries than were seen, or a status from the server each make the
//! follower drop the consumer and create a new one from the last stream
//! sequence it handed out plus one (or a fresh snapshot, when asked).

use crate::base::backoff::Backoff;
use async_nats::jetstream::{self, consumer};
use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;

/// Idle heartbeat the consumer sends when it has nothing to deliver.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which the consumer counts as lost.
pub const SILENCE: Duration = Duration::from_secs(3);
/// How long the server keeps a consumer nobody listens to.
const INACTIVE: Duration = Duration::from_secs(30);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Put,
    Delete,
    Purge,
}

/// One message of the bucket.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    /// The stream sequence: the key's revision.
    pub revision: u64,
    pub op: Op,
    pub value: Bytes,
}

#[derive(Debug)]
pub enum Event {
    /// The follower starts over with a snapshot (last value per key);
    /// entries until [`Event::SnapshotDone`] replace what came before.
    Reset,
    Entry(Entry),
    /// Every key's last value has been delivered since the last reset.
    SnapshotDone,
}

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("stream {stream} does not exist ({reason})")]
    Missing { stream: String, reason: String },
}

/// Where a bucket's messages are and how its keys are spelled.
#[derive(Clone, Debug)]
pub struct Bucket {
    /// Stream holding the bucket (`KV_presence`, or a hub mirror's).
    pub stream: String,
    /// Subject prefix of keys, `$KV.<origin bucket>.`.
    pub prefix: String,
}

impl Bucket {
    /// The bucket behind `stream`, asking the server whether it mirrors
    /// another bucket (whose subjects its messages keep).
    pub async fn find(js: &jetstream::Context, stream: &str) -> Result<Bucket, FollowError> {
        let mut s = js
            .get_stream(stream)
            .await
            .map_err(|e| FollowError::Missing {
                stream: stream.to_owned(),
                reason: e.to_string(),
            })?;
        let info = s.info().await.map_err(|e| FollowError::Missing {
            stream: stream.to_owned(),
            reason: e.to_string(),
        })?;
        let origin = info
            .config
            .mirror
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_else(|| stream.to_owned());
        let bucket = origin.strip_prefix("KV_").unwrap_or(&origin);
        Ok(Bucket {
            stream: stream.to_owned(),
            prefix: format!("$KV.{bucket}."),
        })
    }
}

/// The operation a KV message records (put unless a header says else).
pub fn operation(headers: Option<&HeaderMap>) -> Op {
    let Some(h) = headers else { return Op::Put };
    if let Some(op) = h.get("KV-Operation") {
        return match op.as_str() {
            "DEL" => Op::Delete,
            "PURGE" => Op::Purge,
            _ => Op::Put,
        };
    }
    match h.get("Nats-Marker-Reason").map(|r| r.as_str()) {
        Some("Remove") => Op::Delete,
        Some(_) => Op::Purge,
        None => Op::Put,
    }
}

/// Follows `pattern` (KV key wildcards) of one bucket.
pub struct Follower {
    client: async_nats::Client,
    js: jetstream::Context,
    bucket: Bucket,
    filter: String,
    /// Re-create with a new snapshot instead of resuming (for small
    /// buckets whose deletions may have aged out, like leases).
    resnapshot: bool,
    /// Last stream sequence handed out.
    last_seen: Option<u64>,
    /// Last consumer sequence received from the current consumer.
    consumer_seq: u64,
    sub: Option<async_nats::Subscriber>,
    /// A snapshot is being delivered; done when `pending` reaches 0.
    in_snapshot: bool,
    /// Events decided at (re)creation, handed out before new messages.
    queued: std::collections::VecDeque<Event>,
    /// The bucket was found recreated; the next consumer starts with a
    /// snapshot (kept until a creation succeeds).
    recreated: bool,
    /// An outage was logged and not yet its end.
    outage: bool,
    /// Delays between attempts to re-create the consumer.
    retry: Backoff,
}

impl Follower {
    pub fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        bucket: Bucket,
        pattern: &str,
        resnapshot: bool,
    ) -> Follower {
        let filter = format!("{}{}", bucket.prefix, pattern);
        Follower {
            client,
            js,
            bucket,
            filter,
            resnapshot,
            last_seen: None,
            consumer_seq: 0,
            sub: None,
            in_snapshot: false,
            queued: Default::default(),
            recreated: false,
            outage: false,
            retry: Backoff::new(RETRY_MIN, RETRY_MAX),
        }
    }

    /// Starts after revision `seen` instead of with a snapshot, for a
    /// reader that holds everything up to it from elsewhere.
    pub fn after(mut self, seen: u64) -> Follower {
        self.last_seen = Some(seen);
        self
    }

    /// Creates the first consumer: a failure here (bucket missing,
    /// permission denied, server away) is the caller's to report, not
    /// retried.
    pub async fn start(&mut self) -> Result<(), String> {
        self.create().await
    }

    /// The last stream sequence handed out.
    pub fn last_seen(&self) -> Option<u64> {
        self.last_seen
    }

    /// (Re)creates the consumer; errors are returned for the caller's
    /// retry with backoff.
    async fn create(&mut self) -> Result<(), String> {
        self.sub = None;
        let mut snapshot = self.last_seen.is_none() || self.resnapshot || self.recreated;
        if let (false, Some(seen)) = (snapshot, self.last_seen) {
            // A bucket whose stream ends before what was already seen was
            // recreated (store lost, provisioned again): resuming would
            // wait for sequences that now mean something else.
            let last = self
                .js
                .get_stream(self.bucket.stream.as_str())
                .await
                .map_err(|e| format!("cannot read stream {}: {e}", self.bucket.stream))?
                .cached_info()
                .state
                .last_sequence;
            if last < seen {
                tracing::warn!(stream = %self.bucket.stream, last, seen, "the bucket ends before the last revision seen (recreated?); starting over with a snapshot");
                snapshot = true;
                self.recreated = true;
            }
        }
        let deliver_policy = match (snapshot, self.last_seen) {
            (false, Some(seen)) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seen + 1,
            },
            _ => consumer::DeliverPolicy::LastPerSubject,
        };
        let inbox = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| format!("cannot subscribe to {inbox}: {e}"))?;
        let config = consumer::push::Config {
            deliver_subject: inbox,
            deliver_policy,
            ack_policy: consumer::AckPolicy::None,
            filter_subject: self.filter.clone(),
            replay_policy: consumer::ReplayPolicy::Instant,
            flow_control: true,
            idle_heartbeat: HEARTBEAT,
            memory_storage: true,
            num_replicas: 1,
            inactive_threshold: INACTIVE,
            ..Default::default()
        };
        let created = self
            .js
            .create_consumer_on_stream(config, self.bucket.stream.as_str())
            .await
            .map_err(|e| format!("cannot create a consumer on {}: {e}", self.bucket.stream))?;
        let pending = created.cached_info().num_pending;
        self.consumer_seq = 0;
        self.sub = Some(sub);
        if snapshot {
            if self.last_seen.is_some() {
                self.queued.push_back(Event::Reset);
            }
            if self.recreated {
                // Sequences start over: nothing seen so far counts.
                self.recreated = false;
                self.last_seen = None;
            }
            self.in_snapshot = true;
        }
        // A snapshot cut short resumes like a delta; it is complete once
        // nothing is pending.
        if self.in_snapshot && pending == 0 {
            self.in_snapshot = false;
            self.queued.push_back(Event::SnapshotDone);
        }
        Ok(())
    }

    /// The next event; waits (and recovers) as long as it takes.
    pub async fn next(&mut self) -> Event {
        loop {
            if let Some(e) = self.queued.pop_front() {
                return e;
            }
            if self.sub.is_none() {
                match self.create().await {
                    Ok(()) => {
                        if self.outage {
                            tracing::info!(stream = %self.bucket.stream, resume_after = ?self.last_seen, "following again");
                        }
                        self.outage = false;
                        self.retry.reset();
                    }
                    Err(e) => {
                        if !self.outage {
                            tracing::warn!(stream = %self.bucket.stream, error = %e, "cannot follow the bucket; retrying");
                            self.outage = true;
                        }
                        tokio::time::sleep(self.retry.next_delay()).await;
                    }
                }
                continue;
            }
            let Some(sub) = self.sub.as_mut() else {
                continue;
            };
            let msg = match tokio::time::timeout(SILENCE, sub.next()).await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => {
                    self.lost("no heartbeat");
                    continue;
                }
            };
            if let Some(status) = msg.status {
                if status == StatusCode::IDLE_HEARTBEAT {
                    if let Some(reply) = msg.reply.clone() {
                        // Flow control: the consumer waits for this answer,
                        // so it must go out even if this call is dropped.
                        let client = self.client.clone();
                        tokio::spawn(async move {
                            let _ = client.publish(reply, Bytes::new()).await;
                        });
                    }
                    let last = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Last-Consumer"))
                        .and_then(|v| v.as_str().parse::<u64>().ok());
                    if last.is_some_and(|l| l != self.consumer_seq) {
                        self.lost("heartbeat reports deliveries not received");
                    }
                } else {
                    self.lost("status from the server");
                }
                continue;
            }
            let jsm = jetstream::Message {
                message: msg,
                context: self.js.clone(),
            };
            let (stream_seq, consumer_seq, pending) = match jsm.info() {
                Ok(i) => (i.stream_sequence, i.consumer_sequence, i.pending),
                Err(_) => {
                    self.lost("delivery without JetStream metadata");
                    continue;
                }
            };
            if consumer_seq != self.consumer_seq + 1 {
                self.lost("consumer sequence gap");
                continue;
            }
            self.consumer_seq = consumer_seq;
            let msg = jsm.message;
            if self.in_snapshot && pending == 0 {
                self.in_snapshot = false;
                self.queued.push_back(Event::SnapshotDone);
            }
            if self.last_seen.is_some_and(|s| stream_seq <= s) && !self.resnapshot {
                // Already handed out (a re-created consumer overlapping).
                continue;
            }
            self.last_seen = Some(self.last_seen.map_or(stream_seq, |s| s.max(stream_seq)));
            let Some(key) = msg.subject.as_str().strip_prefix(&self.bucket.prefix) else {
                continue;
            };
            return Event::Entry(Entry {
                key: key.to_owned(),
                revision: stream_seq,
                op: operation(msg.headers.as_ref()),
                value: msg.payload,
            });
        }
    }

    fn lost(&mut self, why: &str) {
        tracing::debug!(stream = %self.bucket.stream, why, "re-creating the consumer");
        self.sub = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_from_headers() {
        assert_eq!(operation(None), Op::Put);
        let mut h = HeaderMap::new();
        h.insert("KV-Operation", "DEL");
        assert_eq!(operation(Some(&h)), Op::Delete);
        let mut h = HeaderMap::new();
        h.insert("Nats-Marker-Reason", "MaxAge");
        assert_eq!(operation(Some(&h)), Op::Purge);
        let mut h = HeaderMap::new();
        h.insert("Nats-Marker-Reason", "Remove");
        assert_eq!(operation(Some(&h)), Op::Delete);
    }
}
