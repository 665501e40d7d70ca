//! Description to nats-server config text. Deterministic (same description,
//! same bytes), with a comment above each decision so an operator reading
//! the running server's config learns why it is so.

use super::model::{HubLink, HubNode, JetStream, Leaf, LinkTls, ServerTls, SyncInterval};
use crate::naming;
use std::path::Path;
use std::time::Duration;

/// A config string literal; nats-server accepts JSON escaping.
pub(super) fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| String::from("\"\""))
}

fn quote_path(path: &Path) -> String {
    quote(&path.to_string_lossy())
}

/// A duration in Go's syntax, which nats-server parses.
pub fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}ns", d.as_nanos())
    }
}

/// Lines of config text with the current indentation: the one writer
/// of nats-server config text (server configs here, authorization blocks
/// in [`super::auth`]).
#[derive(Default)]
pub(super) struct Text {
    pub(super) out: String,
    pub(super) indent: usize,
}

impl Text {
    pub(super) fn line(&mut self, line: &str) {
        for _ in 0..self.indent {
            self.out.push_str("  ");
        }
        self.out.push_str(line);
        self.out.push('\n');
    }

    pub(super) fn comment(&mut self, text: &str) {
        for line in text.lines() {
            self.line(&format!("# {line}"));
        }
    }

    pub(super) fn open(&mut self, head: &str) {
        self.line(&format!("{head} {{"));
        self.indent += 1;
    }

    pub(super) fn close(&mut self) {
        self.indent = self.indent.saturating_sub(1);
        self.line("}");
    }

    fn blank(&mut self) {
        self.out.push('\n');
    }
}

fn header(t: &mut Text, what: &str, command: &str) {
    t.comment(&format!(
        "nats-server config of {what}.\nRendered by `presenced nats-config {command}`: change the description and render again rather than editing this file."
    ));
    t.blank();
}

/// A listener's `tls {}` block.
fn server_tls(t: &mut Text, tls: &ServerTls) {
    t.open("tls");
    t.line(&format!("cert_file: {}", quote_path(&tls.cert_file)));
    t.line(&format!("key_file: {}", quote_path(&tls.key_file)));
    if let Some(ca) = &tls.ca_file {
        t.line(&format!("ca_file: {}", quote_path(ca)));
    }
    if tls.verify {
        t.comment("Only clients with a certificate signed by ca_file get in.");
        t.line("verify: true");
    }
    t.line(&format!("timeout: {}", tls.timeout.as_secs_f64()));
    t.close();
}

/// The `tls {}` block of the leaf's remote: how it checks the hub and
/// proves itself.
fn link_tls(t: &mut Text, tls: &LinkTls) {
    t.open("tls");
    for (key, path) in [
        ("ca_file", &tls.ca_file),
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
    ] {
        if let Some(path) = path {
            t.line(&format!("{key}: {}", quote_path(path)));
        }
    }
    t.close();
}

fn common(
    t: &mut Text,
    server_name: &str,
    listen: &str,
    tls: Option<&ServerTls>,
    monitor_port: u16,
    log: Option<&Path>,
    ports_file_dir: Option<&Path>,
) {
    t.comment("Unique among every server the hub sees; MQTT and clustering need one.");
    t.line(&format!("server_name: {}", quote(server_name)));
    t.line(&format!("listen: {}", quote(listen)));
    if let Some(tls) = tls {
        t.comment("Clients connect with TLS (`[nats.tls]` in presenced's config).");
        server_tls(t, tls);
    }
    t.comment("Monitoring (/healthz, /jsz, /leafz) on loopback only.");
    if monitor_port == 0 {
        t.line("http: \"127.0.0.1:-1\"");
    } else {
        t.line(&format!("http: \"127.0.0.1:{monitor_port}\""));
    }
    if let Some(log) = log {
        t.line(&format!("log_file: {}", quote_path(log)));
    }
    if let Some(dir) = ports_file_dir {
        t.comment("The ports this server listens on, for whoever started it.");
        t.line(&format!("ports_file_dir: {}", quote_path(dir)));
    }
    t.blank();
}

