//! The engine's decisions as pure functions of (model, state, input, time).
//!
//! Time moves only forward, and only through [`advance`]: it visits, in
//! order, every instant at which the zone changes by itself (a debounce
//! deadline, a hold window closing, a sensor going stale). Between two such
//! instants nothing changes, so cutting the same span of time into more or
//! fewer calls (a crash and restart in between, an idle timer wake-up) gives
//! the same transitions at the same instants.
//!
//! A manual override ([`set_override`]) is one more such instant: its end
//! is stored in the zone value, visited by [`advance`] like a debounce
//! deadline, and from there the evidence decides again.

use super::command::OverrideRequest;
use super::model::{Rule, ZoneModel};
use super::{
    Cause, EvidenceState, Input, Override, Pending, Presence, Transition, ZoneState, STATE_SCHEMA,
};
use crate::observation::Reading;
use crate::time::Timestamp;

/// Probabilities are kept this far from 0 and 1 so every likelihood ratio
/// and the prior odds stay finite: a stored `inf` would not survive the
/// JSON round trip through the KV bucket.
const P_EPSILON: f64 = 1e-9;

/// Most transitions one evaluation may emit. With valid thresholds the FSM
/// settles after two (vacant → arriving → occupied with zero debounce); the
/// bound only stops a model with overlapping thresholds from looping.
const MAX_FSM_STEPS: usize = 4;

/// A zone's state before any evidence: vacant, at the prior.
pub fn initial_state(model: &ZoneModel, now: Timestamp) -> ZoneState {
    let mut state = ZoneState {
        v: STATE_SCHEMA,
        zone: model.zone.clone(),
        state: Presence::Vacant,
        since: now,
        confidence: 0.0,
        clock: now,
        last_seq: 0,
        transitions: 0,
        pending: None,
        manual: None,
        evidence: model.rules.iter().map(|r| neutral(&r.sensor)).collect(),
    };
    recompute(model, &mut state);
    state
}

/// Adopts a stored state to the current model (rules added, removed or
/// reordered since it was written).
///
/// Emits nothing: a restart must never flip a zone by itself. If the new
/// model disagrees with the stored FSM state, the next [`advance`] or
/// [`apply`] settles it at the zone's clock.
pub fn reconcile(model: &ZoneModel, state: &mut ZoneState) {
    let mut old: Vec<Option<EvidenceState>> = std::mem::take(&mut state.evidence)
        .into_iter()
        .map(Some)
        .collect();
    state.evidence = model
        .rules
        .iter()
        .map(|rule| {
            old.iter_mut()
                .find(|e| e.as_ref().is_some_and(|e| e.sensor == rule.sensor))
                .and_then(Option::take)
                .unwrap_or_else(|| neutral(&rule.sensor))
        })
        .collect();
    // An override holds the state it commanded; one that disagrees with
    // the stored state is a contradiction, dropped rather than carried on.
    if state
        .manual
        .as_ref()
        .is_some_and(|m| m.state != state.state)
    {
        tracing::warn!(zone = %model.zone, "stored override disagrees with the stored state; dropped");
        state.manual = None;
    }
    // A pending timer exists exactly while arriving or leaving; repair a
    // state that says otherwise rather than carry the contradiction on.
    state.pending = match state.state {
        Presence::Vacant | Presence::Occupied => None,
        Presence::Arriving => Some(Pending {
            to: Presence::Occupied,
            deadline: state
                .pending
                .map_or(state.clock.plus(model.arrive_after), |p| p.deadline),
        }),
        Presence::Leaving => Some(Pending {
            to: Presence::Vacant,
            deadline: state
                .pending
                .map_or(state.clock.plus(model.leave_after), |p| p.deadline),
        }),
    };
    recompute(model, state);
}

/// Applies one observation: first advances time to `input.at`, firing due
/// timers in deadline order, then applies the reading.
///
/// A sequence at or below the last applied one is a redelivery and changes
/// nothing. An observation older than the zone's clock is taken as of the
/// clock: time never runs backwards for a zone.
pub fn apply(model: &ZoneModel, state: &mut ZoneState, input: &Input<'_>) -> Vec<Transition> {
    if input.seq <= state.last_seq {
        tracing::debug!(
            zone = %model.zone,
            seq = input.seq,
            last_seq = state.last_seq,
            "redelivered observation ignored"
        );
        return Vec::new();
    }
    let t = input.at.max(state.clock);
    let mut out = advance(model, state, t);
    if is_usable(input.value) {
        let mut matched = false;
        for (rule, ev) in model.rules.iter().zip(state.evidence.iter_mut()) {
            if rule.sensor != input.sensor {
                continue;
            }
            matched = true;
            ev.value = Some(input.value);
            ev.observed_at = Some(t);
            if truth(rule, input.value) == Some(true) {
                ev.last_true_at = Some(t);
            }
        }
        if matched {
            recompute(model, state);
            settle(model, state, Some(input.seq), None, &mut out);
        }
    } else {
        tracing::warn!(
            zone = %model.zone,
            sensor = input.sensor,
            seq = input.seq,
            "non-finite reading ignored"
        );
    }
    state.last_seq = input.seq;
    out
}

