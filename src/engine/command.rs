//! Commands on `cmd.<site>.presence.<zone>`: the request and reply JSON and
//! their validation, without I/O.
//!
//! A request is checked completely before it touches a zone: every way it
//! can be wrong has its own [`ErrorKind`] and a message saying what and
//! where, and a refused request changes nothing. The CLI runs the same
//! checks before sending, so an operator sees the same words either way.

use super::{Override, Presence, ZoneState};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Schema version of [`Request`] and [`Reply`] JSON.
pub const COMMAND_SCHEMA: u32 = 1;

/// Longest override: a month covers a holiday; anything longer is far more
/// likely a typo (`30d` for `30m`) than an intent.
pub const MAX_OVERRIDE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Longest `by` and `reason`, in characters: they are stored in every
/// zone value and transition of the override.
pub const MAX_TEXT: usize = 200;

/// What `by` says when a request does not say who sent it.
pub const UNKNOWN_SENDER: &str = "unknown";

/// A request as it travels (JSON, readable with `nats req`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    /// `override` or `clear`.
    pub op: String,
    /// `occupied` or `vacant` (override only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// How long the override holds, humantime (`30m`, `2h`) (override only).
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Who sends it (recorded as given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Why (recorded as given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The sender's id for this command: a retry with the same id on the
    /// same subject within [`RETRY_WINDOW`] gets the original reply and
    /// changes nothing again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// How long the engine remembers a command id and its reply.
pub const RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// The id of a request, if it has a usable one (a request whose id is
/// not usable is refused by [`parse`]).
pub fn command_id(payload: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let id = value.get("id")?.as_str()?;
    text("id", Some(id)).ok().flatten()
}

/// A validated override.
#[derive(Clone, Debug, PartialEq)]
pub struct OverrideRequest {
    pub state: Presence,
    pub duration: Duration,
    pub by: String,
    pub reason: Option<String>,
}

/// A validated command.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Override(OverrideRequest),
    Clear {
        by: String,
    },
    /// Remove a zone the config no longer has from KV `presence` and
    /// `debounce`, recorded in EVENTS (refused for a configured zone).
    Forget {
        by: String,
    },
}

/// Every way a command can be refused; the `kind` of an error reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not JSON, not an object, a field of the wrong type or unknown.
    Malformed,
    /// `v` missing or not a version this engine speaks.
    Schema,
    /// `op` is neither `override` nor `clear`.
    UnknownOp,
    /// The subject names a zone the engine does not have.
    UnknownZone,
    /// `state` missing or not `occupied`/`vacant`.
    BadState,
    /// `for` missing or not a duration.
    BadDuration,
    /// `for` is zero.
    ZeroDuration,
    /// `for` is longer than [`MAX_OVERRIDE`].
    DurationTooLong,
    /// `by` or `reason` unusable, or a field the op does not take.
    BadField,
    /// The engine could not make the result durable.
    Unavailable,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Malformed => "malformed",
            ErrorKind::Schema => "schema",
            ErrorKind::UnknownOp => "unknown_op",
            ErrorKind::UnknownZone => "unknown_zone",
            ErrorKind::BadState => "bad_state",
            ErrorKind::BadDuration => "bad_duration",
            ErrorKind::ZeroDuration => "zero_duration",
            ErrorKind::DurationTooLong => "duration_too_long",
            ErrorKind::BadField => "bad_field",
            ErrorKind::Unavailable => "unavailable",
        }
    }
}

/// A refused command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub kind: ErrorKind,
    pub message: String,
}

