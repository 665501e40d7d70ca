//! The checks of the sources' sections (`[mqtt.<name>]`,
//! `[serial.<name>]`), beside their types (`sources::config`): each pushes
//! a problem and carries on. They also say which sensors the sources
//! produce, for the zones' evidence rules (`config::validate`).

use super::config::{
    EspresenseConfig, MqttSource, SerialFraming, SerialSource, TopicMapping, Zigbee2Mqtt,
    Zigbee2MqttKind,
};
use super::topic::{SensorTemplate, TopicFilter};
use crate::base::naming;
use crate::base::problems::{ConfigProblem, Problems, TOKEN_FORM};
use std::collections::BTreeMap;
use std::time::Duration;

/// rumqttc panics on a non-zero keep-alive under one second and sends the
/// keep-alive as whole seconds in a u16, so anything else either crashes
/// the source or silently becomes another interval.
pub const MIN_KEEP_ALIVE: Duration = Duration::from_secs(1);
pub const MAX_KEEP_ALIVE: Duration = Duration::from_secs(u16::MAX as u64);

/// MQTT strings (client ids, topics) carry a u16 length.
const MAX_MQTT_STRING: usize = u16::MAX as usize;

/// Which sensors the sources can produce, for checking evidence rules.
#[derive(Default)]
pub struct Producers {
    /// Static sensor id to the path of the mapping that produces it.
    pub statics: BTreeMap<String, String>,
    /// `{n}` templates with the path of their mapping.
    pub templates: Vec<(SensorTemplate, String)>,
    pub any_source: bool,
    /// Sensors are produced by another instance (this one runs no ingest).
    pub elsewhere: bool,
    /// Static sensors known to report numbers (a Zigbee2MQTT illuminance,
    /// an LD2410's distances and energies), with what they are.
    pub numeric: BTreeMap<String, &'static str>,
}

/// Checks every source section and returns what they produce.
pub fn check(
    mqtt: &BTreeMap<String, MqttSource>,
    serial: &BTreeMap<String, SerialSource>,
    p: &mut Problems,
) -> Producers {
    let mut producers = Producers {
        any_source: !mqtt.is_empty() || !serial.is_empty(),
        ..Producers::default()
    };
    for (name, source) in mqtt {
        check_mqtt(name, source, &mut producers, p);
    }
    for (name, source) in serial {
        if mqtt.contains_key(name) {
            p.push(
                format!("serial.{name}"),
                format!("source name {name:?} is also an `[mqtt.{name}]` source: names share stream REJECTED, so they must differ"),
            );
        }
        check_serial(name, source, &mut producers, p);
    }
    producers
}

fn check_espresense(at: &str, es: &EspresenseConfig, producers: &mut Producers, p: &mut Problems) {
    if es.base_topic.is_empty()
        || es.base_topic.contains(['+', '#'])
        || es.base_topic.starts_with('/')
        || es.base_topic.ends_with('/')
    {
        p.push(
            format!("{at}.base_topic"),
            format!(
                "{:?} must be non-empty, without `+`, `#` or a leading or trailing `/`",
                es.base_topic
            ),
        );
    }
    if !es.margin.is_finite() || es.margin < 0.0 {
        p.push(
            format!("{at}.margin"),
            format!("must be 0 or more metres, got {}", es.margin),
        );
    }
    if !es.max_distance.is_finite() || es.max_distance <= 0.0 {
        p.push(
            format!("{at}.max_distance"),
            format!("must be more than 0 metres, got {}", es.max_distance),
        );
    }
    p.positive(format!("{at}.timeout"), es.timeout);
    if es.people.is_empty() {
        p.push(
            format!("{at}.people"),
            "is empty: list the devices to track and whose they are",
        );
    }
    let mut devices = BTreeMap::new();
    for (i, person) in es.people.iter().enumerate() {
        let pat = format!("{at}.people[{i}]");
        if person.device.is_empty() || person.device.contains(['+', '#', '/']) {
            p.push(
                format!("{pat}.device"),
                format!(
                    "{:?} must be an ESPresense device id: non-empty, no `+`, `#` or `/`",
                    person.device
                ),
            );
        } else if let Some(first) = devices.insert(person.device.clone(), pat.clone()) {
            p.push(
                format!("{pat}.device"),
                format!("device {:?} is already tracked by {first}", person.device),
            );
        }
        // `<person>_in_<room>` must leave room for a room name.
        if !naming::is_token(&person.person) || person.person.len() > 48 {
            p.push(
                format!("{pat}.person"),
                format!(
                    "person id {:?} is invalid: {TOKEN_FORM}, at most 48 characters",
                    person.person
                ),
            );
            continue;
        }
        add_static(
            producers,
            &format!("{}_home", person.person),
            format!("{pat}.person"),
            p,
        );
        if let Ok(t) = SensorTemplate::parse(&format!("{}_in_{{1}}", person.person), 1) {
            producers.templates.push((t, format!("{pat}.person")));
        }
    }
}

