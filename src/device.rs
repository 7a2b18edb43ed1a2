//! Choosing the compute device from `auto`, `cpu` or `cuda:N`.

use anyhow::{bail, Result};
use candle_core::Device;

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

/// A short name for logs.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
