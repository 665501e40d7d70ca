//! `presenced replay`, `tune` and `report`: argument parsing and output,
//! thin over [`super::run`], [`super::tune`] and [`super::report`].

use super::source::{self, Range};
use super::{Manual, Options, Outcome, Record};
use crate::config::Config;
use crate::engine::{Model, Transition};
use crate::naming::Site;
use crate::time::Timestamp;
use anyhow::{bail, Context as _};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// Which readings to replay, shared by replay, tune and report.
#[derive(clap::Args, Debug, Clone)]
pub struct RangeArgs {
    /// The reader's config: site and NATS identity (a service granted
    /// `reads = ["sensors", "events"]`); its zones are replayed unless
    /// `--candidate` is given. Read like every command's config:
    /// `--config`, else `$PRESENCED_CONFIG`, else the default path (the
    /// binary's CLI test holds these to the same spelling as its own).
    #[arg(
        long,
        short,
        env = "PRESENCED_CONFIG",
        default_value = "/etc/presenced/presenced.toml",
        value_name = "FILE"
    )]
    pub config: PathBuf,
    /// A candidate config whose zones and evidence are replayed instead;
    /// refused with every problem `presenced check-config` would name (its
    /// secret files are not read: only its zones are used).
    #[arg(long)]
    pub candidate: Option<PathBuf>,
    /// Replay the readings stored in this last span (e.g. `7d`, `24h`).
    /// Without any range option: the last 24 hours.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with_all = ["from", "to", "from_seq", "to_seq"])]
    pub since: Option<Duration>,
    /// Start of the range (RFC 3339).
    #[arg(long, value_parser = parse_time, conflicts_with_all = ["from_seq", "to_seq"])]
    pub from: Option<Timestamp>,
    /// End of the range (RFC 3339); default now.
    #[arg(long, value_parser = parse_time)]
    pub to: Option<Timestamp>,
    /// First SENSORS sequence to replay.
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Last SENSORS sequence to replay.
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// An occupied period shorter than this counts as a flap.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub flap_below: Duration,
    /// Do not feed the manual overrides recorded in EVENTS back in.
    #[arg(long)]
    pub no_overrides: bool,
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    Timestamp::parse_rfc3339(s)
        .map_err(|e| format!("{e} (want RFC 3339, e.g. 2026-12-01T08:00:00Z)"))
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub range: RangeArgs,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// List every transition that differs from what EVENTS recorded.
    #[arg(long)]
    pub diff: bool,
}

