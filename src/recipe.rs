//! The TOML recipe: schema, defaults, `--set` overrides and validation with messages that name the
//! file, line and key. Every later stage receives the resolved [`Recipe`].

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::model::{BaseModel, TargetModules};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    #[serde(default)]
    pub lora: LoraSection,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    pub output: OutputSection,
    /// Evaluations after training (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalSection>,
    /// A merged full model written after training and evaluation (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportSection>,
    /// Upload to the Hugging Face Hub once every gate passed (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishSection>,
    /// The folder relative paths in the recipe are resolved against (the recipe file's folder).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The recipe file, for messages.
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[model]`: the base checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A local folder in Hugging Face layout, or a Hub repo id (`org/name`).
    pub base: String,
    /// The Hub revision (branch, tag or commit) when `base` is a repo id (or names `hub_id`'s files).
    #[serde(default)]
    pub revision: Option<String>,
    /// The Hub id (`org/name`) of a local `base` folder, named in what is published instead of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_id: Option<String>,
    /// Compute dtype of the frozen base weights.
    #[serde(default)]
    pub dtype: Precision,
    /// Hold the frozen projection weights quantized in memory (QLoRA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<crate::model::kernels::quant::Quantization>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }
}

/// `[lora]`: the adapter's hyper-parameters (PEFT's names and defaults where they exist).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    /// Continue training an existing PEFT adapter (made by Feinschliff, PEFT, Axolotl, Unsloth, ...)
    /// instead of starting from PEFT's initialisation; its r, alpha and targets are used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: TargetModules::Pattern("all-linear".into()),
            use_rslora: false,
            init_from: None,
        }
    }
}

impl LoraSection {
    pub fn to_config(&self) -> crate::model::LoraConfig {
        crate::model::LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
        }
    }
}

/// How rows become training text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Raw text (continued pre-training); loss on every token.
    Text,
    /// Prompt + completion, concatenated as is; loss on the completion.
    Completion,
    /// Alpaca-style instruction / input / output (optional system), rendered with the chat template.
    Instruction,
    /// A list of messages with role and content, rendered with the chat template.
    #[default]
    Chat,
}

/// Which columns hold what; every name can be remapped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Columns {
    pub text: String,
    pub prompt: String,
    pub completion: String,
    pub instruction: String,
    pub input: String,
    pub output: String,
    pub system: String,
    pub messages: String,
    /// Field of a message that holds the role (ShareGPT: `from`).
    pub role: String,
    /// Field of a message that holds the text (ShareGPT: `value`).
    pub content: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            text: "text".into(),
            prompt: "prompt".into(),
            completion: "completion".into(),
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
            system: "system".into(),
            messages: "messages".into(),
            role: "role".into(),
            content: "content".into(),
        }
    }
}

/// One data source: local files (path or glob), a Hub dataset, or an SQL query.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// A file or glob of parquet, jsonl/ndjson, json, csv, tsv, xlsx/xlsm/xls or ods files, or of
    /// documents (pdf, docx, html/htm, md) for `format = "text"`.
    #[serde(default)]
    pub path: Option<String>,
    /// A Hub dataset id (`org/name`), read from its parquet files, the hub cache or the mirror.
    #[serde(default)]
    pub hub: Option<String>,
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub split: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    /// An SQL query whose result rows are the source's rows (with `connection`).
    #[serde(default)]
    pub sql: Option<String>,
    /// Where `sql` runs: `sqlite://FILE` (from the recipe's folder) or
    /// `postgres://USER@HOST[:PORT]/DB`; never with a password.
    #[serde(default)]
    pub connection: Option<String>,
    /// PostgreSQL: a file that holds the password (else PGPASSWORD, else ~/.pgpass or PGPASSFILE).
    #[serde(default)]
    pub password_file: Option<String>,
    /// Rows taken from this source relative to its size (0.5: a seeded half; 2: every row twice).
    #[serde(default = "one")]
    pub weight: f64,
    /// Overrides `[data] format` for this source.
    #[serde(default)]
    pub format: Option<DataFormat>,
    /// Overrides `[data.columns]` for this source.
    #[serde(default)]
    pub columns: Option<Columns>,
    /// The data's license, for the model card.
    #[serde(default)]
    pub license: Option<String>,
    /// Whether the license forbids commercial use; flagged in the model card.
    #[serde(default)]
    pub non_commercial: bool,
    /// csv/tsv: the field delimiter (one character; default `,`, or tab for .tsv).
    #[serde(default)]
    pub delimiter: Option<String>,
    /// csv/tsv: the quote character (default `"`; empty for none).
    #[serde(default)]
    pub quote: Option<String>,
    /// csv/tsv/text/html/md: `utf8` (invalid bytes are an error), `utf8-lossy` (replaced), ... (see
    /// [`crate::data::text_encoding`]).
    #[serde(default)]
    pub encoding: Option<String>,
    /// csv/tsv: whether the first line names the columns.
    #[serde(default = "yes")]
    pub has_header: bool,
    /// Read the files as this type (`parquet`, `jsonl`, `json`, `csv`, `tsv`, `xlsx`, ..., or a
    /// document's `pdf`, `docx`, `html`, `md`) whatever their extension.
    #[serde(default)]
    pub file_type: Option<String>,
    /// Workbooks: the sheet, by name or 0-based index (default: the first).
    #[serde(default)]
    pub sheet: Option<crate::data::excel::SheetRef>,
    /// Workbooks: the row (from 1, as Excel numbers rows) that names the columns (default: the
    /// first non-empty row).
    #[serde(default)]
    pub header_row: Option<u32>,
    /// Documents: tokens each chunk cut inside a section repeats from the end of the one before
    /// (default 0).
    #[serde(default)]
    pub chunk_overlap: Option<usize>,
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

