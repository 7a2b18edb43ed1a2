//! Quantized frozen weights for LoRA on a quantized base (QLoRA, `[model] quantize`): a projection
//! weight W [rows, cols] kept in memory as blocks of 4- or 8-bit codes with one scale per block —
//! llama.cpp's Q4_0 and Q8_0 (32 values a block, f16 scale, bit-exact with gguf-py) or
//! bitsandbytes' NF4 (64 values a block, f32 absmax) — and never as a dense copy: products decode
//! it a panel at a time on the CPU ([`panels`]), or whole per use with candle ops elsewhere.
//!
//! The planes are candle tensors on the model's device: codes U8 [rows, cols·bits/8] (4-bit
//! codes two to a byte, the first in the high nibble; 8-bit codes offset by 128) and scales
//! [rows, cols/block] (F16 for Q4_0 and Q8_0, F32 for NF4).

mod codec;
mod format;
mod panels;

use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

pub use format::Quantization;
pub(crate) use panels::Orientation;

use super::low_rank::WithThin;

/// A frozen weight [rows, cols] held quantized; products run in `compute` (the model's dtype:
/// the decoded values are rounded to it, as a dense weight of that dtype would be).
pub struct QuantizedWeight {
    format: Quantization,
    dims: (usize, usize),
    codes: Tensor,
    scales: Tensor,
    compute: DType,
}