/// Everything read for a range, with the model to replay.
pub struct Loaded {
    pub site: Site,
    pub model: Model,
    pub config: Config,
    pub config_name: String,
    pub records: Vec<Record>,
    pub events: Vec<Transition>,
    pub manual: Vec<Manual>,
    pub options: Options,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Validates the configs, then reads the range. A candidate that fails
/// `check-config` is refused before anything is read; a range without
/// readings is an error that says so.
pub async fn load(args: &RangeArgs, trace: bool) -> anyhow::Result<Loaded> {
    let reader = Config::load_valid(&args.config)?;
    let (zones_cfg, config_name) = match &args.candidate {
        Some(path) => (candidate(path)?, path.display().to_string()),
        None => (reader.clone(), args.config.display().to_string()),
    };
    let model = Model::from_config(&zones_cfg);
    if model.zones.is_empty() {
        bail!("{config_name} configures no zone to replay (give a --candidate with [zones])");
    }
    let site = Site::new(&reader.site)?;
    let now = Timestamp::now();
    let range = match (args.since, args.from, args.from_seq) {
        (Some(d), _, _) => Range::Time {
            from: Timestamp(now.0 - d.as_millis() as i64),
            to: now,
        },
        (None, Some(from), _) => {
            // Deadlines after now have not happened: the replay stops at
            // the present, as the daemon has.
            let to = args.to.unwrap_or(now).min(now);
            if to <= from {
                bail!("--from {from} is not before --to {to} (or now)");
            }
            Range::Time { from, to }
        }
        (None, None, Some(from)) => Range::Seq {
            from,
            to: args.to_seq,
        },
        (None, None, None) => match args.to_seq {
            Some(to) => Range::Seq {
                from: 1,
                to: Some(to),
            },
            None => Range::Time {
                from: Timestamp(now.0 - 24 * 3600 * 1000),
                to: args.to.unwrap_or(now),
            },
        },
    };
    let who: crate::store::connect::As = crate::store::connect::As {
        service: Some(reader.service.clone()),
        violations: None,
    };
    let client = crate::store::connect_as(
        &reader.nats,
        "presenced-replay",
        None,
        Some(Duration::from_secs(10)),
        &who,
    )
    .await?;
    let js = async_nats::jetstream::new(client.clone());
    let read = source::read_sensors(&js, &site, &range).await?;
    let (from, to) = match &range {
        Range::Time { from, to } => (*from, *to),
        // Readings are in stream order; their own times need not be.
        Range::Seq { .. } => (
            read.records.iter().map(|r| r.at).min().unwrap_or(now),
            read.records.iter().map(|r| r.at).max().unwrap_or(now),
        ),
    };
    if read.records.is_empty() {
        match &range {
            Range::Time { from, to } => bail!(
                "no readings in SENSORS of site {site} between {from} and {to}: nothing to replay"
            ),
            Range::Seq { from, to } => bail!(
                "no readings in SENSORS of site {site} from sequence {from}{}: nothing to replay",
                to.map(|t| format!(" to {t}")).unwrap_or_default()
            ),
        }
    }
    let events: Vec<Transition> = source::read_events(&js, &site, from)
        .await?
        .into_iter()
        .filter(|t| t.at >= from && t.at <= to)
        .collect();
    let manual = if args.no_overrides {
        Vec::new()
    } else {
        source::manual_of(&events)
    };
    let _ = client.drain().await;
    let first_seq = read.records.first().map_or(0, |r| r.seq);
    Ok(Loaded {
        site,
        model,
        config: zones_cfg,
        config_name,
        options: Options {
            from,
            to,
            flap_below: args.flap_below,
            trace,
        },
        first_seq,
        last_seq: read.last_seq,
        records: read.records,
        events,
        manual,
    })
}

/// The JSON of `replay --json`.
#[derive(Serialize)]
struct ReplayJson<'a> {
    site: &'a str,
    config: &'a str,
    from: Timestamp,
    to: Timestamp,
    readings: u64,
    first_seq: u64,
    last_seq: u64,
    zones: std::collections::BTreeMap<&'a str, ZoneJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    diff: Option<Vec<super::DiffLine>>,
}

#[derive(Serialize)]
struct ZoneJson<'a> {
    readings: u64,
    transitions: &'a [Transition],
    occupied_ms: i64,
    flaps: u64,
    detection: Detection,
}

/// Detection delays of a zone, in milliseconds.
#[derive(Serialize)]
pub struct Detection {
    pub count: usize,
    pub median_ms: Option<i64>,
    pub max_ms: Option<i64>,
}

impl Detection {
    pub fn of(values: &[i64]) -> Detection {
        Detection {
            count: values.len(),
            median_ms: super::median_ms(values),
            max_ms: values.iter().copied().max(),
        }
    }
}

/// A span of milliseconds, short and stable (`1h 2m 3s`, `450ms`).
pub fn span(ms: i64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    humantime::format_duration(Duration::from_secs((ms / 1000) as u64)).to_string()
}

