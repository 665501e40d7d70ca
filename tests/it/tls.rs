//! TLS between presenced and its leaf nats-server, with certificates
//! generated for each run: the daemon and the CLI connect with the right
//! CA, refuse a server certificate from another CA with a clear error, and
//! present a client certificate to a server that requires one.

use crate::common;
use crate::support;

use common::*;
use presenced::natsconf::{LinkTls, ServerTls};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;
use support::daemon::run_presenced;
use support::{Daemon, Mosquitto, NatsOptions, NatsServer};

const ZONES: &str = r#"
[zones.hall]
occupied_above = 0.6
arrive_after = "0s"
leave_after = "0s"
[[zones.hall.evidence]]
sensor = "hall_pir"
p_true = 0.95
p_false = 0.05
"#;

/// Certificates of one test: a site CA, a server and a client certificate
/// signed by it, and an unrelated CA.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn generate() -> Pki {
        let dir = tempfile::Builder::new().prefix("pki-").tempdir().unwrap();
        let pki = Pki { dir };
        let site_ca = pki.ca("site-ca", "presenced test CA");
        pki.ca("other-ca", "some other CA");
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "leaf nats-server");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        pki.leaf("server", server, &site_ca);
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, "presenced");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        pki.leaf("client", client, &site_ca);
        pki
    }

    /// A self-signed CA written to `<name>.pem`.
    fn ca(&self, name: &str, cn: &str) -> Issuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        Issuer::new(params, key)
    }

    /// A certificate signed by `ca`, written to `<name>.pem` and
    /// `<name>-key.pem` (0600).
    fn leaf(&self, name: &str, params: CertificateParams, ca: &Issuer<'static, KeyPair>) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        let key_path = self.path(&format!("{name}-key.pem"));
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// TLS of the leaf's client port as `nats-config` renders it; `verify`
    /// requires client certificates signed by the site CA.
    fn server_tls(&self, verify: bool) -> ServerTls {
        ServerTls {
            cert_file: self.path("server.pem"),
            key_file: self.path("server-key.pem"),
            ca_file: verify.then(|| self.path("site-ca.pem")),
            verify,
            timeout: Duration::from_secs(2),
        }
    }
}

struct Leaf {
    nats: NatsServer,
    mqtt: Mosquitto,
    http_port: u16,
    dir: tempfile::TempDir,
}

