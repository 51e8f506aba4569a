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

/// Whether the output `out` of a resumable run is already complete. Outputs are renamed into
/// place whole, so one that exists is complete: with `resume` that is no error but a finished
/// run resumed (a requeued job), and what a kill between the rename and the cleanup can leave
/// in `OUT.work` (the checkpoint, a checkpoint's temporary file) is removed. Without `resume`
/// an existing output is refused.
pub fn already_complete(out: &Path, resume: bool) -> Result<bool> {
    if out.symlink_metadata().is_err() {
        return Ok(false);
    }
    if !resume {
        return Err(Error::Exists {
            path: out.to_owned(),
        });
    }
    let work = work_dir(out);
    let checkpoint = work.join("checkpoint.safetensors");
    if checkpoint.exists() {
        std::fs::remove_file(&checkpoint).map_err(|source| Error::Remove {
            path: checkpoint,
            source,
        })?;
    }
    remove_temp_files(&work)?;
    Ok(true)
}

/// Whether `name` is a temporary file of an atomic write: ours (`.<file>.XXXXXX.recontrol.part`),
/// or `tempfile`'s default (`.tmpXXXXXX`), which safetensors' file writer uses for checkpoints.
fn is_temp_file(name: &str) -> bool {
    let tempfile_default = name
        .strip_prefix(".tmp")
        .is_some_and(|rest| rest.len() == 6 && rest.chars().all(|c| c.is_ascii_alphanumeric()));
    (name.starts_with('.') && name.ends_with(crate::atomic::TEMP_SUFFIX)) || tempfile_default
}

/// Removes the temporary files that writes killed before their rename left in `dir`, a folder
/// that belongs to one run (its `OUT.work`).
fn remove_temp_files(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && is_temp_file(&entry.file_name().to_string_lossy()) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| Error::Remove { path, source })?;
        }
    }
    Ok(())
}

impl WorkDirs {
    /// The folders of a run writing `out` (whose folder must exist); an interrupted run's
    /// checkpoint is an error unless `resume`. The temporary files of writes that a kill
    /// interrupted are removed. Nothing is created until [`WorkDirs::create`], so a run refused
    /// over its inputs leaves nothing behind.
    pub fn prepare(out: &Path, resume: bool, logdir: Option<&Path>) -> Result<Self> {
        crate::atomic::existing_folder(out)?;
        let work = work_dir(out);
        let checkpoint = work.join("checkpoint.safetensors");
        if checkpoint.exists() && !resume {
            return Err(Error::InterruptedRun { work });
        }
        remove_temp_files(&work)?;
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

    #[test]
    fn a_complete_output_is_refused_or_resumed_as_a_no_op() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("rm");
        assert!(!already_complete(&out, true)?);
        let dirs = WorkDirs::prepare(&out, false, None)?;
        dirs.create()?;
        // Killed after the output was renamed into place, before the checkpoint was removed,
        // with a checkpoint's temporary file left from an earlier kill.
        std::fs::create_dir(&out).expect("mkdir");
        std::fs::write(&dirs.checkpoint, b"").expect("write");
        let temp = dirs
            .work
            .join(".checkpoint.safetensors.abc123.recontrol.part");
        std::fs::write(&temp, b"half").expect("write");
        let err = already_complete(&out, false).expect_err("exists");
        assert!(matches!(err, Error::Exists { .. }), "{err}");
        assert!(already_complete(&out, true)?);
        assert!(!dirs.checkpoint.exists() && !temp.exists());
        assert!(dirs.logdir.is_dir(), "the logs are kept");
        Ok(())
    }

    #[test]
    fn preparing_removes_killed_writes_temporary_files() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("value");
        let dirs = WorkDirs::prepare(&out, false, None)?;
        dirs.create()?;
        let ours = dirs.work.join(".state.json.x1y2z3.recontrol.part");
        let safetensors = dirs.work.join(".tmpAb12Cd");
        let kept = dirs.work.join(".tmp-not-a-temp-file");
        for path in [&ours, &safetensors, &kept] {
            std::fs::write(path, b"half a checkpoint").expect("write");
        }
        WorkDirs::prepare(&out, true, None)?;
        assert!(!ours.exists() && !safetensors.exists() && kept.exists());
        Ok(())
    }
}
