//! Choosing the compute device from `auto`, `cpu` or `cuda:N`, describing it for the run log, and
//! watching how much memory a run takes on it.

use anyhow::{bail, Result};
use candle_core::Device;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda(usize),
}

pub fn parse(s: &str) -> Result<DeviceRequest> {
    match s {
        "auto" => Ok(DeviceRequest::Auto),
        "cpu" => Ok(DeviceRequest::Cpu),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(DeviceRequest::Cuda(n)),
            None if s == "cuda" => Ok(DeviceRequest::Cuda(0)),
            None => bail!("`{s}` is not a device; use \"auto\", \"cpu\" or \"cuda:N\""),
        },
    }
}

/// Opens the device; `auto` takes GPU 0 when this build has CUDA and a GPU answers.
pub fn open(s: &str) -> Result<Device> {
    match parse(s)? {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        DeviceRequest::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                bail!("device cuda:{n} was asked for, but this build has no CUDA support (build with --features cuda)");
            }
            Device::new_cuda(n).map_err(|e| anyhow::anyhow!("cannot open GPU cuda:{n}: {e}"))
        }
    }
}

/// Total and free memory of a device in bytes: a GPU's own memory, or the machine's RAM for the CPU.
#[derive(Debug, Clone, Copy)]
pub struct MemoryInfo {
    pub total: u64,
    pub free: u64,
}

/// What the device has now, where the platform tells it.
pub fn memory(device: &Device) -> Option<MemoryInfo> {
    match device {
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let field = |name: &str| proc_kib(&meminfo, name);
            Some(MemoryInfo {
                total: field("MemTotal:")?,
                free: field("MemAvailable:")?,
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some(MemoryInfo {
                total: total as u64,
                free: free as u64,
            })
        }
        _ => None,
    }
}

/// The device for the run log: `cpu (2 threads, 25.28 GB, 24.63 GB free RAM; AVX2+FMA, bf16
/// weights widened to f32)`,
/// `cuda:0 NVIDIA H100 80GB HBM3 (85.0 GB, 84.5 GB free)`.
pub fn describe(device: &Device) -> String {
    let mem = memory(device)
        .map(|m| format!("{}, {} free", gb(m.total), gb(m.free)))
        .unwrap_or_else(|| "memory unknown".into());
    match device {
        Device::Cpu => format!(
            "cpu ({} threads, {mem} RAM; {})",
            candle_core::utils::get_num_threads(),
            crate::model::kernels::cpu_paths::describe()
        ),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let ctx = d.cuda_stream().context().clone();
            let name = ctx.name().unwrap_or_else(|_| "GPU".into());
            format!("cuda:{} {name} ({mem})", ctx.ordinal())
        }
        _ => format!("{device:?} ({mem})"),
    }
}

/// Bytes as decimal gigabytes with two places, the unit of every memory figure Feinschliff prints.
pub fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// The peak memory of a run, measured from [`PeakMemory::watch`] to [`PeakMemory::finish`].
#[derive(Debug, Clone, Copy)]
pub enum MemoryPeak {
    /// The process's peak resident set size (CPU runs).
    ProcessRss(u64),
    /// The most GPU memory in use beyond what was in use when watching began (weights, activations,
    /// the allocator's pool), sampled every few milliseconds, and the GPU's total.
    Gpu { peak: u64, total: u64 },
}

impl std::fmt::Display for MemoryPeak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryPeak::ProcessRss(b) => write!(f, "peak RSS {}", gb(*b)),
            MemoryPeak::Gpu { peak, total } => {
                write!(f, "peak GPU memory {} of {}", gb(*peak), gb(*total))
            }
        }
    }
}

/// Watches a device's memory use while a run goes on: on a GPU a thread samples the device's free
/// memory (candle's CUDA allocator has no peak counter); on the CPU the kernel's VmHWM is the peak.
pub struct PeakMemory {
    device: Device,
    baseline: u64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl PeakMemory {
    /// Starts watching; what is in use now counts as the baseline.
    pub fn watch(device: &Device) -> Self {
        let in_use = |m: MemoryInfo| m.total.saturating_sub(m.free);
        let baseline = match device {
            Device::Cpu => 0,
            _ => memory(device).map(in_use).unwrap_or(0),
        };
        let peak = Arc::new(AtomicU64::new(baseline));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = (!device.is_cpu()).then(|| {
            let (device, peak, stop) = (device.clone(), peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(m) = memory(&device) {
                        peak.fetch_max(in_use(m), Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
        });
        Self {
            device: device.clone(),
            baseline,
            peak,
            stop,
            sampler,
        }
    }

    /// Stops watching and returns the peak, or None where the platform does not tell memory use.
    pub fn finish(mut self) -> Option<MemoryPeak> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
        }
        match self.device {
            Device::Cpu => peak_rss_bytes().map(MemoryPeak::ProcessRss),
            _ => memory(&self.device).map(|m| MemoryPeak::Gpu {
                peak: self
                    .peak
                    .load(Ordering::Relaxed)
                    .max(m.total - m.free)
                    .saturating_sub(self.baseline),
                total: m.total,
            }),
        }
    }
}

/// The process's peak resident set size (VmHWM), where /proc tells it.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_kib(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmHWM:",
    )
}

/// A `Name:   123 kB` line of a /proc file, in bytes.
fn proc_kib(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
