//! The meaning checks behind [`Config::validate`]: each one pushes a
//! [`ConfigProblem`] and carries on, so one run lists everything to fix.

use super::Config;
use super::ConfigProblem;
use crate::base::problems::Problems;
use crate::naming;

pub(super) fn all(config: &Config) -> Vec<ConfigProblem> {
    let mut p = Problems::default();
    check_top(config, &mut p);
    check_runs(config, &mut p);
    let mut producers = crate::sources::check::check(&config.mqtt, &config.serial, &mut p);
    // Without ingest the sensors come from another instance of the site
    // (a split deployment): which ones is not this file's to know.
    producers.elsewhere = !config
        .components()
        .contains(&crate::base::ownership::Component::Ingest);
    if let Some(ha) = &config.homeassistant {
        crate::homeassistant::config::check(ha, &mut p);
    }
    if let Some(hub) = &config.hub {
        crate::hub::config::check(hub, &mut p);
    }
    for (name, zone) in &config.zones {
        crate::engine::config::check_zone("zones", name, zone, &producers, &mut p);
    }
    for (name, person) in &config.persons {
        crate::engine::config::check_zone("persons", name, person, &producers, &mut p);
    }
    if let Some(archive) = &config.archive {
        crate::archive::config::check(archive, &mut p);
    }
    check_has_zones(config, &mut p);
    p.0
}

/// A config whose engine would decide nothing is refused: without `runs`
/// a file with sources and no zone would quietly run ingest only, which is
/// what a forgotten `[zones.*]` looks like. A file with neither sources nor
/// zones (an admin's or a client's: `provision`, `watch`) needs none.
fn check_has_zones(config: &Config, p: &mut Problems) {
    use crate::base::ownership::Component;
    if !config.zones.is_empty() || !config.persons.is_empty() {
        return;
    }
    let sources = !config.mqtt.is_empty() || !config.serial.is_empty();
    match &config.runs {
        None if sources => p.push(
            "zones",
            "no zone is configured, so presence is never decided: add a `[zones.<id>]` table with `[[zones.<id>.evidence]]` rules (see examples/), or set `runs = [\"ingest\"]` for an instance that only stores readings",
        ),
        Some(names) if names.iter().any(|n| Component::parse(n) == Some(Component::Engine)) => p.push(
            "zones",
            "`runs` lists engine but no zone or person is configured: the engine would decide nothing; add a `[zones.<id>]` table",
        ),
        _ => {}
    }
}

fn check_top(config: &Config, p: &mut Problems) {
    if !naming::is_token(&config.service) {
        p.push(
            "service",
            format!(
                "{:?} is not a service name: use 1 to 64 of [a-z0-9_-]",
                config.service
            ),
        );
    }
    if !naming::is_site_id(&config.site) {
        p.push(
            "site",
            format!(
                "{:?} is not a site id: use 1 to {} of [a-z0-9-] (no `_`: site ids end up in host and container names)",
                config.site,
                naming::MAX_SITE_LEN
            ),
        );
    }

    crate::logging::check(&config.log, p);

    crate::store::config::check(&config.nats, p);

    crate::ingest::check_config(&config.ingest, p);

    crate::engine::config::check_engine(&config.engine, p);

    crate::store::config::check_lease(&config.lease, p);
}

