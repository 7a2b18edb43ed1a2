//! Reading checkpoint tensors from `model.safetensors` or a sharded `model.safetensors.index.json`.

use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use crate::progress::{Progress, Unit};

use super::kernels::frozen_weight::FrozenWeight;
use super::kernels::projection_weight::ProjectionWeight;
use super::kernels::quant::{Quantization, QuantizedWeight};

/// The tensors of one checkpoint, converted to `dtype` on `device` when read.
pub struct Weights {
    files: Vec<PathBuf>,
    source: Source,
    dtype: DType,
    device: Device,
    /// The progress of reading tensors, while a [`Loading`] guard lives.
    loading: RwLock<Option<Progress>>,
}

/// Shows the progress of reading a checkpoint's tensors until dropped.
pub struct Loading<'a> {
    weights: &'a Weights,
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let mut loading = self
            .weights
            .loading
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(progress) = loading.take() {
            progress.finish();
        }
    }
}

/// Where the tensors live: memory-mapped files, tensors already in memory (benchmarks), or a
/// file of another format read tensor by tensor (GGUF).
enum Source {
    Mapped(MmapedSafetensors),
    Memory(HashMap<String, Tensor>),
    Read(Box<dyn TensorReader>),
}

/// A checkpoint file of another format that yields f32 tensors under transformers' names.
pub trait TensorReader: Send + Sync {
    /// The names of all tensors.
    fn names(&self) -> Vec<String>;
    /// The shape of tensor `name`, if there is one.
    fn shape_of(&self, name: &str) -> Option<Vec<usize>>;
    /// Reads tensor `name` as f32 on the CPU.
    fn read(&self, name: &str) -> Result<Tensor>;
    /// The blocks of tensor `name` as stored, rows in transformers' order, when it is stored in a
    /// format that quantized products use as it is (GGUF's Q4_0 and Q8_0); None for any other.
    fn read_blocks(&self, _name: &str) -> Result<Option<(Quantization, Vec<u8>)>> {
        Ok(None)
    }
}

