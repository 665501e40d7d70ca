//! `presenced tune` and `presenced report` on a simulated day stored in a
//! real SENSORS under the generated ACL, read as a reader identity; the
//! report rendered by headless Chromium and checked as rendered.

use crate::replay::{run, sequences, site_with};
use crate::support;

use presenced::observation::{Observation, OBSERVATION_SCHEMA};
use presenced::sandbox::truth::{self, Habits, SensorModel};
use presenced::time::Timestamp;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::Mosquitto;

const ZONES: &str = r#"
[zones.kitchen]
arrive_after = "30s"
leave_after = "2m"
evidence = [
  { sensor = "kitchen_pir", p_true = 0.99, p_false = 0.01 },
  { sensor = "kitchen_radar", p_true = 0.5, p_false = 0.45 },
]
[zones.office]
arrive_after = "30s"
leave_after = "2m"
evidence = [
  { sensor = "office_pir", p_true = 0.99, p_false = 0.01 },
  { sensor = "office_radar", p_true = 0.5, p_false = 0.45 },
]
"#;

fn models() -> Vec<SensorModel> {
    vec![
        SensorModel {
            kind: "pir".into(),
            miss: 0.25,
            false_trigger: 0.04,
            every: Duration::from_secs(30),
        },
        SensorModel {
            kind: "radar".into(),
            miss: 0.08,
            false_trigger: 0.12,
            every: Duration::from_secs(30),
        },
    ]
}

/// Stores a simulated day in SENSORS as the ingest identity would (the
/// readings' own times are yesterday's; the stream's are now).
async fn store_day(js: &async_nats::jetstream::Context, day: &truth::Day) {
    for chunk in day.records.chunks(500) {
        let mut acks = Vec::new();
        for r in chunk {
            let obs = Observation {
                v: OBSERVATION_SCHEMA,
                sensor: r.sensor.clone(),
                value: r.value,
                observed_at: r.at,
                id: format!("sim-{}", r.seq),
                source: "sim".into(),
                delivery: None,
            };
            let ack = js
                .publish(
                    format!("sensors.test.{}", r.sensor),
                    serde_json::to_vec(&obs).unwrap().into(),
                )
                .await
                .expect("publish to SENSORS");
            acks.push(ack);
        }
        for a in acks {
            a.await.expect("SENSORS ack");
        }
    }
}

