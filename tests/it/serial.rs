//! Serial sources against real pseudo-terminals: a simulated HLK-LD2410
//! streaming at 10 frames/s with garbage, truncated, out-of-range and
//! broken frames (and a still target at distance 0, which is a reading); engineering-mode commands with and without an ACK; unplug and
//! replug through the real binary; JSON lines into SENSORS and REJECTED.

use crate::common;
use crate::support;

use common::*;
use presenced::config::SerialSource;
use presenced::observation::Reading;
use presenced::sources::ld2410::{self, RejectKind, Report, TargetState};
use presenced::sources::serial::{self, SerialStatus};
use presenced::sources::Item;
use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::pty::{receive, send, Pty};
use support::Daemon;
use tokio::sync::{mpsc, watch};

const TICK: Duration = Duration::from_millis(100);

fn report(distance: u16) -> Report {
    Report {
        engineering: false,
        target: TargetState::Moving,
        moving_distance: distance,
        moving_energy: 50,
        still_distance: 0,
        still_energy: 0,
        detection_distance: distance,
        extra: vec![],
    }
}

/// A simulated radar: writes one chunk per tick (10 frames/s), answers
/// command frames with ACKs if told to, and records the command words it
/// saw. `endless` keeps sending frames with rising distances after the
/// script.
struct Sim {
    stop: Arc<AtomicBool>,
    commands: Arc<Mutex<Vec<u16>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sim {
    fn start(master: File, script: Vec<Vec<u8>>, answer: bool, endless: Option<u16>) -> Sim {
        Sim::start_every(master, script, answer, endless, TICK)
    }

    /// Like [`Sim::start`], one chunk every `tick`.
    fn start_every(
        mut master: File,
        script: Vec<Vec<u8>>,
        answer: bool,
        endless: Option<u16>,
        tick: Duration,
    ) -> Sim {
        let stop = Arc::new(AtomicBool::new(false));
        let commands = Arc::new(Mutex::new(Vec::new()));
        let (s, c) = (stop.clone(), commands.clone());
        let thread = std::thread::spawn(move || {
            let mut script = script.into_iter();
            let mut next = endless;
            let mut pending = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let deadline = Instant::now() + tick;
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    pending.extend(receive(&mut master, left));
                    for word in take_commands(&mut pending) {
                        c.lock().unwrap().push(word);
                        if answer {
                            send(&mut master, &ld2410::ack_frame(word, 0));
                        }
                    }
                }
                if let Some(chunk) = script.next() {
                    send(&mut master, &chunk);
                } else if let Some(d) = next.as_mut() {
                    send(&mut master, &ld2410::report_frame(&report(*d)));
                    *d += 1;
                }
            }
        });
        Sim {
            stop,
            commands,
            thread: Some(thread),
        }
    }

    fn commands(&self) -> Vec<u16> {
        self.commands.lock().unwrap().clone()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Command words of the complete command frames at the front of `buf`.
fn take_commands(buf: &mut Vec<u8>) -> Vec<u16> {
    let mut out = Vec::new();
    loop {
        let Some(start) = buf.windows(4).position(|w| w == ld2410::COMMAND_HEADER) else {
            return out;
        };
        buf.drain(..start);
        if buf.len() < 8 {
            return out;
        }
        let len = u16::from_le_bytes([buf[4], buf[5]]) as usize;
        if buf.len() < 10 + len {
            return out;
        }
        out.push(u16::from_le_bytes([buf[6], buf[7]]));
        buf.drain(..10 + len);
    }
}

fn radar_config(device: &Path, extra: &str) -> SerialSource {
    toml::from_str(&format!(
        "device = {:?}\nframing = \"ld2410\"\nsensor_prefix = \"radar\"\nmin_interval = \"0s\"\nreconnect_max = \"200ms\"\n{extra}",
        device.display().to_string()
    ))
    .unwrap()
}

/// The library's serial source on a channel, with its status.
struct Running {
    rx: mpsc::Receiver<Item>,
    status: Arc<SerialStatus>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), serial::SerialError>>,
}