impl SourceSpec {
    /// How to read this source's files.
    pub fn read_options(&self) -> crate::data::source::ReadOptions {
        crate::data::source::ReadOptions {
            file_type: self.file_type.clone(),
            delimiter: self.delimiter.clone(),
            quote: self.quote.clone(),
            encoding: self.encoding.clone(),
            has_header: self.has_header,
            sheet: self.sheet.clone(),
            header_row: self.header_row,
            ..Default::default()
        }
    }

    /// A short name for messages and reports (an SQL source: its connection, without secrets).
    pub fn label(&self) -> String {
        match (&self.path, &self.hub, &self.connection) {
            (Some(p), _, _) => p.clone(),
            (None, Some(h), _) => format!(
                "hub:{h}{}",
                self.split
                    .as_ref()
                    .map(|s| format!(":{s}"))
                    .unwrap_or_default()
            ),
            (None, None, Some(c)) => crate::data::sql::without_password(c),
            (None, None, None) if self.sql.is_some() => "sql without connection".into(),
            (None, None, None) => "<no source>".into(),
        }
    }
}

/// How messages name a source: `[[data.train]] 1` is the first training source.
pub fn source_name(table: &str, index: usize) -> String {
    format!("[[data.{table}]] {}", index + 1)
}

/// `[data]`: where the examples come from, how they are rendered, masked, filtered and packed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training sources (`[[data.train]]`).
    pub train: Vec<SourceSpec>,
    /// Validation sources (`[[data.validation]]`); without them `validation_fraction` is held out.
    #[serde(default)]
    pub validation: Vec<SourceSpec>,
    #[serde(default)]
    pub format: DataFormat,
    #[serde(default)]
    pub columns: Columns,
    /// Role names in the data mapped to system/user/assistant (ShareGPT: human = "user", gpt = "assistant").
    #[serde(default)]
    pub roles: std::collections::BTreeMap<String, String>,
    /// `model` (the chat template of tokenizer_config.json) or a built-in: chatml, llama3, mistral, alpaca.
    #[serde(default = "default_template")]
    pub template: String,
    /// Train on every token, not only the assistant turns / completions.
    #[serde(default)]
    pub train_on_inputs: bool,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Pack several samples into each row of max_seq_len tokens (attention stays inside each sample).
    #[serde(default)]
    pub packing: bool,
    #[serde(default = "default_validation_fraction")]
    pub validation_fraction: f64,
    /// Use at most this many training samples (after shuffling).
    #[serde(default)]
    pub max_samples: Option<usize>,
    /// Drop exact duplicate samples.
    #[serde(default = "yes")]
    pub dedup: bool,
    /// Drop samples with fewer tokens than this.
    #[serde(default)]
    pub min_tokens: usize,
    /// Drop (rather than truncate) samples with more tokens than this.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// A local folder that mirrors Hub datasets as `<mirror>/<org>/<name>/...` (or FEINSCHLIFF_MIRROR).
    #[serde(default)]
    pub mirror: Option<String>,
}

