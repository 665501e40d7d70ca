//! The last hour of each zone: the states it was in and when, drawn as a
//! small bar on its card.
//!
//! Seeded from stream `EVENTS` when the page starts following (only in an
//! instance that runs the engine, which owns the stream and may read it:
//! a read the ACL refuses would stop the daemon), then kept from the
//! state changes the page sees in KV `presence`.

use super::render::esc;
use crate::engine::{Presence, Transition};
use crate::naming::{self, Site};
use crate::time::Timestamp;
use futures::StreamExt;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

/// How far back the bar reaches.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// Most transitions read from EVENTS at start (all zones together).
const MAX_READ: usize = 20_000;

/// States of one zone, oldest first: each holds from its instant to the
/// next one's (the last one until now).
pub type History = VecDeque<(Timestamp, Presence)>;

/// Adds `state` from `at`, unless the zone is already in it, and drops
/// what lies wholly before the window.
pub fn record(h: &mut History, at: Timestamp, state: Presence, now: Timestamp) {
    if h.back().map(|(_, s)| *s) != Some(state) {
        // Out-of-order instants (a restored zone) must not fold the bar.
        let at = h.back().map_or(at, |(t, _)| Timestamp(at.0.max(t.0)));
        h.push_back((at, state));
    }
    let start = now.millis() - WINDOW.as_millis() as i64;
    while h.len() > 1 && h[1].0.millis() <= start {
        h.pop_front();
    }
}

/// The bar: an inline SVG (no inline style, which the page's CSP
/// forbids), with the same content in words for screen readers.
pub fn svg(h: &History, now: Timestamp) -> String {
    if h.is_empty() {
        return String::new();
    }
    let start = now.millis() - WINDOW.as_millis() as i64;
    let mut rects = String::new();
    let mut words = Vec::new();
    for (i, (at, state)) in h.iter().enumerate() {
        let from = at.millis().max(start);
        let to = h
            .get(i + 1)
            .map_or(now.millis(), |(t, _)| t.millis())
            .max(from);
        if to <= start {
            continue;
        }
        let x = (from - start) / 1000;
        let w = ((to - from) / 1000).max(1);
        let _ = write!(
            rects,
            "<rect x=\"{x}\" y=\"0\" width=\"{w}\" height=\"1\" class=\"s-{}\"/>",
            state.as_str()
        );
        words.push(format!("{} from {}", state.as_str(), hhmm(Timestamp(from))));
    }
    format!(
        "<svg class=\"tl\" viewBox=\"0 0 3600 1\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"last hour: {}\">{rects}</svg>",
        esc(&words.join(", "))
    )
}

fn hhmm(t: Timestamp) -> String {
    let s = t.to_string();
    // RFC 3339 UTC: 2026-12-07T04:05:06.123Z
    s.get(11..16).unwrap_or(&s).to_owned()
}

/// The last hour of EVENTS for `site`, as histories per zone; `None`
/// when it cannot be read.
pub async fn read(
    js: &async_nats::jetstream::Context,
    site: &Site,
    now: Timestamp,
) -> Result<BTreeMap<String, History>, String> {
    use async_nats::jetstream::consumer::{self, pull};
    let stream = js
        .get_stream(naming::EVENTS_STREAM)
        .await
        .map_err(|e| format!("stream EVENTS: {e}"))?;
    let start = now.millis() - WINDOW.as_millis() as i64;
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(start as i128 * 1_000_000)
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
            ack_policy: consumer::AckPolicy::None,
            // Transitions only: a takeover record changes no zone.
            filter_subject: site.transitions_filter(),
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("consumer on EVENTS: {e}"))?;
    let mut pending = consumer.cached_info().num_pending as usize;
    pending = pending.min(MAX_READ);
    let mut out: BTreeMap<String, History> = BTreeMap::new();
    while pending > 0 {
        let mut batch = consumer
            .fetch()
            .max_messages(pending.min(500))
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| format!("EVENTS: {e}"))?;
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| format!("EVENTS: {e}"))?;
            got += 1;
            if let Ok(t) = serde_json::from_slice::<Transition>(&m.payload) {
                let h = out.entry(t.zone.clone()).or_default();
                if h.is_empty() {
                    h.push_back((Timestamp(start), t.from));
                }
                record(h, t.at, t.to, now);
            }
        }
        if got == 0 {
            break;
        }
        pending = pending.saturating_sub(got);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_one_state_before_the_window_and_skips_repeats() {
        let now = Timestamp(10_000_000);
        let hour = WINDOW.as_millis() as i64;
        let mut h = History::new();
        record(&mut h, Timestamp(now.0 - 2 * hour), Presence::Vacant, now);
        record(&mut h, Timestamp(now.0 - hour / 2), Presence::Occupied, now);
        record(&mut h, Timestamp(now.0 - hour / 4), Presence::Occupied, now);
        assert_eq!(h.len(), 2, "{h:?}");
        record(&mut h, Timestamp(now.0 - 10), Presence::Vacant, now);
        assert_eq!(h.len(), 3);
        let bar = svg(&h, now);
        assert!(bar.contains("x=\"0\""), "{bar}");
        assert!(bar.contains("x=\"1800\" y=\"0\" width=\"1799\""), "{bar}");
        assert!(bar.contains("aria-label=\"last hour: vacant from"), "{bar}");
    }
}