fn start_source(cfg: SerialSource) -> Running {
    let (tx, rx) = mpsc::channel(1024);
    let status = Arc::new(SerialStatus::default());
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(serial::run(
        "radar".into(),
        cfg,
        Duration::from_secs(300),
        tx,
        status.clone(),
        stop_rx,
    ));
    Running {
        rx,
        status,
        stop,
        task,
    }
}

impl Running {
    /// Collects items until `done` holds for what was collected.
    async fn collect_until(
        &mut self,
        what: &str,
        deadline: Duration,
        items: &mut Vec<Item>,
        done: impl Fn(&[Item]) -> bool,
    ) {
        let end = tokio::time::Instant::now() + deadline;
        while !done(items) {
            match tokio::time::timeout_at(end, self.rx.recv()).await {
                Ok(Some(item)) => items.push(item),
                Ok(None) => panic!("source ended while waiting until {what}"),
                Err(_) => {
                    panic!("timed out after {deadline:?} waiting until {what}; got {items:#?}")
                }
            }
        }
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("source stops on shutdown");
        r.unwrap().unwrap();
    }
}

fn distances(items: &[Item]) -> Vec<f64> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Observation(o, _) if o.sensor == "radar_moving_distance" => match o.value {
                Reading::Number(n) => Some(n),
                Reading::Bool(_) => None,
            },
            _ => None,
        })
        .collect()
}

fn rejects(items: &[Item]) -> Vec<(String, String)> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Rejected(r, _) => Some((r.reason.clone(), r.origin.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ld2410_good_frames_pass_and_bad_ones_are_counted_with_reasons() {
    let pty = Pty::open();
    let mut run = start_source(radar_config(&pty.path, ""));
    support::wait_until("device open", Duration::from_secs(5), || {
        run.status.connected.load(Ordering::Relaxed)
    });
    let frame = |d| ld2410::report_frame(&report(d));
    let mut phantom_energy = report(130);
    phantom_energy.moving_energy = 130;
    // Energy at still distance 0 is how real radars report (see
    // tests/fixtures/ld2410_captures.txt): a reading, not a ghost.
    let mut still_at_0 = report(135);
    still_at_0.still_energy = 40;
    let mut wrong_footer = frame(888);
    let n = wrong_footer.len();
    wrong_footer[n - 2] = 0xAA;
    let script = vec![
        frame(100),
        [b"\x00garbage\xff".to_vec(), frame(110)].concat(),
        frame(999)[..12].to_vec(),
        frame(120),
        ld2410::report_frame(&phantom_energy),
        frame(140),
        ld2410::report_frame(&still_at_0),
        frame(150),
        wrong_footer,
        frame(160),
        b"AT+OK\r\n".to_vec(),
        frame(170),
    ];
    let _sim = Sim::start(pty.master(), script, false, None);
    let mut items = Vec::new();
    let good = [100.0, 110.0, 120.0, 140.0, 135.0, 150.0, 160.0, 170.0];
    run.collect_until(
        "every good frame and every bad one arrived",
        Duration::from_secs(10),
        &mut items,
        |items| distances(items).len() == good.len() && rejects(items).len() == 5,
    )
    .await;
    assert_eq!(distances(&items), good, "every good frame, in order");
    let reasons = rejects(&items);
    let count = |needle: &str| reasons.iter().filter(|(r, _)| r.contains(needle)).count();
    assert_eq!(count("LD2410 garbage"), 2, "{reasons:#?}");
    assert_eq!(count("LD2410 footer"), 2, "{reasons:#?}");
    assert_eq!(count("above 100"), 1, "{reasons:#?}");
    assert!(
        reasons
            .iter()
            .all(|(_, o)| o.starts_with(&format!("serial {} byte ", pty.path.display()))),
        "{reasons:#?}"
    );
    let s = &run.status;
    assert_eq!(s.frames.load(Ordering::Relaxed), 8);
    assert_eq!(s.frame_rejects(RejectKind::Garbage), 2);
    assert_eq!(s.frame_rejects(RejectKind::Footer), 2);
    assert_eq!(s.frame_rejects(RejectKind::Implausible), 1);
    // Only changes: the first frame sends all eight outputs, later frames
    // only distances (the state and energies did not change).
    let first_frame_outputs = items
        .iter()
        .take_while(|i| !matches!(i, Item::Rejected(..)))
        .count();
    assert_eq!(first_frame_outputs, 8);
    run.stop().await;
}

/// Captures the log lines of the current thread's tasks.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sub = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        tracing::subscriber::set_default(sub)
    }
}

