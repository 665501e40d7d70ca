//! Picks the value (and optionally the device's timestamp) out of an MQTT
//! payload.
//!
//! Devices disagree on how to say "on": Tasmota sends `ON`, ESPHome `true`,
//! Zigbee2MQTT a JSON object with a boolean field, some firmwares the
//! string `"true"` inside JSON. All of these become a [`Reading`]; anything
//! that cannot be read becomes a [`PayloadError`] saying where and why, for
//! the rejection record.

use crate::observation::Reading;
use crate::time::Timestamp;
use serde_json::Value;
use std::fmt;

/// Where in a payload the value is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueSelector {
    /// The whole payload is the value (`true`, `OFF`, `21.5`).
    Whole,
    /// A JSON pointer (`/occupancy`, `/state/motion`).
    Pointer(String),
    /// A top-level field of a JSON object.
    Field(String),
}

impl ValueSelector {
    /// A leading `/` means a JSON pointer, so a field name never needs
    /// escaping unless it starts with `/`.
    pub fn parse(spec: Option<&str>) -> ValueSelector {
        match spec {
            None | Some("") => ValueSelector::Whole,
            Some(s) if s.starts_with('/') => ValueSelector::Pointer(s.to_owned()),
            Some(s) => ValueSelector::Field(s.to_owned()),
        }
    }
}

impl fmt::Display for ValueSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueSelector::Whole => f.write_str("the whole payload"),
            ValueSelector::Pointer(p) => write!(f, "pointer {p}"),
            ValueSelector::Field(n) => write!(f, "field {n:?}"),
        }
    }
}

/// Why no value (or timestamp) could be read from a payload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("not UTF-8: invalid byte at offset {offset}")]
    Utf8 { offset: usize },
    #[error("payload is empty")]
    Empty,
    #[error("invalid JSON at byte {offset}: {message}")]
    Json { offset: usize, message: String },
    #[error("{at} needs a JSON object, found {found}")]
    NotAnObject { at: String, found: &'static str },
    #[error("{at} is missing")]
    Missing { at: String },
    #[error("{at} is {found}, not a boolean (true/false, ON/OFF) or a number")]
    WrongType { at: String, found: String },
    #[error("{at} is not a finite number")]
    NotFinite { at: String },
    #[error("{at} is not a timestamp (Unix milliseconds or RFC 3339): {reason}")]
    Timestamp { at: String, reason: String },
}

/// Reads the sensor value.
pub fn extract_value(payload: &[u8], sel: &ValueSelector) -> Result<Reading, PayloadError> {
    let text = utf8(payload)?;
    if *sel == ValueSelector::Whole {
        if let Some(b) = word(text.trim()) {
            return Ok(Reading::Bool(b));
        }
    }
    let v = select(text, sel)?;
    reading(&v, &sel.to_string())
}

/// Reads the device's own timestamp. Numbers are Unix **milliseconds**
/// only: guessing seconds from the magnitude would silently misplace
/// readings by a factor of 1000 for some range of values, so a device that
/// sends seconds needs a mapping that does not use its timestamp.
pub fn extract_timestamp(payload: &[u8], sel: &ValueSelector) -> Result<Timestamp, PayloadError> {
    let text = utf8(payload)?;
    let at = sel.to_string();
    let bad = |reason: String| PayloadError::Timestamp {
        at: at.clone(),
        reason,
    };
    // A bare RFC 3339 payload is not JSON; try it before parsing.
    if *sel == ValueSelector::Whole && !text.trim_start().starts_with(['"', '{', '[']) {
        let t = text.trim();
        if t.contains(['T', 't', ' ']) {
            return parse_rfc3339(t).map_err(bad);
        }
    }
    match select(text, sel)? {
        Value::Number(n) => {
            let ms = n
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| PayloadError::NotFinite { at: at.clone() })?;
            millis(ms).map_err(bad)
        }
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(ms) if ms.is_finite() => millis(ms).map_err(bad),
            _ => parse_rfc3339(s.trim()).map_err(bad),
        },
        other => Err(bad(format!("found {}", json_type(&other)))),
    }
}

/// The earliest device timestamp accepted, 2000-01-01T00:00:00Z: a device
/// whose clock was never set reports 1970 or 2000 plus its uptime, and
/// `ts: -1` or `0` is a placeholder, not an instant.
pub const EARLIEST_DEVICE_TIME: Timestamp = Timestamp(946_684_800_000);

