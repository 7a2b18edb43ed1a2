//! Model cards: README.md with Hub metadata (library, base model, tags, language, license,
//! datasets, model-index with the eval results), the training hyper-parameters, the data and its
//! licenses (non-commercial ones flagged), and the evaluation table.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

use crate::eval::report::{scores_of, Scores};
use crate::recipe::Recipe;

/// What the card describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Adapter,
    /// A merged checkpoint; `multimodal` when it keeps a vision tower beside the adapted language
    /// model (Gemma 3 from 4B on).
    Merged {
        multimodal: bool,
    },
}

/// Everything the card is made from, gathered from an adapter folder.
pub struct CardInput {
    pub kind: Kind,
    pub base_model: String,
    pub adapter_config: Value,
    pub recipe: Option<Recipe>,
    /// One entry per eval suite run on the adapter, by suite name.
    pub evals: Vec<SuiteEval>,
    /// The training curves (loss.svg) are beside the adapter.
    pub loss_chart: bool,
}

/// One eval suite's results beside the adapter (`eval/<suite>/`).
pub struct SuiteEval {
    pub suite: String,
    pub adapted: Scores,
    /// The base model's scores, where it was measured.
    pub base: Option<Scores>,
    /// The suite's eval.svg exists.
    pub chart: bool,
}

impl SuiteEval {
    /// The chart's path relative to the adapter folder (and to the card).
    fn chart_path(&self) -> String {
        format!("eval/{}/{}", self.suite, crate::eval::chart::CHART_FILE)
    }
}

