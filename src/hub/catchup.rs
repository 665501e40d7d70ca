//! Fast catch-up after a leafnode link comes back.
//!
//! A hub mirror whose source (on the leaf, across the link) went away
//! retries on the server's own backoff: measured here (nats-server 2.15.1)
//! it resumed 10 s after a 10 s outage, 40 s after 20 s and 30 s after 30 s,
//! although the backlog then moves in a fraction of a second. A no-op
//! stream update does not shorten that (measured: no effect). A leader
//! step-down of the mirror's R3 stream does: the new leader sets the mirror
//! up at once, usually 0.2-0.3 s after the step-down. Not always: a
//! step-down right after the link's return was once followed by the
//! server's backoff anyway (11 s), so [`super::health`] repeats it every
//! `nudge_after` while the mirror stays behind without progress (contact
//! alone is not enough: a new leader can be in contact and still wait out
//! the backoff). This module asks
//! for one step-down; [`super::health`] decides when.

use super::link::HubLink;

/// Why a nudge was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum NudgeError {
    #[error("cannot ask the hub to restart mirror {stream}: {reason}")]
    Request { stream: String, reason: String },
}

#[derive(serde::Deserialize)]
struct StepDownResponse {}

/// Makes the leader of the hub stream `stream` (a mirror) step down, so a
/// new leader sets up the mirror's consumer on the leaf at once, through
/// the site's link. A single-node hub has no other leader to hand over to
/// and refuses.
pub async fn nudge(hub: &HubLink, stream: &str) -> Result<(), NudgeError> {
    hub.request::<StepDownResponse>(
        // The ACLs grant exactly this subject (with the hub's prefix,
        // `naming::js::hub_stream_leader_stepdown`).
        &format!("STREAM.LEADER.STEPDOWN.{stream}"),
        &serde_json::json!({}),
    )
    .await
    .map(|_| ())
    .map_err(|reason| NudgeError::Request {
        stream: stream.to_owned(),
        reason,
    })
}
