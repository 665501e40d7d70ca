//! Secrets: where a secret file is (systemd's credentials directory), how
//! it is read, and NKEY identities (creating a service's seed and checking
//! one before use). One module for every reader of a secret: the NATS
//! connection, the MQTT and Home Assistant passwords, the S3 keys and the
//! config checks resolve and read them the same way.
//!
//! A seed is the service's password. It is written once, readable by its
//! owner only, and the daemon refuses a seed others could have read: a
//! leaked seed lets anyone write the service's keyspaces.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Prefix of secret paths that live in systemd's credentials directory.
pub const CREDENTIALS_PREFIX: &str = "$CREDENTIALS_DIRECTORY/";

/// Resolves a secret file path: a leading `$CREDENTIALS_DIRECTORY/` is
/// replaced by the directory systemd passes in that variable (set by
/// `LoadCredential=`), so a config in the world-readable Nix store can name
/// a secret without containing it. Other paths are returned unchanged.
pub fn resolve_secret_path(path: &Path) -> Result<PathBuf, String> {
    resolve_secret_path_in(path, std::env::var_os("CREDENTIALS_DIRECTORY"))
}

fn resolve_secret_path_in(
    path: &Path,
    credentials_dir: Option<std::ffi::OsString>,
) -> Result<PathBuf, String> {
    let Some(rest) = path
        .to_str()
        .and_then(|s| s.strip_prefix(CREDENTIALS_PREFIX))
    else {
        return Ok(path.to_owned());
    };
    match credentials_dir {
        Some(dir) => Ok(PathBuf::from(dir).join(rest)),
        None => Err(format!(
            "{} names systemd's credentials directory, but CREDENTIALS_DIRECTORY is not set (is LoadCredential= configured?)",
            path.display()
        )),
    }
}

/// Reads a secret file (see [`resolve_secret_path`]), trimming one
/// trailing newline (editors add one).
pub fn read_secret(path: &Path) -> std::io::Result<String> {
    let path = resolve_secret_path(path).map_err(std::io::Error::other)?;
    let text = std::fs::read_to_string(path)?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("service name {0:?} is invalid: use [a-z0-9_-], 1 to 64 characters")]
    Service(String),
    #[error("{path} already exists: keygen never overwrites a seed (remove it first to rotate the key, see docs/SECURITY.md)")]
    Exists { path: PathBuf },
    #[error("cannot write NKEY seed file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "NKEY seed file {path} is missing: create it with `presenced keygen SERVICE --out {path}`"
    )]
    Missing { path: PathBuf },
    #[error("cannot read NKEY seed file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("NKEY seed file {path} has mode {mode:04o}: group and others must not read it; run `chmod 600 {path}`")]
    Readable { path: PathBuf, mode: u32 },
    #[error("NKEY seed file {path} does not hold a user seed (it should start with SU): {reason}; create one with `presenced keygen SERVICE --out FILE`")]
    NotUserSeed { path: PathBuf, reason: String },
    #[error("{key:?} is not an NKEY user public key (U followed by 55 characters): {reason}")]
    PublicKey { key: String, reason: String },
}

/// A freshly written identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub service: String,
    pub public_key: String,
    pub path: PathBuf,
}

/// Writes a new user seed to `out` (mode 0600, never over an existing
/// file) and returns its public key.
pub fn keygen(service: &str, out: &Path) -> Result<Generated, IdentityError> {
    crate::base::naming::check_token("service", service)
        .map_err(|_| IdentityError::Service(service.to_owned()))?;
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().map_err(|e| IdentityError::Write {
        path: out.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    // create_new: refuses an existing file atomically, with no window in
    // which a different seed could be replaced; mode applies at creation.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => IdentityError::Exists {
                path: out.to_owned(),
            },
            _ => IdentityError::Write {
                path: out.to_owned(),
                source,
            },
        })?;
    writeln!(file, "{seed}")
        .and_then(|()| file.sync_all())
        .map_err(|source| IdentityError::Write {
            path: out.to_owned(),
            source,
        })?;
    Ok(Generated {
        service: service.to_owned(),
        public_key: pair.public_key(),
        path: out.to_owned(),
    })
}

