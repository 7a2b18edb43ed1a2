//! bf16 matrix products on Intel AMX tiles (`TDPBF16PS`: 16×32 by 32×16 bf16 into 16×16 f32),
//! for products with bf16 weights on CPUs that have AMX-BF16 (Xeon Sapphire Rapids and later),
//! and the packed operands they share with the AVX512_BF16 kernel of [`super::avx512_bf16`], which
//! runs where AMX is missing (AMD Zen 4 and 5).
//!
//! Detected at run time (CPUID, then Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM)` for the tile
//! data); one binary runs everywhere and takes the widening f32 path of [`super::matmul`] where
//! neither kernel runs. The left operand is rounded to bf16 (as PyTorch's autocast does),
//! products accumulate in f32. `FEINSCHLIFF_AMX=0` turns the tiles off (to compare paths).

use super::elements::{gather, RhsPart, Strided, ToBf16, TILE};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Whether AMX-BF16 can be used by this process (checked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("FEINSCHLIFF_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        detect()
    })
}

/// The kernels that multiply packed bf16 operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles ([`compute`] here).
    Amx,
    /// AVX512_BF16 dot products ([`super::avx512_bf16::compute`]).
    Avx512Bf16,
}

/// The kernel bf16 products take on this CPU, if any: AMX tiles, else AVX512_BF16 where preferred.
pub fn bf16_kernel() -> Option<Bf16Kernel> {
    if available() {
        Some(Bf16Kernel::Amx)
    } else if super::avx512_bf16::preferred() {
        Some(Bf16Kernel::Avx512Bf16)
    } else {
        None
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    let has_amx = (leaf.edx >> 22) & 1 == 1 && (leaf.edx >> 24) & 1 == 1;
    has_amx && request_tile_permission()
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Asks Linux for the right to use the tile data state (XFEATURE_XTILEDATA); false when refused.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_permission() -> bool {
    false
}

/// Rows per block of the left operand and columns per block of the right one (2 × 2 tiles).
const BLOCK: usize = 32;
/// Bytes of packed right operand a thread keeps in L2 while the rows of the left one stream by.
const L2_BUDGET: usize = 1 << 20;
/// K per tile step (32 bf16 = 64 bytes per tile row).
pub(crate) const K_STEP: usize = 32;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// a [m, k] · b [k, n] into `out` [m, n] (row-major f32) on `kernel`, writing every element
/// without reading any (so `out` may be uninitialised). `kernel` must be one this CPU runs
/// ([`bf16_kernel`]).
pub fn product<A: ToBf16, B: ToBf16>(
    kernel: Bf16Kernel,
    a: Strided<A>,
    b: Strided<B>,
    out: &mut [MaybeUninit<f32>],
) {
    product_packed(kernel, a, &PackedRhs::new(&b), out);
}

/// A right operand b [k, n] in the tiles' layout, packed once for any number of products (a frozen
/// weight: packing costs about as much as multiplying a thousand rows by it).
pub struct PackedRhs {
    data: Vec<u16>,
    k: usize,
    n: usize,
}

impl PackedRhs {
    pub fn new<B: ToBf16>(b: &Strided<B>) -> Self {
        Self {
            data: pack_vnni(b, round_up(b.rows.max(1), K_STEP)),
            k: b.rows,
            n: b.cols,
        }
    }

    /// (k, n) of the operand it packs.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The whole operand as one part of a product's right operand.
    pub(crate) fn part(&self) -> RhsPart<'_> {
        self.part_from(0)
    }

    /// Its columns from `first` (a multiple of 32) on, as a part of a right operand.
    pub(crate) fn part_from(&self, first: usize) -> RhsPart<'_> {
        debug_assert!(first.is_multiple_of(BLOCK));
        let steps = round_up(self.k.max(1), K_STEP) / K_STEP;
        RhsPart {
            data: &self.data[first / 16 * steps * TILE..],
            steps,
            group_steps: steps,
        }
    }

    /// Its first `rows` rows (of k), as a part of a right operand.
    pub(crate) fn first_rows(&self, rows: usize) -> RhsPart<'_> {
        let whole = self.part();
        RhsPart {
            steps: round_up(rows.min(self.k), K_STEP) / K_STEP,
            ..whole
        }
    }
}

