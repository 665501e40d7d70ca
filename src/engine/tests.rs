//! Crash equivalence of the core, as a property: a run that is killed,
//! reloaded from JSON, fed redeliveries and woken at odd times produces the
//! same transitions and the same final state as a run that never stopped.
//! Manual overrides and their early ends are part of the input: their
//! expiry is a deadline like any other.

use super::command::OverrideRequest;
use super::model::{Rule, ZoneModel};
use super::{
    advance, apply, clear_override, initial_state, set_override, Input, Presence, Transition,
    ZoneState,
};
use crate::observation::Reading;
use crate::time::Timestamp;
use proptest::prelude::*;
use std::time::Duration;

const SENSORS: [&str; 3] = ["s0", "s1", "s2"];
const T0: i64 = 1_800_000_000_000;

#[derive(Clone, Debug)]
struct Obs {
    sensor: usize,
    value: Reading,
    /// Milliseconds after the previous observation; negative ones arrive
    /// out of order.
    gap: i64,
    /// Idle wake-ups of the reference run before this observation, as
    /// fractions (per mille) of the gap.
    idle: Vec<u16>,
    crash: Option<Crash>,
    /// A command handled just before the observation, at its time.
    cmd: Option<Cmd>,
}

#[derive(Clone, Debug)]
enum Cmd {
    Override { occupied: bool, millis: u64 },
    Clear,
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        3 => (any::<bool>(), 1..8_000u64).prop_map(|(occupied, millis)| Cmd::Override { occupied, millis }),
        1 => Just(Cmd::Clear),
    ]
}

/// Applies a command at `t` (both runs do this the same way).
fn command(model: &ZoneModel, state: &mut ZoneState, cmd: &Cmd, t: Timestamp) -> Vec<Transition> {
    match cmd {
        Cmd::Override { occupied, millis } => {
            let request = OverrideRequest {
                state: if *occupied {
                    Presence::Occupied
                } else {
                    Presence::Vacant
                },
                duration: Duration::from_millis(*millis),
                by: "test".into(),
                reason: None,
            };
            set_override(model, state, &request, t)
        }
        Cmd::Clear => clear_override(model, state, "test", t).1,
    }
}

/// A kill just before an observation is applied.
#[derive(Clone, Debug)]
struct Crash {
    /// Picks among the observations already applied, to deliver again.
    redeliver: Vec<prop::sample::Index>,
    /// When the daemon comes back, per mille of the gap to the next
    /// observation.
    restart: u16,
}

fn millis(max: u64) -> impl Strategy<Value = Duration> {
    prop_oneof![Just(0), 1..=max].prop_map(Duration::from_millis)
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        0..SENSORS.len(),
        0.5..0.99f64,
        0.01..0.5f64,
        any::<bool>(),
        prop::option::of(millis(5_000)),
        prop::option::of(millis(10_000)),
        0..5u8,
        -2..10i32,
        1..6i32,
    )
        .prop_map(
            |(sensor, hi, lo, negative, hold, stale_after, kind, a, width)| {
                let (p_true, p_false) = if negative { (lo, hi) } else { (hi, lo) };
                let a = f64::from(a);
                let (above, below) = match kind {
                    0 | 1 => (None, None),
                    2 => (Some(a), None),
                    3 => (None, Some(a)),
                    _ => (Some(a), Some(a + f64::from(width))),
                };
                Rule {
                    sensor: SENSORS[sensor].to_owned(),
                    p_true,
                    p_false,
                    hold,
                    stale_after,
                    above,
                    below,
                }
            },
        )
}

fn zone(name: &'static str) -> impl Strategy<Value = ZoneModel> {
    (
        0.02..0.9f64,
        0.05..0.45f64,
        0.05..0.5f64,
        millis(3_000),
        millis(5_000),
        prop::collection::vec(rule(), 1..4),
    )
        .prop_map(
            move |(prior, vacant_below, gap, arrive_after, leave_after, rules)| ZoneModel {
                zone: name.to_owned(),
                prior,
                occupied_above: vacant_below + gap,
                vacant_below,
                arrive_after,
                leave_after,
                rules,
            },
        )
}

