//! [`StoreWriter`]: creates a store and appends rollouts to it.

use std::path::{Path, PathBuf};

use hdf5::types::VarLenUnicode;
use ndarray::{s, Array2};

use super::{
    close_on_exec, hdf5_error, strong_close, Result, Rollout, StateDtype, StoreError, StoreMeta,
    CHUNK_1D, CHUNK_ROWS, FORMAT_VERSION,
};

/// Appends rollouts to a new store.
pub struct StoreWriter {
    path: PathBuf,
    file: hdf5::File,
    hidden: usize,
    dtype: StateDtype,
    rollouts: usize,
    states: usize,
    tokens: usize,
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter")
            .field("path", &self.path)
            .field("rollouts", &self.rollouts)
            .finish()
    }
}

impl StoreWriter {
    /// Creates (or truncates) `path` with empty datasets and the metadata attributes.
    pub fn create(path: &Path, meta: &StoreMeta) -> Result<Self> {
        let err = hdf5_error(path);
        // No object timestamps: the same rollouts make the same bytes, whichever run wrote them.
        let file = hdf5::File::with_options()
            .with_fapl(strong_close)
            .with_fcpl(|p| p.obj_track_times(false))
            .create(path)
            .map_err(&err)?;
        close_on_exec(&file);
        let h = meta.hidden_size;
        let chunk_rows = chunk_rows(h, meta.state_dtype);
        let states = match meta.state_dtype {
            StateDtype::F32 => file.new_dataset::<f32>(),
            StateDtype::F16 => file.new_dataset::<half::f16>(),
        };
        states
            .obj_track_times(false)
            .chunk((chunk_rows, h))
            .shuffle()
            .deflate(1)
            .shape((0.., h))
            .create("states")
            .map_err(&err)?;
        for name in ["rollout_offsets", "token_offsets"] {
            let ds = file
                .new_dataset::<i64>()
                .obj_track_times(false)
                .chunk(CHUNK_1D)
                .deflate(1)
                .shape(1..)
                .create(name)
                .map_err(&err)?;
            ds.write_slice(&[0i64], s![0..1]).map_err(&err)?;
        }
        for name in ["response_tokens", "prompt_index"] {
            file.new_dataset::<i64>()
                .obj_track_times(false)
                .chunk(CHUNK_1D)
                .deflate(1)
                .shape(0..)
                .create(name)
                .map_err(&err)?;
        }
        for name in ["prompt", "response"] {
            file.new_dataset::<VarLenUnicode>()
                .obj_track_times(false)
                .chunk(CHUNK_1D)
                .shape(0..)
                .create(name)
                .map_err(&err)?;
        }
        file.new_dataset::<f32>()
            .obj_track_times(false)
            .chunk(CHUNK_1D)
            .shape(0..)
            .create("reward")
            .map_err(&err)?;
        write_meta(&file, path, meta)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            hidden: h,
            dtype: meta.state_dtype,
            rollouts: 0,
            states: 0,
            tokens: 0,
        })
    }

    /// Rollouts written so far.
    pub fn len(&self) -> usize {
        self.rollouts
    }

    /// Whether nothing is written yet.
    pub fn is_empty(&self) -> bool {
        self.rollouts == 0
    }

    /// Appends rollouts (each with as many states as tokens, of the store's hidden size).
    pub fn append(&mut self, rollouts: &[Rollout]) -> Result<()> {
        if rollouts.is_empty() {
            return Ok(());
        }
        let err = hdf5_error(&self.path);
        let mut state_rows = 0;
        let mut token_count = 0;
        for r in rollouts {
            let (rows, h) = r.states.dim();
            if h != self.hidden || rows != r.tokens.len() || rows == 0 {
                return Err(StoreError::StatesShape {
                    path: self.path.clone(),
                    prompt_index: r.prompt_index,
                    rows,
                    hidden: h,
                    tokens: r.tokens.len(),
                    store_hidden: self.hidden,
                });
            }
            state_rows += rows;
            token_count += r.tokens.len();
        }
        let (r0, s0, t0) = (self.rollouts, self.states, self.tokens);
        let (r1, s1, t1) = (r0 + rollouts.len(), s0 + state_rows, t0 + token_count);

        // States, written in one slab per call.
        let states = self.file.dataset("states").map_err(&err)?;
        states.resize((s1, self.hidden)).map_err(&err)?;
        let mut slab = Array2::<f32>::zeros((state_rows, self.hidden));
        let mut at = 0;
        for r in rollouts {
            let n = r.states.nrows();
            slab.slice_mut(s![at..at + n, ..]).assign(&r.states);
            at += n;
        }
        match self.dtype {
            StateDtype::F32 => states.write_slice(&slab, s![s0..s1, ..]),
            StateDtype::F16 => states.write_slice(&slab.mapv(half::f16::from_f32), s![s0..s1, ..]),
        }
        .map_err(&err)?;

        let mut rollout_ends = Vec::with_capacity(rollouts.len());
        let mut token_ends = Vec::with_capacity(rollouts.len());
        let (mut s_end, mut t_end) = (s0 as i64, t0 as i64);
        for r in rollouts {
            s_end += r.states.nrows() as i64;
            t_end += r.tokens.len() as i64;
            rollout_ends.push(s_end);
            token_ends.push(t_end);
        }
        let tokens: Vec<i64> = rollouts
            .iter()
            .flat_map(|r| r.tokens.iter().copied())
            .collect();
        let prompt_index: Vec<i64> = rollouts.iter().map(|r| r.prompt_index).collect();
        let rewards: Vec<f32> = rollouts.iter().map(|r| r.reward).collect();
        let text = |f: fn(&Rollout) -> &str| -> Result<Vec<VarLenUnicode>> {
            rollouts
                .iter()
                .map(|r| {
                    // HDF5 strings end at NUL; a model can emit one (byte-level BPE), so it is
                    // stored as U+FFFD. The token ids beside it stay exact.
                    f(r).replace('\0', "\u{FFFD}")
                        .parse::<VarLenUnicode>()
                        .map_err(|error| StoreError::Text {
                            path: self.path.clone(),
                            prompt_index: r.prompt_index,
                            error,
                        })
                })
                .collect()
        };
        let prompts = text(|r| &r.prompt)?;
        let responses = text(|r| &r.response)?;

        append_1d(
            &self.file,
            &self.path,
            "rollout_offsets",
            r0 + 1,
            &rollout_ends,
        )?;
        append_1d(&self.file, &self.path, "token_offsets", r0 + 1, &token_ends)?;
        append_1d(&self.file, &self.path, "response_tokens", t0, &tokens)?;
        append_1d(&self.file, &self.path, "prompt_index", r0, &prompt_index)?;
        append_1d(&self.file, &self.path, "prompt", r0, &prompts)?;
        append_1d(&self.file, &self.path, "response", r0, &responses)?;
        append_1d(&self.file, &self.path, "reward", r0, &rewards)?;
        self.rollouts = r1;
        self.states = s1;
        self.tokens = t1;
        Ok(())
    }

    /// Flushes and closes the file.
    pub fn finish(self) -> Result<()> {
        let err = hdf5_error(&self.path);
        self.file.flush().map_err(&err)?;
        self.file.close().map_err(&err)
    }
}

