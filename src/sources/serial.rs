//! Serial source: a local device on a UART (an HLK-LD2410 radar, or a
//! microcontroller printing JSON lines) turned into [`Item`]s for ingest.
//!
//! The device can vanish at any time (a USB adapter unplugged, a hub
//! reset). [`run`] reopens the configured path with capped backoff, logs
//! the outage once, and keeps a link state in [`SerialStatus`]; nothing
//! read from the wire can stop or crash it.
//!
//! Serial input has no upstream acknowledgement and no redelivery, so
//! every item travels with [`Ack::none`] and gets its own id
//! ([`delivery_id`]: a random per-process session and a counter). A hash
//! of the content would make two readings with the same value in the same
//! millisecond (a JSON-lines device without a clock, repeating itself)
//! one stored reading; nothing here can be delivered twice, so nothing
//! needs a content-derived id.

use crate::base::backoff::Backoff;
use crate::metrics::Event as TelemetryEvent;
use crate::observation::{delivery_id, Observation, Reading, OBSERVATION_SCHEMA};
use crate::sources::config::{SerialFraming, SerialSource};
use crate::sources::ld2410::{self, Decoder, Event, RejectKind, Report};
use crate::sources::payload::{check_device_time, extract_timestamp, extract_value, ValueSelector};
use crate::sources::{Ack, Item, Rejected};
use crate::time::Timestamp;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tracing::{debug, info, warn};

/// First reopen delay after an unplug; doubles up to `reconnect_max`.
const BACKOFF_START: Duration = Duration::from_millis(100);
/// How long a port must stay readable before the backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(2);
/// How long the radar gets to acknowledge a command.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest JSON line kept; a device that never sends a newline must not
/// grow memory without bound.
pub const MAX_LINE: usize = 4096;
const READ_CHUNK: usize = 1024;

/// Counters and link state of one serial source, read by metrics.
#[derive(Debug, Default)]
pub struct SerialStatus {
    /// Whether the device is open right now.
    pub connected: AtomicBool,
    /// Bytes read from the device: tells "sends nothing" from "sends
    /// nothing we understand" (wrong baud, wrong framing).
    pub bytes: AtomicU64,
    /// Successful opens, the first one included.
    pub connects: AtomicU64,
    /// Times an open device was lost (read error or end of file).
    pub disconnects: AtomicU64,
    /// LD2410 report frames decoded and found plausible.
    pub frames: AtomicU64,
    /// JSON lines read (good or bad).
    pub lines: AtomicU64,
    /// Observations handed to ingest.
    pub observations: AtomicU64,
    /// LD2410 rejections, indexed like [`RejectKind::ALL`].
    pub frame_rejects: [AtomicU64; 6],
    /// JSON lines rejected.
    pub line_rejects: AtomicU64,
    /// Command ACKs received with status 0.
    pub acks: AtomicU64,
    /// Commands not acknowledged in time, or acknowledged with an error.
    pub command_failures: AtomicU64,
    /// Partial input (a JSON line without its newline, an LD2410 frame
    /// without its end) left when the device disappeared; each is kept in
    /// REJECTED.
    pub cut_off: AtomicU64,
}

/// The device opened for the first time (counted in `connects`).
pub const SERIAL_OPEN: TelemetryEvent = TelemetryEvent {
    name: "serial_open",
    level: tracing::Level::INFO,
    message: "serial device open",
    counter: "presenced_serial_port_connects_total",
};

/// The device opened again after an outage that was logged.
pub const SERIAL_BACK: TelemetryEvent = TelemetryEvent {
    name: "serial_back",
    level: tracing::Level::INFO,
    message: "serial device back; reading again",
    counter: "presenced_serial_port_connects_total",
};

/// Any other open after the first.
pub const SERIAL_REOPENED: TelemetryEvent = TelemetryEvent {
    name: "serial_reopened",
    level: tracing::Level::DEBUG,
    message: "serial device open again",
    counter: "presenced_serial_port_connects_total",
};

/// A JSON line its mapping rejects: handed to ingest for REJECTED.
pub const SERIAL_LINE_REJECTED: TelemetryEvent = TelemetryEvent {
    name: "serial_line_rejected",
    level: tracing::Level::DEBUG,
    message: "serial line rejected",
    counter: "presenced_serial_port_line_rejects_total",
};

/// A JSON line cut off by the device disappearing, kept in REJECTED
/// (counted as cut off and as a line reject).
pub const SERIAL_LINE_CUT_OFF: TelemetryEvent = TelemetryEvent {
    name: "serial_line_cut_off",
    level: tracing::Level::INFO,
    message: "serial line cut off by the device disappearing; kept in REJECTED",
    counter: "presenced_serial_port_cut_off_total, presenced_serial_port_line_rejects_total",
};

/// An LD2410 frame cut off by the device disappearing, kept in REJECTED
/// (counted as cut off and as a footer frame reject).
pub const LD2410_FRAME_CUT_OFF: TelemetryEvent = TelemetryEvent {
    name: "ld2410_frame_cut_off",
    level: tracing::Level::INFO,
    message: "LD2410 frame cut off by the device disappearing; kept in REJECTED",
    counter: "presenced_serial_port_cut_off_total, presenced_serial_port_frame_rejects_total{kind=\"footer\"}",
};

