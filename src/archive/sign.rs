//! Snapshot signatures: the archiver signs what restore trusts with its
//! NKEY, and restore and `snapshots --verify` check the signature against
//! the archiver's public key in the ownership map.
//!
//! The sha256 in a snapshot's metadata only proves the bytes match the
//! metadata; whoever can write the S3 bucket can replace both. The NKEY
//! seed never leaves the archiver's host, so a signature over the sha256
//! and every other field restore relies on cannot be forged with S3
//! credentials alone.
//!
//! The signed bytes (see docs/ARCHIVE.md, "Signatures") are the UTF-8
//! text [`signed_bytes`] builds: a fixed first line, then one
//! `key=value` line per field in a fixed order, each ending in `\n`. A
//! value holding a newline is never signed nor accepted, so no two
//! metadata sets give the same text.

use super::{meta, ArchiveError, SnapshotMeta};
use crate::acl::access::{Access, Component};
use base64::Engine as _;
use std::path::Path;

/// First line of the signed text; a new scheme gets a new line.
pub const SCHEME: &str = "presenced snapshot signature v1";

/// The exact bytes the archiver signs for `m`, or why they cannot be
/// built (a field holds a newline).
pub fn signed_bytes(m: &SnapshotMeta) -> Result<Vec<u8>, String> {
    let seq = m
        .last_sequence
        .iter()
        .map(|(b, s)| format!("{b}={s}"))
        .collect::<Vec<_>>()
        .join(",");
    let fields: [(&str, String); 10] = [
        ("id", m.id.clone()),
        (meta::SITE, m.site.clone()),
        (meta::BUCKETS, m.buckets.join(",")),
        (meta::LAST_SEQUENCE, seq),
        (meta::SHA256, m.sha256.clone()),
        ("size", m.size.to_string()),
        (meta::FORMAT_VERSION, m.format_version.to_string()),
        (meta::PRESENCED_VERSION, m.presenced_version.clone()),
        (meta::CREATED, m.created.clone()),
        (meta::RECORDS, m.records.to_string()),
    ];
    let mut out = format!("{SCHEME}\n");
    for (k, v) in fields {
        if v.contains(['\n', '\r']) {
            return Err(format!("metadata field {k} holds a line break"));
        }
        out.push_str(k);
        out.push('=');
        out.push_str(&v);
        out.push('\n');
    }
    Ok(out.into_bytes())
}

/// The archiver's signing key: the NKEY seed it connects with.
pub struct Signer {
    pair: nkeys::KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the seed.
        write!(f, "Signer({})", self.pair.public_key())
    }
}

impl Signer {
    /// Reads the seed the way the connection does (private file, user
    /// seed); `nats.nkey_seed_file` of the config.
    pub fn from_seed_file(path: &Path) -> Result<Signer, ArchiveError> {
        let seed = crate::acl::identity::read_seed(path)
            .map_err(|e| ArchiveError::Refused(format!("cannot sign snapshots: {e}")))?;
        Signer::from_seed(&seed)
    }

    pub fn from_seed(seed: &str) -> Result<Signer, ArchiveError> {
        let pair = nkeys::KeyPair::from_seed(seed)
            .map_err(|e| ArchiveError::Refused(format!("cannot sign snapshots: {e}")))?;
        Ok(Signer { pair })
    }

    pub fn public_key(&self) -> String {
        self.pair.public_key()
    }

    /// Sets `signature` and `signer` on `m`.
    pub fn sign(&self, m: &mut SnapshotMeta) -> Result<(), ArchiveError> {
        let bytes = signed_bytes(m).map_err(|what| ArchiveError::Verify {
            id: m.id.clone(),
            what,
        })?;
        let sig = self.pair.sign(&bytes).map_err(|e| ArchiveError::Verify {
            id: m.id.clone(),
            what: format!("cannot sign: {e}"),
        })?;
        m.signature = Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig));
        m.signer = Some(self.public_key());
        Ok(())
    }
}

/// Whom restore and `snapshots --verify` trust, from the ownership map.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// The archiver's public key and its path in the map
    /// (`services.<name>.nkey`); `None` without an ownership map.
    pub archiver: Option<(String, String)>,
    /// `--allow-unsigned`: accept a snapshot whose signature cannot be
    /// checked (none, or no ownership map), logged at WARN.
    pub allow_unsigned: bool,
}

/// What a signature check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Signed by the archiver of the ownership map.
    Signed { signer: String },
    /// Accepted unchecked under `--allow-unsigned`; says why.
    Unchecked(String),
}

impl Trust {
    /// The archiver of `access`: the service that `runs` archiver.
    pub fn from_access(access: &Access, allow_unsigned: bool) -> Result<Trust, String> {
        let archiver = access
            .services
            .iter()
            .find(|s| s.runs(Component::Archiver))
            .ok_or_else(|| {
                "the ownership map has no service that runs archiver, so no key snapshots are signed with".to_owned()
            })?;
        Ok(Trust {
            archiver: Some((
                archiver.nkey.clone(),
                format!("services.{}.nkey", archiver.name),
            )),
            allow_unsigned,
        })
    }