/// a [m, k] · b into `out` [m, n] as [`product`] does, with b packed already.
pub fn product_packed<A: ToBf16>(
    kernel: Bf16Kernel,
    a: Strided<A>,
    b: &PackedRhs,
    out: &mut [MaybeUninit<f32>],
) {
    let (m, k, n) = (a.rows, a.cols, b.n);
    assert!(
        b.k == k && out.len() == m * n,
        "bf16 product: shapes do not fit"
    );
    if m * n == 0 {
        return;
    }
    let kp = round_up(k.max(1), K_STEP);
    let packed_a = pack_rows(&a, kp);
    product_parts(kernel, (&packed_a, kp), &[b.part()], (m, n), out);
}

/// The rows of `a` (packed by [`pack_rows`], rows of `lda` u16) times the right operand made of
/// `parts` one after the other along k, into `out` [m, n]. The threads split the column blocks,
/// or, where there are fewer of those than threads (a LoRA factor's x·Aᵀ is one block), the rows,
/// in whole blocks so that only the last band has padding rows.
pub(crate) fn product_parts(
    kernel: Bf16Kernel,
    (a, lda): (&[u16], usize),
    parts: &[RhsPart<'_>],
    (m, n): (usize, usize),
    out: &mut [MaybeUninit<f32>],
) {
    assert!(out.len() == m * n, "bf16 product: shapes do not fit");
    if m * n == 0 {
        return;
    }
    let (row_blocks, col_blocks) = (round_up(m, BLOCK) / BLOCK, round_up(n, BLOCK) / BLOCK);
    let by_rows = col_blocks < rayon::current_num_threads() && row_blocks > 1;
    let bands = bands(if by_rows { row_blocks } else { col_blocks });
    let out_ptr = SendPtr(out.as_mut_ptr().cast());
    let run_band = |own: std::ops::Range<usize>| {
        let (rows, cols) = match by_rows {
            true => (own.start * BLOCK..(own.end * BLOCK).min(m), 0..col_blocks),
            false => (0..m, own),
        };
        // Safety: each band writes only its own rows or column blocks, on a kernel the CPU runs.
        unsafe {
            let out = out_ptr.at(rows.start * n);
            let a = (&a[rows.start * lda..], lda);
            run(kernel, a, parts, (rows.len(), n), cols, out, n)
        };
    };
    match bands.as_slice() {
        [only] => run_band(only.clone()),
        _ => bands.into_par_iter().for_each(run_band),
    }
}

/// `units` (blocks or panels of a product) split into consecutive bands of whole units, one per
/// thread of the pool at most and none empty: 5 units on 4 threads are 3 bands of 2, 2 and 1.
fn bands(units: usize) -> Vec<std::ops::Range<usize>> {
    let per_band = units.div_ceil(rayon::current_num_threads().max(1)).max(1);
    (0..units)
        .step_by(per_band)
        .map(|start| start..(start + per_band).min(units))
        .collect()
}

/// The output columns of `col_blocks` on `kernel` (see [`compute`]); `out` has rows of `ldo`.
///
/// Safety: as [`compute`]'s; `kernel` is one this CPU runs.
unsafe fn run(
    kernel: Bf16Kernel,
    a: (&[u16], usize),
    parts: &[RhsPart<'_>],
    dims: (usize, usize),
    col_blocks: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
) {
    match kernel {
        Bf16Kernel::Amx => compute(a, parts, dims, col_blocks, out, ldo),
        Bf16Kernel::Avx512Bf16 => super::avx512_bf16::compute(a, parts, dims, col_blocks, out, ldo),
    }
}

/// a · b into columns 0..n of `out` on the calling thread, a packed by [`pack_rows`] (rows of
/// `lda`) and b the `parts` packed as [`PackedRhs`] packs, one after the other along k; `out`
/// holds m rows of `ldo` f32 (a panel of a wider product).
///
/// Safety: no other thread writes these columns of `out`; `kernel` is one this CPU runs
/// ([`bf16_kernel`]).
pub(crate) unsafe fn compute_columns(
    kernel: Bf16Kernel,
    a: (&[u16], usize),
    parts: &[RhsPart<'_>],
    (m, n): (usize, usize),
    out: *mut f32,
    ldo: usize,
) {
    run(kernel, a, parts, (m, n), 0..n.div_ceil(BLOCK), out, ldo)
}

/// A raw output pointer shared by threads that write disjoint columns.
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl SendPtr {
    /// The pointer `offset` elements on.
    ///
    /// Safety: the result stays inside the buffer.
    pub(crate) unsafe fn at(&self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// The left operand as bf16 rows [round_up(m, 32), kp], zero-padded.
pub(crate) fn pack_rows<A: ToBf16>(a: &Strided<A>, kp: usize) -> Vec<u16> {
    let rows = round_up(a.rows, BLOCK);
    let mut packed = Vec::with_capacity(rows * kp);
    packed.spare_capacity_mut()[..rows * kp]
        .par_chunks_mut(kp)
        .enumerate()
        .for_each(|(r, row)| {
            let (values, padding) = row.split_at_mut(if r < a.rows { a.cols } else { 0 });
            let start = a.offset + r * a.strides.0;
            if values.is_empty() {
                // a padding row
            } else if a.strides.1 == 1 {
                A::row_bf16_bits(&a.data[start..start + a.cols], values);
            } else {
                gather(values, a.data, start, a.strides.1, |v| {
                    MaybeUninit::new(v.bf16_bits())
                });
            }
            padding.fill(MaybeUninit::new(0));
        });
    // SAFETY: every row above wrote all of its kp elements (values and padding).
    unsafe { packed.set_len(rows * kp) };
    packed
}

/// The right operand in the tiles' pair-interleaved (VNNI) layout: for each group of 16 columns
/// and each step of 32 k, 16 rows of (k pair) × 16 columns × 2, zero-padded to whole tiles.
fn pack_vnni<B: ToBf16>(b: &Strided<B>, kp: usize) -> Vec<u16> {
    let mut packed = vec![0u16; packed_len(b.cols, kp)];
    packed
        .par_chunks_mut(kp / K_STEP * TILE)
        .enumerate()
        .for_each(|(g, group)| pack_group(b, g, group));
    packed
}

/// u16 of a packed right operand of `cols` columns and `kp` rows.
pub(crate) fn packed_len(cols: usize, kp: usize) -> usize {
    round_up(cols, BLOCK) / 16 * (kp / K_STEP) * TILE
}

/// Where element (kk, col) of a right operand of `kp` rows goes when packed: for each group of
/// 16 columns and each step of 32 rows, 16 rows of (row pair) × 16 columns × 2.
#[inline(always)]
pub(crate) fn packed_index(kk: usize, col: usize, kp: usize) -> usize {
    (col / 16) * kp * 16 + slot(kk, col % 16)
}

/// Where element (kk, col) of one group of 16 columns goes within the group.
#[inline(always)]
fn slot(kk: usize, col: usize) -> usize {
    let (step, within) = (kk / K_STEP, kk % K_STEP);
    step * TILE + (within / 2) * 32 + col * 2 + within % 2
}

/// Group `g` (columns 16g..16g + 16) of b into `group` (zeroed).
fn pack_group<B: ToBf16>(b: &Strided<B>, g: usize, group: &mut [u16]) {
    let first = g * 16;
    let cols = b.cols.saturating_sub(first).min(16);
    if cols == 0 {
        return; // a padding group
    }
    if b.strides.1 == 1 {
        // Rows of b contiguous (b is a weight W [k, n] as stored).
        for kk in 0..b.rows {
            let start = b.offset + kk * b.strides.0 + first;
            let base = slot(kk, 0);
            for (col, v) in b.data[start..start + cols].iter().enumerate() {
                group[base + col * 2] = v.bf16_bits();
            }
        }
    } else if b.strides.0 == 1 {
        // Columns of b contiguous (b is Wᵀ for a weight W [n, k]).
        for col in 0..cols {
            let start = b.offset + (first + col) * b.strides.1;
            for (kk, v) in b.data[start..start + b.rows].iter().enumerate() {
                group[slot(kk, col)] = v.bf16_bits();
            }
        }
    } else {
        for col in 0..cols {
            for kk in 0..b.rows {
                group[slot(kk, col)] = b.at(kk, first + col).bf16_bits();
            }
        }
    }
}

/// The tile configuration: palette 1, tiles 0–7 of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for t in 0..8 {
            cfg[16 + 2 * t] = 64;
            cfg[48 + t] = 16;
        }
        Self(cfg)
    }
}

/// Computes the output columns of `col_blocks` (blocks of 32, of n columns) for all m rows into
/// `out`, whose rows are `ldo` f32 apart: a (bf16 rows of `lda`) times the `parts` of b in turn.
/// A long k (the LM head's input gradient runs over the vocabulary) goes in chunks whose operands
/// stay in L2, each chunk adding to what the ones before it stored.
///
/// Safety: `out` points to m rows of `ldo` ≥ n f32 that no other thread writes in these columns;
/// the parts' steps fit in `lda`; AMX is available.
#[cfg(target_arch = "x86_64")]
unsafe fn compute(
    (a, lda): (&[u16], usize),
    parts: &[RhsPart<'_>],
    (m, n): (usize, usize),
    col_blocks: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
) {
    let steps: usize = parts.iter().map(|p| p.steps).sum();
    debug_assert!(steps * K_STEP <= lda);
    with_tiles(|| {
        let chunk = chunk_steps(steps, col_blocks.len());
        for first in (0..steps).step_by(chunk) {
            let len = chunk.min(steps - first);
            let chunk_parts = steps_of(parts, first..first + len);
            let a = &a[first * K_STEP..];
            let pass = Pass {
                a,
                lda,
                parts: &chunk_parts,
                m,
                n,
                out,
                ldo,
            };
            let epilogue = Epilogue::Store {
                accumulate: first > 0,
            };
            pass.run(col_blocks.clone(), epilogue);
        }
    })
}

/// Runs `f` with the tile configuration loaded, and releases the tiles after it.
///
/// Safety: AMX is available.
#[cfg(target_arch = "x86_64")]
unsafe fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
    use std::arch::asm;
    let config = TileConfig::new();
    asm!("ldtilecfg [{0}]", in(reg) config.0.as_ptr(), options(nostack));
    let result = f();
    asm!("tilerelease", options(nostack));
    result
}

/// What a pass of the tiles does with each finished 32 × 32 block of sums.
#[cfg(target_arch = "x86_64")]
enum Epilogue<'f> {
    /// Stores it into the output, adding to what an earlier chunk of k stored there when
    /// `accumulate`.
    Store { accumulate: bool },
    /// Hands it to a function instead.
    Fold(&'f mut dyn FnMut(ProductBlock<'_>)),
}

