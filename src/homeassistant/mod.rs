//! Home Assistant output: every zone appears in Home Assistant through MQTT
//! discovery, with no YAML on that side.
//!
//! State follows KV `presence`, never the other way round: this task only
//! watches the bucket and republishes each zone's state, retained, so Home
//! Assistant (re)started at any time sees the current value. Availability
//! is one retained topic per site and follows the engine's lease in KV
//! `owners`: `online` while the lease is held, `offline` once it is lost
//! (renewals failing for a TTL) or released on a clean stop; the broker
//! publishes `offline` (the MQTT will) when the daemon dies without one.

pub mod config;

use crate::base::backoff::Backoff;
use crate::engine::config::ZoneConfig;
use crate::engine::{Presence, ZoneState};
use crate::naming::{self, Site};
use async_nats::jetstream::kv;
use config::HomeAssistant;
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Publishes queued while the broker is away: discovery for every zone
/// plus one state per zone fits many times over.
const REQUEST_CAPACITY: usize = 1024;
/// Retry delays of the broker connection and the KV watch: from
/// `RETRY_START` doubling (jittered) up to `RETRY`.
const RETRY_START: Duration = Duration::from_millis(250);
const RETRY: Duration = Duration::from_secs(2);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The topics of one site.
#[derive(Clone, Debug)]
pub struct Topics {
    discovery_prefix: String,
    base: String,
    site: String,
}

impl Topics {
    pub fn new(cfg: &HomeAssistant, site: &Site) -> Self {
        Topics {
            discovery_prefix: cfg.discovery_prefix.clone(),
            base: cfg.base_topic.clone(),
            site: site.as_str().to_owned(),
        }
    }

    pub fn availability(&self) -> String {
        format!("{}/{}/availability", self.base, self.site)
    }

    pub fn state(&self, zone: &str) -> String {
        format!("{}/{}/{zone}/state", self.base, self.site)
    }

    /// `<prefix>/<component>/presenced_<site>/<zone>_<what>/config`: node
    /// and object ids are `[a-z0-9_-]`, as Home Assistant requires.
    pub fn config(&self, component: &str, zone: &str, what: &str) -> String {
        format!(
            "{}/{component}/presenced_{}/{}_{what}/config",
            self.discovery_prefix,
            self.site.replace('-', "_"),
            object_id(zone)
        )
    }
}

/// A presence key as a Home Assistant object id: `person.alice` becomes
/// `person_alice` (a dot is not allowed there).
fn object_id(key: &str) -> String {
    key.replace('.', "_")
}