fn reading() -> impl Strategy<Value = Reading> {
    // Halves land exactly on the (integer) thresholds; arbitrary floats
    // check that the JSON reload gives back the very same bits.
    prop_oneof![
        any::<bool>().prop_map(Reading::Bool),
        (-4..24i32).prop_map(|k| Reading::Number(f64::from(k) * 0.5)),
        (-2.0..12.0f64).prop_map(Reading::Number),
    ]
}

fn obs() -> impl Strategy<Value = Obs> {
    let crash = (
        prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        0..=1000u16,
    )
        .prop_map(|(redeliver, restart)| Crash { redeliver, restart });
    (
        0..SENSORS.len(),
        reading(),
        prop_oneof![4 => 0..4_000i64, 2 => Just(0i64), 1 => -1_500..0i64],
        prop::collection::vec(0..=1000u16, 0..3),
        prop::option::weighted(0.3, crash),
        prop::option::weighted(0.15, cmd()),
    )
        .prop_map(|(sensor, value, gap, idle, crash, cmd)| Obs {
            sensor,
            value,
            gap,
            idle,
            crash,
            cmd,
        })
}

/// Observation times from the gaps.
fn times(obs: &[Obs]) -> Vec<Timestamp> {
    obs.iter()
        .scan(T0, |t, o| {
            *t += o.gap;
            Some(Timestamp(*t))
        })
        .collect()
}

/// An instant `per_mille` of the way from `lo` to `hi`, never after `hi`.
fn between(lo: Timestamp, hi: Timestamp, per_mille: u16) -> Timestamp {
    if hi <= lo {
        return hi;
    }
    Timestamp(lo.0 + (hi.0 - lo.0) * i64::from(per_mille) / 1000)
}

fn listens(model: &ZoneModel, sensor: &str) -> bool {
    model.rules.iter().any(|r| r.sensor == sensor)
}

fn input(obs: &[Obs], at: &[Timestamp], i: usize) -> Input<'static> {
    Input {
        seq: i as u64 + 1,
        sensor: SENSORS[obs[i].sensor],
        value: obs[i].value,
        at: at[i],
    }
}

fn check(state: &ZoneState) -> Result<(), TestCaseError> {
    prop_assert!(state.confidence.is_finite());
    prop_assert!((0.0..=1.0).contains(&state.confidence));
    prop_assert!(state
        .evidence
        .iter()
        .all(|e| e.lr.is_finite() && e.lr > 0.0));
    if let Some(m) = &state.manual {
        prop_assert!(m.until > state.clock, "{:?} at {:?}", m, state.clock);
        prop_assert_eq!(m.state, state.state);
    }
    let in_debounce = matches!(state.state, Presence::Arriving | Presence::Leaving);
    prop_assert_eq!(state.pending.is_some(), in_debounce);
    if let Some(p) = state.pending {
        prop_assert!(p.deadline > state.clock, "{:?} at {:?}", p, state.clock);
        let to = match state.state {
            Presence::Arriving => Presence::Occupied,
            _ => Presence::Vacant,
        };
        prop_assert_eq!(p.to, to);
    }
    Ok(())
}

/// Transitions chain up: consecutive numbers, each starting where the last
/// ended, in time order, ending in the final state.
fn check_chain(ts: &[Transition], last: &ZoneState) -> Result<(), TestCaseError> {
    let mut state = Presence::Vacant;
    let mut at = Timestamp(i64::MIN);
    for (i, t) in ts.iter().enumerate() {
        prop_assert_eq!(t.number, i as u64 + 1);
        prop_assert_eq!(t.from, state);
        prop_assert!(t.at >= at);
        state = t.to;
        at = t.at;
    }
    prop_assert_eq!(state, last.state);
    prop_assert_eq!(ts.len() as u64, last.transitions);
    Ok(())
}

