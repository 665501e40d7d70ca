//! From TOML text to a [`Config`], with every syntax, type and
//! unknown-field problem at once, in file order, each with its line, column
//! and exact field path (`zones.kitchen.evidence[1].p_true`) and a reason
//! in the operator's words (`expected a number like 0.8`).
//!
//! serde stops at the first error, so the parse runs in rounds over the
//! parsed (spanned) document: each round's error is recorded, the value
//! that caused it is set aside (an unknown field removed, a value of the
//! wrong type replaced by a stand-in of the expected type), and the next
//! round goes on from there. Spans come from the original text, so every
//! position is where the operator wrote it.

use super::Config;
use serde_path_to_error::Segment;
use std::borrow::Cow;
use toml::de::{DeArray, DeFloat, DeInteger, DeTable, DeValue};
use toml::Spanned;

/// One problem of the file as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseProblem {
    /// Byte offset in the text, for file order; `None` sorts last.
    pub offset: Option<usize>,
    /// `line L, column C: ` (empty without a position).
    pub position: String,
    /// Field path, when known (`zones.kitchen.evidence[1].p_true`).
    pub path: Option<String>,
    pub reason: String,
    /// The line of the file the position is on (for context).
    pub excerpt: Option<(usize, String)>,
}

impl std::fmt::Display for ParseProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.position)?;
        if let Some(p) = &self.path {
            write!(f, "`{p}`: ")?;
        }
        f.write_str(&self.reason)?;
        if let Some((line, content)) = &self.excerpt {
            write!(f, "\n    {line} | {content}")?;
        }
        Ok(())
    }
}

/// Most rounds of one parse: beyond this many problems the rest would not
/// help anyone.
const MAX_ROUNDS: usize = 100;

/// Parses `text`; on failure, every problem found, in file order.
pub(super) fn parse(text: &str) -> Result<Config, Vec<ParseProblem>> {
    let (mut root, syntax) = DeTable::parse_recoverable(text);
    let mut problems: Vec<ParseProblem> = syntax
        .iter()
        .map(|e| {
            let offset = e.span().map(|s| s.start);
            let key = offset.and_then(|o| key_at(text, o));
            problem(text, offset, key, e.message().trim().replace('\n', " "))
        })
        .collect();
    // Values already replaced once: a second error there removes them, a
    // third stops the rounds (nothing more can be learnt safely).
    let mut touched: Vec<(String, u8)> = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let de = toml::de::Deserializer::from(root.clone());
        let err = match serde_path_to_error::deserialize::<_, Config>(de) {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(_) => break,
            Err(e) => e,
        };
        let segments: Vec<Segment> = err.path().iter().cloned().collect();
        let inner = err.into_inner();
        let message = inner.message().trim().replace('\n', " ");
        let offset = inner.span().map(|s| s.start);
        let (path, reason, action) = explain(&segments, &message);
        let key = path.clone();
        let attempts = match touched.iter_mut().find(|(p, _)| *p == key) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                touched.push((key.clone(), 1));
                1
            }
        };
        problems.push(problem(text, offset, Some(path), reason));
        let action = match (action, attempts) {
            (_, 3..) => break,
            (Action::Replace(_), 2) => Action::Remove,
            (a, _) => a,
        };
        if !repair(root.get_mut(), &segments, action) {
            break;
        }
    }
    // One error can surface twice (a syntax error and the type error of
    // the value it left behind): the first of a position wins.
    problems.sort_by_key(|p| p.offset.unwrap_or(usize::MAX));
    problems.dedup_by(|b, a| a.offset.is_some() && a.offset == b.offset && a.path == b.path);
    Err(problems)
}

