//! The leader lease of the engine and of ingest: several daemons may run
//! one service (the engine of a site, or its ingest); the one holding
//! `owners.<service>` is active, the others stand by. Ingest is led too so
//! that two instances of one service never read one broker session or
//! device at once (see `ingest::start`).
//!
//! The key is the service's liveness lease ([`super::lease`]), written
//! with compare-and-set on its revision (`Nats-Expected-Last-Subject-
//! Sequence`) instead of a blind put: taking it expects the revision seen
//! (the delete marker the server wrote when the last holder's TTL ran
//! out, or 0 for no key), renewing it expects the revision of the holder's
//! own last write. Two standbys racing for a lapsed lease: one put lands,
//! the other gets "wrong last sequence". A holder whose renewal is refused
//! that way has lost the lease (someone took it, or a person deleted it)
//! and steps down at once.
//!
//! Fencing: the engine asks [`Fence::valid`] before every write. It is
//! valid while the holder's last acknowledged renewal is younger than the
//! TTL less a margin, by the monotonic clock: a process frozen (SIGSTOP)
//! past its lease wakes up with a fence that is already invalid, before
//! any of its tasks runs a renewal. A new holder also rewrites every
//! zone's presence key at takeover (see the engine runner), so a former
//! holder's compare-and-set writes expect revisions that no longer exist.
//!
//! Decisions are the pure [`decide`]; [`keep`] is the I/O shell.

use super::lease::{Holder, Lease, CLOCK_SKEW};
use crate::naming;
use crate::time::Timestamp;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often a standby looks at the lease.
pub const POLL: Duration = Duration::from_millis(100);

/// The fence closes this long before the holder's own view of its lease
/// runs out: a write checked just before the limit still lands before
/// the server could have dropped the lease.
pub const FENCE_MARGIN: Duration = Duration::from_millis(500);

/// What a standby saw under `owners.<service>`.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// No message under the key (never written, or its marker aged out).
    Absent,
    /// A delete marker (a lapsed TTL, a graceful release, or a person's
    /// `kv del`) at this revision.
    Deleted { revision: u64 },
    /// A lease this version can read.
    Held { revision: u64, lease: Box<Lease> },
    /// A value that is no lease (hand-written, or a newer schema).
    Unreadable { revision: u64, reason: String },
}

impl Seen {
    pub fn revision(&self) -> u64 {
        match self {
            Seen::Absent => 0,
            Seen::Deleted { revision }
            | Seen::Held { revision, .. }
            | Seen::Unreadable { revision, .. } => *revision,
        }
    }
}

/// What a standby does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Compare-and-set a fresh lease expecting this revision.
    Take { expected: u64, why: &'static str },
    /// Someone holds it: look again after [`POLL`].
    Wait,
}

/// Whether a standby takes the lease. `unchanged_for` is how long (by the
/// standby's monotonic clock) the key has kept its current revision:
/// a holder renews every third of the TTL, so a revision unchanged for a
/// TTL plus [`CLOCK_SKEW`] has no live holder, whatever its value says
/// (a value without a TTL, an unreadable value, a holder's clock that
/// says it is not expired). No wall-clock reading is trusted here.
///
/// `holder_gone` is the one shortcut: the lease names a process in this
/// host's own PID namespace that no longer exists (a restart after a
/// SIGKILL or a crash), so nobody else can hold it.
pub fn decide(seen: &Seen, unchanged_for: Duration, ttl: Duration, holder_gone: bool) -> Decision {
    let stuck = unchanged_for > ttl + CLOCK_SKEW;
    match seen {
        Seen::Held { revision, .. } if holder_gone => Decision::Take {
            expected: *revision,
            why: "the holder was a process of this host that no longer exists",
        },
        Seen::Absent => Decision::Take {
            expected: 0,
            why: "no lease",
        },
        Seen::Deleted { revision } => Decision::Take {
            expected: *revision,
            why: "the lease was released or ran out",
        },
        Seen::Held { revision, .. } if stuck => Decision::Take {
            expected: *revision,
            why: "the lease was not renewed for longer than its TTL",
        },
        Seen::Unreadable { revision, .. } if stuck => Decision::Take {
            expected: *revision,
            why: "an unreadable lease value unchanged for longer than the TTL",
        },
        Seen::Held { .. } | Seen::Unreadable { .. } => Decision::Wait,
    }
}