/// An LD2410 command acknowledged with status 0.
pub const LD2410_ACK: TelemetryEvent = TelemetryEvent {
    name: "ld2410_ack",
    level: tracing::Level::DEBUG,
    message: "LD2410 command acknowledged",
    counter: "presenced_serial_port_acks_total",
};

impl SerialStatus {
    pub fn frame_rejects(&self, kind: RejectKind) -> u64 {
        let i = RejectKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.frame_rejects[i].load(Ordering::Relaxed)
    }

    fn count_reject(&self, kind: RejectKind, n: u64) {
        if let Some(i) = RejectKind::ALL.iter().position(|k| *k == kind) {
            self.frame_rejects[i].fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// One serial source's counters as `/metrics` labels them: a site with
/// two radars must see which one is unplugged or noisy.
#[derive(Debug, Clone)]
pub struct PortMetrics {
    pub source: String,
    pub device: String,
    pub status: Arc<SerialStatus>,
}

impl PortMetrics {
    pub fn new(source: &str, device: &Path, status: &Arc<SerialStatus>) -> Self {
        PortMetrics {
            source: source.to_owned(),
            device: device.display().to_string(),
            status: status.clone(),
        }
    }
}

/// The serial sources' own `/metrics` families: LD2410 rejects by reason
/// summed over the site's ports, then each port's counters by `source`
/// and `device`.
#[derive(Debug, Default)]
pub struct Ports(std::sync::RwLock<Vec<PortMetrics>>);

impl Ports {
    /// Registers a serial source so `/metrics` shows its port's counters.
    pub fn add(&self, port: PortMetrics) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).push(port);
    }
}

impl crate::metrics::Collector for Ports {
    fn collect(&self, r: &mut prometheus_client::registry::Registry) {
        use crate::metrics::{counter_family, counter_name, gauge_family, labels};
        let ports = self.0.read().unwrap_or_else(|p| p.into_inner());
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rejects = counter_family();
        for kind in RejectKind::ALL {
            let n: u64 = ports.iter().map(|p| p.status.frame_rejects(kind)).sum();
            rejects
                .get_or_create(&labels(&[("reason", kind.label())]))
                .inc_by(n);
        }
        r.register(
            counter_name("presenced_serial_frame_rejects_total"),
            "LD2410 input rejected, by reason.",
            rejects,
        );
        if ports.is_empty() {
            return;
        }
        let port = |p: &PortMetrics| labels(&[("source", &p.source), ("device", &p.device)]);
        let connected = gauge_family();
        for p in ports.iter() {
            connected
                .get_or_create(&port(p))
                .set(i64::from(p.status.connected.load(Ordering::Relaxed)));
        }
        r.register(
            "presenced_serial_port_connected",
            "1 while the port is open.",
            connected,
        );
        type Field = fn(&SerialStatus) -> &AtomicU64;
        let counters: [(&str, &str, Field); 10] = [
            (
                "presenced_serial_port_bytes_total",
                "Bytes read from the port.",
                |s| &s.bytes,
            ),
            (
                "presenced_serial_port_connects_total",
                "Opens of the port, the first one included.",
                |s| &s.connects,
            ),
            (
                "presenced_serial_port_disconnects_total",
                "Times the open port was lost (unplugged, read error).",
                |s| &s.disconnects,
            ),
            (
                "presenced_serial_port_frames_total",
                "LD2410 report frames decoded.",
                |s| &s.frames,
            ),
            (
                "presenced_serial_port_lines_total",
                "JSON lines read, good or bad.",
                |s| &s.lines,
            ),
            (
                "presenced_serial_port_observations_total",
                "Observations handed to ingest.",
                |s| &s.observations,
            ),
            (
                "presenced_serial_port_line_rejects_total",
                "JSON lines rejected (cut-off lines included).",
                |s| &s.line_rejects,
            ),
            (
                "presenced_serial_port_acks_total",
                "LD2410 command ACKs with status 0.",
                |s| &s.acks,
            ),
            (
                "presenced_serial_port_command_failures_total",
                "LD2410 commands not acknowledged in time or refused.",
                |s| &s.command_failures,
            ),
            (
                "presenced_serial_port_cut_off_total",
                "Partial lines or frames left when the device disappeared.",
                |s| &s.cut_off,
            ),
        ];
        for (name, help, field) in counters {
            let family = counter_family();
            for p in ports.iter() {
                family.get_or_create(&port(p)).inc_by(get(field(&p.status)));
            }
            r.register(counter_name(name), help, family);
        }
        let by_reason = counter_family();
        for p in ports.iter() {
            for kind in RejectKind::ALL {
                let mut l = port(p);
                l.push(("reason".to_owned(), kind.label().to_owned()));
                by_reason
                    .get_or_create(&l)
                    .inc_by(p.status.frame_rejects(kind));
            }
        }
        r.register(
            counter_name("presenced_serial_port_frame_rejects_total"),
            "LD2410 input rejected, by port and reason.",
            by_reason,
        );
    }
}

/// Why the source stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("serial source config: {0}")]
    Config(String),
    #[error("ingest stopped accepting input")]
    IngestClosed,
}

