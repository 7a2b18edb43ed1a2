//! The instruction rates the product kernels are bound by, on one core: 512-bit f32 FMAs (faer's
//! and the f32 paths' inner instruction) and AVX512_BF16's `VDPBF16PS` (the bf16 kernel's),
//! each a register-only loop of 12 independent chains. `bench kernels` prints them, so that a
//! machine's kernel choice can be read off: `VDPBF16PS` does twice the multiply-adds of an FMA,
//! so it gains only where it issues at more than half the FMAs' rate (AMD's Zen 4 and 5; on this
//! project's Intel Xeon without AMX it issues at a quarter).

use std::time::Instant;

/// Loop iterations per timing (12 instructions each).
const ITERATIONS: u64 = 20_000_000;

/// "one core: …" with the rate of each instruction the CPU has, or why none was measured.
pub fn line() -> String {
    if !avx512f() {
        return "one core: no AVX-512F, instruction rates not measured".into();
    }
    // SAFETY: the CPU has AVX-512F.
    let fma = best_rate(|n| unsafe { fma_chains(n) });
    let mut line = format!(
        "one core: 512-bit FMA {:.2} G/s ({:.0} GFLOP/s)",
        fma,
        fma * 32.0
    );
    if crate::model::kernels::avx512_bf16::supported() {
        // SAFETY: the CPU has AVX-512F and AVX512_BF16.
        let dot = best_rate(|n| unsafe { dpbf16_chains(n) });
        line.push_str(&format!(
            ", VDPBF16PS {:.2} G/s ({:.0} GFLOP/s)",
            dot,
            dot * 64.0
        ));
    }
    line
}

/// Instructions per second (in billions), the best of three timings of `chains`.
fn best_rate(chains: impl Fn(u64)) -> f64 {
    (0..3)
        .map(|_| {
            let start = Instant::now();
            chains(ITERATIONS);
            (ITERATIONS * 12) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

#[cfg(target_arch = "x86_64")]
fn avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512f() -> bool {
    false
}

/// Runs `$op zmmI, zmm30, zmm31` for I in 0..12, `$n` times, from zeroed registers.
#[cfg(target_arch = "x86_64")]
macro_rules! chains {
    ($op:literal, $n:expr) => {
        std::arch::asm!(
            "vpxord zmm30, zmm30, zmm30",
            "vpxord zmm31, zmm31, zmm31",
            "vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1", "vpxord zmm2, zmm2, zmm2",
            "vpxord zmm3, zmm3, zmm3", "vpxord zmm4, zmm4, zmm4", "vpxord zmm5, zmm5, zmm5",
            "vpxord zmm6, zmm6, zmm6", "vpxord zmm7, zmm7, zmm7", "vpxord zmm8, zmm8, zmm8",
            "vpxord zmm9, zmm9, zmm9", "vpxord zmm10, zmm10, zmm10", "vpxord zmm11, zmm11, zmm11",
            "2:",
            concat!($op, " zmm0, zmm30, zmm31"), concat!($op, " zmm1, zmm30, zmm31"),
            concat!($op, " zmm2, zmm30, zmm31"), concat!($op, " zmm3, zmm30, zmm31"),
            concat!($op, " zmm4, zmm30, zmm31"), concat!($op, " zmm5, zmm30, zmm31"),
            concat!($op, " zmm6, zmm30, zmm31"), concat!($op, " zmm7, zmm30, zmm31"),
            concat!($op, " zmm8, zmm30, zmm31"), concat!($op, " zmm9, zmm30, zmm31"),
            concat!($op, " zmm10, zmm30, zmm31"), concat!($op, " zmm11, zmm30, zmm31"),
            "dec {n}",
            "jnz 2b",
            n = inout(reg) $n => _,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
            out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _,
            out("zmm10") _, out("zmm11") _, out("zmm30") _, out("zmm31") _,
            options(nostack, nomem),
        )
    };
}

/// Safety: the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains(iterations: u64) {
    chains!("vfmadd231ps", iterations);
}

/// Safety: the CPU has AVX-512F and AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dpbf16_chains(iterations: u64) {
    chains!("vdpbf16ps", iterations);
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn fma_chains(_: u64) {
    unreachable!("AVX-512 exists on x86-64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dpbf16_chains(_: u64) {
    unreachable!("AVX-512 exists on x86-64 only")
}

#[cfg(test)]
mod tests {
    /// The loops run and give rates a CPU can have (between 0.01 and 100 G/s).
    #[test]
    fn measures_plausible_rates() {
        let line = super::line();
        if !super::avx512f() {
            eprintln!("skipped: this CPU has no AVX-512F ({line})");
            return;
        }
        let rates: Vec<f64> = line
            .split(' ')
            .filter_map(|word| word.parse().ok())
            .collect();
        assert!(!rates.is_empty(), "no rate in {line:?}");
        assert!(rates.iter().all(|r| (0.01..100.0).contains(r)), "{line}");
    }
}
