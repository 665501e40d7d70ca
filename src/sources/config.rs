//! The sources' sections of the config (`[mqtt.<name>]`,
//! `[serial.<name>]`): owned by the sources that read them, held by the
//! top config (`config::Config`, which imports this module), checked in
//! `config::validate`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// One MQTT broker and the topics read from it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSource {
    /// The broker's host name or address.
    #[serde(default = "default_mqtt_host")]
    pub host: String,
    /// The broker's port (1883 for plain MQTT).
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Client id; stable, because the broker keeps the session (and the
    /// unacknowledged QoS 1 messages) under it across restarts. Default
    /// `presenced-<site>-<source>`.
    pub client_id: Option<String>,
    /// Broker user, when the broker requires one.
    pub username: Option<String>,
    /// File holding the password (a systemd credential in production);
    /// never the password itself in the config.
    pub password_file: Option<PathBuf>,
    /// MQTT keep-alive: how soon a dead broker connection is noticed.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Upper bound of the reconnect backoff.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Largest payload (bytes) read as a reading. A larger message is
    /// acknowledged and kept in `REJECTED` (topic, size, reason and its
    /// first bytes), and the connection stays up. Default 64 KiB: sensor
    /// reports are under 2 KiB. Messages up to MQTT's own limit (256 MiB)
    /// are received whatever this says, so no size the broker accepts can
    /// drop the connection.
    #[serde(default = "default_max_payload")]
    pub max_payload: usize,
    /// Explicit topic mappings.
    #[serde(default)]
    pub topics: Vec<TopicMapping>,
    /// Zigbee2MQTT devices, expanded into topic mappings.
    pub zigbee2mqtt: Option<Zigbee2Mqtt>,
    /// ESPresense people: which room each person is in.
    pub espresense: Option<EspresenseConfig>,
}

/// ESPresense preset (`[mqtt.<name>.espresense]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EspresenseConfig {
    /// ESPresense's MQTT prefix; reports come on `<base_topic>/devices/<device>/<room>`.
    #[serde(default = "default_espresense_base")]
    pub base_topic: String,
    /// Metres a room must be nearer than the current one to take over.
    #[serde(default = "default_margin")]
    pub margin: f64,
    /// How long it must stay nearer by the margin before the switch.
    #[serde(default = "default_dwell", with = "humantime_serde")]
    pub dwell: Duration,
    /// Readings farther than this (metres) are not reliable.
    #[serde(default = "default_max_distance")]
    pub max_distance: f64,
    /// Readings older than this are not reliable.
    #[serde(default = "default_espresense_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Tracked devices and whose they are.
    #[serde(default)]
    pub people: Vec<EspresensePerson>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EspresensePerson {
    /// ESPresense device id (`irk:...`, `phone:alice`, ...).
    pub device: String,
    /// Person id: sensors are `<person>_in_<room>` and `<person>_home`.
    pub person: String,
}

fn default_espresense_base() -> String {
    "espresense".into()
}
fn default_margin() -> f64 {
    1.0
}
fn default_dwell() -> Duration {
    Duration::from_secs(10)
}
fn default_max_distance() -> f64 {
    8.0
}
fn default_espresense_timeout() -> Duration {
    Duration::from_secs(30)
}

pub(crate) fn default_max_payload() -> usize {
    64 * 1024
}
pub(crate) fn default_mqtt_host() -> String {
    "127.0.0.1".into()
}
pub(crate) fn default_mqtt_port() -> u16 {
    1883
}
pub(crate) fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

/// How the bytes of a serial device are cut into readings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialFraming {
    /// HLK-LD2410 mmWave radar report frames.
    Ld2410,
    /// One JSON object per line: `{"sensor": "...", "value": ...}`.
    JsonLines,
}

/// One serial device (`[serial.<name>]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSource {
    /// Device path; prefer the stable `/dev/serial/by-id/...` link, which
    /// survives replugging into another port.
    pub device: PathBuf,
    /// How the device's bytes are cut into readings.
    pub framing: SerialFraming,
    /// Default: 256000 for `ld2410` (its factory rate), 115200 otherwise.
    pub baud: Option<u32>,
    /// `ld2410`: outputs are named `<sensor_prefix>_present`, `_moving`,
    /// `_still`, `_moving_distance`, ... Required for `ld2410`.
    pub sensor_prefix: Option<String>,
    /// `ld2410`: at most one observation per output in this interval.
    #[serde(default = "default_min_interval", with = "humantime_serde")]
    pub min_interval: Duration,
    /// `ld2410`: whether an unchanged value is dropped (true) or repeated
    /// once per `min_interval` as a refresh (false).
    #[serde(default = "yes")]
    pub changes_only: bool,
    /// `ld2410`: switch the radar to engineering mode on every connect
    /// (acknowledgement checked).
    #[serde(default)]
    pub engineering_mode: bool,
    /// `json_lines`: the sensors the device prints; lines naming any other
    /// are rejected. Empty accepts every valid sensor id.
    #[serde(default)]
    pub sensors: Vec<String>,
    /// Upper bound of the reopen backoff after an unplug.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl SerialSource {
    pub fn baud_rate(&self) -> u32 {
        self.baud.unwrap_or(match self.framing {
            SerialFraming::Ld2410 => super::ld2410::DEFAULT_BAUD,
            SerialFraming::JsonLines => 115_200,
        })
    }
}

fn default_min_interval() -> Duration {
    Duration::from_secs(1)
}

/// Maps MQTT topics to a sensor and says where the value is.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicMapping {
    /// MQTT topic filter, `+` and `#` allowed.
    pub filter: String,
    /// Sensor id; `{1}`, `{2}`, ... insert the topic levels matched by the
    /// filter's wildcards, so one mapping can serve many devices.
    pub sensor: String,
    /// Where the value is: absent for a bare payload (`true`, `OFF`, `21.5`),
    /// a JSON pointer (`/occupancy`) or a top-level field name.
    pub value: Option<String>,
    /// JSON pointer or field of the device's own timestamp (RFC 3339 string
    /// or Unix milliseconds); absent means the receive time.
    pub timestamp: Option<String>,
}

/// Zigbee2MQTT preset: devices by friendly name under a base topic.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Zigbee2Mqtt {
    /// Zigbee2MQTT's MQTT base topic; devices report on
    /// `<base_topic>/<friendly name>`.
    #[serde(default = "default_z2m_base")]
    pub base_topic: String,
    /// The devices read, each expanded into a topic mapping.
    pub devices: Vec<Zigbee2MqttDevice>,
}

fn default_z2m_base() -> String {
    "zigbee2mqtt".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Zigbee2MqttDevice {
    /// The device's friendly name in Zigbee2MQTT (its topic level).
    pub device: String,
    /// Which exposed property to read.
    pub kind: Zigbee2MqttKind,
    /// Sensor id; default: the friendly name, if it is a valid id.
    pub sensor: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Zigbee2MqttKind {
    /// Motion sensors: `occupancy` (boolean).
    Occupancy,
    /// Door and window sensors: `contact` (true when closed).
    Contact,
    /// Light sensors: `illuminance` (number).
    Illuminance,
}

fn yes() -> bool {
    true
}
