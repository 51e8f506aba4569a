//! Flag groups shared by subcommands.

use clap::{Args, ValueEnum};
use recontrol_lm::{DType, DeviceSpec};
use serde::{Serialize, Serializer};

/// Where and in which precision a model runs.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DeviceArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    #[serde(serialize_with = "as_display")]
    pub device: DeviceSpec,
    /// Weight and activation dtype.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
}

fn as_display<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse().map_err(|e: recontrol_lm::Error| e.to_string())
}

/// `--dtype` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::Bf16,
            DTypeArg::F16 => DType::F16,
        }
    }
}
