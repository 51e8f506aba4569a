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

/// The path of the ONNX Runtime shared library to load: `explicit`, else `$ORT_DYLIB_PATH`,
/// else the project venv above this executable.
pub fn locate_onnxruntime(explicit: Option<&Path>) -> Result<PathBuf> {
    lookup(
        explicit,
        std::env::var_os(ORT_DYLIB_ENV),
        std::env::current_exe().ok().as_deref(),
    )
}

/// The lookup order of [`locate_onnxruntime`], with the environment's value and the
/// executable's path passed in.
fn lookup(
    explicit: Option<&Path>,
    env: Option<std::ffi::OsString>,
    exe: Option<&Path>,
) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = env {
        return Ok(PathBuf::from(path));
    }
    let mut searched = Vec::new();
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

    /// A fake tree: `root/.venv/.../capi/libonnxruntime.so.1.20.0` and an executable at
    /// `root/target/debug/deps/t`.
    fn venv_tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().expect("tempdir");
        let capi = root.path().join(VENV_CAPI);
        std::fs::create_dir_all(&capi).expect("capi");
        let lib = capi.join("libonnxruntime.so.1.20.0");
        std::fs::write(&lib, b"").expect("lib");
        let exe = root.path().join("target/debug/deps/t");
        (root, lib, exe)
    }

    #[test]
    fn looks_up_the_flag_then_the_environment_then_the_venv_above_the_executable() -> Result<()> {
        let (_root, lib, exe) = venv_tree();
        let env = || Some(std::ffi::OsString::from("/env/libonnxruntime.so"));
        let flag = Path::new("/x/libort.so");
        assert_eq!(lookup(Some(flag), env(), Some(&exe))?, flag);
        assert_eq!(
            lookup(None, env(), Some(&exe))?,
            Path::new("/env/libonnxruntime.so")
        );
        assert_eq!(lookup(None, None, Some(&exe))?, lib);
        Ok(())
    }

    #[test]
    fn names_every_folder_searched_when_nothing_is_found() {
        let root = tempfile::tempdir().expect("tempdir");
        let exe = root.path().join("bin/t");
        let err = lookup(None, None, Some(&exe))
            .expect_err("no venv")
            .to_string();
        assert!(err.contains("set ORT_DYLIB_PATH"), "{err}");
        let first = root.path().join("bin").join(VENV_CAPI);
        let second = root.path().join(VENV_CAPI);
        assert!(
            err.contains(&format!("{}, {}", first.display(), second.display())),
            "{err}"
        );
    }

    /// Test binaries live in target/debug/deps: the search walks up to the repo's .venv,
    /// whatever `$ORT_DYLIB_PATH` says, and that library loads. With the variable set,
    /// [`locate_onnxruntime`] returns it instead.
    #[test]
    fn finds_and_loads_the_project_venv_runtime() -> Result<()> {
        let exe = std::env::current_exe().ok();
        let venv = lookup(None, None, exe.as_deref())?;
        assert!(
            venv.to_string_lossy()
                .contains(".venv/site-packages/onnxruntime/capi/"),
            "{}",
            venv.display()
        );
        let want = std::env::var_os(ORT_DYLIB_ENV).map_or(venv.clone(), PathBuf::from);
        assert_eq!(locate_onnxruntime(None)?, want);
        let rt = OrtRuntime::load(Some(&venv))?;
        assert_eq!(rt.path, venv);
        assert!(
            rt.build_info.contains("ORT Build Info"),
            "{}",
            rt.build_info
        );
        Ok(())
    }
}
