//! Matrix products for the hot paths (projections, their backward, LoRA, attention, the LM head).
//!
//! On the CPU they run through faer's matmul (pure Rust, runtime-dispatched AVX2/AVX-512 kernels):
//! about three times candle's CPU matmul on the shapes of a LoRA step. Operands may be strided
//! (transposed views cost nothing). bf16 and f16 operands are widened to f32 — the left operand
//! whole, the right one a panel of columns at a time — so the product accumulates in f32 and no
//! full-size f32 copy of a frozen weight ever exists. On other devices the backend's matmul runs.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};
use faer::{Accum, MatMut, MatRef, Par};
use half::{bf16, f16};
use rayon::prelude::*;

use super::elements::{assume_init, gather, narrow_bf16, uninit, Strided};
use super::low_rank::WithThin;
use super::vector_math;
use std::mem::MaybeUninit;

/// a·b for a [..., m, k] and b [..., k, n] with equal leading dims; no gradient flows through it
/// (use it on detached tensors; a tracked operand falls back to candle's differentiable matmul).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.track_op() || b.track_op() {
        return a.matmul(b);
    }
    a.apply_op2_no_bwd(b, &Product { wide: false })
}

/// As [`matmul`], but the product in the dtype reductions run in: f32 for f32, bf16 and f16
/// operands (on the CPU a half-precision product is never rounded to its type and back), f64 for
/// f64 operands. For logits and attention scores, which go on into a softmax.
pub fn matmul_wide(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let wide = super::accumulation_dtype(a.dtype());
    if a.track_op() || b.track_op() || !a.device().is_cpu() {
        return matmul(a, b)?.to_dtype(wide);
    }
    a.apply_op2_no_bwd(b, &Product { wide: true })
}

/// a·b for f32 activations a on the CPU (b f32, bf16 or f16) as an owned f32 buffer, for ops that
/// go on to work on the product in place (the LM head's softmax); None for other operands.
pub(crate) fn cpu_product_f32(a: &Tensor, b: &Tensor) -> Result<Option<Vec<f32>>> {
    if !a.device().is_cpu() || a.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sa, &*sb) else {
        return Ok(None);
    };
    match cpu_product(sa, la, sb, lb, true)?.0 {
        CpuStorage::F32(out) => Ok(Some(out)),
        _ => Ok(None),
    }
}

/// ab + alpha·(c·d) without gradients, for a product ab [m, n] already in an f32 buffer: on the
/// CPU with f32 c and d the second product accumulates into that buffer in place
/// ([`MatmulStorage::plus_product`]); elsewhere they are separate ops.
pub(crate) fn plus_product_f32(
    ab: Vec<f32>,
    shape: Shape,
    (c, d): (&Tensor, &Tensor),
    alpha: f64,
    device: &candle_core::Device,
) -> Result<Tensor> {
    {
        let (sc, lc) = c.storage_and_layout();
        let (sd, ld) = d.storage_and_layout();
        if let (Storage::Cpu(c @ CpuStorage::F32(_)), Storage::Cpu(d @ CpuStorage::F32(_))) =
            (&*sc, &*sd)
        {
            let CpuStorage::F32(sum) =
                CpuStorage::F32(ab).plus_product(&shape, (c, lc), (d, ld), alpha)?
            else {
                candle_core::bail!("plus_product: an f32 sum came back in another dtype");
            };
            return Tensor::from_vec(sum, shape, device);
        }
    }
    let cd = (matmul(c, d)? * alpha)?.to_dtype(candle_core::DType::F32)?;
    Tensor::from_vec(ab, shape, device)? + cd
}

/// Storages that can multiply: the CPU through faer, CUDA through the backend (cuBLAS).
pub trait MatmulStorage: BackendStorage {
    /// a [..., m, k] · b [..., k, n] → a contiguous [..., m, n].
    fn product(&self, la: &Layout, b: &Self, lb: &Layout) -> Result<(Self, Shape)>;

