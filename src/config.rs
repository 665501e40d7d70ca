//! The daemon's configuration: TOML, unknown fields rejected, durations in
//! humantime form (`90s`, `5m`).
//!
//! Parsing ([`Config::from_toml`]) catches syntax, type and unknown-field
//! errors; [`Config::validate`] then checks meaning and reports every problem
//! at once, each with its field path, so an operator fixes a file in one go.

use crate::naming;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod parse;
mod validate;

// The sources' sections live with the sources (each component owns its
// config); the top config holds them under `[mqtt.*]` and `[serial.*]`.
// The connection's section is the store's, the hub watch's the hub's.
pub use crate::archive::config::{ArchiveConfig, Keep, S3Config};
use crate::engine::config::{default_occupied_above, default_vacant_below};
pub use crate::engine::config::{EngineConfig, EvidenceRule, ZoneConfig};
pub use crate::homeassistant::config::HomeAssistant;
pub use crate::http::config::HttpConfig;
pub use crate::hub::config::HubWatch;
pub use crate::ingest::IngestConfig;
pub use crate::logging::LogConfig;
pub use crate::sources::config::{
    EspresenseConfig, EspresensePerson, MqttSource, SerialFraming, SerialSource, TopicMapping,
    Zigbee2Mqtt, Zigbee2MqttDevice, Zigbee2MqttKind,
};
pub use crate::store::config::{LeaseConfig, NatsConfig, NatsTls};
pub use crate::supervise::config::HealthConfig;

/// Top level of `presenced.toml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The edge host's id; every subject and domain name derives from it.
    pub site: String,
    /// This service's name in the ownership map: its inbox prefix
    /// (`_INBOX.<service>`), audit subject and owners key derive from it.
    #[serde(default = "default_service")]
    pub service: String,
    /// Components this instance runs (`ingest`, `engine`, `archiver`).
    /// Absent: inferred from the file, as the NixOS module describes it
    /// ([`Config::components`]): sources make an ingest, zones an engine,
    /// `[archive]` an archiver.
    #[serde(default)]
    pub runs: Option<Vec<String>>,
    /// What `/healthz` and `presenced status` count as degraded.
    #[serde(default)]
    pub health: HealthConfig,
    /// Log level (`[log]`); `RUST_LOG` overrides it.
    #[serde(default)]
    pub log: LogConfig,
    /// The leaf nats-server this instance talks to, and as whom.
    #[serde(default)]
    pub nats: NatsConfig,
    /// Where `/healthz` and `/metrics` are served.
    #[serde(default)]
    pub http: HttpConfig,
    /// How observations are buffered and stored in `SENSORS`.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// How the engine consumes `SENSORS` and drains on shutdown.
    #[serde(default)]
    pub engine: EngineConfig,
    /// The liveness lease this service keeps in KV `owners`.
    #[serde(default)]
    pub lease: LeaseConfig,
    /// MQTT brokers to read, by source name (`[mqtt.<name>]`).
    #[serde(default)]
    pub mqtt: BTreeMap<String, MqttSource>,
    /// Serial devices to read, by source name (`[serial.<name>]`).
    #[serde(default)]
    pub serial: BTreeMap<String, SerialSource>,
    /// Publish zones to Home Assistant through MQTT discovery.
    pub homeassistant: Option<HomeAssistant>,
    /// Watch this site's hub mirrors through the leaf's link (`[hub]`);
    /// absent for a site without a hub.
    pub hub: Option<HubWatch>,
    /// Zones and the evidence that decides their presence (`[zones.<zone>]`).
    #[serde(default)]
    pub zones: BTreeMap<String, ZoneConfig>,
    /// Snapshots of the state into object store `snapshots`, uploaded to
    /// S3; the archiver runs only when this section is present.
    pub archive: Option<ArchiveConfig>,
    /// People and the evidence that decides whether they are present
    /// (`[persons.<id>]`), kept under `person.<id>` in KV `presence` with
    /// the same state machine as zones. Every person an ESPresense preset
    /// tracks gets one by default ([`Config::add_preset_persons`]).
    #[serde(default)]
    pub persons: BTreeMap<String, ZoneConfig>,
}

fn default_service() -> String {
    "presenced".to_owned()
}

pub use crate::base::problems::ConfigProblem;