/// A minimal PNG reader (8-bit RGB or RGBA, non-interlaced, as Chromium
/// writes screenshots): the pixels, to check what was drawn.
fn png_pixels(bytes: &[u8]) -> (usize, usize, Vec<[u8; 3]>) {
    use std::io::Read as _;
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut pos, mut w, mut h, mut channels) = (8, 0usize, 0usize, 0usize);
    let mut idat = Vec::new();
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let data = &bytes[pos + 8..pos + 8 + len];
        match kind {
            b"IHDR" => {
                w = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                h = u32::from_be_bytes(data[4..8].try_into().unwrap()) as usize;
                assert_eq!(data[8], 8, "bit depth");
                assert_eq!(data[12], 0, "interlaced");
                channels = match data[9] {
                    2 => 3,
                    6 => 4,
                    other => panic!("colour type {other}"),
                };
            }
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        pos += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .unwrap();
    let stride = w * channels;
    let mut img = vec![0u8; h * stride];
    for y in 0..h {
        let filter = raw[y * (stride + 1)];
        let line = &raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)];
        for x in 0..stride {
            let a = if x >= channels {
                img[y * stride + x - channels]
            } else {
                0
            } as i32;
            let b = if y > 0 { img[(y - 1) * stride + x] } else { 0 } as i32;
            let c = if x >= channels && y > 0 {
                img[(y - 1) * stride + x - channels]
            } else {
                0
            } as i32;
            let pred = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => panic!("filter {f}"),
            };
            img[y * stride + x] = (line[x] as i32 + pred) as u8;
        }
    }
    let pixels = img.chunks(channels).map(|p| [p[0], p[1], p[2]]).collect();
    (w, h, pixels)
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn chromium(args: &[&str], profile: &Path) -> std::process::Output {
    // $CHROMIUM names the binary (the Nix build does), else PATH's.
    let bin = std::env::var_os("CHROMIUM").unwrap_or_else(|| "chromium".into());
    let out = std::process::Command::new(bin)
        // Chromium writes crash and cache files under HOME; a build
        // sandbox's HOME may not be writable.
        .env("HOME", profile)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tune_learns_a_simulated_day_and_the_report_renders_in_chromium() {
    let mqtt = Mosquitto::start();
    let s = site_with(&mqtt, ZONES).await;
    let start = Timestamp(Timestamp::now().0 - 26 * 3600 * 1000);
    let day = truth::simulate(
        &["kitchen", "office"],
        &models(),
        &Habits::default(),
        start,
        Duration::from_secs(24 * 3600),
        11,
    );
    store_day(&s.js("presenced").await, &day).await;
    let labels = s.file("labels.csv", &truth::labels_csv(&day.labels));
    let analyst = s.file("analyst.toml", &s.as_identity(&s.base, "analyst"));
    let before = sequences(&s.admin_js).await;

    let out = run(&[
        "tune",
        "--config",
        analyst.to_str().unwrap(),
        "--from-seq",
        "1",
        "--labels",
        labels.to_str().unwrap(),
        "--sample-every",
        "30s",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for zone in ["kitchen", "office"] {
        for rule in doc["zones"][zone]["rules"].as_array().unwrap() {
            let kind = rule["sensor"].as_str().unwrap().rsplit('_').next().unwrap();
            let m = models().into_iter().find(|m| m.kind == kind).unwrap();
            let (pt, pf) = m.likelihoods();
            let st = rule["p_true"]["suggested"].as_f64().unwrap();
            let sf = rule["p_false"]["suggested"].as_f64().unwrap();
            assert!(
                (st - pt).abs() <= 0.05,
                "{zone} {kind}: p_true {st} vs {pt}"
            );
            assert!(
                (sf - pf).abs() <= 0.05,
                "{zone} {kind}: p_false {sf} vs {pf}"
            );
            assert!(rule["p_true"]["hours"].as_f64().unwrap() >= 2.0);
        }
        let wrong = |e: &serde_json::Value| {
            e["false_vacant_ms"].as_i64().unwrap() + e["false_occupied_ms"].as_i64().unwrap()
        };
        assert!(
            wrong(&doc["after"][zone]) < wrong(&doc["before"][zone]),
            "{zone}: {} {}",
            doc["before"][zone],
            doc["after"][zone]
        );
    }
    let diff = doc["diff"].as_str().unwrap();
    assert!(
        diff.contains(" [zones.kitchen]\n") && diff.contains("-p_false = 0.45\n+p_false = 0.1"),
        "{diff}"
    );

    // Too little labelled time: refused, saying how much more is needed.
    let out = run(&[
        "tune",
        "--config",
        analyst.to_str().unwrap(),
        "--from-seq",
        "1",
        "--labels",
        labels.to_str().unwrap(),
        "--min-hours",
        "100",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("kept (needs") && text.contains("more hours of occupied labels"),
        "{text}"
    );
    assert!(!text.contains("\n+p_true"), "{text}");

    // A reference sensor as the truth: the radar, judged against itself,
    // is perfect (clamped to 0.99/0.01); the PIR is judged against it.
    let out = run(&[
        "tune",
        "--config",
        analyst.to_str().unwrap(),
        "--from-seq",
        "1",
        "--reference",
        "kitchen=kitchen_radar",
        "--sample-every",
        "30s",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = doc["zones"]["kitchen"]["rules"].as_array().unwrap();
    assert_eq!(rules[1]["sensor"], "kitchen_radar");
    assert_eq!(rules[1]["p_true"]["suggested"], 0.99);
    assert_eq!(rules[1]["p_false"]["suggested"], 0.01);
    assert!(rules[0]["p_true"]["hours"].as_f64().unwrap() > 2.0);
    assert!(doc["zones"]["office"].is_null(), "office had no reference");
    // Overrides as labels: there are none in this range, and it says so.
    let out = run(&[
        "tune",
        "--config",
        analyst.to_str().unwrap(),
        "--from-seq",
        "1",
        "--from-overrides",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no labelled time in the range"), "{err}");

    // A bad labels file: every problem with its line, before any read
    // (the reader's server is unreachable here, and the answer is quick).
    let bad = s.file(
        "bad.csv",
        "zone,start,end,state\nkitchen,2026-12-01T08:00:00Z,2026-12-01T09:00:00Z,occupied\ngarage,2026-12-01T08:00:00Z,2026-12-01T09:00:00Z,vacant\nkitchen,2026-12-01T08:30:00Z,2026-12-01T10:00:00Z,vacant\noffice,soon,2026-12-01T10:00:00Z,vacant\n",
    );
    let unreachable = s.file(
        "unreachable.toml",
        &s.as_identity(&s.base, "analyst").replace(
            &s.url,
            &format!("nats://127.0.0.1:{}", support::free_port()),
        ),
    );
    let started = std::time::Instant::now();
    let out = run(&[
        "tune",
        "--config",
        unreachable.to_str().unwrap(),
        "--from-seq",
        "1",
        "--labels",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 problem(s), no label used"), "{err}");
    for needle in [
        "line 3: unknown zone \"garage\"",
        "line 4: zone kitchen: overlaps the interval of line 2",
        "line 5: bad start time \"soon\"",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it connected first"
    );

    // The report: one file, nothing from elsewhere, rendered by Chromium.
    let html_path = s.dir.path().join("report.html");
    let out = run(&[
        "report",
        "--config",
        analyst.to_str().unwrap(),
        "--from-seq",
        "1",
        "--labels",
        labels.to_str().unwrap(),
        "--sample-every",
        "30s",
        "--out",
        html_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&html_path).unwrap();
    for banned in ["<script", "http://", "https://", "src=", "href=", "url("] {
        assert!(!html.contains(banned), "{banned} in the report");
    }
    std::fs::copy(&html_path, artifacts().join("report.html")).unwrap();
    let profile = s.dir.path().join("chromium");
    let url = format!("file://{}", html_path.display());
    // The DOM as the browser built it: both zones, their plots, the tune
    // tables, the suggested diff.
    let dom = chromium(&["--dump-dom", &url], &profile);
    let dom = String::from_utf8_lossy(&dom.stdout);
    for zone in ["kitchen", "office"] {
        assert!(
            dom.contains(&format!("<section class=\"zone\" id=\"zone-{zone}\">")),
            "{zone}"
        );
        assert!(
            dom.contains(&format!("<svg class=\"timeline\" data-zone=\"{zone}\"")),
            "{zone}"
        );
        assert!(
            dom.contains(&format!("<svg class=\"evidence\" data-zone=\"{zone}\"")),
            "{zone}"
        );
        assert!(
            dom.contains(&format!("data-sensor=\"{zone}_radar\"")),
            "{zone}"
        );
    }
    assert_eq!(dom.matches("<table class=\"tune\">").count(), 2);
    assert!(dom.contains("class=\"band occupied\"") && dom.contains("class=\"label occupied\""));
    assert!(dom.contains("<pre class=\"diff\">"));
    // The pixels: the occupied bands and the labels are painted.
    let png = artifacts().join("report.png");
    let _ = std::fs::remove_file(&png);
    chromium(
        &[
            "--window-size=1000,1200",
            &format!("--screenshot={}", png.display()),
            &url,
        ],
        &profile,
    );
    let (w, h, pixels) = png_pixels(&std::fs::read(&png).unwrap());
    assert!(w >= 1000 && h >= 1200, "{w}x{h}");
    let count = |rgb: [u8; 3]| pixels.iter().filter(|p| **p == rgb).count();
    let occupied = count([0xf4, 0xa2, 0x59]);
    let labelled = count([0x3d, 0x99, 0x70]);
    assert!(occupied > 5_000, "occupied bands: {occupied} pixels");
    assert!(labelled > 500, "label strips: {labelled} pixels");
    let white = count([0xff, 0xff, 0xff]);
    assert!(white < pixels.len(), "a blank page");

    // Reading is all it did.
    assert_eq!(
        sequences(&s.admin_js).await,
        before,
        "tune or report wrote to the site"
    );
}