/// Renders the outcome of a replay (text or JSON): same input, same bytes.
pub fn render(
    loaded: &Loaded,
    outcome: &Outcome,
    json: bool,
    diff: bool,
) -> anyhow::Result<String> {
    let replayed = outcome.transitions();
    let differences = diff.then(|| super::diff(&replayed, &loaded.events));
    if json {
        let doc = ReplayJson {
            site: loaded.site.as_str(),
            config: &loaded.config_name,
            from: outcome.from,
            to: outcome.to,
            readings: outcome.readings,
            first_seq: loaded.first_seq,
            last_seq: loaded.last_seq,
            zones: outcome
                .zones
                .iter()
                .map(|(name, z)| {
                    (
                        name.as_str(),
                        ZoneJson {
                            readings: z.readings,
                            transitions: &z.transitions,
                            occupied_ms: z.occupied_ms,
                            flaps: z.flaps,
                            detection: Detection::of(&z.detection_ms),
                        },
                    )
                })
                .collect(),
            diff: differences,
        };
        let mut s = serde_json::to_string_pretty(&doc)?;
        s.push('\n');
        return Ok(s);
    }
    let mut s = String::new();
    writeln!(
        s,
        "replay of site {} with {}: {} to {}, {} reading(s) (SENSORS {}..{})",
        loaded.site,
        loaded.config_name,
        outcome.from,
        outcome.to,
        outcome.readings,
        loaded.first_seq,
        loaded.last_seq
    )?;
    for (name, z) in &outcome.zones {
        let d = Detection::of(&z.detection_ms);
        writeln!(
            s,
            "zone {name}: {} transition(s), occupied {}, {} flap(s) (< {}), detection {}",
            z.transitions.len(),
            span(z.occupied_ms),
            z.flaps,
            humantime::format_duration(loaded.options.flap_below),
            match (d.median_ms, d.max_ms) {
                (Some(m), Some(x)) =>
                    format!("median {} max {} ({} arrivals)", span(m), span(x), d.count),
                _ => "none measured".to_owned(),
            }
        )?;
        for t in &z.transitions {
            writeln!(
                s,
                "  {}  #{} {} -> {}  confidence {:.3}{}",
                t.at,
                t.number,
                t.from.as_str(),
                t.to.as_str(),
                t.confidence,
                match (&t.seq, &t.cause) {
                    (_, Some(c)) => format!("  ({})", cause_text(c)),
                    (Some(seq), None) => format!("  (reading {seq})"),
                    (None, None) => "  (timer)".to_owned(),
                }
            )?;
        }
    }
    if let Some(lines) = differences {
        if lines.is_empty() {
            writeln!(
                s,
                "diff against EVENTS: identical ({} transition(s))",
                loaded.events.len()
            )?;
        } else {
            writeln!(s, "diff against EVENTS: {} difference(s)", lines.len())?;
            for l in lines {
                let sign = if l.only_in == "replay" { '+' } else { '-' };
                writeln!(
                    s,
                    "{sign} {}  {} {} -> {}  (only in {})",
                    l.at, l.zone, l.from, l.to, l.only_in
                )?;
            }
        }
    }
    Ok(s)
}

fn cause_text(c: &crate::engine::Cause) -> String {
    match c {
        crate::engine::Cause::Override { by, until, .. } => {
            format!("override by {by} until {until}")
        }
        crate::engine::Cause::OverrideExpired => "override expired".to_owned(),
        crate::engine::Cause::OverrideCleared { by } => format!("override cleared by {by}"),
    }
}

/// `presenced replay`.
pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let loaded = load(&args.range, false).await?;
    let outcome = super::run(
        &loaded.model,
        &loaded.records,
        &loaded.manual,
        &loaded.options,
    );
    print!("{}", render(&loaded, &outcome, args.json, args.diff)?);
    Ok(())
}

/// Where `tune` takes its labels from.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct LabelSource {
    /// A CSV file: `zone,start,end,occupied|vacant` per line (RFC 3339).
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// The manual overrides recorded in EVENTS: the zone was what the
    /// person said, for as long as the override lasted.
    #[arg(long)]
    pub from_overrides: bool,
    /// A sensor trusted as the truth for a zone, `ZONE=SENSOR`
    /// (repeatable), e.g. an LD2410 radar zone.
    #[arg(long, value_name = "ZONE=SENSOR")]
    pub reference: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct TuneArgs {
    #[command(flatten)]
    pub range: RangeArgs,
    #[command(flatten)]
    pub source: LabelSource,
    /// Labelled hours a number needs before a value is suggested.
    #[arg(long, default_value_t = 2.0)]
    pub min_hours: f64,
    /// How often each rule is looked at inside labelled time.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Labels from a file, checked against the zones before anything is read.
pub fn labels_file(
    path: &std::path::Path,
    model: &Model,
) -> anyhow::Result<Vec<super::labels::Label>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read labels file {}", path.display()))?;
    let zones = model.zones.keys().cloned().collect();
    Ok(super::labels::parse_csv(
        &path.display().to_string(),
        &text,
        &zones,
    )?)
}

/// The parsed `--reference` pairs, checked against the model.
fn references(pairs: &[String], model: &Model) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for p in pairs {
        let Some((zone, sensor)) = p.split_once('=') else {
            bail!("--reference {p:?}: want ZONE=SENSOR");
        };
        if !model.zones.contains_key(zone) {
            bail!("--reference {p:?}: no zone {zone:?} in the config");
        }
        out.push((zone.to_owned(), sensor.to_owned()));
    }
    Ok(out)
}

