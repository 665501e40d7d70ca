//! State-first clients: `get` one zone, `watch` a snapshot then deltas,
//! each key with its revision and whether its owner's lease is gone.
//!
//! - [`follow`]: an ordered consumer that survives server restarts and
//!   link cuts, resuming after the last revision it handed out.
//! - [`view`]: JSON lines and the readable table.

pub mod command;
pub mod follow;
pub mod live;
pub mod status;

/// The zone keys of `config`, when it has any: what `watch` and `get`
/// compare KV against to show unconfigured zones.
pub fn configured_zones(config: &crate::config::Config) -> Option<BTreeSet<String>> {
    let keys: BTreeSet<String> = config.presence_entries().map(|(k, _)| k).collect();
    (!keys.is_empty()).then_some(keys)
}
pub mod view;

use crate::naming::{self, Site};
use crate::store::lease::{self, Leases};
use crate::time::Timestamp;
use async_nats::jetstream;
use follow::{Bucket, Entry, Event as Followed, Follower, Op};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Duration;
use view::{Event, View};

/// Which copy of the state to read.
#[derive(Clone, Debug)]
pub enum Source {
    /// The site's leaf: KV `presence` and `owners`.
    Leaf,
    /// The hub's mirrors `presence-<site>` and `owners-<site>` (domain
    /// `hub`), reached through the leaf.
    Hub(Site),
}

struct Streams {
    js: jetstream::Context,
    presence: String,
    owners: String,
    /// How to name the buckets in messages.
    presence_name: String,
    owners_name: String,
}

fn streams(client: &async_nats::Client, source: &Source) -> Streams {
    match source {
        Source::Leaf => Streams {
            js: jetstream::new(client.clone()),
            presence: naming::kv_stream(naming::PRESENCE_BUCKET),
            owners: naming::kv_stream(naming::OWNERS_BUCKET),
            presence_name: format!("KV bucket {}", naming::PRESENCE_BUCKET),
            owners_name: format!("KV bucket {}", naming::OWNERS_BUCKET),
        },
        Source::Hub(site) => {
            let presence = site.hub_mirror(naming::PRESENCE_BUCKET);
            let owners = site.hub_mirror(naming::OWNERS_BUCKET);
            Streams {
                js: jetstream::with_domain(client.clone(), naming::HUB_DOMAIN),
                presence: naming::kv_stream(&presence),
                owners: naming::kv_stream(&owners),
                presence_name: format!("hub mirror {presence}"),
                owners_name: format!("hub mirror {owners}"),
            }
        }
    }
}

/// Reads every lease (a snapshot of the owners bucket); `None` with a
/// warning on stderr when the bucket is not there.
async fn leases_now(client: &async_nats::Client, s: &Streams) -> (Option<Follower>, Leases) {
    let bucket = match Bucket::find(&s.js, &s.owners).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "presenced: {} is not there ({e}): stale flags are unknown",
                s.owners_name
            );
            return (None, Leases::default());
        }
    };
    // What each service runs: the ownership table stored at provisioning,
    // never what a lease claims about itself (see `Leases`).
    let table = match crate::store::published::read(&s.js, &s.owners).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "presenced: the ownership table on {} is unreadable ({e}): stale flags are unknown",
                s.owners_name
            );
            return (None, Leases::default());
        }
    };
    let mut leases = Leases::with_table(table);
    let mut f = Follower::new(client.clone(), s.js.clone(), bucket, ">", true);
    if let Err(e) = f.start().await {
        eprintln!(
            "presenced: cannot read {} ({e}): stale flags are unknown; the identity needs `reads = [\"owners\"]` in the ownership map",
            s.owners_name
        );
        return (None, leases);
    }
    loop {
        match f.next().await {
            Followed::Entry(e) => apply_lease(&mut leases, &e),
            Followed::Reset => leases.clear(),
            Followed::SnapshotDone => break,
        }
    }
    (Some(f), leases)
}

fn apply_lease(leases: &mut Leases, e: &Entry) {
    let lease = match e.op {
        Op::Put => match lease::parse(&e.value) {
            Ok(l) => Some(l),
            Err(reason) => {
                tracing::warn!(key = %e.key, %reason, "unreadable lease; counted as none");
                None
            }
        },
        Op::Delete | Op::Purge => None,
    };
    leases.apply(&e.key, lease);
}

fn stale_of(leases: &Leases, known: bool) -> Option<bool> {
    known.then(|| leases.stale(naming::PRESENCE_BUCKET, Timestamp::now()))
}

/// Prints one zone with its stale flag; an unknown zone is an error.
/// `configured` is the config's zone keys when it has any (an operator's
/// or engine's file): keys outside it are shown unconfigured.
pub async fn get(
    client: async_nats::Client,
    zone: &str,
    json: bool,
    configured: Option<&BTreeSet<String>>,
) -> anyhow::Result<()> {
    if !naming::is_presence_key(zone) {
        anyhow::bail!(
            "{zone:?} is not a zone id ([a-z0-9_-], 1 to 64 characters) nor a person key (person.<id>)"
        );
    }
    let s = streams(&client, &Source::Leaf);
    let store =
        s.js.get_key_value(naming::PRESENCE_BUCKET)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "KV bucket presence is not there ({e}): run `presenced provision` first"
                )
            })?;
    let entry = store
        .entry(zone)
        .await?
        .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
        .ok_or_else(|| anyhow::anyhow!("zone {zone:?} has no state in KV presence"))?;
    let (owners, leases) = leases_now(&client, &s).await;
    let known = owners.is_some();
    let entry = Entry {
        key: entry.key,
        revision: entry.revision,
        op: Op::Put,
        value: entry.value,
    };
    let view = View::new(Event::Snapshot, &entry, stale_of(&leases, known)).against(configured);
    if json {
        println!("{}", view.json());
    } else {
        println!("{}", View::header());
        println!("{}", view.row());
    }
    Ok(())
}

