//! A site as deployed under the ACL `presenced acl` generates: an NKEY
//! seed per identity, the access file naming them, the generated
//! authorization block in a leaf nats-server, and the site provisioned by
//! the admin identity. Tests add their own configs on top and run daemons
//! as the identities they granted.

use super::daemon::{run_presenced, Daemon};
use super::nats::{NatsOptions, NatsServer};
use presenced::acl::identity;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// The site the ACL is generated for: the one [`NatsServer`] renders a
/// leaf for when no domain is given.
pub const SITE: &str = "test";

/// A leaf under the generated ACL; the server is killed and the directory
/// (seeds, access file, configs) removed on `Drop`.
pub struct AclSite {
    pub nats: NatsServer,
    /// The access file `presenced acl` was run on.
    pub access_path: PathBuf,
    // Last field: removed after the server is gone.
    pub dir: TempDir,
}

impl AclSite {
    /// Keys for `admin` and for every service, whose grant lines (`runs =
    /// [...]`, `reads = [...]`) follow its name; the access file; the ACL
    /// from `presenced acl`; a nats-server with that ACL.
    pub fn start(services: &[(&str, &str)]) -> AclSite {
        AclSite::start_with(services, NatsOptions::default())
    }

    /// [`AclSite::start`] with more of the server (MQTT, a domain, extra
    /// config after the ACL).
    pub fn start_with(services: &[(&str, &str)], mut opts: NatsOptions) -> AclSite {
        let dir = tempfile::Builder::new()
            .prefix("acl-site-")
            .tempdir()
            .expect("create a temp dir for the site");
        let key = |name: &str| {
            identity::keygen(name, &dir.path().join(format!("{name}.seed")))
                .unwrap_or_else(|e| panic!("keygen {name}: {e}"))
                .public_key
        };
        let mut access = format!("admin = {{ nkey = \"{}\" }}\n", key("admin"));
        for (name, grants) in services {
            access.push_str(&format!(
                "[services.{name}]\nnkey = \"{}\"\n{}\n",
                key(name),
                grants.trim_end()
            ));
        }
        let access_path = dir.path().join("access.toml");
        std::fs::write(&access_path, access).expect("write the access file");
        let path = access_path.to_str().expect("a UTF-8 temp path");
        let out = run_presenced(&["acl", "--access", path, "--site", SITE], &[]);
        assert!(
            out.status.success(),
            "presenced acl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let acl = String::from_utf8(out.stdout).expect("the ACL is UTF-8");
        opts.extra = format!("{acl}\n{}", opts.extra);
        AclSite {
            nats: NatsServer::start(opts),
            access_path,
            dir,
        }
    }

    /// The server's client URL.
    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// The seed file of `identity` (`admin` or a service).
    pub fn seed(&self, identity: &str) -> PathBuf {
        self.dir.path().join(format!("{identity}.seed"))
    }

    /// Writes `text` to `name` in the site's directory.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// `config` run as `identity`: its `service` name and seed file (into
    /// the `[nats]` table, which `config` must have).
    pub fn as_identity(&self, config: &str, identity: &str) -> String {
        as_service(config, identity, &self.seed(identity))
    }

    /// Writes `config` as `identity` to `<identity>.toml`.
    pub fn config_file(&self, config: &str, identity: &str) -> PathBuf {
        self.file(
            &format!("{identity}.toml"),
            &self.as_identity(config, identity),
        )
    }

    /// Provisions the site with `config` as the admin, as an operator
    /// does (`presenced provision --config admin.toml`); returns the
    /// admin's config file and what provision printed.
    pub fn provision(&self, config: &str) -> (PathBuf, String) {
        self.provision_args(config, &[])
    }

    /// [`AclSite::provision`] with the access file (`--access`), which
    /// also stores who runs what and who may send commands: what a site
    /// whose page or clients send commands needs.
    pub fn provision_with_access(&self, config: &str) -> (PathBuf, String) {
        let access = self.access_path.to_str().expect("a UTF-8 temp path");
        self.provision_args(config, &["--access", access])
    }

    fn provision_args(&self, config: &str, extra: &[&str]) -> (PathBuf, String) {
        let path = self.config_file(config, "admin");
        let mut args = vec![
            "provision",
            "--config",
            path.to_str().expect("a UTF-8 temp path"),
        ];
        args.extend_from_slice(extra);
        let out = run_presenced(&args, &[]);
        assert!(
            out.status.success(),
            "provision as admin failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (path, String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `presenced run` with `config` as `identity`.
    pub fn daemon(&self, config: &str, identity: &str) -> Daemon {
        Daemon::start_at(&self.config_file(config, identity), &[])
    }

    /// A JetStream context as `identity`; a service uses its own inbox
    /// prefix, as the ACL requires of it (the admin may use the default).
    pub async fn js(&self, identity: &str) -> async_nats::jetstream::Context {
        let seed = identity::read_seed(&self.seed(identity))
            .unwrap_or_else(|e| panic!("seed of {identity}: {e}"));
        let mut options = async_nats::ConnectOptions::new().nkey(seed);
        if identity != "admin" {
            options = options.custom_inbox_prefix(presenced::naming::inbox_prefix(identity));
        }
        let client = options
            .connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connect as {identity}: {e}"));
        async_nats::jetstream::new(client)
    }
}

/// `config` with `service = "<service>"` before its `[nats]` table and
/// `nkey_seed_file` in it.
pub fn as_service(config: &str, service: &str, seed: &Path) -> String {
    assert!(config.contains("[nats]\n"), "no [nats] table in:\n{config}");
    config.replacen(
        "[nats]\n",
        &format!(
            "service = \"{service}\"\n\n[nats]\nnkey_seed_file = \"{}\"\n",
            seed.display()
        ),
        1,
    )
}
