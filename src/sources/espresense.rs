//! ESPresense preset: BLE distance reports per (device, room) turned into
//! which room each person is in, with hysteresis so a phone lying between
//! two rooms does not bounce.
//!
//! ESPresense publishes `<base>/devices/<device>/<room>` with a JSON payload
//! carrying `distance` (metres). Per person the tracker keeps the latest
//! reliable distance of every room (at most `max_distance`, not older than
//! `timeout`). The nearest such room takes over from the current one only
//! when it is nearer by at least `margin` and has stayed so for `dwell`.
//! A person with no reliable reading left is in no room.
//!
//! Outputs per person: `<person>_in_<room>` (true on entering, false on
//! leaving) and `<person>_home` (in any room). Zones use them like any
//! other sensor.

use crate::observation::{Observation, Reading, OBSERVATION_SCHEMA};
use crate::sources::config::EspresenseConfig;
use crate::time::Timestamp;
use std::collections::BTreeMap;
use std::time::Duration;

/// A room change of one person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// Which room one person is in.
#[derive(Clone, Debug)]
pub struct RoomTracker {
    margin: f64,
    dwell: Duration,
    max_distance: f64,
    timeout: Duration,
    readings: BTreeMap<String, (f64, Timestamp)>,
    current: Option<String>,
    /// A nearer room and since when it has been nearer by the margin.
    candidate: Option<(String, Timestamp)>,
}

impl RoomTracker {
    pub fn new(margin: f64, dwell: Duration, max_distance: f64, timeout: Duration) -> Self {
        RoomTracker {
            margin,
            dwell,
            max_distance,
            timeout,
            readings: BTreeMap::new(),
            current: None,
            candidate: None,
        }
    }

    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    fn reliable(&self, room: &str, now: Timestamp) -> Option<f64> {
        self.readings
            .get(room)
            .filter(|(d, at)| *d <= self.max_distance && now.since(*at) <= self.timeout)
            .map(|(d, _)| *d)
    }

