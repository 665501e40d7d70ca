//! The daemon's configuration: TOML, unknown fields rejected, durations in
//! humantime form (`90s`, `5m`).
//!
//! Parsing ([`Config::from_toml`]) catches syntax, type and unknown-field
//! errors; [`Config::validate`] then checks meaning and reports every problem
//! at once, each with its field path, so an operator fixes a file in one go.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Top level of `presenced.toml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The edge host's id; every subject and domain name derives from it.
    pub site: String,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    /// MQTT brokers to read, by source name (`[mqtt.<name>]`).
    #[serde(default)]
    pub mqtt: BTreeMap<String, MqttSource>,
    /// Zones and the evidence that decides their presence (`[zones.<zone>]`).
    #[serde(default)]
    pub zones: BTreeMap<String, ZoneConfig>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace` or a tracing filter
    /// directive; `RUST_LOG` wins when set.
    pub level: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// The site's leaf nats-server.
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// How long one connection attempt may take.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a JetStream request (publish ack, KV write) may take before
    /// it counts as failed and is retried.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// File with this instance's NKEY user seed (`SU...`). A leading
    /// `$CREDENTIALS_DIRECTORY/` is resolved against systemd's credentials
    /// directory, so the seed never has to enter the Nix store.
    pub nkey_seed_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: default_nats_url(),
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            nkey_seed_file: None,
        }
    }
}

fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve `/healthz` and `/metrics`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Loopback by default: metrics are not for the open network.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: default_http_listen(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Observations held in memory while the leaf is unreachable. When
    /// full, MQTT input is no longer acknowledged (the broker keeps it) and
    /// readings that cannot wait (serial) are dropped and counted.
    #[serde(default = "default_buffer")]
    pub buffer: usize,
    /// Publishes to `SENSORS` awaiting their ack at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Reject (into `REJECTED`) messages on subscribed topics that no
    /// mapping claims, instead of ignoring them.
    #[serde(default)]
    pub strict_topics: bool,
    /// Least time between two rejection WARN lines of one source; the
    /// rest are counted, and all are kept in `REJECTED`.
    #[serde(default = "default_reject_log_every", with = "humantime_serde")]
    pub reject_log_every: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            buffer: default_buffer(),
            max_in_flight: default_max_in_flight(),
            strict_topics: false,
            reject_log_every: default_reject_log_every(),
        }
    }
}

fn default_buffer() -> usize {
    100_000
}
fn default_max_in_flight() -> usize {
    1024
}
fn default_reject_log_every() -> Duration {
    Duration::from_secs(10)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Most observations applied per batch; KV writes are coalesced per
    /// zone within a batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Longest wait for in-flight work on SIGTERM before exiting.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch: default_batch(),
            drain_timeout: default_drain(),
        }
    }
}

fn default_batch() -> usize {
    1000
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}

/// One MQTT broker and the topics read from it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSource {
    #[serde(default = "default_mqtt_host")]
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Client id; stable, because the broker keeps the session (and the
    /// unacknowledged QoS 1 messages) under it across restarts. Default
    /// `presenced-<site>-<source>`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// File holding the password (a systemd credential in production);
    /// never the password itself in the config.
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Upper bound of the reconnect backoff.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Explicit topic mappings.
    #[serde(default)]
    pub topics: Vec<TopicMapping>,
    /// Zigbee2MQTT devices, expanded into topic mappings.
    pub zigbee2mqtt: Option<Zigbee2Mqtt>,
}

fn default_mqtt_host() -> String {
    "127.0.0.1".into()
}
fn default_mqtt_port() -> u16 {
    1883
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
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
    #[serde(default = "default_z2m_base")]
    pub base_topic: String,
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

/// A zone: a prior, evidence rules, thresholds and debounce.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Probability the zone is occupied with no evidence at all.
    #[serde(default = "default_prior")]
    pub prior: f64,
    /// Confidence at or above which a vacant zone starts arriving.
    #[serde(default = "default_occupied_above")]
    pub occupied_above: f64,
    /// Confidence at or below which an occupied zone starts leaving.
    #[serde(default = "default_vacant_below")]
    pub vacant_below: f64,
    /// How long confidence must stay high before `arriving` becomes
    /// `occupied`.
    #[serde(default, with = "humantime_serde")]
    pub arrive_after: Duration,
    /// How long confidence must stay low before `leaving` becomes `vacant`.
    #[serde(default = "default_leave_after", with = "humantime_serde")]
    pub leave_after: Duration,
    pub evidence: Vec<EvidenceRule>,
}

fn default_prior() -> f64 {
    0.1
}
fn default_occupied_above() -> f64 {
    0.7
}
fn default_vacant_below() -> f64 {
    0.3
}
fn default_leave_after() -> Duration {
    Duration::from_secs(60)
}

/// One sensor's say in a zone, as likelihoods.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceRule {
    pub sensor: String,
    /// P(evidence true | zone occupied).
    pub p_true: f64,
    /// P(evidence true | zone vacant).
    pub p_false: f64,
    /// For momentary sensors (motion): a true reading counts as true for
    /// this long after it, then as false, whatever arrives in between.
    #[serde(default, with = "humantime_serde")]
    pub hold: Option<Duration>,
    /// A sensor silent for longer than this counts as neutral (no say).
    #[serde(default, with = "humantime_serde")]
    pub stale_after: Option<Duration>,
    /// For numeric sensors: evidence is true when the value is above this.
    pub above: Option<f64>,
    /// For numeric sensors: evidence is true when the value is below this.
    pub below: Option<f64>,
}

/// One problem found in a config: where and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigProblem {
    /// Field path, e.g. `zones.kitchen.evidence[2].p_true`.
    pub path: String,
    pub reason: String,
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{} problem(s) in {}:\n{}", problems.len(), path.display(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<ConfigProblem>,
    },
}

impl Config {
    pub fn load_valid(_path: &std::path::Path) -> Result<Config, ConfigError> {
        unimplemented!()
    }
}
