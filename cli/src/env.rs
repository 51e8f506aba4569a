//! `recontrol env`: what this binary finds at run time.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use recontrol_export::OrtRuntime;

/// Show the libtorch and ONNX Runtime this binary finds, and the devices they see.
#[derive(Debug, Clone, Args)]
pub struct EnvArgs {
    /// ONNX Runtime shared library to load instead of the discovered one.
    #[arg(long)]
    pub onnxruntime: Option<PathBuf>,
}

impl EnvArgs {
    pub fn run(self) -> Result<()> {
        println!(
            "recontrol {} (git {})",
            env!("CARGO_PKG_VERSION"),
            env!("RECONTROL_GIT_REVISION")
        );
        let cuda = tch::Cuda::is_available();
        println!(
            "libtorch: {} CPU threads; CUDA {}",
            tch::get_num_threads(),
            if cuda {
                format!("available, {} device(s)", tch::Cuda::device_count())
            } else {
                "not available".to_owned()
            }
        );
        let ort = OrtRuntime::load(self.onnxruntime.as_deref())?;
        println!("onnxruntime: {}", ort.path.display());
        println!("onnxruntime build: {}", ort.build_info.trim());
        Ok(())
    }
}
