//! A frozen product and a LoRA adapter's share of it in one pass of the bf16 kernels:
//! left·W + (left·U)·V, with W a packed frozen weight and U, V the adapter's thin factors (x·Wᵀ +
//! s·(x·Aᵀ)·Bᵀ forward, g·W + s·(g·B)·A for the input gradient).
//!
//! Run as separate f32 products, the adapter's four thin products each stream an activation or
//! gradient of [tokens, features] from memory once more, and together took about as long as the
//! frozen products themselves. Here the rows of `left`, rounded to bf16 for the frozen product
//! anyway, also give left·U on the tiles (a single column block); its bf16 rows are appended to
//! them as 32 more columns of k, and V's rows to W's as one more packed part, so that the
//! adapter's update is summed in the frozen product's own tile loop. Under dropout, x·Aᵀ is
//! (x⊙M)·Aᵀ from rows of its own, and the input gradient's masked update is summed apart. As under
//! PyTorch's autocast, the adapter's products then take bf16 operands (accumulating in f32); the
//! factors themselves, their gradients and optimizer state stay f32.

use candle_core::{CpuStorage, Layout, Result, Shape};

use super::amx::{pack_rows, product_parts, Bf16Kernel, PackedRhs, K_STEP};
use super::elements::{assume_init, uninit, RhsPart, Strided};
use super::vector_math::bf16_bits;

/// A product left·W + (left·U)·V and its thin part left·U, each row-major f32 with its shape.
pub(crate) type WithThin = ((Vec<f32>, Shape), (Vec<f32>, Shape));

/// left·W + (left·U)·V and left·U, for f32 rows `left` [m, k], a weight W [k, n] packed for the
/// bf16 kernels and the adapter's `factors` (U [k, r], V [r, n] or none, and U's own rows if
/// they are not `left`); the second product's left operand is left·U rounded to bf16. Both
/// results are row-major f32.
pub(crate) fn plus_low_rank(
    kernel: Bf16Kernel,
    left: Strided<'_, f32>,
    w: &PackedRhs,
    factors: &Factors<'_>,
) -> (Vec<f32>, Vec<f32>) {
    let (m, n) = (left.rows, w.dims().1);
    assert!(
        w.dims().0 == left.cols && factors.v().is_none_or(|v| v.cols == n),
        "low-rank product: shapes do not fit"
    );
    let low = LowRank::new(kernel, left, factors);
    let mut parts = vec![w.part()];
    parts.extend(low.v_part(0));
    let mut out = uninit(m * n);
    product_parts(kernel, low.rows(), &parts, (m, n), &mut out);
    // SAFETY: the kernel writes every element of the m × n product.
    (unsafe { assume_init(out) }, low.into_thin())
}

/// The operands a product left·W + (left·U)·V shares whatever W is (dense and packed once, or
/// decoded a panel at a time): left's bf16 rows with bf16(left·U) after its k columns, left·U
/// itself, and V packed as the right operand's last part. Without V, only left·U rides along
/// (under dropout the masked update is summed apart); with the adapter's own input rows (x⊙M),
/// U multiplies those instead of left.
pub(crate) struct LowRank {
    /// [round_up(m, 32), lda] bf16: left's k values and padding to a whole tile, then, with V,
    /// left·U's r values and padding.
    rows: Vec<u16>,
    lda: usize,
    /// left·U [m, r], f32.
    thin: Vec<f32>,
    v: Option<PackedRhs>,
}

