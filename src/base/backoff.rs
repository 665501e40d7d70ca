//! The one retry policy of the crate: capped exponential backoff with
//! "equal jitter". Every loop that retries (NATS connect and reconnect,
//! MQTT and serial reconnects, ingest and engine writes, bucket followers,
//! Home Assistant, S3 uploads) takes its delays from here, so none retries
//! in lockstep with its peers after a shared outage and none hammers a
//! server that is down.
//!
//! Equal jitter: half of each delay is fixed and half random, so no delay
//! is shorter than half its step, and many daemons restarted together
//! spread out.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// A retry loop's state: the next delay doubles from `initial` up to
/// `max`; [`reset`](Backoff::reset) after a success starts over.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Failed attempts since the last reset.
    attempts: u32,
    /// xorshift64 state: good enough for jitter, no extra dependency.
    rng: u64,
}

impl Backoff {
    /// A policy whose first delay is at most `initial` and whose delays
    /// never exceed `max` (an `initial` above `max` is lowered to it).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial: initial.min(max),
            max,
            attempts: 0,
            rng: seed() | 1,
        }
    }

    /// Starts over from `initial` (after a success).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// Failed attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The delay before the next attempt, and one more attempt counted.
    pub fn next_delay(&mut self) -> Duration {
        self.attempts = self.attempts.saturating_add(1);
        let nominal = self.nominal(self.attempts);
        let fraction = self.fraction();
        jittered(nominal, fraction)
    }

    /// The delay before attempt `attempts + 1` when the count of failed
    /// attempts is kept elsewhere (the archive outbox keeps it in KV, the
    /// NATS client passes it to its reconnect callback).
    pub fn delay_after(&mut self, attempts: u32) -> Duration {
        let nominal = self.nominal(attempts.max(1));
        let fraction = self.fraction();
        jittered(nominal, fraction)
    }

    /// `initial · 2^(attempt-1)`, capped at `max` (attempt counts from 1).
    pub fn nominal(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        self.initial.saturating_mul(1u32 << exp).min(self.max)
    }

    /// A number in `[0, 1)`.
    fn fraction(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `nominal` scaled into `[nominal/2, nominal]` by `fraction` in `[0, 1)`.
pub fn jittered(nominal: Duration, fraction: f64) -> Duration {
    nominal.mul_f64(0.5 + 0.5 * fraction.clamp(0.0, 1.0))
}

/// A seed that differs between instances and processes (std's hasher keys
/// are random per process and advance per instance).
fn seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_and_restarts_after_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let nominal = [100u64, 200, 400, 800, 1000, 1000];
        for n in nominal {
            let n = Duration::from_millis(n);
            let d = b.next_delay();
            assert!(
                d >= n / 2 && d <= n,
                "{d:?} not within [{:?}, {n:?}]",
                n / 2
            );
        }
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        assert_eq!(b.attempts(), 1);
    }

    #[test]
    fn delays_are_not_all_equal() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let delays: std::collections::BTreeSet<Duration> =
            (0..16).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 1, "no jitter: {delays:?}");
    }

    #[test]
    fn delay_after_counts_from_the_given_attempts() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(b.nominal(1), Duration::from_secs(1));
        assert_eq!(b.nominal(3), Duration::from_secs(4));
        assert_eq!(b.nominal(40), Duration::from_secs(60));
        let d = b.delay_after(3);
        assert!(
            d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
            "{d:?}"
        );
        assert!(b.delay_after(0) <= Duration::from_secs(1));
    }

    #[test]
    fn initial_above_max_is_lowered() {
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(1));
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn jittered_stays_within_half_and_whole() {
        let n = Duration::from_secs(8);
        assert_eq!(jittered(n, 0.0), Duration::from_secs(4));
        assert_eq!(jittered(n, 1.0), n);
        assert_eq!(jittered(n, 7.0), n);
    }
}
