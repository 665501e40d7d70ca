//! The ownership map: which identity writes and reads which keyspace.
//!
//! Owners follow from the components a service runs (ingest, engine,
//! archiver), so the map cannot give a keyspace two writers without saying
//! so loudly. Reads beyond a service's own keyspaces are listed explicitly:
//! everything not listed is closed.

pub use crate::base::ownership::{Component, Keyspace};
use crate::base::secrets::check_public_key;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// The access file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessFile {
    /// Provisioning identity: manages streams, buckets and consumers and
    /// may read everything, but writes no keyspace.
    pub admin: Option<Identity>,
    /// Identity a site's leafnode uses to connect to the hub.
    pub leafnode: Option<Identity>,
    /// Each service (`[services.<name>]`, the config's `service`): its
    /// key, the components it runs and what it reads; its grants derive
    /// from these.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The identity's public NKEY (`U...`, from `presenced keygen`).
    pub nkey: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    /// The service's public NKEY (`U...`); the archiver's also checks
    /// snapshot signatures.
    pub nkey: String,
    /// Components the service runs (`ingest`, `engine`, `archiver`,
    /// `restore`).
    #[serde(default)]
    pub runs: Vec<String>,
    /// Keyspaces the service reads beyond its own.
    #[serde(default)]
    pub reads: Vec<String>,
}

/// One service after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub nkey: String,
    pub runs: Vec<Component>,
    /// Keyspaces it writes (excluding the shared ones, where it writes its
    /// own key or subject).
    pub owns: Vec<Keyspace>,
    /// Keyspaces it reads that it does not own, including what its
    /// components need.
    pub reads: Vec<Keyspace>,
}

impl Service {
    pub fn runs(&self, c: Component) -> bool {
        self.runs.contains(&c)
    }

    pub fn owns(&self, k: Keyspace) -> bool {
        self.owns.contains(&k)
    }

    /// Reads `k`, as owner or by grant.
    pub fn reads(&self, k: Keyspace) -> bool {
        self.owns.contains(&k) || self.reads.contains(&k)
    }
}

/// A validated ownership map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub admin: Option<String>,
    pub leafnode: Option<String>,
    /// Sorted by name.
    pub services: Vec<Service>,
}

impl Access {
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The service owning `k`, if any (never for shared keyspaces).
    pub fn owner(&self, k: Keyspace) -> Option<&Service> {
        self.services.iter().find(|s| s.owns(k))
    }
}

/// One problem, with the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read access file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("access file {path} is not valid TOML: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("access file {path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

impl Access {
    pub fn load(path: &Path) -> Result<Access, AccessError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: shown.clone(),
            source,
        })?;
        Access::parse(&text, &shown)
    }

    /// Parses and validates; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Access, AccessError> {
        let file: AccessFile = toml::from_str(text).map_err(|e| AccessError::Parse {
            path: origin.to_owned(),
            source: Box::new(e),
        })?;
        file.validate().map_err(|problems| AccessError::Invalid {
            path: origin.to_owned(),
            problems,
        })
    }
}

impl AccessFile {
    pub fn validate(&self) -> Result<Access, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut problem = |path: String, message: String| problems.push(Problem { path, message });
        // nats-server refuses two users with one key; say where instead.
        let mut keys: BTreeMap<String, String> = BTreeMap::new();
        let mut check_key = |path: String, key: &str, problem: &mut dyn FnMut(String, String)| {
            if let Err(e) = check_public_key(key) {
                problem(path.clone(), e.to_string());
            } else if let Some(first) = keys.get(key) {
                problem(
                    path.clone(),
                    format!("the same key is already used by {first}: one identity per key"),
                );
            }
            keys.entry(key.to_owned()).or_insert(path);
        };
        for (field, ident) in [("admin", &self.admin), ("leafnode", &self.leafnode)] {
            if let Some(id) = ident {
                check_key(format!("{field}.nkey"), &id.nkey, &mut problem);
            }
        }
        let mut owners: BTreeMap<Keyspace, String> = BTreeMap::new();
        let mut services = Vec::new();
        for (name, entry) in &self.services {
            let at = format!("services.{name}");
            if !crate::naming::is_token(name) {
                problem(
                    at.clone(),
                    format!("service name {name:?} is invalid: use [a-z0-9_-], 1 to 64 characters"),
                );
            }
            check_key(format!("{at}.nkey"), &entry.nkey, &mut problem);
            let mut runs = Vec::new();
            for (i, c) in entry.runs.iter().enumerate() {
                match Component::parse(c) {
                    Some(c) if runs.contains(&c) => {
                        problem(format!("{at}.runs[{i}]"), format!("{c:?} is listed twice"))
                    }
                    Some(c) => runs.push(c),
                    None => problem(
                        format!("{at}.runs[{i}]"),
                        format!(
                            "unknown component {c:?} (known: ingest, engine, archiver, restore)"
                        ),
                    ),
                }
            }
            runs.sort();
            let mut owns = Vec::new();
            for c in &runs {
                for &k in c.owns() {
                    match owners.get(&k) {
                        Some(first) => problem(
                            format!("{at}.runs"),
                            format!(
                                "keyspace {k} would have two writers: {first} already runs {}; run each component in one service only",
                                c.name()
                            ),
                        ),
                        None => {
                            owners.insert(k, at.clone());
                        }
                    }
                    owns.push(k);
                }
            }
            let mut reads = Vec::new();
            for (i, r) in entry.reads.iter().enumerate() {
                match Keyspace::parse(r) {
                    Some(k) if owns.contains(&k) => problem(
                        format!("{at}.reads[{i}]"),
                        format!("{k} is written by this service, which reads it anyway"),
                    ),
                    Some(k) if reads.contains(&k) => {
                        problem(format!("{at}.reads[{i}]"), format!("{k} is listed twice"))
                    }
                    Some(k) => reads.push(k),
                    None => problem(
                        format!("{at}.reads[{i}]"),
                        format!(
                            "unknown keyspace {r:?} (known: {})",
                            Keyspace::ALL.map(Keyspace::name).join(", ")
                        ),
                    ),
                }
            }
            for c in &runs {
                for &k in c.needs() {
                    if !owns.contains(&k) && !reads.contains(&k) {
                        reads.push(k);
                    }
                }
            }
            owns.sort();
            reads.sort();
            services.push(Service {
                name: name.clone(),
                nkey: entry.nkey.clone(),
                runs,
                owns,
                reads,
            });
        }
        if problems.is_empty() {
            Ok(Access {
                admin: self.admin.as_ref().map(|a| a.nkey.clone()),
                leafnode: self.leafnode.as_ref().map(|a| a.nkey.clone()),
                services,
            })
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        nkeys::KeyPair::new_user().public_key()
    }