/// Checks a device timestamp against the receive time, the same way for
/// every form it was written in (milliseconds, RFC 3339 with or without an
/// offset): before [`EARLIEST_DEVICE_TIME`] or further than `max_skew`
/// ahead of `received_at` is refused with a reason. A reading from the
/// future would move its zone's clock forward (a reading dated 2126
/// freezes the zone until 2126), so it is rejected, never clamped.
pub fn check_device_time(
    t: Timestamp,
    received_at: Timestamp,
    max_skew: std::time::Duration,
) -> Result<Timestamp, String> {
    if t < EARLIEST_DEVICE_TIME {
        let shown = if t.0 >= 0 {
            t.to_string()
        } else {
            format!("{} ms before 1970-01-01", t.0.unsigned_abs())
        };
        return Err(format!(
            "device time {shown} is before {EARLIEST_DEVICE_TIME}: the device clock is not set"
        ));
    }
    let ahead = t.since(received_at);
    if ahead > max_skew {
        return Err(format!(
            "device time {t} is {} ahead of the receive time {received_at}, more than ingest.max_clock_skew ({}): the device clock is wrong",
            humantime::format_duration(std::time::Duration::from_secs(ahead.as_secs())),
            humantime::format_duration(max_skew)
        ));
    }
    Ok(t)
}

fn millis(ms: f64) -> Result<Timestamp, String> {
    // i64 milliseconds cover ±292 million years; anything beyond is garbage.
    if ms.abs() < 9.0e15 {
        Ok(Timestamp(ms.floor() as i64))
    } else {
        Err(format!("{ms} milliseconds is out of range"))
    }
}

/// RFC 3339 with `Z`, no zone, or a numeric offset (`+02:00`), which
/// Zigbee2MQTT's `last_seen` uses.
fn parse_rfc3339(s: &str) -> Result<Timestamp, String> {
    let (base, offset_min) = split_offset(s);
    let t = Timestamp::parse_rfc3339(base).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(Timestamp(t.0 - offset_min * 60_000))
}

/// Splits a trailing `+hh:mm` / `-hh:mm` off the time part.
fn split_offset(s: &str) -> (&str, i64) {
    let b = s.as_bytes();
    if b.len() > 6 && s.is_char_boundary(b.len() - 6) {
        let (base, off) = s.split_at(b.len() - 6);
        let o = off.as_bytes();
        let digits = |i: usize| (o[i] as char).to_digit(10).map(i64::from);
        if (o[0] == b'+' || o[0] == b'-') && o[3] == b':' && base.contains(['T', 't', ' ']) {
            if let (Some(h1), Some(h2), Some(m1), Some(m2)) =
                (digits(1), digits(2), digits(4), digits(5))
            {
                let minutes = (h1 * 10 + h2) * 60 + m1 * 10 + m2;
                let sign = if o[0] == b'-' { -1 } else { 1 };
                return (base, sign * minutes);
            }
        }
    }
    (s, 0)
}

fn utf8(payload: &[u8]) -> Result<&str, PayloadError> {
    std::str::from_utf8(payload).map_err(|e| PayloadError::Utf8 {
        offset: e.valid_up_to(),
    })
}

/// The words devices use for booleans.
fn word(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("on") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") || s.eq_ignore_ascii_case("off") {
        Some(false)
    } else {
        None
    }
}

/// Parses the payload as JSON and returns the selected part.
fn select(text: &str, sel: &ValueSelector) -> Result<Value, PayloadError> {
    if text.trim().is_empty() {
        return Err(PayloadError::Empty);
    }
    let doc: Value = serde_json::from_str(text).map_err(|e| json_error(text, &e))?;
    let at = sel.to_string();
    let found = match sel {
        ValueSelector::Whole => return Ok(doc),
        ValueSelector::Pointer(p) => {
            if !doc.is_object() {
                return Err(PayloadError::NotAnObject {
                    at,
                    found: json_type(&doc),
                });
            }
            doc.pointer(p)
        }
        ValueSelector::Field(f) => match &doc {
            Value::Object(m) => m.get(f),
            other => {
                return Err(PayloadError::NotAnObject {
                    at,
                    found: json_type(other),
                })
            }
        },
    };
    found.cloned().ok_or(PayloadError::Missing { at })
}