#[tokio::test]
async fn engineering_mode_is_enabled_when_the_radar_acknowledges() {
    let log = Capture::default();
    let _guard = log.install();
    let pty = Pty::open();
    let mut eng = report(210);
    eng.engineering = true;
    eng.extra = vec![
        8, 8, 9, 8, 7, 6, 5, 4, 3, 2, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0,
    ];
    // The radar answers every command; its reports follow in engineering form.
    let sim = Sim::start(
        pty.master(),
        vec![vec![], vec![], ld2410::report_frame(&eng)],
        true,
        None,
    );
    let mut run = start_source(radar_config(&pty.path, "engineering_mode = true"));
    let mut items = Vec::new();
    run.collect_until(
        "the engineering report",
        Duration::from_secs(10),
        &mut items,
        |items| distances(items) == [210.0],
    )
    .await;
    assert_eq!(
        sim.commands(),
        [
            ld2410::CMD_ENABLE_CONFIG,
            ld2410::CMD_ENABLE_ENGINEERING,
            ld2410::CMD_END_CONFIG
        ]
    );
    assert_eq!(run.status.acks.load(Ordering::Relaxed), 3);
    assert_eq!(run.status.command_failures.load(Ordering::Relaxed), 0);
    assert!(log.text().contains("LD2410 switched to engineering mode"));
    run.stop().await;
}

#[tokio::test]
async fn a_missing_ack_is_reported_and_reports_still_flow() {
    let log = Capture::default();
    let _guard = log.install();
    let pty = Pty::open();
    // A radar that ignores commands (wrong baud, RX not wired) but reports.
    let sim = Sim::start(pty.master(), vec![], false, Some(300));
    let mut run = start_source(radar_config(&pty.path, "engineering_mode = true"));
    let mut items = Vec::new();
    run.collect_until(
        "reports after the failed command",
        Duration::from_secs(10),
        &mut items,
        |items| distances(items).len() >= 15,
    )
    .await;
    assert_eq!(
        sim.commands(),
        [ld2410::CMD_ENABLE_CONFIG],
        "no further commands after a missing ACK"
    );
    assert_eq!(run.status.command_failures.load(Ordering::Relaxed), 1);
    assert_eq!(run.status.acks.load(Ordering::Relaxed), 0);
    let text = log.text();
    assert!(
        text.contains("LD2410 did not acknowledge command (enable configuration)")
            && text.contains("0x00FF"),
        "{text}"
    );
    // Frames that arrived while waiting for the ACK were not lost: the
    // distances rise by one per frame with no gap.
    let d = distances(&items);
    assert!(d.windows(2).all(|w| w[1] == w[0] + 1.0), "{d:?}");
    run.stop().await;
}