    /// self + alpha·(a·b) for self a contiguous [m, n] (from offset 0), a [m, k], b [k, n], in
    /// self's dtype.
    fn plus_product(
        self,
        shape: &Shape,
        (a, la): (&Self, &Layout),
        (b, lb): (&Self, &Layout),
        alpha: f64,
    ) -> Result<Self> {
        composed_plus_product(self, shape, (a, la), (b, lb), alpha)
    }
}

/// [`MatmulStorage::plus_product`] as separate passes: the product, its scaling and the sum.
fn composed_plus_product<S: MatmulStorage>(
    out: S,
    shape: &Shape,
    (a, la): (&S, &Layout),
    (b, lb): (&S, &Layout),
    alpha: f64,
) -> Result<S> {
    let (ab, ab_shape) = a.product(la, b, lb)?;
    let lab = Layout::contiguous(ab_shape);
    let mut scaled = ab.affine(&lab, alpha, 0.0)?;
    if scaled.dtype() != out.dtype() {
        scaled = scaled.to_dtype(&lab, out.dtype())?;
    }
    out.binary_impl::<candle_core::op::Add>(&scaled, &Layout::contiguous(shape), &lab)
}

impl MatmulStorage for CpuStorage {
    fn product(&self, la: &Layout, b: &Self, lb: &Layout) -> Result<(Self, Shape)> {
        cpu_product(self, la, b, lb, false)
    }

    /// For f32 operands the product accumulates into self in place (one pass, no temporaries).
    fn plus_product(
        self,
        shape: &Shape,
        (a, la): (&Self, &Layout),
        (b, lb): (&Self, &Layout),
        alpha: f64,
    ) -> Result<Self> {
        let (mut out, a32, b32) = match (self, a, b) {
            (CpuStorage::F32(out), CpuStorage::F32(a32), CpuStorage::F32(b32)) => (out, a32, b32),
            (other, _, _) => return composed_plus_product(other, shape, (a, la), (b, lb), alpha),
        };
        let dims = ProductDims::of(la, lb)?;
        let (m, k, n) = (dims.m, dims.k, dims.n);
        if dims.batch != 1 || out.len() != m * n || shape.elem_count() != m * n {
            candle_core::bail!("plus_product: shapes do not fit");
        }
        let (oa, ob) = dims.offsets[0];
        faer::linalg::matmul::matmul(
            MatMut::from_row_major_slice_mut(&mut out, m, n),
            Accum::Add,
            view(a32, oa, m, k, dims.a_strides),
            view(b32, ob, k, n, dims.b_strides),
            alpha as f32,
            dims.parallelism(),
        );
        Ok(CpuStorage::F32(out))
    }
}

#[cfg(feature = "cuda")]
impl MatmulStorage for candle_core::CudaStorage {
    fn product(&self, la: &Layout, b: &Self, lb: &Layout) -> Result<(Self, Shape)> {
        let dims = ProductDims::of(la, lb)?;
        let out = self.matmul(b, (dims.batch, dims.m, dims.n, dims.k), la, lb)?;
        Ok((out, dims.out_shape))
    }
}

/// a·b for an x [n, in] and a weight W [out, in]: x·Wᵀ, [n, out].
pub fn product_transposed<S: MatmulStorage>(
    x: &S,
    lx: &Layout,
    w: &S,
    lw: &Layout,
) -> Result<(S, Shape)> {
    let (_, k) = lx.shape().dims2()?;
    let (_, k_w) = lw.shape().dims2()?;
    if k != k_w {
        candle_core::bail!("linear: input has {k} features, the weight expects {k_w}");
    }
    x.product(lx, w, &lw.transpose(0, 1)?)
}

/// The op behind [`matmul`] and, `wide`, [`matmul_wide`] (CPU only).
struct Product {
    wide: bool,
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_product(a, la, b, lb, self.wide)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        la: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        a.product(la, b, lb)
    }
}

