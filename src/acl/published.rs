//! The ownership map as the running system sees it: the table lives in
//! [`crate::store::published`] (the store reads and writes it); this module
//! derives it from the access file.

pub use crate::store::published::*;

use super::access::{Access, Keyspace};

impl Published {
    /// The table of an access file: each service's components and whether
    /// it holds the `commands` grant.
    pub fn from_access(access: &Access) -> Published {
        Published {
            v: SCHEMA,
            services: access
                .services
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        PublishedService {
                            runs: s.runs.iter().map(|c| c.name().to_owned()).collect(),
                            commands: s.reads.contains(&Keyspace::Commands),
                            reads: s.reads.iter().map(|k| k.name().to_owned()).collect(),
                        },
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::ownership::Component;
    use std::collections::HashMap;

    fn table() -> Published {
        let k = || nkeys::KeyPair::new_user().public_key();
        let text = format!(
            "[services.presenced]\nnkey = \"{}\"\nruns = [\"ingest\", \"engine\"]\n[services.operator]\nnkey = \"{}\"\nreads = [\"commands\", \"presence\"]\n[services.dashboard]\nnkey = \"{}\"\nreads = [\"presence\"]\n",
            k(),
            k(),
            k()
        );
        Published::from_access(&Access::parse(&text, "access.toml").unwrap())
    }

    #[test]
    fn round_trips_through_metadata() {
        let t = table();
        let mut m = HashMap::new();
        assert_eq!(Published::from_metadata(&m), Ok(None));
        m.insert(METADATA_KEY.to_owned(), t.to_json());
        assert_eq!(Published::from_metadata(&m), Ok(Some(t.clone())));
        assert!(t.runs("presenced", Component::Engine));
        assert!(!t.runs("operator", Component::Engine));
        assert!(!t.runs("nobody", Component::Ingest));
        assert_eq!(t.commanders().collect::<Vec<_>>(), vec!["operator"]);
        m.insert(METADATA_KEY.to_owned(), "{\"v\":9,\"services\":{}}".into());
        assert!(Published::from_metadata(&m).is_err());
    }

    #[test]
    fn replies_only_to_inboxes_of_commanders() {
        let t = table();
        assert!(reply_allowed("_INBOX.operator.abc.1", Some(&t)));
        for bad in [
            "_INBOX.dashboard.abc",
            "_INBOX.presenced.abc",
            "_INBOX.operator",
            "_INBOX.operator.",
            "_INBOX.operator.>",
            "_INBOX.operator.*",
            "_INBOX.operatorx.a",
            "$KV.archive.x",
            "$KV.presence.hall",
            "audit.events.home.archiver",
            "$JS.API.STREAM.PURGE.REJECTED",
            "_INBOX.operator..a",
        ] {
            assert!(!reply_allowed(bad, Some(&t)), "{bad}");
        }
        assert!(reply_allowed("_INBOX.abc", None));
        assert!(!reply_allowed("$KV.archive.x", None));
        assert!(!reply_allowed("_INBOX", None));
    }
}
