//! A frozen weight W [out, in] of the base model (a projection or the LM head) together with the
//! packed operands its products reuse.
//!
//! On CPUs with AMX or AVX512_BF16, a product with a bf16 weight first packs the weight into the
//! kernels' pair-interleaved layout;
//! for a batch of a thousand rows that costs about as much as the product itself. The weight never
//! changes, so each orientation is packed once, on first use, and kept: Wᵀ for the forward x·Wᵀ
//! and W for the input gradient g·W. Elsewhere (f32 weights, neither kernel, CUDA, decoding steps of a
//! few rows) the products run as before and nothing is packed.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor};

use super::amx::PackedRhs;
use super::low_rank::{Factors, WithThin};
use super::matmul::{
    cpu_packed_plus_low_rank, cpu_packed_product, cpu_packed_product_folded, cpu_product_f32,
    matmul, plus_product_f32, product_transposed, weight_kernel,
};
use super::quant::Orientation;

/// A frozen weight and its packed forms (shared by clones).
#[derive(Clone)]
pub struct FrozenWeight {
    tensor: Tensor,
    packs: Arc<Packs>,
}

/// The packed orientations of one weight, each made on first use.
#[derive(Default)]
struct Packs {
    /// Wᵀ [in, out], the right operand of x·Wᵀ.
    transposed: OnceLock<PackedRhs>,
    /// W [out, in], the right operand of g·W.
    plain: OnceLock<PackedRhs>,
}

impl FrozenWeight {
    pub fn new(tensor: Tensor) -> Self {
        Self {
            tensor,
            packs: Arc::default(),
        }
    }