/// Whether `lease` names a process of this host, in this PID namespace,
/// that no longer exists. Any doubt (another host, another namespace, no
/// namespace recorded, the process exists) is `false`.
pub fn holder_gone(lease: &Lease, me: &Lease) -> bool {
    if lease.host != me.host || lease.pid_ns.is_none() || lease.pid_ns != me.pid_ns {
        return false;
    }
    if lease.pid == me.pid {
        // Our own PID: this very process (taking back its own lease is
        // no second writer), or one before a restart in a PID namespace
        // where PIDs repeat (a container's PID 1), which is gone.
        return true;
    }
    let Ok(pid) = libc::pid_t::try_from(lease.pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// The holder's permission to write, shared between the lease keeper and
/// the engine.
#[derive(Debug, Clone)]
pub struct Fence {
    inner: Arc<Mutex<Holder>>,
    ttl: Duration,
    /// The record of the current tenure's take, set before the role says
    /// active: the engine writes it to `EVENTS` before it reads any state,
    /// and fences its own `EVENTS` publishes on it (`engine::fencing`).
    tenure: Arc<Mutex<Option<TakeoverRecord>>>,
}

impl Fence {
    pub fn new(ttl: Duration) -> Fence {
        Fence {
            inner: Arc::new(Mutex::new(Holder::new(ttl))),
            ttl,
            tenure: Arc::new(Mutex::new(None)),
        }
    }

    /// The take that began this instance's current tenure, if it holds
    /// the lease (or held it last).
    pub fn tenure(&self) -> Option<TakeoverRecord> {
        self.tenure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn begin(&self, record: TakeoverRecord) {
        *self.tenure.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
    }

    fn with<T>(&self, f: impl FnOnce(&mut Holder) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether a write may be sent now: the last acknowledged renewal (or
    /// take) is younger than the TTL less [`FENCE_MARGIN`].
    pub fn valid(&self) -> bool {
        let margin = FENCE_MARGIN.min(self.ttl / 4);
        self.with(|h| h.held(Instant::now() + margin))
    }

    fn acked(&self, at: Instant) {
        self.with(|h| h.acked(at));
    }

    /// Closes the fence from the writer's side (a compare-and-set showed
    /// another writer); the keeper steps down on its next round.
    pub fn revoke(&self) {
        self.lost();
    }

    fn lost(&self) {
        self.with(|h| h.released());
    }
}

/// Who is active, for status and metrics (declared in the leaf layer so
/// metrics can hold it without knowing the store).
pub use crate::base::ownership::Role;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("KV owners: cannot read lease {key}: {reason}")]
    Read { key: String, reason: String },
}

/// Reads the last message under `owners.<service>` (a direct get, which
/// the ACL grants for the service's own key).
async fn look(stream: &jetstream::stream::Stream, service: &str) -> Result<Seen, LeaderError> {
    let subject = naming::kv_subject(naming::OWNERS_BUCKET, service);
    match stream.direct_get_last_for_subject(subject.clone()).await {
        Ok(msg) => {
            let revision = msg.sequence;
            let op = msg
                .headers
                .get("KV-Operation")
                .map(|v| v.as_str().to_owned());
            let marker = msg.headers.get("Nats-Marker-Reason").is_some();
            if marker || matches!(op.as_deref(), Some("DEL") | Some("PURGE")) {
                return Ok(Seen::Deleted { revision });
            }
            Ok(match super::lease::parse(&msg.payload) {
                Ok(lease) => Seen::Held {
                    revision,
                    lease: Box::new(lease),
                },
                Err(reason) => Seen::Unreadable { revision, reason },
            })
        }
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(Seen::Absent),
        Err(e) => Err(LeaderError::Read {
            key: subject,
            reason: e.to_string(),
        }),
    }
}

/// Outcome of one compare-and-set write of the lease.
enum Cas {
    Ok(u64),
    Conflict(String),
    Failed(String),
}

async fn cas(
    js: &jetstream::Context,
    service: &str,
    lease: Option<&Lease>,
    ttl: Duration,
    expected: u64,
) -> Cas {
    let subject = naming::kv_subject(naming::OWNERS_BUCKET, service);
    let msg = match lease {
        Some(l) => match serde_json::to_vec(l) {
            Ok(body) => PublishMessage::build()
                .header("Nats-TTL", format!("{}s", ttl.as_secs()).as_str())
                .payload(body.into()),
            Err(e) => return Cas::Failed(e.to_string()),
        },
        None => PublishMessage::build().header("KV-Operation", "DEL"),
    }
    .expected_last_subject_sequence(expected);
    let ack = match js.send_publish(subject, msg).await {
        Ok(ack) => ack.await,
        Err(e) => return Cas::Failed(e.to_string()),
    };
    match ack {
        Ok(a) => Cas::Ok(a.sequence),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Cas::Conflict(e.to_string()),
        Err(e) => Cas::Failed(e.to_string()),
    }
}

/// The record of one takeover (every acquisition of the lease), on the
/// service's own `AUDIT` subject and, written by the engine as its first
/// write, on `events.<site>.takeover.<service>` in `EVENTS`:
/// who held the lease before (when known), who holds it now, and why it
/// was taken. Not a transition: readers of transitions read only the
/// zones' subjects.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TakeoverRecord {
    pub v: u32,
    /// `engine_takeover`, or `ingest_takeover` for a service that runs
    /// ingest without the engine.
    pub kind: String,
    pub service: String,
    /// The previous holder as `host/pid`, when this instance saw one.
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    /// The lease's revision after the take.
    pub revision: u64,
    pub time: Timestamp,
}

/// Publishes `record` to the service's `AUDIT` subject and waits for the
/// ack (at most 2 s) only to log a failure: it runs beside the takeover,
/// which does not wait for it.
async fn record_takeover(js: jetstream::Context, subject: String, record: TakeoverRecord) {
    let subject = subject.as_str();
    let body = match serde_json::to_vec(&record) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode the takeover record");
            return;
        }
    };
    let sent = async {
        js.publish(subject.to_owned(), body.into())
            .await?
            .await
            .map_err(async_nats::Error::from)
    };
    match tokio::time::timeout(Duration::from_secs(2), sent).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(subject, revision = record.revision, error = %e, "cannot record the takeover in AUDIT (the log line \"leader lease taken\" says it)")
        }
        Err(_) => tracing::warn!(subject, revision = record.revision, "recording the takeover in AUDIT timed out (the log line \"leader lease taken\" says it)"),
    }
}

