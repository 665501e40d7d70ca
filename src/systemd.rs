//! systemd `Type=notify` integration: READY, WATCHDOG, STATUS, STOPPING.
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is not set (not under
//! systemd), so the daemon behaves the same in a terminal and in tests.
//! Watchdog pings are rate-limited to a quarter of `WATCHDOG_USEC`, so
//! callers can ping from every loop iteration and every retry loop without
//! cost; a loop must call at least every [`watchdog_period`] (half of it).

use sd_notify::NotifyState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Watchdog interval requested by systemd, if any (read once).
fn watchdog_interval() -> Option<Duration> {
    static INTERVAL: OnceLock<Option<Duration>> = OnceLock::new();
    *INTERVAL.get_or_init(|| {
        watchdog_from_env(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    })
}

/// As sd_watchdog_enabled(3): `WATCHDOG_USEC` enables the watchdog, and a
/// `WATCHDOG_PID` that is set must name this process.
fn watchdog_from_env(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    match pid {
        Some(p) if p.trim().parse::<u32>().ok() != Some(me) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// READY=1: NATS connected, state rehydrated, consumer bound.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STATUS=: one line shown by `systemctl status`.
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// STOPPING=1 at the start of a graceful shutdown.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// WATCHDOG=1 if systemd asked for it and a quarter of its interval has
/// passed since the last ping.
pub fn watchdog() {
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let epoch = *EPOCH.get_or_init(Instant::now);
    let now_ms = epoch.elapsed().as_millis() as u64 + 1;
    let last = LAST_MS.load(Ordering::Relaxed);
    if last == 0 || now_ms.saturating_sub(last) >= (interval.as_millis() as u64 / 4).max(1) {
        LAST_MS.store(now_ms, Ordering::Relaxed);
        send(&[NotifyState::Watchdog]);
    }
}

/// Interval at which a loop must call [`watchdog`] at the latest.
pub fn watchdog_period() -> Option<Duration> {
    watchdog_interval().map(|d| d / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_env_follows_sd_watchdog_enabled() {
        assert_eq!(
            watchdog_from_env(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_from_env(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_from_env(Some("30000000"), Some("8"), 7),
            None,
            "another process's watchdog"
        );
        assert_eq!(watchdog_from_env(None, Some("7"), 7), None);
        assert_eq!(watchdog_from_env(Some("0"), None, 7), None);
        assert_eq!(watchdog_from_env(Some("x"), None, 7), None);
    }
}