/// A finished block of a product, handed over instead of stored: 32 × 32 sums from the tiles, a
/// panel of [`FOLD_ROWS`] × [`FOLD_COLS`] from the AVX512_BF16 kernel.
pub(crate) struct ProductBlock<'b> {
    /// The product's row and column of its first element.
    pub first_row: usize,
    pub first_col: usize,
    /// Its sums, rows of `stride` f32.
    values: &'b mut [f32],
    stride: usize,
    /// How many of its rows and columns lie inside the product.
    pub rows: usize,
    pub cols: usize,
}

impl ProductBlock<'_> {
    /// Its rows inside the product, each cut to the columns inside it.
    pub(crate) fn rows_mut(&mut self) -> impl Iterator<Item = &mut [f32]> {
        let cols = self.cols;
        self.values
            .chunks_mut(self.stride)
            .take(self.rows)
            .map(move |row| &mut row[..cols])
    }
}

/// Tile steps above which a product runs in chunks of k (4,096 of k: a block row of a and a block
/// column of b then hold 256 KB each).
const LONG_STEPS: usize = 128;

/// Tile steps per chunk of k for a product of `steps` steps over `col_blocks` column blocks: all
/// of them up to [`LONG_STEPS`], else as many as keep the thread's columns of b within
/// [`L2_BUDGET`] (at least 16).
#[cfg(target_arch = "x86_64")]
fn chunk_steps(steps: usize, col_blocks: usize) -> usize {
    if steps <= LONG_STEPS {
        return steps.max(1);
    }
    (L2_BUDGET / (col_blocks.max(1) * 2 * TILE * 2)).clamp(16, LONG_STEPS)
}