fn reference(
    model: &ZoneModel,
    obs: &[Obs],
    at: &[Timestamp],
    end: Timestamp,
) -> Result<(Vec<Transition>, ZoneState), TestCaseError> {
    let mut state = initial_state(model, Timestamp(T0));
    let mut out = Vec::new();
    let mut prev = Timestamp(T0);
    for (i, o) in obs.iter().enumerate() {
        for &f in &o.idle {
            out.extend(advance(model, &mut state, between(prev, at[i], f)));
            check(&state)?;
        }
        out.extend(advance(model, &mut state, at[i]));
        if let Some(c) = &o.cmd {
            out.extend(command(model, &mut state, c, at[i]));
            check(&state)?;
        }
        let sensor = SENSORS[o.sensor];
        if listens(model, sensor) {
            out.extend(apply(model, &mut state, &input(obs, at, i)));
        }
        check(&state)?;
        prev = at[i];
    }
    out.extend(advance(model, &mut state, end));
    check(&state)?;
    Ok((out, state))
}

fn reload(state: &ZoneState) -> Result<ZoneState, TestCaseError> {
    let json = serde_json::to_vec(state).map_err(|e| TestCaseError::fail(e.to_string()))?;
    serde_json::from_slice(&json).map_err(|e| TestCaseError::fail(e.to_string()))
}

/// What one kill does: the state is reloaded from its JSON, some applied
/// observations are delivered again, and the daemon wakes at a time between
/// `from` and `until`.
#[allow(clippy::too_many_arguments)]
fn restart(
    model: &ZoneModel,
    obs: &[Obs],
    at: &[Timestamp],
    state: &mut ZoneState,
    out: &mut Vec<Transition>,
    crash: &Crash,
    applied: usize,
    (from, until): (Timestamp, Timestamp),
) -> Result<(), TestCaseError> {
    *state = reload(state)?;
    if applied > 0 {
        for pick in &crash.redeliver {
            let j = pick.index(applied);
            if listens(model, SENSORS[obs[j].sensor]) {
                let before = state.clone();
                let again = apply(model, state, &input(obs, at, j));
                prop_assert!(again.is_empty(), "redelivery of {} emitted {:?}", j, again);
                prop_assert_eq!(&*state, &before);
            }
        }
    }
    out.extend(advance(model, state, between(from, until, crash.restart)));
    check(state)
}

fn crashing(
    model: &ZoneModel,
    obs: &[Obs],
    at: &[Timestamp],
    end: Timestamp,
    last_crash: Option<&Crash>,
) -> Result<(Vec<Transition>, ZoneState), TestCaseError> {
    let mut state = initial_state(model, Timestamp(T0));
    let mut out = Vec::new();
    let mut prev = Timestamp(T0);
    for (i, o) in obs.iter().enumerate() {
        if let Some(crash) = &o.crash {
            restart(
                model,
                obs,
                at,
                &mut state,
                &mut out,
                crash,
                i,
                (prev, at[i]),
            )?;
        }
        out.extend(advance(model, &mut state, at[i]));
        if let Some(c) = &o.cmd {
            out.extend(command(model, &mut state, c, at[i]));
        }
        if listens(model, SENSORS[o.sensor]) {
            out.extend(apply(model, &mut state, &input(obs, at, i)));
        }
        check(&state)?;
        prev = at[i];
    }
    if let Some(crash) = last_crash {
        restart(
            model,
            obs,
            at,
            &mut state,
            &mut out,
            crash,
            obs.len(),
            (prev, end),
        )?;
    }
    out.extend(advance(model, &mut state, end));
    check(&state)?;
    Ok((out, state))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn crash_and_restart_change_nothing(
        zones in (zone("z0"), zone("z1")),
        obs in prop::collection::vec(obs(), 1..40),
        last_crash in prop::option::of((
            prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            0..=1000u16,
        ).prop_map(|(redeliver, restart)| Crash { redeliver, restart })),
        tail in 0..20_000i64,
    ) {
        let at = times(&obs);
        let last = at.iter().copied().max().unwrap_or(Timestamp(T0));
        let end = Timestamp(last.0.max(T0) + tail);
        for model in [&zones.0, &zones.1] {
            let (ref_out, ref_state) = reference(model, &obs, &at, end)?;
            let (crash_out, crash_state) = crashing(model, &obs, &at, end, last_crash.as_ref())?;
            check_chain(&ref_out, &ref_state)?;
            prop_assert_eq!(&ref_out, &crash_out);
            prop_assert_eq!(&ref_state, &crash_state);
        }
    }
}

