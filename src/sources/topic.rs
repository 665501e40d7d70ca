//! MQTT topic filters with `+`/`#` and their captures, and the sensor id
//! templates (`{1}_motion`) that turn captured topic levels into sensor ids.
//!
//! One mapping can then serve every device under a prefix, while each
//! reading still lands on its own sensor subject.

use crate::naming;
use std::fmt;

/// MQTT caps topic names and filters at 65535 bytes (a u16 length prefix).
const MAX_TOPIC_LEN: usize = 65_535;

/// Why a topic filter, sensor template or mapping was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic filter is empty")]
    Empty,
    #[error("topic filter is {len} bytes long; MQTT allows at most 65535")]
    TooLong { len: usize },
    #[error("topic filter {filter:?} contains a NUL character")]
    Nul { filter: String },
    #[error("topic filter {filter:?}, level {level} ({text:?}): {reason}")]
    Level {
        filter: String,
        /// 1-based, as an operator counts levels.
        level: usize,
        text: String,
        reason: &'static str,
    },
    #[error("sensor template {template:?}: {reason}")]
    Template { template: String, reason: String },
    /// Any of the above, with the config entry it came from.
    #[error("{at}: {error}")]
    At { at: String, error: Box<TopicError> },
}

impl TopicError {
    /// Says which config entry the error belongs to.
    pub fn at(self, at: impl Into<String>) -> TopicError {
        TopicError::At {
            at: at.into(),
            error: Box::new(self),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `+`: exactly one level.
    Single,
    /// `#`: the rest, including none (the parent level itself).
    Multi,
}

/// A validated MQTT topic filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicFilter {
    text: String,
    levels: Vec<Level>,
}

impl TopicFilter {
    /// Accepts what a broker accepts: `+` and `#` only as whole levels,
    /// `#` only last. Empty levels (`a//b`, `/a`) are legal MQTT.
    pub fn parse(filter: &str) -> Result<TopicFilter, TopicError> {
        if filter.is_empty() {
            return Err(TopicError::Empty);
        }
        if filter.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong { len: filter.len() });
        }
        if filter.contains('\0') {
            return Err(TopicError::Nul {
                filter: filter.to_owned(),
            });
        }
        let parts: Vec<&str> = filter.split('/').collect();
        let last = parts.len() - 1;
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let bad = |reason: &'static str| TopicError::Level {
                filter: filter.to_owned(),
                level: i + 1,
                text: (*part).to_owned(),
                reason,
            };
            let level = match *part {
                "+" => Level::Single,
                "#" if i == last => Level::Multi,
                "#" => return Err(bad("`#` must be the last level")),
                p if p.contains('#') => return Err(bad("`#` must stand alone as a whole level")),
                p if p.contains('+') => return Err(bad("`+` must stand alone as a whole level")),
                p => Level::Literal(p.to_owned()),
            };
            levels.push(level);
        }
        Ok(TopicFilter {
            text: filter.to_owned(),
            levels,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// How many `{n}` a sensor template of this filter may use.
    pub fn wildcards(&self) -> usize {
        self.levels
            .iter()
            .filter(|l| !matches!(l, Level::Literal(_)))
            .count()
    }

    /// Matches `topic` and returns what each wildcard matched, in order.
    /// `#` captures the rest joined with `/`, or `""` when it matches the
    /// parent level. As MQTT requires, a filter starting with a wildcard
    /// does not match `$`-topics (broker internals such as `$SYS`).
    pub fn captures<'t>(&self, topic: &'t str) -> Option<Vec<&'t str>> {
        if topic.contains(['+', '#']) {
            return None;
        }
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(Level::Literal(_))) {
            return None;
        }
        let mut caps = Vec::new();
        // Byte offset in `topic` of the level being matched; None once the
        // topic has no levels left.
        let mut pos = Some(0usize);
        for level in &self.levels {
            match level {
                Level::Multi => {
                    caps.push(pos.map_or("", |p| &topic[p..]));
                    return Some(caps);
                }
                Level::Single | Level::Literal(_) => {
                    let start = pos?;
                    let rest = &topic[start..];
                    let (text, next) = match rest.find('/') {
                        Some(i) => (&rest[..i], Some(start + i + 1)),
                        None => (rest, None),
                    };
                    match level {
                        Level::Single => caps.push(text),
                        Level::Literal(l) if l == text => {}
                        _ => return None,
                    }
                    pos = next;
                }
            }
        }
        // Every filter level used; the topic must be used up too.
        if pos.is_none() {
            Some(caps)
        } else {
            None
        }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// 0-based index into the captures (`{1}` is 0).
    Capture(usize),
}

/// A sensor id with `{n}` placeholders for the filter's captures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SensorTemplate {
    text: String,
    pieces: Vec<Piece>,
}