/// The issue's case: a radar streaming every 150 ms while the daemon waits
/// a whole second for an ACK that never comes. Every frame read meanwhile
/// is applied in order with the time it was read, so `min_interval` (here
/// 100 ms) lets each one through; stamping them all when the wait ended
/// let 1 of 7 through, a second late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_read_during_a_command_exchange_keep_their_own_times() {
    let pty = Pty::open();
    let mut cfg = radar_config(&pty.path, "engineering_mode = true");
    cfg.min_interval = Duration::from_millis(100);
    let mut run = start_source(cfg);
    support::wait_until("device open", Duration::from_secs(5), || {
        run.status.connected.load(Ordering::Relaxed)
    });
    let sim = Sim::start_every(
        pty.master(),
        vec![],
        false,
        Some(500),
        Duration::from_millis(150),
    );
    let mut items = Vec::new();
    let timed = |items: &[Item]| -> Vec<(f64, i64)> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Observation(o, _) if o.sensor == "radar_moving_distance" => match o.value {
                    Reading::Number(n) => Some((n, o.observed_at.0)),
                    Reading::Bool(_) => None,
                },
                _ => None,
            })
            .collect()
    };
    run.collect_until(
        "ten frames, the first of them during the exchange",
        Duration::from_secs(10),
        &mut items,
        |items| timed(items).len() >= 10,
    )
    .await;
    assert_eq!(sim.commands(), [ld2410::CMD_ENABLE_CONFIG]);
    assert_eq!(run.status.command_failures.load(Ordering::Relaxed), 1);
    let got = timed(&items);
    // One observation per frame, none skipped (distances rise by one per
    // frame), each stamped at least min_interval after the one before.
    assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1.0), "{got:?}");
    let gaps: Vec<i64> = got.windows(2).map(|w| w[1].1 - w[0].1).collect();
    assert!(gaps.iter().all(|g| *g >= 100), "{gaps:?}");
    // The first six or seven were read while the ACK was awaited (1 s at
    // 150 ms a frame): the first ten span their real 1.35 s, where stamping
    // them when the wait ended would have squeezed them together.
    let span = got[9].1 - got[0].1;
    assert!(span >= 1200, "{span} ms for ten frames");
    run.stop().await;
}

/// The value of the series `name` (with its labels) in a /metrics text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

/// A radar unplugged in the middle of a frame: the frame's first bytes go
/// to REJECTED (as a `footer` reject: the frame never ended), not nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_cut_off_by_an_unplug_is_kept() {
    let pty = Pty::open();
    let mut run = start_source(radar_config(&pty.path, ""));
    support::wait_until("device open", Duration::from_secs(5), || {
        run.status.connected.load(Ordering::Relaxed)
    });
    let mut master = pty.master();
    let whole = ld2410::report_frame(&report(120));
    let half = &ld2410::report_frame(&report(130))[..11];
    send(&mut master, &[whole.clone(), half.to_vec()].concat());
    let sent = (whole.len() + half.len()) as u64;
    support::wait_until("both read", Duration::from_secs(5), || {
        run.status.bytes.load(Ordering::Relaxed) == sent
    });
    drop(master);
    drop(pty);
    let mut items = Vec::new();
    run.collect_until(
        "the cut-off frame rejected",
        Duration::from_secs(10),
        &mut items,
        |items| !rejects(items).is_empty(),
    )
    .await;
    assert_eq!(distances(&items), [120.0]);
    let cut: Vec<&presenced::sources::Rejected> = items
        .iter()
        .filter_map(|i| match i {
            Item::Rejected(r, _) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(cut.len(), 1);
    assert_eq!(&cut[0].payload[..], half);
    assert!(
        cut[0]
            .reason
            .starts_with("LD2410 footer: frame cut off after 11 byte(s): the device disappeared"),
        "{}",
        cut[0].reason
    );
    assert!(
        cut[0].origin.ends_with(&format!("byte {}", whole.len())),
        "{}",
        cut[0].origin
    );
    assert_eq!(run.status.cut_off.load(Ordering::Relaxed), 1);
    assert_eq!(run.status.frame_rejects(RejectKind::Footer), 1);
    run.stop().await;
}

// ---- Published captures (tests/fixtures/ld2410_captures.txt) ----

/// One entry of the capture fixture.
#[derive(Debug)]
struct CaptureEntry {
    name: String,
    frame: Vec<u8>,
    expect: ld2410::Event,
}

fn hex_bytes(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("bad hex byte {b:?}")))
        .collect()
}