/// `runs` names known components once each, and agrees with the
/// sections present: a source in an instance that runs no ingest, or
/// `[archive]` without the archiver, would be silently ignored.
fn check_runs(config: &Config, p: &mut Problems) {
    use crate::base::ownership::Component;
    crate::supervise::config::check(&config.health, p);
    let Some(names) = &config.runs else {
        return;
    };
    let mut seen = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match Component::parse(name) {
            Some(c) if seen.contains(&c) => {
                p.push(format!("runs[{i}]"), format!("{name:?} is listed twice"))
            }
            Some(c) => seen.push(c),
            None => p.push(
                format!("runs[{i}]"),
                format!("unknown component {name:?}: use ingest, engine or archiver"),
            ),
        }
    }
    let has = |c| seen.contains(&c);
    if names.is_empty() {
        p.push(
            "runs",
            "is empty: list at least one of ingest, engine, archiver",
        );
    }
    if has(Component::Ingest) && config.mqtt.is_empty() && config.serial.is_empty() {
        p.push(
            "runs",
            "lists ingest but no source is configured: add an `[mqtt.<name>]` or `[serial.<name>]` source",
        );
    }
    if !has(Component::Ingest) {
        for name in config.mqtt.keys() {
            p.push(
                format!("mqtt.{name}"),
                "is configured but `runs` does not list ingest: it would never be read",
            );
        }
        for name in config.serial.keys() {
            p.push(
                format!("serial.{name}"),
                "is configured but `runs` does not list ingest: it would never be read",
            );
        }
    }
    if has(Component::Archiver) != config.archive.is_some() {
        let reason = if config.archive.is_some() {
            "`[archive]` is configured but `runs` does not list archiver"
        } else {
            "lists archiver but `[archive]` is missing"
        };
        p.push("runs", reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(text: &str) -> Vec<String> {
        let c = Config::from_toml(text, std::path::Path::new("t.toml")).unwrap();
        all(&c).into_iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn shipped_examples_pass_the_daemons_compile_path() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let c = Config::from_toml(&text, &path).unwrap();
            // Secrets of the examples live outside the repository.
            let problems: Vec<String> = all(&c).into_iter().map(|p| p.to_string()).collect();
            assert!(problems.is_empty(), "{}: {problems:?}", path.display());
            for (name, m) in &c.mqtt {
                crate::sources::mqtt::compile_mappings(m)
                    .unwrap_or_else(|e| panic!("{}: mqtt.{name}: {e}", path.display()));
            }
        }
    }

    const MQTT_BASE: &str = r#"
site = "t"
[mqtt.main]
username = "presenced"
[[mqtt.main.topics]]
filter = "a/motion"
sensor = "a_motion"
[zones.a]
evidence = [{ sensor = "a_motion", p_true = 0.9, p_false = 0.1 }]
"#;

    #[test]
    fn a_missing_password_file_is_named_with_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("mqtt-password");
        let text = format!(
            "{}\n",
            MQTT_BASE.replace(
                "username = \"presenced\"",
                &format!(
                    "username = \"presenced\"\npassword_file = {:?}",
                    missing.display().to_string()
                )
            )
        );
        let c = Config::from_toml(&text, std::path::Path::new("t.toml")).unwrap();
        assert!(all(&c).is_empty(), "validation itself reads no files");
        let problems: Vec<String> = crate::sources::check::secrets(&c.mqtt)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("mqtt.main.password_file: cannot read ")
                && problems[0].contains("mqtt-password"),
            "{problems:?}"
        );
        std::fs::write(&missing, "secret\n").unwrap();
        assert!(crate::sources::check::secrets(&c.mqtt).is_empty());
        // Under systemd's credentials directory: checked in the unit, not here.
        let text = MQTT_BASE.replace(
            "username = \"presenced\"",
            "username = \"presenced\"\npassword_file = \"$CREDENTIALS_DIRECTORY/mqtt\"",
        );
        let c = Config::from_toml(&text, std::path::Path::new("t.toml")).unwrap();
        if std::env::var_os("CREDENTIALS_DIRECTORY").is_none() {
            assert!(crate::sources::check::secrets(&c.mqtt).is_empty());
        }
    }

    #[test]
    fn mqtt_limits_are_checked() {
        let text = MQTT_BASE.replace("[mqtt.main]", "[mqtt.main]\nmax_payload = 0");
        assert_eq!(
            problems_of(&text),
            ["mqtt.main.max_payload: must be 1 to 268435455 bytes (MQTT's largest message), got 0"]
        );
        let text = format!("{MQTT_BASE}\n[ingest]\nmax_clock_skew = \"0s\"\n");
        assert_eq!(
            problems_of(&text),
            ["ingest.max_clock_skew: must be longer than 0s"]
        );
    }
}