fn check_serial(name: &str, source: &SerialSource, producers: &mut Producers, p: &mut Problems) {
    let at = format!("serial.{name}");
    if !naming::is_token(name) {
        p.push(
            at.clone(),
            format!("source name {name:?} is invalid (it is a subject token of `REJECTED`): {TOKEN_FORM}"),
        );
    }
    if source.device.as_os_str().is_empty() {
        p.push(format!("{at}.device"), "is empty");
    } else if !source.device.is_absolute() {
        p.push(
            format!("{at}.device"),
            format!(
                "{:?} is not an absolute path: use a stable link such as /dev/serial/by-id/...",
                source.device
            ),
        );
    }
    if source.baud == Some(0) {
        p.push(format!("{at}.baud"), "must be above 0");
    }
    p.positive(format!("{at}.reconnect_max"), source.reconnect_max);
    match source.framing {
        SerialFraming::Ld2410 => {
            if !source.sensors.is_empty() {
                p.push(
                    format!("{at}.sensors"),
                    "is for `json_lines`; an LD2410's sensors are named by `sensor_prefix`",
                );
            }
            let Some(prefix) = &source.sensor_prefix else {
                p.push(
                    format!("{at}.sensor_prefix"),
                    "is required for `ld2410`: outputs are named `<sensor_prefix>_present`, `_moving`, ...",
                );
                return;
            };
            let longest = super::ld2410::OUTPUTS
                .iter()
                .map(|o| o.len() + 1)
                .max()
                .unwrap_or(0);
            if !naming::is_token(prefix) || prefix.len() + longest > 64 {
                p.push(
                    format!("{at}.sensor_prefix"),
                    format!(
                        "{prefix:?} is invalid: {TOKEN_FORM}, and at most {} characters so that `{prefix}_detection_distance` fits",
                        64 - longest
                    ),
                );
                return;
            }
            for out in super::ld2410::OUTPUTS {
                let sensor = format!("{prefix}_{out}");
                if out.ends_with("_distance") || out.ends_with("_energy") {
                    producers
                        .numeric
                        .insert(sensor.clone(), "an LD2410 distance or energy");
                }
                add_static(producers, &sensor, format!("{at}.sensor_prefix"), p);
            }
        }
        SerialFraming::JsonLines => {
            for (field, set) in [
                ("sensor_prefix", source.sensor_prefix.is_some()),
                ("engineering_mode", source.engineering_mode),
            ] {
                if set {
                    p.push(format!("{at}.{field}"), "is for `ld2410` framing only");
                }
            }
            if source.sensors.is_empty() {
                // Any id the device prints: one capture matches them all.
                if let Ok(any) = SensorTemplate::parse("{1}", 1) {
                    producers.templates.push((any, format!("{at}.sensors")));
                }
            }
            for (i, sensor) in source.sensors.iter().enumerate() {
                if naming::is_token(sensor) {
                    add_static(producers, sensor, format!("{at}.sensors[{i}]"), p);
                } else {
                    p.push(
                        format!("{at}.sensors[{i}]"),
                        format!("sensor id {sensor:?} is invalid: {TOKEN_FORM}"),
                    );
                }
            }
        }
    }
}

fn check_mqtt(name: &str, source: &MqttSource, producers: &mut Producers, p: &mut Problems) {
    let before = p.0.len();
    check_mqtt_fields(name, source, producers, p);
    if p.0.len() == before {
        check_mqtt_compiles(name, source, p);
    }
}

/// Runs what the MQTT source runs at start (mapping compilation, client
/// options, reading the password file), so that whatever would stop the
/// source stops `check-config` first. Only when the field checks passed:
/// they say the same things with more precise paths.
fn check_mqtt_compiles(name: &str, source: &MqttSource, p: &mut Problems) {
    use super::mqtt::{compile_mappings, options};
    let at = format!("mqtt.{name}");
    if let Err(e) = compile_mappings(source) {
        p.push(at.clone(), format!("mapping {e}"));
    }
    // The password file is read by [`secrets`], not here: this stays a
    // pure function of the text.
    let mut source = source.clone();
    source.password_file = None;
    if let Err(e) = options(name, &source, "check-config") {
        p.push(at, e.to_string());
    }
}

