//! The eval chart: `eval.svg`, one row per task and metric with the base model's bar (when it ran)
//! above the adapted model's, each with its ±stderr whisker and its value; `eval_chart.json` beside
//! it holds exactly the rows drawn. Every row has its own scale (0 to its largest value plus
//! stderr), so accuracies and perplexities can share a chart; the printed values carry the numbers.
//! `eval.png` is the same chart as PNG.

use anyhow::Result;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

use super::report::xml_escape as escape;
use super::tasks::TaskResult;
use crate::fsutil::write_atomic;

/// The chart's file name in an eval folder.
pub const CHART_FILE: &str = "eval.svg";

/// The chart as PNG.
pub const PNG_FILE: &str = "eval.png";

/// One measured value with its standard error, if defined.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Measured {
    pub value: f64,
    pub stderr: Option<f64>,
}

/// One row of the chart.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub task: String,
    pub metric: String,
    pub base: Option<Measured>,
    pub adapted: Measured,
}

/// The rows for the adapted model's results and, where it ran, the base model's.
pub fn rows(adapted: &[TaskResult], base: Option<&[TaskResult]>) -> Vec<Row> {
    let measured = |(value, stderr): (f64, Option<f64>)| Measured {
        value,
        stderr: stderr.filter(|s| s.is_finite()),
    };
    let mut rows = Vec::new();
    for task in adapted {
        let base_task = base.and_then(|b| b.iter().find(|r| r.name == task.name));
        for (metric, &v) in &task.metrics {
            rows.push(Row {
                task: task.name.clone(),
                metric: metric.clone(),
                base: base_task
                    .and_then(|b| b.metrics.get(metric))
                    .map(|&b| measured(b)),
                adapted: measured(v),
            });
        }
    }
    rows
}

const WIDTH: f64 = 800.0;
const LABEL_WIDTH: f64 = 280.0;
const BAR_AREA: f64 = 380.0;
const BAR_HEIGHT: f64 = 14.0;
const ROW_GAP: f64 = 14.0;
const TOP: f64 = 40.0;
const BASE_COLOUR: &str = "#9aa5b1";
const ADAPTED_COLOUR: &str = "#2b6cb0";

/// The chart of suite `suite` as a standalone SVG document.
pub fn svg(suite: &str, rows: &[Row]) -> String {
    let row_height = 2.0 * BAR_HEIGHT + ROW_GAP;
    let height = TOP + row_height * rows.len() as f64 + 10.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-size=\"15\">{}</text>\n<rect x=\"{LABEL_WIDTH}\" y=\"26\" width=\"10\" height=\"10\" fill=\"{BASE_COLOUR}\"/><text x=\"{}\" y=\"35\">base</text>\n<rect x=\"{}\" y=\"26\" width=\"10\" height=\"10\" fill=\"{ADAPTED_COLOUR}\"/><text x=\"{}\" y=\"35\">adapted</text>\n",
        escape(&format!("Evaluation: {suite}")),
        LABEL_WIDTH + 14.0,
        LABEL_WIDTH + 60.0,
        LABEL_WIDTH + 74.0,
    );
    for (i, row) in rows.iter().enumerate() {
        let y = TOP + row_height * i as f64;
        let top = |m: &Measured| m.value.abs() + m.stderr.unwrap_or(0.0);
        let scale = row
            .base
            .iter()
            .chain([&row.adapted])
            .map(top)
            .fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{}\">{} · {}</text>",
            y + BAR_HEIGHT + 4.0,
            escape(&row.task),
            escape(&row.metric)
        );
        if let Some(base) = &row.base {
            bar(&mut s, y, base, scale, BASE_COLOUR);
        }
        bar(&mut s, y + BAR_HEIGHT, &row.adapted, scale, ADAPTED_COLOUR);
    }
    s.push_str("</svg>\n");
    s
}

/// One bar at height `y`, its whisker and its value.
fn bar(s: &mut String, y: f64, m: &Measured, scale: f64, colour: &str) {
    let x = |v: f64| {
        let fraction = if scale > 0.0 { v / scale } else { 0.0 };
        LABEL_WIDTH + BAR_AREA * fraction.clamp(0.0, 1.0)
    };
    // A zero is a hairline: a rect of width 0 is not drawn at all (and resvg warns about it).
    let _ = writeln!(
        s,
        "<rect x=\"{LABEL_WIDTH}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{colour}\"/>",
        (x(m.value.abs()) - LABEL_WIDTH).max(0.5),
        BAR_HEIGHT - 2.0
    );
    let mid = y + (BAR_HEIGHT - 2.0) / 2.0;
    let label = match m.stderr {
        Some(se) => {
            let (lo, hi) = (x(m.value.abs() - se), x(m.value.abs() + se));
            let _ = writeln!(
                s,
                "<path d=\"M{lo:.1} {mid}H{hi:.1}M{lo:.1} {}V{}M{hi:.1} {}V{}\" stroke=\"#222\" fill=\"none\"/>",
                mid - 4.0,
                mid + 4.0,
                mid - 4.0,
                mid + 4.0
            );
            format!("{:.4} ± {se:.4}", m.value)
        }
        None => format!("{:.4}", m.value),
    };
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\">{label}</text>",
        LABEL_WIDTH + BAR_AREA + 8.0,
        mid + 4.0
    );
}

/// Writes eval.svg, eval.png and eval_chart.json of suite `suite` into `dir`.
pub fn write(dir: &Path, suite: &str, rows: &[Row]) -> Result<()> {
    let svg = svg(suite, rows);
    write_atomic(&dir.join(CHART_FILE), svg.as_bytes())?;
    crate::raster::write_png(&svg, &dir.join(PNG_FILE))?;
    write_atomic(
        &dir.join("eval_chart.json"),
        serde_json::to_string_pretty(rows)?.as_bytes(),
    )
}
