//! The model stage: a Hugging Face checkpoint (config, weights, tokenizer) loaded into the shared
//! decoder, with LoRA adapters attached, saved and loaded in PEFT's format.

pub mod adapter;
pub mod base;
pub mod config;
pub mod decoder;
pub mod families;
pub mod generate;
pub mod gguf;
pub mod inspect;
pub mod kernels;
pub mod kv_cache;
pub mod layout;
pub mod linear;
pub mod lora;
pub mod new;
pub mod parts;
pub mod rope;
pub mod text_model;
pub mod tokenizer;
pub mod weights;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Var};
use std::path::{Path, PathBuf};

pub use base::{locate, BaseModel};
pub use config::ModelConfig;
pub use decoder::{CausalLm, TokenLayout};
pub use lora::{LoraConfig, TargetModules};
pub use parts::Parts;
pub use tokenizer::ModelTokenizer;

/// A loaded checkpoint: the network, its tokenizer, and the LoRA config when adapters are attached.
pub struct Model {
    /// Where the checkpoint was read from: a folder, or a GGUF file.
    pub dir: PathBuf,
    pub lm: CausalLm,
    pub tokenizer: ModelTokenizer,
    pub lora: Option<LoraConfig>,
    /// How the checkpoint stores its weights (`f32`, `bf16`, `GGUF Q4_K ×14, F32 ×5`), for summaries.
    pub storage: String,
}

impl Parts {
    /// Opens a Hugging Face checkpoint folder or a GGUF file; tensors convert to `dtype` on `device`.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if gguf::is_gguf(path) {
            return gguf::open(path, dtype, device);
        }
        if !path.is_dir() {
            bail!("model folder {} does not exist", path.display());
        }
        let config_path = path.join("config.json");
        let text = crate::fsutil::read_text(&config_path, "model config")?;
        let config_json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let config = ModelConfig::from_json(&config_json)
            .with_context(|| format!("in model config {}", config_path.display()))?;
        let weights = weights::Weights::open(path, dtype, device)?;
        let storage = weights
            .stored_dtype()
            .map(|d| format!("{d:?}").to_lowercase())
            .unwrap_or_else(|| "unknown".into());
        Ok(Self {
            config,
            config_json,
            weights,
            tokenizer: path
                .join("tokenizer.json")
                .exists()
                .then(|| ModelTokenizer::from_dir(path))
                .transpose()?,
            storage,
        })
    }
}

/// The tokenizer of the checkpoint at `path` (a folder or a GGUF file).
pub fn tokenizer_of(path: &Path) -> Result<ModelTokenizer> {
    required(Parts::open(path, DType::F32, &Device::Cpu)?.tokenizer, path)
}

fn required(tokenizer: Option<ModelTokenizer>, path: &Path) -> Result<ModelTokenizer> {
    tokenizer.with_context(|| {
        format!(
            "{} is missing: Feinschliff needs the fast tokenizer file of the model",
            path.join("tokenizer.json").display()
        )
    })
}

impl Model {
    /// Loads the checkpoint at `path` (a folder or a GGUF file); `dtype` None keeps f32 compute
    /// (weights converted on load).
    pub fn load(path: &Path, dtype: Option<DType>, device: &Device) -> Result<Self> {
        Self::load_quantized(path, dtype, None, device)
    }

    /// As [`Model::load`], with the projection weights held quantized in `quantize` (see
    /// [`weights::Weights::projection`]).
    pub fn load_quantized(
        path: &Path,
        dtype: Option<DType>,
        quantize: Option<kernels::quant::Quantization>,
        device: &Device,
    ) -> Result<Self> {
        let parts = Parts::open(path, dtype.unwrap_or(DType::F32), device)?;
        let lm = CausalLm::load_quantized(parts.config, &parts.weights, device, quantize)
            .with_context(|| {
                format!("cannot build the checkpoint model from {}", path.display())
            })?;
        Ok(Self {
            dir: path.to_path_buf(),
            lm,
            tokenizer: required(parts.tokenizer, path)?,
            lora: None,
            storage: parts.storage,
        })
    }

    /// Attaches freshly initialised adapters (PEFT init) to the targeted layers; `seed` fixes A.
    pub fn attach_lora(&mut self, config: &LoraConfig, seed: u64) -> Result<()> {
        adapter::attach(&mut self.lm, config, seed)?;
        self.lora = Some(config.clone());
        Ok(())
    }

    /// Loads a PEFT adapter folder onto the model.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let config = adapter::load(dir, self.lm.device())?.apply(&mut self.lm)?;
        self.lora = Some(config);
        Ok(())
    }

    /// The trainable tensors with their PEFT names (`base_model.model.<module>.lora_A.weight`).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        adapter::trainable(&self.lm)
    }

    /// Writes the adapters, made on `base`, into `dir` (which must exist) in PEFT's format.
    pub fn save_adapter(&self, base: &BaseModel, dir: &Path) -> Result<()> {
        let config = self
            .lora
            .as_ref()
            .context("the model has no LoRA adapters to save")?;
        adapter::save(&self.lm, config, base, dir)
    }

    /// Number of trainable LoRA parameters.
    pub fn trainable_parameter_count(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }
}
