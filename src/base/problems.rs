//! Problems found in a config: every check pushes one and carries on, so
//! one run lists everything to fix. In the leaf layer because each
//! component checks its own section (`sources::check`, `config::validate`).

use std::time::Duration;

/// One problem found in a config: where and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigProblem {
    /// Field path, e.g. `zones.kitchen.evidence[2].p_true`.
    pub path: String,
    /// What is wrong and, where it helps, the fix.
    pub reason: String,
}

/// The problems found so far.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<ConfigProblem>);

impl Problems {
    pub fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigProblem {
            path: path.into(),
            reason: reason.into(),
        });
    }

    /// How many so far (a check can tell whether an earlier one failed).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A duration that must not be zero.
    pub fn positive(&mut self, path: impl Into<String>, d: Duration) {
        if d.is_zero() {
            self.push(path, "must be longer than 0s");
        }
    }
}

/// How the allowed form of an id is explained in problems.
pub const TOKEN_FORM: &str =
    "use 1 to 64 of [a-z0-9_-] (lowercase letters, digits, `_`, `-`; no dots or spaces)";