/// The steps `range` of the right operand made of `parts` one after the other, as parts.
#[cfg(target_arch = "x86_64")]
fn steps_of<'a>(parts: &[RhsPart<'a>], range: std::ops::Range<usize>) -> Vec<RhsPart<'a>> {
    let mut start = 0;
    let mut out = Vec::new();
    for part in parts {
        let (from, to) = (range.start.max(start), range.end.min(start + part.steps));
        if from < to {
            out.push(part.steps_from(from - start, to - from));
        }
        start += part.steps;
    }
    out
}

/// One pass of the tiles over some steps of k: a (rows of `lda`, from the pass's first step) times
/// `parts` into `out`.
#[cfg(target_arch = "x86_64")]
struct Pass<'p, 'a> {
    a: &'p [u16],
    lda: usize,
    parts: &'p [RhsPart<'a>],
    m: usize,
    n: usize,
    out: *mut f32,
    ldo: usize,
}

#[cfg(target_arch = "x86_64")]
impl Pass<'_, '_> {
    /// The pass over the output columns of `col_blocks`, each finished block stored or folded as
    /// `epilogue` says.
    ///
    /// Safety: as [`compute`]'s, with the tile configuration loaded.
    unsafe fn run(&self, col_blocks: std::ops::Range<usize>, mut epilogue: Epilogue<'_>) {
        use std::arch::asm;
        let Self {
            a,
            lda,
            parts,
            m,
            n,
            out,
            ldo,
        } = *self;
        let steps: usize = parts.iter().map(|p| p.steps).sum();
        let a_stride = lda * 2;
        let mut block = [0f32; BLOCK * BLOCK];
        let row_blocks = round_up(m, BLOCK) / BLOCK;
        // Keep the operand that fits in L2 there and stream the other one past it: this thread's
        // columns of b when they fit (rows of a outermost), else the rows of a.
        let b_bytes = col_blocks.len() * steps * 2 * TILE * 2;
        let pairs: Vec<(usize, usize)> = if b_bytes <= L2_BUDGET {
            (0..row_blocks)
                .flat_map(|rb| col_blocks.clone().map(move |cb| (cb, rb)))
                .collect()
        } else {
            col_blocks
                .flat_map(|cb| (0..row_blocks).map(move |rb| (cb, rb)))
                .collect()
        };
        for (cb, rb) in pairs {
            let rows = (m - rb * BLOCK).min(BLOCK);
            let cols = (n - cb * BLOCK).min(BLOCK);
            // A whole block is read and written in place; a block cut by the edge, or one to
            // fold, goes through `block`.
            let folded = matches!(epilogue, Epilogue::Fold(_));
            let whole = rows == BLOCK && cols == BLOCK && !folded;
            let (c, row_stride) = if whole {
                (out.add(rb * BLOCK * ldo + cb * BLOCK), ldo)
            } else {
                (block.as_mut_ptr(), BLOCK)
            };
            if let Epilogue::Store { accumulate: true } = epilogue {
                if !whole {
                    for r in 0..rows {
                        let src = out.add((rb * BLOCK + r) * ldo + cb * BLOCK);
                        std::ptr::copy_nonoverlapping(src, block.as_mut_ptr().add(r * BLOCK), cols);
                    }
                }
                asm!(
                    "tileloadd tmm0, [{c0} + {s}*1]",
                    "tileloadd tmm1, [{c1} + {s}*1]",
                    "tileloadd tmm2, [{c2} + {s}*1]",
                    "tileloadd tmm3, [{c3} + {s}*1]",
                    c0 = in(reg) c,
                    c1 = in(reg) c.add(16),
                    c2 = in(reg) c.add(16 * row_stride),
                    c3 = in(reg) c.add(16 * row_stride + 16),
                    s = in(reg) row_stride * 4,
                    options(nostack)
                );
            } else {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack)
                );
            }
            let mut a0 = a.as_ptr().add(rb * BLOCK * lda);
            for part in parts {
                let b0 = part.data.as_ptr().add((2 * cb) * part.group_steps * TILE);
                let b1 = part
                    .data
                    .as_ptr()
                    .add((2 * cb + 1) * part.group_steps * TILE);
                let a1 = a0.add(16 * lda);
                for s in 0..part.steps {
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(s * K_STEP),
                        a1 = in(reg) a1.add(s * K_STEP),
                        b0 = in(reg) b0.add(s * TILE),
                        b1 = in(reg) b1.add(s * TILE),
                        sa = in(reg) a_stride,
                        sb = in(reg) 64usize,
                        options(nostack)
                    );
                }
                a0 = a0.add(part.steps * K_STEP);
            }
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) c,
                c1 = in(reg) c.add(16),
                c2 = in(reg) c.add(16 * row_stride),
                c3 = in(reg) c.add(16 * row_stride + 16),
                s = in(reg) row_stride * 4,
                options(nostack)
            );
            if let Epilogue::Fold(fold) = &mut epilogue {
                fold(ProductBlock {
                    first_row: rb * BLOCK,
                    first_col: cb * BLOCK,
                    values: &mut block,
                    stride: BLOCK,
                    rows,
                    cols,
                });
            } else if !whole {
                for r in 0..rows {
                    let dst = out.add((rb * BLOCK + r) * ldo + cb * BLOCK);
                    std::ptr::copy_nonoverlapping(block.as_ptr().add(r * BLOCK), dst, cols);
                }
            }
        }
    }
}