/// Prints every key matching `pattern` (the snapshot), then each change as
/// it happens, and a line for every key whose stale flag flips; runs until
/// killed, across server restarts and link cuts.
pub async fn watch(
    client: async_nats::Client,
    source: Source,
    pattern: &str,
    json: bool,
    configured: Option<&BTreeSet<String>>,
) -> anyhow::Result<()> {
    check_pattern(pattern)?;
    let s = streams(&client, &source);
    let bucket = Bucket::find(&s.js, &s.presence)
        .await
        .map_err(|e| match source {
            Source::Leaf => {
                anyhow::anyhow!("{}: {e}: run `presenced provision` first", s.presence_name)
            }
            Source::Hub(_) => anyhow::anyhow!(
                "{}: {e}: is the hub reachable and provisioned for this site?",
                s.presence_name
            ),
        })?;
    let (mut owners, mut leases) = leases_now(&client, &s).await;
    let known = owners.is_some();
    // A re-snapshot of the owners bucket lands here first, so a lease does
    // not look gone for the moment between the reset and its entry.
    let mut staging: Option<Leases> = None;
    let mut stale = stale_of(&leases, known);
    let mut presence = Follower::new(client.clone(), s.js.clone(), bucket, pattern, false);
    presence
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", s.presence_name))?;
    let mut keys: BTreeMap<String, Entry> = BTreeMap::new();
    let mut in_snapshot = true;
    let mut out = std::io::stdout();
    if !json {
        writeln!(out, "{}", View::header())?;
        out.flush()?;
    }
    loop {
        let next_run_out = leases
            .next_run_out(Timestamp::now())
            .map(|t| t.since(Timestamp::now()) + Duration::from_millis(10))
            .unwrap_or(Duration::from_secs(3600));
        let mut owner_check = false;
        tokio::select! {
            ev = presence.next() => match ev {
                Followed::Entry(e) => {
                    let event = if in_snapshot { Event::Snapshot } else { Event::Change };
                    let view = View::new(event, &e, stale).against(configured);
                    match e.op {
                        Op::Put => { keys.insert(e.key.clone(), e); }
                        Op::Delete | Op::Purge => { keys.remove(&e.key); }
                    }
                    print(&mut out, &view, json)?;
                }
                Followed::SnapshotDone => {
                    if in_snapshot {
                        in_snapshot = false;
                        if json {
                            writeln!(out, "{}", serde_json::json!({
                                "event": "snapshot_end",
                                "keys": keys.len(),
                                "revision": presence.last_seen(),
                            }))?;
                        } else {
                            writeln!(out, "-- end of snapshot: {} key(s); watching for changes --", keys.len())?;
                        }
                        out.flush()?;
                    }
                }
                Followed::Reset => {
                    // The bucket was recreated: what was printed is void.
                    keys.clear();
                    in_snapshot = true;
                    if json {
                        writeln!(out, "{}", serde_json::json!({"event": "reset"}))?;
                    } else {
                        writeln!(out, "-- the bucket was recreated; a new snapshot follows --")?;
                    }
                    out.flush()?;
                }
            },
            ev = next_owner(&mut owners) => {
                match ev {
                    Followed::Entry(e) => match staging.as_mut() {
                        Some(st) => apply_lease(st, &e),
                        None => apply_lease(&mut leases, &e),
                    },
                    Followed::Reset => staging = Some(leases.emptied()),
                    Followed::SnapshotDone => {
                        if let Some(st) = staging.take() {
                            leases = st;
                        }
                    }
                }
                owner_check = staging.is_none();
            }
            _ = tokio::time::sleep(next_run_out) => owner_check = true,
        }
        if owner_check {
            let now = stale_of(&leases, known);
            if now != stale {
                stale = now;
                for e in keys.values() {
                    print(
                        &mut out,
                        &View::new(Event::Owner, e, stale).against(configured),
                        json,
                    )?;
                }
            }
        }
    }
}

/// A KV key pattern: dot-separated tokens of key characters, `*` for one
/// token, `>` (last) for the rest.
pub fn check_pattern(pattern: &str) -> anyhow::Result<()> {
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        let ok = match *t {
            "*" => true,
            ">" => i + 1 == tokens.len(),
            t => {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_=/".contains(&b))
            }
        };
        if !ok {
            anyhow::bail!(
                "watch pattern {pattern:?}: token {} ({t:?}) is not a key token, `*` or a final `>`",
                i + 1
            );
        }
    }
    Ok(())
}

async fn next_owner(owners: &mut Option<Follower>) -> Followed {
    match owners {
        Some(f) => f.next().await,
        None => std::future::pending().await,
    }
}

fn print(out: &mut std::io::Stdout, view: &View, json: bool) -> std::io::Result<()> {
    if json {
        writeln!(out, "{}", view.json())?;
    } else {
        writeln!(out, "{}", view.row())?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(check_pattern(">").is_ok());
        assert!(check_pattern("hall").is_ok());
        assert!(check_pattern("*").is_ok());
        assert!(check_pattern("person.*").is_ok());
        assert!(check_pattern("").is_err());
        assert!(check_pattern("a..b").is_err());
        assert!(check_pattern(">.a").is_err());
        assert!(check_pattern("a b").is_err());
    }
}