impl SerialError {
    /// Whether running the source again could succeed unchanged: only a
    /// closed ingest channel (the daemon stopping). A lost or missing
    /// device is not an error at all (it is reopened with backoff).
    pub fn is_retryable(&self) -> bool {
        matches!(self, SerialError::IngestClosed)
    }

    /// Whether the daemon should stop rather than run without this
    /// source: a config problem fails the same way every time.
    pub fn is_fatal(&self) -> bool {
        !self.is_retryable()
    }
}

/// Turns LD2410 reports into observations: each output at most once per
/// `min_interval`, and (with `changes_only`) only when its value differs
/// from the last one sent.
#[derive(Debug)]
pub struct Ld2410Mapper {
    prefix: String,
    min_interval: Duration,
    changes_only: bool,
    last: HashMap<&'static str, (Reading, Timestamp)>,
}

impl Ld2410Mapper {
    pub fn new(prefix: &str, min_interval: Duration, changes_only: bool) -> Self {
        Ld2410Mapper {
            prefix: prefix.to_owned(),
            min_interval,
            changes_only,
            last: HashMap::new(),
        }
    }

    /// Forgets what was sent, so the first report after a reconnect
    /// reports every output again.
    pub fn reset(&mut self) {
        self.last.clear();
    }

    pub fn map(&mut self, source: &str, report: &Report, at: Timestamp) -> Vec<Observation> {
        let mut out = Vec::new();
        for (suffix, value) in ld2410::outputs(report) {
            if let Some((prev, when)) = self.last.get(suffix) {
                if at.since(*when) < self.min_interval || (self.changes_only && *prev == value) {
                    continue;
                }
            }
            self.last.insert(suffix, (value, at));
            out.push(observation(
                source,
                format!("{}_{suffix}", self.prefix),
                value,
                at,
            ));
        }
        out
    }
}

fn observation(source: &str, sensor: String, value: Reading, at: Timestamp) -> Observation {
    Observation {
        v: OBSERVATION_SCHEMA,
        sensor,
        value,
        observed_at: at,
        id: delivery_id(),
        source: source.to_owned(),
        delivery: None,
    }
}

/// Cuts a byte stream into numbered lines (1-based, per connection).
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    line: u64,
    /// The current line already overflowed [`MAX_LINE`]; its rest is
    /// dropped up to the newline.
    overlong: bool,
}

/// One line, or the start of a line that was too long.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    pub number: u64,
    pub bytes: Vec<u8>,
    pub overlong: bool,
}

impl LineSplitter {
    /// The bytes of a line still waiting for its newline, if any: what a
    /// device that disappears mid-line leaves behind.
    pub fn take_partial(&mut self) -> Option<Line> {
        if self.buf.is_empty() && !self.overlong {
            return None;
        }
        Some(Line {
            number: self.line + 1,
            bytes: std::mem::take(&mut self.buf),
            overlong: std::mem::take(&mut self.overlong),
        })
    }

    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Line>) {
        for &b in bytes {
            if b == b'\n' {
                self.line += 1;
                let bytes = std::mem::take(&mut self.buf);
                out.push(Line {
                    number: self.line,
                    bytes,
                    overlong: std::mem::take(&mut self.overlong),
                });
            } else if self.buf.len() < MAX_LINE {
                self.buf.push(b);
            } else {
                self.overlong = true;
            }
        }
    }
}

/// Decodes one JSON line: `{"sensor": "...", "value": ..., "ts": ...}`
/// (`ts` optional, Unix milliseconds or RFC 3339, checked against
/// `max_clock_skew` like every device time). `None` for a blank line.
pub fn decode_line(
    source: &str,
    device: &Path,
    sensors: &[String],
    line: &Line,
    received_at: Timestamp,
    max_clock_skew: Duration,
) -> Option<Result<Observation, Rejected>> {
    let text = line.bytes.strip_suffix(b"\r").unwrap_or(&line.bytes);
    if text.iter().all(u8::is_ascii_whitespace) && !line.overlong {
        return None;
    }
    let reject = |reason: String| Rejected {
        source: source.to_owned(),
        origin: format!("serial {} line {}", device.display(), line.number),
        reason,
        payload: bytes::Bytes::copy_from_slice(text),
        received_at,
        id: delivery_id(),
    };
    if line.overlong {
        return Some(Err(reject(format!(
            "line longer than {MAX_LINE} bytes; the first {MAX_LINE} are kept"
        ))));
    }
    let sensor = match extract_text(text, "sensor") {
        Ok(s) => s,
        Err(why) => return Some(Err(reject(why))),
    };
    if !crate::naming::is_token(&sensor) {
        return Some(Err(reject(format!(
            "sensor id {sensor:?} is invalid: use 1 to 64 of [a-z0-9_-]"
        ))));
    }
    if !sensors.is_empty() && !sensors.contains(&sensor) {
        return Some(Err(reject(format!(
            "sensor {sensor:?} is not in this source's `sensors` list"
        ))));
    }
    let value = match extract_value(text, &ValueSelector::Pointer("/value".into())) {
        Ok(v) => v,
        Err(e) => return Some(Err(reject(format!("value: {e}")))),
    };
    let has_ts = serde_json::from_slice::<serde_json::Value>(text)
        .ok()
        .is_some_and(|v| v.get("ts").is_some());
    let observed_at = if has_ts {
        match extract_timestamp(text, &ValueSelector::Pointer("/ts".into()))
            .map_err(|e| e.to_string())
            .and_then(|t| check_device_time(t, received_at, max_clock_skew))
        {
            Ok(t) => t,
            Err(e) => return Some(Err(reject(format!("ts: {e}")))),
        }
    } else {
        received_at
    };
    Some(Ok(observation(source, sensor, value, observed_at)))
}