fn jetstream(t: &mut Text, js: &JetStream, domain: &str, why_domain: &str) {
    t.open("jetstream");
    t.line(&format!("store_dir: {}", quote_path(&js.store_dir)));
    t.comment(why_domain);
    t.line(&format!("domain: {}", quote(domain)));
    if let Some(size) = &js.max_memory {
        t.line(&format!("max_mem: {}", quote(size)));
    }
    if let Some(size) = &js.max_file {
        t.line(&format!("max_file: {}", quote(size)));
    }
    match js.sync_interval {
        SyncInterval::Always => {
            t.comment(
                "fsync before every acknowledgement: nothing acknowledged is lost on power loss.",
            );
            t.line("sync_interval: always");
        }
        SyncInterval::Every(d) => {
            t.comment(&format!(
                "JetStream acknowledges before it syncs: on power loss up to {} of\nacknowledged writes can be lost.",
                go_duration(d)
            ));
            t.line(&format!("sync_interval: {}", quote(&go_duration(d))));
        }
        SyncInterval::ServerDefault => {
            t.comment("sync_interval: nats-server's default (2 minutes of acknowledged writes at risk on power loss).");
        }
    }
    t.close();
    t.blank();
}

fn remote(t: &mut Text, hub: &HubLink) {
    t.open("leafnodes");
    t.comment(
        "Re-dial a lost hub link this often: the hub can only catch up once\nthe link is back.",
    );
    t.line(&format!(
        "reconnect: {}",
        quote(&go_duration(hub.reconnect))
    ));
    t.line("remotes: [");
    t.indent += 1;
    t.line("{");
    t.indent += 1;
    let urls: Vec<String> = hub.urls.iter().map(|u| quote(u)).collect();
    t.line(&format!("urls: [ {} ]", urls.join(", ")));
    if let Some(path) = &hub.nkey_include {
        t.comment("The NKEY seed of this leaf (`nkey: \"SU...\"`), kept out of this file.");
        t.line(&format!("include {}", quote_path(path)));
    }
    if let Some(path) = &hub.credentials {
        t.line(&format!("credentials: {}", quote_path(path)));
    }
    if let Some(tls) = &hub.tls {
        link_tls(t, tls);
    }
    t.indent -= 1;
    t.line("}");
    t.indent -= 1;
    t.line("]");
    t.close();
    t.blank();
}

fn authorization(t: &mut Text, include: Option<&Path>) {
    if let Some(path) = include {
        t.comment("Who may connect and what each identity may do (`presenced acl`).");
        t.line(&format!("include {}", quote_path(path)));
    }
}

/// The config text of a site's leaf. The description is assumed checked
/// ([`super::check::leaf`]).
pub fn leaf(leaf: &Leaf) -> String {
    let domain = naming::Site::new(&leaf.site)
        .map(|s| s.leaf_domain())
        .unwrap_or_else(|_| leaf.site.clone());
    let mut t = Text::default();
    header(
        &mut t,
        &format!("the leaf node of site {}", leaf.site),
        "leaf",
    );
    common(
        &mut t,
        &leaf.server_name(),
        &leaf.listen,
        leaf.tls.as_ref(),
        leaf.monitor_port,
        leaf.log_file.as_deref(),
        leaf.ports_file_dir.as_deref(),
    );
    jetstream(
        &mut t,
        &leaf.jetstream,
        &domain,
        &format!(
            "The site's own domain: over the leafnode link the hub reaches this\nJetStream as $JS.{domain}.API, which is what its mirrors source from."
        ),
    );
    if let Some(hub) = &leaf.hub {
        remote(&mut t, hub);
    }
    if let Some(mqtt) = &leaf.mqtt {
        t.comment("Sensors may publish over MQTT straight to the leaf.");
        t.open("mqtt");
        t.line(&format!("listen: {}", quote(&mqtt.listen)));
        t.close();
        t.blank();
    }
    authorization(&mut t, leaf.authorization_include.as_deref());
    t.out
}

