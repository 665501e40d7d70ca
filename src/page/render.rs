//! Server-side HTML of the status page. Every piece the live stream
//! replaces (a zone card, the health section) is rendered here only, so
//! the first load and the live updates cannot drift apart.

use crate::engine::{Presence, ZoneModel, ZoneState};
use crate::observation::Reading;
use crate::time::Timestamp;
use serde_json::Value;
use std::fmt::Write as _;

/// HTML-escapes text for element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Element id of a zone's card: keys are `[a-z0-9_-]` or `person.<id>`,
/// so the dot is the only character to replace.
pub fn card_id(key: &str) -> String {
    format!("z-{}", key.replace('.', "--"))
}

/// Seconds as the page's script shows them (same rounding), so the
/// figure does not jump when the script takes over.
pub fn span(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn reading(r: &Option<Reading>) -> String {
    match r {
        None => "no reading".into(),
        Some(Reading::Bool(b)) => b.to_string(),
        Some(Reading::Number(n)) => format!("{n}"),
    }
}

/// The card of a key whose stored value does not read as a zone state:
/// the zone stays listed, with the reason, rather than vanishing.
pub fn unreadable_card(key: &str, revision: u64, error: &str) -> String {
    format!(
        "<li class=\"zone\" id=\"{id}\" data-rev=\"{revision}\"><h3>{name}</h3><p class=\"note\">stored value unreadable (revision {revision}): {error}</p></li>",
        id = card_id(key),
        name = esc(key),
        error = esc(error),
    )
}

/// One zone (or person) as a card: state, time in it, confidence
/// against the thresholds, every rule's pull, the debounce countdown and
/// the override.
pub fn zone_card(
    key: &str,
    z: &ZoneState,
    revision: u64,
    model: Option<&ZoneModel>,
    now: Timestamp,
    timeline: &str,
) -> String {
    let mut h = String::with_capacity(1024);
    let name = key
        .strip_prefix(crate::naming::PERSON_KEY_PREFIX)
        .unwrap_or(key);
    let state = z.state.as_str();
    let _ = write!(
        h,
        "<li class=\"zone\" id=\"{id}\" data-rev=\"{revision}\" data-state=\"{state}\"><h3>{name} <span class=\"state s-{state}\">{state}</span></h3><dl>",
        id = card_id(key),
        name = esc(name),
    );
    let _ = write!(
        h,
        "<dt>for</dt><dd><time datetime=\"{}\" data-since=\"{}\">{}</time></dd>",
        z.since,
        z.since.millis(),
        span((now.millis() - z.since.millis()) / 1000)
    );
    let (low, high) = model.map_or((None, None), |m| {
        (Some(m.vacant_below), Some(m.occupied_above))
    });
    let _ = write!(
        h,
        "<dt>confidence</dt><dd><meter min=\"0\" max=\"1\" value=\"{c:.4}\"{lo}{hi} aria-label=\"confidence {cp}\">{cp}</meter> {cp}",
        c = z.confidence,
        cp = pct(z.confidence),
        lo = low.map(|l| format!(" low=\"{l}\"")).unwrap_or_default(),
        hi = high.map(|x| format!(" high=\"{x}\" optimum=\"1\"")).unwrap_or_default(),
    );
    if let (Some(l), Some(hh)) = (low, high) {
        let _ = write!(
            h,
            " <span class=\"note\">(vacant below {}, occupied above {})</span>",
            pct(l),
            pct(hh)
        );
    }
    h.push_str("</dd>");
    if let Some(p) = &z.pending {
        let verb = match p.to {
            Presence::Occupied => "arriving",
            Presence::Vacant => "leaving",
            _ => "moving",
        };
        let _ = write!(
            h,
            "<dt>{verb}</dt><dd>{} in <time datetime=\"{}\" data-until=\"{}\">{}</time></dd>",
            p.to.as_str(),
            p.deadline,
            p.deadline.millis(),
            span((p.deadline.millis() - now.millis()) / 1000)
        );
    }
    if let Some(o) = &z.manual {
        let _ = write!(
            h,
            "<dt>override</dt><dd class=\"override\">held {} by <b class=\"by\">{}</b>{} until <time class=\"until\" datetime=\"{}\">{}</time> (<time data-until=\"{}\">{}</time> left)</dd>",
            o.state.as_str(),
            esc(&o.by),
            o.reason
                .as_deref()
                .map(|r| format!(" ({})", esc(r)))
                .unwrap_or_default(),
            o.until,
            o.until,
            o.until.millis(),
            span((o.until.millis() - now.millis()) / 1000)
        );
    }
    if !timeline.is_empty() {
        let _ = write!(h, "<dt>last hour</dt><dd>{timeline}</dd>");
    }
    if !z.evidence.is_empty() {
        h.push_str("<dt>evidence</dt><dd><ul class=\"ev\">");
        for e in &z.evidence {
            let pull = if e.lr > 1.0 {
                "towards occupied"
            } else if e.lr < 1.0 {
                "towards vacant"
            } else {
                "neutral"
            };
            let age = e
                .observed_at
                .map(|t| format!(", {} ago", span((now.millis() - t.millis()) / 1000)))
                .unwrap_or_default();
            let _ = write!(
                h,
                "<li>{}: {}{age}; ×{:.2} {pull}</li>",
                esc(&e.sensor),
                reading(&e.value),
                e.lr
            );
        }
        h.push_str("</ul></dd>");
    }
    h.push_str("</dl></li>");
    h
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::String(s) => esc(s),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::Number(n) => n
            .as_f64()
            .filter(|f| f.fract() != 0.0)
            .map(|f| format!("{f:.1}"))
            .unwrap_or_else(|| n.to_string()),
        other => esc(&other.to_string()),
    }
}