impl Weights {
    /// Opens the safetensors files of the checkpoint in `dir`.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = safetensors_files(dir)?;
        // SAFETY: the files are mapped read-only; Feinschliff never writes a checkpoint it has open.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("cannot read safetensors in {}", dir.display()))?;
        Ok(Self {
            files,
            source: Source::Mapped(tensors),
            dtype,
            device: device.clone(),
            loading: RwLock::new(None),
        })
    }

    /// Weights held in memory, e.g. a random checkpoint that is never written to disk.
    pub fn from_tensors(tensors: Vec<(String, Tensor)>, dtype: DType, device: &Device) -> Self {
        let map = tensors.into_iter().collect();
        Self {
            files: vec![PathBuf::from("<memory>")],
            source: Source::Memory(map),
            dtype,
            device: device.clone(),
            loading: RwLock::new(None),
        }
    }

    /// The tensors of `file` as `reader` reads them.
    pub fn from_reader(
        file: &Path,
        reader: Box<dyn TensorReader>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            files: vec![file.to_path_buf()],
            source: Source::Read(reader),
            dtype,
            device: device.clone(),
            loading: RwLock::new(None),
        }
    }

    /// Counts the tensors read (a bar on a terminal, log lines otherwise) until the guard drops,
    /// out of those whose name `loaded` accepts.
    pub fn show_loading(&self, loaded: impl Fn(&str) -> bool) -> Loading<'_> {
        let what = match self.files.as_slice() {
            [file] => format!("loading {}", file.display()),
            files => format!(
                "loading {} shards in {}",
                files.len(),
                files[0].parent().unwrap_or(Path::new(".")).display()
            ),
        };
        let total = self.names().iter().filter(|n| loaded(n)).count() as u64;
        *self.loading.write().unwrap_or_else(PoisonError::into_inner) =
            Some(Progress::new(what, total, Unit::Items("tensors")));
        Loading { weights: self }
    }

    /// The checkpoint's files, for messages.
    pub fn describe(&self) -> String {
        self.files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The dtype the first tensor is stored in (the checkpoint's dtype).
    pub fn stored_dtype(&self) -> Option<DType> {
        match &self.source {
            Source::Mapped(m) => m
                .tensors()
                .first()
                .and_then(|(_, v)| DType::try_from(v.dtype()).ok()),
            Source::Memory(m) => m.values().next().map(Tensor::dtype),
            Source::Read(_) => None,
        }
    }

    /// The names of all tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &self.source {
            Source::Mapped(m) => m.tensors().into_iter().map(|(n, _)| n).collect(),
            Source::Memory(m) => m.keys().cloned().collect(),
            Source::Read(r) => r.names(),
        };
        names.sort();
        names
    }

    /// The stored shape of tensor `name`.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::Mapped(m) => m.get(name).ok().map(|v| v.shape().to_vec()),
            Source::Memory(m) => m.get(name).map(|t| t.dims().to_vec()),
            Source::Read(r) => r.shape_of(name),
        }
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Mapped(m) => m.get(name).is_ok(),
            Source::Memory(m) => m.contains_key(name),
            Source::Read(r) => r.shape_of(name).is_some(),
        }
    }

    /// The tensor `name`, which must exist and have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match &self.source {
            // Converted on the CPU, so that a GPU receives the compute dtype's bytes only.
            Source::Read(_) => self
                .stored(name, shape, &Device::Cpu)?
                .to_dtype(self.dtype)?
                .to_device(&self.device)?,
            _ => self.stored(name, shape, &self.device)?,
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    /// Tensor `name` ([out, in]) as a frozen projection weight held in `format` on this
    /// checkpoint's device, its products computed in this checkpoint's compute dtype. A GGUF tensor
    /// stored as Q4_0 or Q8_0 is taken as it is stored (whatever `format`: no second rounding);
    /// any other is quantized from its stored values. A weight whose rows are not whole blocks of
    /// `format` stays dense.
    pub fn projection(
        &self,
        name: &str,
        shape: &[usize],
        format: Quantization,
    ) -> Result<ProjectionWeight> {
        let &[rows, cols] = shape else {
            bail!("tensor `{name}`: a projection weight has two dimensions, not {shape:?}");
        };
        if let Source::Read(r) = &self.source {
            if let Some((stored, blocks)) = r.read_blocks(name)? {
                let q = QuantizedWeight::from_gguf(
                    stored,
                    (rows, cols),
                    &blocks,
                    self.dtype,
                    &self.device,
                )
                .with_context(|| format!("tensor `{name}` of {}", self.describe()))?;
                return Ok(q.into());
            }
        }
        if !cols.is_multiple_of(format.block()) {
            return Ok(FrozenWeight::new(self.get(name, shape)?).into());
        }
        let stored = self.stored(name, shape, &Device::Cpu)?;
        Ok(QuantizedWeight::quantize(&stored, format, self.dtype, &self.device)?.into())
    }

    /// Tensor `name` in its stored dtype (f32 for a file read by a [`TensorReader`]) on `device`;
    /// it must exist and have `shape`.
    fn stored(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        if !self.contains(name) {
            bail!("checkpoint {} has no tensor `{name}`", self.describe());
        }
        let t = match &self.source {
            Source::Mapped(m) => m
                .load(name, device)
                .with_context(|| format!("cannot load tensor `{name}` from {}", self.describe()))?,
            Source::Memory(m) => m[name].to_device(device)?,
            Source::Read(r) => r
                .read(name)
                .with_context(|| format!("cannot load tensor `{name}` from {}", self.describe()))?
                .to_device(device)?,
        };
        if let Some(progress) = self
            .loading
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            progress.inc(1);
        }
        if t.dims() != shape {
            bail!(
                "tensor `{name}` in {} has shape {:?}, the config expects {:?}",
                self.describe(),
                t.dims(),
                shape
            );
        }
        Ok(t)
    }
}

/// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no `weight_map` object", index.display()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let mut files = Vec::new();
        for shard in shards {
            let path = dir.join(shard);
            if !path.exists() {
                bail!(
                    "{} names shard {shard}, which does not exist",
                    index.display()
                );
            }
            files.push(path);
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "{} has neither model.safetensors nor model.safetensors.index.json (only safetensors checkpoints are supported; convert .bin files with transformers' save_pretrained(safe_serialization=True))",
        dir.display()
    )
}

/// Writes tensors as a safetensors file with `{"format": "pt"}` metadata, as transformers writes them.
/// The file appears under its final name only when complete.
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.contiguous()?;
        let (dtype, bytes): (Dtype, Vec<u8>) = match t.dtype() {
            DType::F32 => (
                Dtype::F32,
                t.flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                Dtype::BF16,
                t.flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                Dtype::F16,
                t.flatten_all()?
                    .to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::I64 => (
                Dtype::I64,
                t.flatten_all()?
                    .to_vec1::<i64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::U32 => (
                Dtype::U32,
                t.flatten_all()?
                    .to_vec1::<u32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => bail!("cannot save tensor `{name}` of dtype {other:?}"),
        };
        buffers.push((name.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let bytes = safetensors::serialize(views, metadata)?;
    crate::fsutil::write_atomic(path, &bytes)
}