/// Reads a seed file the way the daemon must: present, private to its
/// owner, and holding a user seed. Returns the seed text.
pub fn read_seed(path: &Path) -> Result<String, IdentityError> {
    let resolved = resolve_secret_path(path).map_err(|e| IdentityError::Read {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?;
    let meta = match std::fs::metadata(&resolved) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(IdentityError::Missing { path: resolved })
        }
        Err(source) => {
            return Err(IdentityError::Read {
                path: resolved,
                source,
            })
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Readable {
            path: resolved,
            mode,
        });
    }
    let seed = read_secret(path).map_err(|source| IdentityError::Read {
        path: resolved.clone(),
        source,
    })?;
    let seed = seed.trim().to_owned();
    let not_user = |reason: String| IdentityError::NotUserSeed {
        path: resolved.clone(),
        reason,
    };
    if !seed.starts_with("SU") {
        return Err(not_user(format!(
            "it starts with {:?}",
            seed.chars().take(2).collect::<String>()
        )));
    }
    let pair = nkeys::KeyPair::from_seed(&seed).map_err(|e| not_user(e.to_string()))?;
    if !matches!(pair.key_pair_type(), nkeys::KeyPairType::User) {
        return Err(not_user("it is not of the user type".to_owned()));
    }
    Ok(seed)
}

/// The public key of a seed (for logs and `keygen`'s output).
pub fn public_key_of(seed: &str) -> Option<String> {
    nkeys::KeyPair::from_seed(seed).ok().map(|p| p.public_key())
}

/// Checks that `key` is a user public key.
pub fn check_public_key(key: &str) -> Result<(), IdentityError> {
    let err = |reason: String| IdentityError::PublicKey {
        key: key.to_owned(),
        reason,
    };
    if !key.starts_with('U') {
        return Err(err("it does not start with U".to_owned()));
    }
    let pair = nkeys::KeyPair::from_public_key(key).map_err(|e| err(e.to_string()))?;
    if !matches!(pair.key_pair_type(), nkeys::KeyPairType::User) {
        return Err(err("it is not of the user type".to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn secret_paths_resolve_against_the_credentials_directory() {
        use super::resolve_secret_path_in as r;
        use std::path::Path;
        assert_eq!(
            r(Path::new("/etc/seed"), None).unwrap(),
            Path::new("/etc/seed")
        );
        assert_eq!(
            r(
                Path::new("$CREDENTIALS_DIRECTORY/nkey-seed"),
                Some("/run/credentials/x".into())
            )
            .unwrap(),
            Path::new("/run/credentials/x/nkey-seed")
        );
        let e = r(Path::new("$CREDENTIALS_DIRECTORY/nkey-seed"), None).unwrap_err();
        assert!(e.contains("CREDENTIALS_DIRECTORY is not set"), "{e}");
    }

    use super::*;

    #[test]
    fn keygen_writes_a_private_user_seed_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("engine.seed");
        let g = keygen("engine", &out).unwrap();
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let seed = read_seed(&out).unwrap();
        assert_eq!(public_key_of(&seed).as_deref(), Some(g.public_key.as_str()));
        check_public_key(&g.public_key).unwrap();
        let before = std::fs::read(&out).unwrap();
        assert!(matches!(
            keygen("engine", &out),
            Err(IdentityError::Exists { .. })
        ));
        assert_eq!(std::fs::read(&out).unwrap(), before, "seed was overwritten");
        assert!(matches!(
            keygen("Bad.Name", &dir.path().join("x")),
            Err(IdentityError::Service(_))
        ));
    }

    #[test]
    fn seed_checks_name_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.seed");
        let e = read_seed(&missing).unwrap_err().to_string();
        assert!(
            e.contains("none.seed") && e.contains("presenced keygen"),
            "{e}"
        );

        let open = dir.path().join("open.seed");
        keygen("x", &open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_seed(&open).unwrap_err().to_string();
        assert!(
            e.contains("open.seed") && e.contains("0644") && e.contains("chmod 600"),
            "{e}"
        );

        let account = dir.path().join("account.seed");
        let seed = nkeys::KeyPair::new_account().seed().unwrap();
        std::fs::write(&account, seed).unwrap();
        std::fs::set_permissions(&account, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = read_seed(&account).unwrap_err().to_string();
        assert!(e.contains("account.seed") && e.contains("user seed"), "{e}");

        let garbage = dir.path().join("garbage.seed");
        std::fs::write(&garbage, "SUnotaseed").unwrap();
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_seed(&garbage),
            Err(IdentityError::NotUserSeed { .. })
        ));
    }

    #[test]
    fn public_keys_are_checked() {
        assert!(check_public_key("UABC").is_err());
        let account = nkeys::KeyPair::new_account().public_key();
        assert!(check_public_key(&account).is_err());
        check_public_key(&nkeys::KeyPair::new_user().public_key()).unwrap();
    }
}
