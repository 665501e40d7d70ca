//! The `[homeassistant]` section (MQTT discovery output) and its checks.

use crate::base::problems::Problems;
use crate::sources::check::{MAX_KEEP_ALIVE, MIN_KEEP_ALIVE};
use crate::sources::config::{default_keep_alive, default_mqtt_host, default_mqtt_port};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Home Assistant MQTT discovery output (`[homeassistant]`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistant {
    /// The broker Home Assistant reads (often the one the sensors use).
    #[serde(default = "default_mqtt_host")]
    pub host: String,
    /// The broker's port (1883 for plain MQTT).
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Default `presenced-<site>-homeassistant`.
    pub client_id: Option<String>,
    /// Broker user, when the broker requires one.
    pub username: Option<String>,
    /// File holding the broker password (a systemd credential in
    /// production); never the password itself in the config.
    pub password_file: Option<PathBuf>,
    /// MQTT keep-alive: how soon a dead broker connection is noticed.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Home Assistant's discovery prefix.
    #[serde(default = "default_discovery_prefix")]
    pub discovery_prefix: String,
    /// State and availability topics live under `<base_topic>/<site>/`.
    #[serde(default = "default_ha_base")]
    pub base_topic: String,
}

fn default_discovery_prefix() -> String {
    "homeassistant".into()
}
fn default_ha_base() -> String {
    "presenced".into()
}

/// Checks `[homeassistant]`, pushing every problem found.
pub fn check(ha: &HomeAssistant, p: &mut Problems) {
    let at = "homeassistant";
    if ha.host.trim().is_empty() {
        p.push(format!("{at}.host"), "is empty");
    }
    if ha.port == 0 {
        p.push(format!("{at}.port"), "must be 1 to 65535, got 0");
    }
    if ha.client_id.as_deref() == Some("") {
        p.push(
            format!("{at}.client_id"),
            "is empty: leave it out for `presenced-<site>-homeassistant`",
        );
    }
    let ka = ha.keep_alive;
    if ka < MIN_KEEP_ALIVE || ka > MAX_KEEP_ALIVE || ka.subsec_nanos() != 0 {
        p.push(
            format!("{at}.keep_alive"),
            format!(
                "must be whole seconds from 1s to {MAX_KEEP_ALIVE:?}, got {}",
                humantime::format_duration(ka)
            ),
        );
    }
    if ha.password_file.is_some() && ha.username.is_none() {
        p.push(
            format!("{at}.password_file"),
            "is set but `username` is not; MQTT sends a password only with a user name",
        );
    }
    for (field, value) in [
        ("discovery_prefix", &ha.discovery_prefix),
        ("base_topic", &ha.base_topic),
    ] {
        if value.is_empty()
            || value.contains(['+', '#'])
            || value.starts_with('/')
            || value.ends_with('/')
        {
            p.push(
                format!("{at}.{field}"),
                format!("{value:?} must be a topic prefix: non-empty, no `+` or `#`, no leading or trailing `/`"),
            );
        }
    }
}
