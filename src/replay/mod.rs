//! Replay: the pure engine run over recorded readings with a (candidate)
//! config, offline.
//!
//! The daemon feeds the engine in `SENSORS` stream order, one
//! [`engine::apply`] per (reading, zone listening to its sensor), and fires
//! debounce, hold and staleness deadlines with [`engine::advance`]. Both
//! visit every deadline at its own instant whatever the wall clock says
//! (see `engine::core`), so feeding the same readings in the same order and
//! advancing every zone to the end of the range gives the transitions the
//! daemon published. Manual overrides recorded in `EVENTS` are fed back in
//! at their instants, as the daemon applied them.
//!
//! Nothing here does I/O: [`source`] reads the site's streams, [`cli`] is
//! the command-line glue, [`tune`] learns likelihoods from labelled time and
//! [`report`] draws the outcome.

pub mod cli;
pub mod labels;
pub mod report;
pub mod source;
pub mod tune;

use crate::engine::command::OverrideRequest;
use crate::engine::{self, Cause, Input, Model, Presence, Transition, ZoneModel, ZoneState};
use crate::observation::Reading;
use crate::time::Timestamp;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// One reading of `SENSORS`, as the engine's runner hands it to the core.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// `SENSORS` stream sequence.
    pub seq: u64,
    pub sensor: String,
    pub value: Reading,
    pub at: Timestamp,
}

/// A manual command recovered from `EVENTS` (the transition it caused).
#[derive(Clone, Debug, PartialEq)]
pub enum Manual {
    Override {
        zone: String,
        at: Timestamp,
        state: Presence,
        until: Timestamp,
        by: String,
        reason: Option<String>,
    },
    Clear {
        zone: String,
        at: Timestamp,
        by: String,
    },
}

impl Manual {
    pub fn at(&self) -> Timestamp {
        match self {
            Manual::Override { at, .. } | Manual::Clear { at, .. } => *at,
        }
    }

    pub fn zone(&self) -> &str {
        match self {
            Manual::Override { zone, .. } | Manual::Clear { zone, .. } => zone,
        }
    }

    /// The command behind a recorded transition, if a command caused it.
    pub fn from_transition(t: &Transition) -> Option<Manual> {
        match &t.cause {
            Some(Cause::Override { by, reason, until }) => Some(Manual::Override {
                zone: t.zone.clone(),
                at: t.at,
                state: t.to,
                until: *until,
                by: by.clone(),
                reason: reason.clone(),
            }),
            Some(Cause::OverrideCleared { by }) => Some(Manual::Clear {
                zone: t.zone.clone(),
                at: t.at,
                by: by.clone(),
            }),
            _ => None,
        }
    }
}

/// What to replay and what to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Start of the range: zones start vacant, at their prior, here.
    pub from: Timestamp,
    /// End of the range: every zone is advanced to here, firing the
    /// deadlines due by then; readings after it are not applied.
    pub to: Timestamp,
    /// An occupied period shorter than this counts as a flap.
    pub flap_below: Duration,
    /// Keep a per-zone trace of confidence and evidence (for the report).
    pub trace: bool,
}

/// The state of one zone after a step, for the report's timelines.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TracePoint {
    pub at: Timestamp,
    pub confidence: f64,
    pub state: Presence,
    /// Per evidence rule (config order), the likelihood ratio in force.
    pub lr: Vec<f64>,
}

/// Per-zone outcome of a replay.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ZoneOutcome {
    /// Readings applied to this zone.
    pub readings: u64,
    pub transitions: Vec<Transition>,
    /// Milliseconds the zone spent occupied (`occupied` or `leaving`: it
    /// reports occupied until the leave debounce ends).
    pub occupied_ms: i64,
    /// Occupied periods that ended within `flap_below` of starting.
    pub flaps: u64,
    /// Per occupancy, milliseconds from the first reading that made a
    /// rule true while the zone was vacant to the move to `occupied`.
    pub detection_ms: Vec<i64>,
    #[serde(skip)]
    pub trace: Vec<TracePoint>,
    /// Occupied intervals (start, end) within the range.
    #[serde(skip)]
    pub occupied: Vec<(Timestamp, Timestamp)>,
}

/// The outcome of a replay.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    pub from: Timestamp,
    pub to: Timestamp,
    /// Readings in the range (each counted once, whatever zones hear it).
    pub readings: u64,
    pub zones: BTreeMap<String, ZoneOutcome>,
}

impl Outcome {
    /// Every transition, ordered by (instant, zone, number): the order of
    /// `EVENTS` within one zone, and a fixed order across zones.
    pub fn transitions(&self) -> Vec<&Transition> {
        let mut all: Vec<&Transition> = self
            .zones
            .values()
            .flat_map(|z| z.transitions.iter())
            .collect();
        all.sort_by(|a, b| (a.at, &a.zone, a.number).cmp(&(b.at, &b.zone, b.number)));
        all
    }
}