impl LowRank {
    /// Packs `left` [m, k] (with room for r more columns when there is a V), computes the thin
    /// product of U [k, r] on `kernel` (one column block), appends it to the rows and packs
    /// V [r, n].
    pub(crate) fn new(kernel: Bf16Kernel, left: Strided<'_, f32>, factors: &Factors<'_>) -> Self {
        let (u, v) = (factors.u(), factors.v());
        let (m, k, r) = (left.rows, left.cols, u.cols);
        assert!(
            u.rows == k && v.is_none_or(|v| v.rows == r) && r > 0,
            "low-rank product: shapes do not fit"
        );
        let kp = k.max(1).next_multiple_of(K_STEP);
        let lda = match v {
            Some(_) => kp + r.next_multiple_of(K_STEP),
            None => kp,
        };
        let mut rows = pack_rows(&left, lda);
        let mut thin = uninit(m * r);
        let own_rows = factors.input.map(|input| {
            assert!(
                (input.rows, input.cols) == (m, k),
                "low-rank product: the adapter's input does not fit"
            );
            pack_rows(&input, kp)
        });
        let thin_rows = match &own_rows {
            Some(own) => (&own[..], kp),
            None => (&rows[..], lda),
        };
        product_parts(
            kernel,
            thin_rows,
            &[PackedRhs::new(&u).part()],
            (m, r),
            &mut thin,
        );
        // SAFETY: the kernel writes every element of the m × r product.
        let thin = unsafe { assume_init(thin) };
        if v.is_some() {
            for (row, values) in rows.chunks_mut(lda).zip(thin.chunks(r)) {
                for (dst, v) in row[kp..kp + r].iter_mut().zip(values) {
                    *dst = bf16_bits(*v);
                }
            }
        }
        Self {
            rows,
            lda,
            thin,
            v: v.map(|v| PackedRhs::new(&v)),
        }
    }

    /// The packed rows and their length, the kernels' left operand.
    pub(crate) fn rows(&self) -> (&[u16], usize) {
        (&self.rows, self.lda)
    }

    /// V's columns from `first` (a multiple of 32) on, the last part of the right operand; none
    /// without V.
    pub(crate) fn v_part(&self, first: usize) -> Option<RhsPart<'_>> {
        self.v.as_ref().map(|v| v.part_from(first))
    }

    /// left·U [m, r].
    pub(crate) fn into_thin(self) -> Vec<f32> {
        self.thin
    }
}

/// A LoRA adapter's share of a product, as [`LowRank`] takes it: U [k, r] in place; alpha·V
/// [r, n] in a small row-major copy, or none when only left·U is wanted; and the rows U
/// multiplies where they are not the product's own (the adapter's input x⊙M under dropout).
pub(crate) struct Factors<'a> {
    u: Strided<'a, f32>,
    v: Option<(Vec<f32>, usize)>,
    input: Option<Strided<'a, f32>>,
}

impl<'a> Factors<'a> {
    /// U, alpha·V and the adapter's own input from f32 CPU storages (any strides); None for
    /// other dtypes.
    pub(crate) fn of(
        (u, lu): (&'a CpuStorage, &Layout),
        v: Option<(&CpuStorage, &Layout)>,
        alpha: f64,
        input: Option<(&'a CpuStorage, &Layout)>,
    ) -> Result<Option<Self>> {
        let CpuStorage::F32(u) = u else {
            return Ok(None);
        };
        let (k, r) = lu.shape().dims2()?;
        let v = match v {
            None => None,
            Some((CpuStorage::F32(v), lv)) => {
                let (rv, n) = lv.shape().dims2()?;
                if rv != r {
                    candle_core::bail!(
                        "low-rank product: U [{k}, {r}] and V [{rv}, {n}] do not fit"
                    );
                }
                let v = Strided::of_layout(v, lv);
                let scaled = (0..r * n)
                    .map(|i| alpha as f32 * v.at(i / n, i % n))
                    .collect();
                Some((scaled, n))
            }
            Some(_) => return Ok(None),
        };
        let input = match input {
            None => None,
            Some((CpuStorage::F32(x), lx)) => Some(Strided::of_layout(x, lx)),
            Some(_) => return Ok(None),
        };
        Ok(Some(Self {
            u: Strided::of_layout(u, lu),
            v,
            input,
        }))
    }

    pub(crate) fn u(&self) -> Strided<'a, f32> {
        self.u
    }

    /// alpha·V, if the update is to be summed.
    pub(crate) fn v(&self) -> Option<Strided<'_, f32>> {
        self.v
            .as_ref()
            .map(|(v, n)| Strided::new(v, 0, (self.u.cols, *n), (*n, 1)))
    }
}