/// Parses `expect: report target=.. moving=cm/energy still=cm/energy
/// detect=cm engineering=yes|no [extra=..]` or `expect: ack command=..
/// status=..` into the event the decoder must yield.
fn expected_event(spec: &str) -> ld2410::Event {
    let (kind, rest) = spec.split_once(' ').expect("expect: kind and fields");
    let (fields, extra) = match rest.split_once(" extra=") {
        Some((f, e)) => (f, hex_bytes(e)),
        None => (rest, Vec::new()),
    };
    let get = |key: &str| {
        fields
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing in {spec:?}"))
    };
    let pair = |key: &str| {
        let (d, e) = get(key).split_once('/').expect("cm/energy");
        (d.parse::<u16>().unwrap(), e.parse::<u8>().unwrap())
    };
    match kind {
        "report" => {
            let (md, me) = pair("moving");
            let (sd, se) = pair("still");
            ld2410::Event::Report(Report {
                engineering: get("engineering") == "yes",
                target: match get("target") {
                    "none" => TargetState::None,
                    "moving" => TargetState::Moving,
                    "still" => TargetState::Still,
                    "both" => TargetState::MovingAndStill,
                    t => panic!("target {t:?}"),
                },
                moving_distance: md,
                moving_energy: me,
                still_distance: sd,
                still_energy: se,
                detection_distance: get("detect").parse().unwrap(),
                extra,
            })
        }
        "ack" => ld2410::Event::Ack(ld2410::CommandAck {
            command: u16::from_str_radix(get("command"), 16).unwrap(),
            status: get("status").parse().unwrap(),
        }),
        k => panic!("expect kind {k:?}"),
    }
}

fn captures() -> Vec<CaptureEntry> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ld2410_captures.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let lines: Vec<&str> = block
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        if lines.is_empty() {
            continue;
        }
        let field = |key: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(&format!("{key}: ")))
                .unwrap_or_else(|| panic!("{key}: missing in {block:?}"))
        };
        // Every capture names where it was published.
        assert!(field("source").len() > 10, "{block}");
        field("firmware");
        out.push(CaptureEntry {
            name: field("name").to_owned(),
            frame: hex_bytes(field("frame")),
            expect: expected_event(field("expect")),
        });
    }
    out
}

fn decode(chunks: &[&[u8]]) -> Vec<ld2410::Event> {
    let mut d = ld2410::Decoder::new();
    let mut out = Vec::new();
    for c in chunks {
        d.push(c);
        out.extend(std::iter::from_fn(|| d.next_event()));
    }
    out
}

#[test]
fn every_published_capture_decodes_as_the_radar_meant_it() {
    let caps = captures();
    assert!(caps.len() >= 14, "{} captures", caps.len());
    for c in &caps {
        assert_eq!(
            decode(&[&c.frame]),
            std::slice::from_ref(&c.expect),
            "capture {}",
            c.name
        );
    }
    // Back to back, as a radar streams them, cut at every byte boundary.
    let stream: Vec<u8> = caps.iter().flat_map(|c| c.frame.clone()).collect();
    let want: Vec<ld2410::Event> = caps.iter().map(|c| c.expect.clone()).collect();
    for cut in 0..=stream.len() {
        assert_eq!(
            decode(&[&stream[..cut], &stream[cut..]]),
            want,
            "cut at {cut}"
        );
    }
    // The "no target" captures say so, whatever energies they carry.
    for c in &caps {
        if let ld2410::Event::Report(r) = &c.expect {
            let present = ld2410::outputs(r)[0].1;
            let want = Reading::Bool(r.target != TargetState::None);
            assert_eq!(present, want, "capture {}", c.name);
        }
    }
}