/// a · b reduced block by block instead of stored, on `kernel`: each thread starts from `init()`
/// and hands every block of the product it computes to `fold` with its state; returns the
/// threads' states. The threads split the columns. None where the shapes do not fit, where the
/// CPU lacks the kernel, or on AMX tiles where k is long enough to run in chunks.
pub(crate) fn product_folded<A: ToBf16, S: Send>(
    kernel: Bf16Kernel,
    a: Strided<A>,
    b: &PackedRhs,
    init: impl Fn() -> S + Sync,
    fold: impl Fn(&mut S, ProductBlock<'_>) + Sync,
) -> Option<Vec<S>> {
    let m = a.rows;
    // The columns a thread takes at a time: a block of the tiles, or a panel of the AVX512_BF16
    // kernel.
    let (width, runs) = match kernel {
        Bf16Kernel::Amx => (BLOCK, available() && b.part().steps <= LONG_STEPS),
        Bf16Kernel::Avx512Bf16 => (FOLD_COLS, super::avx512_bf16::supported()),
    };
    if !runs || b.k != a.cols || m * b.n == 0 {
        return None;
    }
    let lda = round_up(a.cols.max(1), K_STEP);
    let a = &pack_rows(&a, lda);
    let states = bands(b.n.div_ceil(width))
        .into_par_iter()
        .map(|own| {
            let mut state = init();
            let mut into_state = |block: ProductBlock<'_>| fold(&mut state, block);
            let folding = Folding { a, lda, b, m };
            // SAFETY: the CPU runs `kernel` (checked above); k fits the tiles' one pass.
            unsafe {
                match kernel {
                    Bf16Kernel::Amx => folding.tiles(own, &mut into_state),
                    Bf16Kernel::Avx512Bf16 => folding.panels(own, &mut into_state),
                }
            }
            state
        })
        .collect();
    Some(states)
}

/// Output rows and columns of each panel the AVX512_BF16 kernel computes before it is folded: its
/// sums (64 KB) stay in L2 with the panel's columns of b (590 KB at k = 576) while they are folded.
const FOLD_ROWS: usize = 32;
const FOLD_COLS: usize = 512;

/// The operands of a [`product_folded`]: a's rows packed (rows of `lda`), and b.
struct Folding<'p> {
    a: &'p [u16],
    lda: usize,
    b: &'p PackedRhs,
    m: usize,
}