/// Advances the zone's clock to `now`, firing every timer due by then in
/// deadline order.
pub fn advance(model: &ZoneModel, state: &mut ZoneState, now: Timestamp) -> Vec<Transition> {
    let mut out = Vec::new();
    if !matches_model(model, state) {
        reconcile(model, state);
    }
    // Settles a state that was left unsettled (a fresh state whose prior is
    // above the threshold, a reconciled one) at the instant it was left so,
    // not at whatever time this call happens to run.
    resettle(model, state, &mut out);
    while let Some(d) = next_deadline(model, state) {
        if d > now {
            break;
        }
        state.clock = d;
        resettle(model, state, &mut out);
    }
    state.clock = state.clock.max(now);
    resettle(model, state, &mut out);
    out
}

/// Ends an override that is due at the zone's clock, re-evaluates the
/// evidence and runs the FSM; moves right after an expiry carry that cause.
fn resettle(model: &ZoneModel, state: &mut ZoneState, out: &mut Vec<Transition>) {
    let expired = state
        .manual
        .as_ref()
        .is_some_and(|m| m.until <= state.clock);
    if expired {
        state.manual = None;
    }
    recompute(model, state);
    let cause = expired.then_some(Cause::OverrideExpired);
    settle(model, state, None, cause, out);
}

/// Applies a manual override at `now` (or the zone's clock, if later):
/// first advances time to then, firing due timers, then holds the zone in
/// the commanded state until `now + duration`. Replaces an override in
/// force. The move into the commanded state, if any, carries the cause.
///
/// The request is validated by [`super::command`]; a state other than
/// occupied or vacant, or a zero duration, changes nothing here either.
pub fn set_override(
    model: &ZoneModel,
    state: &mut ZoneState,
    request: &OverrideRequest,
    now: Timestamp,
) -> Vec<Transition> {
    let t = now.max(state.clock);
    let mut out = advance(model, state, t);
    let until = t.plus(request.duration);
    if !matches!(request.state, Presence::Occupied | Presence::Vacant) || until <= t {
        return out;
    }
    state.manual = Some(Override {
        state: request.state,
        since: t,
        until,
        by: request.by.clone(),
        reason: request.reason.clone(),
    });
    if state.state != request.state {
        let cause = Cause::Override {
            by: request.by.clone(),
            reason: request.reason.clone(),
            until,
        };
        out.push(transition(state, request.state, None, Some(cause)));
        state.transitions += 1;
        state.state = request.state;
        state.since = t;
    }
    state.pending = None;
    out
}

/// Ends the override in force at `now` (or the zone's clock, if later);
/// the FSM then resumes from the evidence of that instant, through the
/// normal debounce. Returns whether an override was in force, and the
/// transitions (those of timers due by then included).
pub fn clear_override(
    model: &ZoneModel,
    state: &mut ZoneState,
    by: &str,
    now: Timestamp,
) -> (bool, Vec<Transition>) {
    let t = now.max(state.clock);
    let mut out = advance(model, state, t);
    if state.manual.take().is_none() {
        return (false, out);
    }
    recompute(model, state);
    let cause = Cause::OverrideCleared { by: by.to_owned() };
    settle(model, state, None, Some(cause), &mut out);
    (true, out)
}

/// The next instant at which the zone's state changes without input.
pub fn next_deadline(model: &ZoneModel, state: &ZoneState) -> Option<Timestamp> {
    let clock = state.clock;
    let pending = state.pending.map(|p| p.deadline);
    let manual = state.manual.as_ref().map(|m| m.until);
    let evidence = model
        .rules
        .iter()
        .zip(&state.evidence)
        .flat_map(|(rule, ev)| {
            let hold_ends = rule.hold.zip(ev.last_true_at).map(|(h, t)| t.plus(h));
            let goes_stale = rule.stale_after.zip(ev.observed_at).map(|(s, t)| t.plus(s));
            [hold_ends, goes_stale]
        });
    [pending, manual]
        .into_iter()
        .chain(evidence)
        .flatten()
        .filter(|&t| t > clock)
        .min()
}

/// An entry for a rule whose sensor has not been heard from.
fn neutral(sensor: &str) -> EvidenceState {
    EvidenceState {
        sensor: sensor.to_owned(),
        value: None,
        observed_at: None,
        last_true_at: None,
        active: None,
        lr: 1.0,
    }
}

/// Whether the stored evidence lines up with the model's rules, so the two
/// can be walked side by side.
fn matches_model(model: &ZoneModel, state: &ZoneState) -> bool {
    model.rules.len() == state.evidence.len()
        && model
            .rules
            .iter()
            .zip(&state.evidence)
            .all(|(r, e)| r.sensor == e.sensor)
}

/// NaN and infinities cannot be stored (JSON has no spelling for them), so
/// such a reading is not taken at all.
fn is_usable(value: Reading) -> bool {
    match value {
        Reading::Bool(_) => true,
        Reading::Number(x) => x.is_finite(),
    }
}

/// What one reading says under a rule; `None` when it is of the wrong type.
fn truth(rule: &Rule, value: Reading) -> Option<bool> {
    match value {
        Reading::Bool(_) if rule.is_numeric() => None,
        Reading::Bool(b) => Some(b),
        Reading::Number(x) if !rule.is_numeric() => Some(x != 0.0),
        Reading::Number(x) => {
            Some(rule.above.is_none_or(|a| x > a) && rule.below.is_none_or(|b| x < b))
        }
    }
}