fn holder_name(lease: &Lease) -> String {
    format!("{}/{}", lease.host, lease.pid)
}

/// What [`keep`] reports as it goes.
pub struct Reports {
    /// Active or standby, since when, who holds the lease.
    pub role: watch::Sender<Role>,
    /// The holder's view of the lease, as [`super::lease::keep`] reports
    /// it: sent every round while active.
    pub held: watch::Sender<bool>,
    /// Counts each time this instance takes the lease (with its log line,
    /// [`super::metrics::ENGINE_TAKEOVER`]).
    pub takeovers: crate::metrics::Count,
}

/// Runs the leader election for `lease.service` until `stop`: stands by,
/// takes the lease when it is free, renews it every third of the TTL by
/// compare-and-set, and steps down when a renewal is refused or has not
/// been acknowledged within the TTL. `role` follows what this instance
/// is; `fence` is valid exactly while it may write. A graceful stop
/// deletes the lease only if this instance still holds it.
pub async fn keep(
    js: jetstream::Context,
    lease: Lease,
    ttl: Duration,
    fence: Fence,
    audit_subject: String,
    mut stop: watch::Receiver<bool>,
    out: Reports,
) {
    let Reports {
        role,
        held,
        takeovers,
    } = out;
    let service = lease.service.clone();
    // What the lease elects, for the log and the takeover record: the
    // engine, or (an ingest-only service) its sources.
    let (what, kind) = if lease.runs(crate::base::ownership::Component::Engine) {
        ("the engine", "engine_takeover")
    } else {
        ("ingest", "ingest_takeover")
    };
    let stream_name = naming::kv_stream(naming::OWNERS_BUCKET);
    let mut stream = None;
    // (revision, since when) of the key as the standby last saw it.
    let mut seen_rev: Option<(u64, Instant)> = None;
    let mut last_holder: Option<String> = None;
    let mut logged_error = false;
    let mut logged_unreadable: Option<u64> = None;
    // Some(revision of our last write) while active.
    let mut mine: Option<u64> = None;
    let mut first = true;
    loop {
        if *stop.borrow() {
            break;
        }
        let wait = match mine {
            None => {
                if stream.is_none() {
                    match js.get_stream(&stream_name).await {
                        Ok(s) => stream = Some(s),
                        Err(e) => {
                            if !logged_error {
                                tracing::warn!(error = %e, "leader lease: cannot bind KV owners; retrying");
                                logged_error = true;
                            }
                        }
                    }
                }
                let seen = match &stream {
                    // The first try assumes no key: a compare-and-set
                    // expecting none is refused if there is one, so it is
                    // as safe as reading first, and a fresh site's engine
                    // starts in one round trip.
                    Some(_) if first => {
                        first = false;
                        Ok(Seen::Absent)
                    }
                    Some(s) => look(s, &service).await,
                    None => Err(LeaderError::Read {
                        key: service.clone(),
                        reason: "KV owners not bound".into(),
                    }),
                };
                match seen {
                    Ok(seen) => {
                        logged_error = false;
                        let now = Instant::now();
                        let rev = seen.revision();
                        let since = match seen_rev {
                            Some((r, t)) if r == rev => t,
                            _ => {
                                seen_rev = Some((rev, now));
                                now
                            }
                        };
                        if let Seen::Unreadable { revision, reason } = &seen {
                            if logged_unreadable != Some(*revision) {
                                tracing::error!(service = %service, revision, reason = %reason, "leader lease: the value under owners.<service> is not a lease; standing by, and taking it by compare-and-set once it stays unchanged for longer than the TTL");
                                logged_unreadable = Some(*revision);
                            }
                        }
                        if let Seen::Held { lease: l, .. } = &seen {
                            let name = holder_name(l);
                            if last_holder.as_ref() != Some(&name) {
                                tracing::info!(service = %service, holder = %name, since = %l.started, runs = what, "standby: another instance runs {what}; this one shares the work as its standby and takes over when its lease lapses");
                                let ingest = crate::base::ownership::Component::Ingest;
                                if lease.runs(ingest) && !l.runs(ingest) {
                                    tracing::warn!(service = %service, holder = %name, holder_runs = ?l.components, "the lease holder does not run ingest, which this instance runs: this instance's sources run while it holds the lease (a holder running ingest would have them stand by); give every instance of a service the same components");
                                }
                                role.send_replace(Role {
                                    active: false,
                                    since: Some(Timestamp::now()),
                                    holder: Some(name.clone()),
                                    holder_ingests: l.runs(ingest),
                                });
                                last_holder = Some(name);
                            }
                        }
                        let gone = match &seen {
                            Seen::Held { lease: l, .. } => holder_gone(l, &lease),
                            _ => false,
                        };
                        match decide(&seen, now.duration_since(since), ttl, gone) {
                            Decision::Wait => POLL,
                            Decision::Take { expected, why } => {
                                let started = Timestamp::now();
                                let mut fresh = lease.clone();
                                fresh.started = started;
                                let fresh = fresh.renewed_at(started, ttl);
                                let sent = Instant::now();
                                match cas(&js, &service, Some(&fresh), ttl, expected).await {
                                    Cas::Ok(revision) => {
                                        fence.acked(sent);
                                        mine = Some(revision);
                                        let me = holder_name(&fresh);
                                        crate::emit!(super::metrics::ENGINE_TAKEOVER, &takeovers; service = %service, revision, expected, reason = why, previous = ?last_holder, runs = %what);
                                        let record = TakeoverRecord {
                                            v: 1,
                                            kind: kind.into(),
                                            service: service.clone(),
                                            from: last_holder.clone().filter(|h| *h != me),
                                            to: me.clone(),
                                            reason: why.into(),
                                            revision,
                                            time: started,
                                        };
                                        fence.begin(record.clone());
                                        // In the background: a stalled
                                        // AUDIT must not hold the role
                                        // back (a failure is still logged).
                                        tokio::spawn(record_takeover(
                                            js.clone(),
                                            audit_subject.clone(),
                                            record,
                                        ));
                                        last_holder = Some(me.clone());
                                        role.send_replace(Role {
                                            active: true,
                                            since: Some(started),
                                            holder: Some(me),
                                            holder_ingests: lease
                                                .runs(crate::base::ownership::Component::Ingest),
                                        });
                                        super::lease::renew_every(ttl)
                                    }
                                    Cas::Conflict(e) => {
                                        tracing::info!(service = %service, expected, error = %e, "leader lease: held by another instance (compare-and-set refused); standing by");
                                        POLL
                                    }
                                    Cas::Failed(e) => {
                                        tracing::warn!(service = %service, error = %e, "leader lease: cannot take it; retrying");
                                        POLL
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        if !logged_error {
                            tracing::warn!(error = %e, "leader lease: cannot read it; retrying");
                            logged_error = true;
                        }
                        Duration::from_secs(1)
                    }
                }
            }
            Some(revision) => {
                // Frozen past the lease: the fence is already closed;
                // say so before anything else happens.
                if !fence.valid() {
                    tracing::warn!(service = %service, revision, "leader lease: no renewal acknowledged within the TTL (frozen, or cut from the leaf); stepped down, writes are fenced; standing by");
                    step_down(&fence, &role, &mut mine, &mut seen_rev);
                    continue;
                }
                let now_ts = Timestamp::now();
                let current = lease.renewed_at(now_ts, ttl);
                let sent = Instant::now();
                match cas(&js, &service, Some(&current), ttl, revision).await {
                    Cas::Ok(rev) => {
                        fence.acked(sent);
                        mine = Some(rev);
                        tracing::debug!(service = %service, revision = rev, "leader lease renewed");
                        super::lease::renew_every(ttl)
                    }
                    Cas::Conflict(e) => {
                        tracing::warn!(service = %service, expected = revision, error = %e, "leader lease: renewal refused, the lease changed behind this instance (taken by another, or deleted by hand); stepped down, writes are fenced; standing by");
                        step_down(&fence, &role, &mut mine, &mut seen_rev);
                        continue;
                    }
                    Cas::Failed(e) => {
                        tracing::warn!(service = %service, error = %e, "leader lease: cannot renew the lease; retrying within the TTL (writes stop when it runs out)");
                        Duration::from_secs(1).min(super::lease::renew_every(ttl))
                    }
                }
            }
        };
        // Every round while active (Home Assistant availability and
        // `presenced_lease_held` follow it, as for any lease); only
        // changes while standing by.
        if mine.is_some() || *held.borrow() {
            held.send_replace(mine.is_some() && fence.valid());
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    held.send_replace(false);
    if let Some(revision) = mine {
        fence.lost();
        role.send_replace(Role::default());
        match tokio::time::timeout(ttl, cas(&js, &service, None, ttl, revision)).await {
            Ok(Cas::Ok(rev)) => {
                tracing::info!(service = %service, revision = rev, "leader lease released")
            }
            Ok(Cas::Conflict(_)) => {
                tracing::info!(service = %service, "leader lease already held by another; left alone")
            }
            Ok(Cas::Failed(e)) => {
                tracing::warn!(service = %service, error = %e, "cannot release the leader lease; it runs out on its own within its TTL")
            }
            Err(_) => {
                tracing::warn!(service = %service, "releasing the leader lease timed out; it runs out on its own within its TTL")
            }
        }
    }
}

fn step_down(
    fence: &Fence,
    role: &watch::Sender<Role>,
    mine: &mut Option<u64>,
    seen_rev: &mut Option<(u64, Instant)>,
) {
    fence.lost();
    *mine = None;
    *seen_rev = None;
    role.send_replace(Role {
        active: false,
        since: Some(Timestamp::now()),
        holder: None,
        holder_ingests: false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::ownership::Component;

    const TTL: Duration = Duration::from_secs(3);

    fn held(revision: u64) -> Seen {
        Seen::Held {
            revision,
            lease: Box::new(Lease::new("p", &[Component::Engine], Timestamp(0))),
        }
    }

    #[test]
    fn a_free_lease_is_taken_expecting_the_revision_seen() {
        assert_eq!(
            decide(&Seen::Absent, Duration::ZERO, TTL, false),
            Decision::Take {
                expected: 0,
                why: "no lease"
            }
        );
        assert!(matches!(
            decide(&Seen::Deleted { revision: 9 }, Duration::ZERO, TTL, false),
            Decision::Take { expected: 9, .. }
        ));
    }

    #[test]
    fn a_held_lease_is_left_alone_until_it_stops_changing_for_a_ttl_and_skew() {
        assert_eq!(decide(&held(4), TTL, TTL, false), Decision::Wait);
        assert_eq!(
            decide(&held(4), TTL + CLOCK_SKEW, TTL, false),
            Decision::Wait
        );
        assert!(matches!(
            decide(
                &held(4),
                TTL + CLOCK_SKEW + Duration::from_millis(1),
                TTL,
                false
            ),
            Decision::Take { expected: 4, .. }
        ));
    }

    #[test]
    fn an_unreadable_value_is_never_taken_while_it_may_be_someones() {
        let junk = Seen::Unreadable {
            revision: 7,
            reason: "expected value".into(),
        };
        assert_eq!(
            decide(&junk, Duration::from_secs(1), TTL, false),
            Decision::Wait
        );
        assert!(matches!(
            decide(&junk, Duration::from_secs(6), TTL, false),
            Decision::Take { expected: 7, .. }
        ));
    }

    #[test]
    fn only_a_process_of_this_host_and_namespace_that_is_gone_counts_as_gone() {
        let me = Lease::new("p", &[Component::Engine], Timestamp(0));
        assert!(me.pid_ns.is_some(), "the PID namespace is readable");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let other = |pid: u32| Lease { pid, ..me.clone() };
        assert!(holder_gone(&other(dead), &me));
        let live = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(!holder_gone(&other(live.id()), &me), "a live process");
        let elsewhere = Lease {
            host: format!("{}-not", me.host),
            ..other(dead)
        };
        assert!(!holder_gone(&elsewhere, &me), "another host");
        let no_ns = Lease {
            pid_ns: None,
            ..other(dead)
        };
        assert!(!holder_gone(&no_ns, &me), "no namespace recorded");
        let mut live = live;
        let _ = live.kill();
        let _ = live.wait();
    }

    #[test]
    fn the_fence_closes_before_the_holders_view_of_the_lease_runs_out() {
        let f = Fence::new(TTL);
        assert!(!f.valid(), "never taken");
        f.acked(Instant::now());
        assert!(f.valid());
        f.acked(Instant::now() - (TTL - FENCE_MARGIN / 2));
        assert!(!f.valid(), "within the margin of the TTL");
        f.acked(Instant::now());
        f.lost();
        assert!(!f.valid(), "stepped down");
    }
}
