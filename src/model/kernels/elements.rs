//! Element conversions and strided operands shared by the product kernels: f32 → bf16 rounding,
//! gathering one row or column of a strided matrix, the operand views the bf16 kernels read, and
//! output buffers they fill without zeroing.

use std::mem::MaybeUninit;

use half::bf16;

use super::vector_math;

/// f32 → bf16, rounding to nearest even (NaN stays NaN), as half's `from_f32` but branch-free
/// enough to vectorise.
#[inline]
pub(crate) fn narrow_bf16(f: f32) -> bf16 {
    bf16::from_bits(vector_math::bf16_bits(f))
}

/// Copies `src[start + i·stride]` for i < `dst.len()` into `dst`, converted by `convert`: one row
/// or column of a strided matrix, for widening, rounding or packing operands.
#[inline]
pub(crate) fn gather<S: Copy, D>(
    dst: &mut [D],
    src: &[S],
    start: usize,
    stride: usize,
    convert: impl Fn(S) -> D,
) {
    let len = dst.len();
    if stride == 1 {
        for (d, s) in dst.iter_mut().zip(&src[start..start + len]) {
            *d = convert(*s);
        }
    } else {
        for (i, d) in dst.iter_mut().enumerate() {
            *d = convert(src[start + i * stride]);
        }
    }
}

/// Elements the kernel reads: rounded (f32) or taken (bf16) as bf16 bits.
pub trait ToBf16: Copy + Sync {
    fn bf16_bits(self) -> u16;

    /// `src` as bf16 bits into `dst` (of the same length): a contiguous row of an operand.
    fn row_bf16_bits(src: &[Self], dst: &mut [MaybeUninit<u16>]);
}

impl ToBf16 for f32 {
    #[inline]
    fn bf16_bits(self) -> u16 {
        vector_math::bf16_bits(self)
    }

    fn row_bf16_bits(src: &[f32], dst: &mut [MaybeUninit<u16>]) {
        vector_math::round_to_bf16(src, dst);
    }
}

impl ToBf16 for bf16 {
    #[inline]
    fn bf16_bits(self) -> u16 {
        self.to_bits()
    }

    fn row_bf16_bits(src: &[bf16], dst: &mut [MaybeUninit<u16>]) {
        for (d, s) in dst.iter_mut().zip(src) {
            d.write(s.to_bits());
        }
    }
}

/// u16 per tile: 16 rows of 32 bf16.
pub(crate) const TILE: usize = 16 * 32;

/// A stretch of a right operand along k, packed as [`super::amx::PackedRhs`] packs: `steps` tile
/// steps (32 k each) of each group of 16 columns, the groups `group_steps` steps apart (more
/// when the product uses only the first rows of what was packed). A product may run over several
/// parts one after the other, each against the next `32·steps` elements of the left operand's
/// rows (a frozen weight and a LoRA factor in one pass).
#[derive(Clone, Copy)]
pub(crate) struct RhsPart<'a> {
    pub data: &'a [u16],
    pub steps: usize,
    pub group_steps: usize,
}

impl<'a> RhsPart<'a> {
    /// Its `steps` steps from step `first` on, as a part of their own.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn steps_from(&self, first: usize, steps: usize) -> Self {
        debug_assert!(first + steps <= self.steps);
        Self {
            data: &self.data[first * TILE..],
            steps,
            group_steps: self.group_steps,
        }
    }
}

/// A strided matrix: element (r, c) at `offset + r·rows_stride + c·cols_stride`.
#[derive(Clone, Copy)]
pub struct Strided<'a, T> {
    pub data: &'a [T],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub strides: (usize, usize),
}

impl<'a, T> Strided<'a, T> {
    /// `rows` × `cols` elements of `data` from `offset`, `strides` (row, column) apart.
    pub(crate) fn new(
        data: &'a [T],
        offset: usize,
        (rows, cols): (usize, usize),
        strides: (usize, usize),
    ) -> Self {
        Self {
            data,
            offset,
            rows,
            cols,
            strides,
        }
    }

    /// The view a 2-d layout gives of `data`.
    pub(crate) fn of_layout(data: &'a [T], l: &candle_core::Layout) -> Self {
        let (d, s) = (l.dims(), l.stride());
        Self::new(data, l.start_offset(), (d[0], d[1]), (s[0], s[1]))
    }
}

impl<T: Copy> Strided<'_, T> {
    #[inline]
    pub(crate) fn at(&self, r: usize, c: usize) -> T {
        self.data[self.offset + r * self.strides.0 + c * self.strides.1]
    }
}

/// `len` elements left uninitialised, for kernels that write every one of them (zeroing a
/// product's output first costs a pass over it).
pub(crate) fn uninit<T>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation; the capacity is `len`.
    unsafe { out.set_len(len) };
    out
}

/// The elements of `v` as initialised.
///
/// # Safety
/// Every element of `v` must have been written.
pub(crate) unsafe fn assume_init<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<T> has T's layout; the caller guarantees initialisation.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}