fn reading(v: &Value, at: &str) -> Result<Reading, PayloadError> {
    match v {
        Value::Bool(b) => Ok(Reading::Bool(*b)),
        Value::Number(n) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Reading::Number)
            .ok_or_else(|| PayloadError::NotFinite { at: at.to_owned() }),
        Value::String(s) => {
            let t = s.trim();
            if let Some(b) = word(t) {
                return Ok(Reading::Bool(b));
            }
            match t.parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(Reading::Number(f)),
                _ => Err(PayloadError::WrongType {
                    at: at.to_owned(),
                    found: format!("the string {:?}", clip(s)),
                }),
            }
        }
        other => Err(PayloadError::WrongType {
            at: at.to_owned(),
            found: json_type(other).to_owned(),
        }),
    }
}

/// Keeps rejection reasons short when a device sends a novel.
fn clip(s: &str) -> String {
    const MAX: usize = 40;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde_json reports line and column; an operator looking at a payload
/// dump wants the byte offset, and the message without the position.
fn json_error(text: &str, e: &serde_json::Error) -> PayloadError {
    let full = e.to_string();
    let message = match full.rfind(" at line ") {
        Some(i) => full[..i].to_owned(),
        None => full,
    };
    let line_start: usize = text
        .split_inclusive('\n')
        .take(e.line().saturating_sub(1))
        .map(str::len)
        .sum();
    let offset = (line_start + e.column().saturating_sub(1)).min(text.len());
    PayloadError::Json { offset, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(p: &str) -> Result<Reading, PayloadError> {
        extract_value(p.as_bytes(), &ValueSelector::Whole)
    }

    fn at(p: &str, spec: &str) -> Result<Reading, PayloadError> {
        extract_value(p.as_bytes(), &ValueSelector::parse(Some(spec)))
    }

    #[test]
    fn selector_parsing() {
        assert_eq!(ValueSelector::parse(None), ValueSelector::Whole);
        assert_eq!(
            ValueSelector::parse(Some("/a/b")),
            ValueSelector::Pointer("/a/b".into())
        );
        assert_eq!(
            ValueSelector::parse(Some("occupancy")),
            ValueSelector::Field("occupancy".into())
        );
    }

    #[test]
    fn whole_payload_words_and_numbers() {
        assert_eq!(whole("true"), Ok(Reading::Bool(true)));
        assert_eq!(whole(" OFF\n"), Ok(Reading::Bool(false)));
        assert_eq!(whole("On"), Ok(Reading::Bool(true)));
        assert_eq!(whole("FALSE"), Ok(Reading::Bool(false)));
        assert_eq!(whole("21.5"), Ok(Reading::Number(21.5)));
        assert_eq!(whole("1"), Ok(Reading::Number(1.0)), "numbers stay numbers");
        assert_eq!(whole("-3e2"), Ok(Reading::Number(-300.0)));
        assert_eq!(whole("\"ON\""), Ok(Reading::Bool(true)));
    }

    #[test]
    fn whole_payload_garbage() {
        assert_eq!(whole(""), Err(PayloadError::Empty));
        assert!(matches!(
            whole("maybe"),
            Err(PayloadError::Json { offset: 0, .. })
        ));
        assert!(matches!(whole("NaN"), Err(PayloadError::Json { .. })));
        assert!(matches!(whole("inf"), Err(PayloadError::Json { .. })));
        let e = whole("null").unwrap_err();
        assert_eq!(
            e.to_string(),
            "the whole payload is null, not a boolean (true/false, ON/OFF) or a number"
        );
        assert!(matches!(
            whole("{\"a\":1}"),
            Err(PayloadError::WrongType { .. })
        ));
    }

    #[test]
    fn zigbee2mqtt_payloads() {
        let motion = r#"{"battery":100,"occupancy":true,"linkquality":120}"#;
        assert_eq!(at(motion, "/occupancy"), Ok(Reading::Bool(true)));
        assert_eq!(at(motion, "occupancy"), Ok(Reading::Bool(true)));
        let door = r#"{"battery":91,"contact":false,"voltage":3005,"linkquality":87}"#;
        assert_eq!(at(door, "/contact"), Ok(Reading::Bool(false)));
        let light = r#"{"illuminance":412,"illuminance_lux":412,"linkquality":54}"#;
        assert_eq!(at(light, "/illuminance"), Ok(Reading::Number(412.0)));
    }

    #[test]
    fn strings_inside_json() {
        assert_eq!(at(r#"{"state":"ON"}"#, "state"), Ok(Reading::Bool(true)));
        assert_eq!(at(r#"{"state":"off"}"#, "state"), Ok(Reading::Bool(false)));
        assert_eq!(at(r#"{"state":"True"}"#, "state"), Ok(Reading::Bool(true)));
        assert_eq!(at(r#"{"lux":" 12.5 "}"#, "lux"), Ok(Reading::Number(12.5)));
        let e = at(r#"{"state":"maybe"}"#, "state").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"field "state" is the string "maybe", not a boolean (true/false, ON/OFF) or a number"#
        );
        assert!(
            at(r#"{"lux":"NaN"}"#, "lux").is_err(),
            "non-finite strings refused"
        );
    }

    #[test]
    fn wrong_types_name_path_and_type() {
        for (p, found) in [
            (r#"{"a":null}"#, "null"),
            (r#"{"a":{}}"#, "an object"),
            (r#"{"a":[1]}"#, "an array"),
        ] {
            let e = at(p, "/a").unwrap_err();
            assert_eq!(
                e,
                PayloadError::WrongType {
                    at: "pointer /a".into(),
                    found: found.into()
                }
            );
        }
    }

    #[test]
    fn nested_pointer_and_missing() {
        let p = r#"{"state":{"motion":false}}"#;
        assert_eq!(at(p, "/state/motion"), Ok(Reading::Bool(false)));
        let e = at(p, "/state/presence").unwrap_err();
        assert_eq!(e.to_string(), "pointer /state/presence is missing");
        let e = at(p, "occupancy").unwrap_err();
        assert_eq!(e.to_string(), r#"field "occupancy" is missing"#);
    }

    #[test]
    fn field_needs_an_object() {
        let e = at("[true]", "/0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pointer /0 needs a JSON object, found an array"
        );
        let e = at("true", "occupancy").unwrap_err();
        assert!(matches!(
            e,
            PayloadError::NotAnObject {
                found: "a boolean",
                ..
            }
        ));
    }

    #[test]
    fn invalid_json_gives_byte_offset() {
        let e = at(r#"{"occupancy": }"#, "/occupancy").unwrap_err();
        assert_eq!(
            e,
            PayloadError::Json {
                offset: 14,
                message: "expected value".into()
            }
        );
        assert_eq!(e.to_string(), "invalid JSON at byte 14: expected value");
        // Second line: offset counts the first line and its newline.
        let e = at("{\"a\":1,\n \"b\": x}", "a").unwrap_err();
        assert!(matches!(e, PayloadError::Json { offset: 14, .. }), "{e:?}");
        // Truncated input: offset stays inside the payload.
        let e = at("{\"a\":", "a").unwrap_err();
        assert!(
            matches!(e, PayloadError::Json { offset, .. } if offset <= 5),
            "{e:?}"
        );
    }

    #[test]
    fn non_utf8_gives_offset_of_first_bad_byte() {
        let e = extract_value(b"{\"a\":\xff}", &ValueSelector::Field("a".into())).unwrap_err();
        assert_eq!(e, PayloadError::Utf8 { offset: 5 });
        assert_eq!(e.to_string(), "not UTF-8: invalid byte at offset 5");
    }

    #[test]
    fn huge_numbers_are_refused_not_infinite() {
        assert!(at(r#"{"a":1e400}"#, "a").is_err());
    }

    #[test]
    fn timestamps() {
        let sel = ValueSelector::parse(Some("/ts"));
        let ts = |p: &str| extract_timestamp(p.as_bytes(), &sel);
        assert_eq!(
            ts(r#"{"ts":1795000000123}"#),
            Ok(Timestamp(1_795_000_000_123))
        );
        assert_eq!(
            ts(r#"{"ts":"1795000000123"}"#),
            Ok(Timestamp(1_795_000_000_123))
        );
        assert_eq!(
            ts(r#"{"ts":"2026-11-18T11:06:40.123Z"}"#),
            Ok(Timestamp(1_795_000_000_123))
        );
        assert_eq!(
            ts(r#"{"ts":"2026-11-18T12:06:40.123+01:00"}"#),
            Ok(Timestamp(1_795_000_000_123))
        );
        assert_eq!(
            ts(r#"{"ts":"2026-11-18T10:36:40.123-00:30"}"#),
            Ok(Timestamp(1_795_000_000_123))
        );
        let e = ts(r#"{"ts":"yesterday"}"#).unwrap_err();
        assert!(matches!(e, PayloadError::Timestamp { .. }), "{e:?}");
        assert!(e.to_string().contains("yesterday"), "{e}");
        let e = ts(r#"{"ts":true}"#).unwrap_err();
        assert!(e.to_string().contains("found a boolean"), "{e}");
        assert!(ts(r#"{"ts":1e300}"#).is_err(), "out of range");
        assert_eq!(
            ts(r#"{"x":1}"#),
            Err(PayloadError::Missing {
                at: "pointer /ts".into()
            })
        );
    }

    #[test]
    fn device_times_out_of_range_are_refused_in_every_form() {
        use std::time::Duration;
        let now = Timestamp(1_795_000_000_000);
        let skew = Duration::from_secs(300);
        let sel = ValueSelector::parse(Some("/ts"));
        let check = |p: &str| {
            extract_timestamp(p.as_bytes(), &sel)
                .map_err(|e| e.to_string())
                .and_then(|t| check_device_time(t, now, skew))
        };
        // Just inside the skew, in three forms.
        for p in [
            r#"{"ts":1795000299000}"#,
            r#"{"ts":"1795000299000"}"#,
            r#"{"ts":"2026-11-18T11:11:39Z"}"#,
            r#"{"ts":"2026-11-18T12:11:39+01:00"}"#,
        ] {
            assert_eq!(check(p), Ok(Timestamp(1_795_000_299_000)), "{p}");
        }
        // One second beyond it, in the same forms.
        for p in [
            r#"{"ts":1795000301000}"#,
            r#"{"ts":"1795000301000"}"#,
            r#"{"ts":"2026-11-18T11:11:41Z"}"#,
            r#"{"ts":"2026-11-18T12:11:41+01:00"}"#,
        ] {
            let e = check(p).unwrap_err();
            assert!(
                e.contains("5m 1s ahead") && e.contains("max_clock_skew"),
                "{p}: {e}"
            );
        }
        // A century ahead.
        let e = check(r#"{"ts":"2126-11-18T11:06:40Z"}"#).unwrap_err();
        assert!(e.contains("ahead of the receive time"), "{e}");
        // Before 2000, including the placeholders devices send.
        for p in [
            r#"{"ts":-1}"#,
            r#"{"ts":0}"#,
            r#"{"ts":"-1"}"#,
            r#"{"ts":946684799999}"#,
            r#"{"ts":"1999-12-31T23:59:59.999Z"}"#,
            r#"{"ts":"2000-01-01T00:30:00+01:00"}"#,
        ] {
            let e = check(p).unwrap_err();
            assert!(e.contains("before 2000-01-01T00:00:00.000Z"), "{p}: {e}");
        }
        assert!(check(r#"{"ts":-1}"#)
            .unwrap_err()
            .contains("1 ms before 1970"));
        assert_eq!(check(r#"{"ts":946684800000}"#), Ok(EARLIEST_DEVICE_TIME));
    }

    #[test]
    fn whole_payload_timestamps() {
        let w = ValueSelector::Whole;
        assert_eq!(
            extract_timestamp(b"2026-11-18T11:06:40.123Z", &w),
            Ok(Timestamp(1_795_000_000_123))
        );
        assert_eq!(
            extract_timestamp(b"1795000000123", &w),
            Ok(Timestamp(1_795_000_000_123))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let sels = [
            ValueSelector::Whole,
            ValueSelector::Field("a".into()),
            ValueSelector::Pointer("/a/0".into()),
        ];
        let samples: [&[u8]; 8] = [
            b"",
            b"\xff\xfe",
            b"{\"a\":[{}]}",
            b"2026-13-99T99:99:99+99:99",
            b"\"\xc3\xa9+01:00T\"",
            b"{\"a\":\"\xc3\xa9\xc3\xa9\xc3\xa9+1:00\"}",
            b"      ",
            b"[[[[[[[[[[",
        ];
        for s in samples {
            for sel in &sels {
                let _ = extract_value(s, sel);
                let _ = extract_timestamp(s, sel);
            }
        }
    }
}
