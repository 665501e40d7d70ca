//! The sandbox's identities, made as on a real site: an NKEY seed per
//! service (`presenced keygen`), one admin, one leafnode identity per site,
//! the access file (ownership map) and the ACL `presenced acl` renders from
//! it. MQTT clients of the leaf's listener get passwords (MQTT has no
//! NKEYs). Seeds and passwords of a previous run in the same directory are
//! reused, so `nats --nkey` keeps working across restarts.

use super::plan::{self, Plan, SitePlan};
use crate::acl::{access::Access, identity, render};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Key(#[from] identity::IdentityError),
    #[error("{path}: a seed that yields no public key")]
    NoPublicKey { path: PathBuf },
    #[error(transparent)]
    Access(#[from] crate::acl::access::AccessError),
    #[error("cannot hash an MQTT password: {0}")]
    Hash(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One site's public keys and MQTT passwords.
#[derive(Debug, Clone)]
pub struct SiteIdentities {
    pub service_public: String,
    pub operator_public: String,
    pub leafnode_public: String,
    pub simulator_password: String,
    pub daemon_mqtt_password: String,
}

#[derive(Debug, Clone)]
pub struct Identities {
    pub admin_public: String,
    /// In the order of [`Plan::sites`].
    pub sites: Vec<SiteIdentities>,
}

/// The public key of the seed at `path`, made with `keygen` if missing.
fn ensure_seed(service: &str, path: &Path) -> Result<String, IdentityError> {
    if !path.exists() {
        return Ok(identity::keygen(service, path)?.public_key);
    }
    let seed = identity::read_seed(path)?;
    identity::public_key_of(&seed).ok_or_else(|| IdentityError::NoPublicKey {
        path: path.to_owned(),
    })
}

/// Writes `text` readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    // Replaced, not rewritten in place: the mode applies at creation.
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// A password from the operating system's randomness: the public key of a
/// fresh NKEY is 55 random base32 characters after its prefix.
fn new_password() -> String {
    nkeys::KeyPair::new_user().public_key()[1..33].to_owned()
}

fn ensure_password(path: &Path) -> Result<String, IdentityError> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let p = text.trim();
        if !p.is_empty() {
            return Ok(p.to_owned());
        }
    }
    let p = new_password();
    write_private(path, &p)?;
    Ok(p)
}

/// The access file of a site: the admin, the site's leafnode identity, one
/// service running ingest and engine, and the archiver when there is
/// somewhere to archive to, and an operator that may send commands.
pub fn access_file(
    admin: &str,
    leafnode: &str,
    service: &str,
    operator: &str,
    archiver: bool,
) -> String {
    let runs = if archiver {
        r#"["ingest", "engine", "archiver"]"#
    } else {
        r#"["ingest", "engine"]"#
    };
    format!(
        "# Ownership map of this sandbox site, as `presenced acl --access` reads it.\n\
         admin = {{ nkey = \"{admin}\" }}\n\
         leafnode = {{ nkey = \"{leafnode}\" }}\n\
         \n\
         [services.{svc}]\n\
         nkey = \"{service}\"\n\
         runs = {runs}\n\
         \n\
         # An operator: `presenced cmd` (commands), and reads what it commands.\n\
         [services.{op}]\n\
         nkey = \"{operator}\"\n\
         reads = [\"commands\", \"presence\", \"owners\", \"events\"]\n",
        svc = plan::SERVICE,
        op = plan::OPERATOR
    )
}

/// The S3 server's one identity (SeaweedFS `-s3.config`): the key pair
/// every archiver signs with. Anonymous requests are refused.
pub fn s3_identities(access_key: &str, secret_key: &str) -> String {
    serde_json::json!({
        "identities": [{
            "name": "presenced",
            "credentials": [{ "accessKey": access_key, "secretKey": secret_key }],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]
        }]
    })
    .to_string()
}

/// The MQTT users of a site's leaf: the simulator publishes the devices'
/// topics, the daemon reads them; nothing else.
pub fn mqtt_users(ids: &SiteIdentities) -> Vec<render::MqttUser> {
    let devices = format!("{}.>", plan::DEVICE_TOPIC_ROOT);
    vec![
        render::MqttUser {
            user: plan::SIMULATOR_MQTT_USER.to_owned(),
            password: ids.simulator_password.clone(),
            summary: "the simulated sensors; publish their topics only".to_owned(),
            publish: vec![devices.clone()],
            subscribe: vec![],
        },
        render::MqttUser {
            user: plan::DAEMON_MQTT_USER.to_owned(),
            password: ids.daemon_mqtt_password.clone(),
            summary: "presenced's MQTT source; reads the sensors' topics only".to_owned(),
            publish: vec![],
            subscribe: vec![devices],
        },
    ]
}

