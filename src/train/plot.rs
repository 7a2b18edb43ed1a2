//! Training curves: `loss.svg` in the run folder, the train loss (raw and smoothed) and the
//! validation loss over the steps, with the learning rate in a panel below on the same steps;
//! `loss.png` is the same chart as PNG, `loss.json` holds exactly the points plotted.

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

use crate::fsutil::write_atomic;

/// The chart's file name in a run folder.
pub const CHART_FILE: &str = "loss.svg";

/// The chart as PNG.
pub const PNG_FILE: &str = "loss.png";

/// The width of each panel: poloto lays out an 800-wide frame and sets the legend right of the
/// plot, where "train loss (smoothed)" runs past 800; the panel is wider than the frame.
const WIDTH: u32 = 980;

/// How much the smoothed curve remembers (TensorBoard's default smoothing, debiased).
const SMOOTHING: f64 = 0.9;

/// The points of the chart, as written to loss.json.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Curves {
    /// (step, loss) of every step with a finite loss.
    pub loss: Vec<(f64, f64)>,
    pub loss_smoothed: Vec<(f64, f64)>,
    pub val_loss: Vec<(f64, f64)>,
    pub lr: Vec<(f64, f64)>,
}

impl Curves {
    /// The curves of a metrics.jsonl file.
    pub fn read(metrics: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(metrics)
            .with_context(|| format!("cannot read {}", metrics.display()))?;
        let mut c = Curves::default();
        let (mut ema, mut n) = (0.0, 0);
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}", metrics.display(), i + 1))?;
            let step = v["step"].as_f64().unwrap_or((i + 1) as f64);
            if let Some(loss) = v["loss"].as_f64().filter(|l| l.is_finite()) {
                c.loss.push((step, loss));
                n += 1;
                ema = SMOOTHING * ema + (1.0 - SMOOTHING) * loss;
                c.loss_smoothed
                    .push((step, ema / (1.0 - SMOOTHING.powi(n))));
            }
            if let Some(val) = v["val_loss"].as_f64().filter(|l| l.is_finite()) {
                c.val_loss.push((step, val));
            }
            if let Some(lr) = v["lr"].as_f64() {
                c.lr.push((step, lr));
            }
        }
        Ok(c)
    }

    /// The chart: losses above, the learning rate below.
    pub fn svg(&self) -> Result<String> {
        // Each panel's SVG header: WIDTH wide, as high as poloto's frame, light theme.
        let dim = [f64::from(WIDTH), 500.0];
        let panel = || {
            poloto::header()
                .with_dim(dim)
                .with_viewbox(dim)
                .light_theme()
        };
        let losses = poloto::plots!(
            poloto::build::plot("train loss").line(self.loss.iter().copied()),
            poloto::build::plot("train loss (smoothed)").line(self.loss_smoothed.iter().copied()),
            poloto::build::plot("validation loss").line(self.val_loss.iter().copied())
        );
        let top = poloto::frame_build()
            .data(losses)
            .build_and_label(("Training", "step", "loss"))
            .append_to(panel())
            .render_string()
            .map_err(|e| anyhow::anyhow!("cannot draw the loss chart: {e}"))?;
        let lr = poloto::plots!(poloto::build::plot("learning rate").line(self.lr.iter().copied()));
        let bottom = poloto::frame_build()
            .data(lr)
            .build_and_label(("Learning rate", "step", "lr"))
            .append_to(panel())
            .render_string()
            .map_err(|e| anyhow::anyhow!("cannot draw the learning-rate chart: {e}"))?;
        Ok(format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"1000\" viewBox=\"0 0 {WIDTH} 1000\">\n{}\n{}\n</svg>\n",
            top.replacen("<svg ", "<svg y=\"0\" ", 1),
            bottom.replacen("<svg ", "<svg y=\"500\" ", 1)
        ))
    }
}

/// Writes loss.svg, loss.png and loss.json into `dir` from its metrics.jsonl.
pub fn write(dir: &Path) -> Result<()> {
    let curves = Curves::read(&dir.join("metrics.jsonl"))?;
    if curves.loss.is_empty() {
        return Ok(());
    }
    let svg = curves.svg()?;
    write_atomic(&dir.join(CHART_FILE), svg.as_bytes())?;
    crate::raster::write_png(&svg, &dir.join(PNG_FILE))?;
    write_atomic(
        &dir.join("loss.json"),
        serde_json::to_string_pretty(&curves)?.as_bytes(),
    )
}
