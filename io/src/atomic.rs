//! Outputs that appear complete or not at all: a file is written under a temporary name in its
//! folder and renamed when complete; a folder is filled under a hidden name beside its place
//! (`.<name>.tmp`) and renamed into it.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tempfile::NamedTempFile;

use crate::{Error, Result};

/// The folder `path` is written in (its parent, or `.` for a bare name), which must exist.
/// A file output (`temp_file_beside`) must not be a folder.
pub fn existing_folder(path: &Path) -> Result<&Path> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::MissingFolder {
            file: path.to_owned(),
            dir: dir.to_owned(),
        });
    }
    Ok(dir)
}

/// How temporary files end: `.<name>.XXXXXX.recontrol.part` beside the file `<name>` they
/// become.
pub(crate) const TEMP_SUFFIX: &str = ".recontrol.part";

/// Whether `file` is a temporary file of a write of the file `name` (`.<name>.XXXXXX` with six
/// random letters or digits, then [`TEMP_SUFFIX`]).
fn is_temp_of(file: &str, name: &str) -> bool {
    file.strip_prefix('.')
        .and_then(|f| f.strip_prefix(name))
        .and_then(|f| f.strip_prefix('.'))
        .and_then(|f| f.strip_suffix(TEMP_SUFFIX))
        .is_some_and(|random| {
            random.len() == 6 && random.chars().all(|c| c.is_ascii_alphanumeric())
        })
}

/// An empty temporary file (`.<name>.XXXXXX.recontrol.part`) in the folder of `path`; removed
/// when dropped unless persisted. A killed process cannot remove it, so the temporary files
/// that earlier writes of `path` left are removed first (one writer per output).
pub(crate) fn temp_file_beside(path: &Path) -> Result<NamedTempFile> {
    if path.is_dir() {
        return Err(Error::IsAFolder {
            path: path.to_owned(),
        });
    }
    let dir = existing_folder(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::NoFileName {
            path: path.to_owned(),
        })?
        .to_string_lossy()
        .into_owned();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if is_temp_of(&entry.file_name().to_string_lossy(), &name) {
                let stale = entry.path();
                std::fs::remove_file(&stale).map_err(|source| Error::Remove {
                    path: stale.clone(),
                    source,
                })?;
            }
        }
    }
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(TEMP_SUFFIX)
        .tempfile_in(dir)
        .map_err(|source| Error::CreateFile {
            file: path.to_owned(),
            dir: dir.to_owned(),
            source,
        })
}

/// Renames a finished temporary file to `path` (replacing a file there).
pub(crate) fn persist(temp: NamedTempFile, path: &Path) -> Result<()> {
    temp.persist(path).map_err(|e| Error::Rename {
        path: path.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Writes `bytes` to `path` under a temporary name in the same folder and renames it into
/// place (replacing a file there). On failure nothing is left behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut temp = temp_file_beside(path)?;
    temp.write_all(bytes).map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })?;
    persist(temp, path)
}