/// Reads every secret file the sources read at start (MQTT password
/// files), so a missing one fails `check-config` and the daemon's start
/// with the field that names it, instead of stopping the source later.
/// A path under `$CREDENTIALS_DIRECTORY/` is skipped when that variable is
/// unset (a build-time check outside the unit: systemd itself refuses to
/// start a unit whose credential is missing).
pub fn secrets(mqtt: &BTreeMap<String, MqttSource>) -> Vec<ConfigProblem> {
    let mut p = Problems::default();
    for (name, source) in mqtt {
        let Some(path) = &source.password_file else {
            continue;
        };
        if crate::base::secrets::resolve_secret_path(path).is_err() {
            continue;
        }
        if let Err(e) = crate::base::secrets::read_secret(path) {
            p.push(
                format!("mqtt.{name}.password_file"),
                format!("cannot read {}: {e}", path.display()),
            );
        }
    }
    p.0
}

fn check_mqtt_fields(name: &str, source: &MqttSource, producers: &mut Producers, p: &mut Problems) {
    let at = format!("mqtt.{name}");
    if !naming::is_token(name) {
        p.push(
            at.clone(),
            format!("source name {name:?} is invalid (it is a subject token of `REJECTED`): {TOKEN_FORM}"),
        );
    }
    if source.host.trim().is_empty() {
        p.push(format!("{at}.host"), "is empty");
    }
    if source.port == 0 {
        p.push(format!("{at}.port"), "must be 1 to 65535, got 0");
    }
    if let Some(id) = &source.client_id {
        if id.is_empty() {
            p.push(
                format!("{at}.client_id"),
                "is empty: the broker keeps the session under this id, leave it out for `presenced-<site>-<source>`",
            );
        } else if id.len() > MAX_MQTT_STRING {
            p.push(
                format!("{at}.client_id"),
                format!(
                    "is {} bytes, MQTT allows at most {MAX_MQTT_STRING}",
                    id.len()
                ),
            );
        }
    }
    let ka = source.keep_alive;
    if ka < MIN_KEEP_ALIVE || ka > MAX_KEEP_ALIVE || ka.subsec_nanos() != 0 {
        p.push(
            format!("{at}.keep_alive"),
            format!(
                "must be whole seconds from 1s to {MAX_KEEP_ALIVE:?} (MQTT sends it in seconds), got {}",
                humantime::format_duration(ka)
            ),
        );
    }
    p.positive(format!("{at}.reconnect_max"), source.reconnect_max);
    if source.max_payload == 0 || source.max_payload > super::mqtt::MQTT_MAX_PACKET {
        p.push(
            format!("{at}.max_payload"),
            format!(
                "must be 1 to {} bytes (MQTT's largest message), got {}",
                super::mqtt::MQTT_MAX_PACKET,
                source.max_payload
            ),
        );
    }

    if source.topics.is_empty() && source.zigbee2mqtt.is_none() && source.espresense.is_none() {
        p.push(
            at.clone(),
            "reads nothing: add `topics`, a `zigbee2mqtt` or an `espresense` section",
        );
    }
    if let Some(es) = &source.espresense {
        check_espresense(&format!("{at}.espresense"), es, producers, p);
    }
    for (i, mapping) in source.topics.iter().enumerate() {
        check_mapping(&format!("{at}.topics[{i}]"), mapping, producers, p);
    }
    if let Some(z2m) = &source.zigbee2mqtt {
        check_zigbee2mqtt(&format!("{at}.zigbee2mqtt"), z2m, producers, p);
    }
}

fn check_mapping(at: &str, mapping: &TopicMapping, producers: &mut Producers, p: &mut Problems) {
    // The grammar of filters and templates is the source's own
    // (sources::topic), so the check and the running source cannot differ.
    let wildcards = match TopicFilter::parse(&mapping.filter) {
        Ok(f) => Some(f.wildcards()),
        Err(e) => {
            p.push(format!("{at}.filter"), e.to_string());
            None
        }
    };
    let sensor_at = format!("{at}.sensor");
    // With a bad filter the count of captures is unknown: only the
    // template's own grammar is checked.
    match SensorTemplate::parse(&mapping.sensor, wildcards.unwrap_or(usize::MAX)) {
        Err(e) => p.push(sensor_at, e.to_string()),
        Ok(t) if t.is_static() => add_static(producers, &mapping.sensor, sensor_at, p),
        Ok(t) => producers.templates.push((t, sensor_at)),
    }

    if let Some(value) = &mapping.value {
        if let Err(why) = check_locator(value) {
            p.push(format!("{at}.value"), why);
        }
    }
    if let Some(ts) = &mapping.timestamp {
        if let Err(why) = check_locator(ts) {
            p.push(format!("{at}.timestamp"), why);
        }
    }
}