/// The config text of one hub node. The description is assumed checked
/// ([`super::check::hub`]).
pub fn hub(hub: &HubNode) -> String {
    let mut t = Text::default();
    header(&mut t, &format!("hub node {}", hub.server_name), "hub");
    common(
        &mut t,
        &hub.server_name,
        &hub.listen,
        hub.tls.as_ref(),
        hub.monitor_port,
        hub.log_file.as_deref(),
        hub.ports_file_dir.as_deref(),
    );
    jetstream(
        &mut t,
        &hub.jetstream,
        naming::HUB_DOMAIN,
        "The hub's domain: sites reach the hub's JetStream through their leaf\nas $JS.hub.API.",
    );
    if let Some(cluster) = &hub.cluster {
        t.comment(
            "Every node routes to every other; the hub's mirrors are replicated three times.",
        );
        t.open("cluster");
        t.line(&format!("name: {}", quote(&cluster.name)));
        t.line(&format!("listen: {}", quote(&cluster.listen)));
        let routes: Vec<String> = cluster.routes.iter().map(|r| quote(r)).collect();
        t.line(&format!("routes: [ {} ]", routes.join(", ")));
        t.close();
        t.blank();
    }
    t.comment("The sites' leaf nodes connect here.");
    t.open("leafnodes");
    t.line(&format!("listen: {}", quote(&hub.leafnodes.listen)));
    if hub.leafnodes.no_advertise {
        t.comment("Leaves dial only the URLs they list, not addresses this node knows.");
        t.line("no_advertise: true");
    }
    if let Some(tls) = &hub.leafnodes.tls {
        t.comment("The sites' links run over TLS.");
        server_tls(&mut t, tls);
    }
    t.close();
    t.blank();
    authorization(&mut t, hub.authorization_include.as_deref());
    t.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::Site;
    use crate::natsconf::{Cluster, HubLink, Mqtt};
    use std::path::PathBuf;

    #[test]
    fn leaf_text() {
        let site = Site::new("home").unwrap();
        let mut l = Leaf::new(&site, PathBuf::from("/var/lib/nats"));
        l.hub = Some(HubLink {
            nkey_include: Some(PathBuf::from("leaf-nkey.conf")),
            ..HubLink::new(vec!["nats-leaf://hub-1:7422".into()])
        });
        l.mqtt = Some(Mqtt {
            listen: "127.0.0.1:1883".into(),
        });
        l.authorization_include = Some(PathBuf::from("authorization.conf"));
        let text = leaf(&l);
        for needle in [
            "server_name: \"leaf-home\"\n",
            "http: \"127.0.0.1:8222\"\n",
            "  domain: \"leaf-home\"\n",
            "  sync_interval: \"1s\"\n",
            "  reconnect: \"1s\"\n",
            "      urls: [ \"nats-leaf://hub-1:7422\" ]\n",
            "      include \"leaf-nkey.conf\"\n",
            "mqtt {\n  listen: \"127.0.0.1:1883\"\n}\n",
            "include \"authorization.conf\"\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert_eq!(text, super::leaf(&l), "rendering is deterministic");
    }

    #[test]
    fn hub_text() {
        let mut h = HubNode::new("hub-1", PathBuf::from("/var/lib/nats"));
        h.jetstream.sync_interval = SyncInterval::Always;
        h.cluster = Some(Cluster {
            name: "presenced-hub".into(),
            listen: "0.0.0.0:6222".into(),
            routes: vec!["nats-route://hub-2:6222".into()],
        });
        let text = hub(&h);
        for needle in [
            "  domain: \"hub\"\n",
            "  sync_interval: always\n",
            "  routes: [ \"nats-route://hub-2:6222\" ]\n",
            "leafnodes {\n  listen: \"0.0.0.0:7422\"\n}\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn tls_blocks() {
        let site = Site::new("home").unwrap();
        let server = crate::natsconf::ServerTls {
            cert_file: PathBuf::from("/etc/tls/cert.pem"),
            key_file: PathBuf::from("/etc/tls/key.pem"),
            ca_file: Some(PathBuf::from("/etc/tls/ca.pem")),
            verify: true,
            timeout: Duration::from_millis(2500),
        };
        let mut l = Leaf::new(&site, PathBuf::from("/var/lib/nats"));
        l.tls = Some(server.clone());
        l.hub = Some(HubLink {
            tls: Some(crate::natsconf::LinkTls {
                ca_file: Some(PathBuf::from("/etc/tls/hub-ca.pem")),
                cert_file: None,
                key_file: None,
            }),
            ..HubLink::new(vec!["nats-leaf://hub-1:7422".into()])
        });
        let text = leaf(&l);
        for needle in [
            "tls {\n  cert_file: \"/etc/tls/cert.pem\"\n  key_file: \"/etc/tls/key.pem\"\n  ca_file: \"/etc/tls/ca.pem\"\n",
            "  verify: true\n  timeout: 2.5\n}\n",
            "      tls {\n        ca_file: \"/etc/tls/hub-ca.pem\"\n      }\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let mut h = HubNode::new("hub-1", PathBuf::from("/var/lib/nats"));
        h.leafnodes.tls = Some(server);
        let text = hub(&h);
        assert!(
            text.contains("leafnodes {\n  listen: \"0.0.0.0:7422\"\n  # The sites' links run over TLS.\n  tls {\n"),
            "{text}"
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(120)), "120s");
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
    }
}