fn default_template() -> String {
    "model".into()
}
fn default_max_seq_len() -> usize {
    512
}
fn default_validation_fraction() -> f64 {
    0.1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    #[default]
    Cosine,
}

/// `[train]`: the optimisation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`).
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub gradient_accumulation: usize,
    pub lr: f64,
    pub lr_schedule: Schedule,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Compute the validation loss every this many optimizer steps (and at the end); 0 = only at the end.
    pub eval_every: usize,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// Recompute each layer's activations in the backward pass: less memory, ~1/3 more compute.
    /// Unset, it is on with `[model] quantize` (as PEFT's `prepare_model_for_kbit_training` turns
    /// it on for a quantized base: the point of a 4-bit base is memory) and off otherwise;
    /// [`Recipe::load`] fills it in.
    pub gradient_checkpointing: Option<bool>,
    /// Write a checkpoint every this many optimizer steps (0: only at the end of each epoch and on
    /// SIGINT/SIGTERM). `feinschliff train --resume` continues from the latest one.
    pub save_every: usize,
    /// Keep this many of the latest checkpoints (at least 1).
    pub save_total_limit: usize,
    /// Skip an update whose loss or gradients are not finite (counted in metrics.jsonl) instead of
    /// stopping the run.
    pub skip_nonfinite: bool,
    /// Without a terminal (CI logs), log one line every this many steps instead of a progress bar.
    pub logging_steps: usize,
    /// Stop when the validation loss has not improved for this many evaluations (`eval_every`).
    pub early_stopping_patience: Option<usize>,
    /// At the end, keep the adapter of the best validation loss, not the last one.
    pub load_best_at_end: bool,
}

impl TrainSection {
    /// Settings that change how a run is saved or shown, not what it computes: a run may resume
    /// with other values of these.
    pub const NOT_AFFECTING_RESULTS: [&'static str; 4] = [
        "save_every",
        "save_total_limit",
        "logging_steps",
        "eval_every",
    ];
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            gradient_accumulation: 1,
            lr: 2e-4,
            lr_schedule: Schedule::Cosine,
            warmup_steps: 0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            device: "auto".into(),
            gradient_checkpointing: None,
            save_every: 0,
            save_total_limit: 2,
            skip_nonfinite: false,
            logging_steps: 10,
            early_stopping_patience: None,
            load_best_at_end: false,
        }
    }
}

/// `[eval]`: suites scored on the base and the adapted model after training.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Suite files (evals/*.toml).
    pub suites: Vec<String>,
    /// At most this many documents per task.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Also score the base model: report.md shows deltas and max_drop gates compare against it.
    #[serde(default = "yes")]
    pub compare_base: bool,
}

/// `[export]`: base + adapter merged into one full model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// Merge the adapter into the base weights (the only export besides the adapter itself).
    #[serde(default = "yes")]
    pub merge: bool,
    /// Weights dtype of the merged model (default: the base checkpoint's).
    #[serde(default)]
    pub dtype: Option<Precision>,
    /// Where the merged model goes.
    pub out: String,
    /// Largest safetensors shard (e.g. "5GB").
    #[serde(default = "default_shard_size")]
    pub max_shard_size: String,
    /// `safetensors` (Hugging Face layout) or `gguf` (one file for llama.cpp).
    #[serde(default)]
    pub format: ExportFormat,
    /// Weights of a GGUF export: `f16` (default), `q8_0` or `q4_k_m`.
    #[serde(default)]
    pub quant: Option<crate::model::gguf::Quant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    #[default]
    Safetensors,
    Gguf,
}

impl ExportSection {
    /// What the merged model is written as.
    pub fn merged_format(&self) -> crate::export::merged::Format {
        use crate::export::merged::Format;
        match self.format {
            ExportFormat::Safetensors => Format::Safetensors,
            ExportFormat::Gguf => Format::Gguf(self.quant.unwrap_or_default()),
        }
    }
}

fn default_shard_size() -> String {
    "5GB".into()
}

/// `[publish]`: the Hub repository the result is uploaded to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSection {
    /// `org/name`.
    pub repo: String,
    #[serde(default)]
    pub private: bool,
    /// Branch to commit to; default main.
    #[serde(default)]
    pub revision: Option<String>,
    /// Open a pull request instead of committing directly.
    #[serde(default)]
    pub create_pr: bool,
    /// Publish even when a file names a local base or path (private repos only).
    #[serde(default)]
    pub allow_local_base: bool,
}

