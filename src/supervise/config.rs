//! The `[health]` section: when a source's outage makes the daemon
//! degraded, and how long READY waits for sources; and its checks.

use crate::base::problems::Problems;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Health thresholds (`[health]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// A source whose link (MQTT connection, serial device) has been down
    /// this long makes the daemon degraded (`/healthz` 503, `status` 1):
    /// short enough to page before a zone goes wrong, long enough that a
    /// broker restart does not.
    #[serde(default = "default_source_grace", with = "humantime_serde")]
    pub source_grace: Duration,
    /// READY waits at most this long for each source's first connection:
    /// a broker that is down at boot must not hold the unit in
    /// `activating`; the source keeps retrying and health says so.
    #[serde(default = "default_source_start_wait", with = "humantime_serde")]
    pub source_start_wait: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            source_grace: default_source_grace(),
            source_start_wait: default_source_start_wait(),
        }
    }
}

fn default_source_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_source_start_wait() -> Duration {
    Duration::from_secs(5)
}

/// Checks `[health]`, pushing every problem found.
pub fn check(h: &HealthConfig, p: &mut Problems) {
    p.positive("health.source_grace", h.source_grace);
}