impl Leaf {
    fn start(pki: &Pki, verify: bool) -> Leaf {
        let nats = NatsServer::start(NatsOptions {
            domain: Some("leaf-test".into()),
            tls: Some(pki.server_tls(verify)),
            ..Default::default()
        });
        Leaf {
            nats,
            mqtt: Mosquitto::start(),
            http_port: support::free_port(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A config file with `tls` as the `[nats.tls]` table (none if empty).
    fn config(&self, name: &str, tls: &str) -> PathBuf {
        let mut text = daemon_config(
            "test",
            &self.nats.url(),
            self.mqtt.port,
            self.http_port,
            &motion_mapping(false),
            ZONES,
        );
        if !tls.is_empty() {
            text.push_str(&format!("\n[nats.tls]\n{tls}\n"));
        }
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn http(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }
}

fn tls_table(pki: &Pki, ca: &str, client: bool) -> String {
    let q = |name: &str| serde_json::to_string(&pki.path(name)).unwrap();
    let mut t = format!("ca_file = {}\n", q(ca));
    if client {
        t.push_str(&format!(
            "cert_file = {}\nkey_file = {}\n",
            q("client.pem"),
            q("client-key.pem")
        ));
    }
    t
}

fn presenced(args: &[&str], config: &Path) -> Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--config", config.to_str().unwrap()]);
    run_presenced(&all, &[])
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Provisions over TLS, runs the daemon until healthy, and reads the zone
/// it stored with the CLI: every connection the binary makes.
fn works_end_to_end(leaf: &Leaf, config: &Path) {
    let out = presenced(&["provision"], config);
    assert!(out.status.success(), "provision over TLS: {}", stderr(&out));
    let daemon = Daemon::start_at(config, &[]);
    daemon.wait_healthy(leaf.http(), Duration::from_secs(20));
    support::wait_until("hall stored", Duration::from_secs(10), || {
        presenced(&["get", "hall", "--json"], config)
            .status
            .success()
    });
    let out = presenced(&["get", "hall", "--json"], config);
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(view["value"]["state"], "vacant", "{view}");
}

#[test]
fn daemon_and_cli_connect_to_a_tls_leaf_with_the_site_ca() {
    let pki = Pki::generate();
    let leaf = Leaf::start(&pki, false);
    let config = leaf.config("right-ca", &tls_table(&pki, "site-ca.pem", false));
    works_end_to_end(&leaf, &config);
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_with_a_clear_error() {
    let pki = Pki::generate();
    let leaf = Leaf::start(&pki, false);
    let url = leaf.nats.url();

    let config = leaf.config("other-ca", &tls_table(&pki, "other-ca.pem", false));
    let out = presenced(&["provision"], &config);
    let err = stderr(&out);
    assert!(!out.status.success(), "provision trusted a foreign CA");
    assert!(
        err.contains(&format!(
            "TLS with {url} failed: the server's certificate is not signed by the CA in nats.tls.ca_file"
        )) && err.contains("other-ca.pem"),
        "{err}"
    );
    // The daemon says the same at ERROR and keeps trying (a server
    // certificate can be replaced), never reporting ready.
    let mut daemon = Daemon::start_at(&config, &[]);
    daemon.wait_for_log("TLS with nats-server failed", Duration::from_secs(15));
    assert!(daemon.log().contains("ERROR"), "{}", daemon.log_tail());
    assert!(daemon.is_running());
    assert!(support::http_get(leaf.http(), "/healthz").is_none_or(|(code, _)| code != 200));
    drop(daemon);

    // Without [nats.tls] the binary still refuses to talk in clear.
    let plain = leaf.config("plain", "");
    let out = presenced(&["provision"], &plain);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&url) && err.contains("[nats.tls] is not configured"),
        "{err}"
    );

    // A CA file that is not there is named by its field, at once.
    let missing = leaf.config("missing", "ca_file = \"/nonexistent/ca.pem\"");
    let out = presenced(&["provision"], &missing);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nats.tls.ca_file = /nonexistent/ca.pem: cannot read"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_server_that_verifies_clients_accepts_the_client_certificate_and_refuses_without() {
    let pki = Pki::generate();
    let leaf = Leaf::start(&pki, true);
    let without = leaf.config("no-client-cert", &tls_table(&pki, "site-ca.pem", false));
    let out = presenced(&["provision"], &without);
    assert!(
        !out.status.success(),
        "connected without a client certificate"
    );
    let err = stderr(&out);
    assert!(err.contains(&leaf.nats.url()), "{err}");
    assert!(
        err.contains("the server requires a client certificate: set nats.tls.cert_file"),
        "{err}"
    );

    let with = leaf.config("client-cert", &tls_table(&pki, "site-ca.pem", true));
    works_end_to_end(&leaf, &with);
}

#[test]
fn a_client_certificate_without_its_key_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = daemon_config(
        "test",
        "nats://127.0.0.1:1",
        1,
        1,
        &motion_mapping(false),
        ZONES,
    );
    text.push_str("\n[nats.tls]\nca_file = \"ca.pem\"\ncert_file = \"client.pem\"\n");
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    let out = run_presenced(&["check-config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = stderr(&out) + &String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("nats.tls.key_file"), "{err}");
}

/// The leafnode link from a site to the hub over TLS, both ends rendered
/// by `nats-config`: on the hub, `leafnodes { tls {} }` with its
/// certificate and (verify) the CA of the sites' certificates; on the
/// leaf, `tls {}` inside the remote with the hub's CA and the site's
/// certificate. A leaf without a client certificate is not let in.
#[test]
fn the_leafnode_link_runs_over_tls_and_a_hub_that_verifies_refuses_a_leaf_without_certificate() {
    let pki = Pki::generate();
    let hub = NatsServer::start(NatsOptions {
        domain: Some("hub".into()),
        leafnode_tls: Some(pki.server_tls(true)),
        ..Default::default()
    });
    let hub_url = hub.leafnode_url().expect("a hub listens for leaves");
    let remote = |client_cert: bool| LinkTls {
        ca_file: Some(pki.path("site-ca.pem")),
        cert_file: client_cert.then(|| pki.path("client.pem")),
        key_file: client_cert.then(|| pki.path("client-key.pem")),
    };
    let leafz = |n: usize| {
        support::http_get(hub.monitor_addr(), "/leafz")
            .is_some_and(|(_, body)| body.contains(&format!("\"leafnodes\": {n}")))
    };
    let _without = NatsServer::start(NatsOptions {
        domain: Some("leaf-a".into()),
        leaf_remotes: vec![hub_url.clone()],
        remote_tls: Some(remote(false)),
        server_name: Some("leaf-a".into()),
        ..Default::default()
    });
    let with = NatsServer::start(NatsOptions {
        domain: Some("leaf-b".into()),
        leaf_remotes: vec![hub_url],
        remote_tls: Some(remote(true)),
        server_name: Some("leaf-b".into()),
        ..Default::default()
    });
    support::wait_until(
        "the leaf with a certificate linked",
        Duration::from_secs(15),
        || leafz(1),
    );
    // The leaf without a certificate has retried (reconnect 1 s) meanwhile
    // and keeps being refused.
    std::thread::sleep(Duration::from_secs(3));
    assert!(leafz(1), "exactly one leaf is linked");
    let hub_log = hub.log();
    assert!(
        hub_log.contains("remote \"leaf-b\"") && !hub_log.contains("remote \"leaf-a\""),
        "only the leaf with a certificate is linked:\n{hub_log}"
    );
    assert!(
        hub_log.contains("TLS leafnode handshake error"),
        "the hub logs why it refused the leaf without a certificate:\n{hub_log}"
    );
    drop(with);
}