impl crate::engine::Model {
    /// The model of every entry of KV `presence` the config has (zones
    /// and persons). Here rather than in the engine, which knows its own
    /// section only.
    pub fn from_config(cfg: &Config) -> Self {
        Self::from_entries(cfg.presence_entries())
    }
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
    /// Parses a config without checking its meaning; `path` only labels
    /// errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config = parse::parse(text).map_err(|problems| ConfigError::Parse {
            path: path.to_owned(),
            message: problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        })?;
        config.add_preset_persons();
        Ok(config)
    }

    /// Gives each person an ESPresense preset tracks a presence entry fed
    /// by `<person>_home`, unless `[persons.<id>]` declares one: listing a
    /// phone is all an operator should need to see its owner come and go.
    /// Leaving is slow (10 minutes) because BLE reports pause while a
    /// phone sleeps.
    pub fn add_preset_persons(&mut self) {
        let people: Vec<String> = self
            .mqtt
            .values()
            .filter_map(|m| m.espresense.as_ref())
            .flat_map(|e| e.people.iter().map(|p| p.person.clone()))
            // A malformed id is reported where it is written, on the preset.
            .filter(|person| naming::is_token(person))
            .collect();
        for person in people {
            self.persons
                .entry(person.clone())
                .or_insert_with(|| ZoneConfig {
                    prior: 0.5,
                    occupied_above: default_occupied_above(),
                    vacant_below: default_vacant_below(),
                    arrive_after: Duration::ZERO,
                    leave_after: Duration::from_secs(600),
                    evidence: vec![EvidenceRule {
                        sensor: format!("{person}_home"),
                        p_true: 0.95,
                        p_false: 0.05,
                        hold: None,
                        stale_after: None,
                        above: None,
                        below: None,
                    }],
                });
        }
    }

    /// Every entry of KV `presence` the engine keeps, by key: zones under
    /// their id, people under `person.<id>`.
    pub fn presence_entries(&self) -> impl Iterator<Item = (String, &ZoneConfig)> {
        self.zones.iter().map(|(id, z)| (id.clone(), z)).chain(
            self.persons
                .iter()
                .map(|(id, z)| (naming::person_key(id), z)),
        )
    }

    /// Moves the entries of [`Config::presence_entries`] out of the config.
    pub fn take_presence_entries(&mut self) -> BTreeMap<String, ZoneConfig> {
        let mut entries = std::mem::take(&mut self.zones);
        for (id, z) in std::mem::take(&mut self.persons) {
            entries.insert(naming::person_key(&id), z);
        }
        entries
    }

    /// The components this instance runs: `runs` when given (unknown
    /// names are reported by [`Config::validate`] and skipped here), else
    /// inferred: ingest when a source is configured, engine when a zone or
    /// person is, archiver when `[archive]` is. A file with sources and
    /// zones thus runs ingest and engine, as before `runs` existed.
    pub fn components(&self) -> Vec<crate::base::ownership::Component> {
        use crate::base::ownership::Component;
        let mut c: Vec<Component> = match &self.runs {
            Some(names) => names.iter().filter_map(|n| Component::parse(n)).collect(),
            None => {
                let mut c = Vec::new();
                if !self.mqtt.is_empty() || !self.serial.is_empty() {
                    c.push(Component::Ingest);
                }
                if !self.zones.is_empty() || !self.persons.is_empty() {
                    c.push(Component::Engine);
                }
                if self.archive.is_some() {
                    c.push(Component::Archiver);
                }
                c
            }
        };
        c.sort();
        c.dedup();
        c
    }

    /// Reads and parses a config file, without checking its meaning.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Reads, parses and validates a config file, and reads the secret
    /// files the sources need at start: what the daemon and
    /// `check-config` use, so a file either works or says everything that
    /// is wrong with it.
    pub fn load_valid(path: &Path) -> Result<Config, ConfigError> {
        let config = Config::load(path)?;
        let mut problems = config.validate();
        if problems.is_empty() {
            problems = crate::sources::check::secrets(&config.mqtt);
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Every problem of meaning in this config, in config order; empty
    /// when it can be used.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        validate::all(self)
    }
}

pub use crate::base::secrets::{resolve_secret_path, CREDENTIALS_PREFIX};

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::from_toml(text, Path::new("test.toml")).unwrap()
    }

    fn paths(text: &str) -> Vec<String> {
        parse(text).validate().into_iter().map(|p| p.path).collect()
    }

    /// Problems at `path`, so a test can check the reason too.
    fn reasons_at(text: &str, path: &str) -> Vec<String> {
        parse(text)
            .validate()
            .into_iter()
            .filter(|p| p.path == path)
            .map(|p| p.reason)
            .collect()
    }

    /// A config with every section set, all of it valid.
    const FULL: &str = r#"
site = "home-1"

[log]
level = "presenced=debug,info"

[nats]
url = "nats://127.0.0.1:4222"
connect_timeout = "3s"
request_timeout = "2s"

[http]
enabled = true
listen = "127.0.0.1:9464"

[ingest]
buffer = 1000
max_in_flight = 64
strict_topics = true
reject_log_every = "30s"

[engine]
batch = 500
drain_timeout = "5s"

[mqtt.main]
host = "127.0.0.1"
port = 1883
client_id = "presenced-home-1-main"
username = "presenced"
password_file = "/run/credentials/presenced.service/mqtt"
keep_alive = "30s"
reconnect_max = "1m"

[[mqtt.main.topics]]
filter = "home/+/motion"
sensor = "{1}_motion"
value = "/occupancy"
timestamp = "/ts"

[[mqtt.main.topics]]
filter = "espresense/rooms/#"
sensor = "desk_distance"
value = "distance"

[[mqtt.main.topics]]
filter = "home/hall/pir"
sensor = "hall_pir"

[mqtt.main.zigbee2mqtt]
base_topic = "z2m"

[[mqtt.main.zigbee2mqtt.devices]]
device = "door_contact"
kind = "contact"

[[mqtt.main.zigbee2mqtt.devices]]
device = "Office/Lux"
kind = "illuminance"
sensor = "office_lux"

[zones.hall]
prior = 0.05
occupied_above = 0.6
vacant_below = 0.2
arrive_after = "0s"
leave_after = "1m"

[[zones.hall.evidence]]
sensor = "hall_motion"
p_true = 0.9
p_false = 0.05
hold = "30s"
stale_after = "1h"

[[zones.hall.evidence]]
sensor = "hall_pir"
p_true = 0.8
p_false = 0.1

[[zones.hall.evidence]]
sensor = "door_contact"
p_true = 0.3
p_false = 0.6

[zones.office]

[[zones.office.evidence]]
sensor = "office_lux"
p_true = 0.6
p_false = 0.1
above = 100.0
stale_after = "30m"