/// Discovery configs (topic, JSON) for every zone: an occupancy
/// `binary_sensor` and a confidence `sensor`, both on the zone's state
/// topic and the site's availability topic.
pub fn discovery(topics: &Topics, zones: &BTreeMap<String, ZoneConfig>) -> Vec<(String, String)> {
    let site = &topics.site;
    let device = json!({
        "identifiers": [format!("presenced_{site}")],
        "name": format!("presenced {site}"),
        "manufacturer": "presenced",
        "model": "presence engine",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let mut out = Vec::new();
    for zone in zones.keys() {
        // Without `object_id` Home Assistant builds entity ids from the
        // device and entity names (`binary_sensor.presenced_<site>_<zone>_occupancy`);
        // with it they are the documented `binary_sensor.<zone>_occupancy`.
        // Newer Home Assistant (2025.10 on) reads `default_entity_id`
        // instead; older versions drop the key they do not know.
        let common = |component: &str, what: &str| {
            let id = format!("{}_{what}", object_id(zone));
            json!({
                "unique_id": format!("presenced_{site}_{id}"),
                "object_id": id,
                "default_entity_id": format!("{component}.{id}"),
                "state_topic": topics.state(zone),
                "availability_topic": topics.availability(),
                "payload_available": "online",
                "payload_not_available": "offline",
                "device": device,
            })
        };
        let mut occupancy = common("binary_sensor", "occupancy");
        occupancy["name"] = json!(format!("{zone} occupancy"));
        occupancy["device_class"] = json!("occupancy");
        occupancy["value_template"] = json!("{{ value_json.occupancy }}");
        occupancy["payload_on"] = json!("ON");
        occupancy["payload_off"] = json!("OFF");
        out.push((
            topics.config("binary_sensor", zone, "occupancy"),
            occupancy.to_string(),
        ));
        let mut confidence = common("sensor", "confidence");
        confidence["name"] = json!(format!("{zone} presence confidence"));
        confidence["value_template"] = json!("{{ value_json.confidence }}");
        confidence["unit_of_measurement"] = json!("%");
        confidence["state_class"] = json!("measurement");
        confidence["json_attributes_topic"] = json!(topics.state(zone));
        out.push((
            topics.config("sensor", zone, "confidence"),
            confidence.to_string(),
        ));
    }
    out
}

/// The state payload of a zone. `occupancy` is `ON` while the engine
/// treats the zone as occupied (`occupied` or `leaving`).
pub fn state_payload(z: &ZoneState) -> String {
    let on = matches!(z.state, Presence::Occupied | Presence::Leaving);
    json!({
        "occupancy": if on { "ON" } else { "OFF" },
        "state": z.state.as_str(),
        // Home Assistant drops a `state` key from JSON attributes (it is
        // reserved), so the four-state machine reaches it as `presence`.
        "presence": z.state.as_str(),
        "confidence": (z.confidence * 1000.0).round() / 10.0,
        "since": z.since.to_string(),
    })
    .to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum HomeAssistantError {
    #[error("cannot read homeassistant.password_file {path}: {source}")]
    PasswordFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("homeassistant: KV bucket presence: {0}")]
    Kv(String),
}

fn options(
    cfg: &HomeAssistant,
    site: &Site,
    topics: &Topics,
) -> Result<MqttOptions, HomeAssistantError> {
    let id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("presenced-{site}-homeassistant"));
    let mut o = MqttOptions::new(id, cfg.host.clone(), cfg.port);
    o.set_keep_alive(cfg.keep_alive.max(Duration::from_secs(1)))
        .set_clean_session(true)
        .set_last_will(LastWill::new(
            topics.availability(),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(user) = &cfg.username {
        let password = match &cfg.password_file {
            None => String::new(),
            Some(path) => crate::base::secrets::read_secret(path).map_err(|source| {
                HomeAssistantError::PasswordFile {
                    path: path.clone(),
                    source,
                }
            })?,
        };
        o.set_credentials(user.clone(), password);
    }
    Ok(o)
}

/// Publishes discovery and availability on every connection and the state
/// of each zone on every change in KV `presence`, until `shutdown`; then
/// publishes `offline` and disconnects.
pub async fn run(
    cfg: HomeAssistant,
    site: Site,
    zones: BTreeMap<String, ZoneConfig>,
    js: async_nats::jetstream::Context,
    lease_held: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), HomeAssistantError> {
    let topics = Topics::new(&cfg, &site);
    let (client, eventloop) = AsyncClient::new(options(&cfg, &site, &topics)?, REQUEST_CAPACITY);
    let configs = discovery(&topics, &zones);
    let broker = format!("{}:{}", cfg.host, cfg.port);
    let (done_tx, done_rx) = watch::channel(false);
    let states = States::default();
    let pump = tokio::spawn(pump(
        eventloop,
        client.clone(),
        topics.clone(),
        Retained {
            configs,
            states: states.clone(),
            lease_held: lease_held.clone(),
        },
        broker,
        done_rx.clone(),
    ));
    let availability = tokio::spawn(follow_lease(
        client.clone(),
        topics.clone(),
        lease_held,
        done_rx,
    ));
    let result = follow(&client, &topics, &js, &states, &mut shutdown).await;
    availability.abort();
    // Clean stop: say so before leaving, so Home Assistant greys the zones
    // out at once instead of after the broker's keep-alive timeout.
    let _ = client
        .publish(topics.availability(), QoS::AtLeastOnce, true, "offline")
        .await;
    let _ = client.disconnect().await;
    let _ = done_tx.send(true);
    if tokio::time::timeout(DISCONNECT_TIMEOUT * 2, pump)
        .await
        .is_err()
    {
        debug!("homeassistant: MQTT disconnect timed out");
    }
    result
}

/// The availability payload for a lease state.
pub fn availability(lease_held: bool) -> &'static str {
    if lease_held {
        "online"
    } else {
        "offline"
    }
}

/// Publishes the availability each time the lease is won or lost. The
/// lease task reports after every renewal (every `ttl / 3`, about 26,000
/// times a day by default): a renewal that changes nothing is logged at
/// debug and not republished (the retained message stands, and a broker
/// reconnect republishes it); only a change is logged at info.
async fn follow_lease(
    client: AsyncClient,
    topics: Topics,
    mut held: watch::Receiver<bool>,
    mut done: watch::Receiver<bool>,
) {
    let mut last: Option<bool> = None;
    loop {
        tokio::select! {
            changed = held.changed() => if changed.is_err() { return },
            _ = done.wait_for(|d| *d) => return,
        }
        let now = *held.borrow_and_update();
        if last == Some(now) {
            debug!(
                available = availability(now),
                "homeassistant: engine lease still {}",
                if now { "held" } else { "lost" }
            );
            continue;
        }
        last = Some(now);
        info!(
            available = availability(now),
            "homeassistant: engine lease {}",
            if now { "held" } else { "lost" }
        );
        let _ = client
            .publish(
                topics.availability(),
                QoS::AtLeastOnce,
                true,
                availability(now),
            )
            .await;
    }
}

/// The last state payload published per zone: the engine rewrites a zone
/// on every batch, mostly with the same rounded figures, and a broker that
/// lost its retained messages gets them again on reconnect.
#[derive(Clone, Default)]
struct States(Arc<Mutex<BTreeMap<String, String>>>);

impl States {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `payload`; false when it is what was published last.
    fn changed(&self, zone: &str, payload: &str) -> bool {
        let mut map = self.lock();
        if map.get(zone).is_some_and(|p| p == payload) {
            return false;
        }
        map.insert(zone.to_owned(), payload.to_owned());
        true
    }
}

/// Watches KV `presence` and queues a retained state publish per change.
async fn follow(
    client: &AsyncClient,
    topics: &Topics,
    js: &async_nats::jetstream::Context,
    states: &States,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), HomeAssistantError> {
    let store = js
        .get_key_value(naming::PRESENCE_BUCKET)
        .await
        .map_err(|e| HomeAssistantError::Kv(e.to_string()))?;
    let mut backoff = Backoff::new(RETRY_START, RETRY);
    loop {
        let mut entries = match store.watch_with_history(">").await {
            Ok(w) => {
                backoff.reset();
                w
            }
            Err(e) => {
                warn!(error = %e, "homeassistant: cannot watch KV presence; retrying");
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                e = entries.next() => e,
            };
            match entry {
                Some(Ok(e)) if e.operation == kv::Operation::Put => {
                    match serde_json::from_slice::<ZoneState>(&e.value) {
                        Ok(z) => {
                            let payload = state_payload(&z);
                            if states.changed(&e.key, &payload) {
                                let _ = client
                                    .publish(topics.state(&e.key), QoS::AtLeastOnce, true, payload)
                                    .await;
                            }
                        }
                        Err(err) => {
                            warn!(zone = %e.key, error = %err, "homeassistant: unreadable zone state; not published")
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    warn!(error = %e, "homeassistant: KV watch failed; restarting it");
                    break;
                }
                None => break,
            }
        }
    }
}

/// What is (re)published on every connection.
struct Retained {
    /// Discovery configs (topic, JSON).
    configs: Vec<(String, String)>,
    /// The last state of each zone.
    states: States,
    /// Availability follows it.
    lease_held: watch::Receiver<bool>,
}

/// Drives the MQTT connection: (re)publishes availability and discovery on
/// each ConnAck, reconnects after errors, and ends on disconnect or `done`.
async fn pump(
    mut eventloop: EventLoop,
    client: AsyncClient,
    topics: Topics,
    retained: Retained,
    broker: String,
    mut done: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(RETRY_START, RETRY);
    let Retained {
        configs,
        states,
        lease_held,
    } = retained;
    let mut outage_logged = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                if outage_logged {
                    info!(%broker, "homeassistant: MQTT broker reachable again");
                } else {
                    info!(%broker, zones = configs.len() / 2, "homeassistant: publishing discovery");
                }
                outage_logged = false;
                let known: Vec<(String, String)> = states
                    .lock()
                    .iter()
                    .map(|(z, p)| (topics.state(z), p.clone()))
                    .collect();
                let dropped = configs
                    .iter()
                    .cloned()
                    .chain(known)
                    .filter(|(topic, payload)| {
                        client
                            .try_publish(topic, QoS::AtLeastOnce, true, payload.clone())
                            .is_err()
                    })
                    .count();
                if dropped > 0 {
                    warn!(dropped, "homeassistant: request queue full; some discovery or state messages wait for the next change or reconnect");
                }
                let available = availability(*lease_held.borrow());
                let _ =
                    client.try_publish(topics.availability(), QoS::AtLeastOnce, true, available);
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                if *done.borrow() {
                    return;
                }
                if !outage_logged {
                    warn!(%broker, error = %e, "homeassistant: MQTT broker unreachable; retrying");
                    outage_logged = true;
                }
                tokio::select! {
                    _ = done.wait_for(|d| *d) => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// A password file that cannot be read stays unreadable on a restart.
impl crate::supervise::Failure for HomeAssistantError {
    fn is_fatal(&self) -> bool {
        matches!(self, HomeAssistantError::PasswordFile { .. })
    }
}

/// Starts the Home Assistant output (component `homeassistant`, not
/// essential): it follows KV presence for `zones` once `lease_held` says
/// the engine owns it.
pub fn start(
    ctx: &mut crate::component::Ctx<'_>,
    cfg: HomeAssistant,
    zones: BTreeMap<String, ZoneConfig>,
    lease_held: watch::Receiver<bool>,
) {
    use crate::supervise::{self, Stage};
    let fut = run(
        cfg,
        ctx.site.clone(),
        zones,
        ctx.js.clone(),
        lease_held,
        ctx.sup.stop_flag(Stage::Work),
    );
    ctx.sup
        .spawn("homeassistant", Stage::Work, false, async move {
            fut.await.map_err(supervise::classify)
        });
    ctx.sup.registry().running("homeassistant");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Timestamp;

    fn cfg() -> HomeAssistant {
        toml::from_str("").unwrap()
    }

    #[test]
    fn discovery_has_what_home_assistant_needs() {
        let site = Site::new("home-1").unwrap();
        let topics = Topics::new(&cfg(), &site);
        let zones: BTreeMap<String, ZoneConfig> = toml::from_str(
            "[kitchen]\n[[kitchen.evidence]]\nsensor = \"a\"\np_true = 0.9\np_false = 0.1\n",
        )
        .unwrap();
        let d = discovery(&topics, &zones);
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0].0,
            "homeassistant/binary_sensor/presenced_home_1/kitchen_occupancy/config"
        );
        let v: serde_json::Value = serde_json::from_str(&d[0].1).unwrap();
        assert_eq!(v["device_class"], "occupancy");
        assert_eq!(v["state_topic"], "presenced/home-1/kitchen/state");
        assert_eq!(v["availability_topic"], "presenced/home-1/availability");
        assert_eq!(v["unique_id"], "presenced_home-1_kitchen_occupancy");
        // Entity ids as documented: binary_sensor.<zone>_occupancy.
        assert_eq!(v["object_id"], "kitchen_occupancy");
        assert_eq!(v["default_entity_id"], "binary_sensor.kitchen_occupancy");
        assert_eq!(
            d[1].0,
            "homeassistant/sensor/presenced_home_1/kitchen_confidence/config"
        );
        let v: serde_json::Value = serde_json::from_str(&d[1].1).unwrap();
        assert_eq!(v["unit_of_measurement"], "%");
        assert_eq!(v["object_id"], "kitchen_confidence");
        assert_eq!(v["default_entity_id"], "sensor.kitchen_confidence");

        // A person's key has a dot, which object ids may not hold.
        let mut people = BTreeMap::new();
        people.insert("person.alice".to_owned(), zones["kitchen"].clone());
        let d = discovery(&topics, &people);
        assert_eq!(
            d[0].0,
            "homeassistant/binary_sensor/presenced_home_1/person_alice_occupancy/config"
        );
        let v: serde_json::Value = serde_json::from_str(&d[0].1).unwrap();
        assert_eq!(v["unique_id"], "presenced_home-1_person_alice_occupancy");
        assert_eq!(v["object_id"], "person_alice_occupancy");
        assert_eq!(
            v["default_entity_id"],
            "binary_sensor.person_alice_occupancy"
        );
        let v: serde_json::Value = serde_json::from_str(&d[1].1).unwrap();
        assert_eq!(v["default_entity_id"], "sensor.person_alice_confidence");
        assert_eq!(v["state_topic"], "presenced/home-1/person.alice/state");
    }

    #[test]
    fn state_is_on_while_occupied_or_leaving() {
        let mut z: ZoneState = serde_json::from_value(json!({
            "v": 1, "zone": "k", "state": "leaving", "since": "2026-11-23T10:00:00Z",
            "confidence": 0.41234, "clock": "2026-11-23T10:00:00Z", "last_seq": 1,
            "transitions": 3, "pending": null, "evidence": []
        }))
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&state_payload(&z)).unwrap();
        assert_eq!(v["occupancy"], "ON");
        assert_eq!(v["confidence"], 41.2);
        z.state = Presence::Arriving;
        z.since = Timestamp(0);
        let v: serde_json::Value = serde_json::from_str(&state_payload(&z)).unwrap();
        assert_eq!(
            (v["occupancy"].as_str(), v["state"].as_str()),
            (Some("OFF"), Some("arriving"))
        );
        assert_eq!(v["presence"], "arriving");
    }
}