fn refuse(kind: ErrorKind, message: impl Into<String>) -> CommandError {
    CommandError {
        kind,
        message: message.into(),
    }
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CommandError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The zone's state after the command (on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<Presence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
    /// The override in force after the command, if any.
    #[serde(rename = "override", default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<Override>,
    /// False when the command found nothing to do (`clear` without an
    /// override in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<bool>,
    /// Revision of the zone's key in KV `presence` holding the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

impl Reply {
    pub fn error(zone: Option<&str>, error: CommandError) -> Reply {
        Reply {
            v: COMMAND_SCHEMA,
            ok: false,
            error: Some(error),
            zone: zone.map(str::to_owned),
            state: None,
            since: None,
            confidence: None,
            manual: None,
            changed: None,
            revision: None,
        }
    }

    pub fn done(state: &ZoneState, changed: bool, revision: u64) -> Reply {
        Reply {
            v: COMMAND_SCHEMA,
            ok: true,
            error: None,
            zone: Some(state.zone.clone()),
            state: Some(state.state),
            since: Some(state.since),
            confidence: Some(state.confidence),
            manual: state.manual.clone(),
            changed: Some(changed),
            revision: Some(revision),
        }
    }
}

/// Parses and validates a request body.
pub fn parse(payload: &[u8]) -> Result<Command, CommandError> {
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
        refuse(
            ErrorKind::Malformed,
            format!(
                "request is not JSON: {e} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })?;
    let Some(object) = value.as_object() else {
        return Err(refuse(ErrorKind::Malformed, "request is not a JSON object"));
    };
    match object.get("v") {
        None => {
            return Err(refuse(
                ErrorKind::Schema,
                format!("request has no schema version \"v\"; this engine speaks v {COMMAND_SCHEMA}"),
            ))
        }
        Some(v) if v.as_u64() != Some(u64::from(COMMAND_SCHEMA)) => {
            return Err(refuse(
                ErrorKind::Schema,
                format!("request schema version \"v\": {v} is not supported; this engine speaks v {COMMAND_SCHEMA}"),
            ))
        }
        Some(_) => {}
    }
    let request: Request = serde_json::from_value(value)
        .map_err(|e| refuse(ErrorKind::Malformed, format!("request: {e}")))?;
    validate(&request)
}

/// Checks a request's fields; also used by the CLI before sending.
pub fn validate(request: &Request) -> Result<Command, CommandError> {
    let by = text("by", request.by.as_deref())?.unwrap_or_else(|| UNKNOWN_SENDER.to_owned());
    let reason = text("reason", request.reason.as_deref())?;
    text("id", request.id.as_deref())?;
    match request.op.as_str() {
        "override" => Ok(Command::Override(OverrideRequest {
            state: override_state(request.state.as_deref())?,
            duration: duration(request.duration.as_deref())?,
            by,
            reason,
        })),
        "clear" => {
            for (field, given) in [("state", &request.state), ("for", &request.duration)] {
                if given.is_some() {
                    return Err(refuse(
                        ErrorKind::BadField,
                        format!("field {field:?}: `clear` takes no {field}"),
                    ));
                }
            }
            Ok(Command::Clear { by })
        }
        "forget" => {
            for (field, given) in [("state", &request.state), ("for", &request.duration)] {
                if given.is_some() {
                    return Err(refuse(
                        ErrorKind::BadField,
                        format!("field {field:?}: `forget` takes no {field}"),
                    ));
                }
            }
            Ok(Command::Forget { by })
        }
        other => Err(refuse(
            ErrorKind::UnknownOp,
            format!("field \"op\": {other:?} is not a command; use \"override\", \"clear\" or \"forget\""),
        )),
    }
}

fn override_state(state: Option<&str>) -> Result<Presence, CommandError> {
    match state {
        Some("occupied") => Ok(Presence::Occupied),
        Some("vacant") => Ok(Presence::Vacant),
        Some(other) => Err(refuse(
            ErrorKind::BadState,
            format!("field \"state\": {other:?} cannot be commanded; use \"occupied\" or \"vacant\" (arriving and leaving are the debounce's own)"),
        )),
        None => Err(refuse(
            ErrorKind::BadState,
            "field \"state\" is missing: say \"occupied\" or \"vacant\"",
        )),
    }
}

fn duration(text: Option<&str>) -> Result<Duration, CommandError> {
    let Some(text) = text else {
        return Err(refuse(
            ErrorKind::BadDuration,
            "field \"for\" is missing: say how long the override holds, e.g. \"30m\"",
        ));
    };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        refuse(
            ErrorKind::BadDuration,
            format!("field \"for\": {text:?} is not a duration ({e}); e.g. \"30m\", \"2h\""),
        )
    })?;
    if d.is_zero() {
        return Err(refuse(
            ErrorKind::ZeroDuration,
            format!("field \"for\": {text:?} is zero; an override must hold for some time (use `clear` to end one)"),
        ));
    }
    // Whole milliseconds are what the stored deadline can say.
    if d < Duration::from_millis(1) {
        return Err(refuse(
            ErrorKind::ZeroDuration,
            format!("field \"for\": {text:?} is shorter than a millisecond"),
        ));
    }
    if d > MAX_OVERRIDE {
        return Err(refuse(
            ErrorKind::DurationTooLong,
            format!(
                "field \"for\": {text:?} is longer than the longest override, {}",
                humantime::format_duration(MAX_OVERRIDE)
            ),
        ));
    }
    Ok(d)
}

fn text(field: &str, value: Option<&str>) -> Result<Option<String>, CommandError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.trim().is_empty() {
        return Err(refuse(
            ErrorKind::BadField,
            format!("field {field:?} is empty; leave it out instead"),
        ));
    }
    if value.chars().count() > MAX_TEXT {
        return Err(refuse(
            ErrorKind::BadField,
            format!("field {field:?} is longer than {MAX_TEXT} characters"),
        ));
    }
    if let Some((i, c)) = value.char_indices().find(|(_, c)| c.is_control()) {
        return Err(refuse(
            ErrorKind::BadField,
            format!("field {field:?} has control character {c:?} at byte {i}"),
        ));
    }
    Ok(Some(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(body: &str) -> ErrorKind {
        parse(body.as_bytes()).unwrap_err().kind
    }

    #[test]
    fn a_valid_override_and_clear() {
        let c = parse(br#"{"v":1,"op":"override","state":"occupied","for":"30m","by":"ann","reason":"cleaning"}"#).unwrap();
        assert_eq!(
            c,
            Command::Override(OverrideRequest {
                state: Presence::Occupied,
                duration: Duration::from_secs(1800),
                by: "ann".into(),
                reason: Some("cleaning".into()),
            })
        );
        assert_eq!(
            parse(br#"{"v":1,"op":"clear"}"#).unwrap(),
            Command::Clear {
                by: UNKNOWN_SENDER.into()
            }
        );
    }

    #[test]
    fn each_fault_has_its_own_kind() {
        use ErrorKind::*;
        let cases = [
            ("{", Malformed),
            ("[1]", Malformed),
            (
                r#"{"v":1,"op":"override","state":"vacant","for":"1m","x":1}"#,
                Malformed,
            ),
            (r#"{"v":1,"op":5}"#, Malformed),
            (r#"{"op":"clear"}"#, Schema),
            (r#"{"v":2,"op":"clear"}"#, Schema),
            (r#"{"v":"1","op":"clear"}"#, Schema),
            (r#"{"v":1,"op":"reboot"}"#, UnknownOp),
            (
                r#"{"v":1,"op":"override","state":"arriving","for":"1m"}"#,
                BadState,
            ),
            (r#"{"v":1,"op":"override","for":"1m"}"#, BadState),
            (
                r#"{"v":1,"op":"override","state":"vacant","for":"soon"}"#,
                BadDuration,
            ),
            (r#"{"v":1,"op":"override","state":"vacant"}"#, BadDuration),
            (
                r#"{"v":1,"op":"override","state":"vacant","for":"0s"}"#,
                ZeroDuration,
            ),
            (
                r#"{"v":1,"op":"override","state":"vacant","for":"10us"}"#,
                ZeroDuration,
            ),
            (
                r#"{"v":1,"op":"override","state":"vacant","for":"31days"}"#,
                DurationTooLong,
            ),
            (
                r#"{"v":1,"op":"override","state":"vacant","for":"99999999999years"}"#,
                DurationTooLong,
            ),
            (
                r#"{"v":1,"op":"override","state":"vacant","for":"99999999999999999999999s"}"#,
                BadDuration,
            ),
            (
                r#"{"v":1,"op":"override","state":"vacant","for":"1m","by":""}"#,
                BadField,
            ),
            (
                r#"{"v":1,"op":"override","state":"vacant","for":"1m","reason":"a\u0007"}"#,
                BadField,
            ),
            (r#"{"v":1,"op":"clear","state":"vacant"}"#, BadField),
        ];
        for (body, want) in cases {
            assert_eq!(kind(body), want, "{body}");
        }
    }

    #[test]
    fn messages_say_where() {
        let e = parse(b"{\"v\":1,\n\"op\" \"x\"}").unwrap_err();
        assert!(e.message.contains("line 2"), "{}", e.message);
        let e = parse(br#"{"v":1,"op":"override","state":"vacant","for":"0s"}"#).unwrap_err();
        assert!(e.message.contains("\"for\""), "{}", e.message);
        let long = "x".repeat(MAX_TEXT + 1);
        let body = format!(r#"{{"v":1,"op":"clear","by":"{long}"}}"#);
        let e = parse(body.as_bytes()).unwrap_err();
        assert!(e.message.contains("\"by\""), "{}", e.message);
    }

    #[test]
    fn replies_round_trip() {
        let r = Reply::error(
            Some("hall"),
            refuse(ErrorKind::UnknownZone, "zone \"hall\" is unknown"),
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""kind":"unknown_zone""#), "{json}");
        assert_eq!(serde_json::from_str::<Reply>(&json).unwrap(), r);
    }
}