fn append_1d<T: hdf5::H5Type>(
    file: &hdf5::File,
    path: &Path,
    name: &str,
    start: usize,
    values: &[T],
) -> Result<()> {
    let err = hdf5_error(path);
    let ds = file.dataset(name).map_err(&err)?;
    let end = start + values.len();
    ds.resize(end).map_err(&err)?;
    ds.write_slice(values, s![start..end]).map_err(&err)
}

fn write_meta(file: &hdf5::File, path: &Path, meta: &StoreMeta) -> Result<()> {
    let err = hdf5_error(path);
    let int = |name: &str, v: i64| -> Result<()> {
        file.new_attr::<i64>()
            .create(name)
            .and_then(|a| a.write_scalar(&v))
            .map_err(&err)
    };
    let text = |name: &str, v: &str| -> Result<()> {
        let v: VarLenUnicode = v.parse().map_err(|error| StoreError::Attribute {
            path: path.to_owned(),
            name: name.to_owned(),
            error,
        })?;
        file.new_attr::<VarLenUnicode>()
            .create(name)
            .and_then(|a| a.write_scalar(&v))
            .map_err(&err)
    };
    int("format_version", FORMAT_VERSION)?;
    int("hidden_size", meta.hidden_size as i64)?;
    text("model", &meta.model)?;
    text("model_hash", &meta.model_hash)?;
    text("state_dtype", meta.state_dtype.as_str())?;
    text("prompt_format", meta.prompt_format.as_str())?;
    text("generation", &meta.generation.to_string())?;
    file.new_attr::<u64>()
        .create("seed")
        .and_then(|a| a.write_scalar(&meta.seed))
        .map_err(&err)?;
    text("recontrol_version", &meta.recontrol_version)?;
    text("dataset", &meta.dataset)?;
    let json = serde_json::to_string(meta).map_err(|error| StoreError::MetaJson {
        path: path.to_owned(),
        error,
    })?;
    text("meta", &json)
}

/// Rows per chunk of `states`: [`CHUNK_ROWS`], fewer for wide states so that a chunk holds
/// at most 1 MiB, and at least one.
fn chunk_rows(hidden: usize, dtype: StateDtype) -> usize {
    CHUNK_ROWS.min(usize::max(1, (1 << 20) / (hidden.max(1) * dtype.bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{meta, rollouts, write};
    use crate::store::Store;

    #[test]
    fn rejects_states_that_do_not_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = StoreWriter::create(&dir.path().join("s.h5"), &meta(3, StateDtype::F32))
            .expect("create");
        let mut r = rollouts(1);
        r[0].states = Array2::zeros((1, 4));
        let err = w
            .append(&r)
            .expect_err("hidden 4 into a store of 3")
            .to_string();
        assert!(err.contains("the store needs [tokens, 3]"), "{err}");
    }

    /// A NUL in generated text (a byte-level BPE can decode one) is stored as U+FFFD, not an
    /// error: HDF5 strings cannot hold it.
    #[test]
    fn nul_bytes_in_texts_are_stored_as_replacement_characters() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        let mut rs = rollouts(2);
        rs[1].response = "a\0b".into();
        write(&path, StateDtype::F32, &rs)?;
        let back = Store::open(&path)?.rollout(1)?;
        assert_eq!(back.response, "a\u{FFFD}b");
        assert_eq!(back.tokens, rs[1].tokens);
        Ok(())
    }

    #[test]
    fn chunks_hold_at_most_a_mebibyte_of_states() {
        // 3 f32s: 1 MiB would be 87381 rows; capped at 256.
        assert_eq!(chunk_rows(3, StateDtype::F32), 256);
        // 4096 f16s = 8 KiB a row: 128 rows.
        assert_eq!(chunk_rows(4096, StateDtype::F16), 128);
        // 4096 f32s = 16 KiB a row: 64 rows.
        assert_eq!(chunk_rows(4096, StateDtype::F32), 64);
        // A row over 1 MiB still gets a chunk of one row; a zero width counts as one.
        assert_eq!(chunk_rows(1 << 19, StateDtype::F32), 1);
        assert_eq!(chunk_rows(0, StateDtype::F16), 256);
    }
}
