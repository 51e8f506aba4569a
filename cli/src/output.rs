//! Output files written atomically (a temporary name in the same folder, renamed when complete)
//! with a `<file>.config.json` beside them that records how they were made.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

/// Version, git revision and command line of this binary, for run records.
#[derive(Debug, Serialize)]
pub struct Provenance {
    pub recontrol_version: &'static str,
    pub git_revision: &'static str,
    pub command_line: Vec<String>,
}

impl Provenance {
    pub fn current() -> Self {
        Self {
            recontrol_version: env!("CARGO_PKG_VERSION"),
            git_revision: env!("RECONTROL_GIT_REVISION"),
            command_line: std::env::args().collect(),
        }
    }
}

/// A JSONL sink: a file written under a temporary name, or standard output.
pub enum JsonlSink {
    File {
        path: PathBuf,
        temp: BufWriter<tempfile::NamedTempFile>,
    },
    Stdout(std::io::Stdout),
}

impl JsonlSink {
    /// Writes to `path` (atomically) or to standard output.
    pub fn create(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self::Stdout(std::io::stdout()));
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            anyhow::bail!(
                "--out {}: folder {} does not exist",
                path.display(),
                dir.display()
            );
        }
        let temp = tempfile::Builder::new()
            .prefix(".recontrol-")
            .suffix(".part")
            .tempfile_in(dir)
            .with_context(|| {
                format!(
                    "--out {}: cannot create a file in {}",
                    path.display(),
                    dir.display()
                )
            })?;
        Ok(Self::File {
            path: path.to_owned(),
            temp: BufWriter::new(temp),
        })
    }

    /// Writes one record as a line.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let line = serde_json::to_string(record)?;
        match self {
            Self::File { path, temp } => {
                writeln!(temp, "{line}").with_context(|| format!("--out {}", path.display()))
            }
            Self::Stdout(out) => {
                let mut lock = out.lock();
                writeln!(lock, "{line}")?;
                lock.flush()?;
                Ok(())
            }
        }
    }

    /// Completes the output: renames the file into place and writes `config` beside it.
    pub fn finish<C: Serialize>(self, config: &C) -> Result<()> {
        let Self::File { path, temp } = self else {
            return Ok(());
        };
        let temp = temp
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("--out {}", path.display()))?;
        write_json_atomic(&config_path(&path), config)?;
        temp.persist(&path).with_context(|| {
            format!(
                "--out {}: cannot rename the finished file into place",
                path.display()
            )
        })?;
        Ok(())
    }
}

/// `<path><suffix>` beside `path` (e.g. `OUT.work`, `FILE.config.json`).
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// `<file>.config.json`.
pub fn config_path(path: &Path) -> PathBuf {
    sibling(path, ".config.json")
}

/// Where a training command writing `out` keeps its checkpoint and logs: `OUT.work`.
pub fn work_dir(out: &Path) -> PathBuf {
    sibling(out, ".work")
}

/// Writes `bytes` under a temporary name and renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut temp = tempfile::Builder::new()
        .prefix(".recontrol-")
        .suffix(".part")
        .tempfile_in(dir)
        .with_context(|| format!("{}: cannot create a file", path.display()))?;
    temp.write_all(bytes)?;
    temp.persist(path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// Writes pretty JSON under a temporary name and renames it into place.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Where a training run keeps what it needs until its output is complete: `OUT.work/` with the
/// checkpoint, and the TensorBoard folder (default `OUT.work/logs`).
#[derive(Debug)]
pub struct WorkDirs {
    pub work: PathBuf,
    pub checkpoint: PathBuf,
    pub logdir: PathBuf,
}

impl WorkDirs {
    /// Prepares the folders of a run writing `out`; an interrupted run's checkpoint is an error
    /// unless `resume`.
    pub fn prepare(out: &Path, resume: bool, logdir: Option<&Path>) -> Result<Self> {
        let work = work_dir(out);
        let checkpoint = work.join("checkpoint.safetensors");
        if checkpoint.exists() && !resume {
            anyhow::bail!(
                "{} holds an interrupted run; pass --resume to continue it, or remove it",
                work.display()
            );
        }
        std::fs::create_dir_all(&work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        let logdir = logdir.map_or_else(|| work.join("logs"), Path::to_path_buf);
        std::fs::create_dir_all(&logdir)
            .with_context(|| format!("--logdir {}", logdir.display()))?;
        Ok(Self {
            work,
            checkpoint,
            logdir,
        })
    }
}
