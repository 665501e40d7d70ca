//! Headless Chromium driven over WebDriver (W3C), for the status page
//! tests: Debian's `chromium` and `chromium-driver`, spoken to in plain
//! HTTP/1.1 on `std::net`, so the tests need no WebDriver crate.
//!
//! `$CHROMEDRIVER` and `$CHROMIUM` override where the two are found
//! (`scripts/env.sh` sets them when the setup script installed them).

use super::free_port;
use super::nats::find_on_path;
use super::process;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// W3C's key of an element reference in a WebDriver answer.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn bin(var: &str, names: &[&str], fallback: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| names.iter().find_map(|n| find_on_path(n)))
        .unwrap_or_else(|| PathBuf::from(fallback))
}

/// A chromedriver and one browser session; both gone on `Drop`.
pub struct Browser {
    addr: SocketAddr,
    session: String,
    child: process::Supervised,
    _dir: TempDir,
}

/// One HTTP/1.1 exchange with chromedriver; the JSON answer's `value`.
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect chromedriver: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write to chromedriver: {e}"))?;
    // chromedriver may keep the connection open whatever the request
    // says: read the head, then as much body as it announces.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let (head, body_start) = loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("read from chromedriver: {e}"))?;
        if n == 0 {
            return Err(format!(
                "chromedriver closed the connection: {:?}",
                String::from_utf8_lossy(&raw)
            ));
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break (
                String::from_utf8_lossy(&raw[..i]).to_ascii_lowercase(),
                i + 4,
            );
        }
    };
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let have = raw.len() - body_start;
        let done = match length {
            Some(n) => have >= n,
            None if chunked => raw.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("read from chromedriver: {e}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let rest = String::from_utf8_lossy(&raw[body_start..]).into_owned();
    let text = if chunked { dechunk(&rest) } else { rest };
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("{method} {path}: {e}: {text:?}"))?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    if let Some(err) = value.get("error").and_then(Value::as_str) {
        return Err(format!(
            "{method} {path}: {err}: {}",
            value.get("message").and_then(Value::as_str).unwrap_or("")
        ));
    }
    Ok(value)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session
    /// with a phone-ish window (the page must read on one).
    pub fn start() -> Browser {
        let dir = tempfile::Builder::new()
            .prefix("chromium-test-")
            .tempdir()
            .expect("temp dir for chromium");
        let port = free_port();
        let driver = bin(
            "CHROMEDRIVER",
            &["chromedriver", "chromium-driver"],
            "/usr/bin/chromedriver",
        );
        let log_path = dir.path().join("chromedriver.log");
        let mut child = process::Supervised::new("chromedriver", log_path.clone());
        let mut command = Command::new(&driver);
        command.arg(format!("--port={port}"));
        if let Err(e) = child.spawn(command, true) {
            panic!("{e}: install chromium and chromium-driver (scripts/setup.sh)");
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let profile = dir.path().join("profile");
        // Owned from here: a panic below still stops chromedriver (Drop).
        let mut browser = Browser {
            addr,
            session: String::new(),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while call(addr, "GET", "/status", None).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on {addr} within 20 s: {}",
                process::log_tail(&log_path)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let chromium = bin("CHROMIUM", &["chromium"], "/usr/bin/chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--no-first-run",
                    "--window-size=420,1400",
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let v = call(addr, "POST", "/session", Some(&caps))
            .unwrap_or_else(|e| panic!("cannot open a Chromium session: {e}"));
        browser.session = v["sessionId"].as_str().expect("sessionId").to_owned();
        browser
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        call(self.addr, method, &path, body).unwrap_or_else(|e| panic!("webdriver: {e}"))
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the
    /// page and returns its result.
    pub fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// The element matching `css`, or `None`.
    pub fn find(&self, css: &str) -> Option<String> {
        let path = format!("/session/{}/element", self.session);
        call(
            self.addr,
            "POST",
            &path,
            Some(&json!({"using": "css selector", "value": css})),
        )
        .ok()
        .and_then(|v| v[ELEMENT].as_str().map(str::to_owned))
    }

    fn element(&self, css: &str) -> String {
        let path = format!("/session/{}/element", self.session);
        let v = call(
            self.addr,
            "POST",
            &path,
            Some(&json!({"using": "css selector", "value": css})),
        )
        .unwrap_or_else(|e| panic!("no element matches {css:?} on the page: {e}"));
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element reference for {css:?} in {v}"))
            .to_owned()
    }

    pub fn text(&self, css: &str) -> String {
        let id = self.element(css);
        self.call("GET", &format!("/element/{id}/text"), None)
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn click(&self, css: &str) {
        let id = self.element(css);
        self.call("POST", &format!("/element/{id}/click"), Some(&json!({})));
    }

    /// Clears the field `css` and types `text` into it.
    pub fn fill(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.call("POST", &format!("/element/{id}/clear"), Some(&json!({})));
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(&json!({ "text": text })),
        );
    }

    /// Waits until `script` returns something truthy; panics naming
    /// `what` (and what the script last returned) at the deadline.
    pub fn wait_for(&self, what: &str, deadline: Duration, script: &str) -> Value {
        let end = Instant::now() + deadline;
        loop {
            let v = self.eval(script, json!([]));
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return v;
            }
            if Instant::now() >= end {
                let page = self.eval(
                    "return location.href + '\\n' + document.body.innerText",
                    json!([]),
                );
                panic!(
                    "{what}: not within {deadline:?} (last: {v}); the page:\n{}",
                    page.as_str().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Saves a PNG of the window to `path` (the tests' artifact).
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let v = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create the screenshot directory");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = call(self.addr, "DELETE", &path, None);
        }
        self.child.kill();
    }
}