fn age(v: &Value) -> String {
    v.as_f64()
        .map(|s| format!("{} ago", span(s as i64)))
        .unwrap_or_else(|| "never".into())
}

fn unix_age(v: &Value, now: Timestamp) -> String {
    v.as_i64()
        .map(|t| format!("{} ago", span(now.millis() / 1000 - t)))
        .unwrap_or_else(|| "never".into())
}

/// The health section, from the very report `/healthz` answers: the
/// page shows what the daemon knows, with no model of its own.
pub fn health(report: &Value, now: Timestamp) -> String {
    let mut h = String::with_capacity(2048);
    let status = report["status"].as_str().unwrap_or("unknown");
    let _ = write!(
        h,
        "<section id=\"health\" aria-labelledby=\"health-h\"><h2 id=\"health-h\">Health: <span class=\"{s}\">{s}</span></h2>",
        s = esc(status)
    );
    if let Some(causes) = report["causes"].as_array().filter(|c| !c.is_empty()) {
        h.push_str("<ul class=\"causes\">");
        for c in causes {
            let _ = write!(h, "<li>{}</li>", cell(c));
        }
        h.push_str("</ul>");
    }
    if let Some(sources) = report["sources"].as_array().filter(|s| !s.is_empty()) {
        h.push_str("<h3>Sources</h3><div class=\"scroll\"><table><thead><tr><th scope=\"col\">source</th><th scope=\"col\">link</th><th scope=\"col\">last reading</th><th scope=\"col\">readings</th></tr></thead><tbody>");
        for s in sources {
            let name = s["name"].as_str().unwrap_or("?");
            let up = s["up"].as_bool().unwrap_or(false);
            let link = if up {
                "<span class=\"up\">up</span>".to_owned()
            } else {
                format!(
                    "<span class=\"down\">down</span> for {}",
                    span(s["down_seconds"].as_f64().unwrap_or(0.0) as i64)
                )
            };
            let _ = write!(
                h,
                "<tr id=\"src-{id}\" data-up=\"{up}\"><th scope=\"row\">{n} <span class=\"note\">{k}</span></th><td>{link}</td><td>{a}</td><td>{r}</td></tr>",
                id = esc(name),
                n = esc(name),
                k = cell(&s["kind"]),
                a = age(&s["last_reading_seconds"]),
                r = cell(&s["readings"]),
            );
        }
        h.push_str("</tbody></table></div>");
    }
    if let Some(live) = report["live"].as_array().filter(|l| !l.is_empty()) {
        h.push_str("<h3>Live readings</h3><div class=\"scroll\"><table><thead><tr><th scope=\"col\">sensor</th><th scope=\"col\">value</th><th scope=\"col\">taken</th><th scope=\"col\">source</th></tr></thead><tbody>");
        for r in live {
            let sensor = r["sensor"].as_str().unwrap_or("?");
            let taken = r["observed_at"]
                .as_str()
                .and_then(|t| Timestamp::parse_rfc3339(t).ok())
                .map(|t| format!("{} ago", span((now.millis() - t.millis()) / 1000)))
                .unwrap_or_else(|| "–".into());
            let _ = write!(
                h,
                "<tr id=\"live-{id}\"><th scope=\"row\">{id}</th><td class=\"value\">{}</td><td>{taken}</td><td>{}</td></tr>",
                match &r["value"] {
                    Value::Bool(b) => b.to_string(),
                    v => cell(v),
                },
                cell(&r["source"]),
                id = esc(sensor),
            );
        }
        h.push_str("</tbody></table></div>");
    }
    h.push_str("<h3>Pipeline</h3><dl class=\"pipe\">");
    let _ = write!(
        h,
        "<dt>leaf nats-server</dt><dd>{}</dd><dt>lease</dt><dd>{}</dd>",
        if report["nats_connected"].as_bool() == Some(true) {
            "<span class=\"up\">connected</span>"
        } else {
            "<span class=\"down\">not connected</span>"
        },
        if report["lease"]["held"].as_bool() == Some(true) {
            "held"
        } else {
            "<span class=\"degraded\">not held</span>"
        }
    );
    let i = &report["ingest"];
    if i.is_object() {
        let _ = write!(
            h,
            "<dt>ingest backlog</dt><dd>{} of {} buffered; {} stored</dd><dt>rejects</dt><dd id=\"rejects\">{} since start",
            cell(&i["buffer_depth"]),
            cell(&i["buffer_capacity"]),
            cell(&i["observations_stored"]),
            cell(&i["rejects"])
        );
        if let Some(n) = i["rejects_last_minute"].as_u64() {
            let _ = write!(h, ", {n} in the last minute");
        }
        let r = &i["last_reject"];
        if r.is_object() {
            let _ = write!(
                h,
                "; last {} ago from {} ({}): {}",
                span((now.millis() - r["at_ms"].as_i64().unwrap_or(0)) / 1000),
                cell(&r["source"]),
                cell(&r["origin"]),
                cell(&r["reason"])
            );
        }
        h.push_str("</dd>");
    }
    let e = &report["engine"];
    if e.is_object() {
        let _ = write!(
            h,
            "<dt>engine backlog</dt><dd>{} pending; {} of {} zones occupied</dd>",
            cell(&e["pending"]),
            cell(&e["zones_occupied"]),
            cell(&e["zones"])
        );
    }
    let a = &report["archive"];
    if a.is_object() {
        let _ = write!(
            h,
            "<dt>archive</dt><dd>last snapshot {}, last upload {}, {} pending, S3 {}</dd>",
            unix_age(&a["last_snapshot_unix"], now),
            unix_age(&a["last_upload_unix"], now),
            cell(&a["pending"]),
            if a["s3_ok"].as_bool() == Some(true) {
                "reachable"
            } else {
                "<span class=\"degraded\">unreachable</span>"
            }
        );
    }
    h.push_str("</dl>");
    let hub = &report["hub"];
    if hub.is_object() {
        let _ = write!(
            h,
            "<h3>Hub mirrors</h3><p>hub {}</p>",
            if hub["reachable"].as_bool() == Some(true) {
                "<span class=\"up\">reachable</span>"
            } else {
                "<span class=\"down\">unreachable</span>"
            }
        );
        if let Some(ms) = hub["mirrors"].as_array().filter(|m| !m.is_empty()) {
            h.push_str("<div class=\"scroll\"><table><thead><tr><th scope=\"col\">mirror</th><th scope=\"col\">state</th><th scope=\"col\">lag</th><th scope=\"col\">last contact</th></tr></thead><tbody>");
            for m in ms {
                let lag = match (m["lag_messages"].as_u64(), m["lag_seconds"].as_f64()) {
                    (Some(n), Some(s)) => format!("{n} messages, {}", span(s as i64)),
                    (Some(n), None) => format!("{n} messages"),
                    _ => "–".into(),
                };
                let _ = write!(
                    h,
                    "<tr><th scope=\"row\">{}</th><td>{}{}</td><td>{lag}</td><td>{}</td></tr>",
                    cell(&m["mirror"]),
                    cell(&m["state"]),
                    m["error"]
                        .as_str()
                        .map(|e| format!(" <span class=\"note\">{}</span>", esc(e)))
                        .unwrap_or_default(),
                    age(&m["last_contact_seconds"]),
                );
            }
            h.push_str("</tbody></table></div>");
        }
    }
    h.push_str("</section>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn spans_read_like_the_script() {
        assert_eq!(span(-3), "0s");
        assert_eq!(span(59), "59s");
        assert_eq!(span(61), "1m 1s");
        assert_eq!(span(3 * 3600 + 120), "3h 2m");
        assert_eq!(span(2 * 86400 + 3600), "2d 1h");
    }

    #[test]
    fn person_keys_make_valid_ids() {
        assert_eq!(card_id("person.alice"), "z-person--alice");
        assert_eq!(card_id("living"), "z-living");
    }

    #[test]
    fn health_names_what_the_report_says() {
        let now = Timestamp(1_800_000_000_000);
        let report = serde_json::json!({
            "status": "degraded",
            "causes": ["source main (mqtt) link down for 40s"],
            "nats_connected": true,
            "lease": { "held": true },
            "sources": [{ "name": "main", "kind": "mqtt", "up": false, "down_seconds": 40.0,
                          "last_reading_seconds": 65.0, "readings": 3, "degraded": true }],
            "ingest": { "buffer_depth": 0, "buffer_capacity": 10, "observations_stored": 3,
                        "rejects": 1, "rejects_last_minute": 1, "last_reject": { "source": "main", "origin": "t/<x>",
                        "reason": "not JSON", "at_ms": now.millis() - 5000 } },
            "hub": { "reachable": false, "mirrors": [{ "mirror": "presence-home", "state": "stalled",
                     "lag_messages": 7, "lag_seconds": 12.0, "last_contact_seconds": 90.0 }] },
        });
        let h = health(&report, now);
        assert!(
            h.contains("<span class=\"degraded\">degraded</span>"),
            "{h}"
        );
        assert!(h.contains("link down for 40s"), "{h}");
        assert!(h.contains("data-up=\"false\""), "{h}");
        assert!(
            h.contains("<span class=\"down\">down</span> for 40s"),
            "{h}"
        );
        assert!(h.contains("1m 5s ago"), "{h}");
        assert!(
            h.contains("last 5s ago from main (t/&lt;x&gt;): not JSON"),
            "{h}"
        );
        assert!(h.contains("<span class=\"down\">unreachable</span>"), "{h}");
        assert!(
            h.contains("7 messages, 12s") && h.contains("1m 30s ago"),
            "{h}"
        );
    }

    #[test]
    fn a_person_card_is_named_without_its_prefix_and_escapes_the_override() {
        let now = Timestamp(1_800_000_000_000);
        let z: ZoneState = serde_json::from_value(serde_json::json!({
            "v": 1, "zone": "person.alice", "state": "occupied", "since": now.to_string(),
            "confidence": 0.9, "clock": now.to_string(), "last_seq": 1, "transitions": 1,
            "pending": { "to": "vacant", "deadline": Timestamp(now.0 + 90_000).to_string() },
            "override": { "state": "occupied", "since": now.to_string(),
                          "until": Timestamp(now.0 + 60_000).to_string(), "by": "<b>", "reason": "x&y" },
            "evidence": [],
        }))
        .unwrap();
        let h = zone_card("person.alice", &z, 4, None, now, "");
        assert!(
            h.starts_with("<li class=\"zone\" id=\"z-person--alice\" data-rev=\"4\""),
            "{h}"
        );
        assert!(h.contains("<h3>alice "), "{h}");
        assert!(h.contains("<dt>leaving</dt><dd>vacant in"), "{h}");
        assert!(
            h.contains("by <b class=\"by\">&lt;b&gt;</b> (x&amp;y)"),
            "{h}"
        );
    }
}
