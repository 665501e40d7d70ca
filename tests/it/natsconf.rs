//! `presenced nats-config`: configs nats-server accepts, and the topology
//! the tests run (a 3-node hub and a leaf linked to it) built from them.

use crate::support;

use presenced::naming::Site;
use std::process::Command;
use std::time::Duration;
use support::{leaf_of, nats_server_bin, wait_until, Hub, Proxy};

const DEADLINE: Duration = Duration::from_secs(30);

fn presenced(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_presenced"))
        .args(args)
        .output()
        .expect("run presenced")
}

/// `nats-server -t` on a rendered file: the server's own verdict.
fn server_accepts(conf: &std::path::Path) {
    let out = Command::new(nats_server_bin())
        .arg("-c")
        .arg(conf)
        .arg("-t")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nats-server refuses {}:\n{}{}\n{}",
        conf.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(conf).unwrap()
    );
}

#[test]
fn rendered_leaf_and_hub_configs_are_accepted_by_nats_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    std::fs::write(
        dir.path().join("leaf-nkey.conf"),
        "nkey: \"SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("authorization.conf"),
        "authorization { users: [ { user: a, password: b } ] }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("leaf.toml"),
        format!(
            r#"site = "home"
authorization_include = "authorization.conf"
[jetstream]
store_dir = "{d}/leaf"
max_memory = "256M"
max_file = "20G"
sync_interval = "always"
[hub]
urls = ["nats-leaf://hub-1.example.net:7422", "nats-leaf://hub-2.example.net:7422"]
nkey_include = "leaf-nkey.conf"
reconnect = "2s"
[mqtt]
listen = "127.0.0.1:1883"
"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("hub.toml"),
        format!(
            r#"server_name = "hub-1"
[jetstream]
store_dir = "{d}/hub"
[cluster]
listen = "0.0.0.0:6222"
routes = ["nats-route://hub-2.example.net:6222", "nats-route://hub-3.example.net:6222"]
"#
        ),
    )
    .unwrap();
    for kind in ["leaf", "hub"] {
        let toml = dir.path().join(format!("{kind}.toml"));
        let out = presenced(&["nats-config", kind, toml.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let again = presenced(&["nats-config", kind, toml.to_str().unwrap()]);
        assert_eq!(text.as_bytes(), again.stdout, "{kind}: not deterministic");
        let conf = dir.path().join(format!("{kind}.conf"));
        std::fs::write(&conf, &text).unwrap();
        server_accepts(&conf);
    }
    let leaf = std::fs::read_to_string(dir.path().join("leaf.conf")).unwrap();
    assert!(leaf.contains("domain: \"leaf-home\""), "{leaf}");
    assert!(leaf.contains("http: \"127.0.0.1:8222\""), "{leaf}");
    let hub = std::fs::read_to_string(dir.path().join("hub.conf")).unwrap();
    assert!(hub.contains("domain: \"hub\""), "{hub}");
}

#[test]
fn a_bad_description_lists_every_problem_with_its_field_path() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("leaf.toml");
    std::fs::write(
        &toml,
        r#"site = "Home"
listen = "everywhere"
[jetstream]
store_dir = "/var/lib/nats"
sync_interval = "1s"
[hub]
urls = ["hub-1:7422"]
nkey_include = "/run/secrets/leaf.conf"
"#,
    )
    .unwrap();
    let out = presenced(&["nats-config", "leaf", toml.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for path in ["site:", "listen:", "hub.urls[0]:", "hub.nkey_include:"] {
        assert!(err.contains(path), "no {path} in {err}");
    }
    std::fs::write(
        &toml,
        "site = \"home\"\n[jetstream]\nstore_dir = \"/x\"\nsync_interval = \"sometimes\"\n",
    )
    .unwrap();
    let out = presenced(&["nats-config", "leaf", toml.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sync_interval") && err.contains("sometimes"),
        "{err}"
    );
}

#[tokio::test]
async fn three_node_hub_serves_domain_hub_to_a_linked_leaf() {
    let hub = Hub::start();
    let site = Site::new("home").unwrap();
    let leaf = leaf_of(&site, hub.leafnode_urls());
    wait_until("the hub holds the leaf's link", DEADLINE, || {
        hub.leafnode_count() == 1
    });
    let client = async_nats::connect(leaf.url()).await.unwrap();
    let hub_js = async_nats::jetstream::with_domain(client.clone(), "hub");
    let account = hub_js.query_account().await.unwrap();
    assert_eq!(account.domain.as_deref(), Some("hub"));
    // An R3 stream can be placed: the three nodes form one JetStream cluster.
    let info = hub_js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "R3CHECK".into(),
            subjects: vec!["r3check.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    let cluster = info.cluster.expect("cluster info of an R3 stream");
    assert_eq!(cluster.replicas.len(), 2, "{cluster:?}");
}

#[tokio::test]
async fn proxy_cuts_and_restores_the_leaf_link() {
    let hub = Hub::start_with(1);
    let target = format!("127.0.0.1:{}", hub.nodes[0].leafnode_port.unwrap())
        .parse()
        .unwrap();
    let proxy = Proxy::start(target);
    let _leaf = leaf_of(&Site::new("home").unwrap(), vec![proxy.leaf_url()]);
    wait_until("the link is up", DEADLINE, || hub.leafnode_count() == 1);
    proxy.cut();
    wait_until("the link is down", DEADLINE, || hub.leafnode_count() == 0);
    proxy.restore();
    wait_until("the link is back", DEADLINE, || hub.leafnode_count() == 1);
}
