//! Waiting on a condition with a deadline: tests poll what they expect
//! instead of sleeping a guessed amount of time.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often conditions are re-checked: short enough not to slow tests,
/// long enough not to steal the two cores from the servers under test.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `f` until it returns true; panics naming `what` after `deadline`.
pub fn wait_until<F: FnMut() -> bool>(what: &str, deadline: Duration, mut f: F) {
    let start = Instant::now();
    loop {
        if f() {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// Async form of [`wait_until`], for conditions that need the async client.
pub async fn wait_until_async<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}