    /// Checks the signature of `m`. An error is a refusal and says why;
    /// an unchecked snapshot under `--allow-unsigned` is logged loudly.
    pub fn check(&self, m: &SnapshotMeta) -> Result<Checked, ArchiveError> {
        let refuse = |why: String| ArchiveError::Signature {
            id: m.id.clone(),
            why,
        };
        let unchecked = |why: String| {
            tracing::warn!(
                snapshot = %m.id,
                reason = %why,
                "SNAPSHOT SIGNATURE NOT CHECKED (--allow-unsigned): anyone with write access to where it is stored could have made it"
            );
            Ok(Checked::Unchecked(why))
        };
        let (sig, signer) = match (&m.signature, &m.signer) {
            (Some(s), Some(k)) => (s, k),
            _ => {
                let why = "it is unsigned (no signature in its metadata)".to_owned();
                return if self.allow_unsigned {
                    unchecked(why)
                } else {
                    Err(refuse(format!(
                        "{why}; give --allow-unsigned to restore it anyway"
                    )))
                };
            }
        };
        let Some((key, path)) = &self.archiver else {
            let why = "no ownership map was given to check its signature against".to_owned();
            return if self.allow_unsigned {
                unchecked(why)
            } else {
                Err(refuse(format!(
                    "{why}; give --access FILE (the access file `presenced acl` reads), or --allow-unsigned"
                )))
            };
        };
        if signer != key {
            return Err(refuse(format!(
                "it is signed by {signer}, not by the archiver of the ownership map ({path} = {key})"
            )));
        }
        let bytes =
            signed_bytes(m).map_err(|e| refuse(format!("its metadata is malformed: {e}")))?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|e| refuse(format!("its signature is not base64url: {e}")))?;
        let pair = nkeys::KeyPair::from_public_key(key)
            .map_err(|e| refuse(format!("{path} is not a public key: {e}")))?;
        pair.verify(&bytes, &sig).map_err(|_| {
            refuse(format!(
                "its signature does not match its content and metadata (sha256 {}): it was changed after the archiver ({path}) signed it",
                m.sha256
            ))
        })?;
        Ok(Checked::Signed {
            signer: signer.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            id: "home/debounce_presence/20261130T015800.123Z".into(),
            site: "home".into(),
            buckets: vec!["presence".into(), "debounce".into()],
            last_sequence: BTreeMap::from([("presence".into(), 12), ("debounce".into(), 7)]),
            sha256: "ab".repeat(32),
            size: 99,
            format_version: 1,
            presenced_version: "0.1.0".into(),
            created: "2026-11-30T01:58:00.123Z".into(),
            records: 5,
            signature: None,
            signer: None,
        }
    }

    fn trust(key: &str) -> Trust {
        Trust {
            archiver: Some((key.to_owned(), "services.archiver.nkey".into())),
            allow_unsigned: false,
        }
    }

    #[test]
    fn the_signed_text_is_fixed() {
        let text = String::from_utf8(signed_bytes(&meta()).unwrap()).unwrap();
        assert_eq!(
            text,
            "presenced snapshot signature v1\nid=home/debounce_presence/20261130T015800.123Z\nsite=home\nbuckets=presence,debounce\nlast-sequence=debounce=7,presence=12\nsha256=abababababababababababababababababababababababababababababababab\nsize=99\nformat-version=1\npresenced-version=0.1.0\ncreated=2026-11-30T01:58:00.123Z\nrecords=5\n"
        );
        let mut m = meta();
        m.site = "home\nsha256=x".into();
        assert!(signed_bytes(&m).is_err());
    }

    #[test]
    fn signed_passes_changed_or_foreign_or_unsigned_is_refused() {
        let archiver = nkeys::KeyPair::new_user();
        let signer = Signer::from_seed(&archiver.seed().unwrap()).unwrap();
        let t = trust(&archiver.public_key());
        let mut m = meta();
        signer.sign(&mut m).unwrap();
        assert_eq!(
            t.check(&m).unwrap(),
            Checked::Signed {
                signer: archiver.public_key()
            }
        );
        // Round trip through the metadata map (object store, S3).
        let back = SnapshotMeta::from_map(&m.id, m.size, &m.to_map()).unwrap();
        assert!(t.check(&back).is_ok());

        for change in [
            |m: &mut SnapshotMeta| m.sha256 = "cd".repeat(32),
            |m: &mut SnapshotMeta| m.size += 1,
            |m: &mut SnapshotMeta| m.id.push('x'),
            |m: &mut SnapshotMeta| {
                m.last_sequence.insert("presence".into(), 1);
            },
            |m: &mut SnapshotMeta| m.buckets.reverse(),
            |m: &mut SnapshotMeta| m.created = "2027-01-01T00:00:00.000Z".into(),
        ] {
            let mut bad = m.clone();
            change(&mut bad);
            let e = t.check(&bad).unwrap_err().to_string();
            assert!(e.contains("does not match"), "{e}");
        }

        let intruder = nkeys::KeyPair::new_user();
        let mut forged = meta();
        Signer::from_seed(&intruder.seed().unwrap())
            .unwrap()
            .sign(&mut forged)
            .unwrap();
        let e = t.check(&forged).unwrap_err().to_string();
        assert!(
            e.contains(&intruder.public_key()) && e.contains("services.archiver.nkey"),
            "{e}"
        );

        let e = t.check(&meta()).unwrap_err().to_string();
        assert!(
            e.contains("unsigned") && e.contains("--allow-unsigned"),
            "{e}"
        );
        let lax = Trust {
            allow_unsigned: true,
            ..t.clone()
        };
        assert!(matches!(lax.check(&meta()), Ok(Checked::Unchecked(_))));
        // The flag accepts the unsigned, never the wrongly signed.
        assert!(lax.check(&forged).is_err());

        let none = Trust::default();
        let e = none.check(&m).unwrap_err().to_string();
        assert!(e.contains("--access"), "{e}");
    }
}