fn is_occupied(p: Presence) -> bool {
    matches!(p, Presence::Occupied | Presence::Leaving)
}

/// Book-keeping of one zone beside its engine state.
struct Tracker {
    state: ZoneState,
    out: ZoneOutcome,
    occupied_since: Option<Timestamp>,
    trigger: Option<Timestamp>,
    /// The trace's current slice and where its points start.
    bucket: Option<(i64, usize)>,
}

/// Slices of the range in which the report's trace keeps at most three
/// points: about four per pixel column of the plot.
pub const TRACE_BUCKETS: i64 = 4000;

impl Tracker {
    fn record(&mut self, transitions: Vec<Transition>, opts: &Options) {
        for t in transitions {
            let (was, now) = (is_occupied(t.from), is_occupied(t.to));
            if !was && now {
                self.occupied_since = Some(t.at);
            } else if was && !now {
                if let Some(start) = self.occupied_since.take() {
                    self.close_period(start, t.at, opts, true);
                }
            }
            if t.to == Presence::Occupied {
                if let Some(first) = self.trigger.take() {
                    self.out.detection_ms.push(t.at.0 - first.0);
                }
            }
            if t.to == Presence::Vacant {
                self.trigger = None;
            }
            self.out.transitions.push(t);
        }
    }

    fn close_period(&mut self, start: Timestamp, end: Timestamp, opts: &Options, ended: bool) {
        self.out.occupied_ms += end.0 - start.0;
        self.out.occupied.push((start, end));
        if ended && end.since(start) < opts.flap_below {
            self.out.flaps += 1;
        }
    }

    /// Records the zone's state for the report, thinned: within one of
    /// [`TRACE_BUCKETS`] slices of the range only the lowest, the highest
    /// and the last point are kept (what a plot of that slice shows), so a
    /// week of readings costs a few thousand points per zone, not millions.
    fn trace(&mut self, opts: &Options) {
        if !opts.trace {
            return;
        }
        let point = TracePoint {
            at: self.state.clock,
            confidence: self.state.confidence,
            state: self.state.state,
            lr: self.state.evidence.iter().map(|e| e.lr).collect(),
        };
        let width = ((opts.to.0 - opts.from.0) / TRACE_BUCKETS).max(1);
        let bucket = (point.at.0 - opts.from.0).div_euclid(width);
        match self.bucket {
            Some((b, start)) if b == bucket && self.out.trace.len() >= start + 3 => {
                let mut kept: Vec<TracePoint> = self.out.trace.drain(start..).collect();
                kept.push(point);
                let lowest = kept
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.confidence.total_cmp(&b.1.confidence))
                    .map_or(0, |(i, _)| i);
                let highest = kept
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.confidence.total_cmp(&b.1.confidence))
                    .map_or(0, |(i, _)| i);
                let last = kept.len() - 1;
                let mut keep = vec![lowest, highest, last];
                keep.sort_unstable();
                keep.dedup();
                for i in keep {
                    self.out.trace.push(kept[i].clone());
                }
            }
            Some((b, _)) if b == bucket => self.out.trace.push(point),
            _ => {
                self.bucket = Some((bucket, self.out.trace.len()));
                self.out.trace.push(point);
            }
        }
    }
}

