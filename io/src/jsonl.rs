//! Records as JSON lines: to a file that appears, with its `<file>.config.json` beside it, only
//! when complete, or to standard output.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tempfile::NamedTempFile;

use crate::atomic::{persist, temp_file_beside, write_json_atomic};
use crate::run::config_path;
use crate::{Error, Result};

/// A JSONL sink: a file written under a temporary name, or standard output.
#[derive(Debug)]
pub struct JsonlSink(Sink);

#[derive(Debug)]
enum Sink {
    File {
        path: PathBuf,
        temp: BufWriter<NamedTempFile>,
    },
    Stdout(std::io::Stdout),
}

impl JsonlSink {
    /// Writes to `path` (atomically; its folder must exist) or, without one, to standard output.
    pub fn create(path: Option<&Path>) -> Result<Self> {
        let Some(path) = path else {
            return Ok(Self(Sink::Stdout(std::io::stdout())));
        };
        Ok(Self(Sink::File {
            path: path.to_owned(),
            temp: BufWriter::new(temp_file_beside(path)?),
        }))
    }

    /// Writes one record as a line.
    pub fn write<T: Serialize + ?Sized>(&mut self, record: &T) -> Result<()> {
        let line = serde_json::to_string(record).map_err(Error::Record)?;
        match &mut self.0 {
            Sink::File { path, temp } => writeln!(temp, "{line}").map_err(|source| Error::Write {
                path: path.clone(),
                source,
            }),
            Sink::Stdout(out) => {
                let mut lock = out.lock();
                writeln!(lock, "{line}")
                    .and_then(|()| lock.flush())
                    .map_err(Error::Stdout)
            }
        }
    }

    /// Completes the output: writes `config` beside the file and renames the file into place.
    /// Standard output needs nothing.
    pub fn finish<C: Serialize + ?Sized>(self, config: &C) -> Result<()> {
        let Sink::File { path, temp } = self.0 else {
            return Ok(());
        };
        let temp = temp.into_inner().map_err(|e| Error::Write {
            path: path.clone(),
            source: e.into_error(),
        })?;
        write_json_atomic(&config_path(&path), config)?;
        persist(temp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_and_its_config_appear_on_finish() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let mut sink = JsonlSink::create(Some(&path))?;
        sink.write(&serde_json::json!({"a": 1}))?;
        sink.write(&serde_json::json!({"a": 2}))?;
        assert!(!path.exists());
        sink.finish(&serde_json::json!({"seed": 3}))?;
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        assert!(dir.path().join("out.jsonl.config.json").is_file());
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 2);
        Ok(())
    }

    #[test]
    fn an_unfinished_sink_leaves_nothing_and_a_missing_folder_is_named() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut sink = JsonlSink::create(Some(&dir.path().join("out.jsonl")))?;
        sink.write(&1)?;
        drop(sink);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);

        let missing = dir.path().join("nope");
        let err = JsonlSink::create(Some(&missing.join("out.jsonl"))).expect_err("missing");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: folder {} does not exist",
                missing.join("out.jsonl").display(),
                missing.display()
            )
        );
        Ok(())
    }
}