    /// Takes one report; returns the change it causes, if any.
    pub fn observe(&mut self, room: &str, distance: f64, at: Timestamp) -> Option<Change> {
        self.readings.insert(room.to_owned(), (distance, at));
        let best = self
            .readings
            .keys()
            .filter_map(|r| self.reliable(r, at).map(|d| (r.clone(), d)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let Some(current) = self.current.clone() else {
            // Nothing to bounce from: the first reliable room counts at once.
            self.candidate = None;
            let (room, _) = best?;
            self.current = Some(room.clone());
            return Some(Change {
                from: None,
                to: Some(room),
            });
        };
        let Some((best_room, best_d)) = best else {
            self.candidate = None;
            self.current = None;
            return Some(Change {
                from: Some(current),
                to: None,
            });
        };
        let current_d = self.reliable(&current, at).unwrap_or(f64::INFINITY);
        if best_room == current || best_d + self.margin > current_d {
            self.candidate = None;
            return None;
        }
        let since = match &self.candidate {
            Some((r, since)) if *r == best_room => *since,
            _ => at,
        };
        if at.since(since) >= self.dwell {
            self.candidate = None;
            self.current = Some(best_room.clone());
            return Some(Change {
                from: Some(current),
                to: Some(best_room),
            });
        }
        self.candidate = Some((best_room, since));
        None
    }
}

/// What one ESPresense message becomes.
#[derive(Debug)]
pub enum Outcome {
    /// Not an ESPresense device topic of this preset.
    NotMine,
    /// A device nobody configured: acknowledged and dropped.
    Ignored,
    Observations(Vec<Observation>),
    Rejected(String),
}

/// The preset of one MQTT source: a tracker per configured person.
#[derive(Debug)]
pub struct Espresense {
    prefix: String,
    /// ESPresense device id to (person, tracker).
    people: BTreeMap<String, (String, RoomTracker)>,
}

impl Espresense {
    pub fn new(cfg: &EspresenseConfig) -> Self {
        let people = cfg
            .people
            .iter()
            .map(|p| {
                let tracker =
                    RoomTracker::new(cfg.margin, cfg.dwell, cfg.max_distance, cfg.timeout);
                (p.device.clone(), (p.person.clone(), tracker))
            })
            .collect();
        Espresense {
            prefix: format!("{}/devices/", cfg.base_topic),
            people,
        }
    }

    /// The filter to subscribe.
    pub fn filter(&self) -> String {
        format!("{}+/+", self.prefix)
    }

    pub fn handle(&mut self, source: &str, topic: &str, payload: &[u8], at: Timestamp) -> Outcome {
        let Some(rest) = topic.strip_prefix(&self.prefix) else {
            return Outcome::NotMine;
        };
        let Some((device, room)) = rest.split_once('/') else {
            return Outcome::NotMine;
        };
        if room.contains('/') {
            return Outcome::NotMine;
        }
        let Some((person, tracker)) = self.people.get_mut(device) else {
            return Outcome::Ignored;
        };
        if !crate::naming::is_token(room) {
            return Outcome::Rejected(format!(
                "ESPresense room {room:?} is not a valid id part ([a-z0-9_-]); rename the room in ESPresense"
            ));
        }
        let distance = match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(v) => match v.get("distance").and_then(serde_json::Value::as_f64) {
                Some(d) if d.is_finite() && d >= 0.0 => d,
                Some(d) => return Outcome::Rejected(format!("distance {d} is not a distance")),
                None => return Outcome::Rejected("payload has no numeric `distance`".into()),
            },
            Err(e) => return Outcome::Rejected(format!("invalid JSON: {e}")),
        };
        let Some(change) = tracker.observe(room, distance, at) else {
            return Outcome::Observations(Vec::new());
        };
        let mut out = Vec::new();
        let mut push = |sensor: String, value: bool| {
            // Ids are given per delivery by the MQTT connection.
            out.push(Observation {
                v: OBSERVATION_SCHEMA,
                id: String::new(),
                delivery: None,
                sensor,
                value: Reading::Bool(value),
                observed_at: at,
                source: source.to_owned(),
            });
        };
        if let Some(from) = &change.from {
            push(format!("{person}_in_{from}"), false);
        }
        if let Some(to) = &change.to {
            push(format!("{person}_in_{to}"), true);
        }
        if change.from.is_none() || change.to.is_none() {
            push(format!("{person}_home"), change.to.is_some());
        }
        Outcome::Observations(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_000_000_000;

    fn at(s: f64) -> Timestamp {
        Timestamp(T0 + (s * 1000.0) as i64)
    }

    fn tracker() -> RoomTracker {
        RoomTracker::new(1.0, Duration::from_secs(10), 8.0, Duration::from_secs(30))
    }

    /// Replays (seconds, room, metres) and returns every change.
    fn replay(t: &mut RoomTracker, seq: &[(f64, &str, f64)]) -> Vec<Change> {
        seq.iter()
            .filter_map(|(s, room, d)| t.observe(room, *d, at(*s)))
            .collect()
    }

    fn change(from: Option<&str>, to: Option<&str>) -> Change {
        Change {
            from: from.map(Into::into),
            to: to.map(Into::into),
        }
    }

    #[test]
    fn a_phone_on_the_boundary_does_not_bounce() {
        let mut t = tracker();
        // Recorded-style: a phone on a desk by the office wall, both rooms'
        // stations see it at 2.5 to 3.2 m with BLE noise, for two minutes.
        let mut seq = Vec::new();
        for i in 0..120 {
            let s = f64::from(i);
            let wobble = if i % 3 == 0 { 0.35 } else { -0.2 };
            seq.push((s, "office", 2.8 + wobble));
            seq.push((s + 0.5, "kitchen", 2.9 - wobble));
        }
        let changes = replay(&mut t, &seq);
        assert_eq!(
            changes,
            [change(None, Some("office"))],
            "one entry, no bouncing"
        );
    }

    #[test]
    fn a_real_move_changes_room_after_the_dwell() {
        let mut t = tracker();
        let mut seq = vec![(0.0, "office", 1.0), (0.5, "kitchen", 6.0)];
        // Walks to the kitchen at t = 10 s and stays.
        for i in 10..40 {
            let s = f64::from(i);
            seq.push((s, "office", 6.5));
            seq.push((s + 0.5, "kitchen", 1.2));
        }
        let changes = replay(&mut t, &seq);
        assert_eq!(
            changes,
            [
                change(None, Some("office")),
                change(Some("office"), Some("kitchen"))
            ]
        );
        // The switch came only after the dwell: re-run and find the instant.
        let mut t = tracker();
        let mut switched_at = None;
        for (s, room, d) in &seq {
            if t.observe(room, *d, at(*s))
                .is_some_and(|c| c.to.as_deref() == Some("kitchen"))
            {
                switched_at = Some(*s);
            }
        }
        let s = switched_at.unwrap();
        assert!((20.0..21.0).contains(&s), "switched at {s}");
    }

    #[test]
    fn a_short_visit_shorter_than_the_dwell_is_ignored() {
        let mut t = tracker();
        let mut seq = vec![(0.0, "office", 1.0)];
        for i in 1..6 {
            seq.push((f64::from(i), "kitchen", 0.8));
            seq.push((f64::from(i) + 0.5, "office", 5.0));
        }
        for i in 6..30 {
            seq.push((f64::from(i), "office", 1.0));
        }
        assert_eq!(replay(&mut t, &seq), [change(None, Some("office"))]);
    }

    #[test]
    fn far_or_stale_readings_are_not_reliable_and_leaving_all_rooms_is_a_change() {
        let mut t = tracker();
        assert_eq!(
            t.observe("garden", 12.0, at(0.0)),
            None,
            "beyond max_distance"
        );
        assert_eq!(
            t.observe("office", 2.0, at(1.0)),
            Some(change(None, Some("office")))
        );
        // 31 s later the office reading is stale and the only new one is far.
        assert_eq!(
            t.observe("garden", 12.0, at(32.0)),
            Some(change(Some("office"), None))
        );
        assert_eq!(t.current(), None);
    }

    fn preset() -> Espresense {
        let cfg: EspresenseConfig = toml::from_str(
            "dwell = \"10s\"\n[[people]]\ndevice = \"irk:abc\"\nperson = \"alice\"\n",
        )
        .unwrap();
        Espresense::new(&cfg)
    }

    #[test]
    fn messages_become_person_observations() {
        let mut p = preset();
        assert_eq!(p.filter(), "espresense/devices/+/+");
        let Outcome::Observations(o) = p.handle(
            "m",
            "espresense/devices/irk:abc/office",
            br#"{"id":"irk:abc","distance":1.5}"#,
            at(0.0),
        ) else {
            panic!()
        };
        let got: Vec<(&str, Reading)> = o.iter().map(|o| (o.sensor.as_str(), o.value)).collect();
        assert_eq!(
            got,
            [
                ("alice_in_office", Reading::Bool(true)),
                ("alice_home", Reading::Bool(true))
            ]
        );
        assert!(matches!(
            p.handle("m", "espresense/devices/other/office", b"{}", at(1.0)),
            Outcome::Ignored
        ));
        assert!(matches!(
            p.handle("m", "zigbee2mqtt/x", b"{}", at(1.0)),
            Outcome::NotMine
        ));
        for (topic, payload, needle) in [
            (
                "espresense/devices/irk:abc/Living Room",
                &br#"{"distance":1}"#[..],
                "not a valid id",
            ),
            (
                "espresense/devices/irk:abc/office",
                b"{\"distance\":\"near\"}",
                "no numeric",
            ),
            (
                "espresense/devices/irk:abc/office",
                b"{\"distance\":-1}",
                "not a distance",
            ),
            ("espresense/devices/irk:abc/office", b"nope", "invalid JSON"),
        ] {
            match p.handle("m", topic, payload, at(2.0)) {
                Outcome::Rejected(r) => assert!(r.contains(needle), "{r}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