/// A rule's truth at `t`; `None` is neutral.
fn evaluate(rule: &Rule, ev: &EvidenceState, t: Timestamp) -> Option<bool> {
    let value = ev.value?;
    let observed_at = ev.observed_at?;
    if let Some(stale) = rule.stale_after {
        if t >= observed_at.plus(stale) {
            return None;
        }
    }
    match rule.hold {
        Some(hold) => Some(ev.last_true_at.is_some_and(|at| t < at.plus(hold))),
        None => truth(rule, value),
    }
}

/// `p` kept inside (0, 1); `None` for NaN, which says nothing.
fn probability(p: f64) -> Option<f64> {
    (!p.is_nan()).then(|| p.clamp(P_EPSILON, 1.0 - P_EPSILON))
}

/// The factor a rule multiplies into the odds.
fn likelihood_ratio(rule: &Rule, active: Option<bool>) -> f64 {
    let (Some(active), Some(pt), Some(pf)) =
        (active, probability(rule.p_true), probability(rule.p_false))
    else {
        return 1.0;
    };
    if active {
        pt / pf
    } else {
        (1.0 - pt) / (1.0 - pf)
    }
}

/// Odds back to a probability, never NaN and never outside [0, 1].
fn odds_to_probability(odds: f64) -> f64 {
    if odds.is_nan() {
        0.5
    } else if odds.is_infinite() {
        if odds > 0.0 {
            1.0
        } else {
            0.0
        }
    } else {
        (odds / (1.0 + odds)).clamp(0.0, 1.0)
    }
}

/// Re-evaluates every rule and the fused confidence at the zone's clock.
fn recompute(model: &ZoneModel, state: &mut ZoneState) {
    let t = state.clock;
    let prior = probability(model.prior).unwrap_or(0.5);
    let mut odds = prior / (1.0 - prior);
    for (rule, ev) in model.rules.iter().zip(state.evidence.iter_mut()) {
        ev.active = evaluate(rule, ev, t);
        ev.lr = likelihood_ratio(rule, ev.active);
        odds *= ev.lr;
    }
    state.confidence = odds_to_probability(odds);
}

/// The FSM's next move from the current state, confidence and clock.
fn decide(model: &ZoneModel, state: &ZoneState) -> Option<(Presence, Option<Pending>)> {
    if state.manual.is_some() {
        // Held as commanded; the evidence decides again at expiry.
        return None;
    }
    let c = state.confidence;
    let now = state.clock;
    let due = |fallback: bool| state.pending.map_or(fallback, |p| p.deadline <= now);
    match state.state {
        Presence::Vacant => (c >= model.occupied_above).then(|| {
            let pending = Pending {
                to: Presence::Occupied,
                deadline: now.plus(model.arrive_after),
            };
            (Presence::Arriving, Some(pending))
        }),
        Presence::Arriving if c < model.occupied_above => Some((Presence::Vacant, None)),
        Presence::Arriving => due(true).then_some((Presence::Occupied, None)),
        Presence::Occupied => (c <= model.vacant_below).then(|| {
            let pending = Pending {
                to: Presence::Vacant,
                deadline: now.plus(model.leave_after),
            };
            (Presence::Leaving, Some(pending))
        }),
        Presence::Leaving if c > model.vacant_below => Some((Presence::Occupied, None)),
        Presence::Leaving => due(true).then_some((Presence::Vacant, None)),
    }
}

/// The next transition of `state` to `to` at the zone's clock.
fn transition(
    state: &ZoneState,
    to: Presence,
    seq: Option<u64>,
    cause: Option<Cause>,
) -> Transition {
    Transition {
        v: STATE_SCHEMA,
        zone: state.zone.clone(),
        number: state.transitions + 1,
        from: state.state,
        to,
        at: state.clock,
        confidence: state.confidence,
        seq,
        cause,
    }
}