fn site_identities(s: &SitePlan) -> Result<SiteIdentities, IdentityError> {
    Ok(SiteIdentities {
        service_public: ensure_seed(plan::SERVICE, &s.keys.service_seed)?,
        operator_public: ensure_seed(plan::OPERATOR, &s.keys.operator_seed)?,
        leafnode_public: ensure_seed("leafnode", &s.keys.leafnode_seed)?,
        simulator_password: ensure_password(&s.keys.simulator_password)?,
        daemon_mqtt_password: ensure_password(&s.keys.daemon_mqtt_password)?,
    })
}

/// Makes (or reuses) every identity and writes the access files, the
/// leaves' and the hub's authorization blocks and the leafnode includes.
pub fn ensure(plan: &Plan) -> Result<Identities, IdentityError> {
    let admin_public = ensure_seed("admin", &plan.admin_seed)?;
    let mut sites = Vec::new();
    let mut leafnodes = Vec::new();
    for s in &plan.sites {
        let ids = site_identities(s)?;
        let text = access_file(
            &admin_public,
            &ids.leafnode_public,
            &ids.service_public,
            &ids.operator_public,
            plan.s3.is_some(),
        );
        std::fs::write(&s.keys.access_file, &text).map_err(|source| IdentityError::Write {
            path: s.keys.access_file.clone(),
            source,
        })?;
        let access = Access::parse(&text, &s.keys.access_file.display().to_string())?;
        // MQTT passwords as bcrypt hashes; still private (the users and
        // their allow lists are nobody else's business).
        let text = render::render_with_mqtt(&access, &s.site, &mqtt_users(&ids))
            .map_err(|e| IdentityError::Hash(e.to_string()))?;
        write_private(&s.leaf.authorization_path, &text)?;
        let seed = identity::read_seed(&s.keys.leafnode_seed)?;
        write_private(
            &s.leaf.hub_nkey_include,
            &format!("# The seed this leaf authenticates to the hub with.\nnkey: \"{seed}\"\n"),
        )?;
        leafnodes.push((s.site.clone(), ids.leafnode_public.clone()));
        sites.push(ids);
    }
    if let Some(s3) = &plan.s3 {
        let access_key = ensure_password(&s3.access_key_file)?;
        let secret_key = ensure_password(&s3.secret_key_file)?;
        write_private(&s3.identities, &s3_identities(&access_key, &secret_key))?;
    }
    let hub = render::render_hub(Some(&admin_public), &leafnodes);
    for h in &plan.hub {
        write_private(&h.authorization_path, &hub)?;
    }
    Ok(Identities {
        admin_public,
        sites,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn identities_are_made_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (20_000..20_000 + plan::ports_needed(2) as u16).collect();
        let p = Plan::new(
            &plan::Input {
                sites: 2,
                dir: dir.path().to_path_buf(),
            },
            &ports,
        )
        .unwrap();
        for d in p.directories() {
            std::fs::create_dir_all(d).unwrap();
        }
        let a = ensure(&p).unwrap();
        let b = ensure(&p).unwrap();
        assert_eq!(a.admin_public, b.admin_public);
        assert_eq!(a.sites[1].service_public, b.sites[1].service_public);
        assert_eq!(a.sites[0].simulator_password, b.sites[0].simulator_password);
        assert_ne!(a.sites[0].leafnode_public, a.sites[1].leafnode_public);
        let authz = std::fs::read_to_string(&p.sites[0].leaf.authorization_path).unwrap();
        assert!(authz.contains(&a.sites[0].service_public));
        assert!(authz.contains("allowed_connection_types: [\"MQTT\"]"));
        // The password in plain text nowhere; its bcrypt hash there.
        assert!(!authz.contains(&a.sites[0].daemon_mqtt_password));
        assert!(authz.contains("password: \"$2a$11$"), "{authz}");
        let mode = std::fs::metadata(&p.sites[0].leaf.authorization_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
        let hub = std::fs::read_to_string(&p.hub[2].authorization_path).unwrap();
        assert!(hub.contains(&a.sites[1].leafnode_public) && hub.contains(&a.admin_public));
        let include = std::fs::read_to_string(&p.sites[1].leaf.hub_nkey_include).unwrap();
        assert!(include.starts_with("# ") && include.contains("nkey: \"SU"));
    }
}