/// Replays `records` (in `SENSORS` sequence order) and `manual` commands
/// through the pure engine with `model`.
///
/// Deterministic: the same inputs give the same [`Outcome`], byte for byte
/// once rendered (zones in key order, no hashing, no wall clock).
pub fn run(model: &Model, records: &[Record], manual: &[Manual], opts: &Options) -> Outcome {
    // Zones by index, in key order, and each sensor's zones as indices:
    // three map lookups by name per reading were a third of the engine's
    // time here. The order of zones per sensor is `Model::zones_for`'s.
    let models: Vec<&ZoneModel> = model.zones.values().collect();
    let index: BTreeMap<&str, usize> = model
        .zones
        .keys()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();
    let by_sensor: HashMap<&str, Vec<usize>> = model
        .by_sensor
        .iter()
        .map(|(sensor, zones)| {
            let ids = zones.iter().filter_map(|z| index.get(z.as_str()).copied());
            (sensor.as_str(), ids.collect())
        })
        .collect();
    let mut zones: Vec<Tracker> = models
        .iter()
        .map(|zm| {
            let mut t = Tracker {
                state: engine::initial_state(zm, opts.from),
                out: ZoneOutcome::default(),
                occupied_since: None,
                trigger: None,
                bucket: None,
            };
            // A prior above the threshold settles at the start of the range.
            let first = engine::advance(zm, &mut t.state, opts.from);
            t.record(first, opts);
            t.trace(opts);
            t
        })
        .collect();
    let mut manual: Vec<&Manual> = manual.iter().collect();
    manual.sort_by_key(|m| m.at());
    let mut pending_manual = manual.into_iter().peekable();
    let mut readings = 0u64;
    let none: &[usize] = &[];
    for r in records {
        if r.at > opts.to {
            continue;
        }
        while let Some(m) = pending_manual.next_if(|m| m.at() <= r.at) {
            apply_manual(&models, &index, &mut zones, m, opts);
        }
        readings += 1;
        let ids = by_sensor.get(r.sensor.as_str()).map_or(none, Vec::as_slice);
        for &i in ids {
            let (zm, tr) = (models[i], &mut zones[i]);
            let was_vacant = tr.state.state == Presence::Vacant;
            let input = Input {
                seq: r.seq,
                sensor: &r.sensor,
                value: r.value,
                at: r.at,
            };
            let moved = engine::apply(zm, &mut tr.state, &input);
            tr.out.readings += 1;
            let triggered = zm
                .rules
                .iter()
                .zip(&tr.state.evidence)
                .any(|(rule, ev)| ev.active == Some(true) && rule.sensor == r.sensor);
            if was_vacant && triggered && tr.trigger.is_none() {
                tr.trigger = Some(tr.state.clock);
            }
            if !moved.is_empty() {
                tr.record(moved, opts);
            }
            if tr.state.state == Presence::Vacant
                && !tr.state.evidence.iter().any(|e| e.active == Some(true))
            {
                tr.trigger = None;
            }
            tr.trace(opts);
        }
    }
    for m in pending_manual.filter(|m| m.at() <= opts.to) {
        apply_manual(&models, &index, &mut zones, m, opts);
    }
    let mut out = BTreeMap::new();
    for ((name, zm), mut tr) in model.zones.iter().zip(zones) {
        let last = engine::advance(zm, &mut tr.state, opts.to);
        tr.record(last, opts);
        tr.trace(opts);
        if let Some(start) = tr.occupied_since.take() {
            tr.close_period(start, opts.to.max(start), opts, false);
        }
        out.insert(name.clone(), tr.out);
    }
    Outcome {
        from: opts.from,
        to: opts.to,
        readings,
        zones: out,
    }
}

fn apply_manual(
    models: &[&ZoneModel],
    index: &BTreeMap<&str, usize>,
    zones: &mut [Tracker],
    m: &Manual,
    opts: &Options,
) {
    let Some(&i) = index.get(m.zone()) else {
        return;
    };
    let (zm, tr) = (models[i], &mut zones[i]);
    let moved = match m {
        Manual::Override {
            at,
            state,
            until,
            by,
            reason,
            ..
        } => {
            let request = OverrideRequest {
                state: *state,
                duration: until.since(*at),
                by: by.clone(),
                reason: reason.clone(),
            };
            engine::set_override(zm, &mut tr.state, &request, *at)
        }
        Manual::Clear { at, by, .. } => engine::clear_override(zm, &mut tr.state, by, *at).1,
    };
    tr.record(moved, opts);
    tr.trace(opts);
}

/// One line of `--diff`: a transition only the replay or only `EVENTS` has.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiffLine {
    /// `replay` or `events`.
    pub only_in: &'static str,
    pub zone: String,
    pub at: Timestamp,
    pub from: &'static str,
    pub to: &'static str,
}

/// The transitions that differ between the replay and what `EVENTS`
/// recorded in the same range, matched on (zone, instant, from, to).
pub fn diff(replayed: &[&Transition], recorded: &[Transition]) -> Vec<DiffLine> {
    type Key<'a> = (&'a str, Timestamp, &'static str, &'static str);
    fn key(t: &Transition) -> Key<'_> {
        (t.zone.as_str(), t.at, t.from.as_str(), t.to.as_str())
    }
    let mut counts: BTreeMap<Key<'_>, i64> = BTreeMap::new();
    for t in replayed {
        *counts.entry(key(t)).or_default() += 1;
    }
    for t in recorded {
        *counts.entry(key(t)).or_default() -= 1;
    }
    let mut out = Vec::new();
    for ((zone, at, from, to), n) in counts {
        let only_in = if n > 0 { "replay" } else { "events" };
        for _ in 0..n.unsigned_abs() {
            out.push(DiffLine {
                only_in,
                zone: zone.to_owned(),
                at,
                from,
                to,
            });
        }
    }
    out.sort_by(|a, b| (a.at, &a.zone).cmp(&(b.at, &b.zone)));
    out
}

/// Median of a list of milliseconds, `None` when empty.
pub fn median_ms(values: &[i64]) -> Option<i64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

#[cfg(test)]
mod tests;