/// Runs the FSM until it is stable, recording each move; `cause` goes on
/// the first move only (what follows is ordinary debounce).
fn settle(
    model: &ZoneModel,
    state: &mut ZoneState,
    seq: Option<u64>,
    mut cause: Option<Cause>,
    out: &mut Vec<Transition>,
) {
    for _ in 0..MAX_FSM_STEPS {
        let Some((to, pending)) = decide(model, state) else {
            return;
        };
        let transition = transition(state, to, seq, cause.take());
        tracing::debug!(
            zone = %transition.zone,
            number = transition.number,
            from = transition.from.as_str(),
            to = transition.to.as_str(),
            at = %transition.at,
            confidence = transition.confidence,
            seq = ?transition.seq,
            "zone transition"
        );
        state.transitions += 1;
        state.state = to;
        state.since = state.clock;
        state.pending = pending;
        out.push(transition);
    }
    if decide(model, state).is_some() {
        tracing::warn!(
            zone = %model.zone,
            occupied_above = model.occupied_above,
            vacant_below = model.vacant_below,
            "state machine did not settle; thresholds overlap"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T0: i64 = 1_800_000_000_000;

    fn at(ms: i64) -> Timestamp {
        Timestamp(T0 + ms)
    }

    fn rule(sensor: &str, p_true: f64, p_false: f64) -> Rule {
        Rule {
            sensor: sensor.into(),
            p_true,
            p_false,
            hold: None,
            stale_after: None,
            above: None,
            below: None,
        }
    }

    /// Prior 0.5 and one 0.9/0.1 rule: true gives 0.9, false gives 0.1,
    /// both past the default-like thresholds.
    fn zone(rules: Vec<Rule>) -> ZoneModel {
        ZoneModel {
            zone: "kitchen".into(),
            prior: 0.5,
            occupied_above: 0.7,
            vacant_below: 0.3,
            arrive_after: Duration::ZERO,
            leave_after: Duration::ZERO,
            rules,
        }
    }

    fn input(seq: u64, sensor: &str, value: Reading, ms: i64) -> Input<'_> {
        Input {
            seq,
            sensor,
            value,
            at: at(ms),
        }
    }

    fn moves(ts: &[Transition]) -> Vec<(Presence, Presence, Timestamp, Option<u64>)> {
        ts.iter().map(|t| (t.from, t.to, t.at, t.seq)).collect()
    }

    use Presence::{Arriving, Leaving, Occupied, Vacant};

    #[test]
    fn initial_state_is_vacant_at_the_prior() {
        let mut m = zone(vec![rule("pir", 0.9, 0.1), rule("lux", 0.6, 0.3)]);
        m.prior = 0.1;
        let s = initial_state(&m, at(0));
        assert_eq!(s.state, Vacant);
        assert_eq!((s.since, s.clock), (at(0), at(0)));
        assert!((s.confidence - 0.1).abs() < 1e-12);
        assert_eq!((s.last_seq, s.transitions, s.pending), (0, 0, None));
        assert_eq!(s.evidence.len(), 2);
        assert!(s.evidence.iter().all(|e| e.lr == 1.0 && e.active.is_none()));
        assert_eq!(s.v, STATE_SCHEMA);
        assert_eq!(s.zone, "kitchen");
    }

    #[test]
    fn fusion_matches_hand_computed_odds() {
        // prior odds 0.2/0.8 = 1/4; a true: 0.8/0.1 = 8; b false:
        // 0.4/0.7 = 4/7; c unheard: 1. Odds 8/7, confidence 8/15.
        let mut m = zone(vec![
            rule("a", 0.8, 0.1),
            rule("b", 0.6, 0.3),
            rule("c", 0.9, 0.2),
        ]);
        m.prior = 0.2;
        m.occupied_above = 0.99;
        let mut s = initial_state(&m, at(0));
        apply(&m, &mut s, &input(1, "a", Reading::Bool(true), 0));
        apply(&m, &mut s, &input(2, "b", Reading::Bool(false), 0));
        assert!((s.evidence[0].lr - 8.0).abs() < 1e-12);
        assert!((s.evidence[1].lr - 4.0 / 7.0).abs() < 1e-12);
        assert_eq!(s.evidence[2].lr, 1.0);
        assert_eq!(s.evidence[2].active, None);
        assert!(
            (s.confidence - 8.0 / 15.0).abs() < 1e-12,
            "{}",
            s.confidence
        );
    }

    #[test]
    fn hold_keeps_a_true_reading_true_for_its_window_only() {
        let mut r = rule("pir", 0.9, 0.1);
        r.hold = Some(Duration::from_secs(30));
        let mut m = zone(vec![r]);
        m.occupied_above = 0.99;
        let mut s = initial_state(&m, at(0));
        apply(&m, &mut s, &input(1, "pir", Reading::Bool(true), 0));
        assert_eq!(s.evidence[0].active, Some(true));
        // A false reading inside the window changes nothing.
        apply(&m, &mut s, &input(2, "pir", Reading::Bool(false), 10_000));
        assert_eq!(s.evidence[0].active, Some(true));
        assert_eq!(next_deadline(&m, &s), Some(at(30_000)));
        advance(&m, &mut s, at(29_999));
        assert_eq!(s.evidence[0].active, Some(true));
        advance(&m, &mut s, at(30_000));
        assert_eq!(s.evidence[0].active, Some(false));
        assert!((s.evidence[0].lr - 1.0 / 9.0).abs() < 1e-12);
        assert_eq!(next_deadline(&m, &s), None);
        // A new true reading opens a new window from its own time.
        apply(&m, &mut s, &input(3, "pir", Reading::Bool(true), 40_000));
        assert_eq!(next_deadline(&m, &s), Some(at(70_000)));
    }

    #[test]
    fn hold_rule_never_true_reads_false() {
        let mut r = rule("pir", 0.9, 0.1);
        r.hold = Some(Duration::from_secs(30));
        let m = zone(vec![r]);
        let mut s = initial_state(&m, at(0));
        apply(&m, &mut s, &input(1, "pir", Reading::Bool(false), 0));
        assert_eq!(s.evidence[0].active, Some(false));
    }

    #[test]
    fn silent_sensor_goes_neutral_when_stale() {
        let mut r = rule("door", 0.8, 0.4);
        r.stale_after = Some(Duration::from_secs(60));
        let mut m = zone(vec![r]);
        m.occupied_above = 0.99;
        let mut s = initial_state(&m, at(0));
        let prior_confidence = s.confidence;
        apply(&m, &mut s, &input(1, "door", Reading::Bool(true), 0));
        assert_eq!(s.evidence[0].active, Some(true));
        assert!(s.confidence > prior_confidence);
        assert_eq!(next_deadline(&m, &s), Some(at(60_000)));
        advance(&m, &mut s, at(59_999));
        assert_eq!(s.evidence[0].active, Some(true));
        advance(&m, &mut s, at(60_000));
        assert_eq!(s.evidence[0].active, None);
        assert_eq!(s.evidence[0].lr, 1.0);
        assert_eq!(s.confidence, prior_confidence);
        assert_eq!(next_deadline(&m, &s), None);
    }

    #[test]
    fn numeric_thresholds() {
        let mut above = rule("above", 0.9, 0.1);
        above.above = Some(50.0);
        let mut below = rule("below", 0.9, 0.1);
        below.below = Some(5.0);
        let mut band = rule("band", 0.9, 0.1);
        band.above = Some(10.0);
        band.below = Some(20.0);
        let plain = rule("plain", 0.9, 0.1);
        let mut m = zone(vec![above, below, band, plain]);
        m.occupied_above = 1.0;
        m.vacant_below = 0.0;
        let cases: &[(&str, usize, Reading, Option<bool>)] = &[
            ("above", 0, Reading::Number(50.5), Some(true)),
            ("above", 0, Reading::Number(50.0), Some(false)),
            ("above", 0, Reading::Bool(true), None),
            ("below", 1, Reading::Number(4.9), Some(true)),
            ("below", 1, Reading::Number(5.0), Some(false)),
            ("band", 2, Reading::Number(15.0), Some(true)),
            ("band", 2, Reading::Number(25.0), Some(false)),
            ("band", 2, Reading::Number(5.0), Some(false)),
            ("plain", 3, Reading::Number(0.0), Some(false)),
            ("plain", 3, Reading::Number(-3.0), Some(true)),
            ("plain", 3, Reading::Bool(true), Some(true)),
            ("plain", 3, Reading::Bool(false), Some(false)),
        ];
        let mut s = initial_state(&m, at(0));
        for (i, (sensor, idx, value, want)) in cases.iter().enumerate() {
            let seq = i as u64 + 1;
            apply(&m, &mut s, &input(seq, sensor, *value, seq as i64));
            assert_eq!(s.evidence[*idx].active, *want, "{sensor} {value:?}");
            let lr = s.evidence[*idx].lr;
            match want {
                None => assert_eq!(lr, 1.0),
                Some(true) => assert!((lr - 9.0).abs() < 1e-12),
                Some(false) => assert!((lr - 1.0 / 9.0).abs() < 1e-12),
            }
        }
    }

    #[test]
    fn fsm_edges_with_debounce_and_cancellation() {
        let mut m = zone(vec![rule("pir", 0.9, 0.1)]);
        m.arrive_after = Duration::from_secs(5);
        m.leave_after = Duration::from_secs(10);
        let mut s = initial_state(&m, at(0));
        let t = Reading::Bool(true);
        let f = Reading::Bool(false);

        let out = apply(&m, &mut s, &input(1, "pir", t, 0));
        assert_eq!(moves(&out), [(Vacant, Arriving, at(0), Some(1))]);
        assert_eq!(
            s.pending,
            Some(Pending {
                to: Occupied,
                deadline: at(5_000)
            })
        );
        let out = apply(&m, &mut s, &input(2, "pir", f, 2_000));
        assert_eq!(moves(&out), [(Arriving, Vacant, at(2_000), Some(2))]);
        assert_eq!(s.pending, None);

        apply(&m, &mut s, &input(3, "pir", t, 3_000));
        assert_eq!(s.state, Arriving);
        assert!(advance(&m, &mut s, at(7_999)).is_empty());
        let out = advance(&m, &mut s, at(9_000));
        assert_eq!(moves(&out), [(Arriving, Occupied, at(8_000), None)]);
        assert_eq!((s.since, s.clock, s.pending), (at(8_000), at(9_000), None));

        let out = apply(&m, &mut s, &input(4, "pir", f, 9_000));
        assert_eq!(moves(&out), [(Occupied, Leaving, at(9_000), Some(4))]);
        assert_eq!(
            s.pending,
            Some(Pending {
                to: Vacant,
                deadline: at(19_000)
            })
        );
        let out = apply(&m, &mut s, &input(5, "pir", t, 10_000));
        assert_eq!(moves(&out), [(Leaving, Occupied, at(10_000), Some(5))]);
        assert_eq!(s.pending, None);

        apply(&m, &mut s, &input(6, "pir", f, 11_000));
        let out = advance(&m, &mut s, at(30_000));
        assert_eq!(moves(&out), [(Leaving, Vacant, at(21_000), None)]);
        assert_eq!(s.state, Vacant);
        assert_eq!(s.transitions, 8);
        assert_eq!(out[0].number, 8);
        assert_eq!(out[0].zone, "kitchen");
        assert!((out[0].confidence - 0.1).abs() < 1e-12);
    }

    #[test]
    fn zero_debounce_fires_both_moves_in_one_step() {
        let m = zone(vec![rule("pir", 0.9, 0.1)]);
        let mut s = initial_state(&m, at(0));
        let out = apply(&m, &mut s, &input(7, "pir", Reading::Bool(true), 100));
        assert_eq!(
            moves(&out),
            [
                (Vacant, Arriving, at(100), Some(7)),
                (Arriving, Occupied, at(100), Some(7))
            ]
        );
        assert_eq!(out.iter().map(|t| t.number).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((s.state, s.pending), (Occupied, None));
        let out = apply(&m, &mut s, &input(8, "pir", Reading::Bool(false), 200));
        assert_eq!(
            moves(&out),
            [
                (Occupied, Leaving, at(200), Some(8)),
                (Leaving, Vacant, at(200), Some(8))
            ]
        );
        assert_eq!((s.state, s.pending, s.since), (Vacant, None, at(200)));
    }

    #[test]
    fn redelivery_changes_nothing() {
        let m = zone(vec![rule("pir", 0.9, 0.1)]);
        let mut s = initial_state(&m, at(0));
        assert_eq!(
            apply(&m, &mut s, &input(5, "pir", Reading::Bool(true), 0)).len(),
            2
        );
        let before = s.clone();
        let again = apply(&m, &mut s, &input(5, "pir", Reading::Bool(true), 50_000));
        assert!(again.is_empty());
        let older = apply(&m, &mut s, &input(4, "pir", Reading::Bool(false), 60_000));
        assert!(older.is_empty());
        assert_eq!(s, before);
    }

    #[test]
    fn long_outage_fires_each_timer_once_at_its_instant() {
        let mut r = rule("pir", 0.9, 0.1);
        r.hold = Some(Duration::from_secs(30));
        let mut m = zone(vec![r]);
        m.leave_after = Duration::from_secs(60);
        let mut s = initial_state(&m, at(0));
        apply(&m, &mut s, &input(1, "pir", Reading::Bool(true), 0));
        assert_eq!(s.state, Occupied);
        // The daemon dies here; the state survives in the KV bucket.
        let json = serde_json::to_string(&s).unwrap();
        let mut s: ZoneState = serde_json::from_str(&json).unwrap();
        let out = advance(&m, &mut s, at(3_600_000));
        assert_eq!(
            moves(&out),
            [
                (Occupied, Leaving, at(30_000), None),
                (Leaving, Vacant, at(90_000), None)
            ]
        );
        assert_eq!(s.clock, at(3_600_000));
        assert_eq!(s.since, at(90_000));
        assert!(advance(&m, &mut s, at(7_200_000)).is_empty());
    }

    #[test]
    fn timers_of_several_rules_fire_in_deadline_order() {
        // Two held sensors expire at different instants; only the second
        // expiry drops confidence low enough to leave.
        let mut a = rule("a", 0.9, 0.1);
        a.hold = Some(Duration::from_secs(10));
        let mut b = rule("b", 0.9, 0.1);
        b.hold = Some(Duration::from_secs(20));
        let mut m = zone(vec![a, b]);
        m.prior = 0.1;
        m.leave_after = Duration::from_secs(5);
        let mut s = initial_state(&m, at(0));
        apply(&m, &mut s, &input(1, "b", Reading::Bool(true), 0));
        apply(&m, &mut s, &input(2, "a", Reading::Bool(true), 1_000));
        assert_eq!(s.state, Occupied);
        assert_eq!(next_deadline(&m, &s), Some(at(11_000)));
        let out = advance(&m, &mut s, at(100_000));
        assert_eq!(
            moves(&out),
            [
                (Occupied, Leaving, at(11_000), None),
                (Leaving, Vacant, at(16_000), None)
            ]
        );
    }

    #[test]
    fn late_observation_is_taken_at_the_zone_clock() {
        let m = zone(vec![rule("pir", 0.9, 0.1)]);
        let mut s = initial_state(&m, at(0));
        advance(&m, &mut s, at(10_000));
        let out = apply(&m, &mut s, &input(1, "pir", Reading::Bool(true), 5_000));
        assert_eq!(out[0].at, at(10_000));
        assert_eq!(s.clock, at(10_000));
        assert_eq!(s.evidence[0].observed_at, Some(at(10_000)));
        assert_eq!(s.last_seq, 1);
    }

    #[test]
    fn reconcile_keeps_evidence_by_sensor_and_emits_nothing() {
        let old = zone(vec![rule("a", 0.9, 0.1), rule("b", 0.8, 0.2)]);
        let mut s = initial_state(&old, at(0));
        apply(&old, &mut s, &input(1, "a", Reading::Bool(true), 0));
        apply(&old, &mut s, &input(2, "b", Reading::Bool(true), 0));
        assert_eq!(s.state, Occupied);
        let mut new = zone(vec![rule("b", 0.8, 0.2), rule("c", 0.7, 0.3)]);
        new.occupied_above = 0.99;
        new.vacant_below = 0.85;
        new.leave_after = Duration::from_secs(10);
        let before = s.clone();
        reconcile(&new, &mut s);
        let sensors: Vec<_> = s.evidence.iter().map(|e| e.sensor.as_str()).collect();
        assert_eq!(sensors, ["b", "c"]);
        assert_eq!(s.evidence[0].value, Some(Reading::Bool(true)));
        assert_eq!(s.evidence[1].value, None);
        // 0.5 prior, b true: 4 → 0.8, now below the new vacant threshold.
        assert!((s.confidence - 0.8).abs() < 1e-12);
        assert_eq!(
            (s.state, s.transitions, s.since),
            (Occupied, before.transitions, before.since)
        );
        // The next step settles it at the zone's clock.
        let out = advance(&new, &mut s, at(5_000));
        assert_eq!(moves(&out), [(Occupied, Leaving, at(0), None)]);
        assert_eq!(s.pending.map(|p| p.deadline), Some(at(10_000)));
    }

    #[test]
    fn reconcile_repairs_a_contradictory_pending() {
        let m = zone(vec![rule("a", 0.9, 0.1)]);
        let mut s = initial_state(&m, at(0));
        s.pending = Some(Pending {
            to: Occupied,
            deadline: at(5),
        });
        reconcile(&m, &mut s);
        assert_eq!(s.pending, None);
        s.state = Leaving;
        reconcile(&m, &mut s);
        assert_eq!(
            s.pending,
            Some(Pending {
                to: Vacant,
                deadline: at(0)
            })
        );
    }

    #[test]
    fn prior_above_threshold_settles_at_creation_instant() {
        let mut m = zone(vec![rule("a", 0.9, 0.1)]);
        m.prior = 0.8;
        m.arrive_after = Duration::from_secs(1);
        let mut s = initial_state(&m, at(0));
        let out = advance(&m, &mut s, at(60_000));
        assert_eq!(
            moves(&out),
            [
                (Vacant, Arriving, at(0), None),
                (Arriving, Occupied, at(1_000), None)
            ]
        );
    }

    #[test]
    fn degenerate_numbers_never_give_nan() {
        let mut m = zone(vec![
            rule("a", 1.0, 0.0),
            rule("b", 0.0, 1.0),
            rule("c", f64::NAN, 0.5),
        ]);
        m.prior = 1.0;
        let mut s = initial_state(&m, at(0));
        for (i, sensor) in ["a", "b", "c"].into_iter().enumerate() {
            let seq = i as u64 + 1;
            apply(&m, &mut s, &input(seq, sensor, Reading::Bool(true), 0));
            assert!(s.confidence.is_finite() && (0.0..=1.0).contains(&s.confidence));
            assert!(s.evidence.iter().all(|e| e.lr.is_finite()));
        }
        assert_eq!(s.evidence[2].lr, 1.0);
        let before = s.evidence.clone();
        apply(&m, &mut s, &input(9, "a", Reading::Number(f64::NAN), 10));
        apply(
            &m,
            &mut s,
            &input(10, "a", Reading::Number(f64::INFINITY), 10),
        );
        assert_eq!(s.evidence, before);
        assert_eq!(s.last_seq, 10);
        let json = serde_json::to_string(&s).unwrap();
        let back: ZoneState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.evidence.len(), 3);
    }

    #[test]
    fn reading_at_threshold_survives_the_json_round_trip() {
        // This value comes back one ulp higher from a parser without
        // exact float round trips, which would flip `x > above`.
        let x = 985.6906946328695;
        let mut r = rule("lux", 0.9, 0.1);
        r.above = Some(x);
        let m = zone(vec![r]);
        let mut s = initial_state(&m, at(0));
        apply(&m, &mut s, &input(1, "lux", Reading::Number(x), 0));
        assert_eq!(s.evidence[0].active, Some(false));
        let json = serde_json::to_string(&s).unwrap();
        let mut back: ZoneState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.evidence[0].value, Some(Reading::Number(x)));
        advance(&m, &mut back, at(1));
        assert_eq!(back.evidence[0].active, Some(false));
    }

    fn hold(state: Presence, secs: u64) -> OverrideRequest {
        OverrideRequest {
            state,
            duration: Duration::from_secs(secs),
            by: "ann".into(),
            reason: Some("cleaning".into()),
        }
    }

    #[test]
    fn override_holds_against_evidence_then_resumes_through_debounce() {
        let mut m = zone(vec![rule("pir", 0.9, 0.1)]);
        m.leave_after = Duration::from_secs(10);
        let mut s = initial_state(&m, at(0));
        apply(&m, &mut s, &input(1, "pir", Reading::Bool(false), 0));
        let out = set_override(&m, &mut s, &hold(Occupied, 30), at(1_000));
        assert_eq!(moves(&out), [(Vacant, Occupied, at(1_000), None)]);
        assert_eq!(
            out[0].cause,
            Some(Cause::Override {
                by: "ann".into(),
                reason: Some("cleaning".into()),
                until: at(31_000)
            })
        );
        let manual = s.manual.clone().unwrap();
        assert_eq!(
            (manual.state, manual.since, manual.until),
            (Occupied, at(1_000), at(31_000))
        );
        assert_eq!((s.state, s.since, s.pending), (Occupied, at(1_000), None));
        // Evidence is still taken in, but moves nothing.
        let out = apply(&m, &mut s, &input(2, "pir", Reading::Bool(false), 5_000));
        assert!(out.is_empty());
        assert!((s.confidence - 0.1).abs() < 1e-12);
        assert_eq!(s.last_seq, 2);
        assert_eq!(next_deadline(&m, &s), Some(at(31_000)));
        assert!(advance(&m, &mut s, at(30_999)).is_empty());
        let out = advance(&m, &mut s, at(31_000));
        assert_eq!(moves(&out), [(Occupied, Leaving, at(31_000), None)]);
        assert_eq!(out[0].cause, Some(Cause::OverrideExpired));
        assert_eq!(s.manual, None);
        assert_eq!(s.pending.map(|p| p.deadline), Some(at(41_000)));
        let out = advance(&m, &mut s, at(50_000));
        assert_eq!(moves(&out), [(Leaving, Vacant, at(41_000), None)]);
        assert_eq!(out[0].cause, None);
    }

    #[test]
    fn vacant_override_ends_in_arriving_when_evidence_says_occupied() {
        let mut m = zone(vec![rule("pir", 0.9, 0.1)]);
        m.arrive_after = Duration::from_secs(2);
        let mut s = initial_state(&m, at(0));
        let out = set_override(&m, &mut s, &hold(Vacant, 10), at(0));
        assert!(out.is_empty(), "already vacant: nothing to move");
        assert!(s.manual.is_some());
        assert!(apply(&m, &mut s, &input(1, "pir", Reading::Bool(true), 1_000)).is_empty());
        assert_eq!(s.state, Vacant);
        let out = advance(&m, &mut s, at(60_000));
        assert_eq!(
            moves(&out),
            [
                (Vacant, Arriving, at(10_000), None),
                (Arriving, Occupied, at(12_000), None)
            ]
        );
        assert_eq!(out[0].cause, Some(Cause::OverrideExpired));
        assert_eq!(out[1].cause, None);
    }

    #[test]
    fn override_cancels_a_pending_debounce_and_replaces_an_older_override() {
        let mut m = zone(vec![rule("pir", 0.9, 0.1)]);
        m.arrive_after = Duration::from_secs(5);
        let mut s = initial_state(&m, at(0));
        apply(&m, &mut s, &input(1, "pir", Reading::Bool(true), 0));
        assert_eq!(s.state, Arriving);
        let out = set_override(&m, &mut s, &hold(Vacant, 60), at(1_000));
        assert_eq!(moves(&out), [(Arriving, Vacant, at(1_000), None)]);
        assert_eq!(s.pending, None);
        let out = set_override(&m, &mut s, &hold(Occupied, 5), at(2_000));
        assert_eq!(moves(&out), [(Vacant, Occupied, at(2_000), None)]);
        assert_eq!(s.manual.as_ref().map(|m| m.until), Some(at(7_000)));
        // Evidence still says occupied: the end of the override moves nothing.
        assert!(advance(&m, &mut s, at(10_000)).is_empty());
        assert_eq!((s.state, s.manual.is_none()), (Occupied, true));
    }

    #[test]
    fn clear_ends_an_override_and_the_evidence_decides_at_once() {
        let m = zone(vec![rule("pir", 0.9, 0.1)]);
        let mut s = initial_state(&m, at(0));
        assert_eq!(clear_override(&m, &mut s, "bob", at(500)), (false, vec![]));
        set_override(&m, &mut s, &hold(Occupied, 600), at(1_000));
        apply(&m, &mut s, &input(1, "pir", Reading::Bool(false), 2_000));
        let (was, out) = clear_override(&m, &mut s, "bob", at(3_000));
        assert!(was);
        assert_eq!(
            moves(&out),
            [
                (Occupied, Leaving, at(3_000), None),
                (Leaving, Vacant, at(3_000), None)
            ]
        );
        assert_eq!(
            out[0].cause,
            Some(Cause::OverrideCleared { by: "bob".into() })
        );
        assert_eq!(s.manual, None);
        assert_eq!(next_deadline(&m, &s), None);
    }

    #[test]
    fn override_end_survives_a_reload_and_fires_at_its_instant() {
        let mut m = zone(vec![rule("pir", 0.9, 0.1)]);
        m.leave_after = Duration::from_secs(1);
        let mut s = initial_state(&m, at(0));
        set_override(&m, &mut s, &hold(Occupied, 1_800), at(0));
        apply(&m, &mut s, &input(1, "pir", Reading::Bool(false), 1));
        // Written before overrides existed: no "override" key at all.
        let mut old = initial_state(&m, at(0));
        old.manual = None;
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("override"), "{json}");
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""override":{"state":"occupied""#), "{json}");
        let mut back: ZoneState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let out = advance(&m, &mut back, at(7_200_000));
        assert_eq!(
            moves(&out),
            [
                (Occupied, Leaving, at(1_800_000), None),
                (Leaving, Vacant, at(1_801_000), None)
            ]
        );
    }

    #[test]
    fn an_unusable_override_changes_nothing() {
        let m = zone(vec![rule("pir", 0.9, 0.1)]);
        let mut s = initial_state(&m, at(0));
        let before = s.clone();
        assert!(set_override(&m, &mut s, &hold(Arriving, 10), at(0)).is_empty());
        assert!(set_override(&m, &mut s, &hold(Occupied, 0), at(0)).is_empty());
        assert_eq!(s, before);
    }

    #[test]
    fn reconcile_keeps_an_override_and_drops_a_contradictory_one() {
        let m = zone(vec![rule("pir", 0.9, 0.1)]);
        let mut s = initial_state(&m, at(0));
        set_override(&m, &mut s, &hold(Occupied, 10), at(0));
        reconcile(&m, &mut s);
        assert!(s.manual.is_some());
        s.state = Vacant;
        reconcile(&m, &mut s);
        assert_eq!(s.manual, None);
    }

    #[test]
    fn overlapping_thresholds_do_not_loop() {
        let mut m = zone(vec![rule("a", 0.9, 0.1)]);
        m.occupied_above = 0.4;
        m.vacant_below = 0.6;
        let mut s = initial_state(&m, at(0));
        let out = advance(&m, &mut s, at(1));
        assert!(!out.is_empty() && out.len() <= 3 * MAX_FSM_STEPS);
    }
}
