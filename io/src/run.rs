//! Names beside an output, the folders of a resumable training run, and the provenance every
//! output records.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Version, git revision and command line of the program that made an output. The binary
/// fills it in (it knows its git revision); libraries take it from their caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub recontrol_version: String,
    pub git_revision: String,
    pub command_line: Vec<String>,
}

/// `<path><suffix>` beside `path` (e.g. `OUT.work`, `FILE.config.json`).
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// `<file>.config.json`: how `path` was made.
pub fn config_path(path: &Path) -> PathBuf {
    sibling(path, ".config.json")
}

/// Where a training run writing `out` keeps its checkpoint and logs: `OUT.work`.
pub fn work_dir(out: &Path) -> PathBuf {
    sibling(out, ".work")
}

/// Where a training run keeps what it needs until its output is complete: `OUT.work/` with the
/// checkpoint, and the TensorBoard folder (default `OUT.work/logs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkDirs {
    pub work: PathBuf,
    pub checkpoint: PathBuf,
    pub logdir: PathBuf,
}

impl WorkDirs {
    /// The folders of a run writing `out` (whose folder must exist); an interrupted run's
    /// checkpoint is an error unless `resume`. Nothing is created until [`WorkDirs::create`],
    /// so a run refused over its inputs leaves nothing behind.
    pub fn prepare(out: &Path, resume: bool, logdir: Option<&Path>) -> Result<Self> {
        crate::atomic::existing_folder(out)?;
        let work = work_dir(out);
        let checkpoint = work.join("checkpoint.safetensors");
        if checkpoint.exists() && !resume {
            return Err(Error::InterruptedRun { work });
        }
        let logdir = logdir.map_or_else(|| work.join("logs"), Path::to_path_buf);
        Ok(Self {
            work,
            checkpoint,
            logdir,
        })
    }

    /// Creates the work folder and the log folder (when training starts).
    pub fn create(&self) -> Result<()> {
        for path in [&self.work, &self.logdir] {
            std::fs::create_dir_all(path).map_err(|source| Error::CreateDir {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_beside_an_output() {
        let out = Path::new("runs/value");
        assert_eq!(work_dir(out), Path::new("runs/value.work"));
        assert_eq!(
            config_path(Path::new("g.jsonl")),
            Path::new("g.jsonl.config.json")
        );
        assert_eq!(sibling(out, ".parts"), Path::new("runs/value.parts"));
    }

    #[test]
    fn an_interrupted_run_needs_resume() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("rm");
        let dirs = WorkDirs::prepare(&out, false, None)?;
        assert!(
            !dirs.work.exists(),
            "nothing is created before training starts"
        );
        dirs.create()?;
        assert_eq!(dirs.work, dir.path().join("rm.work"));
        assert!(dirs.logdir.is_dir() && dirs.logdir == dirs.work.join("logs"));
        std::fs::write(&dirs.checkpoint, b"").expect("write");
        let err = WorkDirs::prepare(&out, false, None).expect_err("interrupted");
        assert_eq!(
            err.to_string(),
            format!(
                "{} holds an interrupted run; pass --resume to continue it, or remove it",
                dirs.work.display()
            )
        );
        assert_eq!(WorkDirs::prepare(&out, true, None)?, dirs);
        Ok(())
    }
}
