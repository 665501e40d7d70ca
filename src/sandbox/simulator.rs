//! Simulated people and sensors: people walk between rooms and out of the
//! house; motion sensors trigger while someone moves, doors open and close
//! as people pass, light levels follow who is there. The world is pure
//! (`World::step`, seeded, unit-tested); [`run`] publishes its readings
//! over MQTT to a leaf's listener.

use crate::base::backoff::Backoff;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// A small, seeded generator: the simulation needs variety, not quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// xorshift64*.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// One MQTT message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    pub topic: String,
    pub payload: String,
}

/// Where a person is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Room(usize),
    Out,
}

#[derive(Debug, Clone)]
struct Person {
    place: Place,
    /// Seconds until the person moves on.
    stay: u64,
}

/// A room and its sensors' last reports.
#[derive(Debug, Clone)]
struct Room {
    name: String,
    door: bool,
    /// The motion sensor's last report (PIRs report a trigger, then clear).
    motion: bool,
    /// Seconds since the last trigger.
    quiet: u64,
    /// A door open since this many seconds (None: closed).
    door_open: Option<u64>,
    lights_on: bool,
}

/// How the simulated motion sensors err, explicitly, so that what
/// `presenced tune` learns can be held against the numbers that made the
/// data (see also `sandbox::truth`, whose sensors report a heartbeat).
#[derive(Debug, Clone, PartialEq)]
pub struct SensorErrors {
    /// Per second, P(no trigger | someone in the room).
    pub motion_miss: f64,
    /// Per second, P(trigger | nobody in the room): a pet, the heating.
    pub motion_false_trigger: f64,
}

impl Default for SensorErrors {
    /// What the sandbox has always simulated: a PIR that catches moving
    /// people seven seconds in ten and never fires on its own.
    fn default() -> Self {
        SensorErrors {
            motion_miss: 0.3,
            motion_false_trigger: 0.0,
        }
    }
}

/// Rooms, people, and the sensor readings they cause.
#[derive(Debug, Clone)]
pub struct World {
    root: String,
    rooms: Vec<Room>,
    people: Vec<Person>,
    rng: Rng,
    /// Seconds simulated so far.
    pub clock: u64,
    /// Index of the room people enter and leave through (the first with a
    /// door, else the first).
    entrance: usize,
    errors: SensorErrors,
}

/// Seconds a PIR takes to clear after its last trigger.
const MOTION_CLEAR: u64 = 3;
/// Seconds a door stays open when someone passes.
const DOOR_OPEN: u64 = 2;
/// Seconds between illuminance reports of a room.
const LIGHT_EVERY: u64 = 5;

impl World {
    /// `rooms` with `doors` (a subset) and `people` people, all out at
    /// first; readings go to `<root>/<room>/<kind>`.
    pub fn new(root: &str, rooms: &[String], doors: &[String], people: usize, seed: u64) -> World {
        let rooms: Vec<Room> = rooms
            .iter()
            .map(|name| Room {
                name: name.clone(),
                door: doors.contains(name),
                motion: false,
                quiet: u64::MAX / 2,
                door_open: None,
                lights_on: false,
            })
            .collect();
        let entrance = rooms.iter().position(|r| r.door).unwrap_or(0);
        let mut rng = Rng::new(seed);
        let people = (0..people)
            .map(|_| Person {
                place: Place::Out,
                // Someone arrives within the first seconds.
                stay: rng.range(1, 4),
            })
            .collect();
        World {
            root: root.to_owned(),
            rooms,
            people,
            rng,
            clock: 0,
            entrance,
            errors: SensorErrors::default(),
        }
    }

    /// The same world with motion sensors that err as `errors` says.
    pub fn with_errors(mut self, errors: SensorErrors) -> World {
        self.errors = errors;
        self
    }

    /// Where each person is.
    pub fn places(&self) -> Vec<Place> {
        self.people.iter().map(|p| p.place.clone()).collect()
    }

    /// Names of rooms someone is in.
    pub fn occupied(&self) -> Vec<String> {
        self.rooms
            .iter()
            .enumerate()
            .filter(|(i, _)| self.people.iter().any(|p| p.place == Place::Room(*i)))
            .map(|(_, r)| r.name.clone())
            .collect()
    }

    fn reading(&self, room: usize, kind: &str, payload: String) -> Reading {
        Reading {
            topic: format!("{}/{}/{kind}", self.root, self.rooms[room].name),
            payload,
        }
    }