[[zones.office.evidence]]
sensor = "desk_distance"
p_true = 0.8
p_false = 0.1
above = 0.2
below = 1.5
"#;

    #[test]
    fn full_config_is_valid() {
        let c = parse(FULL);
        assert_eq!(c.validate(), vec![]);
        assert_eq!(c.mqtt["main"].topics.len(), 3);
        assert_eq!(c.zones["office"].prior, 0.1, "default prior applies");
        assert_eq!(c.nats.request_timeout, Duration::from_secs(2));
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
site = "Home_1"
[log]
level = "=="
[nats]
url = "http://x"
connect_timeout = "0s"
[ingest]
buffer = 0
max_in_flight = 0
[engine]
batch = 0
[mqtt."bad.name"]
port = 0
keep_alive = "500ms"
reconnect_max = "0s"
client_id = ""
[[mqtt."bad.name".topics]]
filter = "a/#/b"
sensor = "x"
[[mqtt."bad.name".topics]]
filter = "a/+"
sensor = "{2}_m"
value = ""
timestamp = "two words"
[[mqtt."bad.name".topics]]
filter = "b"
sensor = "x"
[zones.kitchen]
prior = 0
occupied_above = 0.3
vacant_below = 0.5
evidence = []
[zones.office]
[[zones.office.evidence]]
sensor = "x"
p_true = 1.3
p_false = 0.5
[[zones.office.evidence]]
sensor = "nobody"
p_true = 0.5
p_false = 0.5
hold = "0s"
[[zones.office.evidence]]
sensor = "x"
p_true = 0.9
p_false = 0.1
above = 5.0
below = 1.0
hold = "2m"
stale_after = "1m"
"#;
        assert_eq!(
            paths(text),
            vec![
                "site",
                "log.level",
                "nats.url",
                "nats.connect_timeout",
                "ingest.buffer",
                "ingest.max_in_flight",
                "engine.batch",
                "mqtt.bad.name",
                "mqtt.bad.name.port",
                "mqtt.bad.name.client_id",
                "mqtt.bad.name.keep_alive",
                "mqtt.bad.name.reconnect_max",
                "mqtt.bad.name.topics[0].filter",
                "mqtt.bad.name.topics[1].sensor",
                "mqtt.bad.name.topics[1].value",
                "mqtt.bad.name.topics[1].timestamp",
                "mqtt.bad.name.topics[2].sensor",
                "zones.kitchen.prior",
                "zones.kitchen.vacant_below",
                "zones.kitchen.evidence",
                "zones.office.evidence[0].p_true",
                "zones.office.evidence[1].sensor",
                "zones.office.evidence[1].p_false",
                "zones.office.evidence[1].hold",
                "zones.office.evidence[2].below",
                "zones.office.evidence[2].stale_after",
            ]
        );
    }

    #[test]
    fn load_valid_gathers_all_problems() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "site = \"Bad\"\n[engine]\nbatch = 0\n").unwrap();
        match Config::load_valid(&file) {
            Err(ConfigError::Invalid { path, problems }) => {
                assert_eq!(path, file);
                let got: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
                assert_eq!(got, ["site", "engine.batch"]);
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn lease_ttl_is_whole_seconds_of_at_least_three() {
        let check = |ttl: &str| {
            let text = format!("site = \"s\"\n[lease]\nttl = \"{ttl}\"\n");
            Config::from_toml(&text, Path::new("x.toml"))
                .unwrap()
                .validate()
                .into_iter()
                .map(|p| format!("{}: {}", p.path, p.reason))
                .collect::<Vec<_>>()
        };
        assert!(check("3s").is_empty());
        assert!(check("1m").is_empty());
        for bad in ["2s", "3500ms", "0s"] {
            let problems = check(bad);
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert!(
                problems[0].starts_with("lease.ttl: ") && problems[0].contains("whole seconds"),
                "{problems:?}"
            );
        }
        let default: Config = Config::from_toml("site = \"s\"\n", Path::new("x.toml")).unwrap();
        assert_eq!(default.lease.ttl, Duration::from_secs(10));
    }

    #[test]
    fn load_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("absent.toml");
        let err = Config::load(&file).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.toml"), "{err}");
    }

    fn parse_error(text: &str) -> String {
        match Config::from_toml(text, Path::new("p.toml")) {
            Err(ConfigError::Parse { message, .. }) => message,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let msg = parse_error("site = \"home\"\n[nats]\nurll = \"nats://x:1\"\n");
        assert!(msg.starts_with("line 3, column 1:"), "{msg}");
        assert!(msg.contains("unknown field `urll`"), "{msg}");
        assert!(
            msg.contains("urll = \"nats://x:1\""),
            "shows the line: {msg}"
        );
        assert!(msg.lines().count() <= 3, "stays short: {msg}");
    }

    #[test]
    fn bad_duration_is_rejected() {
        let msg = parse_error("site = \"home\"\n[nats]\nconnect_timeout = \"5 parsecs\"\n");
        assert!(
            msg.starts_with("line 3, column 19: `nats.connect_timeout`: expected a duration like \"30s\", \"5m\""),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_and_syntax_errors_are_parse_errors() {
        let msg = parse_error("site = 5\n");
        assert!(msg.starts_with("line 1, column 8: `site`:"), "{msg}");
        assert!(msg.contains("expected a string in quotes"), "{msg}");
        let msg = parse_error("site = \"home\"\n[zones\n");
        assert!(msg.starts_with("line 2,"), "{msg}");
        let err = Config::from_toml("site = 5\n", Path::new("p.toml")).unwrap_err();
        assert!(err.to_string().starts_with("p.toml: line 1"), "{err}");
    }

    /// A valid config with one MQTT source producing `s1` and `s2`, a zone
    /// `z` with one rule on `s1`, and `extra` spliced in at the end.
    fn base(extra: &str) -> String {
        format!(
            r#"
site = "home"
[mqtt.m]
[[mqtt.m.topics]]
filter = "t/1"
sensor = "s1"
[[mqtt.m.topics]]
filter = "t/2"
sensor = "s2"
[zones.z]
[[zones.z.evidence]]
sensor = "s1"
p_true = 0.9
p_false = 0.1
{extra}"#
        )
    }

    #[test]
    fn base_is_valid() {
        assert_eq!(paths(&base("")), Vec::<String>::new());
    }

    #[test]
    fn a_config_with_sources_and_no_zone_is_refused() {
        let text =
            "site = \"home\"\n[mqtt.m]\n[[mqtt.m.topics]]\nfilter = \"t/1\"\nsensor = \"s1\"\n";
        let reasons = reasons_at(text, "zones");
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("no zone is configured"), "{reasons:?}");
        assert!(
            reasons[0].contains("runs = [\"ingest\"]"),
            "names the way out: {reasons:?}"
        );
        // An ingest-only instance says so, and passes.
        let ingest_only = format!("runs = [\"ingest\"]\n{text}");
        assert_eq!(paths(&ingest_only), Vec::<String>::new());
        // An engine with nothing to decide is refused too.
        let engine = "site = \"home\"\nruns = [\"engine\"]\n";
        assert!(
            reasons_at(engine, "zones")[0].contains("lists engine"),
            "{:?}",
            paths(engine)
        );
        // An admin's or a client's file (no sources, no zones) needs none.
        assert_eq!(
            paths("site = \"home\"\n[nats]\nurl = \"nats://127.0.0.1:4222\"\n"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_rule_on_a_numeric_sensor_needs_a_threshold() {
        let text = |rule: &str| {
            format!(
                "site = \"home\"\n[mqtt.m.zigbee2mqtt]\ndevices = [{{ device = \"hall_lux\", kind = \"illuminance\" }}]\n[serial.radar]\ndevice = \"/dev/ttyUSB0\"\nframing = \"ld2410\"\nsensor_prefix = \"desk\"\n[zones.z]\n[[zones.z.evidence]]\n{rule}p_true = 0.9\np_false = 0.1\n"
            )
        };
        for sensor in ["hall_lux", "desk_moving_distance", "desk_still_energy"] {
            let reasons = reasons_at(
                &text(&format!("sensor = \"{sensor}\"\n")),
                "zones.z.evidence[0]",
            );
            assert_eq!(reasons.len(), 1, "{sensor}: {reasons:?}");
            assert!(
                reasons[0].contains("needs a threshold: set `above`"),
                "{reasons:?}"
            );
            assert_eq!(
                paths(&text(&format!("sensor = \"{sensor}\"\nabove = 50.0\n"))),
                Vec::<String>::new()
            );
            assert_eq!(
                paths(&text(&format!("sensor = \"{sensor}\"\nbelow = 5.0\n"))),
                Vec::<String>::new()
            );
        }
        // Yes/no outputs need none.
        assert_eq!(
            paths(&text("sensor = \"desk_present\"\n")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn archive_section_is_checked_field_by_field() {
        let good = base(
            r#"
[archive]
every = "1h"
keep_local = 24
keep_remote = "180days"
[archive.s3]
endpoint = "https://s3.eu-central-2.wasabisys.com"
region = "eu-central-2"
bucket = "b"
access_key_file = "$CREDENTIALS_DIRECTORY/s3-access-key"
secret_key_file = "$CREDENTIALS_DIRECTORY/s3-secret-key"
"#,
        );
        assert_eq!(paths(&good), Vec::<String>::new());
        let c = parse(&good);
        let a = c.archive.unwrap();
        assert_eq!(a.keep_local, Keep::Count(24));
        assert_eq!(a.keep_remote, Keep::Age(Duration::from_secs(180 * 86_400)));
        assert!(!a.delete_remote, "remote deletion is off by default");
        assert!(!a.s3.unwrap().path_style);
        let bad = base(
            r#"
[archive]
every = "0s"
buckets = ["presence", "sensors", "presence"]
keep_local = 0
retry_initial = "10s"
retry_max = "1s"
[archive.s3]
endpoint = "s3.wasabisys.com"
region = ""
bucket = "b"
prefix = "/x"
part_size = 1024
access_key_file = ""
secret_key_file = "k"
"#,
        );
        assert_eq!(
            paths(&bad),
            vec![
                "archive.every",
                "archive.buckets[1]",
                "archive.buckets[2]",
                "archive.keep_local",
                "archive.retry_max",
                "archive.s3.endpoint",
                "archive.s3.region",
                "archive.s3.prefix",
                "archive.s3.part_size",
                "archive.s3.access_key_file",
            ]
        );
        let e = Config::from_toml(
            &base("[archive]\nevery = \"1h\"\nkeep_local = \"soon\"\n"),
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("neither a count"), "{e}");
    }

    #[test]
    fn site_must_be_a_site_id() {
        for bad in ["", "Home", "a_b", "a.b", &"a".repeat(33)] {
            let text = base("").replace("site = \"home\"", &format!("site = {bad:?}"));
            assert_eq!(paths(&text), ["site"], "{bad:?}");
        }
    }

    #[test]
    fn zone_and_source_names_must_be_tokens() {
        let text = base("")
            .replace("[zones.z]", "[zones.\"Z z\"]")
            .replace("zones.z.", "zones.\"Z z\".");
        let r = reasons_at(&text, "zones.Z z");
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("[a-z0-9_-]"), "explains the form: {}", r[0]);
        let text = base("").replace("mqtt.m", "mqtt.M");
        assert_eq!(paths(&text), ["mqtt.M"]);
    }

    #[test]
    fn probabilities_must_be_inside_zero_and_one() {
        for (field, v) in [
            ("prior", "0.0"),
            ("prior", "1.0"),
            ("occupied_above", "nan"),
            ("vacant_below", "-0.1"),
        ] {
            let text = base("").replace("[zones.z]", &format!("[zones.z]\n{field} = {v}"));
            assert!(
                paths(&text).contains(&format!("zones.z.{field}")),
                "{field} = {v}"
            );
        }
        let text = base("").replace("p_true = 0.9", "p_true = 1.3");
        assert_eq!(
            reasons_at(&text, "zones.z.evidence[0].p_true"),
            ["must be strictly between 0 and 1, got 1.3"]
        );
        let text = base("").replace("p_false = 0.1", "p_false = inf");
        assert_eq!(paths(&text), ["zones.z.evidence[0].p_false"]);
    }

    #[test]
    fn thresholds_need_a_gap() {
        let text = base("").replace(
            "[zones.z]",
            "[zones.z]\noccupied_above = 0.5\nvacant_below = 0.5",
        );
        assert_eq!(paths(&text), ["zones.z.vacant_below"]);
    }

    #[test]
    fn equal_likelihoods_say_nothing() {
        let text = base("").replace("p_false = 0.1", "p_false = 0.9");
        let r = reasons_at(&text, "zones.z.evidence[0].p_false");
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("equals p_true"), "{}", r[0]);
    }

    #[test]
    fn zone_needs_evidence() {
        let text = "site = \"home\"\n[mqtt.m]\n[[mqtt.m.topics]]\nfilter = \"a\"\nsensor = \"a\"\n[zones.z]\nevidence = []\n";
        assert_eq!(paths(text), ["zones.z.evidence"]);
    }

    fn rule(extra: &str) -> String {
        base("").replace("p_false = 0.1", &format!("p_false = 0.1\n{extra}"))
    }

    #[test]
    fn bounds_must_be_finite_and_ordered() {
        assert_eq!(paths(&rule("above = nan")), ["zones.z.evidence[0].above"]);
        assert_eq!(paths(&rule("below = -inf")), ["zones.z.evidence[0].below"]);
        assert_eq!(
            paths(&rule("above = 2.0\nbelow = 1.0")),
            ["zones.z.evidence[0].below"]
        );
        assert_eq!(
            paths(&rule("above = 1.0\nbelow = 1.0")),
            ["zones.z.evidence[0].below"]
        );
        assert_eq!(
            paths(&rule("above = 1.0\nbelow = 2.0")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn hold_and_stale_after() {
        assert_eq!(paths(&rule("hold = \"0s\"")), ["zones.z.evidence[0].hold"]);
        assert_eq!(
            paths(&rule("stale_after = \"0s\"")),
            ["zones.z.evidence[0].stale_after"]
        );
        let r = reasons_at(
            &rule("hold = \"2m\"\nstale_after = \"1m\""),
            "zones.z.evidence[0].stale_after",
        );
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("shorter than hold (2m)"), "{}", r[0]);
        assert_eq!(
            paths(&rule("hold = \"1m\"\nstale_after = \"1m\"")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn evidence_sensor_must_be_produced() {
        let text = base("").replace("sensor = \"s1\"\np_true", "sensor = \"s3\"\np_true");
        let r = reasons_at(&text, "zones.z.evidence[0].sensor");
        assert_eq!(r.len(), 1);
        assert!(
            r[0].contains("no source produces sensor \"s3\""),
            "{}",
            r[0]
        );

        // Zones without a source: an engine-only instance of a split
        // site, whose sensors another instance reads.
        let text = "site = \"home\"\n[zones.z]\n[[zones.z.evidence]]\nsensor = \"s\"\np_true = 0.9\np_false = 0.1\n";
        assert_eq!(paths(text), Vec::<String>::new());
        // Unless it says it runs ingest too.
        let text = format!("runs = [\"ingest\", \"engine\"]\n{text}");
        let r = reasons_at(&text, "zones.z.evidence[0].sensor");
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("no source is configured"), "{}", r[0]);
        assert_eq!(reasons_at(&text, "runs").len(), 1);

        let bad = rule("").replace("sensor = \"s1\"\np_true", "sensor = \"S 1\"\np_true");
        assert_eq!(paths(&bad), ["zones.z.evidence[0].sensor"]);
    }

    #[test]
    fn serial_sources_are_checked_with_paths() {
        let radar = "[serial.radar]\ndevice = \"/dev/serial/by-id/usb-x\"\nframing = \"ld2410\"\nsensor_prefix = \"hall\"\n";
        assert_eq!(paths(&base(radar)), Vec::<String>::new());
        let c = parse(&base(radar));
        assert_eq!(c.serial["radar"].baud_rate(), 256_000);
        assert!(c.serial["radar"].changes_only);

        // An LD2410 produces its outputs for zone rules.
        let text = base(radar).replace(
            "sensor = \"s1\"\np_true",
            "sensor = \"hall_present\"\np_true",
        );
        assert_eq!(paths(&text), Vec::<String>::new());
        let text = base(radar).replace(
            "sensor = \"s1\"\np_true",
            "sensor = \"hall_presence\"\np_true",
        );
        assert_eq!(paths(&text), ["zones.z.evidence[0].sensor"]);

        let bad = "[serial.Radar]\ndevice = \"ttyUSB0\"\nframing = \"ld2410\"\nbaud = 0\nreconnect_max = \"0s\"\nsensors = [\"a\"]\n";
        assert_eq!(
            paths(&base(bad)),
            [
                "serial.Radar",
                "serial.Radar.device",
                "serial.Radar.baud",
                "serial.Radar.reconnect_max",
                "serial.Radar.sensors",
                "serial.Radar.sensor_prefix"
            ]
        );
        let r = reasons_at(
            &base(
                "[serial.r]\ndevice = \"/dev/x\"\nframing = \"ld2410\"\nsensor_prefix = \"Hall\"\n",
            ),
            "serial.r.sensor_prefix",
        );
        assert!(r[0].contains("is invalid"), "{r:?}");
        let r = reasons_at(
            &base("[serial.m]\ndevice = \"/dev/x\"\nframing = \"json_lines\"\n"),
            "serial.m",
        );
        assert!(r[0].contains("also an `[mqtt.m]` source"), "{r:?}");

        // JSON lines: listed sensors are produced; without a list, any id.
        let lines = "[serial.esp]\ndevice = \"/dev/ttyACM0\"\nframing = \"json_lines\"\nsensors = [\"desk\", \"Bad\"]\nengineering_mode = true\n";
        assert_eq!(
            paths(&base(lines)),
            ["serial.esp.engineering_mode", "serial.esp.sensors[1]"]
        );
        let open = "[serial.esp]\ndevice = \"/dev/ttyACM0\"\nframing = \"json_lines\"\n";
        let text = base(open).replace("sensor = \"s1\"\np_true", "sensor = \"anything\"\np_true");
        assert_eq!(paths(&text), Vec::<String>::new());
        assert_eq!(parse(&text).serial["esp"].baud_rate(), 115_200);
    }

    #[test]
    fn hub_section_is_checked() {
        let c = parse(&base("[hub]\n"));
        let hub = c.hub.unwrap();
        assert_eq!(hub.poll_interval, Duration::from_secs(1));
        assert!(hub.nudge);
        assert_eq!(paths(&base("[hub]\n")), Vec::<String>::new());
        assert_eq!(
            paths(&base(
                "[hub]\npoll_interval = \"0s\"\nstall_after = \"1s\"\nnudge_after = \"500ms\"\n"
            )),
            ["hub.poll_interval"]
        );
        assert_eq!(
            paths(&base(
                "[hub]\npoll_interval = \"2s\"\nstall_after = \"3s\"\nnudge_after = \"1s\"\n"
            )),
            ["hub.stall_after", "hub.nudge_after"]
        );
    }

    #[test]
    fn preset_people_get_person_entries_unless_declared() {
        let es = "[mqtt.es]\n[mqtt.es.espresense]\n[[mqtt.es.espresense.people]]\ndevice = \"irk:1\"\nperson = \"alice\"\n[[mqtt.es.espresense.people]]\ndevice = \"irk:2\"\nperson = \"bob\"\n[persons.bob]\nleave_after = \"1m\"\n[[persons.bob.evidence]]\nsensor = \"bob_home\"\np_true = 0.9\np_false = 0.1\n";
        let c = parse(&base(es));
        assert_eq!(paths(&base(es)), Vec::<String>::new());
        let alice = &c.persons["alice"];
        assert_eq!(alice.evidence[0].sensor, "alice_home");
        assert_eq!(alice.leave_after, Duration::from_secs(600));
        assert_eq!(
            c.persons["bob"].leave_after,
            Duration::from_secs(60),
            "declared entry kept"
        );
        let keys: Vec<String> = c.presence_entries().map(|(k, _)| k).collect();
        assert_eq!(keys, ["z", "person.alice", "person.bob"]);
    }

    #[test]
    fn persons_are_checked_like_zones() {
        let bad = "[persons.Carol]\n[[persons.Carol.evidence]]\nsensor = \"s1\"\np_true = 0.9\np_false = 0.1\n[persons.dan]\n[[persons.dan.evidence]]\nsensor = \"s1\"\np_true = 1.5\np_false = 0.1\n";
        assert_eq!(
            paths(&base(bad)),
            ["persons.Carol", "persons.dan.evidence[0].p_true"]
        );
        assert!(reasons_at(&base(bad), "persons.Carol")[0].starts_with("person id"));
    }

    #[test]
    fn homeassistant_section_is_checked() {
        assert_eq!(paths(&base("[homeassistant]\n")), Vec::<String>::new());
        let c = parse(&base("[homeassistant]\n"));
        let ha = c.homeassistant.unwrap();
        assert_eq!(
            (ha.discovery_prefix.as_str(), ha.base_topic.as_str()),
            ("homeassistant", "presenced")
        );
        let bad = "[homeassistant]\nhost = \"\"\nport = 0\nkeep_alive = \"500ms\"\npassword_file = \"/run/pw\"\ndiscovery_prefix = \"ha/\"\nbase_topic = \"a/+\"\n";
        assert_eq!(
            paths(&base(bad)),
            [
                "homeassistant.host",
                "homeassistant.port",
                "homeassistant.keep_alive",
                "homeassistant.password_file",
                "homeassistant.discovery_prefix",
                "homeassistant.base_topic"
            ]
        );
    }

    #[test]
    fn espresense_preset_is_checked_and_produces_person_sensors() {
        let es = "[mqtt.es]\n[mqtt.es.espresense]\n[[mqtt.es.espresense.people]]\ndevice = \"irk:1\"\nperson = \"alice\"\n";
        let text = base(es).replace(
            "sensor = \"s1\"\np_true",
            "sensor = \"alice_in_office\"\np_true",
        );
        assert_eq!(paths(&text), Vec::<String>::new());
        let text = base(es).replace("sensor = \"s1\"\np_true", "sensor = \"alice_home\"\np_true");
        assert_eq!(paths(&text), Vec::<String>::new());
        let text = base(es).replace("sensor = \"s1\"\np_true", "sensor = \"bob_home\"\np_true");
        assert_eq!(paths(&text), ["zones.z.evidence[0].sensor"]);
        let bad = "[mqtt.es]\n[mqtt.es.espresense]\nbase_topic = \"/x\"\nmargin = -1.0\nmax_distance = 0.0\ntimeout = \"0s\"\n[[mqtt.es.espresense.people]]\ndevice = \"a/b\"\nperson = \"Alice\"\n[[mqtt.es.espresense.people]]\ndevice = \"d\"\nperson = \"p\"\n[[mqtt.es.espresense.people]]\ndevice = \"d\"\nperson = \"q\"\n";
        assert_eq!(
            paths(&base(bad)),
            [
                "mqtt.es.espresense.base_topic",
                "mqtt.es.espresense.margin",
                "mqtt.es.espresense.max_distance",
                "mqtt.es.espresense.timeout",
                "mqtt.es.espresense.people[0].device",
                "mqtt.es.espresense.people[0].person",
                "mqtt.es.espresense.people[2].device"
            ]
        );
    }

    #[test]
    fn templates_produce_sensors_of_their_shape() {
        let with_template = |sensor: &str| {
            base("")
                .replace(
                    "filter = \"t/2\"\nsensor = \"s2\"",
                    "filter = \"r/+/m\"\nsensor = \"{1}_motion\"",
                )
                .replace(
                    "sensor = \"s1\"\np_true",
                    &format!("sensor = {sensor:?}\np_true"),
                )
        };
        assert_eq!(paths(&with_template("hall_motion")), Vec::<String>::new());
        assert_eq!(
            paths(&with_template("hall_temp")),
            ["zones.z.evidence[0].sensor"]
        );
    }

    #[test]
    fn zigbee2mqtt_devices_produce_sensors() {
        let z2m = |devices: &str| {
            format!(
                "site = \"home\"\n[mqtt.z.zigbee2mqtt]\n{devices}\n[zones.z]\n[[zones.z.evidence]]\nsensor = \"pir\"\np_true = 0.9\np_false = 0.1\n"
            )
        };
        let dev = |device: &str, sensor: Option<&str>| {
            let s = sensor
                .map(|s| format!("sensor = {s:?}\n"))
                .unwrap_or_default();
            format!(
                "[[mqtt.z.zigbee2mqtt.devices]]\ndevice = {device:?}\nkind = \"occupancy\"\n{s}"
            )
        };
        assert_eq!(
            paths(&z2m(&dev("pir", None))),
            Vec::<String>::new(),
            "default id is the name"
        );
        assert_eq!(
            paths(&z2m(&dev("Hall/PIR", Some("pir")))),
            Vec::<String>::new(),
            "`/` is allowed"
        );
        let r = reasons_at(
            &z2m(&dev("Hall PIR", None)),
            "mqtt.z.zigbee2mqtt.devices[0].sensor",
        );
        assert_eq!(r.len(), 1);
        assert!(
            r[0].contains("set `sensor`") && r[0].contains("hall_pir"),
            "{}",
            r[0]
        );
        let p = paths(&z2m(&dev("hall/+", Some("pir"))));
        assert_eq!(p, ["mqtt.z.zigbee2mqtt.devices[0].device"]);
        assert_eq!(
            paths(&z2m(&dev("", Some("pir")))),
            ["mqtt.z.zigbee2mqtt.devices[0].device"]
        );
        let p = paths(&z2m(
            "base_topic = \"z2m/#\"\ndevices = [{ device = \"pir\", kind = \"occupancy\" }]",
        ));
        assert_eq!(p, ["mqtt.z.zigbee2mqtt.base_topic"]);
        let p = paths(&z2m("devices = []"));
        assert_eq!(
            p,
            ["mqtt.z.zigbee2mqtt.devices", "zones.z.evidence[0].sensor"]
        );
    }

    #[test]
    fn a_sensor_has_one_mapping() {
        let text = base("").replace("sensor = \"s2\"", "sensor = \"s1\"");
        let r = reasons_at(&text, "mqtt.m.topics[1].sensor");
        assert_eq!(r.len(), 1);
        assert!(
            r[0].contains("already produced by mqtt.m.topics[0].sensor"),
            "{}",
            r[0]
        );
        // Across sources and presets too.
        let text =
            base("[mqtt.n.zigbee2mqtt]\ndevices = [{ device = \"s2\", kind = \"contact\" }]\n");
        assert_eq!(paths(&text), ["mqtt.n.zigbee2mqtt.devices[0].device"]);
    }

    #[test]
    fn mqtt_filters_and_captures() {
        let filter = |f: &str, sensor: &str| {
            base("").replace(
                "filter = \"t/2\"\nsensor = \"s2\"",
                &format!("filter = {f:?}\nsensor = {sensor:?}"),
            )
        };
        for bad in ["", "a/#/b", "a#", "a/b+"] {
            assert_eq!(
                paths(&filter(bad, "s2")),
                ["mqtt.m.topics[1].filter"],
                "{bad:?}"
            );
        }
        assert_eq!(paths(&filter("a/+/#", "{1}-{2}")), Vec::<String>::new());
        let r = reasons_at(&filter("a/+/b", "{2}_x"), "mqtt.m.topics[1].sensor");
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("has 1"), "{}", r[0]);
        assert_eq!(paths(&filter("a/+", "{0}")), ["mqtt.m.topics[1].sensor"]);
        assert_eq!(paths(&filter("a/+", "{1}.x")), ["mqtt.m.topics[1].sensor"]);
        assert_eq!(paths(&filter("a/b", "S2")), ["mqtt.m.topics[1].sensor"]);
    }

    #[test]
    fn value_and_timestamp_locators() {
        let loc = |field: &str, v: &str| {
            base("").replace(
                "sensor = \"s2\"",
                &format!("sensor = \"s2\"\n{field} = {v:?}"),
            )
        };
        assert_eq!(paths(&loc("value", "/occupancy")), Vec::<String>::new());
        assert_eq!(paths(&loc("value", "occupancy")), Vec::<String>::new());
        assert_eq!(paths(&loc("value", "")), ["mqtt.m.topics[1].value"]);
        assert_eq!(paths(&loc("value", "/a~x")), ["mqtt.m.topics[1].value"]);
        assert_eq!(
            paths(&loc("timestamp", "a b")),
            ["mqtt.m.topics[1].timestamp"]
        );
    }

    #[test]
    fn mqtt_connection_settings() {
        let src = |line: &str| base("").replace("[mqtt.m]", &format!("[mqtt.m]\n{line}"));
        assert_eq!(paths(&src("port = 0")), ["mqtt.m.port"]);
        assert_eq!(paths(&src("host = \"\"")), ["mqtt.m.host"]);
        assert_eq!(paths(&src("keep_alive = \"0s\"")), ["mqtt.m.keep_alive"]);
        assert_eq!(paths(&src("keep_alive = \"999ms\"")), ["mqtt.m.keep_alive"]);
        assert_eq!(
            paths(&src("keep_alive = \"1500ms\"")),
            ["mqtt.m.keep_alive"]
        );
        assert_eq!(paths(&src("keep_alive = \"19h\"")), ["mqtt.m.keep_alive"]);
        assert_eq!(paths(&src("keep_alive = \"1s\"")), Vec::<String>::new());
        assert_eq!(
            paths(&src("reconnect_max = \"0s\"")),
            ["mqtt.m.reconnect_max"]
        );
        assert_eq!(paths(&src("client_id = \"\"")), ["mqtt.m.client_id"]);
        let long = format!("client_id = \"{}\"", "c".repeat(65_536));
        assert_eq!(paths(&src(&long)), ["mqtt.m.client_id"]);
        assert_eq!(
            paths(&src(&format!("client_id = \"{}\"", "c".repeat(64)))),
            Vec::<String>::new()
        );
        let text = "site = \"home\"\n[mqtt.m]\n[zones.z]\n[[zones.z.evidence]]\nsensor = \"s\"\np_true = 0.9\np_false = 0.1\n";
        assert_eq!(
            paths(text),
            ["mqtt.m", "zones.z.evidence[0].sensor"],
            "a source that reads nothing"
        );
    }

    #[test]
    fn ingest_engine_nats_and_log() {
        let top = |section: &str| base("").replace("[mqtt.m]", &format!("{section}\n[mqtt.m]"));
        assert_eq!(paths(&top("[ingest]\nbuffer = 0")), ["ingest.buffer"]);
        assert_eq!(
            paths(&top("[ingest]\nmax_in_flight = 0")),
            ["ingest.max_in_flight"]
        );
        assert_eq!(paths(&top("[engine]\nbatch = 100001")), ["engine.batch"]);
        assert_eq!(
            paths(&top("[engine]\nbatch = 100000")),
            Vec::<String>::new()
        );
        assert_eq!(
            paths(&top("[engine]\ndrain_timeout = \"0s\"")),
            ["engine.drain_timeout"]
        );
        assert_eq!(
            paths(&top("[nats]\nrequest_timeout = \"0s\"")),
            ["nats.request_timeout"]
        );
        assert_eq!(
            paths(&top("[nats]\nurl = \"nats://h:99999\"")),
            ["nats.url"]
        );
        assert_eq!(
            paths(&top("[nats]\nurl = \"tls://h:4443\"")),
            Vec::<String>::new()
        );
        assert_eq!(
            paths(&top("[log]\nlevel = \"debug\"")),
            Vec::<String>::new()
        );
        assert_eq!(
            paths(&top("[log]\nlevel = \"presenced=bogus\"")),
            ["log.level"]
        );
        assert_eq!(paths(&top("[log]\nlevel = \"\"")), ["log.level"]);
    }

    #[test]
    fn examples_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            seen += 1;
            if let Err(e) = Config::load_valid(&path) {
                panic!("{e}");
            }
        }
        assert!(seen >= 3, "expected the three examples, found {seen}");
    }

    #[test]
    fn demo_example_has_what_the_demo_relies_on() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo.toml");
        let c = Config::load_valid(&path).unwrap();
        assert_eq!(c.site, "demo");
        assert_eq!(c.nats.url, "nats://127.0.0.1:4222");
        let m = &c.mqtt["demo"];
        assert_eq!((m.host.as_str(), m.port), ("127.0.0.1", 1883));
        assert_eq!(m.topics[0].filter, "demo/+/motion");
        assert_eq!(m.topics[0].sensor, "{1}_motion");
        for zone in ["hall", "kitchen"] {
            let z = &c.zones[zone];
            assert_eq!(z.arrive_after, Duration::from_secs(2));
            assert_eq!(z.leave_after, Duration::from_secs(5));
            assert_eq!(z.evidence[0].sensor, format!("{zone}_motion"));
            assert_eq!(z.evidence[0].hold, Some(Duration::from_secs(10)));
        }
    }
}