impl SensorTemplate {
    /// Checks everything that can be checked before any message arrives:
    /// placeholders refer to existing wildcards, literal text uses only id
    /// characters, and a template without placeholders is a valid id.
    pub fn parse(t: &str, wildcards: usize) -> Result<Self, TopicError> {
        let bad = |reason: String| TopicError::Template {
            template: t.to_owned(),
            reason,
        };
        let mut pieces = Vec::new();
        let mut rest = t;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let close = after
                    .find('}')
                    .ok_or_else(|| bad("`{` without a closing `}`".into()))?;
                let inner = &after[..close];
                let n: usize = inner.parse().map_err(|_| {
                    bad(format!(
                        "`{{{inner}}}` is not a placeholder; use {{1}}, {{2}}, ..."
                    ))
                })?;
                if n == 0 || n > wildcards {
                    return Err(bad(format!(
                        "`{{{n}}}` refers to wildcard {n}, but the filter has {wildcards}"
                    )));
                }
                pieces.push(Piece::Capture(n - 1));
                rest = &after[close + 1..];
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let text = &rest[..end];
                if text.contains('}') {
                    return Err(bad("`}` without an opening `{`".into()));
                }
                if let Some(c) = text.chars().find(|c| !naming::is_token(&c.to_string())) {
                    return Err(bad(format!(
                        "character {c:?} cannot appear in a sensor id; use [a-z0-9_-]"
                    )));
                }
                pieces.push(Piece::Text(text.to_owned()));
                rest = &rest[end..];
            }
        }
        let template = SensorTemplate {
            text: t.to_owned(),
            pieces,
        };
        if template.is_static() && !naming::is_token(t) {
            return Err(bad(
                "not a valid sensor id: use [a-z0-9_-], 1 to 64 characters".into(),
            ));
        }
        Ok(template)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether rendering could give `sensor`, each capture standing for
    /// one or more id characters: how config checks see that some mapping
    /// produces the sensor an evidence rule names.
    pub fn can_produce(&self, sensor: &str) -> bool {
        fn matches(pieces: &[Piece], sensor: &str) -> bool {
            match pieces.split_first() {
                None => sensor.is_empty(),
                Some((Piece::Text(text), rest)) => sensor
                    .strip_prefix(text.as_str())
                    .is_some_and(|tail| matches(rest, tail)),
                Some((Piece::Capture(_), rest)) => (1..=sensor.len()).any(|n| {
                    sensor.is_char_boundary(n)
                        && naming::is_token(&sensor[..n])
                        && matches(rest, &sensor[n..])
                }),
            }
        }
        matches(&self.pieces, sensor)
    }

    /// True when the template has no placeholders: every message of the
    /// mapping goes to the same sensor.
    pub fn is_static(&self) -> bool {
        !self.pieces.iter().any(|p| matches!(p, Piece::Capture(_)))
    }

    /// Fills in the captures. The error is a whole sentence for the
    /// rejection record, because the bad part comes from a device's topic,
    /// not from the config.
    pub fn render(&self, captures: &[&str]) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Capture(i) => match captures.get(*i) {
                    Some(c) => out.push_str(c),
                    None => {
                        return Err(format!(
                            "sensor template {:?} needs capture {{{}}} but the topic gave {}",
                            self.text,
                            i + 1,
                            captures.len()
                        ))
                    }
                },
            }
        }
        if naming::is_token(&out) {
            Ok(out)
        } else {
            Err(format!(
                "sensor id {out:?} from topic levels is invalid: use [a-z0-9_-], 1 to 64 characters, no dots"
            ))
        }
    }
}