    /// The weight as stored, [out, in].
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// x·Wᵀ for x [n, in] on the CPU: through the packed weight where the bf16 kernel (AMX or
    /// AVX512_BF16) applies, else as any product.
    pub(crate) fn cpu_forward(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w, lw) = self.tensor.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            candle_core::bail!("frozen weight: the input is on the CPU, the weight is not");
        };
        match self.cpu_transposed_product((x, lx), (w, lw))? {
            Some(product) => Ok(product),
            None => product_transposed(x, lx, w, lw),
        }
    }

    /// x·Wᵀ for x [n, in] on a GPU.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_forward(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, lw) = self.tensor.storage_and_layout();
        let Storage::Cuda(w) = &*w else {
            candle_core::bail!("frozen weight: the input is on a GPU, the weight is not");
        };
        product_transposed(x, lx, w, lw)
    }

    /// x·Wᵀ on CPU storages, `w` being this weight's storage, through the packed weight where the
    /// bf16 kernel (AMX or AVX512_BF16) applies; None where it does not.
    fn cpu_transposed_product(
        &self,
        (x, lx): (&CpuStorage, &Layout),
        (w, lw): (&CpuStorage, &Layout),
    ) -> Result<Option<(CpuStorage, Shape)>> {
        let product = cpu_packed_product(x, lx, w, &lw.transpose(0, 1)?, &self.packs.transposed)?;
        Ok(product.map(|(out, shape)| (CpuStorage::F32(out), shape)))
    }

    /// x·Wᵀ for f32 activations x [n, in] on the CPU as an owned f32 buffer [n, out] (for ops that
    /// work on the product in place, such as the LM head's softmax); None for other operands.
    pub fn transposed_product_f32(&self, x: &Tensor) -> Result<Option<Vec<f32>>> {
        match self.on_cpu(x, |x, w| self.cpu_transposed_product(x, w))? {
            Some((CpuStorage::F32(out), _)) => Ok(Some(out)),
            _ => cpu_product_f32(x, &self.tensor.t()?),
        }
    }

    /// x·Wᵀ for f32 activations x [n, in] on the CPU's bf16 kernel, reduced block by block instead
    /// of stored (the LM head's log-sum-exp without its logits): each thread folds the blocks it
    /// computes into its own state, as [`super::amx::product_folded`] says; None where the
    /// product does not run on a bf16 kernel (on AMX tiles: in one pass).
    pub(crate) fn transposed_product_folded<S: Send>(
        &self,
        x: &Tensor,
        init: impl Fn() -> S + Sync,
        fold: impl Fn(&mut S, super::amx::ProductBlock<'_>) + Sync,
    ) -> Result<Option<Vec<S>>> {
        self.on_cpu(x, |x, (w, lw)| {
            let wt = lw.transpose(0, 1)?;
            cpu_packed_product_folded(x, (w, &wt), &self.packs.transposed, init, fold)
        })
    }

    /// g·W for g [n, out], without gradients: the input gradient of x·Wᵀ. f32 for an f32 g.
    pub fn times(&self, g: &Tensor) -> Result<Tensor> {
        match self.cpu_times(g)? {
            Some((out, shape)) => Tensor::from_vec(out, shape, g.device()),
            None => matmul(g, &self.tensor),
        }
    }

    /// g·W + alpha·(c·d) without gradients; on the CPU the second product accumulates into the
    /// first one's buffer.
    pub fn times_plus(&self, g: &Tensor, (c, d): (&Tensor, &Tensor), alpha: f64) -> Result<Tensor> {
        let shape = Shape::from((g.dim(0)?, self.tensor.dim(1)?));
        let gw = match self.cpu_times(g)? {
            Some((out, _)) => Some(out),
            None => cpu_product_f32(g, &self.tensor)?,
        };
        match gw {
            Some(out) => plus_product_f32(out, shape, (c, d), alpha, g.device()),
            None => {
                let cd = (matmul(c, d)? * alpha)?.to_dtype(g.dtype())?;
                matmul(g, &self.tensor)?.to_dtype(cd.dtype())? + cd
            }
        }
    }

    /// Whether a LoRA adapter's products on `rows` rows ride in this weight's own products
    /// ([`Self::cpu_plus_low_rank`]): a bf16 weight on the CPU where a bf16 kernel runs them.
    pub fn fuses_adapter(&self, rows: usize) -> bool {
        let (out, inp) = (self.tensor.dims()[0], self.tensor.dims()[1]);
        self.tensor.dtype() == candle_core::DType::BF16
            && self.tensor.device().is_cpu()
            && weight_kernel(rows, inp, out, true).is_some()
    }

    /// left·B + (left·U)·V and left·U, with B = Wᵀ ([`Orientation::Transposed`]: the forward, x
    /// [n, in], U = Aᵀ, V = scale·Bᵀ) or W ([`Orientation::Plain`]: the input gradient, g
    /// [n, out], U = B, V = scale·A or none), for f32 rows and a LoRA adapter's `factors`, in one
    /// pass of the bf16 kernel through the packed weight; None where it does not apply
    /// ([`Self::fuses_adapter`]).
    pub(crate) fn cpu_plus_low_rank(
        &self,
        orientation: Orientation,
        left: (&CpuStorage, &Layout),
        factors: &Factors<'_>,
    ) -> Result<Option<WithThin>> {
        let (w, lw) = self.tensor.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            return Ok(None);
        };
        let (layout, packed) = match orientation {
            Orientation::Transposed => (lw.transpose(0, 1)?, &self.packs.transposed),
            Orientation::Plain => (lw.clone(), &self.packs.plain),
        };
        cpu_packed_plus_low_rank(left, (w, &layout), packed, factors)
    }

    /// g·W through the packed weight where a bf16 kernel applies.
    fn cpu_times(&self, g: &Tensor) -> Result<Option<(Vec<f32>, Shape)>> {
        self.on_cpu(g, |g, w| {
            cpu_packed_product(g.0, g.1, w.0, w.1, &self.packs.plain)
        })
    }

    /// `f` on the CPU storages of `x` and this weight; None when either is elsewhere.
    fn on_cpu<T>(
        &self,
        x: &Tensor,
        f: impl FnOnce((&CpuStorage, &Layout), (&CpuStorage, &Layout)) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let (sx, lx) = x.storage_and_layout();
        let (sw, lw) = self.tensor.storage_and_layout();
        match (&*sx, &*sw) {
            (Storage::Cpu(x), Storage::Cpu(w)) => f((x, lx), (w, lw)),
            _ => Ok(None),
        }
    }
}