// Crash equivalence across failover: the same readings split across any
// number of engine holders, each taking over from the state the previous
// one left in KV, give the transitions and final state of a run that never
// changed hands. The old holder of each takeover is caught with a batch
// applied in memory: its compare-and-set write of the zone is refused (the
// new holder rewrote the key at takeover), and some of the batch's
// transitions may still reach EVENTS (frozen between its fence check and
// the publish), where the `Nats-Msg-Id` keeps the first copy of each.

/// The zone's KV key: its revision and its JSON.
struct Kv {
    revision: u64,
    value: Vec<u8>,
}

impl Kv {
    /// A compare-and-set write: the new revision, or `None` (nothing
    /// written) when the key is no longer at `expected`.
    fn cas(&mut self, expected: u64, state: &ZoneState) -> Result<Option<u64>, TestCaseError> {
        if expected != self.revision {
            return Ok(None);
        }
        self.value = serde_json::to_vec(state).map_err(|e| TestCaseError::fail(e.to_string()))?;
        self.revision += 1;
        Ok(Some(self.revision))
    }

    /// The holder's write, expecting the revision it last saw.
    fn commit(&mut self, state: &ZoneState) -> Result<(), TestCaseError> {
        let expected = self.revision;
        prop_assert!(self.cas(expected, state)?.is_some());
        Ok(())
    }

    fn load(&self) -> Result<ZoneState, TestCaseError> {
        serde_json::from_slice(&self.value).map_err(|e| TestCaseError::fail(e.to_string()))
    }
}

/// EVENTS as the stream keeps it for one zone: one message per
/// transition number (a second publish with the same id is a duplicate,
/// and must then say the same thing: an id that meant two different
/// transitions would be a lost one).
fn publish(events: &mut Vec<Transition>, ts: &[Transition]) -> Result<(), TestCaseError> {
    for t in ts {
        let n = t.number as usize;
        prop_assert!(
            n >= 1 && n <= events.len() + 1,
            "number {} after {}",
            n,
            events.len()
        );
        if n <= events.len() {
            prop_assert_eq!(&events[n - 1], t, "duplicate id, other content");
        } else {
            events.push(t.clone());
        }
    }
    Ok(())
}

/// A takeover just before an observation (and its command, if any).
#[derive(Clone, Debug)]
struct Takeover {
    /// Observations the old holder had applied in memory, uncommitted,
    /// when its fence closed (its batch; cut short at the next command,
    /// which the runner commits on its own).
    in_flight: usize,
    /// How many of that batch's transitions still reached EVENTS.
    published: prop::sample::Index,
    /// Applied observations the consumer delivers again to the new holder.
    redeliver: Vec<prop::sample::Index>,
    /// When the new holder runs its first timers, per mille of the gap
    /// since the last observation.
    wake: u16,
}

fn takeover() -> impl Strategy<Value = Takeover> {
    (
        0..5usize,
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
        0..=1000u16,
    )
        .prop_map(|(in_flight, published, redeliver, wake)| Takeover {
            in_flight,
            published,
            redeliver,
            wake,
        })
}