impl Folding<'_> {
    /// The column blocks `blocks` on AMX tiles, each 32 × 32 block handed to `fold` as it leaves
    /// the tiles.
    ///
    /// Safety: AMX is available and the product runs in one pass (k within [`LONG_STEPS`] steps).
    #[cfg(target_arch = "x86_64")]
    unsafe fn tiles(&self, blocks: std::ops::Range<usize>, fold: &mut dyn FnMut(ProductBlock<'_>)) {
        let pass = Pass {
            a: self.a,
            lda: self.lda,
            parts: &[self.b.part()],
            m: self.m,
            n: self.b.n,
            out: std::ptr::null_mut(),
            ldo: 0,
        };
        // The pass folds every block instead of writing `out`.
        with_tiles(|| pass.run(blocks, Epilogue::Fold(fold)));
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn tiles(&self, _: std::ops::Range<usize>, _: &mut dyn FnMut(ProductBlock<'_>)) {
        unreachable!("AMX is never available off x86-64")
    }

    /// The column panels `panels` ([`FOLD_COLS`] wide) on the AVX512_BF16 kernel, [`FOLD_ROWS`]
    /// rows at a time into a buffer of this thread's, each handed to `fold` while in cache.
    ///
    /// Safety: the CPU has AVX512_BF16.
    unsafe fn panels(
        &self,
        panels: std::ops::Range<usize>,
        fold: &mut dyn FnMut(ProductBlock<'_>),
    ) {
        let (m, n, lda) = (self.m, self.b.n, self.lda);
        let mut sums = vec![0f32; FOLD_ROWS * FOLD_COLS];
        for panel in panels {
            let first_col = panel * FOLD_COLS;
            let cols = FOLD_COLS.min(n - first_col);
            let part = self.b.part_from(first_col);
            for first_row in (0..m).step_by(FOLD_ROWS) {
                let rows = FOLD_ROWS.min(m - first_row);
                // `sums` holds `rows` rows of FOLD_COLS ≥ `cols` f32; a's rows are padded to
                // whole blocks of 32 past `first_row`, a multiple of 32.
                super::avx512_bf16::compute(
                    (&self.a[first_row * lda..], lda),
                    std::slice::from_ref(&part),
                    (rows, cols),
                    0..cols.div_ceil(BLOCK),
                    sums.as_mut_ptr(),
                    FOLD_COLS,
                );
                fold(ProductBlock {
                    first_row,
                    first_col,
                    values: &mut sums,
                    stride: FOLD_COLS,
                    rows,
                    cols,
                });
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn compute(
    _: (&[u16], usize),
    _: &[RhsPart<'_>],
    _: (usize, usize),
    _: std::ops::Range<usize>,
    _: *mut f32,
    _: usize,
) {
    unreachable!("AMX is never available off x86-64")
}
