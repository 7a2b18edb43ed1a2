//! Element conversions and strided operands shared by the product kernels: f32 → bf16 rounding,
//! gathering one row or column of a strided matrix, and the operand view the bf16 kernels read.

use half::bf16;

/// f32 → bf16, rounding to nearest even (NaN stays NaN), as half's `from_f32` but branch-free
/// enough to vectorise.
#[inline]
pub(crate) fn narrow_bf16(f: f32) -> bf16 {
    let bits = f.to_bits();
    if f.is_nan() {
        return bf16::from_bits(((bits >> 16) | 0x40) as u16);
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    bf16::from_bits((rounded >> 16) as u16)
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
}

impl ToBf16 for f32 {
    #[inline]
    fn bf16_bits(self) -> u16 {
        narrow_bf16(self).to_bits()
    }
}

impl ToBf16 for bf16 {
    #[inline]
    fn bf16_bits(self) -> u16 {
        self.to_bits()
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

impl<T: Copy> Strided<'_, T> {
    #[inline]
    pub(crate) fn at(&self, r: usize, c: usize) -> T {
        self.data[self.offset + r * self.strides.0 + c * self.strides.1]
    }
}