/// The sizes of one (batched) product and where each batch's operands start.
struct ProductDims {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    out_shape: Shape,
    /// Offsets (in elements) of each batch's a and b, in batch order.
    offsets: Vec<(usize, usize)>,
    /// Row and column strides of a and b.
    a_strides: (usize, usize),
    b_strides: (usize, usize),
}

impl ProductDims {
    fn of(la: &Layout, lb: &Layout) -> Result<Self> {
        let (da, db) = (la.dims(), lb.dims());
        let rank = da.len();
        if rank < 2 || db.len() != rank || da[..rank - 2] != db[..rank - 2] {
            candle_core::bail!("matmul: shapes {da:?} and {db:?} do not multiply");
        }
        let (m, k, n) = (da[rank - 2], da[rank - 1], db[rank - 1]);
        if db[rank - 2] != k {
            candle_core::bail!("matmul: shapes {da:?} and {db:?} do not multiply");
        }
        let (sa, sb) = (la.stride(), lb.stride());
        let batch_dims = &da[..rank - 2];
        let batch: usize = batch_dims.iter().product();
        let mut offsets = Vec::with_capacity(batch);
        let mut index = vec![0usize; batch_dims.len()];
        for _ in 0..batch {
            let oa: usize = index.iter().zip(sa).map(|(i, s)| i * s).sum();
            let ob: usize = index.iter().zip(sb).map(|(i, s)| i * s).sum();
            offsets.push((la.start_offset() + oa, lb.start_offset() + ob));
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < batch_dims[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        let mut out_dims = batch_dims.to_vec();
        out_dims.extend([m, n]);
        Ok(Self {
            batch,
            m,
            k,
            n,
            out_shape: Shape::from(out_dims),
            offsets,
            a_strides: (sa[rank - 2], sa[rank - 1]),
            b_strides: (sb[rank - 2], sb[rank - 1]),
        })
    }

    fn flops(&self) -> usize {
        2 * self.batch * self.m * self.k * self.n
    }

    /// Threads for one product of this size: one below [`PARALLEL_FLOPS`], all above.
    fn parallelism(&self) -> Par {
        if self.flops() < PARALLEL_FLOPS {
            Par::Seq
        } else {
            Par::rayon(0)
        }
    }
}

/// Below this many floating-point operations a product runs on one thread (threads cost more than
/// they save). At 2²¹ the tiny model's train step (products of 2–8 MFLOP) ran at 49,000–60,000
/// tokens/s, at 2²³ at 74,000; at 2²⁵ the smol step's adapter products (19–50 MFLOP) lost their
/// second thread (bf16 step 700 → 613 tokens/s).
pub(crate) const PARALLEL_FLOPS: usize = 1 << 23;

/// The product on the CPU; `wide`: half-precision products stay in f32.
fn cpu_product(
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    wide: bool,
) -> Result<(CpuStorage, Shape)> {
    let dims = ProductDims::of(la, lb)?;
    let out = match (a, b) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) if few_rows(&dims) => {
            CpuStorage::F32(row_dots(a, b, &dims))
        }
        (CpuStorage::F32(a), CpuStorage::BF16(b)) if few_rows(&dims) => {
            CpuStorage::F32(row_dots(a, b, &dims))
        }
        (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(products(a, b, &dims)),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(products(a, b, &dims)),
        (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
            let out = bf16_products(a, b, &dims);
            if wide {
                CpuStorage::F32(out)
            } else {
                CpuStorage::BF16(narrow(&out, narrow_bf16))
            }
        }
        (CpuStorage::F16(a), CpuStorage::F16(b)) => {
            let out = widened_products(a, b, &dims);
            if wide {
                CpuStorage::F32(out)
            } else {
                CpuStorage::F16(narrow(&out, f16::from_f32))
            }
        }
        // f32 activations on half-precision weights: the product is f32.
        (CpuStorage::F32(a), CpuStorage::BF16(b)) => CpuStorage::F32(bf16_products(a, b, &dims)),
        (CpuStorage::BF16(a), CpuStorage::F32(b)) => CpuStorage::F32(widened_products(a, b, &dims)),
        (CpuStorage::F32(a), CpuStorage::F16(b)) => CpuStorage::F32(widened_products(a, b, &dims)),
        (CpuStorage::F16(a), CpuStorage::F32(b)) => CpuStorage::F32(widened_products(a, b, &dims)),
        _ => {
            let out = a.matmul(b, (dims.batch, dims.m, dims.n, dims.k), la, lb)?;
            return Ok((out, dims.out_shape));
        }
    };
    Ok((out, dims.out_shape))
}

/// Rows of the left operand up to which a product against a weight runs as dot products.
const FEW_ROWS: usize = 8;

/// A product of a few rows (a decoding step) against a weight stored as Wᵀ with contiguous
/// columns: memory-bound, so it runs as one pass over the weight, split across threads.
fn few_rows(dims: &ProductDims) -> bool {
    dims.batch == 1 && (1..=FEW_ROWS).contains(&dims.m) && dims.b_strides.0 == 1 && dims.k >= 16
}

/// out[i][j] = a[i]·b[:, j] for each of the few rows of a, each column of b contiguous (a row
/// of the weight): every weight element is read once, for all rows; f32 accumulation in 16 lanes.
fn row_dots<W: Widen>(a: &[f32], b: &[W], dims: &ProductDims) -> Vec<f32> {
    let (m, k, n) = (dims.m, dims.k, dims.n);
    let (oa, ob) = dims.offsets[0];
    let mut rows = vec![0f32; m * k];
    for (i, row) in rows.chunks_mut(k).enumerate() {
        gather(row, a, oa + i * dims.a_strides.0, dims.a_strides.1, |v| v);
    }
    // Column-major result [n, m]: each thread writes whole columns.
    let mut by_column = vec![0f32; n * m];
    const COLUMNS: usize = 64;
    by_column
        .par_chunks_mut(COLUMNS * m)
        .enumerate()
        .for_each(|(chunk, out)| {
            for (jj, cell) in out.chunks_mut(m).enumerate() {
                let j = chunk * COLUMNS + jj;
                let start = ob + j * dims.b_strides.1;
                let column = &b[start..start + k];
                W::dots(&rows, column, cell);
            }
        });
    let mut out = vec![0f32; m * n];
    for (j, cell) in by_column.chunks(m).enumerate() {
        for (i, &v) in cell.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// Element types faer multiplies natively.
pub(crate) trait Real:
    faer::traits::ComplexField + faer::traits::Conjugate<Canonical = Self> + Copy + Default
{
    const ONE: Self;
}
impl Real for f32 {
    const ONE: Self = 1.0;
}
impl Real for f64 {
    const ONE: Self = 1.0;
}

/// Output columns per product when a product has many more (the LM head's vocabulary): faer ran
/// x [1024, 576] · Wᵀ for W [49152, 576] in 304 ms whole and in 221 ms in panels of 1,024 columns
/// (512: 224 ms, 2,048: 239 ms, 4,096: 238 ms) on this project's 2-core machine.
const WIDE_PANEL: usize = 1024;

/// Every batch's product of `a` and `b` (laid out as `dims` says) into one contiguous buffer.
fn products<T: Real>(a: &[T], b: &[T], dims: &ProductDims) -> Vec<T> {
    let (m, k, n) = (dims.m, dims.k, dims.n);
    let mut out = uninit::<T>(dims.batch * m * n);
    if m * n == 0 {
        return unsafe { assume_init(out) };
    }
    let one = |dst: &mut [MaybeUninit<T>], (oa, ob): (usize, usize), par: Par| {
        let lhs = view(a, oa, m, k, dims.a_strides);
        // A wide product (the LM head's logits) in panels of columns.
        let panel = if n > 2 * WIDE_PANEL { WIDE_PANEL } else { n };
        for first in (0..n).step_by(panel) {
            let cols = panel.min(n - first);
            let rhs = view(b, ob + first * dims.b_strides.1, k, cols, dims.b_strides);
            // SAFETY: dst holds m rows of n elements; these are columns first..first + cols of
            // them, which faer writes all without reading (Replace).
            let dst = unsafe {
                MatMut::from_raw_parts_mut(
                    dst.as_mut_ptr().cast::<T>().add(first),
                    m,
                    cols,
                    n as isize,
                    1,
                )
            };
            faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, T::ONE, par);
        }
    };
    let threads = rayon::current_num_threads();
    if dims.flops() < PARALLEL_FLOPS || threads == 1 {
        for (dst, &o) in out.chunks_mut(m * n).zip(&dims.offsets) {
            one(dst, o, Par::Seq);
        }
    } else if dims.batch >= threads && dims.flops() / dims.batch < 8 * PARALLEL_FLOPS {
        // Many small products: one per thread at a time.
        out.par_chunks_mut(m * n)
            .zip(dims.offsets.par_iter())
            .for_each(|(dst, &o)| one(dst, o, Par::Seq));
    } else {
        for (dst, &o) in out.chunks_mut(m * n).zip(&dims.offsets) {
            one(dst, o, Par::rayon(0));
        }
    }
    // SAFETY: every batch's product was written whole.
    unsafe { assume_init(out) }
}

/// A strided view of `rows` × `cols` elements of `data` starting at `offset`.
pub(crate) fn view<T>(
    data: &[T],
    offset: usize,
    rows: usize,
    cols: usize,
    (rs, cs): (usize, usize),
) -> MatRef<'_, T> {
    let last = offset + rows.saturating_sub(1) * rs + cols.saturating_sub(1) * cs;
    assert!(
        rows == 0 || cols == 0 || last < data.len(),
        "matmul: view out of bounds"
    );
    unsafe {
        MatRef::from_raw_parts(
            data[offset..].as_ptr(),
            rows,
            cols,
            rs as isize,
            cs as isize,
        )
    }
}

/// Element types multiplied in f32: f32 itself, or a half type widened on the fly.
trait Widen: Copy + Sync {
    fn widen(self) -> f32;
    /// The elements as f32, when they are f32 already (no copy needed).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// x_i·w in f32 for each of the `out.len()` rows x_i of x, w widened on the fly: through the
    /// AVX-512/AVX2 kernels of [`vector_math::dots`] for f32 and bf16 weights (the same sums in
    /// the same order on every variant).
    fn dots(x: &[f32], w: &[Self], out: &mut [f32]) {
        vector_math::lane_dots(x, w, out, Self::widen)
    }
}

impl Widen for f32 {
    #[inline]
    fn widen(self) -> f32 {
        self
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn dots(x: &[f32], w: &[f32], out: &mut [f32]) {
        vector_math::dots(x, w, out)
    }
}

impl Widen for bf16 {
    /// Exact: a bf16 is the upper half of an f32's bits.
    #[inline]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn dots(x: &[f32], w: &[bf16], out: &mut [f32]) {
        vector_math::dots_bf16(x, w, out)
    }
}

impl Widen for f16 {
    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

/// Rounds an f32 buffer to a half type, in parallel for large buffers.
fn narrow<H: Copy + Send + Default>(src: &[f32], one: fn(f32) -> H) -> Vec<H> {
    let mut out = vec![H::default(); src.len()];
    let work = |(d, s): (&mut [H], &[f32])| {
        for (d, s) in d.iter_mut().zip(s) {
            *d = one(*s);
        }
    };
    const CHUNK: usize = 1 << 16;
    if src.len() > CHUNK {
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(work);
    } else {
        work((&mut out, src));
    }
    out
}

/// Below this many multiply-adds a product with bf16 weights is widened to f32 rather than run
/// on a bf16 kernel (packing both operands costs more than it saves).
const BF16_KERNEL_MIN_FLOPS: usize = 1 << 22;

/// The bf16 kernel (AMX tiles, or AVX512_BF16 without them) that a product of these sizes with a
/// bf16 right operand runs on; None: it is widened to f32.
fn bf16_kernel(dims: &ProductDims) -> Option<super::amx::Bf16Kernel> {
    if dims.flops() / dims.batch.max(1) < BF16_KERNEL_MIN_FLOPS {
        return None;
    }
    super::amx::bf16_kernel()
}

/// Products with a bf16 right operand (the weights): on a bf16 kernel (AMX tiles or AVX512_BF16)
/// where the CPU has one and the product is large enough, else widened to f32.
fn bf16_products<A: Widen + super::elements::ToBf16>(
    a: &[A],
    b: &[bf16],
    dims: &ProductDims,
) -> Vec<f32> {
    let Some(kernel) = bf16_kernel(dims) else {
        return widened_products(a, b, dims);
    };
    let (m, k, n) = (dims.m, dims.k, dims.n);
    let mut out = uninit::<f32>(dims.batch * m * n);
    for (dst, &(oa, ob)) in out.chunks_mut((m * n).max(1)).zip(&dims.offsets) {
        let rhs = Strided::new(b, ob, (k, n), dims.b_strides);
        super::amx::product(
            kernel,
            Strided::new(a, oa, (m, k), dims.a_strides),
            rhs,
            dst,
        );
    }
    // SAFETY: the bf16 kernel writes every element of each batch's output.
    unsafe { assume_init(out) }
}

/// The bf16 kernel a product of f32 rows a [m, k] with a bf16 weight b [k, n] runs on, or None
/// where it is widened to f32: a product too small to gain, no kernel on this CPU, or a few rows
/// against a weight stored as Wᵀ (`transposed`: b's columns contiguous), which run as dot products.
pub(crate) fn weight_kernel(
    m: usize,
    k: usize,
    n: usize,
    transposed: bool,
) -> Option<super::amx::Bf16Kernel> {
    if 2 * m * k * n < BF16_KERNEL_MIN_FLOPS || (m <= FEW_ROWS && transposed && k >= 16) {
        return None;
    }
    super::amx::bf16_kernel()
}

/// a·b for f32 activations a [m, k] and a bf16 weight b [k, n] on the CPU through a bf16 kernel,
/// with b packed once into `packed` (filled on first use; it must only ever see this same b).
/// None where no kernel applies (other dtypes, no bf16 kernel, a product too small to gain).
pub(crate) fn cpu_packed_product(
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    packed: &std::sync::OnceLock<super::amx::PackedRhs>,
) -> Result<Option<(Vec<f32>, Shape)>> {
    let Some(product) = PackedProduct::of((a, la), (b, lb), packed)? else {
        return Ok(None);
    };
    let mut out = uninit::<f32>(product.lhs.rows * product.rhs.dims().1);
    super::amx::product_packed(product.kernel, product.lhs, product.rhs, &mut out);
    // SAFETY: the bf16 kernel writes every element.
    Ok(Some((unsafe { assume_init(out) }, product.shape)))
}

/// a·b for f32 activations a [m, k] and a bf16 weight b [k, n] packed into `packed` as
/// [`cpu_packed_product`] packs it, reduced block by block instead of stored (see
/// [`super::amx::product_folded`]): one state per thread. None where the product does not run on
/// a bf16 kernel (or, on AMX tiles, not in one pass).
pub(crate) fn cpu_packed_product_folded<S: Send>(
    (a, la): (&CpuStorage, &Layout),
    (b, lb): (&CpuStorage, &Layout),
    packed: &std::sync::OnceLock<super::amx::PackedRhs>,
    init: impl Fn() -> S + Sync,
    fold: impl Fn(&mut S, super::amx::ProductBlock<'_>) + Sync,
) -> Result<Option<Vec<S>>> {
    let Some(product) = PackedProduct::of((a, la), (b, lb), packed)? else {
        return Ok(None);
    };
    Ok(super::amx::product_folded(
        product.kernel,
        product.lhs,
        product.rhs,
        init,
        fold,
    ))
}

/// a·b + (a·U)·V and a·U for f32 activations a [m, k], a bf16 weight b [k, n] packed into
/// `packed` as [`cpu_packed_product`] packs it, and a LoRA adapter's `factors` (see
/// [`super::low_rank::Factors`]): the adapter's products in the frozen product's pass. None where
/// no bf16 kernel applies.
pub(crate) fn cpu_packed_plus_low_rank(
    (a, la): (&CpuStorage, &Layout),
    (b, lb): (&CpuStorage, &Layout),
    packed: &std::sync::OnceLock<super::amx::PackedRhs>,
    factors: &super::low_rank::Factors<'_>,
) -> Result<Option<WithThin>> {
    let Some(product) = PackedProduct::of((a, la), (b, lb), packed)? else {
        return Ok(None);
    };
    let (out, thin) =
        super::low_rank::plus_low_rank(product.kernel, product.lhs, product.rhs, factors);
    let r = factors.u().cols;
    Ok(Some((
        (out, product.shape),
        (thin, Shape::from((product.lhs.rows, r))),
    )))
}

/// The operands of a product of f32 activations with a packed bf16 weight, where a bf16 kernel
/// applies to it.
struct PackedProduct<'s, 'p> {
    kernel: super::amx::Bf16Kernel,
    lhs: Strided<'s, f32>,
    rhs: &'p super::amx::PackedRhs,
    shape: Shape,
}

impl<'s, 'p> PackedProduct<'s, 'p> {
    /// a [m, k] · b [k, n] with b packed into `packed` on first use; None for other dtypes, a
    /// batch, no bf16 kernel, or a product too small to gain.
    fn of(
        (a, la): (&'s CpuStorage, &Layout),
        (b, lb): (&CpuStorage, &Layout),
        packed: &'p std::sync::OnceLock<super::amx::PackedRhs>,
    ) -> Result<Option<Self>> {
        let (CpuStorage::F32(a), CpuStorage::BF16(b)) = (a, b) else {
            return Ok(None);
        };
        let dims = ProductDims::of(la, lb)?;
        let (m, k, n) = (dims.m, dims.k, dims.n);
        let kernel = match weight_kernel(m, k, n, dims.b_strides.0 == 1) {
            Some(kernel) if dims.batch == 1 => kernel,
            _ => return Ok(None),
        };
        let (oa, ob) = dims.offsets[0];
        let rhs = packed.get_or_init(|| {
            super::amx::PackedRhs::new(&Strided::new(b, ob, (k, n), dims.b_strides))
        });
        if rhs.dims() != (k, n) {
            candle_core::bail!(
                "packed weight: packed as {:?}, used as {:?}",
                rhs.dims(),
                (k, n)
            );
        }
        Ok(Some(Self {
            kernel,
            lhs: Strided::new(a, oa, (m, k), dims.a_strides),
            rhs,
            shape: dims.out_shape,
        }))
    }
}

/// Lines (columns or rows) of a half-precision right operand widened to f32 at a time, each of
/// `len` elements: a panel of at most 4 MB.
fn panel_lines(len: usize) -> usize {
    ((1usize << 20) / len.max(1)).max(64)
}

/// The products of operands of which at least one is half precision, computed in f32: each
/// batch's a widened whole (or used in place when f32), b in place when f32, else widened a panel
/// at a time. Where b's rows are contiguous (a weight W in g·W), a panel is a run of whole rows,
/// the chunks of k adding up in the output; otherwise it is a run of columns (each contiguous
/// when b is a weight's transpose, as in x·Wᵀ). A strided panel of a tall b (the LM head's
/// W [vocab, hidden] in its input gradient) would be narrow: 64 columns gathered element by
/// element, each a thin product over the whole vocabulary.
fn widened_products<A: Widen, B: Widen>(a: &[A], b: &[B], dims: &ProductDims) -> Vec<f32> {
    let (m, k, n) = (dims.m, dims.k, dims.n);
    let mut out = uninit::<f32>(dims.batch * m * n);
    if m * n == 0 {
        return unsafe { assume_init(out) };
    }
    let par = dims.parallelism();
    let (rs, cs) = dims.b_strides;
    let by_rows = B::as_f32(b).is_none() && cs == 1 && rs != 1 && k > 0;
    // Rows per panel when `by_rows`, else columns per panel.
    let lines = match B::as_f32(b) {
        Some(_) => n,
        None if by_rows => panel_lines(n).min(k),
        // Columns in panels no wider than f32 products take (the LM head's logits).
        None => panel_lines(k).min(n).min(WIDE_PANEL),
    };
    let mut a32 = vec![0f32; if A::as_f32(a).is_some() { 0 } else { m * k }];
    let panel = match (B::as_f32(b), by_rows) {
        (Some(_), _) => 0,
        (None, true) => lines * n,
        (None, false) => lines * k,
    };
    let mut b32 = vec![0f32; panel];
    for (dst, &(oa, ob)) in out.chunks_mut(m * n).zip(&dims.offsets) {
        let lhs = match A::as_f32(a) {
            Some(a) => view(a, oa, m, k, dims.a_strides),
            None => {
                let (ars, acs) = dims.a_strides;
                widen_lines(&mut a32, k, a, (oa, ars, acs));
                unsafe { MatRef::from_raw_parts(a32.as_ptr(), m, k, k as isize, 1) }
            }
        };
        if by_rows {
            // Rows first..first + rows of b, [rows, n] row-major, times those columns of a.
            for first in (0..k).step_by(lines) {
                let rows = lines.min(k - first);
                widen_lines(&mut b32[..rows * n], n, b, (ob + first * rs, rs, 1));
                let rhs = unsafe { MatRef::from_raw_parts(b32.as_ptr(), rows, n, n as isize, 1) };
                // SAFETY: the m × n output; the first chunk writes it all without reading
                // (Replace), the others add to it.
                let dst = unsafe {
                    MatMut::from_raw_parts_mut(dst.as_mut_ptr().cast(), m, n, n as isize, 1)
                };
                let accum = if first == 0 {
                    Accum::Replace
                } else {
                    Accum::Add
                };
                faer::linalg::matmul::matmul(dst, accum, lhs.subcols(first, rows), rhs, 1f32, par);
            }
            continue;
        }
        let mut start = 0;
        while start < n {
            let cols = lines.min(n - start);
            let rhs = match B::as_f32(b) {
                Some(b) => view(b, ob + start * cs, k, cols, (rs, cs)),
                None => {
                    // Column-major panel: each column of b (often a row of a weight) is contiguous.
                    widen_lines(&mut b32[..k * cols], k, b, (ob + start * cs, cs, rs));
                    unsafe { MatRef::from_raw_parts(b32.as_ptr(), k, cols, 1, k as isize) }
                }
            };
            // SAFETY: columns start..start + cols of the m × n output; faer writes them all
            // without reading (Replace).
            let dst = unsafe {
                MatMut::from_raw_parts_mut(dst[start..].as_mut_ptr().cast(), m, cols, n as isize, 1)
            };
            faer::linalg::matmul::matmul(dst, Accum::Replace, lhs, rhs, 1f32, par);
            start += cols;
        }
    }
    // SAFETY: the panels cover every column of every batch's output.
    unsafe { assume_init(out) }
}

/// Widens `src` into `dst` in lines of `len` elements: line i from `start + i·line_stride`, its
/// elements `step` apart. In parallel for a large panel.
fn widen_lines<B: Widen>(
    dst: &mut [f32],
    len: usize,
    src: &[B],
    (start, line_stride, step): (usize, usize, usize),
) {
    if len == 0 {
        return;
    }
    let one = |(i, line): (usize, &mut [f32])| {
        gather(line, src, start + i * line_stride, step, B::widen);
    };
    if dst.len() >= 1 << 16 {
        dst.par_chunks_mut(len).enumerate().for_each(one);
    } else {
        dst.chunks_mut(len).enumerate().for_each(one);
    }
}