/// The string field `name` of a JSON object line, or why not.
fn extract_text(text: &[u8], name: &str) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| {
        let offset = byte_offset(text, e.line(), e.column());
        format!("invalid JSON at byte {offset}: {e}")
    })?;
    match v.get(name) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("`{name}` must be a string, found {other}")),
        None if v.is_object() => Err(format!("`{name}` is missing")),
        None => Err(format!("a line must be a JSON object, found {v}")),
    }
}

fn byte_offset(text: &[u8], line: usize, column: usize) -> usize {
    let start: usize = text
        .split(|b| *b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    start + column.saturating_sub(1)
}

/// Reads the device until `shutdown` turns true (or its sender is gone).
/// Open and read failures are retried forever with capped backoff.
pub async fn run(
    source: String,
    cfg: SerialSource,
    max_clock_skew: Duration,
    tx: mpsc::Sender<Item>,
    status: Arc<SerialStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SerialError> {
    let prefix = match (cfg.framing, &cfg.sensor_prefix) {
        (SerialFraming::Ld2410, None) => {
            return Err(SerialError::Config(format!(
                "serial.{source}.sensor_prefix is required for ld2410 framing"
            )))
        }
        (_, p) => p.clone().unwrap_or_default(),
    };
    let mut link = Link {
        source,
        cfg,
        max_clock_skew,
        tx,
        status,
        mapper: None,
        outage_logged: false,
        ever_connected: false,
    };
    if link.cfg.framing == SerialFraming::Ld2410 {
        link.mapper = Some(Ld2410Mapper::new(
            &prefix,
            link.cfg.min_interval,
            link.cfg.changes_only,
        ));
    }
    let result = link.serve(&mut shutdown).await;
    link.status.connected.store(false, Ordering::Relaxed);
    result
}

struct Link {
    source: String,
    cfg: SerialSource,
    /// `ingest.max_clock_skew`, for JSON lines with a `ts`.
    max_clock_skew: Duration,
    tx: mpsc::Sender<Item>,
    status: Arc<SerialStatus>,
    mapper: Option<Ld2410Mapper>,
    /// Whether the current outage has been logged (once per outage).
    outage_logged: bool,
    ever_connected: bool,
}

/// How a connection ended.
enum End {
    Lost(String),
    Stop,
}

impl Link {
    async fn serve(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), SerialError> {
        let mut backoff = Backoff::new(BACKOFF_START, self.cfg.reconnect_max.max(BACKOFF_START));
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let end = match self.open() {
                Ok(port) => {
                    self.on_open();
                    let opened = std::time::Instant::now();
                    let end = self.session(port, shutdown).await?;
                    // A port that opens and fails at once (a half-enumerated
                    // adapter) keeps backing off instead of spinning.
                    if opened.elapsed() >= STABLE_AFTER {
                        backoff.reset();
                    }
                    self.status.connected.store(false, Ordering::Relaxed);
                    self.status.disconnects.fetch_add(1, Ordering::Relaxed);
                    end
                }
                Err(e) => End::Lost(e),
            };
            match end {
                End::Stop => return Ok(()),
                End::Lost(error) => self.on_lost(&error),
            }
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return Ok(()),
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    fn open(&self) -> Result<SerialStream, String> {
        let path = self.cfg.device.to_string_lossy();
        tokio_serial::new(path, self.cfg.baud_rate())
            .open_native_async()
            .map_err(|e| format!("cannot open: {e}"))
    }

    fn device(&self) -> String {
        self.cfg.device.display().to_string()
    }

    fn on_open(&mut self) {
        self.status.connected.store(true, Ordering::Relaxed);
        let (device, connects) = (self.device(), &self.status.connects);
        if self.outage_logged {
            crate::emit!(SERIAL_BACK, connects; source = %self.source, %device);
        } else if !self.ever_connected {
            crate::emit!(SERIAL_OPEN, connects; source = %self.source, %device, baud = self.cfg.baud_rate());
        } else {
            crate::emit!(SERIAL_REOPENED, connects; source = %self.source, %device);
        }
        self.ever_connected = true;
        self.outage_logged = false;
        if let Some(m) = self.mapper.as_mut() {
            m.reset();
        }
    }

    fn on_lost(&mut self, error: &str) {
        let device = self.device();
        if !self.outage_logged {
            self.outage_logged = true;
            warn!(
                source = %self.source,
                %device,
                %error,
                "serial device unavailable; retrying with backoff"
            );
        } else {
            debug!(source = %self.source, %device, %error, "serial device still unavailable");
        }
    }

    async fn session(
        &mut self,
        mut port: SerialStream,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<End, SerialError> {
        let mut decoder = Decoder::new();
        let mut lines = LineSplitter::default();
        // Bytes fed to the decoder on this connection, for the offsets of
        // rejected input.
        let mut fed: u64 = 0;
        // When the bytes the decoder holds were read: frames decoded later
        // from them keep this time, not the time they are handled.
        let mut read_at = Timestamp::now();
        if self.cfg.framing == SerialFraming::Ld2410 && self.cfg.engineering_mode {
            let mut io = Exchange {
                port: &mut port,
                decoder: &mut decoder,
                fed: &mut fed,
                read_at: &mut read_at,
            };
            if let Some(end) = self.enable_engineering(&mut io, shutdown).await? {
                return Ok(end);
            }
            // Frames read with the last ACK but after it.
            while let Some(ev) = decoder.next_event() {
                let offset = event_offset(&ev, fed, &decoder);
                if let Some(end) = self.ld2410_event(ev, offset, read_at, shutdown).await? {
                    return Ok(end);
                }
            }
        }
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return Ok(End::Stop),
                r = port.read(&mut buf) => match r {
                    Ok(0) => Err("end of file (device gone)".to_owned()),
                    Ok(n) => Ok(n),
                    Err(e) => Err(format!("read failed: {e}")),
                },
            };
            let n = match n {
                Ok(n) => n,
                Err(error) => {
                    return self
                        .lost(&mut lines, &mut decoder, fed, error, shutdown)
                        .await
                }
            };
            let received_at = Timestamp::now();
            self.status.bytes.fetch_add(n as u64, Ordering::Relaxed);
            match self.cfg.framing {
                SerialFraming::Ld2410 => {
                    decoder.push(&buf[..n]);
                    fed += n as u64;
                    while let Some(ev) = decoder.next_event() {
                        let offset = event_offset(&ev, fed, &decoder);
                        if let Some(end) =
                            self.ld2410_event(ev, offset, received_at, shutdown).await?
                        {
                            return Ok(end);
                        }
                    }
                }
                SerialFraming::JsonLines => {
                    let mut out = Vec::new();
                    lines.push(&buf[..n], &mut out);
                    for line in out {
                        self.status.lines.fetch_add(1, Ordering::Relaxed);
                        let decoded = decode_line(
                            &self.source,
                            &self.cfg.device,
                            &self.cfg.sensors,
                            &line,
                            received_at,
                            self.max_clock_skew,
                        );
                        let item = match decoded {
                            None => continue,
                            Some(Ok(obs)) => {
                                self.status.observations.fetch_add(1, Ordering::Relaxed);
                                Item::Observation(obs, Ack::none())
                            }
                            Some(Err(rej)) => {
                                crate::emit!(SERIAL_LINE_REJECTED, &self.status.line_rejects; source = %self.source, origin = %rej.origin, reason = %rej.reason);
                                Item::Rejected(rej, Ack::none())
                            }
                        };
                        if self.forward(item, shutdown).await? {
                            return Ok(End::Stop);
                        }
                    }
                }
            }
        }
    }

    /// The device went away: a JSON line it was in the middle of is kept
    /// in REJECTED with its bytes (it would otherwise vanish without a
    /// trace), then the session ends as lost.
    async fn lost(
        &mut self,
        lines: &mut LineSplitter,
        decoder: &mut Decoder,
        fed: u64,
        error: String,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<End, SerialError> {
        if self.cfg.framing == SerialFraming::Ld2410 {
            let rest = decoder.take_buffered();
            // A frame's beginning, not idle noise: a few stray bytes of no
            // header are not worth a reject of their own.
            if rest.len() >= 4 && ld2410::starts_with_header(&rest) {
                let offset = fed.saturating_sub(rest.len() as u64);
                let reason = format!(
                    "LD2410 footer: frame cut off after {} byte(s): the device disappeared ({error})",
                    rest.len()
                );
                let counted = |n| {
                    self.status.cut_off.fetch_add(n, Ordering::Relaxed);
                    self.status.count_reject(RejectKind::Footer, n);
                };
                crate::emit!(LD2410_FRAME_CUT_OFF, counted; source = %self.source, device = %self.device(), offset, bytes = rest.len());
                let rej = Rejected {
                    source: self.source.clone(),
                    origin: format!("serial {} byte {offset}", self.device()),
                    reason,
                    payload: bytes::Bytes::from(rest),
                    received_at: Timestamp::now(),
                    id: delivery_id(),
                };
                if self
                    .forward(Item::Rejected(rej, Ack::none()), shutdown)
                    .await?
                {
                    return Ok(End::Stop);
                }
            }
        }
        if self.cfg.framing == SerialFraming::JsonLines {
            if let Some(line) = lines.take_partial() {
                let origin = format!("serial {} line {}", self.device(), line.number);
                let shown = if line.overlong { "more than " } else { "" };
                let reason = format!(
                    "line cut off after {shown}{} byte(s) without a newline: the device disappeared ({error})",
                    line.bytes.len()
                );
                let counted = |n| {
                    self.status.cut_off.fetch_add(n, Ordering::Relaxed);
                    self.status.line_rejects.fetch_add(n, Ordering::Relaxed);
                };
                crate::emit!(SERIAL_LINE_CUT_OFF, counted; source = %self.source, %origin, bytes = line.bytes.len());
                let rej = Rejected {
                    source: self.source.clone(),
                    origin,
                    reason,
                    payload: bytes::Bytes::from(line.bytes),
                    received_at: Timestamp::now(),
                    id: delivery_id(),
                };
                if self
                    .forward(Item::Rejected(rej, Ack::none()), shutdown)
                    .await?
                {
                    return Ok(End::Stop);
                }
            }
        }
        Ok(End::Lost(error))
    }

    /// Handles one decoder event; `Some` ends the session.
    /// `at` is when the bytes that completed the event were read: a frame
    /// held back by a command exchange keeps its own time, so
    /// `min_interval` sees the radar's real spacing.
    async fn ld2410_event(
        &mut self,
        ev: Event,
        offset: u64,
        at: Timestamp,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<End>, SerialError> {
        let items: Vec<Item> = match ev {
            Event::Report(r) => {
                self.status.frames.fetch_add(1, Ordering::Relaxed);
                let Some(mapper) = self.mapper.as_mut() else {
                    return Ok(None);
                };
                mapper
                    .map(&self.source, &r, at)
                    .into_iter()
                    .map(|o| Item::Observation(o, Ack::none()))
                    .collect()
            }
            Event::Ack(a) => {
                debug!(source = %self.source, command = a.command, status = a.status, "unexpected LD2410 command ACK");
                Vec::new()
            }
            Event::Rejected(rej) => {
                self.status.count_reject(rej.kind, 1);
                let id = delivery_id();
                vec![Item::Rejected(
                    Rejected {
                        source: self.source.clone(),
                        origin: format!("serial {} byte {offset}", self.device()),
                        reason: format!("LD2410 {}: {}", rej.kind.label(), rej.reason),
                        payload: bytes::Bytes::from(rej.bytes),
                        received_at: at,
                        id,
                    },
                    Ack::none(),
                )]
            }
        };
        for item in items {
            if matches!(item, Item::Observation(..)) {
                self.status.observations.fetch_add(1, Ordering::Relaxed);
            }
            if self.forward(item, shutdown).await? {
                return Ok(Some(End::Stop));
            }
        }
        Ok(None)
    }

    /// Hands an item to ingest, waiting when it is behind (the UART's
    /// buffers hold the rest meanwhile). `true` when shutdown came first.
    async fn forward(
        &self,
        item: Item,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, SerialError> {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => Ok(true),
            sent = self.tx.send(item) => sent.map(|()| false).map_err(|_| SerialError::IngestClosed),
        }
    }

    /// Enable configuration, enable engineering mode, end configuration;
    /// each acknowledged before the next. Reports that arrive meanwhile are
    /// handed to ingest as they are decoded, with the time they were read,
    /// so none is delayed or dropped by `min_interval`. A missing or failed
    /// ACK is logged and counted and the radar stays in basic mode; `Some`
    /// ends the session (device lost, or shutdown).
    async fn enable_engineering(
        &mut self,
        io: &mut Exchange<'_>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<End>, SerialError> {
        let steps: [(u16, &[u8], &str); 3] = [
            (
                ld2410::CMD_ENABLE_CONFIG,
                &[0x01, 0x00],
                "enable configuration",
            ),
            (
                ld2410::CMD_ENABLE_ENGINEERING,
                &[],
                "enable engineering mode",
            ),
            (ld2410::CMD_END_CONFIG, &[], "end configuration"),
        ];
        for (i, (command, value, what)) in steps.into_iter().enumerate() {
            let frame = ld2410::command_frame(command, value);
            if let Err(e) = io.port.write_all(&frame).await {
                return Ok(Some(End::Lost(format!("write failed: {e}"))));
            }
            match self.await_ack(io, command, shutdown).await? {
                AckWait::End(end) => return Ok(Some(end)),
                AckWait::Status(0) => {
                    crate::emit!(LD2410_ACK, &self.status.acks; source = %self.source, command);
                }
                AckWait::Status(code) => {
                    self.status.command_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(source = %self.source, device = %self.device(), command = format!("0x{command:04X}"), status = code,
                        "LD2410 refused command ({what}); reports stay in basic mode");
                    if i == 0 {
                        return Ok(None);
                    }
                }
                AckWait::Timeout => {
                    self.status.command_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        source = %self.source,
                        device = %self.device(),
                        command = format!("0x{command:04X}"),
                        timeout = ?ACK_TIMEOUT,
                        "LD2410 did not acknowledge command ({what}); check wiring (TX/RX crossed?) and baud; reports stay in basic mode"
                    );
                    if i == 0 {
                        return Ok(None);
                    }
                }
            }
        }
        info!(source = %self.source, device = %self.device(), "LD2410 switched to engineering mode");
        Ok(None)
    }

    /// Reads until the ACK for `command` (or the timeout), handling every
    /// other event on the way in order, each with the time its bytes were
    /// read.
    async fn await_ack(
        &mut self,
        io: &mut Exchange<'_>,
        command: u16,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<AckWait, SerialError> {
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        let mut buf = [0u8; 256];
        loop {
            while let Some(ev) = io.decoder.next_event() {
                let offset = event_offset(&ev, *io.fed, io.decoder);
                match ev {
                    Event::Ack(a) if a.command == command => return Ok(AckWait::Status(a.status)),
                    other => {
                        if let Some(end) = self
                            .ld2410_event(other, offset, *io.read_at, shutdown)
                            .await?
                        {
                            return Ok(AckWait::End(end));
                        }
                    }
                }
            }
            let n = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => return Ok(AckWait::End(End::Stop)),
                r = tokio::time::timeout_at(deadline, io.port.read(&mut buf)) => match r {
                    Err(_) => return Ok(AckWait::Timeout),
                    Ok(Ok(0)) => return Ok(AckWait::End(End::Lost("end of file (device gone)".into()))),
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => return Ok(AckWait::End(End::Lost(format!("read failed: {e}")))),
                },
            };
            *io.read_at = Timestamp::now();
            self.status.bytes.fetch_add(n as u64, Ordering::Relaxed);
            io.decoder.push(&buf[..n]);
            *io.fed += n as u64;
        }
    }
}

/// The port and decoder state a command exchange reads through.
struct Exchange<'a> {
    port: &'a mut SerialStream,
    decoder: &'a mut Decoder,
    fed: &'a mut u64,
    read_at: &'a mut Timestamp,
}

/// How waiting for an ACK ended.
enum AckWait {
    Status(u16),
    Timeout,
    End(End),
}

/// Where in the connection's byte stream a just-decoded rejection started:
/// events leave from the front of the decoder's buffer.
fn event_offset(ev: &Event, fed: u64, decoder: &Decoder) -> u64 {
    let len = match ev {
        Event::Rejected(r) => r.bytes.len() as u64,
        _ => 0,
    };
    fed.saturating_sub(decoder.buffered() as u64 + len)
}

/// The supervisor asks the source itself (see [`SerialError::is_fatal`]).
impl crate::supervise::Failure for SerialError {
    fn is_fatal(&self) -> bool {
        SerialError::is_fatal(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::ld2410::TargetState;

    fn report(target: TargetState, md: u16, me: u8) -> Report {
        Report {
            engineering: false,
            target,
            moving_distance: md,
            moving_energy: me,
            still_distance: 0,
            still_energy: 0,
            detection_distance: md,
            extra: vec![],
        }
    }

    const T0: Timestamp = Timestamp(1_795_000_000_000);

    fn sensors(obs: &[Observation]) -> Vec<&str> {
        obs.iter().map(|o| o.sensor.as_str()).collect()
    }

    #[test]
    fn first_report_sends_every_output_then_only_changes() {
        let mut m = Ld2410Mapper::new("hall", Duration::ZERO, true);
        let first = m.map("s", &report(TargetState::Moving, 120, 40), T0);
        assert_eq!(
            sensors(&first),
            [
                "hall_present",
                "hall_moving",
                "hall_still",
                "hall_moving_distance",
                "hall_moving_energy",
                "hall_still_distance",
                "hall_still_energy",
                "hall_detection_distance"
            ]
        );
        assert_eq!(first[0].value, Reading::Bool(true));
        assert_eq!(first[3].value, Reading::Number(120.0));
        let same = m.map(
            "s",
            &report(TargetState::Moving, 120, 40),
            Timestamp(T0.0 + 100),
        );
        assert!(same.is_empty());
        let moved = m.map(
            "s",
            &report(TargetState::Moving, 150, 40),
            Timestamp(T0.0 + 200),
        );
        assert_eq!(
            sensors(&moved),
            ["hall_moving_distance", "hall_detection_distance"]
        );
    }

    #[test]
    fn min_interval_limits_each_output_and_refreshes_without_changes_only() {
        let mut m = Ld2410Mapper::new("r", Duration::from_secs(1), true);
        assert_eq!(
            m.map("s", &report(TargetState::Moving, 100, 10), T0).len(),
            8
        );
        let soon = m.map("s", &report(TargetState::None, 0, 0), Timestamp(T0.0 + 500));
        assert!(soon.is_empty(), "inside min_interval: {soon:?}");
        let later = m.map(
            "s",
            &report(TargetState::None, 0, 0),
            Timestamp(T0.0 + 1000),
        );
        assert_eq!(
            sensors(&later),
            [
                "r_present",
                "r_moving",
                "r_moving_distance",
                "r_moving_energy",
                "r_detection_distance"
            ],
            "the change held back is sent once the interval passed"
        );
        let mut refresh = Ld2410Mapper::new("r", Duration::from_secs(1), false);
        refresh.map("s", &report(TargetState::Moving, 100, 10), T0);
        assert!(refresh
            .map(
                "s",
                &report(TargetState::Moving, 100, 10),
                Timestamp(T0.0 + 999)
            )
            .is_empty());
        assert_eq!(
            refresh
                .map(
                    "s",
                    &report(TargetState::Moving, 100, 10),
                    Timestamp(T0.0 + 1000)
                )
                .len(),
            8
        );
        refresh.reset();
        assert_eq!(
            refresh
                .map(
                    "s",
                    &report(TargetState::Moving, 100, 10),
                    Timestamp(T0.0 + 1001)
                )
                .len(),
            8
        );
    }

    #[test]
    fn every_reading_gets_its_own_id() {
        let a = observation("s", "x".into(), Reading::Bool(true), T0);
        let b = observation("s", "x".into(), Reading::Bool(true), T0);
        assert_ne!(a.id, b.id, "a repeated reading is a new reading");
    }

    #[test]
    fn json_line_times_are_checked() {
        let line = |t: &str| Line {
            number: 1,
            bytes: t.as_bytes().to_vec(),
            overlong: false,
        };
        let skew = Duration::from_secs(300);
        let r = decode_line(
            "s",
            Path::new("/dev/x"),
            &[],
            &line(r#"{"sensor":"a","value":true,"ts":-1}"#),
            T0,
            skew,
        )
        .unwrap()
        .unwrap_err();
        assert!(
            r.reason.starts_with("ts: device time 1 ms before 1970"),
            "{}",
            r.reason
        );
        let ahead = T0.0 + 3_600_000;
        let r = decode_line(
            "s",
            Path::new("/dev/x"),
            &[],
            &line(&format!(r#"{{"sensor":"a","value":true,"ts":{ahead}}}"#)),
            T0,
            skew,
        )
        .unwrap()
        .unwrap_err();
        assert!(r.reason.contains("1h ahead"), "{}", r.reason);
    }

    fn split(text: &[u8]) -> Vec<Line> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for chunk in text.chunks(3) {
            s.push(chunk, &mut out);
        }
        out
    }

    fn dec(line: &Line, allowed: &[&str]) -> Option<Result<Observation, Rejected>> {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        decode_line(
            "esp",
            Path::new("/dev/ttyACM0"),
            &allowed,
            line,
            T0,
            Duration::from_secs(300),
        )
    }

    #[test]
    fn lines_are_numbered_and_bounded() {
        let lines = split(b"a\r\n\nb\n");
        let nums: Vec<u64> = lines.iter().map(|l| l.number).collect();
        assert_eq!(nums, [1, 2, 3]);
        assert_eq!(lines[0].bytes, b"a\r");
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        let lines = split(&long);
        assert!(lines[0].overlong);
        assert_eq!(lines[0].bytes.len(), MAX_LINE);
        let r = dec(&lines[0], &[]).unwrap().unwrap_err();
        assert!(r.reason.contains("longer than"), "{}", r.reason);
    }

    #[test]
    fn a_line_without_its_newline_is_taken_as_partial() {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        s.push(
            b"{\"sensor\":\"a\",\"value\":1}\n{\"sensor\":\"a\",\"val",
            &mut out,
        );
        assert_eq!(out.len(), 1);
        let cut = s.take_partial().unwrap();
        assert_eq!(cut.number, 2);
        assert_eq!(cut.bytes, b"{\"sensor\":\"a\",\"val");
        assert!(s.take_partial().is_none(), "taken once");
    }

    #[test]
    fn good_json_lines_become_observations() {
        let lines = split(
            b"{\"sensor\":\"desk_pir\",\"value\":true}\r\n\n{\"sensor\":\"lux\",\"value\":12.5,\"ts\":1795000000123}\n",
        );
        let o = dec(&lines[0], &[]).unwrap().unwrap();
        assert_eq!(
            (o.sensor.as_str(), o.value),
            ("desk_pir", Reading::Bool(true))
        );
        assert_eq!(o.observed_at, T0);
        assert_eq!(o.source, "esp");
        assert!(dec(&lines[1], &[]).is_none(), "blank lines are skipped");
        let o = dec(&lines[2], &[]).unwrap().unwrap();
        assert_eq!(o.value, Reading::Number(12.5));
        assert_eq!(o.observed_at, Timestamp(1_795_000_000_123));
    }

    #[test]
    fn bad_json_lines_are_rejected_with_line_and_reason() {
        let text = b"{\"sensor\":\"a\",\"value\":tru}\n[1]\n{\"value\":1}\n{\"sensor\":\"Bad Id\",\"value\":1}\n{\"sensor\":\"a\"}\n{\"sensor\":\"a\",\"value\":[1]}\n{\"sensor\":\"other\",\"value\":1}\n{\"sensor\":\"a\",\"value\":1,\"ts\":\"soon\"}\n";
        let lines = split(text);
        let reasons: Vec<String> = lines
            .iter()
            .map(|l| dec(l, &["a"]).unwrap().unwrap_err())
            .map(|r| {
                assert_eq!(
                    r.origin,
                    format!(
                        "serial /dev/ttyACM0 line {}",
                        1 + lines.iter().position(|x| x.bytes == r.payload).unwrap()
                    )
                );
                r.reason
            })
            .collect();
        let want = [
            "invalid JSON at byte",
            "must be a JSON object",
            "`sensor` is missing",
            "is invalid",
            "value: pointer /value is missing",
            "value: pointer /value is an array",
            "not in this source's `sensors` list",
            "ts: ",
        ];
        for (got, want) in reasons.iter().zip(want) {
            assert!(got.contains(want), "{got:?} lacks {want:?}");
        }
        assert_eq!(reasons.len(), want.len());
    }

    proptest::proptest! {
        #[test]
        fn json_lines_never_panic(text in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut s = LineSplitter::default();
            let mut out = Vec::new();
            s.push(&text, &mut out);
            for l in &out {
                let _ = decode_line("s", Path::new("/dev/x"), &[], l, T0, Duration::from_secs(300));
            }
        }
    }
}
