//! A frozen product and a LoRA adapter's share of it in one pass of the bf16 kernels:
//! left·W + (left·U)·V, with W a packed frozen weight and U, V the adapter's thin factors (x·Wᵀ +
//! s·(x·Aᵀ)·Bᵀ forward, g·W + s·(g·B)·A for the input gradient).
//!
//! Run as separate f32 products, the adapter's four thin products each stream an activation or
//! gradient of [tokens, features] from memory once more, and together took about as long as the
//! frozen products themselves. Here the rows of `left`, rounded to bf16 for the frozen product
//! anyway, also give left·U on the tiles (a single column block); its bf16 rows are appended to
//! them as 32 more columns of k, and V's rows to W's as one more packed part, so that the
//! adapter's update is summed in the frozen product's own tile loop. As under PyTorch's autocast,
//! the adapter's products then take bf16 operands (accumulating in f32); the factors themselves,
//! their gradients and optimizer state stay f32.

use candle_core::{CpuStorage, Layout, Result, Shape};

use super::amx::{pack_rows, product_parts, Bf16Kernel, PackedRhs, K_STEP};
use super::elements::{assume_init, uninit, RhsPart, Strided};
use super::vector_math::bf16_bits;

/// A product left·W + (left·U)·V and its thin part left·U, each row-major f32 with its shape.
pub(crate) type WithThin = ((Vec<f32>, Shape), (Vec<f32>, Shape));

/// left·W + (left·U)·V and left·U, for f32 rows `left` [m, k], a weight W [k, n] packed for the
/// bf16 kernels, U [k, r] and V [r, n]; the second product's left operand is left·U rounded to
/// bf16. Both results are row-major f32.
pub(crate) fn plus_low_rank(
    kernel: Bf16Kernel,
    left: Strided<'_, f32>,
    w: &PackedRhs,
    u: Strided<'_, f32>,
    v: Strided<'_, f32>,
) -> (Vec<f32>, Vec<f32>) {
    let (m, n) = (left.rows, w.dims().1);
    assert!(
        w.dims().0 == left.cols && v.cols == n,
        "low-rank product: shapes do not fit"
    );
    let low = LowRank::new(kernel, left, u, v);
    let mut out = uninit(m * n);
    product_parts(
        kernel,
        low.rows(),
        &[w.part(), low.v_part(0)],
        (m, n),
        &mut out,
    );
    // SAFETY: the kernel writes every element of the m × n product.
    (unsafe { assume_init(out) }, low.into_thin())
}

/// The operands a product left·W + (left·U)·V shares whatever W is (dense and packed once, or
/// decoded a panel at a time): left's bf16 rows with bf16(left·U) after its k columns, left·U
/// itself, and V packed as the right operand's last part.
pub(crate) struct LowRank {
    /// [round_up(m, 32), lda] bf16: left's k values and padding to a whole tile, then left·U's r
    /// values and padding.
    rows: Vec<u16>,
    lda: usize,
    /// left·U [m, r], f32.
    thin: Vec<f32>,
    v: PackedRhs,
}

impl LowRank {
    /// Packs `left` [m, k] with room for r more columns, computes left·U for U [k, r] on `kernel`
    /// (one column block) into them, and packs V [r, n].
    pub(crate) fn new(
        kernel: Bf16Kernel,
        left: Strided<'_, f32>,
        u: Strided<'_, f32>,
        v: Strided<'_, f32>,
    ) -> Self {
        let (m, k, r) = (left.rows, left.cols, u.cols);
        assert!(
            u.rows == k && v.rows == r && r > 0,
            "low-rank product: shapes do not fit"
        );
        let kp = k.max(1).next_multiple_of(K_STEP);
        let lda = kp + r.next_multiple_of(K_STEP);
        let mut rows = pack_rows(&left, lda);
        let mut thin = uninit(m * r);
        product_parts(
            kernel,
            (&rows, lda),
            &[PackedRhs::new(&u).part()],
            (m, r),
            &mut thin,
        );
        // SAFETY: the kernel writes every element of the m × r product.
        let thin = unsafe { assume_init(thin) };
        for (row, values) in rows.chunks_mut(lda).zip(thin.chunks(r)) {
            for (dst, v) in row[kp..kp + r].iter_mut().zip(values) {
                *dst = bf16_bits(*v);
            }
        }
        Self {
            rows,
            lda,
            thin,
            v: PackedRhs::new(&v),
        }
    }

    /// The packed rows and their length, the kernels' left operand.
    pub(crate) fn rows(&self) -> (&[u16], usize) {
        (&self.rows, self.lda)
    }

    /// V's columns from `first` (a multiple of 32) on, the last part of the right operand.
    pub(crate) fn v_part(&self, first: usize) -> RhsPart<'_> {
        self.v.part_from(first)
    }

    /// left·U [m, r].
    pub(crate) fn into_thin(self) -> Vec<f32> {
        self.thin
    }
}

/// A LoRA adapter's factors as [`LowRank`] takes them: U [k, r] in place, V [r, n] scaled by
/// alpha into a small row-major copy.
pub(crate) struct Factors<'a> {
    u: Strided<'a, f32>,
    v: Vec<f32>,
    n: usize,
}

impl<'a> Factors<'a> {
    /// U and alpha·V from f32 CPU storages (any strides); None for other dtypes.
    pub(crate) fn of(
        (u, lu): (&'a CpuStorage, &Layout),
        (v, lv): (&CpuStorage, &Layout),
        alpha: f64,
    ) -> Result<Option<Self>> {
        let (CpuStorage::F32(u), CpuStorage::F32(v)) = (u, v) else {
            return Ok(None);
        };
        let ((k, r), (rv, n)) = (lu.shape().dims2()?, lv.shape().dims2()?);
        if rv != r {
            candle_core::bail!("low-rank product: U [{k}, {r}] and V [{rv}, {n}] do not fit");
        }
        let v = strided(v, lv);
        let scaled = (0..r * n)
            .map(|i| alpha as f32 * v.at(i / n, i % n))
            .collect();
        Ok(Some(Self {
            u: strided(u, lu),
            v: scaled,
            n,
        }))
    }

    pub(crate) fn u(&self) -> Strided<'a, f32> {
        self.u
    }

    pub(crate) fn v(&self) -> Strided<'_, f32> {
        let r = self.u.cols;
        Strided {
            data: &self.v,
            offset: 0,
            rows: r,
            cols: self.n,
            strides: (self.n, 1),
        }
    }
}

/// A 2-d layout's view of `data`.
fn strided<'a>(data: &'a [f32], l: &Layout) -> Strided<'a, f32> {
    let d = l.dims();
    Strided {
        data,
        offset: l.start_offset(),
        rows: d[0],
        cols: d[1],
        strides: (l.stride()[0], l.stride()[1]),
    }
}
