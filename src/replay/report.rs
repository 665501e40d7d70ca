//! `presenced report`: one self-contained HTML file with a picture of
//! every zone over a replayed range.
//!
//! Inline SVG and CSS only: no script, no font, no image, no address of
//! anything elsewhere, so it opens on an offline appliance and in a mail
//! attachment alike. Per zone: confidence against the two thresholds, the
//! state bands, transitions and overrides, each evidence rule's
//! contribution (its likelihood ratio, on a log scale), the labels when
//! there are any, and the tune suggestions when they were computed.

use super::labels::Label;
use super::tune::{Effect, ZoneEstimate};
use super::{Outcome, TracePoint};
use crate::engine::{Model, Presence, ZoneModel};
use crate::time::Timestamp;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Plot geometry, in SVG user units.
const W: f64 = 960.0;
const LEFT: f64 = 40.0;
const PLOT_W: f64 = W - LEFT - 10.0;
const CONF_H: f64 = 160.0;
const TOP: f64 = 14.0;
const EV_H: f64 = 90.0;

/// Colours, also what the browser test looks for in the screenshot.
pub const OCCUPIED_FILL: &str = "#f4a259";
const ARRIVING_FILL: &str = "#fbe3c6";
const LABEL_FILL: &str = "#3d9970";
const LINE: &str = "#1f3b73";
const RULE_COLOURS: [&str; 6] = [
    "#0074d9", "#b10dc9", "#2ecc40", "#ff4136", "#39cccc", "#85144b",
];

/// What the report shows beside the replay.
pub struct Extras<'a> {
    pub site: &'a str,
    pub config_name: &'a str,
    pub labels: &'a [Label],
    pub estimates: Option<&'a BTreeMap<String, ZoneEstimate>>,
    pub before: Option<&'a BTreeMap<String, Effect>>,
    pub after: Option<&'a BTreeMap<String, Effect>>,
    pub diff: Option<&'a str>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Scale {
    from: i64,
    to: i64,
}

impl Scale {
    fn x(&self, t: Timestamp) -> f64 {
        let span = (self.to - self.from).max(1) as f64;
        LEFT + ((t.0 - self.from) as f64 / span).clamp(0.0, 1.0) * PLOT_W
    }
}

/// Per pixel column, the lowest and highest value seen, as a step line:
/// a week of readings stays a few thousand points and keeps its spikes.
fn polyline(points: &[(f64, f64)]) -> String {
    let mut cols: Vec<(i64, f64, f64, f64)> = Vec::new();
    for &(x, y) in points {
        let col = x.round() as i64;
        match cols.last_mut() {
            Some(c) if c.0 == col => {
                c.1 = c.1.min(y);
                c.2 = c.2.max(y);
                c.3 = y;
            }
            _ => cols.push((col, y, y, y)),
        }
    }
    let mut s = String::new();
    let mut last_y: Option<f64> = None;
    for (col, lo, hi, end) in cols {
        let x = col as f64;
        if let Some(prev) = last_y {
            let _ = write!(s, "{x:.1},{prev:.1} ");
        }
        let _ = write!(s, "{x:.1},{lo:.1} {x:.1},{hi:.1} {x:.1},{end:.1} ");
        last_y = Some(end);
    }
    s.trim_end().to_owned()
}

fn y_conf(c: f64) -> f64 {
    TOP + (1.0 - c.clamp(0.0, 1.0)) * CONF_H
}

fn y_lr(lr: f64) -> f64 {
    let l = if lr > 0.0 {
        lr.log10().clamp(-2.0, 2.0)
    } else {
        -2.0
    };
    TOP + (2.0 - l) / 4.0 * EV_H
}

/// The state bands of a zone: (start, end, state) from its transitions.
fn bands(outcome: &Outcome, zone: &str) -> Vec<(Timestamp, Timestamp, Presence)> {
    let Some(z) = outcome.zones.get(zone) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut state = z.transitions.first().map_or(Presence::Vacant, |t| t.from);
    let mut since = outcome.from;
    for t in &z.transitions {
        out.push((since, t.at, state));
        state = t.to;
        since = t.at;
    }
    out.push((since, outcome.to, state));
    out
}

