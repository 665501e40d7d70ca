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

/// Most states kept per zone: a zone that flaps many times a second
/// would otherwise hold every change of the hour (a flapping sensor made
/// one card hundreds of KB). The oldest go first.
const MAX_STATES: usize = 2048;

/// Width of one slot of the bar: the bar shows, per slot, the most
/// present state the zone was in during it ([`PRESENT_FIRST`]), so a card
/// stays the same size however often the zone changed (240 slots an
/// hour), and a short visit still shows.
const SLOT_SECS: i64 = 15;

/// Adds `state` from `at`, unless the zone is already in it, and drops
/// what lies wholly before the window.
pub fn record(h: &mut History, at: Timestamp, state: Presence, now: Timestamp) {
    if h.back().map(|(_, s)| *s) != Some(state) {
        // Out-of-order instants (a restored zone) must not fold the bar.
        let at = h.back().map_or(at, |(t, _)| Timestamp(at.0.max(t.0)));
        h.push_back((at, state));
    }
    let start = now.millis() - WINDOW.as_millis() as i64;
    while h.len() > 1 && (h[1].0.millis() <= start || h.len() > MAX_STATES) {
        h.pop_front();
    }
}

/// Which state a slot shows when the zone was in several during it:
/// someone there at all matters more than for how long.
const PRESENT_FIRST: [Presence; 4] = [
    Presence::Occupied,
    Presence::Leaving,
    Presence::Arriving,
    Presence::Vacant,
];

fn index(p: Presence) -> usize {
    match p {
        Presence::Vacant => 0,
        Presence::Arriving => 1,
        Presence::Occupied => 2,
        Presence::Leaving => 3,
    }
}

/// The bar: an inline SVG (no inline style, which the page's CSP
/// forbids), with the same content in words for screen readers.
pub fn svg(h: &History, now: Timestamp) -> String {
    if h.is_empty() {
        return String::new();
    }
    let window = WINDOW.as_millis() as i64;
    let start = now.millis() - window;
    let slot_ms = SLOT_SECS * 1000;
    let slots = (window / slot_ms) as usize;
    // Milliseconds spent in each state, per slot (a state counts in a
    // slot if any time was spent in it).
    let mut spent = vec![[0i64; 4]; slots];
    for (i, (at, state)) in h.iter().enumerate() {
        let from = at.millis().max(start);
        // Instants ahead of the clock (a device clock ahead, allowed by
        // `ingest.max_clock_skew`) are drawn up to now, not beyond.
        let to = h
            .get(i + 1)
            .map_or(now.millis(), |(t, _)| t.millis())
            .min(now.millis())
            .max(from);
        let mut t = from;
        while t < to {
            let slot = ((t - start) / slot_ms) as usize;
            let Some(cell) = spent.get_mut(slot) else {
                break;
            };
            let end = (start + (slot as i64 + 1) * slot_ms).min(to);
            cell[index(*state)] += end - t;
            t = end;
        }
    }
    // Adjacent slots with the same state make one rect.
    let mut runs: Vec<(usize, usize, Presence)> = Vec::new();
    for (slot, cell) in spent.iter().enumerate() {
        let Some(state) = PRESENT_FIRST.into_iter().find(|p| cell[index(*p)] > 0) else {
            continue;
        };
        match runs.last_mut() {
            Some((_, end, s)) if *end == slot && *s == state => *end = slot + 1,
            _ => runs.push((slot, slot + 1, state)),
        }
    }
    let mut rects = String::new();
    let mut words = Vec::new();
    for (first, end, state) in runs {
        let x = first as i64 * SLOT_SECS;
        let w = (end - first) as i64 * SLOT_SECS;
        let _ = write!(
            rects,
            "<rect x=\"{x}\" y=\"0\" width=\"{w}\" height=\"1\" class=\"s-{}\"/>",
            state.as_str()
        );
        words.push(format!(
            "{} from {}",
            state.as_str(),
            hhmm(Timestamp(start + x * 1000))
        ));
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
        assert!(bar.contains("x=\"0\" y=\"0\" width=\"1800\""), "{bar}");
        // The last 10 ms of vacancy share a slot with occupancy, which
        // the slot shows.
        assert!(bar.contains("x=\"1800\" y=\"0\" width=\"1800\""), "{bar}");
        assert_eq!(bar.matches("<rect").count(), 2, "{bar}");
        assert!(bar.contains("aria-label=\"last hour: vacant from"), "{bar}");
    }

    /// A zone whose changes carry instants ahead of the page's clock (a
    /// device clock ahead, within `ingest.max_clock_skew`) draws up to
    /// now and does not panic.
    #[test]
    fn instants_ahead_of_the_clock_draw_up_to_now() {
        let now = Timestamp(10_000_000);
        let mut h = History::new();
        record(&mut h, Timestamp(now.0 - 60_000), Presence::Vacant, now);
        record(&mut h, Timestamp(now.0 + 600_000), Presence::Occupied, now);
        record(&mut h, Timestamp(now.0 + 900_000), Presence::Vacant, now);
        let bar = svg(&h, now);
        assert_eq!(bar.matches("<rect").count(), 1, "{bar}");
        assert!(bar.contains("s-vacant"), "{bar}");
    }

    /// A visit of a second between two vacant spells shows in its slot.
    #[test]
    fn a_short_visit_shows() {
        let now = Timestamp(10_000_000);
        let mut h = History::new();
        record(&mut h, Timestamp(now.0 - 600_000), Presence::Vacant, now);
        record(&mut h, Timestamp(now.0 - 300_000), Presence::Occupied, now);
        record(&mut h, Timestamp(now.0 - 299_000), Presence::Vacant, now);
        let bar = svg(&h, now);
        assert_eq!(bar.matches("s-occupied").count(), 1, "{bar}");
        assert_eq!(bar.matches("s-vacant").count(), 2, "{bar}");
    }

    /// A zone flapping every 100 ms for an hour keeps a bounded history
    /// and a bar of at most one rect per slot.
    #[test]
    fn a_flapping_zone_keeps_a_small_bar() {
        let hour = WINDOW.as_millis() as i64;
        let now = Timestamp(10 * hour);
        let mut h = History::new();
        let mut t = now.0 - hour;
        let mut state = Presence::Vacant;
        while t < now.0 {
            record(&mut h, Timestamp(t), state, Timestamp(t));
            state = if state == Presence::Vacant {
                Presence::Occupied
            } else {
                Presence::Vacant
            };
            t += 100;
        }
        assert_eq!(h.len(), MAX_STATES);
        let bar = svg(&h, now);
        assert!(bar.matches("<rect").count() <= 240, "{}", bar.len());
        assert!(bar.len() < 24 * 1024, "{} bytes", bar.len());
    }
}