/// The labels `args` name, from what was read.
pub fn collect_labels(
    source: &LabelSource,
    loaded: &Loaded,
    file_labels: Option<Vec<super::labels::Label>>,
) -> anyhow::Result<Vec<super::labels::Label>> {
    if let Some(l) = file_labels {
        return Ok(l);
    }
    if source.from_overrides {
        let manual = source::manual_of(&loaded.events);
        return Ok(super::labels::from_overrides(&manual, loaded.options.to));
    }
    let mut out = Vec::new();
    for (zone, sensor) in references(&source.reference, &loaded.model)? {
        out.extend(super::labels::from_reference(
            &zone,
            &sensor,
            &loaded.records,
            loaded.options.to,
        ));
    }
    Ok(out)
}

#[derive(Serialize)]
struct TuneJson<'a> {
    site: &'a str,
    config: &'a str,
    from: Timestamp,
    to: Timestamp,
    zones: &'a std::collections::BTreeMap<String, super::tune::ZoneEstimate>,
    before: &'a std::collections::BTreeMap<String, super::tune::Effect>,
    after: &'a std::collections::BTreeMap<String, super::tune::Effect>,
    diff: &'a str,
}

/// `presenced tune`.
pub async fn tune(args: TuneArgs) -> anyhow::Result<()> {
    use super::tune as t;
    // Check everything local first: a bad labels file or reference is
    // refused before anything is read from the site.
    let precheck = load_model(&args.range)?;
    let file_labels = match &args.source.labels {
        Some(path) => Some(labels_file(path, &precheck)?),
        None => None,
    };
    references(&args.source.reference, &precheck)?;
    let mut loaded = load(&args.range, false).await?;
    let labels = collect_labels(&args.source, &loaded, file_labels)?;
    if labels.is_empty() {
        bail!("no labelled time in the range: nothing to learn from");
    }
    // Overrides are labels here, not inputs: the engine's own readings
    // are what is measured.
    loaded.manual.clear();
    let opts = t::TuneOptions {
        sample_every: args.sample_every,
        min_hours: args.min_hours,
        ..t::TuneOptions::default()
    };
    let est = t::estimate_all(&loaded.model, &loaded.records, &labels, &opts);
    let suggested = t::suggested_config(&loaded.config, &est);
    let problems = suggested.validate();
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        bail!(
            "the suggested values do not pass check-config ({}); label more time",
            list.join("; ")
        );
    }
    let flap = args.range.flap_below;
    let before = t::replay_effect(&loaded.model, &loaded.records, &labels, flap);
    let after = t::replay_effect(
        &Model::from_config(&suggested),
        &loaded.records,
        &labels,
        flap,
    );
    let diff = t::toml_diff(&loaded.config, &est, opts.level);
    if args.json {
        let doc = TuneJson {
            site: loaded.site.as_str(),
            config: &loaded.config_name,
            from: loaded.options.from,
            to: loaded.options.to,
            zones: &est,
            before: &before,
            after: &after,
            diff: &diff,
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    print!("{}", render_tune(&loaded, &est, &before, &after, &diff)?);
    Ok(())
}

/// The text of `presenced tune`.
pub fn render_tune(
    loaded: &Loaded,
    est: &std::collections::BTreeMap<String, super::tune::ZoneEstimate>,
    before: &std::collections::BTreeMap<String, super::tune::Effect>,
    after: &std::collections::BTreeMap<String, super::tune::Effect>,
    diff: &str,
) -> anyhow::Result<String> {
    let mut s = String::new();
    writeln!(
        s,
        "tune of site {} with {}: {} to {}",
        loaded.site, loaded.config_name, loaded.options.from, loaded.options.to
    )?;
    for (zone, e) in est {
        writeln!(
            s,
            "zone {zone}: {} h labelled occupied, {} h vacant",
            e.occupied_hours, e.vacant_hours
        )?;
        let show = |name: &str, x: &super::tune::Estimate| match x.suggested {
            Some(p) => format!(
                "{name} {} -> {p} (90% {}..{}, {} h)",
                x.current, x.low, x.high, x.hours
            ),
            None => format!(
                "{name} {} kept (needs {} more hours)",
                x.current,
                x.needs_hours.unwrap_or_default()
            ),
        };
        writeln!(s, "  {}", show("prior", &e.prior))?;
        for r in &e.rules {
            writeln!(
                s,
                "  evidence[{}] {}: {}; {}",
                r.index,
                r.sensor,
                show("p_true", &r.p_true),
                show("p_false", &r.p_false)
            )?;
        }
    }
    writeln!(s, "\nsuggested change (TOML diff):")?;
    s.push_str(diff);
    writeln!(
        s,
        "\nreplayed over the labelled time, current -> suggested:"
    )?;
    for (zone, b) in before {
        let a = after.get(zone).cloned().unwrap_or_default();
        let ms = |x: Option<i64>| x.map_or("-".to_owned(), span);
        writeln!(
            s,
            "  {zone}: flaps {} -> {}, false vacant {} -> {}, false occupied {} -> {}, detection median {} -> {}",
            b.flaps,
            a.flaps,
            span(b.false_vacant_ms),
            span(a.false_vacant_ms),
            span(b.false_occupied_ms),
            span(a.false_occupied_ms),
            ms(b.detection_median_ms),
            ms(a.detection_median_ms)
        )?;
    }
    Ok(s)
}

/// The model of the config `args` replays, without reading anything.
pub fn load_model(args: &RangeArgs) -> anyhow::Result<Model> {
    let cfg = match &args.candidate {
        Some(path) => candidate(path)?,
        None => Config::load_valid(&args.config)?,
    };
    Ok(Model::from_config(&cfg))
}

/// A candidate config, checked as `check-config` checks meaning (every
/// problem with its field path). Its secret files are not read: only its
/// zones are used, and a copy of the daemon's config names seed and
/// password files the reader may not open.
pub fn candidate(path: &std::path::Path) -> anyhow::Result<Config> {
    let cfg =
        Config::load(path).context("the candidate config fails check-config; nothing was read")?;
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(anyhow::Error::new(crate::config::ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
        .context("the candidate config fails check-config; nothing was read"));
    }
    Ok(cfg)
}

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    #[command(flatten)]
    pub range: RangeArgs,
    /// Where to write the HTML file.
    #[arg(long)]
    pub out: PathBuf,
    /// A labels CSV: drawn above each zone, and the tune suggestions are
    /// shown beside it.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Labelled hours a number needs before a value is suggested.
    #[arg(long, default_value_t = 2.0)]
    pub min_hours: f64,
    /// How often each rule is looked at inside labelled time.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,
}

