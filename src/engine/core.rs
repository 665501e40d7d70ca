//! The engine's decisions as pure functions of (model, state, input, time).

use super::model::ZoneModel;
use super::{Input, Transition, ZoneState};
use crate::time::Timestamp;

/// A zone's state before any evidence: vacant, at the prior.
pub fn initial_state(_model: &ZoneModel, _now: Timestamp) -> ZoneState {
    unimplemented!("engine core: to be written")
}

/// Adopts a stored state to the current model (rules added, removed or
/// reordered since it was written).
pub fn reconcile(_model: &ZoneModel, _state: &mut ZoneState) {
    unimplemented!("engine core: to be written")
}

/// Applies one observation: first advances time to `input.at`, firing due
/// timers in deadline order, then applies the reading.
pub fn apply(_model: &ZoneModel, _state: &mut ZoneState, _input: &Input<'_>) -> Vec<Transition> {
    unimplemented!("engine core: to be written")
}

/// Advances the zone's clock to `now`, firing every timer due by then in
/// deadline order.
pub fn advance(_model: &ZoneModel, _state: &mut ZoneState, _now: Timestamp) -> Vec<Transition> {
    unimplemented!("engine core: to be written")
}

/// The next instant at which the zone's state changes without input.
pub fn next_deadline(_model: &ZoneModel, _state: &ZoneState) -> Option<Timestamp> {
    unimplemented!("engine core: to be written")
}
