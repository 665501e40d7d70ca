//! Labelled time: intervals during which someone knows whether a zone was
//! occupied. Three sources, in the order a user would trust them: a CSV
//! file written by hand, the manual overrides recorded in `EVENTS`, or a
//! reference sensor (a radar zone, say) taken as the truth.

use super::{Manual, Record};
use crate::engine::Presence;
use crate::observation::Reading;
use crate::time::Timestamp;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One labelled interval `[start, end)` of a zone.
#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub zone: String,
    pub start: Timestamp,
    pub end: Timestamp,
    pub occupied: bool,
}

/// One problem of a labels file, with the line it is on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LabelProblem {
    pub line: usize,
    pub reason: String,
}

/// Every problem of a labels file; none of its labels are used.
#[derive(Debug, thiserror::Error)]
pub struct LabelErrors {
    pub file: String,
    pub problems: Vec<LabelProblem>,
}

impl fmt::Display for LabelErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} problem(s), no label used:",
            self.file,
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  {}: {p}", self.file)?;
        }
        Ok(())
    }
}

/// Parses a labels CSV: `zone,start,end,occupied|vacant` per line, times in
/// RFC 3339; blank lines, `#` comments and a `zone,start,end,state` header
/// are skipped. Every problem is reported with its line; a file with any
/// problem yields no labels at all.
pub fn parse_csv(
    file: &str,
    text: &str,
    zones: &BTreeSet<String>,
) -> Result<Vec<Label>, LabelErrors> {
    let mut problems = Vec::new();
    let mut labels: Vec<(usize, Label)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let row = raw.trim();
        if row.is_empty() || row.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = row.split(',').map(str::trim).collect();
        if fields
            .first()
            .is_some_and(|f| f.eq_ignore_ascii_case("zone"))
        {
            continue;
        }
        let mut bad = |reason: String| problems.push(LabelProblem { line, reason });
        let [zone, start, end, state] = fields[..] else {
            bad(format!(
                "expected 4 fields (zone,start,end,occupied|vacant), found {}",
                fields.len()
            ));
            continue;
        };
        let mut ok = true;
        if !zones.contains(zone) {
            bad(format!(
                "unknown zone {zone:?} (configured: {})",
                zones.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
            ok = false;
        }
        let start_t = Timestamp::parse_rfc3339(start);
        if let Err(e) = &start_t {
            bad(format!(
                "bad start time {start:?}: {e} (want RFC 3339, e.g. 2026-12-01T08:00:00Z)"
            ));
            ok = false;
        }
        let end_t = Timestamp::parse_rfc3339(end);
        if let Err(e) = &end_t {
            bad(format!(
                "bad end time {end:?}: {e} (want RFC 3339, e.g. 2026-12-01T09:30:00Z)"
            ));
            ok = false;
        }
        let occupied = match state {
            "occupied" => Some(true),
            "vacant" => Some(false),
            other => {
                bad(format!(
                    "state {other:?} is neither \"occupied\" nor \"vacant\""
                ));
                None
            }
        };
        let (Ok(start_t), Ok(end_t), Some(occupied)) = (start_t, end_t, occupied) else {
            continue;
        };
        if end_t <= start_t {
            bad(format!("end {end} is not after start {start}"));
            continue;
        }
        if ok {
            labels.push((
                line,
                Label {
                    zone: zone.to_owned(),
                    start: start_t,
                    end: end_t,
                    occupied,
                },
            ));
        }
    }
    // Per zone, in file order: each interval must start at or after the
    // end of the one before.
    let mut last: BTreeMap<&str, (usize, Timestamp, Timestamp)> = BTreeMap::new();
    for (line, l) in &labels {
        if let Some((prev_line, prev_start, prev_end)) = last.get(l.zone.as_str()) {
            if l.start < *prev_start {
                problems.push(LabelProblem {
                    line: *line,
                    reason: format!(
                        "zone {}: starts at {}, before the interval of line {prev_line} (labels of a zone must be in time order)",
                        l.zone, l.start
                    ),
                });
            } else if l.start < *prev_end {
                problems.push(LabelProblem {
                    line: *line,
                    reason: format!(
                        "zone {}: overlaps the interval of line {prev_line} (which ends at {prev_end})",
                        l.zone
                    ),
                });
            }
        }
        last.insert(l.zone.as_str(), (*line, l.start, l.end));
    }
    if problems.is_empty() {
        Ok(labels.into_iter().map(|(_, l)| l).collect())
    } else {
        problems.sort_by_key(|p| p.line);
        Err(LabelErrors {
            file: file.to_owned(),
            problems,
        })
    }
}

/// Labels from manual overrides: the zone was what the person said from
/// the override until it ended (its `until`, or an earlier clear or
/// override of the same zone).
pub fn from_overrides(manual: &[Manual], to: Timestamp) -> Vec<Label> {
    let mut by_zone: BTreeMap<&str, Vec<&Manual>> = BTreeMap::new();
    for m in manual {
        by_zone.entry(m.zone()).or_default().push(m);
    }
    let mut out = Vec::new();
    for (zone, mut list) in by_zone {
        list.sort_by_key(|m| m.at());
        for (i, m) in list.iter().enumerate() {
            let Manual::Override {
                at, state, until, ..
            } = m
            else {
                continue;
            };
            let next = list.get(i + 1).map_or(to, |n| n.at());
            let end = (*until).min(next).min(to);
            if end > *at {
                out.push(Label {
                    zone: zone.to_owned(),
                    start: *at,
                    end,
                    occupied: *state == Presence::Occupied,
                });
            }
        }
    }
    out
}

/// Labels from a reference sensor the user trusts: the zone is occupied
/// from a truthy reading of `sensor` to its next reading, vacant from a
/// false one; the last reading holds until `to`.
pub fn from_reference(zone: &str, sensor: &str, records: &[Record], to: Timestamp) -> Vec<Label> {
    let mut out: Vec<Label> = Vec::new();
    let readings: Vec<&Record> = records.iter().filter(|r| r.sensor == sensor).collect();
    for (i, r) in readings.iter().enumerate() {
        let end = readings.get(i + 1).map_or(to, |n| n.at).min(to);
        if end <= r.at {
            continue;
        }
        let occupied = match r.value {
            Reading::Bool(b) => b,
            Reading::Number(x) => x != 0.0,
        };
        match out.last_mut() {
            Some(prev) if prev.occupied == occupied && prev.end == r.at => prev.end = end,
            _ => out.push(Label {
                zone: zone.to_owned(),
                start: r.at,
                end,
                occupied,
            }),
        }
    }
    out
}

/// Whether `zone` is labelled at `t`, and how.
pub fn label_at(labels: &[Label], t: Timestamp) -> Option<bool> {
    labels
        .iter()
        .find(|l| l.start <= t && t < l.end)
        .map(|l| l.occupied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zones() -> BTreeSet<String> {
        ["kitchen", "hall"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_good_file_parses_with_header_and_comments() {
        let text = "zone,start,end,state\n# a comment\n\nkitchen,2026-12-01T08:00:00Z,2026-12-01T09:00:00Z,occupied\nkitchen,2026-12-01T09:00:00Z,2026-12-01T10:00:00Z,vacant\nhall,2026-12-01T08:30:00Z,2026-12-01T09:00:00Z,vacant\n";
        let labels = parse_csv("l.csv", text, &zones()).unwrap();
        assert_eq!(labels.len(), 3);
        assert!(labels[0].occupied && !labels[1].occupied);
        assert_eq!(labels[0].end, labels[1].start);
    }

    #[test]
    fn every_problem_is_named_with_its_line_and_nothing_is_used() {
        let text = "\
kitchen,2026-12-01T08:00:00Z,2026-12-01T09:00:00Z,occupied
attic,2026-12-01T08:00:00Z,2026-12-01T09:00:00Z,occupied
kitchen,2026-12-01T08:30:00Z,2026-12-01T09:30:00Z,vacant
kitchen,yesterday,2026-12-01T09:30:00Z,vacant
hall,2026-12-01T09:00:00Z,2026-12-01T08:00:00Z,vacant
hall,2026-12-01T10:00:00Z,2026-12-01T11:00:00Z,maybe
kitchen,2026-12-01T07:00:00Z,2026-12-01T07:30:00Z,vacant
hall,2026-12-01T10:00:00Z
";
        let err = parse_csv("l.csv", text, &zones()).unwrap_err();
        let lines: Vec<usize> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7, 8], "{err}");
        let text = err.to_string();
        assert!(text.contains("unknown zone \"attic\""), "{text}");
        assert!(
            text.contains("line 3: zone kitchen: overlaps the interval of line 1"),
            "{text}"
        );
        assert!(text.contains("bad start time \"yesterday\""), "{text}");
        assert!(text.contains("line 5: end"), "{text}");
        assert!(text.contains("\"maybe\""), "{text}");
        assert!(text.contains("line 7: zone kitchen: starts at"), "{text}");
        assert!(text.contains("expected 4 fields"), "{text}");
        assert!(text.contains("no label used"), "{text}");
    }

    #[test]
    fn overrides_label_until_they_end_or_are_replaced() {
        let m = |at: i64, until: i64, state| Manual::Override {
            zone: "kitchen".into(),
            at: Timestamp(at),
            state,
            until: Timestamp(until),
            by: "me".into(),
            reason: None,
        };
        let manual = vec![
            m(1000, 5000, Presence::Occupied),
            m(3000, 9000, Presence::Vacant),
            Manual::Clear {
                zone: "kitchen".into(),
                at: Timestamp(4000),
                by: "me".into(),
            },
        ];
        let labels = from_overrides(&manual, Timestamp(100_000));
        assert_eq!(labels.len(), 2);
        assert_eq!(
            (labels[0].start.0, labels[0].end.0, labels[0].occupied),
            (1000, 3000, true)
        );
        assert_eq!(
            (labels[1].start.0, labels[1].end.0, labels[1].occupied),
            (3000, 4000, false)
        );
    }

    #[test]
    fn a_reference_sensor_labels_between_its_readings() {
        let r = |seq, at, v| Record {
            seq,
            sensor: "radar".into(),
            value: Reading::Bool(v),
            at: Timestamp(at),
        };
        let records = vec![
            r(1, 0, false),
            r(2, 10, true),
            r(3, 20, true),
            r(4, 30, false),
        ];
        let labels = from_reference("kitchen", "radar", &records, Timestamp(50));
        let spans: Vec<(i64, i64, bool)> = labels
            .iter()
            .map(|l| (l.start.0, l.end.0, l.occupied))
            .collect();
        assert_eq!(spans, [(0, 10, false), (10, 30, true), (30, 50, false)]);
        assert_eq!(label_at(&labels, Timestamp(15)), Some(true));
        assert_eq!(label_at(&labels, Timestamp(60)), None);
    }
}