impl fmt::Display for SensorTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_know_which_sensors_they_can_produce() {
        let t = SensorTemplate::parse("{1}_motion", 1).unwrap();
        assert!(t.can_produce("hall_motion"));
        assert!(t.can_produce("a_b_motion"));
        assert!(!t.can_produce("_motion"), "a capture is never empty");
        assert!(!t.can_produce("hall_temp"));
        let t = SensorTemplate::parse("{1}-{2}", 2).unwrap();
        assert!(t.can_produce("a-b"));
        assert!(!t.can_produce("ab"));
        assert!(!t.can_produce("A-b"), "captures are id characters");
        let t = SensorTemplate::parse("pir", 0).unwrap();
        assert!(t.can_produce("pir") && !t.can_produce("pir2"));
    }

    fn caps(filter: &str, topic: &str) -> Option<Vec<String>> {
        TopicFilter::parse(filter)
            .unwrap()
            .captures(topic)
            .map(|v| v.into_iter().map(str::to_owned).collect())
    }

    #[test]
    fn valid_filters_parse() {
        for f in [
            "a", "a/b", "+", "#", "a/+/c", "a/#", "+/+/#", "/a", "a//b", "a/",
        ] {
            assert_eq!(TopicFilter::parse(f).unwrap().as_str(), f);
        }
    }

    #[test]
    fn invalid_filters_say_which_level_and_why() {
        let e = TopicFilter::parse("a/#/c").unwrap_err();
        assert_eq!(
            e.to_string(),
            r##"topic filter "a/#/c", level 2 ("#"): `#` must be the last level"##
        );
        let e = TopicFilter::parse("a/b+/c").unwrap_err();
        assert!(matches!(e, TopicError::Level { level: 2, .. }), "{e}");
        assert!(e.to_string().contains("`+` must stand alone"), "{e}");
        let e = TopicFilter::parse("x/y/z#").unwrap_err();
        assert!(matches!(e, TopicError::Level { level: 3, .. }), "{e}");
        assert_eq!(TopicFilter::parse("").unwrap_err(), TopicError::Empty);
        assert!(matches!(
            TopicFilter::parse("a\0b").unwrap_err(),
            TopicError::Nul { .. }
        ));
        assert!(matches!(
            TopicFilter::parse(&"a".repeat(70_000)).unwrap_err(),
            TopicError::TooLong { len: 70_000 }
        ));
    }

    #[test]
    fn wildcard_count() {
        assert_eq!(TopicFilter::parse("a/b").unwrap().wildcards(), 0);
        assert_eq!(TopicFilter::parse("+/b/+/#").unwrap().wildcards(), 3);
    }

    #[test]
    fn literal_matching() {
        assert_eq!(caps("a/b", "a/b"), Some(vec![]));
        assert_eq!(caps("a/b", "a/b/c"), None);
        assert_eq!(caps("a/b", "a"), None);
        assert_eq!(caps("a/b", "a/c"), None);
        assert_eq!(caps("a//b", "a//b"), Some(vec![]));
        assert_eq!(caps("a/", "a"), None);
        assert_eq!(caps("a/", "a/"), Some(vec![]));
    }

    #[test]
    fn single_level_wildcard() {
        assert_eq!(caps("z/+/state", "z/hall/state"), Some(vec!["hall".into()]));
        assert_eq!(caps("z/+/state", "z//state"), Some(vec!["".into()]));
        assert_eq!(caps("z/+/state", "z/a/b/state"), None);
        assert_eq!(caps("z/+", "z"), None);
        assert_eq!(
            caps("+/+", "a/b"),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
    }

    #[test]
    fn multi_level_wildcard() {
        assert_eq!(caps("a/#", "a/b/c"), Some(vec!["b/c".into()]));
        assert_eq!(caps("a/#", "a"), Some(vec!["".into()]));
        assert_eq!(caps("a/#", "a/"), Some(vec!["".into()]));
        assert_eq!(caps("a/#", "b"), None);
        assert_eq!(caps("#", "x/y"), Some(vec!["x/y".into()]));
        assert_eq!(
            caps("+/x/#", "p/x/q/r"),
            Some(vec!["p".to_owned(), "q/r".to_owned()])
        );
    }

    #[test]
    fn dollar_topics_need_a_literal_first_level() {
        assert_eq!(caps("#", "$SYS/broker"), None);
        assert_eq!(caps("+/broker", "$SYS/broker"), None);
        assert_eq!(caps("$SYS/#", "$SYS/broker"), Some(vec!["broker".into()]));
    }

    #[test]
    fn topics_with_wildcards_never_match() {
        assert_eq!(caps("#", "a/+"), None);
        assert_eq!(caps("a/+", "a/#"), None);
    }

    #[test]
    fn templates_render_captures() {
        let t = SensorTemplate::parse("{1}_motion", 1).unwrap();
        assert!(!t.is_static());
        assert_eq!(t.render(&["hall"]).unwrap(), "hall_motion");
        let t = SensorTemplate::parse("{2}-{1}", 2).unwrap();
        assert_eq!(t.render(&["a", "b"]).unwrap(), "b-a");
        let t = SensorTemplate::parse("pir", 0).unwrap();
        assert!(t.is_static());
        assert_eq!(t.render(&[]).unwrap(), "pir");
    }

    #[test]
    fn rendered_ids_are_checked() {
        let t = SensorTemplate::parse("{1}_motion", 1).unwrap();
        let e = t.render(&["Living Room"]).unwrap_err();
        assert!(
            e.starts_with(r#"sensor id "Living Room_motion" from topic levels is invalid"#),
            "{e}"
        );
        assert!(t.render(&["a.b"]).is_err());
        let t = SensorTemplate::parse("{1}", 1).unwrap();
        assert!(t.render(&[""]).is_err(), "empty id");
        assert!(t.render(&[]).unwrap_err().contains("needs capture {1}"));
    }

    #[test]
    fn bad_templates_are_refused_at_parse() {
        for (t, w, why) in [
            ("{2}_x", 1, "refers to wildcard 2, but the filter has 1"),
            ("{0}", 1, "refers to wildcard 0"),
            ("{a}", 1, "is not a placeholder"),
            ("{1", 1, "without a closing"),
            ("x}", 1, "without an opening"),
            ("Hall_{1}", 1, "character 'H'"),
            ("a.b", 0, "character '.'"),
            ("", 0, "not a valid sensor id"),
        ] {
            let e = SensorTemplate::parse(t, w).unwrap_err();
            assert!(e.to_string().contains(why), "{t}: {e}");
        }
    }

    #[test]
    fn at_names_the_entry() {
        let e = TopicError::Empty.at("topics[3].filter");
        assert_eq!(e.to_string(), "topics[3].filter: topic filter is empty");
    }
}
