//! The bench report: its JSON form, the table printed to stdout, and the
//! SVG bar chart.

use std::fmt::Write as _;
use std::path::Path;

use idemq::BoxError;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

/// What one bench phase (an engine configuration or a baseline) measured.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseResult {
    /// `memory`, `redis`, `postgres`, `postgres-tx`, or `baseline-*`.
    pub name: String,
    /// The baseline this engine configuration is compared with.
    pub baseline: Option<String>,
    /// Deliveries settled.
    pub messages: u64,
    /// Unique messages handled (the bare baseline: every non-failing delivery).
    pub handled: u64,
    /// Deliveries acked as duplicates without running the handler.
    pub duplicates: u64,
    /// Failing messages (dead-lettered by the engine, rejected by baselines).
    pub failed: u64,
    /// Time from the consumer's start to the last settlement.
    pub seconds: f64,
    /// Unique ids published / seconds.
    pub unique_per_sec: f64,
    /// Deliveries settled / seconds.
    pub msgs_per_sec: f64,
    /// Median receipt-to-settlement latency of a delivery.
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
    /// `VmHWM` after the phase (the whole process's peak RSS).
    pub peak_rss_mib: Option<f64>,
    /// True when the peak was reset before the phase (so it is the phase's
    /// own peak); false when it is the peak since the process started.
    pub rss_is_per_phase: bool,
    /// Store round trips (commands or statements) per unique message.
    pub round_trips_per_unique: f64,
    /// `unique_per_sec` over the matching baseline's.
    pub ratio_to_baseline: Option<f64>,
    /// True when every correctness check passed.
    pub ok: bool,
    /// What the correctness checks found wrong.
    pub problems: Vec<String>,
}

/// The whole bench run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Messages published per phase.
    pub messages: u64,
    /// Unique ids among them.
    pub unique: u64,
    /// Unique ids whose handler fails permanently.
    pub failing_unique: u64,
    /// Body size in bytes.
    pub body_size: usize,
    /// Duplicate publishes, percent.
    pub dup_percent: u8,
    /// Failing unique messages, percent.
    pub fail_percent: u8,
    /// Handlers running at once (the engine's concurrency; the baselines'
    /// tasks are bounded by the prefetch).
    pub concurrency: u16,
    /// RabbitMQ prefetch of every consumer, baselines and engine alike.
    pub prefetch: u16,
    /// Claim (and completion) calls out at once per store with
    /// [`idemq::Coalescing`] over the Redis and Postgres stores; `None`:
    /// one call per delivery, no coalescing.
    pub store_in_flight: Option<usize>,
    /// True when the peak RSS could be reset before each phase.
    pub peak_rss_per_phase: bool,
    /// One entry per phase, in the order they ran.
    pub results: Vec<PhaseResult>,
}

impl BenchReport {
    /// True when every phase passed its correctness checks.
    pub fn ok(&self) -> bool {
        self.results.iter().all(|r| r.ok)
    }

    /// What the failed checks found, one line each: `FAILED <phase>: <problem>`.
    pub fn failures(&self) -> impl Iterator<Item = String> + '_ {
        self.results
            .iter()
            .filter(|r| !r.ok)
            .flat_map(|r| r.problems.iter().map(|p| format!("FAILED {}: {p}", r.name)))
    }

    /// The report as a plain-text table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} messages ({} unique, {} failing), {}-byte bodies, {}% duplicates, concurrency {}, prefetch {}, {}",
            self.messages,
            self.unique,
            self.failing_unique,
            self.body_size,
            self.dup_percent,
            self.concurrency,
            self.prefetch,
            match self.store_in_flight {
                Some(n) => format!("store calls coalesced ({n} in flight)"),
                None => "no coalescing".to_owned(),
            }
        );
        let _ = writeln!(
            out,
            "{:<18} {:>10} {:>10} {:>8} {:>8} {:>9} {:>9} {:>8} {:>5}",
            "config",
            "unique/s",
            "msgs/s",
            "p50 ms",
            "p99 ms",
            "RSS MiB",
            "RT/uniq",
            "vs base",
            "ok"
        );
        for r in &self.results {
            let _ = writeln!(
                out,
                "{:<18} {:>10.0} {:>10.0} {:>8.2} {:>8.2} {:>9} {:>9.2} {:>8} {:>5}",
                r.name,
                r.unique_per_sec,
                r.msgs_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.peak_rss_mib
                    .map_or_else(|| "-".to_owned(), |m| format!("{m:.1}")),
                r.round_trips_per_unique,
                r.ratio_to_baseline
                    .map_or_else(|| "-".to_owned(), |x| format!("{:.0}%", x * 100.0)),
                if r.ok { "yes" } else { "NO" },
            );
        }
        let _ = writeln!(
            out,
            "latency: delivery received -> settled; RSS: {}; RT/uniq: store round trips per unique id",
            if self.peak_rss_per_phase {
                "peak of each phase (VmHWM reset before it)"
            } else {
                "process peak so far (VmHWM could not be reset)"
            }
        );
        for line in self.failures() {
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// Writes a bar chart of unique messages per second to `path` (SVG).
    pub fn plot(&self, path: &Path) -> Result<(), BoxError> {
        let bars: Vec<(&str, f64, bool)> = self
            .results
            .iter()
            .map(|r| (r.name.as_str(), r.unique_per_sec, r.baseline.is_none()))
            .collect();
        let max = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.15;
        let n = bars.len().max(1);
        let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "idemq bench: unique messages/s ({} msgs, {}% dup, {} B, concurrency {}, prefetch {})",
                    self.messages, self.dup_percent, self.body_size, self.concurrency, self.prefetch
                ),
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            // A segmented range includes its end: n bars are 0..n-1.
            .build_cartesian_2d((0..n as i32 - 1).into_segmented(), 0f64..max)?;
        let names: Vec<String> = bars.iter().map(|b| b.0.to_owned()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(n)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => usize::try_from(*i)
                    .ok()
                    .and_then(|i| names.get(i).cloned())
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc("unique msg/s")
            .x_desc("grey: hand-written lapin baseline; blue: idemq engine")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        let engine_color = RGBColor(31, 119, 180);
        let baseline_color = RGBColor(170, 170, 170);
        let kinds: Vec<bool> = bars.iter().map(|b| b.2).collect();
        chart.draw_series(
            Histogram::vertical(&chart)
                .margin(18)
                .style_func(|x, _| {
                    let is_base = match x {
                        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(*i)
                            .ok()
                            .and_then(|i| kinds.get(i).copied())
                            .unwrap_or(false),
                        SegmentValue::Last => false,
                    };
                    if is_base {
                        baseline_color.filled()
                    } else {
                        engine_color.filled()
                    }
                })
                .data(bars.iter().enumerate().map(|(i, b)| (i as i32, b.1))),
        )?;
        let label = ("sans-serif", 14)
            .into_font()
            .into_text_style(&root)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, v, _))| {
            Text::new(
                format!("{v:.0}"),
                (SegmentValue::CenterOf(i as i32), *v + max * 0.01),
                label.clone(),
            )
        }))?;
        root.present()?;
        Ok(())
    }
}