/// One takeover before observation `i` (`obs.len()`: after the last):
/// the old holder's in-flight batch, its refused write and what of it
/// reached EVENTS; then the new holder's start from KV.
#[allow(clippy::too_many_arguments)]
fn hand_over(
    model: &ZoneModel,
    obs: &[Obs],
    at: &[Timestamp],
    kv: &mut Kv,
    events: &mut Vec<Transition>,
    t: &Takeover,
    i: usize,
    (from, until): (Timestamp, Timestamp),
) -> Result<ZoneState, TestCaseError> {
    // The old holder's batch, from the state it last committed.
    let old_revision = kv.revision;
    let mut ghost = kv.load()?;
    let mut ghost_out = Vec::new();
    let batch_end = (i..obs.len())
        .take(t.in_flight)
        .take_while(|j| obs[*j].cmd.is_none())
        .last()
        .map_or(i, |j| j + 1);
    for j in i..batch_end {
        ghost_out.extend(advance(model, &mut ghost, at[j]));
        if listens(model, SENSORS[obs[j].sensor]) {
            ghost_out.extend(apply(model, &mut ghost, &input(obs, at, j)));
        }
    }
    // The new holder: loads the zone and rewrites it (same value, new
    // revision), which is what fences the old one out.
    let mut state = kv.load()?;
    super::reconcile(model, &mut state);
    kv.commit(&state)?;
    prop_assert!(kv.revision > old_revision);
    // The old holder wakes: its write is refused, but transitions it sent
    // before its fence check reach EVENTS.
    prop_assert!(
        kv.cas(old_revision, &ghost)?.is_none(),
        "a fenced write landed"
    );
    if !ghost_out.is_empty() {
        let n = t.published.index(ghost_out.len() + 1);
        publish(events, &ghost_out[..n])?;
    }
    // The consumer redelivers what the old holder had (skipped by
    // sequence), and the new holder's timers run when it wakes.
    for pick in &t.redeliver {
        if i > 0 {
            let j = pick.index(i);
            if listens(model, SENSORS[obs[j].sensor]) {
                let again = apply(model, &mut state, &input(obs, at, j));
                prop_assert!(again.is_empty(), "redelivery of {} emitted {:?}", j, again);
            }
        }
    }
    let woke = advance(model, &mut state, between(from, until, t.wake));
    publish(events, &woke)?;
    kv.commit(&state)?;
    check(&state)?;
    Ok(state)
}

fn failing_over(
    model: &ZoneModel,
    obs: &[(Obs, Option<Takeover>)],
    at: &[Timestamp],
    end: Timestamp,
    last: Option<&Takeover>,
) -> Result<(Vec<Transition>, ZoneState, usize), TestCaseError> {
    let plain: Vec<Obs> = obs.iter().map(|(o, _)| o.clone()).collect();
    let mut state = initial_state(model, Timestamp(T0));
    let mut kv = Kv {
        revision: 0,
        value: Vec::new(),
    };
    kv.commit(&state)?;
    let mut events = Vec::new();
    let mut holders = 1;
    let mut prev = Timestamp(T0);
    for (i, (o, t)) in obs.iter().enumerate() {
        if let Some(t) = t {
            state = hand_over(model, &plain, at, &mut kv, &mut events, t, i, (prev, at[i]))?;
            holders += 1;
        }
        // One commit per observation (and per command): EVENTS, then KV.
        let mut out = advance(model, &mut state, at[i]);
        if let Some(c) = &o.cmd {
            out.extend(command(model, &mut state, c, at[i]));
        }
        if listens(model, SENSORS[o.sensor]) {
            out.extend(apply(model, &mut state, &input(&plain, at, i)));
        }
        publish(&mut events, &out)?;
        kv.commit(&state)?;
        check(&state)?;
        prev = at[i];
    }
    if let Some(t) = last {
        state = hand_over(
            model,
            &plain,
            at,
            &mut kv,
            &mut events,
            t,
            obs.len(),
            (prev, end),
        )?;
        holders += 1;
    }
    let out = advance(model, &mut state, end);
    publish(&mut events, &out)?;
    kv.commit(&state)?;
    prop_assert_eq!(&kv.load()?, &state, "KV holds the final state");
    Ok((events, state, holders))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_number_of_takeovers_change_nothing(
        zones in (zone("z0"), zone("z1")),
        obs in prop::collection::vec(
            (obs(), prop::option::weighted(0.25, takeover())),
            1..40,
        ),
        last in prop::option::of(takeover()),
        tail in 0..20_000i64,
    ) {
        let plain: Vec<Obs> = obs.iter().map(|(o, _)| o.clone()).collect();
        let at = times(&plain);
        let latest = at.iter().copied().max().unwrap_or(Timestamp(T0));
        let end = Timestamp(latest.0.max(T0) + tail);
        for model in [&zones.0, &zones.1] {
            let (ref_out, ref_state) = reference(model, &plain, &at, end)?;
            let (events, state, holders) = failing_over(model, &obs, &at, end, last.as_ref())?;
            prop_assert!(holders >= 1);
            check_chain(&events, &state)?;
            prop_assert_eq!(&ref_out, &events);
            prop_assert_eq!(&ref_state, &state);
        }
    }
}