    fn problems(text: &str) -> Vec<String> {
        match Access::parse(text, "access.toml") {
            Err(AccessError::Invalid { problems, .. }) => {
                problems.iter().map(|p| p.to_string()).collect()
            }
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    #[test]
    fn ownership_follows_components() {
        let text = format!(
            r#"
admin = {{ nkey = "{}" }}
[services.presenced]
nkey = "{}"
runs = ["ingest", "engine"]
[services.dashboard]
nkey = "{}"
reads = ["presence", "events"]
"#,
            key(),
            key(),
            key()
        );
        let a = Access::parse(&text, "access.toml").unwrap();
        let p = a.service("presenced").unwrap();
        assert!(p.owns(Keyspace::Sensors) && p.owns(Keyspace::Presence));
        assert!(!p.owns(Keyspace::Snapshots));
        assert_eq!(
            a.owner(Keyspace::Events).map(|s| s.name.as_str()),
            Some("presenced")
        );
        let d = a.service("dashboard").unwrap();
        assert!(d.owns.is_empty());
        assert_eq!(d.reads, vec![Keyspace::Presence, Keyspace::Events]);
        assert!(!d.reads(Keyspace::Debounce));
        assert!(a.owner(Keyspace::Archive).is_none());
    }

    #[test]
    fn engine_alone_reads_sensors_without_a_grant() {
        let text = format!(
            "[services.engine]\nnkey = \"{}\"\nruns = [\"engine\"]\n",
            key()
        );
        let a = Access::parse(&text, "access.toml").unwrap();
        let e = a.service("engine").unwrap();
        assert!(e.reads(Keyspace::Sensors) && !e.owns(Keyspace::Sensors));
    }

    #[test]
    fn two_owners_unknown_names_and_bad_keys_are_reported_with_paths() {
        let k = key();
        let text = format!(
            r#"
admin = {{ nkey = "{k}" }}
[services.a]
nkey = "{}"
runs = ["engine"]
[services.b]
nkey = "{}"
runs = ["engine", "scheduler"]
reads = ["presense"]
[services.c]
nkey = "not-a-key"
[services.d]
nkey = "{k}"
[services."Bad.Name"]
nkey = "{}"
"#,
            key(),
            key(),
            key()
        );
        let p = problems(&text);
        let has =
            |path: &str, word: &str| p.iter().any(|l| l.starts_with(path) && l.contains(word));
        assert!(has("services.b.runs:", "two writers"), "{p:#?}");
        assert!(has("services.b.runs[1]", "unknown component"), "{p:#?}");
        assert!(
            has("services.b.reads[0]", "unknown keyspace \"presense\""),
            "{p:#?}"
        );
        assert!(
            has("services.c.nkey", "not an NKEY user public key"),
            "{p:#?}"
        );
        assert!(has("services.d.nkey", "admin.nkey"), "{p:#?}");
        assert!(has("services.Bad.Name:", "invalid"), "{p:#?}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = format!(
            "[services.a]\nnkey = \"{}\"\nwrites = [\"presence\"]\n",
            key()
        );
        let e = Access::parse(&text, "access.toml").unwrap_err().to_string();
        assert!(e.contains("access.toml") && e.contains("writes"), "{e}");
    }
}