/// `presenced report`.
pub async fn report(args: ReportArgs) -> anyhow::Result<()> {
    use super::tune as t;
    let precheck = load_model(&args.range)?;
    let labels = match &args.labels {
        Some(path) => labels_file(path, &precheck)?,
        None => Vec::new(),
    };
    let loaded = load(&args.range, true).await?;
    let outcome = super::run(
        &loaded.model,
        &loaded.records,
        &loaded.manual,
        &loaded.options,
    );
    let tuned = (!labels.is_empty()).then(|| {
        let opts = t::TuneOptions {
            sample_every: args.sample_every,
            min_hours: args.min_hours,
            ..t::TuneOptions::default()
        };
        let est = t::estimate_all(&loaded.model, &loaded.records, &labels, &opts);
        let suggested = t::suggested_config(&loaded.config, &est);
        let flap = args.range.flap_below;
        let before = t::replay_effect(&loaded.model, &loaded.records, &labels, flap);
        let after = t::replay_effect(
            &Model::from_config(&suggested),
            &loaded.records,
            &labels,
            flap,
        );
        let diff = t::toml_diff(&loaded.config, &est, opts.level);
        (est, before, after, diff)
    });
    let extras = super::report::Extras {
        site: loaded.site.as_str(),
        config_name: &loaded.config_name,
        labels: &labels,
        estimates: tuned.as_ref().map(|x| &x.0),
        before: tuned.as_ref().map(|x| &x.1),
        after: tuned.as_ref().map(|x| &x.2),
        diff: tuned.as_ref().map(|x| x.3.as_str()),
    };
    let html = super::report::render(&loaded.model, &outcome, &extras);
    std::fs::write(&args.out, html)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "{}: report of {} zone(s), {} reading(s), {} to {}",
        args.out.display(),
        outcome.zones.len(),
        outcome.readings,
        outcome.from,
        outcome.to
    );
    Ok(())
}
