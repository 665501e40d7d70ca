//! The `[hub]` section (watching the site's hub mirrors) and its checks.

use crate::base::problems::Problems;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Health of the site's hub mirrors, read through the leafnode link
/// (`[hub]`): lag, last contact, stalls, and the nudge after the link
/// comes back (docs/OPERATIONS.md, "Hub mirrors").
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HubWatch {
    /// How often each mirror and its source are read.
    #[serde(default = "default_hub_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a mirror may make no progress while its source has moved on
    /// before it counts as stalled (WARN log, metric, `/healthz`).
    #[serde(default = "default_stall_after", with = "humantime_serde")]
    pub stall_after: Duration,
    /// Ask the hub to restart a mirror that is behind and has neither
    /// heard from its source nor moved for `nudge_after` (its leader steps
    /// down; the new leader resumes at once instead of on the server's retry backoff).
    #[serde(default = "yes")]
    pub nudge: bool,
    /// See `nudge`; also the least time between two nudges of a mirror.
    #[serde(default = "default_nudge_after", with = "humantime_serde")]
    pub nudge_after: Duration,
}

impl Default for HubWatch {
    fn default() -> Self {
        HubWatch {
            poll_interval: default_hub_poll(),
            stall_after: default_stall_after(),
            nudge: true,
            nudge_after: default_nudge_after(),
        }
    }
}

fn default_hub_poll() -> Duration {
    Duration::from_secs(1)
}
fn default_stall_after() -> Duration {
    Duration::from_secs(30)
}
fn default_nudge_after() -> Duration {
    Duration::from_secs(2)
}

/// Checks `[hub]`, pushing every problem found.
pub fn check(hub: &HubWatch, p: &mut Problems) {
    p.positive("hub.poll_interval", hub.poll_interval);
    if hub.stall_after < hub.poll_interval * 2 {
        p.push(
            "hub.stall_after",
            format!(
                "must be at least twice hub.poll_interval ({}): a stall is seen across polls",
                humantime::format_duration(hub.poll_interval)
            ),
        );
    }
    if hub.nudge_after < hub.poll_interval {
        p.push(
            "hub.nudge_after",
            format!(
                "must be at least hub.poll_interval ({})",
                humantime::format_duration(hub.poll_interval)
            ),
        );
    }
}

fn yes() -> bool {
    true
}
