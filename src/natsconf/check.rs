//! What makes a description unusable: each check pushes a [`Problem`] with
//! its field path and carries on, so one run lists everything to fix.

use super::model::{HubLink, HubNode, JetStream, Leaf, ServerTls, SyncInterval};
use super::Problem;
use crate::naming;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

/// Every problem of a leaf description.
pub fn leaf(leaf: &Leaf) -> Vec<Problem> {
    let mut p = Problems::default();
    if naming::Site::new(&leaf.site).is_err() {
        p.push(
            "site",
            format!("{:?} is not a site id: use 1 to 32 of [a-z0-9-]", leaf.site),
        );
    }
    if let Some(name) = &leaf.server_name {
        server_name(&mut p, "server_name", name);
    }
    listen(&mut p, "listen", &leaf.listen);
    if let Some(tls) = &leaf.tls {
        server_tls(&mut p, "tls", tls);
    }
    jetstream(&mut p, &leaf.jetstream);
    if let Some(hub) = &leaf.hub {
        hub_link(&mut p, hub);
    }
    if let Some(mqtt) = &leaf.mqtt {
        listen(&mut p, "mqtt.listen", &mqtt.listen);
    }
    if let Some(path) = &leaf.authorization_include {
        include(&mut p, "authorization_include", path);
    }
    p.0
}

