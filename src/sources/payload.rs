//! Picks the value out of a payload.
