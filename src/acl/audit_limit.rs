//! Bounds the audit of a flood of refusals without losing their count.
//!
//! A misconfigured service can be refused a thousand times a second (a
//! client retrying a write it may not do). One `AUDIT` record and one
//! ERROR line per refusal would then flood the stream and the journal with
//! copies of the same fact. So records are rate limited per connection
//! with a token bucket: up to `burst` records at once, then `per_second`.
//! A refusal that finds no token is folded into a pending record of the
//! same operation and subject, written when a token is free again, whose
//! `count` says how many refusals it stands for. The sum of the counts of
//! the records is the number of refusals; the metric counts each one.
//!
//! Pure: the caller passes the time, so tests drive the clock.

use super::violation::{Operation, Violation};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Records written at once before the rate applies. Large enough that a
/// session of separate mistakes (the permission matrix of the tests, an
/// operator trying commands) gets one record per refusal.
pub const BURST: u32 = 500;
/// Records per second once the burst is spent.
pub const PER_SECOND: u32 = 20;
/// Distinct (operation, subject) pairs kept pending; more are folded into
/// one record with subject [`OTHER_SUBJECTS`], so a flood over ever new
/// subjects cannot grow memory.
pub const MAX_PENDING: usize = 1000;
/// The subject of a record that folds refusals of many subjects.
pub const OTHER_SUBJECTS: &str = "(other subjects)";

/// A record to write: the refusal and how many refusals it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub violation: Violation,
    pub count: u64,
}

#[derive(Debug)]
pub struct Limiter {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
    pending: BTreeMap<(Operation, String), u64>,
}

impl Limiter {
    pub fn new(burst: u32, per_second: u32, now: Instant) -> Limiter {
        Limiter {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_second.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
            pending: BTreeMap::new(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.last = now;
    }

    /// One refusal: the record to write now, or None when it was folded
    /// into a pending one (see [`Limiter::due`]).
    pub fn admit(&mut self, v: Violation, now: Instant) -> Option<Entry> {
        self.refill(now);
        // Pending records go first, so records stay in the order of the
        // refusals they start with.
        if self.pending.is_empty() && self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Some(Entry {
                violation: v,
                count: 1,
            });
        }
        let mut key = (v.operation, v.subject);
        if self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&key) {
            key.1 = OTHER_SUBJECTS.to_owned();
        }
        *self.pending.entry(key).or_default() += 1;
        None
    }

    /// Pending records that have a token now.
    pub fn due(&mut self, now: Instant) -> Vec<Entry> {
        self.refill(now);
        let mut out = Vec::new();
        while self.tokens >= 1.0 {
            let Some(((operation, subject), count)) = self.pending.pop_first() else {
                break;
            };
            self.tokens -= 1.0;
            out.push(Entry {
                violation: Violation { operation, subject },
                count,
            });
        }
        out
    }

    /// How long until the next pending record has a token (None: nothing
    /// pending).
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        if self.pending.is_empty() {
            return None;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        let missing = (1.0 - tokens).max(0.0);
        Some(Duration::from_secs_f64(missing / self.per_second))
    }

    /// Every pending record, whatever the rate (the service is stopping).
    pub fn drain(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|((operation, subject), count)| Entry {
                violation: Violation { operation, subject },
                count,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(subject: &str) -> Violation {
        Violation {
            operation: Operation::Publish,
            subject: subject.to_owned(),
        }
    }

    #[test]
    fn each_refusal_within_the_burst_is_its_own_record() {
        let t = Instant::now();
        let mut l = Limiter::new(3, 1, t);
        for s in ["a", "b", "a"] {
            assert_eq!(
                l.admit(v(s), t),
                Some(Entry {
                    violation: v(s),
                    count: 1
                })
            );
        }
        assert_eq!(l.next_due(t), None);
    }

    #[test]
    fn a_flood_is_bounded_and_keeps_its_count() {
        let t = Instant::now();
        let mut l = Limiter::new(BURST, PER_SECOND, t);
        let mut records = Vec::new();
        // 1000 refusals a second for ten seconds, on two subjects.
        for ms in 0..10_000u64 {
            let now = t + Duration::from_millis(ms);
            let s = if ms % 2 == 0 {
                "$KV.presence.a"
            } else {
                "$KV.presence.b"
            };
            records.extend(l.admit(v(s), now));
            records.extend(l.due(now));
        }
        records.extend(l.drain());
        let total: u64 = records.iter().map(|r| r.count).sum();
        assert_eq!(total, 10_000);
        // The burst, then at most PER_SECOND a second, and the drain.
        let bound = BURST as usize + 10 * PER_SECOND as usize + 2;
        assert!(records.len() <= bound, "{} records", records.len());
        assert!(records.len() >= BURST as usize);
    }

    #[test]
    fn pending_records_wait_for_a_token() {
        let t = Instant::now();
        let mut l = Limiter::new(1, 2, t);
        assert!(l.admit(v("a"), t).is_some());
        assert!(l.admit(v("a"), t).is_none());
        assert!(l.admit(v("a"), t).is_none());
        assert_eq!(l.next_due(t), Some(Duration::from_millis(500)));
        assert!(l.due(t + Duration::from_millis(100)).is_empty());
        assert_eq!(
            l.due(t + Duration::from_millis(500)),
            vec![Entry {
                violation: v("a"),
                count: 2
            }]
        );
        assert_eq!(l.next_due(t + Duration::from_millis(500)), None);
    }

    #[test]
    fn ever_new_subjects_fold_into_one_pending_record() {
        let t = Instant::now();
        let mut l = Limiter::new(1, 1, t);
        assert!(l.admit(v("first"), t).is_some());
        for i in 0..(MAX_PENDING + 50) {
            assert!(l.admit(v(&format!("s{i}")), t).is_none());
        }
        let all = l.drain();
        assert_eq!(all.len(), MAX_PENDING + 1);
        let other = all
            .iter()
            .find(|e| e.violation.subject == OTHER_SUBJECTS)
            .unwrap();
        assert_eq!(other.count, 50);
    }
}