/// `[output]`: where the adapter and the run's records go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: String,
    /// License of the adapter, for the model card (e.g. `apache-2.0`).
    #[serde(default)]
    pub license: Option<String>,
    /// Languages of the model, for the model card (e.g. `["de"]`).
    #[serde(default)]
    pub language: Vec<String>,
}

impl Recipe {
    /// Reads `path`, applies `key.sub=value` overrides, validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = crate::fsutil::read_text(path, "recipe")?;
        let mut recipe: Recipe = if overrides.is_empty() {
            toml::from_str(&text).map_err(|e| anyhow!("recipe {}: {e}", path.display()))?
        } else {
            let mut table: toml::Table = text
                .parse()
                .map_err(|e| anyhow!("recipe {}: {e}", path.display()))?;
            for o in overrides {
                apply_override(&mut table, o)?;
            }
            let merged = toml::to_string(&table)?;
            toml::from_str(&merged).map_err(|e| {
                anyhow!(
                    "recipe {} after --set {}: {}",
                    path.display(),
                    overrides.join(" "),
                    e.message()
                )
            })?
        };
        recipe
            .train
            .gradient_checkpointing
            .get_or_insert(recipe.model.quantize.is_some());
        recipe.source = path.to_path_buf();
        recipe.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        recipe.validate(&text)?;
        Ok(recipe)
    }

    /// A path from the recipe, resolved against the recipe's folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let path = Path::new(p);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The resolved recipe as TOML.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Locates `[model] base` with its Hub id; every later stage takes the base from here.
    pub fn locate_base(&self) -> Result<BaseModel> {
        let m = &self.model;
        crate::model::locate(
            &m.base,
            &self.resolve(&m.base),
            m.revision.as_deref(),
            m.hub_id.as_deref(),
        )
        .with_context(|| format!("recipe {}: [model] base", self.source.display()))
    }

    /// The recipe as written next to the adapter (recipe.resolved.toml): the base named as
    /// published files name it (its Hub id, else its folder's name), never by a local path.
    pub fn naming_base(&self, base: &BaseModel) -> Recipe {
        let mut recipe = self.clone();
        recipe.model.base = base.name();
        recipe.model.revision = base.revision.clone();
        recipe.model.hub_id = None;
        recipe
    }

    fn validate(&self, text: &str) -> Result<()> {
        let fail = |section: &str, key: &str, msg: String| -> anyhow::Error {
            let at = line_of(text, section, key)
                .map(|l| format!(", line {l}"))
                .unwrap_or_default();
            anyhow!(
                "recipe {}{at}: [{section}] {key}: {msg}",
                self.source.display()
            )
        };
        if let Some(e) = &self.export {
            if e.format == ExportFormat::Gguf && e.dtype.is_some() {
                return Err(fail(
                    "export",
                    "dtype",
                    "applies to safetensors exports; a GGUF export's types come from `quant` (f16, q8_0, q4_k_m)".into(),
                ));
            }
            if e.format == ExportFormat::Safetensors && e.quant.is_some() {
                return Err(fail(
                    "export",
                    "quant",
                    "applies to `format = \"gguf\"` only; set the format or remove quant".into(),
                ));
            }
        }
        let l = &self.lora;
        if l.r == 0 {
            return Err(fail(
                "lora",
                "r",
                "must be at least 1 (typical: 8, 16, 64)".into(),
            ));
        }
        if l.alpha.is_nan() || l.alpha <= 0.0 {
            return Err(fail(
                "lora",
                "alpha",
                format!("must be positive, got {}", l.alpha),
            ));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return Err(fail(
                "lora",
                "dropout",
                format!("must be in [0, 1), got {}", l.dropout),
            ));
        }
        if let TargetModules::Names(names) = &l.target_modules {
            if names.is_empty() {
                return Err(fail(
                    "lora",
                    "target_modules",
                    "is empty; name modules (e.g. [\"q_proj\", \"v_proj\"]) or use \"all-linear\""
                        .into(),
                ));
            }
        }
        let d = &self.data;
        if d.train.is_empty() {
            return Err(fail(
                "data",
                "train",
                "needs at least one source: [[data.train]] path = \"...\"".into(),
            ));
        }
        let train = d.train.iter().enumerate();
        let validation = d.validation.iter().enumerate();
        let named = train
            .map(|(i, src)| (source_name("train", i), src))
            .chain(validation.map(|(i, src)| (source_name("validation", i), src)));
        for (name, src) in named {
            let kinds = [&src.path, &src.hub, &src.sql];
            if kinds.iter().filter(|k| k.is_some()).count() != 1 {
                return Err(anyhow!(
                    "recipe {}: {name} ({}) must set exactly one of `path`, `hub` and `sql`",
                    self.source.display(),
                    src.label()
                ));
            }
            crate::data::sql::check(src, self).map_err(|e| {
                anyhow!(
                    "recipe {}: {name} ({}): {e}",
                    self.source.display(),
                    src.label()
                )
            })?;
            let kind = crate::data::source::file_kind(
                Path::new(src.path.as_deref().unwrap_or_default()),
                src.file_type.as_deref(),
            );
            let stray = crate::data::excel::stray_option(
                &kind,
                src.sheet.is_some(),
                src.header_row.is_some(),
            );
            if let Some(key) = stray {
                return Err(anyhow!(
                    "recipe {}: {name} ({}): `{key}` applies only to Excel and OpenDocument workbooks (.xlsx, .xlsm, .xls, .ods), not to {}",
                    self.source.display(),
                    src.label(),
                    if src.hub.is_some() { "a Hub dataset".to_string() } else { format!("`{kind}` files") }
                ));
            }
            if let Some(overlap) = src.chunk_overlap {
                let format = src.format.unwrap_or(d.format);
                let why = if src.path.is_none() {
                    Some("applies to documents (.pdf, .docx, .html, .htm, .md) read from `path`, not to a Hub dataset or an SQL query".to_string())
                } else if format != DataFormat::Text {
                    Some(format!(
                        "applies to documents, which are read as format = \"text\", not as `{}`",
                        format!("{format:?}").to_lowercase()
                    ))
                } else if overlap * 2 > d.max_seq_len {
                    Some(format!(
                        "{overlap} tokens is more than half of [data] max_seq_len ({})",
                        d.max_seq_len
                    ))
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(anyhow!(
                        "recipe {}: {name} ({}): `chunk_overlap` {why}",
                        self.source.display(),
                        src.label()
                    ));
                }
            }
            if src.header_row == Some(0) {
                return Err(anyhow!(
                    "recipe {}: {name} ({}): `header_row` counts from 1, as Excel numbers rows",
                    self.source.display(),
                    src.label()
                ));
            }
            if !(src.weight >= 0.0 && src.weight.is_finite()) {
                return Err(anyhow!(
                    "recipe {}: {name} ({}): weight must be >= 0, got {}",
                    self.source.display(),
                    src.label(),
                    src.weight
                ));
            }
        }
        if d.template != "model"
            && !crate::data::template::BUILTIN
                .iter()
                .any(|(n, _)| *n == d.template)
        {
            return Err(fail(
                "data",
                "template",
                format!(
                    "unknown template `{}`; use \"model\" or one of: {}",
                    d.template,
                    crate::data::template::BUILTIN
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if let Some(role) = d
            .roles
            .values()
            .find(|r| !["system", "user", "assistant"].contains(&r.as_str()))
        {
            return Err(fail(
                "data",
                "roles",
                format!("roles map to system, user or assistant, not `{role}`"),
            ));
        }
        if d.max_seq_len < 2 {
            return Err(fail(
                "data",
                "max_seq_len",
                format!("must be at least 2, got {}", d.max_seq_len),
            ));
        }
        if !(0.0..1.0).contains(&d.validation_fraction) {
            return Err(fail(
                "data",
                "validation_fraction",
                format!("must be in [0, 1), got {}", d.validation_fraction),
            ));
        }
        let t = &self.train;
        if t.save_total_limit == 0 {
            return Err(fail(
                "train",
                "save_total_limit",
                "must be at least 1 (the latest checkpoint is what --resume continues)".into(),
            ));
        }
        if t.logging_steps == 0 {
            return Err(fail("train", "logging_steps", "must be at least 1".into()));
        }
        if t.early_stopping_patience == Some(0) {
            return Err(fail(
                "train",
                "early_stopping_patience",
                "must be at least 1 (evaluations without improvement)".into(),
            ));
        }
        let needs_validation = if t.early_stopping_patience.is_some() {
            Some("early_stopping_patience")
        } else if t.load_best_at_end {
            Some("load_best_at_end")
        } else {
            None
        };
        if let Some(key) = needs_validation {
            if t.eval_every == 0 || (d.validation.is_empty() && d.validation_fraction == 0.0) {
                return Err(fail(
                    "train",
                    key,
                    "acts on the validation loss: set eval_every > 0 and give validation data ([[data.validation]] or validation_fraction > 0)".into(),
                ));
            }
        }
        if t.batch_size == 0 {
            return Err(fail("train", "batch_size", "must be at least 1".into()));
        }
        if t.gradient_accumulation == 0 {
            return Err(fail(
                "train",
                "gradient_accumulation",
                "must be at least 1".into(),
            ));
        }
        if t.epochs == 0 && t.max_steps.is_none() {
            return Err(fail(
                "train",
                "epochs",
                "must be at least 1 (or set max_steps)".into(),
            ));
        }
        if t.max_steps == Some(0) {
            return Err(fail("train", "max_steps", "must be at least 1".into()));
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(fail(
                "train",
                "lr",
                format!("must be a positive number, got {}", t.lr),
            ));
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            return Err(fail(
                "train",
                "adam_beta1",
                "betas must be in [0, 1)".into(),
            ));
        }
        if t.weight_decay < 0.0 || t.max_grad_norm < 0.0 || t.adam_eps.is_nan() || t.adam_eps <= 0.0
        {
            return Err(fail(
                "train",
                "weight_decay",
                "weight_decay and max_grad_norm must be >= 0, adam_eps > 0".into(),
            ));
        }
        crate::device::parse(&t.device).map_err(|e| fail("train", "device", e.to_string()))?;
        if let Some(e) = &self.eval {
            for s in &e.suites {
                if !self.resolve(s).exists() {
                    return Err(fail(
                        "eval",
                        "suites",
                        format!(
                            "suite {} does not exist (paths are read from the recipe's folder)",
                            self.resolve(s).display()
                        ),
                    ));
                }
            }
        }
        if let Some(id) = &self.model.hub_id {
            crate::hub::split_repo_id(id).map_err(|e| fail("model", "hub_id", e.to_string()))?;
            if crate::hub::looks_like_repo_id(&self.model.base, &self.resolve(&self.model.base))
                && *id != self.model.base
            {
                return Err(fail(
                    "model",
                    "hub_id",
                    format!(
                        "names a local folder's Hub id, but base `{}` is a Hub id already; remove hub_id",
                        self.model.base
                    ),
                ));
            }
        }
        if let Some(p) = &self.publish {
            crate::hub::split_repo_id(&p.repo)
                .map_err(|e| fail("publish", "repo", e.to_string()))?;
            if p.allow_local_base && !p.private {
                return Err(fail(
                    "publish",
                    "allow_local_base",
                    "is for private repos only; set private = true or name the base's Hub id with [model] hub_id".into(),
                ));
            }
        }
        if let Some(e) = &self.export {
            crate::export::merged::parse_size(&e.max_shard_size)
                .map_err(|err| fail("export", "max_shard_size", err.to_string()))?;
            if e.out.trim().is_empty() {
                return Err(fail("export", "out", "must name a folder".into()));
            }
        }
        if let Some(a) = &l.init_from {
            let path = self.resolve(a);
            if !path.join(crate::model::adapter::CONFIG_FILE).exists() {
                return Err(fail(
                    "lora",
                    "init_from",
                    format!("{} holds no adapter_config.json", path.display()),
                ));
            }
        }
        if self.output.dir.trim().is_empty() {
            return Err(fail("output", "dir", "must name a folder".into()));
        }
        Ok(())
    }
}

/// Sets `section.key=value` in the table; the value is read as TOML, or taken as a string.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (path, value) = assignment.split_once('=').with_context(|| {
        format!("--set `{assignment}` must look like section.key=value (e.g. train.lr=1e-4)")
    })?;
    let value: toml::Value = match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = path.trim().split('.').collect();
    let (last, sections) = parts.split_last().context("empty --set key")?;
    let mut current = table;
    for s in sections {
        current = current
            .entry(s.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("--set {path}: `{s}` is not a section"))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// The 1-based line on which `key` is set inside `[section]`, if it is written in the file.
fn line_of(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut in_section = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = t.trim_matches(|c| c == '[' || c == ']').trim() == section;
        } else if in_section && t.split('=').next().map(str::trim) == Some(key) {
            return Some(i + 1);
        }
    }
    None
}