/// What a round does to the document after an error.
#[derive(Debug)]
enum Action {
    /// Remove this key of the table at the path (an unknown field).
    RemoveKey(String),
    /// Replace the value at the path with a stand-in of the expected type.
    Replace(DeValue<'static>),
    /// Remove the value at the path (its type is unknown).
    Remove,
    /// Nothing safe to do (a missing field in a list entry).
    Stop,
}

fn render_path(segments: &[Segment]) -> String {
    let mut out = String::new();
    for s in segments {
        match s {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// The field path, the reason in the operator's words, and the repair.
fn explain(segments: &[Segment], message: &str) -> (String, String, Action) {
    let here = render_path(segments);
    let join = |field: &str| {
        if here.is_empty() {
            field.to_owned()
        } else {
            format!("{here}.{field}")
        }
    };
    if let Some(field) = backticked_after(message, "unknown field ") {
        let expected = message
            .split_once(", expected ")
            .map(|(_, e)| format!(": the fields here are {e}"))
            .unwrap_or_else(|| ": this table takes no fields".to_owned());
        // The path may end at the unknown key itself or at its table.
        let table_path = match segments.last() {
            Some(Segment::Map { key }) if *key == field => {
                render_path(&segments[..segments.len() - 1])
            }
            _ => here.clone(),
        };
        let path = if table_path.is_empty() {
            field.clone()
        } else {
            format!("{table_path}.{field}")
        };
        return (
            path,
            format!(
                "unknown field `{field}`{expected} (a misspelling, or a field of another section?)"
            ),
            Action::RemoveKey(field),
        );
    }
    if let Some(field) = backticked_after(message, "missing field ") {
        return (
            join(&field),
            format!("missing field `{field}`: it has no default, so it must be set"),
            Action::Stop,
        );
    }
    let (expected, got) = split_expected(message);
    let action = match expected.as_deref() {
        Some(e) => stand_in(e).map_or(Action::Remove, Action::Replace),
        None => Action::Remove,
    };
    (
        here,
        reason(message, expected.as_deref(), got.as_deref()),
        action,
    )
}

/// The text in backticks right after `prefix`.
fn backticked_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.split(prefix).nth(1)?.strip_prefix('`')?;
    Some(rest.split('`').next()?.to_owned())
}

/// serde's `invalid type: <got>, expected <expected>` (or `invalid value`,
/// `unknown variant`) cut into its parts.
fn split_expected(message: &str) -> (Option<String>, Option<String>) {
    let Some((head, expected)) = message.split_once(", expected ") else {
        return (None, None);
    };
    let got = head
        .strip_prefix("invalid type: ")
        .or_else(|| head.strip_prefix("invalid value: "))
        .map(str::to_owned)
        .or_else(|| head.strip_prefix("unknown variant ").map(str::to_owned));
    (Some(expected.to_owned()), got)
}

/// Duration forms an operator can copy.
const DURATION_FORMS: &str =
    "a duration like \"30s\", \"5m\", \"1h 30m\", \"250ms\" or \"2days\" (a number and a unit: ms, s, m, h, days, weeks)";

fn is_integer_type(e: &str) -> bool {
    matches!(
        e,
        "u8" | "u16"
            | "u32"
            | "u64"
            | "u128"
            | "usize"
            | "i8"
            | "i16"
            | "i32"
            | "i64"
            | "i128"
            | "isize"
    )
}

/// The reason in the operator's words.
fn reason(message: &str, expected: Option<&str>, got: Option<&str>) -> String {
    let got_text = got.map(|g| format!(", got {g}")).unwrap_or_default();
    // humantime-serde reports a bad duration as `invalid value: string
    // "5 parsecs", expected a duration` (or `invalid type` for a number).
    let duration = expected.is_some_and(|e| e.contains("a duration"));
    if duration {
        return format!("expected {DURATION_FORMS}{got_text}");
    }
    let Some(e) = expected else {
        return message.to_owned();
    };
    let words = match e {
        "f64" | "f32" => "a number like 0.8".to_owned(),
        _ if is_integer_type(e) => "a whole number like 10".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "a string" => "a string in quotes, like \"kitchen\"".to_owned(),
        "a sequence" => "a list in brackets, like [\"a\", \"b\"]".to_owned(),
        _ if e.starts_with("struct ") || e == "a map" => {
            "a table: a [section] or { key = value, ... }".to_owned()
        }
        _ if e.starts_with("one of ") || e.starts_with("variant ") => e.to_owned(),
        _ if e.starts_with("a string or") || e.starts_with("a duration") => e.to_owned(),
        other => other.to_owned(),
    };
    format!("expected {words}{got_text}")
}

/// A value of the type serde expected, for the next round.
fn stand_in(expected: &str) -> Option<DeValue<'static>> {
    let string = |s: &'static str| DeValue::String(Cow::Borrowed(s));
    Some(match expected {
        "f64" | "f32" => DeValue::Float(DeFloat::default()),
        e if is_integer_type(e) => DeValue::Integer(DeInteger::default()),
        "a boolean" => DeValue::Boolean(false),
        "a sequence" => DeValue::Array(DeArray::new()),
        e if e.contains("duration") => string("1s"),
        "a string" => string("x"),
        e if e.starts_with("struct ") || e == "a map" => DeValue::Table(DeTable::new()),
        // An enum: `a` or `b`, one of `a`, `b`, `c`.
        e if e.contains('`') => {
            let first = e.split('`').nth(1)?;
            DeValue::String(Cow::Owned(first.to_owned()))
        }
        _ => return None,
    })
}

/// Applies `action` at `segments` in `root`; false when it could not.
fn repair(root: &mut DeTable<'_>, segments: &[Segment], action: Action) -> bool {
    match action {
        Action::Stop => false,
        Action::RemoveKey(key) => {
            // The table holding the key: the path may end at the key.
            let table_segments = match segments.last() {
                Some(Segment::Map { key: k }) if *k == key => &segments[..segments.len() - 1],
                _ => segments,
            };
            match table_at(root, table_segments) {
                Some(t) => t.remove(key.as_str()).is_some(),
                None => false,
            }
        }
        Action::Replace(v) => match value_at(root, segments) {
            Some(slot) => {
                let span = slot.span();
                *slot = Spanned::new(span, v);
                true
            }
            None => false,
        },
        Action::Remove => {
            let Some((Segment::Map { key }, parent)) = segments.split_last() else {
                return false;
            };
            match table_at(root, parent) {
                Some(t) => t.remove(key.as_str()).is_some(),
                None => false,
            }
        }
    }
}

fn value_at<'a, 'i>(
    root: &'a mut DeTable<'i>,
    segments: &[Segment],
) -> Option<&'a mut Spanned<DeValue<'i>>> {
    let (first, rest) = segments.split_first()?;
    let Segment::Map { key } = first else {
        return None;
    };
    let mut v = root.get_mut(key.as_str())?;
    for s in rest {
        v = match (s, v.get_mut()) {
            (Segment::Map { key }, DeValue::Table(t)) => t.get_mut(key.as_str())?,
            (Segment::Seq { index }, DeValue::Array(a)) => a.get_mut(*index)?,
            _ => return None,
        };
    }
    Some(v)
}

fn table_at<'a, 'i>(
    root: &'a mut DeTable<'i>,
    segments: &[Segment],
) -> Option<&'a mut DeTable<'i>> {
    if segments.is_empty() {
        return Some(root);
    }
    let slot = value_at(root, segments)?;
    match Spanned::get_mut(slot) {
        DeValue::Table(t) => Some(t),
        _ => None,
    }
}

/// A problem at `offset` of `text`.
fn problem(
    text: &str,
    offset: Option<usize>,
    path: Option<String>,
    reason: String,
) -> ParseProblem {
    let Some(start) = offset.map(|o| o.min(text.len())) else {
        return ParseProblem {
            offset: None,
            position: String::new(),
            path,
            reason,
            excerpt: None,
        };
    };
    let before = text.get(..start).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text
        .get(line_start..start)
        .map_or(1, |s| s.chars().count() + 1);
    let content = text
        .get(line_start..)
        .and_then(|rest| rest.lines().next())
        .unwrap_or("")
        .trim_end()
        .to_owned();
    ParseProblem {
        offset: Some(start),
        position: format!("line {line}, column {column}: "),
        path: path.filter(|p| !p.is_empty()),
        reason,
        excerpt: (!content.is_empty()).then_some((line, content)),
    }
}

/// The dotted key whose value a syntax error at `offset` points at
/// (`nats.connect_timeout`), when it is in the value part of a
/// `key = value` line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = offset.min(text.len());
    let before = text.get(..start)?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let content = text.get(line_start..)?.lines().next()?;
    let column = text.get(line_start..start)?.chars().count() + 1;
    let eq = content.find('=')?;
    if column <= content.get(..eq)?.chars().count() + 1 {
        return None;
    }
    let key = content.get(..eq)?.trim();
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => panic!("expected problems in:\n{text}"),
            Err(ps) => ps.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn every_type_and_unknown_field_error_at_once_in_file_order() {
        let text = r#"site = "home"
[nats]
urll = "nats://127.0.0.1:4222"
connect_timeout = 5
[mqtt.m]
port = "1883"
[[mqtt.m.topics]]
filter = "t/+"
sensor = "{1}"
[zones.kitchen]
prior = "high"
[[zones.kitchen.evidence]]
sensor = "a"
p_true = 0.9
p_false = 0.1
[[zones.kitchen.evidence]]
sensor = "b"
p_true = "0.8"
p_false = 0.1
colour = "red"
"#;
        let ps = problems(text);
        let want = [
            "line 3, column 1: `nats.urll`: unknown field `urll`",
            "line 4, column 19: `nats.connect_timeout`: expected a duration like \"30s\"",
            "line 6, column 8: `mqtt.m.port`: expected a whole number like 10, got string \"1883\"",
            "line 11, column 9: `zones.kitchen.prior`: expected a number like 0.8, got string \"high\"",
            "line 18, column 10: `zones.kitchen.evidence[1].p_true`: expected a number like 0.8, got string \"0.8\"",
            "line 20, column 1: `zones.kitchen.evidence[1].colour`: unknown field `colour`",
        ];
        assert_eq!(ps.len(), want.len(), "{ps:#?}");
        for (p, w) in ps.iter().zip(want) {
            assert!(p.starts_with(w), "{p:?} should start with {w:?}");
        }
        assert!(ps[0].contains("\n    3 | urll = "), "{}", ps[0]);
    }

    #[test]
    fn duration_errors_show_the_forms() {
        let ps = problems("site = \"home\"\n[nats]\nconnect_timeout = \"5 parsecs\"\n");
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert!(
            ps[0].starts_with("line 3, column 19: `nats.connect_timeout`: expected a duration like \"30s\", \"5m\", \"1h 30m\""),
            "{}",
            ps[0]
        );
        assert!(ps[0].contains("parsecs"), "names what was wrong: {}", ps[0]);
    }

    #[test]
    fn syntax_errors_are_all_reported_with_the_type_errors() {
        let ps = problems("site = 5\n[zones\nprior = 0.5\n[nats]\nurl = \n");
        assert!(ps.len() >= 2, "{ps:#?}");
        assert!(
            ps[0].starts_with("line 1, column 8: `site`: expected a string in quotes"),
            "{ps:#?}"
        );
        assert!(ps.iter().any(|p| p.starts_with("line 2,")), "{ps:#?}");
        assert!(ps.iter().any(|p| p.starts_with("line 5,")), "{ps:#?}");
        let lines: Vec<usize> = ps
            .iter()
            .map(|p| {
                p["line ".len()..]
                    .split(',')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(lines, sorted, "file order: {ps:#?}");
    }

    #[test]
    fn enums_and_booleans_in_the_users_words() {
        let ps = problems(
            "site = \"home\"\n[serial.s]\ndevice = \"/dev/x\"\nframing = \"ld2411\"\nchanges_only = \"yes\"\n",
        );
        assert_eq!(ps.len(), 2, "{ps:#?}");
        assert!(
            ps[0].starts_with("line 4, column 11: `serial.s.framing`: expected `ld2410` or `json_lines`, got `ld2411`"),
            "{}",
            ps[0]
        );
        assert!(
            ps[1].starts_with("line 5, column 16: `serial.s.changes_only`: expected true or false"),
            "{}",
            ps[1]
        );
    }

    #[test]
    fn a_missing_required_field_is_named_with_its_path() {
        let ps = problems(
            "site = \"home\"\n[[zones.k.evidence]]\nsensor = \"a\"\np_true = 0.9\np_false = 0.1\n[[zones.k.evidence]]\nsensor = \"b\"\np_false = 0.1\n",
        );
        assert_eq!(ps.len(), 1, "{ps:#?}");
        assert!(
            ps[0].contains("`zones.k.evidence[1].p_true`: missing field `p_true`"),
            "{}",
            ps[0]
        );
    }

    #[test]
    fn a_valid_file_parses() {
        assert!(parse("site = \"home\"\n").is_ok());
    }
}