/// Every problem of a hub node description.
pub fn hub(hub: &HubNode) -> Vec<Problem> {
    let mut p = Problems::default();
    server_name(&mut p, "server_name", &hub.server_name);
    listen(&mut p, "listen", &hub.listen);
    if let Some(tls) = &hub.tls {
        server_tls(&mut p, "tls", tls);
    }
    jetstream(&mut p, &hub.jetstream);
    listen(&mut p, "leafnodes.listen", &hub.leafnodes.listen);
    if let Some(tls) = &hub.leafnodes.tls {
        server_tls(&mut p, "leafnodes.tls", tls);
    }
    if let Some(path) = &hub.authorization_include {
        include(&mut p, "authorization_include", path);
    }
    if let Some(cluster) = &hub.cluster {
        if cluster.name.is_empty() || !cluster.name.bytes().all(is_name_byte) {
            p.push(
                "cluster.name",
                format!(
                    "{:?} is not a cluster name: use [A-Za-z0-9_-]",
                    cluster.name
                ),
            );
        }
        listen(&mut p, "cluster.listen", &cluster.listen);
        if cluster.routes.is_empty() {
            p.push(
                "cluster.routes",
                "list the route URL of every other node (nats-route://host:6222)",
            );
        }
        for (i, route) in cluster.routes.iter().enumerate() {
            url(
                &mut p,
                &format!("cluster.routes[{i}]"),
                route,
                &["nats-route", "nats", "tls"],
            );
        }
    }
    p.0
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

fn server_name(p: &mut Problems, at: &str, name: &str) {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(is_name_byte) {
        p.push(
            at,
            format!("{name:?} is not a server name: use 1 to 64 of [A-Za-z0-9_-]"),
        );
    }
}

/// nats-server resolves `include` against the including file's directory,
/// even for absolute paths, so only a relative path means what it says.
fn include(p: &mut Problems, at: &str, path: &std::path::Path) {
    if path.as_os_str().is_empty() || path.is_absolute() {
        p.push(
            at,
            format!(
                "{:?}: give a path relative to the directory the rendered config is written to (nats-server resolves includes there, even absolute ones)",
                path.display().to_string()
            ),
        );
    }
}

/// `IP:PORT`, or `IP:-1` for any free port (nats-server picks one).
fn listen(p: &mut Problems, at: &str, addr: &str) {
    let any_port = addr
        .strip_suffix(":-1")
        .is_some_and(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    if !any_port && addr.parse::<SocketAddr>().is_err() {
        p.push(
            at,
            format!("{addr:?} is not an address to listen on: use IP:PORT, e.g. 127.0.0.1:4222 (IP:-1 for any free port)"),
        );
    }
}

fn jetstream(p: &mut Problems, js: &JetStream) {
    let dir = js.store_dir.to_string_lossy();
    if dir.is_empty() {
        p.push("jetstream.store_dir", "must not be empty");
    } else if !js.store_dir.is_absolute() {
        p.push(
            "jetstream.store_dir",
            format!("{dir:?} is relative: nats-server would resolve it against its working directory; give an absolute path"),
        );
    }
    for (at, size) in [
        ("jetstream.max_memory", &js.max_memory),
        ("jetstream.max_file", &js.max_file),
    ] {
        if let Some(size) = size {
            if !is_size(size) {
                p.push(
                    at,
                    format!("{size:?} is not a size: use a number with an optional K, M, G or T suffix, e.g. 256M"),
                );
            }
        }
    }
    if let SyncInterval::Every(d) = js.sync_interval {
        if d < Duration::from_millis(1) {
            p.push(
                "jetstream.sync_interval",
                "must be at least 1ms; use `always` to sync every write",
            );
        }
    }
}

/// nats-server's storage sizes: digits, then an optional unit.
fn is_size(s: &str) -> bool {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return false;
    }
    let unit = s[digits..].to_ascii_uppercase();
    matches!(
        unit.as_str(),
        "" | "K" | "KB" | "M" | "MB" | "G" | "GB" | "T" | "TB"
    )
}

fn hub_link(p: &mut Problems, hub: &HubLink) {
    if hub.urls.is_empty() {
        p.push(
            "hub.urls",
            "list the leafnode URL of every hub node (nats-leaf://host:7422), or drop [hub]",
        );
    }
    for (i, u) in hub.urls.iter().enumerate() {
        url(
            p,
            &format!("hub.urls[{i}]"),
            u,
            &["nats-leaf", "nats", "tls", "ws", "wss"],
        );
    }
    if let Some(path) = &hub.nkey_include {
        include(p, "hub.nkey_include", path);
    }
    if hub.nkey_include.is_some() && hub.credentials.is_some() {
        p.push(
            "hub.credentials",
            "set either hub.nkey_include or hub.credentials, not both",
        );
    }
    if hub.reconnect < Duration::from_millis(100) {
        p.push(
            "hub.reconnect",
            "must be at least 100ms (nats-server dials that often)",
        );
    }
    if let Some(tls) = &hub.tls {
        for (field, path) in [
            ("ca_file", &tls.ca_file),
            ("cert_file", &tls.cert_file),
            ("key_file", &tls.key_file),
        ] {
            if let Some(path) = path {
                tls_file(p, &format!("hub.tls.{field}"), path);
            }
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            let missing = if tls.cert_file.is_some() {
                "key_file"
            } else {
                "cert_file"
            };
            p.push(
                format!("hub.tls.{missing}"),
                "set cert_file and key_file together (the site's certificate and its key)",
            );
        }
    }
}

/// TLS files are opened from the server's working directory, not the
/// config's: only absolute paths mean the same thing everywhere.
fn tls_file(p: &mut Problems, at: &str, path: &std::path::Path) {
    if !path.is_absolute() {
        p.push(
            at,
            format!("{} is not an absolute path: nats-server opens TLS files from its working directory", path.display()),
        );
    }
}

fn server_tls(p: &mut Problems, at: &str, tls: &ServerTls) {
    tls_file(p, &format!("{at}.cert_file"), &tls.cert_file);
    tls_file(p, &format!("{at}.key_file"), &tls.key_file);
    if let Some(ca) = &tls.ca_file {
        tls_file(p, &format!("{at}.ca_file"), ca);
    }
    if tls.verify && tls.ca_file.is_none() {
        p.push(
            format!("{at}.ca_file"),
            "verify needs the CA that signs the clients' certificates",
        );
    }
    if tls.timeout.is_zero() {
        p.push(format!("{at}.timeout"), "must be longer than 0s");
    }
}

fn url(p: &mut Problems, at: &str, url: &str, schemes: &[&str]) {
    let Some((scheme, rest)) = url.split_once("://") else {
        p.push(
            at,
            format!("{url:?} is not a URL: use {}://host:port", schemes[0]),
        );
        return;
    };
    if !schemes.contains(&scheme) {
        p.push(
            at,
            format!(
                "{url:?}: scheme {scheme:?} is not one of {}",
                schemes.join(", ")
            ),
        );
    }
    if rest.is_empty() || rest.contains(char::is_whitespace) || rest.contains('"') {
        p.push(at, format!("{url:?} has no usable host:port"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::Site;
    use std::path::PathBuf;

    fn paths(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.path.as_str()).collect()
    }

    #[test]
    fn a_default_leaf_is_valid() {
        let site = Site::new("home").unwrap();
        let leaf = Leaf::new(&site, PathBuf::from("/var/lib/nats"));
        assert!(super::leaf(&leaf).is_empty());
    }

    #[test]
    fn every_problem_of_a_leaf_has_its_path() {
        let site = Site::new("home").unwrap();
        let mut leaf = Leaf::new(&site, PathBuf::from("relative"));
        leaf.site = "Home_1".into();
        leaf.listen = "localhost".into();
        leaf.jetstream.max_file = Some("20 gigs".into());
        leaf.hub = Some(HubLink::new(vec!["hub:7422".into(), "http://x:1".into()]));
        let problems = super::leaf(&leaf);
        assert_eq!(
            paths(&problems),
            [
                "site",
                "listen",
                "jetstream.store_dir",
                "jetstream.max_file",
                "hub.urls[0]",
                "hub.urls[1]"
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn tls_problems_have_their_paths() {
        let site = Site::new("home").unwrap();
        let mut leaf = Leaf::new(&site, PathBuf::from("/var/lib/nats"));
        leaf.tls = Some(ServerTls {
            cert_file: PathBuf::from("cert.pem"),
            key_file: PathBuf::from("/k.pem"),
            ca_file: None,
            verify: true,
            timeout: Duration::ZERO,
        });
        leaf.hub = Some(HubLink {
            tls: Some(crate::natsconf::LinkTls {
                ca_file: None,
                cert_file: Some(PathBuf::from("/site.pem")),
                key_file: None,
            }),
            ..HubLink::new(vec!["nats-leaf://hub:7422".into()])
        });
        let problems = super::leaf(&leaf);
        assert_eq!(
            paths(&problems),
            [
                "tls.cert_file",
                "tls.ca_file",
                "tls.timeout",
                "hub.tls.key_file"
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn sizes() {
        assert!(is_size("256M"));
        assert!(is_size("1073741824"));
        assert!(is_size("20GB"));
        assert!(!is_size("M"));
        assert!(!is_size("1.5G"));
        assert!(!is_size("-1"));
    }

    #[test]
    fn hub_cluster_needs_routes() {
        let mut hub = HubNode::new("hub-1", PathBuf::from("/var/lib/nats"));
        hub.cluster = Some(super::super::Cluster {
            name: "presenced hub".into(),
            listen: "0.0.0.0:6222".into(),
            routes: vec![],
        });
        assert_eq!(paths(&super::hub(&hub)), ["cluster.name", "cluster.routes"]);
    }
}