fn zone_svg(
    s: &mut String,
    name: &str,
    zm: &ZoneModel,
    outcome: &Outcome,
    trace: &[TracePoint],
    labels: &[&Label],
) {
    let sc = Scale {
        from: outcome.from.0,
        to: outcome.to.0,
    };
    let h = TOP + CONF_H + 24.0;
    let _ = writeln!(
        s,
        r#"<svg class="timeline" data-zone="{}" width="{W}" height="{h}" viewBox="0 0 {W} {h}" role="img" aria-label="confidence of {}">"#,
        esc(name),
        esc(name)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{CONF_H}" fill="#ffffff" stroke="#cccccc"/>"##
    );
    for (a, b, state) in bands(outcome, name) {
        let (fill, class) = match state {
            Presence::Occupied | Presence::Leaving => (OCCUPIED_FILL, "band occupied"),
            Presence::Arriving => (ARRIVING_FILL, "band arriving"),
            Presence::Vacant => continue,
        };
        let (x0, x1) = (sc.x(a), sc.x(b));
        let _ = writeln!(
            s,
            r#"<rect class="{class}" x="{x0:.1}" y="{TOP}" width="{:.1}" height="{CONF_H}" fill="{fill}"><title>{} {} to {}</title></rect>"#,
            (x1 - x0).max(1.0),
            state.as_str(),
            a,
            b
        );
    }
    for l in labels {
        let (x0, x1) = (sc.x(l.start), sc.x(l.end));
        if l.occupied {
            let _ = writeln!(
                s,
                r#"<rect class="label occupied" x="{x0:.1}" y="{:.1}" width="{:.1}" height="6" fill="{LABEL_FILL}"><title>labelled occupied {} to {}</title></rect>"#,
                TOP - 8.0,
                (x1 - x0).max(1.0),
                l.start,
                l.end
            );
        }
    }
    for (value, class, label) in [
        (zm.occupied_above, "threshold occupied", "occupied_above"),
        (zm.vacant_below, "threshold vacant", "vacant_below"),
    ] {
        let y = y_conf(value);
        let _ = writeln!(
            s,
            r##"<line class="{class}" x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#888888" stroke-dasharray="6 4"><title>{label} {value}</title></line>"##,
            LEFT + PLOT_W
        );
    }
    let points: Vec<(f64, f64)> = trace
        .iter()
        .map(|p| (sc.x(p.at), y_conf(p.confidence)))
        .collect();
    let _ = writeln!(
        s,
        r#"<polyline class="confidence" fill="none" stroke="{LINE}" stroke-width="1.5" points="{}"/>"#,
        polyline(&points)
    );
    if let Some(z) = outcome.zones.get(name) {
        for t in &z.transitions {
            let x = sc.x(t.at);
            let (class, colour) = if t.cause.is_some() {
                ("transition override", "#ff4136")
            } else {
                ("transition", "#333333")
            };
            let _ = writeln!(
                s,
                r#"<line class="{class}" x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="1"><title>#{} {} -&gt; {} at {}</title></line>"#,
                TOP + CONF_H,
                TOP + CONF_H + 6.0,
                t.number,
                t.from.as_str(),
                t.to.as_str(),
                t.at
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="4" y="{:.1}">1</text><text x="4" y="{:.1}">0</text><text x="{LEFT}" y="{:.1}">{}</text><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text></svg>"#,
        TOP + 4.0,
        TOP + CONF_H,
        h - 2.0,
        outcome.from,
        LEFT + PLOT_W,
        h - 2.0,
        outcome.to
    );
    // Evidence: each rule's likelihood ratio, log scale from 1/100 to 100.
    let h = TOP + EV_H + 8.0;
    let _ = writeln!(
        s,
        r#"<svg class="evidence" data-zone="{}" width="{W}" height="{h}" viewBox="0 0 {W} {h}" role="img" aria-label="evidence of {}">"#,
        esc(name),
        esc(name)
    );
    let mid = y_lr(1.0);
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{EV_H}" fill="#ffffff" stroke="#cccccc"/><line x1="{LEFT}" x2="{:.1}" y1="{mid:.1}" y2="{mid:.1}" stroke="#cccccc"/><text x="4" y="{:.1}">×100</text><text x="4" y="{:.1}">×1</text><text x="4" y="{:.1}">÷100</text>"##,
        LEFT + PLOT_W,
        TOP + 8.0,
        mid + 4.0,
        TOP + EV_H
    );
    for (i, rule) in zm.rules.iter().enumerate() {
        let colour = RULE_COLOURS[i % RULE_COLOURS.len()];
        let points: Vec<(f64, f64)> = trace
            .iter()
            .filter_map(|p| p.lr.get(i).map(|lr| (sc.x(p.at), y_lr(*lr))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline class="rule" data-sensor="{}" fill="none" stroke="{colour}" stroke-width="1.2" points="{}"><title>evidence[{i}] {}</title></polyline>"#,
            esc(&rule.sensor),
            polyline(&points),
            esc(&rule.sensor)
        );
    }
    let _ = writeln!(s, "</svg>");
    let _ = write!(s, r#"<p class="legend">"#);
    for (i, rule) in zm.rules.iter().enumerate() {
        let _ = write!(
            s,
            r#"<span style="color:{}">■ evidence[{i}] {} (p_true {}, p_false {})</span> "#,
            RULE_COLOURS[i % RULE_COLOURS.len()],
            esc(&rule.sensor),
            rule.p_true,
            rule.p_false
        );
    }
    let _ = writeln!(s, "</p>");
}

/// Renders the report. Deterministic: the same replay gives the same file.
pub fn render(model: &Model, outcome: &Outcome, extras: &Extras<'_>) -> String {
    let mut s = String::new();
    let title = format!("presenced report: site {}", extras.site);
    let _ = writeln!(
        s,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; background: #fafafa; }}
section.zone {{ background: #fff; border: 1px solid #ddd; padding: 8px 12px; margin-bottom: 16px; }}
svg text {{ font-size: 10px; fill: #555; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: right; }}
pre {{ background: #f4f4f4; padding: 8px; }}
.key span {{ margin-right: 12px; }}
</style></head><body>
<h1>{}</h1>
<p>Replayed with {} from {} to {}: {} reading(s).</p>
<p class="key"><span style="color:{OCCUPIED_FILL}">■ occupied (or leaving)</span><span style="color:{ARRIVING_FILL}">■ arriving</span><span style="color:{LABEL_FILL}">■ labelled occupied</span><span>- - thresholds</span><span>| transition (red: override)</span></p>"#,
        esc(&title),
        esc(&title),
        esc(extras.config_name),
        outcome.from,
        outcome.to,
        outcome.readings
    );
    for (name, zm) in &model.zones {
        let Some(z) = outcome.zones.get(name) else {
            continue;
        };
        let labels: Vec<&Label> = extras.labels.iter().filter(|l| &l.zone == name).collect();
        let _ = writeln!(
            s,
            r#"<section class="zone" id="zone-{}"><h2>{}</h2><p class="summary">{} transition(s), occupied {}, {} flap(s), median detection {}</p>"#,
            esc(name),
            esc(name),
            z.transitions.len(),
            super::cli::span(z.occupied_ms),
            z.flaps,
            super::median_ms(&z.detection_ms).map_or("-".to_owned(), super::cli::span)
        );
        zone_svg(&mut s, name, zm, outcome, &z.trace, &labels);
        if let Some(e) = extras.estimates.and_then(|m| m.get(name)) {
            let _ = writeln!(
                s,
                r#"<table class="tune"><tr><th>number</th><th>now</th><th>suggested</th><th>90% interval</th><th>hours</th></tr>"#
            );
            let row = |s: &mut String, what: &str, x: &super::tune::Estimate| {
                let suggested = match (x.suggested, x.needs_hours) {
                    (Some(p), _) => p.to_string(),
                    (None, Some(n)) => format!("needs {n} more hours"),
                    _ => "-".to_owned(),
                };
                let _ = writeln!(
                    s,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}..{}</td><td>{}</td></tr>",
                    esc(what),
                    x.current,
                    suggested,
                    x.low,
                    x.high,
                    x.hours
                );
            };
            row(&mut s, "prior", &e.prior);
            for r in &e.rules {
                row(&mut s, &format!("{} p_true", r.sensor), &r.p_true);
                row(&mut s, &format!("{} p_false", r.sensor), &r.p_false);
            }
            let _ = writeln!(s, "</table>");
            if let (Some(b), Some(a)) = (
                extras.before.and_then(|m| m.get(name)),
                extras.after.and_then(|m| m.get(name)),
            ) {
                let _ = writeln!(
                    s,
                    r#"<p class="effect">Replayed over the labelled time, now → suggested: wrong-state time {} → {}, flaps {} → {}.</p>"#,
                    super::cli::span(b.wrong_ms()),
                    super::cli::span(a.wrong_ms()),
                    b.flaps,
                    a.flaps
                );
            }
        }
        let _ = writeln!(s, "</section>");
    }
    if let Some(diff) = extras.diff {
        let _ = writeln!(
            s,
            "<h2>Suggested change</h2><pre class=\"diff\">{}</pre>",
            esc(diff)
        );
    }
    let _ = writeln!(s, "</body></html>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::observation::Reading;
    use crate::replay::{run, Options, Record};
    use std::time::Duration;

    #[test]
    fn the_report_is_self_contained_and_draws_every_zone() {
        let cfg: Config = toml::from_str(
            r#"site = "home"
[zones.kitchen]
occupied_above = 0.6
evidence = [{ sensor = "pir", p_true = 0.95, p_false = 0.05, hold = "30s" }]
"#,
        )
        .unwrap();
        let model = Model::from_config(&cfg);
        let records: Vec<Record> = (0..100)
            .map(|i| Record {
                seq: i + 1,
                sensor: "pir".into(),
                value: Reading::Bool(i % 20 < 3),
                at: Timestamp(i as i64 * 10_000),
            })
            .collect();
        let opts = Options {
            from: Timestamp(0),
            to: Timestamp(1_000_000),
            flap_below: Duration::from_secs(60),
            trace: true,
        };
        let outcome = run(&model, &records, &[], &opts);
        let extras = Extras {
            site: "home",
            config_name: "c.toml",
            labels: &[],
            estimates: None,
            before: None,
            after: None,
            diff: None,
        };
        let html = render(&model, &outcome, &extras);
        assert_eq!(html, render(&model, &outcome, &extras));
        assert!(html.starts_with("<!DOCTYPE html>"));
        for banned in [
            "<script", "http://", "https://", "src=", "href=", "@import", "url(",
        ] {
            assert!(!html.contains(banned), "{banned} in the report");
        }
        assert!(html.contains(r#"id="zone-kitchen""#));
        assert!(html.contains(r#"class="band occupied""#));
        assert!(html.contains(r#"class="threshold occupied""#));
        assert!(html.contains(r#"data-sensor="pir""#));
    }

    #[test]
    fn polylines_keep_spikes_and_stay_short() {
        let points: Vec<(f64, f64)> = (0..100_000)
            .map(|i| {
                (
                    LEFT + (i as f64) / 100_000.0 * PLOT_W,
                    if i == 500 { 0.0 } else { 100.0 },
                )
            })
            .collect();
        let line = polyline(&points);
        assert!(line.split(' ').count() < 5_000);
        assert!(line.contains(",0.0"), "the spike is lost");
    }
}