/// Every capture through a pty and the serial source as deployed: each
/// report becomes its readings (radar_present false for the "no target"
/// frames), nothing is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_captures_replayed_on_a_pty_give_their_readings() {
    let caps = captures();
    let reports: Vec<&Report> = caps
        .iter()
        .filter_map(|c| match &c.expect {
            ld2410::Event::Report(r) => Some(r),
            _ => None,
        })
        .collect();
    let pty = Pty::open();
    let mut run = start_source(radar_config(&pty.path, "changes_only = false"));
    support::wait_until("device open", Duration::from_secs(5), || {
        run.status.connected.load(Ordering::Relaxed)
    });
    let _sim = Sim::start(
        pty.master(),
        caps.iter().map(|c| c.frame.clone()).collect(),
        false,
        None,
    );
    let present = |items: &[Item]| -> Vec<bool> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Observation(o, _) if o.sensor == "radar_present" => match o.value {
                    Reading::Bool(b) => Some(b),
                    Reading::Number(_) => None,
                },
                _ => None,
            })
            .collect()
    };
    let mut items = Vec::new();
    run.collect_until(
        "a reading per captured report",
        Duration::from_secs(15),
        &mut items,
        |items| {
            items
                .iter()
                .filter(|i| matches!(i, Item::Observation(..)))
                .count()
                == reports.len() * ld2410::OUTPUTS.len()
        },
    )
    .await;
    let want: Vec<bool> = reports
        .iter()
        .map(|r| r.target != TargetState::None)
        .collect();
    assert_eq!(present(&items), want);
    assert!(want.contains(&false) && want.contains(&true));
    assert_eq!(rejects(&items), [], "no capture is rejected");
    let still_energy: Vec<f64> = items
        .iter()
        .filter_map(|i| match i {
            Item::Observation(o, _) if o.sensor == "radar_still_energy" => match o.value {
                Reading::Number(n) => Some(n),
                Reading::Bool(_) => None,
            },
            _ => None,
        })
        .collect();
    let want_energy: Vec<f64> = reports.iter().map(|r| f64::from(r.still_energy)).collect();
    assert_eq!(still_energy, want_energy);
    run.stop().await;
}

// ---- Through the real binary ----

fn daemon_toml(nats_url: &str, http_port: u16, serial: &str, sensor: &str) -> String {
    format!(
        r#"site = "test"

[nats]
url = "{nats_url}"
request_timeout = "2s"

[http]
listen = "127.0.0.1:{http_port}"

[ingest]
reject_log_every = "1s"

[engine]
drain_timeout = "5s"

{serial}

[zones.lab]
occupied_above = 0.6
arrive_after = "0s"
leave_after = "0s"
[[zones.lab.evidence]]
sensor = "{sensor}"
p_true = 0.95
p_false = 0.05
"#
    )
}

fn start_daemon(toml: &str, http_port: u16) -> (Daemon, SocketAddr) {
    let d = Daemon::start_provisioned(toml, http_port);
    (d, SocketAddr::from(([127, 0, 0, 1], http_port)))
}

/// Sensor and value of every observation in SENSORS.
async fn stored(js: &async_nats::jetstream::Context) -> Vec<(String, serde_json::Value)> {
    read_stream(js, "SENSORS")
        .await
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            (v["sensor"].as_str().unwrap().to_owned(), v["value"].clone())
        })
        .collect()
}

