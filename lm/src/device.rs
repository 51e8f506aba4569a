//! Device and dtype choices, parsed once and checked against what libtorch can do here.

use std::fmt;
use std::str::FromStr;

use tch::{Cuda, Device, Kind};

use crate::error::{Error, Result};

/// Where a model runs: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| Error::InvalidDevice(s.to_owned())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The libtorch device, after checking that it exists on this machine.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                let count = if Cuda::is_available() {
                    Cuda::device_count()
                } else {
                    0
                };
                if (n as i64) < count {
                    Ok(Device::Cuda(n))
                } else {
                    let available = match count {
                        0 => "libtorch sees no CUDA device on this machine".to_owned(),
                        c => format!("libtorch sees {c} CUDA device(s) (cuda:0..cuda:{})", c - 1),
                    };
                    Err(Error::DeviceUnavailable {
                        requested: self.to_string(),
                        available,
                    })
                }
            }
        }
    }
}

/// Floating-point type of a model's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    /// The libtorch kind.
    pub fn kind(self) -> Kind {
        match self {
            Self::F32 => Kind::Float,
            Self::Bf16 => Kind::BFloat16,
            Self::F16 => Kind::Half,
        }
    }
}

impl FromStr for DType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            _ => Err(Error::InvalidDtype(s.to_owned())),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() -> Result<()> {
        assert_eq!("cpu".parse::<DeviceSpec>()?, DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>()?, DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>()?, DeviceSpec::Cuda(3));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        Ok(())
    }

    #[test]
    fn missing_cuda_device_is_a_clear_error() {
        // No machine has 10,000 GPUs, so this fails everywhere with the same message shape.
        let err = DeviceSpec::Cuda(10_000)
            .resolve()
            .expect_err("no such device")
            .to_string();
        assert!(err.starts_with("device cuda:10000 requested but"), "{err}");
    }
}