    fn pass_door(&mut self, room: usize, out: &mut Vec<Reading>) {
        if self.rooms[room].door && self.rooms[room].door_open.is_none() {
            self.rooms[room].door_open = Some(0);
            out.push(self.reading(room, "door", r#"{"contact":false}"#.to_owned()));
        }
    }

    /// Advances one second; returns what the sensors report.
    pub fn step(&mut self) -> Vec<Reading> {
        self.clock += 1;
        let mut out = Vec::new();
        if self.rooms.is_empty() {
            return out;
        }
        // People move on when their stay is over.
        for i in 0..self.people.len() {
            let p = &mut self.people[i];
            p.stay = p.stay.saturating_sub(1);
            if p.stay > 0 {
                continue;
            }
            let from = p.place.clone();
            let to = match from {
                Place::Out => Place::Room(self.entrance),
                Place::Room(r) if r == self.entrance && self.rng.chance(0.3) => Place::Out,
                Place::Room(r) => {
                    // Any other room; the entrance leads out too.
                    let n = self.rooms.len();
                    let step = self.rng.range(1, (n.max(2) - 1) as u64) as usize;
                    Place::Room((r + step) % n)
                }
            };
            let stay = match to {
                Place::Out => self.rng.range(10, 30),
                Place::Room(_) => self.rng.range(8, 25),
            };
            for r in [&from, &to] {
                if let Place::Room(r) = r {
                    if *r == self.entrance && (from == Place::Out || to == Place::Out) {
                        self.pass_door(*r, &mut out);
                    } else if self.rooms[*r].door {
                        // Inner doors are opened by whoever walks through.
                        self.pass_door(*r, &mut out);
                    }
                }
            }
            self.people[i].place = to;
            self.people[i].stay = stay;
        }
        // Doors close behind people.
        for r in 0..self.rooms.len() {
            if let Some(open) = self.rooms[r].door_open {
                if open + 1 >= DOOR_OPEN {
                    self.rooms[r].door_open = None;
                    out.push(self.reading(r, "door", r#"{"contact":true}"#.to_owned()));
                } else {
                    self.rooms[r].door_open = Some(open + 1);
                }
            }
        }
        // Motion: someone moving about triggers the PIR most seconds (a
        // report at least every other second while it goes on, well within
        // the zones' 6 s hold); it clears a few seconds after the last
        // trigger.
        for r in 0..self.rooms.len() {
            let present = self.people.iter().any(|p| p.place == Place::Room(r));
            // No draw where the probability is zero, so the default
            // errors give the same world for a seed as before they existed.
            let triggered = if present {
                self.rng.chance(1.0 - self.errors.motion_miss)
            } else {
                self.errors.motion_false_trigger > 0.0
                    && self.rng.chance(self.errors.motion_false_trigger)
            };
            let room = &mut self.rooms[r];
            if triggered {
                room.quiet = 0;
                if !room.motion {
                    room.motion = true;
                    out.push(self.reading(r, "motion", r#"{"occupancy":true}"#.to_owned()));
                } else if self.clock % 2 == 0 {
                    // Real PIRs repeat their trigger while motion goes on.
                    out.push(self.reading(r, "motion", r#"{"occupancy":true}"#.to_owned()));
                }
            } else {
                room.quiet = room.quiet.saturating_add(1);
                if room.motion && room.quiet >= MOTION_CLEAR {
                    room.motion = false;
                    out.push(self.reading(r, "motion", r#"{"occupancy":false}"#.to_owned()));
                }
            }
            // Lights: on while someone is there, reported every few seconds
            // with some noise, and at once when switched.
            let room = &mut self.rooms[r];
            let switched = room.lights_on != present;
            room.lights_on = present;
            if switched || (self.clock + r as u64) % LIGHT_EVERY == 0 {
                let lux = if present {
                    self.rng.range(250, 400)
                } else {
                    self.rng.range(3, 25)
                };
                out.push(self.reading(r, "light", format!(r#"{{"illuminance":{lux}}}"#)));
            }
        }
        out
    }
}

/// Where the simulator of one site publishes.
#[derive(Debug, Clone)]
pub struct Target {
    pub site: String,
    pub mqtt_port: u16,
    pub user: String,
    pub password: String,
    pub rooms: Vec<String>,
    pub doors: Vec<String>,
    pub people: usize,
    pub seed: u64,
    pub log: PathBuf,
}

/// Publishes the world's readings to the leaf's MQTT listener, one step a
/// second, until the task is dropped. Each reading is logged with the
/// people's places, so the log tells why a zone changed.
pub async fn run(target: Target) {
    let mut log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&target.log)
    {
        Ok(f) => Some(f),
        Err(error) => {
            tracing::warn!(path = %target.log.display(), %error, "cannot open the simulator log");
            None
        }
    };
    let mut opts = MqttOptions::new(
        format!("sandbox-simulator-{}", target.site),
        "127.0.0.1",
        target.mqtt_port,
    );
    opts.set_credentials(target.user.clone(), target.password.clone());
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    // The event loop runs beside the publisher; rumqttc does not back off
    // between reconnects, so this loop does.
    let site = target.site.clone();
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    retry.reset();
                    tracing::debug!(site = %site, "simulator connected to the leaf's MQTT listener");
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(site = %site, %error, "simulator MQTT connection lost; retrying");
                    tokio::time::sleep(retry.next_delay()).await;
                }
            }
        }
    }));
    let mut world = World::new(
        crate::sandbox::plan::DEVICE_TOPIC_ROOT,
        &target.rooms,
        &target.doors,
        target.people,
        target.seed,
    );
    let mut labels = TruthLabels::open(
        &labels_path(&target.log),
        &target.rooms,
        crate::time::Timestamp::now(),
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let readings = world.step();
        let occupied = world.occupied();
        labels.record(&occupied, crate::time::Timestamp::now());
        let places = occupied.join(",");
        for r in readings {
            if let Some(f) = log.as_mut() {
                let _ = writeln!(
                    f,
                    "{} t={}s {} {} (people in: {})",
                    crate::time::Timestamp::now(),
                    world.clock,
                    r.topic,
                    r.payload,
                    if places.is_empty() { "-" } else { &places }
                );
            }
            // A full request queue means the leaf is away: the reading is
            // dropped, as a real sensor's would be.
            if client
                .try_publish(r.topic, QoS::AtLeastOnce, false, r.payload)
                .is_err()
            {
                tracing::debug!("simulator queue full; reading dropped");
            }
        }
    }
}

/// Where the simulator writes the true occupancy of its rooms: beside its
/// log, as a labels file `presenced tune --labels` reads.
pub fn labels_path(log: &std::path::Path) -> PathBuf {
    log.with_extension("labels.csv")
}

/// The true occupancy of every room, written as labels: one line per
/// closed interval (an open one is written when it ends), so the file is
/// always valid and a restarted sandbox appends after it.
struct TruthLabels {
    file: Option<std::fs::File>,
    rooms: Vec<(String, bool, crate::time::Timestamp)>,
}

impl TruthLabels {
    fn open(path: &std::path::Path, rooms: &[String], now: crate::time::Timestamp) -> TruthLabels {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|error| tracing::warn!(path = %path.display(), %error, "cannot open the simulator's labels file"))
            .ok();
        let mut labels = TruthLabels {
            file,
            rooms: rooms.iter().map(|r| (r.clone(), false, now)).collect(),
        };
        if let Some(f) = labels.file.as_mut() {
            if f.metadata().map(|m| m.len() == 0).unwrap_or(false) {
                let _ = writeln!(f, "zone,start,end,state");
            }
        }
        labels
    }

    fn record(&mut self, occupied: &[String], now: crate::time::Timestamp) {
        for (room, was, since) in &mut self.rooms {
            let is = occupied.contains(room);
            if is == *was {
                continue;
            }
            if let Some(f) = self.file.as_mut() {
                let state = if *was { "occupied" } else { "vacant" };
                let _ = writeln!(f, "{room},{since},{now},{state}");
            }
            *was = is;
            *since = now;
        }
    }
}

/// Ends the MQTT event loop together with the publisher.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(seed: u64) -> World {
        let rooms: Vec<String> = ["hall", "kitchen", "living", "office"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        World::new(
            "sandbox",
            &rooms,
            &["hall".into(), "office".into()],
            2,
            seed,
        )
    }

    #[test]
    fn people_arrive_move_and_rooms_empty_again() {
        let mut w = world(7);
        let mut seen_occupied = std::collections::BTreeSet::new();
        let mut emptied = 0;
        let mut before: Vec<String> = Vec::new();
        for _ in 0..600 {
            w.step();
            let now = w.occupied();
            for r in &now {
                seen_occupied.insert(r.clone());
            }
            emptied += before.iter().filter(|r| !now.contains(r)).count();
            before = now;
        }
        assert_eq!(seen_occupied.len(), 4, "{seen_occupied:?}");
        assert!(emptied >= 10, "rooms emptied only {emptied} times");
    }

    #[test]
    fn someone_arrives_within_seconds() {
        let mut w = world(1);
        let mut motion_at = None;
        for s in 1..=10 {
            if w.step()
                .iter()
                .any(|r| r.payload.contains(r#""occupancy":true"#))
            {
                motion_at = Some(s);
                break;
            }
        }
        assert!(motion_at.is_some(), "no motion in the first 10 s");
    }

    #[test]
    fn readings_are_well_formed_and_only_for_real_sensors() {
        let mut w = world(3);
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..300 {
            for r in w.step() {
                let parts: Vec<&str> = r.topic.split('/').collect();
                assert_eq!(parts.len(), 3, "{}", r.topic);
                assert_eq!(parts[0], "sandbox");
                if parts[2] == "door" {
                    assert!(parts[1] == "hall" || parts[1] == "office", "{}", r.topic);
                }
                let v: serde_json::Value = serde_json::from_str(&r.payload).unwrap();
                assert!(v.is_object());
                kinds.insert(parts[2].to_owned());
            }
        }
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            ["door", "light", "motion"]
        );
    }

    #[test]
    fn motion_clears_after_people_leave() {
        let mut w = world(11);
        // Run until some room has had motion and is now empty for longer
        // than the clear time: its last motion report must be false.
        let mut last: std::collections::BTreeMap<String, bool> = Default::default();
        for _ in 0..400 {
            for r in w.step() {
                if r.topic.ends_with("/motion") {
                    last.insert(r.topic.clone(), r.payload.contains("true"));
                }
            }
        }
        for _ in 0..MOTION_CLEAR + 1 {
            // Freeze people in place: step only the sensors by emptying
            // the house.
            for p in &mut w.people {
                p.place = Place::Out;
                p.stay = 1000;
            }
            for r in w.step() {
                if r.topic.ends_with("/motion") {
                    last.insert(r.topic.clone(), r.payload.contains("true"));
                }
            }
        }
        assert!(!last.is_empty());
        assert!(last.values().all(|v| !v), "{last:?}");
    }

    #[test]
    fn true_occupancy_is_written_as_labels_tune_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = labels_path(&dir.path().join("simulator.log"));
        let rooms = vec!["hall".to_owned(), "kitchen".to_owned()];
        let mut w = world(5);
        let mut labels = TruthLabels::open(&path, &rooms, crate::time::Timestamp(999_000));
        for s in 0..600 {
            w.step();
            labels.record(&w.occupied(), crate::time::Timestamp(1_000_000 + s * 1000));
        }
        drop(labels);
        let text = std::fs::read_to_string(&path).unwrap();
        let zones = rooms.iter().cloned().collect();
        let parsed = crate::replay::labels::parse_csv("labels", &text, &zones).unwrap();
        assert!(
            parsed.iter().any(|l| l.occupied) && parsed.iter().any(|l| !l.occupied),
            "{text}"
        );
    }

    #[test]
    fn motion_errs_as_its_explicit_model_says() {
        let errors = SensorErrors {
            motion_miss: 0.3,
            motion_false_trigger: 0.05,
        };
        let mut w = world(9).with_errors(errors);
        // Seconds in which a room's PIR triggered, by whether someone was there.
        let (mut occ, mut occ_hits, mut vac, mut vac_hits) = (0u32, 0u32, 0u32, 0u32);
        for _ in 0..20_000 {
            w.step();
            let here = w.occupied();
            for room in &w.rooms {
                // `quiet` is 0 exactly after a second with a trigger.
                let hit = room.quiet == 0;
                if here.contains(&room.name) {
                    occ += 1;
                    occ_hits += u32::from(hit);
                } else {
                    vac += 1;
                    vac_hits += u32::from(hit);
                }
            }
        }
        let (p_true, p_false) = (occ_hits as f64 / occ as f64, vac_hits as f64 / vac as f64);
        assert!((p_true - 0.7).abs() < 0.03, "{p_true}");
        assert!((p_false - 0.05).abs() < 0.01, "{p_false}");
    }

    #[test]
    fn the_same_seed_gives_the_same_world() {
        let mut a = world(42);
        let mut b = world(42);
        for _ in 0..100 {
            assert_eq!(a.step(), b.step());
        }
    }
}
