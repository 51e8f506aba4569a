//! Finding and loading ONNX Runtime (the `ort` crate's `load-dynamic` mode).
//!
//! The library is looked up, in order: an explicit path (a CLI flag), `$ORT_DYLIB_PATH`, then
//! the project venv made by `scripts/setup.sh` (`.venv/site-packages/onnxruntime/capi/`) in the
//! executable's folder or any folder above it, which covers `target/<profile>/recontrol` and
//! test binaries in `target/<profile>/deps/`. ONNX Runtime API level 17 (1.17) or newer loads.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The environment variable `ort` itself reads.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Where the project venv keeps the onnxruntime wheel's shared library.
const VENV_CAPI: &str = ".venv/site-packages/onnxruntime/capi";

/// The path of the ONNX Runtime shared library to load.
pub fn locate_onnxruntime(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os(ORT_DYLIB_ENV) {
        return Ok(PathBuf::from(path));
    }
    let mut searched = Vec::new();
    let exe = std::env::current_exe().ok();
    for dir in exe.iter().flat_map(|e| e.ancestors().skip(1)) {
        let capi = dir.join(VENV_CAPI);
        if let Some(lib) = newest_library(&capi) {
            return Ok(lib);
        }
        searched.push(capi);
    }
    Err(Error::OnnxRuntimeNotFound {
        env: ORT_DYLIB_ENV,
        searched: searched
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// `libonnxruntime.so.<version>` (or `libonnxruntime.so`) in `dir`, the highest version first.
fn newest_library(dir: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so") || n == "libonnxruntime.dylib")
        })
        .collect();
    libs.sort_by_key(|p| version_key(p));
    libs.pop()
}

fn version_key(path: &Path) -> Vec<u64> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    name.trim_start_matches("libonnxruntime.so")
        .split('.')
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// A loaded ONNX Runtime with its global environment.
#[derive(Debug)]
pub struct OrtRuntime {
    /// The library that was loaded.
    pub path: PathBuf,
    /// ONNX Runtime's own build description (version, git commit).
    pub build_info: String,
    environment: ort::environment::Environment,
}

/// The process's ONNX Runtime: it has one environment per process, so the first load is kept.
static LOADED: std::sync::Mutex<Option<&'static OrtRuntime>> = std::sync::Mutex::new(None);

impl OrtRuntime {
    /// Locates (see [`locate_onnxruntime`]) and loads ONNX Runtime, once per process: later
    /// calls return the same runtime (or refuse a different library).
    pub fn load(explicit: Option<&Path>) -> Result<&'static Self> {
        let path = locate_onnxruntime(explicit)?;
        let mut loaded = LOADED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(rt) = *loaded {
            if explicit.is_some() && rt.path != path {
                return Err(Error::OnnxRuntimeLoad {
                    path,
                    message: format!("ONNX Runtime is already loaded from {}", rt.path.display()),
                });
            }
            return Ok(rt);
        }
        let rt: &'static Self = Box::leak(Box::new(Self::init(path)?));
        *loaded = Some(rt);
        Ok(rt)
    }

    fn init(path: PathBuf) -> Result<Self> {
        let load_error = |message: String| Error::OnnxRuntimeLoad {
            path: path.clone(),
            message,
        };
        if !path.is_file() {
            return Err(load_error("no such file".to_owned()));
        }
        let environment = ort::init_from(&path)
            .map_err(|e| load_error(e.to_string()))?
            .with_name("recontrol")
            .build()
            .map_err(|e| load_error(e.to_string()))?;
        Ok(Self {
            build_info: ort::info().to_owned(),
            path,
            environment,
        })
    }

    /// The environment sessions are built on.
    pub fn environment(&self) -> &ort::environment::Environment {
        &self.environment
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_highest_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "libonnxruntime.so.1.9.0",
            "libonnxruntime.so.1.32.0",
            "libonnxruntime_providers_shared.so",
            "x.so",
        ] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        let lib = newest_library(dir.path()).expect("found");
        assert_eq!(
            lib.file_name().and_then(|n| n.to_str()),
            Some("libonnxruntime.so.1.32.0")
        );
    }

    #[test]
    fn explicit_path_wins() -> Result<()> {
        assert_eq!(
            locate_onnxruntime(Some(Path::new("/x/libort.so")))?,
            PathBuf::from("/x/libort.so")
        );
        Ok(())
    }

    #[test]
    fn finds_and_loads_the_project_venv_runtime() -> Result<()> {
        // Test binaries live in target/debug/deps: the search walks up to the repo's .venv.
        if std::env::var_os(ORT_DYLIB_ENV).is_some() {
            return Ok(()); // a user override is in force; the search is not what is tested then
        }
        let rt = OrtRuntime::load(None)?;
        assert!(rt
            .path
            .to_string_lossy()
            .contains(".venv/site-packages/onnxruntime/capi/"));
        assert!(
            rt.build_info.contains("ORT Build Info"),
            "{}",
            rt.build_info
        );
        Ok(())
    }
}