impl CardInput {
    /// Reads adapter_config.json, recipe.resolved.toml and eval/*/results.json from `adapter_dir`.
    pub fn gather(adapter_dir: &Path, base_model: &str, kind: Kind) -> Result<Self> {
        let cfg_path = adapter_dir.join(crate::model::adapter::CONFIG_FILE);
        let adapter_config: Value = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?,
        )?;
        let recipe_path = adapter_dir.join("recipe.resolved.toml");
        let recipe = recipe_path
            .exists()
            .then(|| {
                std::fs::read_to_string(&recipe_path)
                    .ok()
                    .and_then(|t| toml::from_str::<Recipe>(&t).ok())
            })
            .flatten();
        let mut evals = Vec::new();
        if let Ok(entries) = std::fs::read_dir(adapter_dir.join("eval")) {
            let mut dirs: Vec<_> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            for d in dirs {
                let read = |f: &str| -> Option<Scores> {
                    let text = std::fs::read_to_string(d.join(f)).ok()?;
                    Some(scores_of(&serde_json::from_str(&text).ok()?))
                };
                if let Some(adapted) = read("results.json") {
                    let name = d
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default();
                    evals.push(SuiteEval {
                        chart: d.join(crate::eval::chart::CHART_FILE).exists(),
                        suite: name,
                        adapted,
                        base: read("base_results.json"),
                    });
                }
            }
        }
        Ok(Self {
            kind,
            base_model: base_model.to_string(),
            adapter_config,
            recipe,
            evals,
            loss_chart: adapter_dir.join(crate::train::plot::CHART_FILE).exists(),
        })
    }

    /// The card as Markdown with YAML front matter.
    pub fn render(&self) -> String {
        let mut y = String::from("---\n");
        let base = yaml_str(&self.base_model);
        match self.kind {
            Kind::Adapter => {
                y.push_str("library_name: peft\n");
                let _ = writeln!(y, "base_model: {base}");
                let _ = writeln!(
                    y,
                    "tags:\n- base_model:adapter:{}\n- lora\n- transformers\n- feinschliff",
                    self.base_model
                );
            }
            Kind::Merged { .. } => {
                y.push_str("library_name: transformers\n");
                let _ = writeln!(y, "base_model: {base}");
                let _ = writeln!(
                    y,
                    "tags:\n- base_model:merge:{}\n- lora\n- merged\n- feinschliff",
                    self.base_model
                );
            }
        }
        // The Hub's task: a merged multimodal checkpoint still reads images.
        let pipeline_tag = match self.kind {
            Kind::Merged { multimodal: true } => "image-text-to-text",
            _ => "text-generation",
        };
        let _ = writeln!(y, "pipeline_tag: {pipeline_tag}");
        if let Some(r) = &self.recipe {
            if !r.output.language.is_empty() {
                let _ = writeln!(
                    y,
                    "language:\n{}",
                    r.output
                        .language
                        .iter()
                        .map(|l| format!("- {l}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            if let Some(l) = &r.output.license {
                let _ = writeln!(y, "license: {}", yaml_str(l));
            }
            let hub: Vec<String> = r.data.train.iter().filter_map(|s| s.hub.clone()).collect();
            if !hub.is_empty() {
                let _ = writeln!(
                    y,
                    "datasets:\n{}",
                    hub.iter()
                        .map(|d| format!("- {d}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
        if !self.evals.is_empty() {
            let name = self
                .recipe
                .as_ref()
                .map(|r| {
                    r.output
                        .dir
                        .rsplit('/')
                        .next()
                        .unwrap_or("model")
                        .to_string()
                })
                .unwrap_or_else(|| "model".into());
            let _ = writeln!(y, "model-index:\n- name: {}\n  results:", yaml_str(&name));
            for SuiteEval {
                suite,
                adapted: scores,
                ..
            } in &self.evals
            {
                for (task, metrics) in scores {
                    let _ = writeln!(y, "  - task:\n      type: text-generation\n    dataset:\n      name: {}\n      type: {}", yaml_str(task), yaml_str(&format!("{suite}/{task}")));
                    y.push_str("    metrics:\n");
                    for (m, v) in metrics {
                        let _ = writeln!(y, "    - type: {m}\n      value: {v}");
                    }
                }
            }
        }
        y.push_str("---\n\n");

        let mut s = y;
        let title = match self.kind {
            Kind::Adapter => "LoRA adapter",
            Kind::Merged { .. } => "Merged model",
        };
        let _ = writeln!(s, "# {title} for {}\n", self.base_model);
        let _ = writeln!(
            s,
            "Fine-tuned with Feinschliff {} from `{}`.\n",
            env!("CARGO_PKG_VERSION"),
            self.base_model
        );
        if self.kind == Kind::Adapter {
            s.push_str("## Use\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n");
            let _ = writeln!(s, "base = AutoModelForCausalLM.from_pretrained(\"{}\")\nmodel = PeftModel.from_pretrained(base, \"<this repo or folder>\")\n```\n", self.base_model);
        }
        s.push_str("## LoRA\n\n| key | value |\n|---|---|\n");
        for key in [
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "target_modules",
        ] {
            if let Some(v) = self.adapter_config.get(key) {
                let _ = writeln!(s, "| {key} | {} |", plain(v));
            }
        }
        if let Some(r) = &self.recipe {
            let t = &r.train;
            s.push_str("\n## Training\n\n| hyper-parameter | value |\n|---|---|\n");
            let rows = [
                ("epochs", t.epochs.to_string()),
                (
                    "max_steps",
                    t.max_steps
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| "–".into()),
                ),
                ("batch_size", t.batch_size.to_string()),
                ("gradient_accumulation", t.gradient_accumulation.to_string()),
                ("learning rate", t.lr.to_string()),
                (
                    "schedule",
                    format!("{:?} with {} warm-up steps", t.lr_schedule, t.warmup_steps)
                        .to_lowercase(),
                ),
                ("weight_decay", t.weight_decay.to_string()),
                ("max_grad_norm", t.max_grad_norm.to_string()),
                ("max_seq_len", r.data.max_seq_len.to_string()),
                ("packing", r.data.packing.to_string()),
                ("dtype", format!("{:?}", r.model.dtype).to_lowercase()),
                ("seed", t.seed.to_string()),
            ];
            for (k, v) in rows {
                let _ = writeln!(s, "| {k} | {v} |");
            }
            if self.loss_chart {
                let _ = writeln!(
                    s,
                    "\n![Training and validation loss, learning rate]({})",
                    crate::train::plot::CHART_FILE
                );
            }
            s.push_str("\n## Data\n\n| source | format | license |\n|---|---|---|\n");
            let mut non_commercial = Vec::new();
            for src in r.data.train.iter().chain(&r.data.validation) {
                let license = src.license.clone().unwrap_or_else(|| "not stated".into());
                if src.non_commercial {
                    non_commercial.push(src.label());
                }
                let flag = if src.non_commercial {
                    " ⚠ non-commercial"
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    "| {} | {:?} | {license}{flag} |",
                    src.label(),
                    src.format.unwrap_or(r.data.format)
                );
            }
            if !non_commercial.is_empty() {
                let _ = writeln!(s, "\n**Non-commercial data:** {} — check its license before any commercial use of this model.", non_commercial.join(", "));
            }
        }
        if !self.evals.is_empty() {
            s.push_str("\n## Evaluation\n");
            for eval in &self.evals {
                let (suite, scores, base) = (&eval.suite, &eval.adapted, &eval.base);
                let _ = writeln!(s, "\n### {suite}\n\n| task | metric | base | adapted | delta |\n|---|---|---|---|---|");
                for (task, metrics) in scores {
                    for (m, v) in metrics {
                        match base
                            .as_ref()
                            .and_then(|b| b.get(task))
                            .and_then(|x| x.get(m))
                        {
                            Some(b) => {
                                let _ = writeln!(
                                    s,
                                    "| {task} | {m} | {b:.4} | {v:.4} | {:+.4} |",
                                    v - b
                                );
                            }
                            None => {
                                let _ = writeln!(s, "| {task} | {m} | – | {v:.4} | – |");
                            }
                        }
                    }
                }
                if eval.chart {
                    let _ = writeln!(
                        s,
                        "\n![{suite}: base and adapted model, with ±stderr]({})",
                        eval.chart_path()
                    );
                }
            }
        }
        s
    }
}

/// Writes README.md into `dir` for the adapter in `adapter_dir`, with the charts it shows (and
/// their PNGs) copied beside it when `dir` is another folder.
pub fn write(dir: &Path, adapter_dir: &Path, base_model: &str, kind: Kind) -> Result<()> {
    let card = CardInput::gather(adapter_dir, base_model, kind)?;
    if dir != adapter_dir {
        let loss = card
            .loss_chart
            .then(|| crate::train::plot::CHART_FILE.to_string());
        let evals = card
            .evals
            .iter()
            .filter(|e| e.chart)
            .map(SuiteEval::chart_path);
        for chart in loss.into_iter().chain(evals) {
            copy_beside(adapter_dir, dir, &chart)?;
            let png = chart.replace(".svg", ".png");
            if adapter_dir.join(&png).is_file() {
                copy_beside(adapter_dir, dir, &png)?;
            }
        }
    }
    crate::fsutil::write_atomic(&dir.join("README.md"), card.render().as_bytes())
}

/// Copies `relative` from `from` into `to` under the same relative path.
fn copy_beside(from: &Path, to: &Path, relative: &str) -> Result<()> {
    let (source, target) = (from.join(relative), to.join(relative));
    let bytes =
        std::fs::read(&source).with_context(|| format!("cannot read {}", source.display()))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    crate::fsutil::write_atomic(&target, &bytes)
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(plain).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}
