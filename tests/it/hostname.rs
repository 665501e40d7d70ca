//! The lease's `host` under the sandboxing the NixOS unit uses:
//! `ProcSubset=pid` hides `/proc/sys`. Here the daemon runs in a new
//! mount namespace with an empty directory bound over `/proc/sys` (the
//! tests run as root), and its lease must still name the host.

use crate::common;
use crate::support;

use common::*;
use presenced::naming;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::{Mosquitto, NatsOptions, NatsServer};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const ZONES: &str = r#"
[zones.lab]
[[zones.lab.evidence]]
sensor = "lab_pir"
p_true = 0.95
p_false = 0.05
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_names_the_host_with_proc_sys_hidden() {
    let broker = Mosquitto::start();
    let nats = NatsServer::start(NatsOptions::default());
    let http_port = support::free_port();
    let cfg = daemon_config(
        "test",
        &nats.url(),
        broker.port,
        http_port,
        &motion_mapping(true),
        ZONES,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, cfg).unwrap();
    provision(&path);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    // Exit 99 if the mask did not take: the test must not pass by
    // reading /proc/sys after all.
    let script = format!(
        "mount --bind '{}' /proc/sys || exit 98; test -r /proc/sys/kernel/hostname && exit 99; exec '{}' run --config '{}'",
        empty.display(),
        support::daemon::presenced_bin().display(),
        path.display()
    );
    let mut child = Killed(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare (util-linux) runs"),
    );
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let start = std::time::Instant::now();
    while support::http_get(http, "/healthz").map(|r| r.0) != Some(200) {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!(
                "the daemon exited ({status}) in the namespace: {}",
                std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
            );
        }
        assert!(start.elapsed() < Duration::from_secs(20), "not healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
    let js = jetstream(&nats.url()).await;
    let kv = js.get_key_value(naming::OWNERS_BUCKET).await.unwrap();
    let lease: serde_json::Value =
        serde_json::from_slice(&kv.get("presenced").await.unwrap().unwrap()).unwrap();
    let uname = Command::new("uname").arg("-n").output().unwrap();
    let host = String::from_utf8_lossy(&uname.stdout).trim().to_owned();
    assert!(!host.is_empty());
    assert_eq!(lease["host"], host.as_str(), "{lease}");
}