/// Writes `value` as pretty JSON (and a final newline) to `path`, as [`write_atomic`] does.
pub fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| Error::Json {
        path: path.to_owned(),
        source,
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Whether anything (a file, a folder, a link) is at `path`.
fn occupied(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// A folder written under a hidden temporary name beside its place, `.<name>.tmp`, and renamed
/// into place by [`commit`](Self::commit). Dropped without a commit, it removes the temporary
/// folder, so an output folder is never seen half written.
#[derive(Debug)]
pub struct AtomicDir {
    temp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Starts the folder `out`, which must not exist (its parent must). A temporary folder left
    /// by a killed run is removed first.
    pub fn create(out: &Path) -> Result<Self> {
        if occupied(out) {
            return Err(Error::Exists {
                path: out.to_owned(),
            });
        }
        let name = out.file_name().ok_or_else(|| Error::NoFileName {
            path: out.to_owned(),
        })?;
        let parent = existing_folder(out)?;
        let mut temp_name = OsString::from(".");
        temp_name.push(name);
        temp_name.push(".tmp");
        let temp = parent.join(temp_name);
        if temp.is_dir() {
            std::fs::remove_dir_all(&temp)
        } else if occupied(&temp) {
            std::fs::remove_file(&temp)
        } else {
            Ok(())
        }
        .map_err(|source| Error::Remove {
            path: temp.clone(),
            source,
        })?;
        std::fs::create_dir(&temp).map_err(|source| Error::CreateDir {
            path: temp.clone(),
            source,
        })?;
        Ok(Self {
            temp,
            out: out.to_owned(),
            committed: false,
        })
    }

    /// The temporary folder: write the output's files here.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// Where the folder goes on [`commit`](Self::commit).
    pub fn target(&self) -> &Path {
        &self.out
    }

    /// Renames the finished folder into place. Refused if something has appeared there
    /// meanwhile (the temporary folder is then removed).
    pub fn commit(mut self) -> Result<()> {
        if occupied(&self.out) {
            return Err(Error::Exists {
                path: self.out.clone(),
            });
        }
        std::fs::rename(&self.temp, &self.out).map_err(|source| Error::Rename {
            path: self.out.clone(),
            source,
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_file_is_written_and_replaced_whole() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.json");
        write_json_atomic(&path, &serde_json::json!({"x": 1}))?;
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "{\n  \"x\": 1\n}\n"
        );
        write_atomic(&path, b"second")?;
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        assert_eq!(entries(dir.path()), ["a.json"]);
        Ok(())
    }

    #[test]
    fn a_killed_writes_temporary_file_goes_with_the_next_write_of_its_file() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        // What a write of a.json killed before its rename leaves, and a write of b.json's.
        let killed = dir.path().join(".a.json.Xy12Zw.recontrol.part");
        let other = dir.path().join(".b.json.Ab34Cd.recontrol.part");
        for path in [&killed, &other] {
            std::fs::write(path, b"half").expect("write");
        }
        write_atomic(&dir.path().join("a.json"), b"whole")?;
        assert_eq!(
            entries(dir.path()),
            [".b.json.Ab34Cd.recontrol.part", "a.json"]
        );
        assert!(is_temp_of(".a.json.Xy12Zw.recontrol.part", "a.json"));
        assert!(!is_temp_of(".a.json.Xy12Zw.recontrol.part", "a"));
        assert!(!is_temp_of(".a.json.tmp.recontrol.part", "a.json"));
        Ok(())
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The target folder is missing: an error naming it, and no file anywhere.
        let path = dir.path().join("missing/a.json");
        let err = write_atomic(&path, b"x").expect_err("missing folder");
        assert!(
            err.to_string().ends_with(&format!(
                "a.json: folder {} does not exist",
                dir.path().join("missing").display()
            )),
            "{err}"
        );
        assert!(entries(dir.path()).is_empty());
        // A folder is in the way: refused before anything is written.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).expect("mkdir");
        std::fs::write(blocked.join("inside"), b"keep").expect("write");
        let err = write_atomic(&blocked, b"x").expect_err("a folder in the way");
        assert!(matches!(err, Error::IsAFolder { .. }), "{err}");
        assert_eq!(entries(dir.path()), ["blocked"]);
        assert_eq!(entries(&blocked), ["inside"]);
    }

    #[test]
    fn a_folder_appears_only_on_commit() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("model");
        let temp = AtomicDir::create(&out)?;
        assert_eq!(temp.target(), out);
        std::fs::write(temp.path().join("config.json"), b"{}").expect("write");
        assert!(!out.exists());
        assert_eq!(entries(dir.path()), [".model.tmp"]);
        temp.commit()?;
        assert_eq!(entries(dir.path()), ["model"]);
        assert_eq!(entries(&out), ["config.json"]);
        Ok(())
    }

    #[test]
    fn a_folder_dropped_without_commit_leaves_nothing() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("model");
        {
            let temp = AtomicDir::create(&out)?;
            std::fs::create_dir(temp.path().join("sub")).expect("mkdir");
            std::fs::write(temp.path().join("sub/w"), b"1").expect("write");
        }
        assert!(entries(dir.path()).is_empty());
        Ok(())
    }

    #[test]
    fn a_folder_is_never_committed_over_an_existing_path() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("model");
        // Something appears at the output while the folder is written: refused, kept as it is.
        let temp = AtomicDir::create(&out)?;
        std::fs::write(temp.path().join("mine"), b"new").expect("write");
        std::fs::create_dir(&out).expect("mkdir");
        let err = temp.commit().expect_err("occupied");
        assert!(
            err.to_string()
                .ends_with("model: exists; remove it or choose another name"),
            "{err}"
        );
        assert_eq!(entries(dir.path()), ["model"]);
        assert!(entries(&out).is_empty());
        // And an existing output is refused from the start.
        let err = AtomicDir::create(&out).expect_err("exists");
        assert!(matches!(err, Error::Exists { .. }), "{err}");
        Ok(())
    }

    #[test]
    fn a_killed_runs_leftover_is_replaced() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let leftover = dir.path().join(".model.tmp");
        std::fs::create_dir(&leftover).expect("mkdir");
        std::fs::write(leftover.join("stale"), b"old").expect("write");
        let temp = AtomicDir::create(&dir.path().join("model"))?;
        assert!(entries(temp.path()).is_empty());
        temp.commit()?;
        assert_eq!(entries(dir.path()), ["model"]);
        Ok(())
    }

    #[test]
    fn a_folder_needs_its_parent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = AtomicDir::create(&dir.path().join("no/model")).expect_err("no parent");
        assert!(matches!(err, Error::MissingFolder { .. }), "{err}");
        assert!(entries(dir.path()).is_empty());
    }
}