fn check_zigbee2mqtt(at: &str, z2m: &Zigbee2Mqtt, producers: &mut Producers, p: &mut Problems) {
    let base = &z2m.base_topic;
    if base.is_empty()
        || base.contains(['+', '#', '\0'])
        || base.starts_with('/')
        || base.ends_with('/')
    {
        p.push(
            format!("{at}.base_topic"),
            format!("{base:?} is not a base topic: non-empty, no `+`, `#` or NUL, no leading or trailing `/`"),
        );
    }
    if z2m.devices.is_empty() {
        p.push(
            format!("{at}.devices"),
            "is empty: list devices or remove the section",
        );
    }
    for (i, device) in z2m.devices.iter().enumerate() {
        let dat = format!("{at}.devices[{i}]");
        let name = &device.device;
        if name.is_empty() || name.contains(['+', '#', '\0']) {
            p.push(
                format!("{dat}.device"),
                format!(
                    "{name:?} is not a friendly name: non-empty, no MQTT wildcards `+`/`#` or NUL"
                ),
            );
        }
        let id = device.sensor.clone().unwrap_or_else(|| name.clone());
        if device.kind == Zigbee2MqttKind::Illuminance {
            producers
                .numeric
                .insert(id, "a Zigbee2MQTT illuminance (lux)");
        }
        match &device.sensor {
            Some(sensor) if naming::is_token(sensor) => {
                add_static(producers, sensor, format!("{dat}.sensor"), p)
            }
            Some(sensor) => p.push(
                format!("{dat}.sensor"),
                format!("sensor id {sensor:?} is invalid: {TOKEN_FORM}"),
            ),
            None if naming::is_token(name) => add_static(producers, name, format!("{dat}.device"), p),
            None if name.is_empty() => {}
            None => p.push(
                format!("{dat}.sensor"),
                format!(
                    "missing: the friendly name {name:?} is not a valid sensor id, so set `sensor` ({TOKEN_FORM}), e.g. {:?}",
                    suggest_token(name, device.kind)
                ),
            ),
        }
    }
}

/// A sensor id derived from a friendly name, for the problem text.
fn suggest_token(name: &str, kind: Zigbee2MqttKind) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.trim_matches('_').is_empty() {
        s = match kind {
            Zigbee2MqttKind::Occupancy => "motion",
            Zigbee2MqttKind::Contact => "contact",
            Zigbee2MqttKind::Illuminance => "illuminance",
        }
        .into();
    }
    s.chars().take(64).collect()
}

/// Records a static sensor; a second producer of one id would interleave
/// two devices' readings under one name, so it is refused where it occurs.
fn add_static(producers: &mut Producers, sensor: &str, at: String, p: &mut Problems) {
    if let Some(first) = producers.statics.get(sensor) {
        p.push(
            at,
            format!("sensor {sensor:?} is already produced by {first}: each sensor id needs exactly one mapping"),
        );
    } else {
        producers.statics.insert(sensor.to_owned(), at);
    }
}

/// `value`/`timestamp`: a JSON pointer (`/a/b`, with `~0`/`~1` escapes) or
/// a top-level field name.
fn check_locator(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(
            "is empty: leave it out for a bare payload, or give a JSON pointer (`/occupancy`) or a field name".into(),
        );
    }
    if let Some(pointer) = s.strip_prefix('/') {
        let mut chars = pointer.chars();
        while let Some(c) = chars.next() {
            if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                return Err(format!(
                    "{s:?} is not a JSON pointer: `~` must be followed by 0 (for `~`) or 1 (for `/`)"
                ));
            }
        }
        Ok(())
    } else if s.chars().any(char::is_whitespace) {
        Err(format!(
            "{s:?} is not a field name (no whitespace) nor a JSON pointer (starts with `/`)"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators() {
        assert!(check_locator("/occupancy").is_ok());
        assert!(check_locator("/a~1b/~0c").is_ok());
        assert!(check_locator("occupancy").is_ok());
        assert!(check_locator("").is_err());
        assert!(check_locator("/a~2").is_err());
        assert!(check_locator("/a~").is_err());
        assert!(check_locator("two words").is_err());
    }
}