impl QuantizedWeight {
    /// Quantizes `w` [rows, cols] (any dtype, any device; encoded on the CPU) into planes on
    /// `device`. `cols` must be a multiple of the format's block.
    pub fn quantize(
        w: &Tensor,
        format: Quantization,
        compute: DType,
        device: &Device,
    ) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let block = format.block();
        if !cols.is_multiple_of(block) {
            bail!("cannot quantize a weight of {cols} columns to {format}: rows must be whole blocks of {block}");
        }
        let values = w
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut codes = vec![0u8; rows * cols / block * format.code_bytes()];
        let mut scales = vec![0f32; rows * cols / block];
        codes
            .par_chunks_mut(format.code_bytes())
            .zip(scales.par_iter_mut())
            .zip(values.par_chunks(block))
            .for_each(|((codes, scale), x)| *scale = codec::encode(format, x, codes));
        Self::from_planes(format, (rows, cols), codes, scales, compute, device)
    }

    /// A weight [rows, cols] from the Q4_0 or Q8_0 blocks a GGUF file stores (rows in order).
    pub fn from_gguf(
        format: Quantization,
        (rows, cols): (usize, usize),
        blocks: &[u8],
        compute: DType,
        device: &Device,
    ) -> Result<Self> {
        let block_bytes = 2 + format.code_bytes();
        let count = rows * cols / format.block();
        if format == Quantization::Nf4
            || !cols.is_multiple_of(format.block())
            || blocks.len() != count * block_bytes
        {
            bail!(
                "{} bytes are not the {format} blocks of a [{rows}, {cols}] weight",
                blocks.len()
            );
        }
        let mut codes = vec![0u8; count * format.code_bytes()];
        let mut scales = vec![0f32; count];
        codes
            .par_chunks_mut(format.code_bytes())
            .zip(scales.par_iter_mut())
            .zip(blocks.par_chunks(block_bytes))
            .for_each(|((codes, scale), b)| *scale = codec::from_gguf(format, b, codes));
        Self::from_planes(format, (rows, cols), codes, scales, compute, device)
    }

    fn from_planes(
        format: Quantization,
        (rows, cols): (usize, usize),
        codes: Vec<u8>,
        scales: Vec<f32>,
        compute: DType,
        device: &Device,
    ) -> Result<Self> {
        let blocks = cols / format.block();
        let codes = Tensor::from_vec(codes, (rows, blocks * format.code_bytes()), device)?;
        // The scales are f16 values already where the format stores f16: the cast is exact.
        let scales = Tensor::from_vec(scales, (rows, blocks), &Device::Cpu)?
            .to_dtype(format.scale_dtype())?
            .to_device(device)?;
        Ok(Self {
            format,
            dims: (rows, cols),
            codes,
            scales,
            compute,
        })
    }

    pub fn format(&self) -> Quantization {
        self.format
    }

    /// (rows, cols) = (out_features, in_features) of the projection.
    pub fn dims(&self) -> (usize, usize) {
        self.dims
    }

    /// The codes, U8 [rows, cols·bits/8].
    pub fn codes(&self) -> &Tensor {
        &self.codes
    }

    /// The scales, [rows, cols/block].
    pub fn scales(&self) -> &Tensor {
        &self.scales
    }

    /// Bytes held: codes and scales.
    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + self.scales.elem_count() * self.scales.dtype().size_in_bytes()
    }

    /// The decoded values, f32 [rows, cols] on the weight's device (exact: each value is one
    /// product of its code's value and its block's scale). A 4-bit format's code bytes look up
    /// their two values in a 256-row table (a cast and a gather, where unpacking the nibbles
    /// took eight ops); Q8_0's are cast and shifted (a gather is slower there).
    pub fn dequantize(&self) -> Result<Tensor> {
        let (rows, cols) = self.dims;
        let block = self.format.block();
        let codes = self.codes.flatten_all()?;
        let values = match codec::byte_pairs(self.format) {
            Some(pairs) => {
                // U32 indices: candle's gather reads its index type's largest value (255 for
                // U8, the byte 0xFF) as a row of zeros.
                let table = Tensor::from_vec(pairs, (256, 2), codes.device())?;
                table.index_select(&codes.to_dtype(DType::U32)?, 0)?
            }
            None => (codes.to_dtype(DType::F32)? - f64::from(codec::Q8_BIAS))?,
        };
        let scales = self.scales.to_dtype(DType::F32)?.unsqueeze(2)?;
        values
            .reshape((rows, cols / block, block))?
            .broadcast_mul(&scales)?
            .reshape((rows, cols))
    }

    /// The weight as a dense tensor in the compute dtype (for products off the CPU).
    pub fn dense(&self) -> Result<Tensor> {
        self.dequantize()?.to_dtype(self.compute)
    }

    /// a·Wᵀ (`Transposed`; a [m, cols]) or a·W (`Plain`; a [m, rows]) for f32 rows `a` on the CPU,
    /// through panels of decoded weight; None where a or the weight is elsewhere or not f32.
    pub(crate) fn cpu_product(
        &self,
        orientation: Orientation,
        a: &CpuStorage,
        la: &Layout,
    ) -> Result<Option<(CpuStorage, Shape)>> {
        let n = self.output_width(orientation);
        self.on_cpu(orientation, (a, la), |planes, a| {
            let m = a.rows;
            let out = panels::product(planes, orientation, self.compute, a);
            Ok(Some((CpuStorage::F32(out), Shape::from((m, n)))))
        })
    }

    /// Whether a LoRA adapter's products on `rows` rows ride in this weight's own products
    /// ([`Self::cpu_product_plus_low_rank`]): a bf16 compute dtype on the CPU where a bf16 kernel
    /// runs the product.
    pub(crate) fn fuses_adapter(&self, rows: usize) -> bool {
        let (out, inp) = self.dims;
        self.compute == DType::BF16
            && self.codes.device().is_cpu()
            && super::matmul::weight_kernel(rows, inp, out, true).is_some()
    }

    /// a·B + (a·U)·V and a·U, with B = Wᵀ or W as in [`Self::cpu_product`], for a LoRA
    /// adapter's `factors` (see [`super::low_rank::Factors`]): its products in the same pass of
    /// the bf16 kernel. None where it does not apply ([`Self::fuses_adapter`]).
    pub(crate) fn cpu_product_plus_low_rank(
        &self,
        orientation: Orientation,
        a: (&CpuStorage, &Layout),
        factors: &super::low_rank::Factors<'_>,
    ) -> Result<Option<WithThin>> {
        let (n, r) = (self.output_width(orientation), factors.u().cols);
        self.on_cpu(orientation, a, |planes, a| {
            let m = a.rows;
            let fused =
                panels::product_plus_low_rank(planes, orientation, self.compute, a, factors);
            Ok(fused.map(|(out, thin)| ((out, Shape::from((m, n))), (thin, Shape::from((m, r))))))
        })
    }

    /// Columns of a product with this weight in `orientation`.
    fn output_width(&self, orientation: Orientation) -> usize {
        match orientation {
            Orientation::Transposed => self.dims.0,
            Orientation::Plain => self.dims.1,
        }
    }

    /// `f` on the weight's planes and f32 rows `a` on the CPU, after checking a's width against
    /// `orientation`; None where a or the weight is elsewhere or not f32.
    fn on_cpu<T>(
        &self,
        orientation: Orientation,
        (a, la): (&CpuStorage, &Layout),
        f: impl FnOnce(&panels::Planes, super::elements::Strided<f32>) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let CpuStorage::F32(a) = a else {
            return Ok(None);
        };
        let (_, k) = la.shape().dims2()?;
        let (rows, cols) = self.dims;
        let inner = match orientation {
            Orientation::Transposed => cols,
            Orientation::Plain => rows,
        };
        if k != inner {
            bail!("quantized product: input has {k} features, the weight expects {inner}");
        }
        let a = super::elements::Strided::of_layout(a.as_slice(), la);
        let (codes, _) = self.codes.storage_and_layout();
        let (scales, _) = self.scales.storage_and_layout();
        let planes = match (&*codes, &*scales) {
            (Storage::Cpu(CpuStorage::U8(codes)), Storage::Cpu(scales)) => panels::Planes {
                format: self.format,
                dims: self.dims,
                codes,
                scales: match scales {
                    CpuStorage::F16(s) => panels::Scales::F16(s),
                    CpuStorage::F32(s) => panels::Scales::F32(s),
                    _ => return Ok(None),
                },
            },
            _ => return Ok(None),
        };
        f(&planes, a)
    }
}