async fn max_distance(js: &async_nats::jetstream::Context) -> f64 {
    stored(js)
        .await
        .iter()
        .filter(|(s, _)| s == "radar_moving_distance")
        .filter_map(|(_, v)| v.as_f64())
        .fold(0.0, f64::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplug_and_replug_resumes_readings_and_logs_the_outage_once() {
    let nats = support::NatsServer::start(support::NatsOptions::default());
    let js = jetstream(&nats.url()).await;
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("usb-Silicon_Labs_CP2102-if00-port0");
    let first = Pty::open();
    first.link_at(&link);
    let http_port = support::free_port();
    let serial = format!(
        "[serial.radar]\ndevice = {:?}\nframing = \"ld2410\"\nsensor_prefix = \"radar\"\nmin_interval = \"0s\"\nreconnect_max = \"200ms\"\n",
        link.display().to_string()
    );
    let (d, http) = start_daemon(
        &daemon_toml(&nats.url(), http_port, &serial, "radar_present"),
        http_port,
    );
    d.wait_for_log("serial device open", Duration::from_secs(10));
    let sim = Sim::start(first.master(), vec![], false, Some(100));
    eventually(
        "readings before the unplug",
        Duration::from_secs(15),
        || async { max_distance(&js).await >= 105.0 },
    )
    .await;
    let (_, metrics) = support::http_get(http, "/metrics").unwrap();
    assert!(
        metrics.contains("presenced_serial_connected 1"),
        "{metrics}"
    );
    // Per port: labelled with the source and the configured (stable) path.
    let labels = format!("source=\"radar\",device=\"{}\"", link.display());
    assert_eq!(
        metric(
            &metrics,
            &format!("presenced_serial_port_connected{{{labels}}}")
        ),
        1
    );
    assert!(
        metric(
            &metrics,
            &format!("presenced_serial_port_frames_total{{{labels}}}")
        ) >= 5
    );
    assert_eq!(
        metric(
            &metrics,
            &format!("presenced_serial_port_frame_rejects_total{{{labels},reason=\"footer\"}}")
        ),
        0
    );

    // Unplug: the device disappears; the source retries several times.
    drop(sim);
    drop(first);
    d.wait_for_log("serial device unavailable", Duration::from_secs(10));
    support::wait_until("several reopen attempts", Duration::from_secs(15), || {
        d.log().matches("serial device still unavailable").count() >= 3
    });
    let (_, metrics) = support::http_get(http, "/metrics").unwrap();
    assert!(
        metrics.contains("presenced_serial_connected 0"),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            &format!("presenced_serial_port_connected{{{labels}}}")
        ),
        0
    );
    assert_eq!(
        metric(
            &metrics,
            &format!("presenced_serial_port_disconnects_total{{{labels}}}")
        ),
        1
    );

    // Replug: a new device node behind the same stable link.
    let second = Pty::open();
    second.link_at(&link);
    d.wait_for_log("serial device back", Duration::from_secs(10));
    let _sim = Sim::start(second.master(), vec![], false, Some(500));
    eventually(
        "readings after the replug",
        Duration::from_secs(15),
        || async { max_distance(&js).await >= 505.0 },
    )
    .await;
    let log = d.log();
    assert_eq!(
        log.matches("serial device unavailable; retrying").count(),
        1,
        "one warning per outage:\n{log}"
    );
    assert_eq!(log.matches("serial device back").count(), 1);
    assert!(!log.contains("panicked"));
    assert_eq!(stream_messages(&js, "REJECTED").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_good_lines_are_stored_and_bad_ones_rejected_with_line_numbers() {
    let nats = support::NatsServer::start(support::NatsOptions::default());
    let js = jetstream(&nats.url()).await;
    let pty = Pty::open();
    let http_port = support::free_port();
    let serial = format!(
        "[serial.esp]\ndevice = {:?}\nframing = \"json_lines\"\n",
        pty.path.display().to_string()
    );
    let (d, http) = start_daemon(
        &daemon_toml(&nats.url(), http_port, &serial, "desk_pir"),
        http_port,
    );
    d.wait_for_log("serial device open", Duration::from_secs(10));
    let mut master = pty.master();
    send(
        &mut master,
        b"{\"sensor\":\"desk_pir\",\"value\":true}\r\n\
          {\"sensor\":\"desk_pir\",\"value\":tru}\r\n\
          \r\n\
          {\"sensor\":\"Desk PIR\",\"value\":true}\r\n\
          {\"sensor\":\"lux\",\"value\":42.5}\r\n\
          boot: ets Jun  8 2016 00:22:57\r\n",
    );
    eventually("two good lines stored", Duration::from_secs(10), || async {
        stream_messages(&js, "SENSORS").await == 2
    })
    .await;
    eventually(
        "three bad lines rejected",
        Duration::from_secs(10),
        || async { stream_messages(&js, "REJECTED").await == 3 },
    )
    .await;
    assert_eq!(
        stored(&js).await,
        [
            ("desk_pir".to_owned(), serde_json::json!(true)),
            ("lux".to_owned(), serde_json::json!(42.5))
        ]
    );
    let rejected = read_stream(&js, "REJECTED").await;
    let header = |m: &async_nats::jetstream::Message, h: &str| {
        m.headers
            .as_ref()
            .and_then(|hs| hs.get(h))
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    let dev = pty.path.display().to_string();
    let want = [
        (2, "invalid JSON at byte"),
        (4, "sensor id \"Desk PIR\" is invalid"),
        (6, "invalid JSON at byte 0"),
    ];
    for (m, (line, reason)) in rejected.iter().zip(want) {
        assert_eq!(
            header(m, "Presenced-Origin"),
            format!("serial {dev} line {line}")
        );
        assert!(
            header(m, "Presenced-Reason").contains(reason),
            "{}",
            header(m, "Presenced-Reason")
        );
        assert_eq!(m.subject.as_str(), "rejected.test.esp");
    }
    assert_eq!(&rejected[2].payload[..], b"boot: ets Jun  8 2016 00:22:57");
    eventually(
        "the zone follows the device",
        Duration::from_secs(10),
        || async {
            zone(&js, "lab")
                .await
                .is_some_and(|z| z.state == presenced::engine::Presence::Occupied)
        },
    )
    .await;
    let (_, metrics) = support::http_get(http, "/metrics").unwrap();
    assert!(metrics.contains("presenced_rejects_total 3"), "{metrics}");
    let labels = format!("source=\"esp\",device=\"{dev}\"");
    assert!(
        metrics.contains(&format!("presenced_serial_port_lines_total{{{labels}}} 6")),
        "{metrics}"
    );

    // The device disappears in the middle of a line: the line's bytes are
    // kept in REJECTED, not silently dropped.
    let bytes_before = metric(
        &support::http_get(http, "/metrics").unwrap().1,
        &format!("presenced_serial_port_bytes_total{{{labels}}}"),
    );
    send(&mut master, b"{\"sensor\":\"lux\",\"val");
    // The bytes are in the source's hands before the unplug (a hangup
    // discards what is still in the pty's buffer).
    support::wait_until("the partial line read", Duration::from_secs(10), || {
        let (_, m) = support::http_get(http, "/metrics").unwrap();
        let v = metric(
            &m,
            &format!("presenced_serial_port_bytes_total{{{labels}}}"),
        );
        v == bytes_before + 20
    });
    drop(master);
    drop(pty);
    eventually(
        "the cut-off line rejected",
        Duration::from_secs(10),
        || async { stream_messages(&js, "REJECTED").await == 4 },
    )
    .await;
    let rejected = read_stream(&js, "REJECTED").await;
    let cut = &rejected[3];
    assert_eq!(&cut.payload[..], b"{\"sensor\":\"lux\",\"val");
    assert_eq!(
        header(cut, "Presenced-Origin"),
        format!("serial {dev} line 7")
    );
    let reason = header(cut, "Presenced-Reason");
    assert!(
        reason.contains("line cut off after 20 byte(s) without a newline: the device disappeared"),
        "{reason}"
    );
    let (_, metrics) = support::http_get(http, "/metrics").unwrap();
    for want in [
        format!("presenced_serial_port_cut_off_total{{{labels}}} 1"),
        format!("presenced_serial_port_line_rejects_total{{{labels}}} 4"),
        format!("presenced_serial_port_connected{{{labels}}} 0"),
        format!("presenced_serial_port_disconnects_total{{{labels}}} 1"),
    ] {
        assert!(metrics.contains(&want), "{want} missing:\n{metrics}");
    }
}
