//! The instruction rates the product kernels are bound by, on one core: f32 FMAs on 256-bit
//! (AVX2) and 512-bit (AVX-512) registers, faer's and the f32 paths' inner instruction, and
//! AVX512_BF16's `VDPBF16PS` (the bf16 kernel's), each a register-only loop of 12 independent
//! chains. `bench kernels` prints them, so that a machine's ceiling and kernel choice can be read
//! off: `VDPBF16PS` does twice the multiply-adds of a 512-bit FMA, so it gains only where it
//! issues at more than half the FMAs' rate (on this project's Intel Xeon without AMX it issues
//! at a quarter).

use std::time::Instant;

/// Loop iterations per timing (12 instructions each).
const ITERATIONS: u64 = 20_000_000;

/// "one core: …" with the rate of each instruction the CPU has, or why none was measured.
pub fn line() -> String {
    let mut rates = Vec::new();
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        rates.push(rate("256-bit FMA", 16, |n| unsafe { fma256_chains(n) }));
    }
    if avx512f() {
        // SAFETY: the CPU has AVX-512F.
        rates.push(rate("512-bit FMA", 32, |n| unsafe { fma512_chains(n) }));
    }
    if crate::model::kernels::avx512_bf16::supported() {
        // SAFETY: the CPU has AVX-512F and AVX512_BF16.
        rates.push(rate("VDPBF16PS", 64, |n| unsafe { dpbf16_chains(n) }));
    }
    if rates.is_empty() {
        return "one core: no AVX2+FMA or AVX-512, instruction rates not measured".into();
    }
    format!("one core: {}", rates.join(", "))
}

/// "NAME r G/s (f GFLOP/s)": instructions per second (in billions, the best of three timings
/// of `chains`) and the floating-point operations they do, `flops` each.
fn rate(name: &str, flops: u32, chains: impl Fn(u64)) -> String {
    let per_second = (0..3)
        .map(|_| {
            let start = Instant::now();
            chains(ITERATIONS);
            (ITERATIONS * 12) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max);
    let gflops = per_second * f64::from(flops);
    format!("{name} {per_second:.2} G/s ({gflops:.0} GFLOP/s)")
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
fn avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_fma() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512f() -> bool {
    false
}

/// Runs `$op {$p}I, $a, $b` for I in 0..12 (registers of prefix `$p`: "ymm" or "zmm"), `$n`
/// times, from registers zeroed by `$zero`. Every vector register counts as clobbered.
#[cfg(target_arch = "x86_64")]
macro_rules! chains {
    ($zero:literal, $op:literal, $p:literal, $a:literal, $b:literal, $n:expr) => {
        chains!(@ $zero, $op, $p, $a, $b, $n, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    };
    (@ $zero:literal, $op:literal, $p:literal, $a:literal, $b:literal, $n:expr, [$($i:literal),*]) => {
        std::arch::asm!(
            concat!($zero, " ", $a, ", ", $a, ", ", $a),
            concat!($zero, " ", $b, ", ", $b, ", ", $b),
            $(concat!($zero, " ", $p, $i, ", ", $p, $i, ", ", $p, $i),)*
            "2:",
            $(concat!($op, " ", $p, $i, ", ", $a, ", ", $b),)*
            "dec rcx",
            "jnz 2b",
            inout("rcx") $n => _,
            clobber_abi("sysv64"),
            options(nostack, nomem),
        )
    };
}

/// Safety: the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma256_chains(iterations: u64) {
    chains!("vpxor", "vfmadd231ps", "ymm", "ymm14", "ymm15", iterations);
}

/// Safety: the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma512_chains(iterations: u64) {
    chains!("vpxord", "vfmadd231ps", "zmm", "zmm30", "zmm31", iterations);
}

/// Safety: the CPU has AVX-512F and AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dpbf16_chains(iterations: u64) {
    chains!("vpxord", "vdpbf16ps", "zmm", "zmm30", "zmm31", iterations);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn fma256_chains(_: u64) {
    unreachable!("AVX2 exists on x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn fma512_chains(_: u64) {
    unreachable!("AVX-512 exists on x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dpbf16_chains(_: u64) {
    unreachable!("AVX-512 exists on x86-64 only")
}

#[cfg(test)]
mod tests {
    /// The loops run and give rates a CPU can have (between 0.01 and 100 G/s), one for each
    /// instruction set the CPU has.
    #[test]
    fn measures_plausible_rates() {
        let line = super::line();
        let expected = usize::from(super::avx2_fma())
            + usize::from(super::avx512f())
            + usize::from(crate::model::kernels::avx512_bf16::supported());
        if expected == 0 {
            eprintln!("skipped: this CPU has no AVX2+FMA or AVX-512F ({line})");
            return;
        }
        let rates: Vec<f64> = line
            .split(' ')
            .filter_map(|word| word.parse().ok())
            .collect();
        assert_eq!(rates.len(), expected, "{line}");
        assert!(rates.iter().all(|r| (0.01..100.0).contains(r)), "{line}");
    }
}
