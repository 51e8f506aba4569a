//! [`Store`]: opens a store (its layout checked), reads rollouts, writes rewards back.

use std::path::{Path, PathBuf};

use hdf5::types::VarLenUnicode;
use ndarray::{s, Array1, Array2};

use super::{
    close_on_exec, hdf5_error, strong_close, Result, Rollout, StateDtype, StoreError, StoreMeta,
    FORMAT_VERSION,
};

/// Reading: a strong close and a 16 MiB chunk cache, so that reads of neighbouring rows do
/// not decompress a chunk again.
fn reading(
    fapl: &mut hdf5::plist::file_access::FileAccessBuilder,
) -> &mut hdf5::plist::file_access::FileAccessBuilder {
    strong_close(fapl).chunk_cache(1021, 16 << 20, 0.75)
}

/// A store opened for reading, its layout checked.
pub struct Store {
    path: PathBuf,
    /// The states dataset, held open so its chunk cache lasts across reads (declared before
    /// `file`, so it is closed first).
    states: hdf5::Dataset,
    file: hdf5::File,
    meta: StoreMeta,
    rollout_offsets: Vec<i64>,
    token_offsets: Vec<i64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("rollouts", &self.len())
            .finish()
    }
}

impl Store {
    /// Opens a store and checks its layout; a truncated, corrupt or foreign file is an error
    /// naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_mode(path, false)
    }

    /// Opens a store for reading and writing rewards.
    pub fn open_rw(path: &Path) -> Result<Self> {
        Self::open_mode(path, true)
    }

    fn open_mode(path: &Path, rw: bool) -> Result<Self> {
        let layout = |message: String| StoreError::Layout {
            path: path.to_owned(),
            message,
        };
        if !path.is_file() {
            return Err(StoreError::Missing {
                path: path.to_owned(),
            });
        }
        let mut options = hdf5::File::with_options();
        options.with_fapl(reading);
        let opened = if rw {
            options.open_rw(path)
        } else {
            options.open(path)
        };
        let file = opened
            .map_err(|e| layout(format!("cannot open as HDF5 (truncated or corrupt?): {e}")))?;
        close_on_exec(&file);
        let version: i64 = file
            .attr("format_version")
            .and_then(|a| a.read_scalar())
            .map_err(|_| layout("no format_version attribute".to_owned()))?;
        if version != FORMAT_VERSION {
            return Err(layout(format!(
                "format_version {version}; this recontrol reads {FORMAT_VERSION}"
            )));
        }
        let meta_json: VarLenUnicode = file
            .attr("meta")
            .and_then(|a| a.read_scalar())
            .map_err(|_| layout("no meta attribute".to_owned()))?;
        let meta: StoreMeta = serde_json::from_str(meta_json.as_str())
            .map_err(|e| layout(format!("meta attribute: {e}")))?;
        // Every dataset must hold the element type this reader asks for, checked before any
        // read: libhdf5 converts between float types of any declared size, and a corrupt size
        // makes it copy past its buffers.
        // Sizes come from the file: none may claim more data than the file could hold (the
        // bound every reader allocates within: 64 times the file's length, plus 16 MiB).
        let file_len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let limit = file_len.saturating_mul(64).saturating_add(16 << 20);
        let typed = |name: &str, expected: hdf5::types::TypeDescriptor| -> Result<hdf5::Dataset> {
            let dataset = file
                .dataset(name)
                .map_err(|e| layout(format!("dataset {name}: {e}")))?;
            let found = dataset
                .dtype()
                .and_then(|t| t.to_descriptor())
                .map_err(|e| layout(format!("dataset {name}: element type: {e}")))?;
            if found != expected {
                return Err(layout(format!(
                    "dataset {name} holds {found} elements, expected {expected}"
                )));
            }
            let bytes = (dataset.size() as u64).saturating_mul(expected.size() as u64);
            if bytes > limit {
                return Err(layout(format!(
                    "dataset {name} claims {} elements, more than a {file_len}-byte file holds",
                    dataset.size()
                )));
            }
            Ok(dataset)
        };
        use hdf5::H5Type;
        let states_type = match meta.state_dtype {
            StateDtype::F32 => f32::type_descriptor(),
            StateDtype::F16 => half::f16::type_descriptor(),
        };
        for (name, expected) in [
            ("rollout_offsets", i64::type_descriptor()),
            ("token_offsets", i64::type_descriptor()),
            ("prompt_index", i64::type_descriptor()),
            ("response_tokens", i64::type_descriptor()),
            ("reward", f32::type_descriptor()),
            ("prompt", VarLenUnicode::type_descriptor()),
            ("response", VarLenUnicode::type_descriptor()),
            ("states", states_type),
        ] {
            typed(name, expected)?;
        }
        let read_i64 = |name: &str| -> Result<Vec<i64>> {
            file.dataset(name)
                .and_then(|d| d.read_raw::<i64>())
                .map_err(|e| layout(format!("dataset {name}: {e}")))
        };
        let rollout_offsets = read_i64("rollout_offsets")?;
        let token_offsets = read_i64("token_offsets")?;
        let r = rollout_offsets.len().saturating_sub(1);
        let states = file
            .dataset("states")
            .map_err(|e| layout(format!("dataset states: {e}")))?;
        let shape = states.shape();
        if shape.len() != 2 || shape[1] != meta.hidden_size {
            return Err(layout(format!(
                "states has shape {shape:?}, expected [S, {}]",
                meta.hidden_size
            )));
        }
        let monotone = |v: &[i64]| v.first() == Some(&0) && v.windows(2).all(|w| w[0] <= w[1]);
        if !monotone(&rollout_offsets) || rollout_offsets.last().copied() != Some(shape[0] as i64) {
            return Err(layout(format!(
                "rollout_offsets do not run from 0 up to the {} state rows",
                shape[0]
            )));
        }
        let n_tokens = file
            .dataset("response_tokens")
            .map_err(|e| layout(format!("dataset response_tokens: {e}")))?
            .size();
        if token_offsets.len() != r + 1
            || !monotone(&token_offsets)
            || token_offsets.last().copied() != Some(n_tokens as i64)
        {
            return Err(layout(format!(
                "token_offsets do not match {r} rollouts and {n_tokens} tokens"
            )));
        }
        for name in ["prompt_index", "prompt", "response", "reward"] {
            let n = file
                .dataset(name)
                .map_err(|e| layout(format!("dataset {name}: {e}")))?
                .size();
            if n != r {
                return Err(layout(format!(
                    "dataset {name} has {n} entries for {r} rollouts"
                )));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            states,
            file,
            meta,
            rollout_offsets,
            token_offsets,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the store was made.
    pub fn meta(&self) -> &StoreMeta {
        &self.meta
    }

    /// Number of rollouts.
    pub fn len(&self) -> usize {
        self.rollout_offsets.len() - 1
    }

    /// Whether the store holds no rollouts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of state rows.
    pub fn num_states(&self) -> usize {
        self.rollout_offsets.last().copied().unwrap_or(0) as usize
    }

    /// State rows of each rollout: `rollout_offsets`.
    pub fn rollout_offsets(&self) -> &[i64] {
        &self.rollout_offsets
    }

    fn err(&self) -> impl Fn(hdf5::Error) -> StoreError + '_ {
        hdf5_error(&self.path)
    }

    pub(super) fn read_states(&self, rows: std::ops::Range<usize>) -> Result<Array2<f32>> {
        let ds = &self.states;
        match self.meta.state_dtype {
            StateDtype::F32 => ds.read_slice_2d::<f32, _>(s![rows, ..]),
            StateDtype::F16 => ds
                .read_slice_2d::<half::f16, _>(s![rows, ..])
                .map(|a| a.mapv(half::f16::to_f32)),
        }
        .map_err(self.err())
    }

    fn read_1d<T: hdf5::H5Type>(
        &self,
        name: &str,
        range: std::ops::Range<usize>,
    ) -> Result<Array1<T>> {
        self.file
            .dataset(name)
            .and_then(|d| d.read_slice_1d::<T, _>(s![range]))
            .map_err(self.err())
    }

    /// One rollout.
    pub fn rollout(&self, index: usize) -> Result<Rollout> {
        if index >= self.len() {
            return Err(StoreError::OutOfRange {
                path: self.path.clone(),
                index,
                len: self.len(),
            });
        }
        let rows = self.rollout_offsets[index] as usize..self.rollout_offsets[index + 1] as usize;
        let toks = self.token_offsets[index] as usize..self.token_offsets[index + 1] as usize;
        let one = index..index + 1;
        let text = |name: &str| -> Result<String> {
            Ok(self.read_1d::<VarLenUnicode>(name, one.clone())?[0]
                .as_str()
                .to_owned())
        };
        Ok(Rollout {
            prompt_index: self.read_1d::<i64>("prompt_index", one.clone())?[0],
            prompt: text("prompt")?,
            response: text("response")?,
            tokens: self.read_1d::<i64>("response_tokens", toks)?.to_vec(),
            states: self.read_states(rows)?,
            reward: self.read_1d::<f32>("reward", one.clone())?[0],
        })
    }

    /// Every rollout's reward (NaN where unlabelled).
    pub fn rewards(&self) -> Result<Vec<f32>> {
        Ok(self.read_1d::<f32>("reward", 0..self.len())?.to_vec())
    }

    /// Every rollout's prompt and response text, in order.
    pub fn texts(&self) -> Result<Vec<(String, String)>> {
        let prompts = self.read_1d::<VarLenUnicode>("prompt", 0..self.len())?;
        let responses = self.read_1d::<VarLenUnicode>("response", 0..self.len())?;
        Ok(prompts
            .iter()
            .zip(responses.iter())
            .map(|(p, r)| (p.as_str().to_owned(), r.as_str().to_owned()))
            .collect())
    }

    /// Overwrites rewards `start..start + values.len()` (store opened with [`Store::open_rw`]).
    pub fn write_rewards(&self, start: usize, values: &[f32]) -> Result<()> {
        let end = start + values.len();
        if end > self.len() {
            return Err(StoreError::OutOfRange {
                path: self.path.clone(),
                index: end.saturating_sub(1),
                len: self.len(),
            });
        }
        let ds = self.file.dataset("reward").map_err(self.err())?;
        ds.write_slice(values, s![start..end]).map_err(self.err())?;
        self.file.flush().map_err(self.err())
    }

    /// The state rows of rollout `i`.
    pub(super) fn rollout_rows(&self, i: usize) -> std::ops::Range<usize> {
        self.rollout_offsets[i] as usize..self.rollout_offsets[i + 1] as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{meta, rollouts, write};

    #[test]
    fn round_trips_in_both_dtypes() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let rs = rollouts(10);
        for dtype in [StateDtype::F32, StateDtype::F16] {
            let path = dir.path().join(format!("{}.h5", dtype.as_str()));
            write(&path, dtype, &rs)?;
            let st = Store::open(&path)?;
            assert_eq!(st.len(), 10);
            assert_eq!(st.meta(), &meta(3, dtype));
            assert_eq!(
                st.num_states(),
                rs.iter().map(|r| r.tokens.len()).sum::<usize>()
            );
            for (i, r) in rs.iter().enumerate() {
                // Small integers are exact in f16 too.
                assert_eq!(&st.rollout(i)?, r);
            }
            assert!(matches!(st.rollout(10), Err(StoreError::OutOfRange { .. })));
        }
        Ok(())
    }

    #[test]
    fn rewards_can_be_written_back() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        write(&path, StateDtype::F32, &rollouts(5))?;
        Store::open_rw(&path)?.write_rewards(1, &[7.0, 8.0])?;
        assert_eq!(
            Store::open(&path)?.rewards()?,
            vec![0.0, 7.0, 8.0, 1.5, 2.0]
        );
        Ok(())
    }

    #[test]
    fn corrupt_and_foreign_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        write(&path, StateDtype::F32, &rollouts(50)).expect("write");
        let bytes = std::fs::read(&path).expect("read");
        let cut = dir.path().join("cut.h5");
        std::fs::write(&cut, &bytes[..bytes.len() / 3]).expect("write");
        let err = Store::open(&cut).expect_err("truncated").to_string();
        assert!(err.starts_with(&cut.display().to_string()), "{err}");
        let plain = dir.path().join("plain.h5");
        hdf5::File::create(&plain)
            .expect("create")
            .close()
            .expect("close");
        let err = Store::open(&plain).expect_err("no layout").to_string();
        assert!(
            err.contains("not a recontrol rollout store: no format_version"),
            "{err}"
        );
    }

    /// A store mutant (from the fuzz campaign) whose variable-length-string heap is corrupt:
    /// libhdf5 1.10.8 segfaulted inside `H5HG_read` reading its prompts, taking the process
    /// down; the bundled HDF5 2.2 reports it, and the reader names the file.
    #[test]
    fn a_corrupt_string_heap_is_an_error_not_a_crash() {
        use std::io::Read;
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/store/corrupt-vlen-heap.h5.gz");
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&fixture).expect("fixture"))
            .read_to_end(&mut bytes)
            .expect("gunzip");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("heap.h5");
        std::fs::write(&path, bytes).expect("write");
        let err = Store::open(&path)
            .and_then(|store| store.texts())
            .expect_err("corrupt heap")
            .to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
    }
}
