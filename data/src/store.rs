//! The HDF5 rollout store. This module owns every HDF5 call of the project.
//!
//! Layout (format version 1):
//!
//! | dataset | type | shape | meaning |
//! |---|---|---|---|
//! | `states` | f32 or f16, chunked + deflate | `[S, hidden]` | final post-norm hidden states |
//! | `rollout_offsets` | i64 | `[R+1]` | rollout i owns state rows `rollout_offsets[i]..rollout_offsets[i+1]` |
//! | `response_tokens` | i64 | `[N]` | generated token ids of all rollouts |
//! | `token_offsets` | i64 | `[R+1]` | rollout i's tokens are `token_offsets[i]..token_offsets[i+1]` |
//! | `prompt_index` | i64 | `[R]` | record index in the source dataset |
//! | `prompt`, `response` | UTF-8 strings | `[R]` | model input text, decoded response |
//! | `reward` | f32 | `[R]` | NaN until labelled |
//!
//! Row 0 of a rollout is the state at the last prompt token; row t is the state that produced
//! generated token t+1; a rollout with T tokens has T states, the last being the terminal state.
//! File attributes: `format_version`, `hidden_size`, `model`, `model_hash`, `state_dtype`,
//! `prompt_format`, `generation` (JSON), `seed`, `recontrol_version`, `dataset`, and `meta`
//! (all of it as one JSON string).

use std::path::{Path, PathBuf};

use hdf5::types::VarLenUnicode;
use ndarray::{s, Array1, Array2};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// The layout version this code writes and reads.
pub const FORMAT_VERSION: i64 = 1;

/// Rows per chunk of `states` (and per block of the shuffling reader).
const CHUNK_ROWS: usize = 256;
/// Elements per chunk of the 1-D datasets.
const CHUNK_1D: usize = 4096;

/// Errors of the rollout store; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {message}")]
    Hdf5 { path: PathBuf, message: String },
    #[error("{path}: not a recontrol rollout store: {message}")]
    Layout { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Mismatch { path: PathBuf, message: String },
    #[error("{path}: rollout {index} out of range (the store holds {len})")]
    OutOfRange {
        path: PathBuf,
        index: usize,
        len: usize,
    },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How states are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateDtype {
    F32,
    F16,
}

impl StateDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }

    fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
}

/// What a store records about how it was made. Stores can be merged or resumed only when
/// [`StoreMeta::compatible`] holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreMeta {
    pub hidden_size: usize,
    /// The model directory the states come from.
    pub model: String,
    /// Hash of the model's config.json and tokenizer.json: its identity.
    pub model_hash: String,
    pub state_dtype: StateDtype,
    pub prompt_format: String,
    /// Generation settings (JSON).
    pub generation: serde_json::Value,
    pub seed: u64,
    pub recontrol_version: String,
    /// The source dataset.
    pub dataset: String,
}

impl StoreMeta {
    /// Why `other` cannot join a store with this metadata, if it cannot.
    pub fn incompatibility(&self, other: &StoreMeta) -> Option<String> {
        if self.hidden_size != other.hidden_size {
            return Some(format!(
                "hidden size {} differs from {}",
                other.hidden_size, self.hidden_size
            ));
        }
        if self.model_hash != other.model_hash {
            return Some(format!(
                "model {} ({}) differs from {} ({})",
                other.model, other.model_hash, self.model, self.model_hash
            ));
        }
        if self.state_dtype != other.state_dtype {
            return Some(format!(
                "state dtype {} differs from {}",
                other.state_dtype.as_str(),
                self.state_dtype.as_str()
            ));
        }
        if self.prompt_format != other.prompt_format {
            return Some(format!(
                "prompt format {} differs from {}",
                other.prompt_format, self.prompt_format
            ));
        }
        None
    }
}

/// One rollout: a prompt, the response generated for it, and the states along the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub prompt_index: i64,
    pub prompt: String,
    pub response: String,
    pub tokens: Vec<i64>,
    /// `[tokens.len(), hidden]`.
    pub states: Array2<f32>,
    pub reward: f32,
}

/// Closing a file closes every object opened from it, so a dropped store never keeps the
/// file (and its lock) open through a stray object handle.
fn strong_close(
    fapl: &mut hdf5::plist::file_access::FileAccessBuilder,
) -> &mut hdf5::plist::file_access::FileAccessBuilder {
    fapl.fclose_degree(hdf5::plist::file_access::FileCloseDegree::Strong)
}

/// Reading: a strong close and a 16 MiB chunk cache, so that reads of neighbouring rows do
/// not decompress a chunk again.
fn reading(
    fapl: &mut hdf5::plist::file_access::FileAccessBuilder,
) -> &mut hdf5::plist::file_access::FileAccessBuilder {
    strong_close(fapl).chunk_cache(1021, 16 << 20, 0.75)
}

fn hdf5_error(path: &Path) -> impl Fn(hdf5::Error) -> StoreError + '_ {
    move |e| StoreError::Hdf5 {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

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
        let file = hdf5::File::with_options()
            .with_fapl(strong_close)
            .create(path)
            .map_err(&err)?;
        let h = meta.hidden_size;
        let chunk_rows = CHUNK_ROWS.min(usize::max(
            1,
            (1 << 20) / (h.max(1) * meta.state_dtype.bytes()),
        ));
        let states = match meta.state_dtype {
            StateDtype::F32 => file.new_dataset::<f32>(),
            StateDtype::F16 => file.new_dataset::<half::f16>(),
        };
        states
            .chunk((chunk_rows, h))
            .shuffle()
            .deflate(1)
            .shape((0.., h))
            .create("states")
            .map_err(&err)?;
        for name in ["rollout_offsets", "token_offsets"] {
            let ds = file
                .new_dataset::<i64>()
                .chunk(CHUNK_1D)
                .deflate(1)
                .shape(1..)
                .create(name)
                .map_err(&err)?;
            ds.write_slice(&[0i64], s![0..1]).map_err(&err)?;
        }
        for name in ["response_tokens", "prompt_index"] {
            file.new_dataset::<i64>()
                .chunk(CHUNK_1D)
                .deflate(1)
                .shape(0..)
                .create(name)
                .map_err(&err)?;
        }
        for name in ["prompt", "response"] {
            file.new_dataset::<VarLenUnicode>()
                .chunk(CHUNK_1D)
                .shape(0..)
                .create(name)
                .map_err(&err)?;
        }
        file.new_dataset::<f32>()
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
                return Err(StoreError::Mismatch {
                    path: self.path.clone(),
                    message: format!(
                        "rollout of prompt {} has states [{rows}, {h}] for {} tokens; the store needs [tokens, {}] with at least one token",
                        r.prompt_index,
                        r.tokens.len(),
                        self.hidden
                    ),
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
                        .map_err(|e| StoreError::Mismatch {
                            path: self.path.clone(),
                            message: format!(
                                "text of prompt {} cannot be stored: {e}",
                                r.prompt_index
                            ),
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
        let v: VarLenUnicode = v.parse().map_err(|e| StoreError::Mismatch {
            path: path.to_owned(),
            message: format!("attribute {name} cannot be stored: {e}"),
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
    text("prompt_format", &meta.prompt_format)?;
    text("generation", &meta.generation.to_string())?;
    file.new_attr::<u64>()
        .create("seed")
        .and_then(|a| a.write_scalar(&meta.seed))
        .map_err(&err)?;
    text("recontrol_version", &meta.recontrol_version)?;
    text("dataset", &meta.dataset)?;
    let json = serde_json::to_string(meta).map_err(|e| StoreError::Mismatch {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    text("meta", &json)
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
            return Err(StoreError::Hdf5 {
                path: path.to_owned(),
                message: "no such file".to_owned(),
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

    fn read_states(&self, rows: std::ops::Range<usize>) -> Result<Array2<f32>> {
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

    /// Every rollout's source record index.
    pub fn prompt_indices(&self) -> Result<Vec<i64>> {
        Ok(self.read_1d::<i64>("prompt_index", 0..self.len())?.to_vec())
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

    /// A seeded, shuffling stream of training transitions whose memory is bounded by
    /// `options` (blocks of whole rollouts are read a few at a time), not by the store's size.
    pub fn transitions(&self, options: StreamOptions) -> Result<TransitionStream<'_>> {
        self.transitions_of(options, None)
    }

    /// [`Store::transitions`] of the rollouts `keep` marks (one flag per rollout), e.g. one
    /// side of a train/validation split. Only the marked rollouts' rows are read.
    pub fn transitions_of(
        &self,
        options: StreamOptions,
        keep: Option<Vec<bool>>,
    ) -> Result<TransitionStream<'_>> {
        if let Some(k) = &keep {
            if k.len() != self.len() {
                return Err(StoreError::Mismatch {
                    path: self.path.clone(),
                    message: format!(
                        "a filter of {} rollouts for a store of {}",
                        k.len(),
                        self.len()
                    ),
                });
            }
        }
        let rewards = self.rewards()?;
        let kept: Vec<usize> = (0..self.len())
            .filter(|&i| keep.as_ref().is_none_or(|k| k[i]))
            .collect();
        // Consecutive kept rollouts grouped into blocks of at least `block_rows` rows (a
        // longer rollout is a block of its own), visited in a seeded order.
        let block_rows = options.block_rows.max(1);
        let mut blocks = Vec::new();
        let (mut begin, mut rows) = (0, 0);
        for (k, &i) in kept.iter().enumerate() {
            rows += self.rollout_rows(i).len();
            if rows >= block_rows || k + 1 == kept.len() {
                blocks.push(begin..k + 1);
                (begin, rows) = (k + 1, 0);
            }
        }
        let mut rng = StdRng::seed_from_u64(options.seed);
        blocks.shuffle(&mut rng);
        Ok(TransitionStream {
            store: self,
            rewards,
            kept,
            options,
            blocks,
            next_block: 0,
            rng,
            buffer: Vec::new(),
            arena: Vec::new(),
        })
    }

    /// The state rows of rollout `i`.
    fn rollout_rows(&self, i: usize) -> std::ops::Range<usize> {
        self.rollout_offsets[i] as usize..self.rollout_offsets[i + 1] as usize
    }

    /// The states of `rollouts` (ascending indices), back to back; runs of consecutive
    /// rollouts are read at once.
    fn read_block(&self, rollouts: &[usize], rewards: &[f32]) -> Result<RolloutBlock> {
        let h = self.meta.hidden_size;
        let total: usize = rollouts.iter().map(|&i| self.rollout_rows(i).len()).sum();
        let mut data = Vec::with_capacity(total * h);
        let mut parts = Vec::with_capacity(rollouts.len());
        let (Some(&first), Some(&last)) = (rollouts.first(), rollouts.last()) else {
            return Ok(RolloutBlock {
                states: Array2::zeros((0, h)),
                rollouts: Vec::new(),
            });
        };
        let span = self.rollout_rows(first).start..self.rollout_rows(last).end;
        if 2 * total >= span.len() {
            // Mostly kept: one read of the span, then the kept rows.
            let all = self.read_states(span.clone())?;
            for &i in rollouts {
                let rows = self.rollout_rows(i);
                let local = rows.start - span.start..rows.end - span.start;
                data.extend(all.slice(s![local, ..]).iter().copied());
            }
        } else {
            // Sparse: one read per run of consecutive rollouts.
            let mut k = 0;
            while k < rollouts.len() {
                let mut end = k + 1;
                while end < rollouts.len() && rollouts[end] == rollouts[end - 1] + 1 {
                    end += 1;
                }
                let rows =
                    self.rollout_rows(rollouts[k]).start..self.rollout_rows(rollouts[end - 1]).end;
                data.extend(self.read_states(rows)?.iter().copied());
                k = end;
            }
        }
        let mut row = 0;
        for &i in rollouts {
            let len = self.rollout_rows(i).len();
            parts.push(BlockRollout {
                index: i,
                rows: row..row + len,
                reward: rewards[i],
            });
            row += len;
        }
        let states = Array2::from_shape_vec((total, h), data).map_err(|e| StoreError::Layout {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        Ok(RolloutBlock {
            states,
            rollouts: parts,
        })
    }
}

/// Settings of [`Store::transitions`].
#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    pub batch_size: usize,
    pub seed: u64,
    /// Rows per block read from disk (blocks hold whole rollouts, so a block may be longer).
    pub block_rows: usize,
    /// Blocks held (and shuffled together) at once.
    pub buffer_blocks: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            batch_size: 512,
            seed: 0,
            block_rows: 1024,
            buffer_blocks: 8,
        }
    }
}

/// Whole rollouts read together: what a per-row target function (e.g. TD(lambda) returns)
/// sees when the rollouts enter the shuffle buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutBlock {
    /// `[rows, hidden]`: the rollouts' states back to back.
    pub states: Array2<f32>,
    pub rollouts: Vec<BlockRollout>,
}

/// One rollout of a [`RolloutBlock`].
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRollout {
    /// Its index in the store.
    pub index: usize,
    /// Its rows in the block's `states`.
    pub rows: std::ops::Range<usize>,
    /// Its reward (NaN if unlabelled).
    pub reward: f32,
}

/// Computes one target per row of a block (`Err` is a message).
pub type BlockTargets<'f> = dyn FnMut(&RolloutBlock) -> std::result::Result<Vec<f32>, String> + 'f;

/// A minibatch of transitions `(s_t, s_{t+1}, terminal, reward)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionBatch {
    /// `[batch, hidden]`.
    pub state: Array2<f32>,
    /// `[batch, hidden]`; zeros where `is_terminal`.
    pub next_state: Array2<f32>,
    pub is_terminal: Vec<bool>,
    /// Whether the state is its rollout's first (at the last prompt token).
    pub is_first: Vec<bool>,
    /// The rollout's reward (NaN if unlabelled).
    pub reward: Vec<f32>,
    /// The rollout each row belongs to.
    pub rollout: Vec<usize>,
    /// Per-row targets from [`TransitionStream::next_with`] (NaN without a target function).
    pub target: Vec<f32>,
}

/// One transition held in the shuffle buffer.
struct Held {
    /// Offset of the state in the arena; the next state (unless terminal) follows it.
    offset: usize,
    terminal: bool,
    first: bool,
    rollout: usize,
    target: f32,
}

/// Iterator of [`TransitionBatch`]es over one pass of a store.
pub struct TransitionStream<'a> {
    store: &'a Store,
    rewards: Vec<f32>,
    /// The rollouts streamed, ascending.
    kept: Vec<usize>,
    options: StreamOptions,
    /// Ranges of `kept`, in visiting order.
    blocks: Vec<std::ops::Range<usize>>,
    next_block: usize,
    rng: StdRng,
    buffer: Vec<Held>,
    /// States of the rollouts held, back to back (each state followed by its successor).
    arena: Vec<f32>,
}

impl std::fmt::Debug for TransitionStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransitionStream")
            .field("next_block", &self.next_block)
            .finish()
    }
}

impl TransitionStream<'_> {
    /// Reads the next `buffer_blocks` blocks into the (shuffled) buffer, with per-row targets
    /// from `targets` if given.
    fn refill(&mut self, mut targets: Option<&mut BlockTargets<'_>>) -> Result<()> {
        let h = self.store.meta.hidden_size;
        let want = self.options.buffer_blocks.max(1) * self.options.block_rows.max(1);
        // Compact what is left: each held state and its successor, back to back.
        let mut arena = Vec::with_capacity((self.buffer.len() * 2 + want) * h);
        for held in &mut self.buffer {
            let offset = arena.len();
            let len = if held.terminal { h } else { 2 * h };
            arena.extend_from_slice(&self.arena[held.offset..held.offset + len]);
            held.offset = offset;
        }
        while self.next_block < self.blocks.len() && self.buffer.len() < want {
            let ids = &self.kept[self.blocks[self.next_block].clone()];
            self.next_block += 1;
            let block = self.store.read_block(ids, &self.rewards)?;
            let rows = block.states.nrows();
            let row_targets = match targets.as_deref_mut() {
                Some(f) => {
                    let t = f(&block).map_err(|message| StoreError::Mismatch {
                        path: self.store.path.clone(),
                        message,
                    })?;
                    if t.len() != rows {
                        return Err(StoreError::Mismatch {
                            path: self.store.path.clone(),
                            message: format!("{} targets for a block of {rows} rows", t.len()),
                        });
                    }
                    Some(t)
                }
                None => None,
            };
            let base = arena.len();
            arena.extend(block.states.iter().copied());
            for r in &block.rollouts {
                for row in r.rows.clone() {
                    self.buffer.push(Held {
                        offset: base + row * h,
                        terminal: row + 1 == r.rows.end,
                        first: row == r.rows.start,
                        rollout: r.index,
                        target: row_targets.as_ref().map_or(f32::NAN, |t| t[row]),
                    });
                }
            }
        }
        self.arena = arena;
        self.buffer.shuffle(&mut self.rng);
        Ok(())
    }

    /// The next minibatch; rollouts read into the buffer get per-row targets from `targets`
    /// (e.g. TD(lambda) returns computed with the current value net).
    pub fn next_with(
        &mut self,
        targets: Option<&mut BlockTargets<'_>>,
    ) -> Option<Result<TransitionBatch>> {
        if self.buffer.len() < self.options.batch_size {
            if let Err(e) = self.refill(targets) {
                return Some(Err(e));
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let n = self.options.batch_size.max(1).min(self.buffer.len());
        let h = self.store.meta.hidden_size;
        let mut state = Array2::<f32>::zeros((n, h));
        let mut next_state = Array2::<f32>::zeros((n, h));
        let mut is_terminal = Vec::with_capacity(n);
        let mut is_first = Vec::with_capacity(n);
        let mut reward = Vec::with_capacity(n);
        let mut rollout = Vec::with_capacity(n);
        let mut target = Vec::with_capacity(n);
        let from = self.buffer.len() - n;
        for (i, t) in self.buffer.drain(from..).enumerate() {
            if let Some(dst) = state.row_mut(i).as_slice_mut() {
                dst.copy_from_slice(&self.arena[t.offset..t.offset + h]);
            }
            if !t.terminal {
                if let Some(dst) = next_state.row_mut(i).as_slice_mut() {
                    dst.copy_from_slice(&self.arena[t.offset + h..t.offset + 2 * h]);
                }
            }
            is_terminal.push(t.terminal);
            is_first.push(t.first);
            reward.push(self.rewards[t.rollout]);
            rollout.push(t.rollout);
            target.push(t.target);
        }
        Some(Ok(TransitionBatch {
            state,
            next_state,
            is_terminal,
            is_first,
            reward,
            rollout,
            target,
        }))
    }
}

impl Iterator for TransitionStream<'_> {
    type Item = Result<TransitionBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_with(None)
    }
}

/// Joins stores into `out` (written under a temporary name, renamed when complete), in the
/// order given. Refuses stores whose metadata is incompatible with the first one's.
pub fn merge(inputs: &[&Path], out: &Path) -> Result<usize> {
    let Some(first) = inputs.first() else {
        return Err(StoreError::Mismatch {
            path: out.to_owned(),
            message: "nothing to merge".to_owned(),
        });
    };
    let stores = inputs
        .iter()
        .map(|p| Store::open(p))
        .collect::<Result<Vec<_>>>()?;
    let meta = stores[0].meta.clone();
    for s in &stores[1..] {
        if let Some(why) = meta.incompatibility(&s.meta) {
            return Err(StoreError::Mismatch {
                path: s.path.clone(),
                message: format!("cannot merge with {}: {why}", first.display()),
            });
        }
    }
    let temp = temp_path(out);
    let result = (|| {
        let mut writer = StoreWriter::create(&temp, &meta)?;
        for s in &stores {
            copy_rollouts(s, &mut writer)?;
        }
        let n = writer.len();
        writer.finish()?;
        Ok(n)
    })();
    match result {
        Ok(n) => {
            std::fs::rename(&temp, out).map_err(|e| StoreError::Hdf5 {
                path: out.to_owned(),
                message: format!("cannot rename {} into place: {e}", temp.display()),
            })?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// Copies every rollout of `store` into `writer`, a bounded number of rollouts at a time.
pub fn copy_rollouts(store: &Store, writer: &mut StoreWriter) -> Result<()> {
    const AT_ONCE: usize = 64;
    let mut batch = Vec::with_capacity(AT_ONCE);
    for i in 0..store.len() {
        batch.push(store.rollout(i)?);
        if batch.len() == AT_ONCE {
            writer.append(&batch)?;
            batch.clear();
        }
    }
    writer.append(&batch)
}

/// `<file>.tmp` beside `path`: the name a file is written under until it is complete (a fixed
/// name, so a run that is killed and resumed overwrites its own leftovers).
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Bytes of the file (for bytes-per-state reports).
pub fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(hidden: usize, dtype: StateDtype) -> StoreMeta {
        StoreMeta {
            hidden_size: hidden,
            model: "m".into(),
            model_hash: "sha256:x".into(),
            state_dtype: dtype,
            prompt_format: "hh".into(),
            generation: serde_json::json!({"max_new_tokens": 4}),
            seed: 3,
            recontrol_version: "test".into(),
            dataset: "d.jsonl".into(),
        }
    }

    /// Rollout i has 1 + i % 4 states; state (i, t) is [i, t, i + t].
    fn rollouts(n: usize) -> Vec<Rollout> {
        (0..n)
            .map(|i| {
                let t = 1 + i % 4;
                Rollout {
                    prompt_index: 100 + i as i64,
                    prompt: format!("prompt {i} ✓"),
                    response: format!("response {i}"),
                    tokens: (0..t as i64).map(|k| k + 10 * i as i64).collect(),
                    states: Array2::from_shape_fn((t, 3), |(r, c)| match c {
                        0 => i as f32,
                        1 => r as f32,
                        _ => (i + r) as f32,
                    }),
                    reward: i as f32 * 0.5,
                }
            })
            .collect()
    }

    fn write(path: &Path, dtype: StateDtype, rs: &[Rollout]) -> Result<()> {
        let mut w = StoreWriter::create(path, &meta(3, dtype))?;
        for chunk in rs.chunks(3) {
            w.append(chunk)?;
        }
        w.finish()
    }

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
    fn transition_stream_covers_every_state_once_with_correct_successors() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        let rs = rollouts(23);
        write(&path, StateDtype::F32, &rs)?;
        let st = Store::open(&path)?;
        let options = StreamOptions {
            batch_size: 5,
            seed: 9,
            block_rows: 4,
            buffer_blocks: 2,
        };
        let mut seen = Vec::new();
        let mut first_pass = Vec::new();
        for batch in st.transitions(options)? {
            let b = batch?;
            assert!(b.state.nrows() <= 5);
            for k in 0..b.state.nrows() {
                let (i, t) = (b.state[[k, 0]] as usize, b.state[[k, 1]] as usize);
                assert_eq!(b.rollout[k], i);
                let len = rs[i].tokens.len();
                assert_eq!(b.is_terminal[k], t + 1 == len, "rollout {i} step {t}");
                assert_eq!(b.reward[k], rs[i].reward);
                assert_eq!(b.is_first[k], t == 0);
                assert!(b.target[k].is_nan());
                if t + 1 < len {
                    assert_eq!(
                        b.next_state.row(k).to_vec(),
                        vec![i as f32, (t + 1) as f32, (i + t + 1) as f32]
                    );
                } else {
                    assert!(b.next_state.row(k).iter().all(|&v| v == 0.0));
                }
                seen.push((i, t));
                first_pass.push((i, t));
            }
        }
        seen.sort_unstable();
        let all: Vec<(usize, usize)> = rs
            .iter()
            .enumerate()
            .flat_map(|(i, r)| (0..r.tokens.len()).map(move |t| (i, t)))
            .collect();
        assert_eq!(seen, all, "every state exactly once");
        // Seeded: the same order again; another seed, another order.
        let again: Vec<(usize, usize)> = st
            .transitions(options)?
            .flat_map(|b| {
                let b = b.expect("batch");
                (0..b.state.nrows())
                    .map(move |k| (b.state[[k, 0]] as usize, b.state[[k, 1]] as usize))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(again, first_pass);
        let other: Vec<usize> = st
            .transitions(StreamOptions {
                seed: 10,
                ..options
            })?
            .flat_map(|b| b.expect("batch").rollout)
            .collect();
        assert_ne!(other, first_pass.iter().map(|p| p.0).collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn filtered_streams_keep_only_the_marked_rollouts() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        let rs = rollouts(12);
        write(&path, StateDtype::F32, &rs)?;
        let st = Store::open(&path)?;
        let keep: Vec<bool> = (0..12).map(|i| i % 3 == 0).collect();
        let options = StreamOptions {
            batch_size: 4,
            seed: 1,
            block_rows: 3,
            buffer_blocks: 2,
        };
        let mut seen: Vec<usize> = Vec::new();
        for b in st.transitions_of(options, Some(keep.clone()))? {
            seen.extend(b?.rollout);
        }
        let want: usize = (0..12)
            .filter(|i| i % 3 == 0)
            .map(|i| rs[i].tokens.len())
            .sum();
        assert_eq!(seen.len(), want);
        assert!(seen.iter().all(|&r| keep[r]));
        assert!(st.transitions_of(options, Some(vec![true; 3])).is_err());
        Ok(())
    }

    /// A target function sees whole rollouts (every row of a rollout in one block, in order)
    /// and its targets come back with their rows.
    #[test]
    fn block_targets_see_whole_rollouts_and_follow_their_rows() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        let rs = rollouts(17);
        write(&path, StateDtype::F32, &rs)?;
        let st = Store::open(&path)?;
        let options = StreamOptions {
            batch_size: 3,
            seed: 4,
            block_rows: 5,
            buffer_blocks: 2,
        };
        let mut calls = 0;
        let mut target = |block: &RolloutBlock| -> std::result::Result<Vec<f32>, String> {
            calls += 1;
            let mut out = vec![f32::NAN; block.states.nrows()];
            for r in &block.rollouts {
                assert_eq!(r.reward, rs[r.index].reward);
                assert_eq!(r.rows.len(), rs[r.index].tokens.len(), "whole rollout");
                for (t, row) in r.rows.clone().enumerate() {
                    assert_eq!(block.states[[row, 0]] as usize, r.index);
                    assert_eq!(block.states[[row, 1]] as usize, t);
                    // Remaining steps to the end: known only with the whole rollout.
                    out[row] = (r.rows.end - row) as f32;
                }
            }
            Ok(out)
        };
        let mut stream = st.transitions(options)?;
        let mut n = 0;
        while let Some(b) = stream.next_with(Some(&mut target)) {
            let b = b?;
            for k in 0..b.state.nrows() {
                let (i, t) = (b.state[[k, 0]] as usize, b.state[[k, 1]] as usize);
                assert_eq!(b.target[k], (rs[i].tokens.len() - t) as f32);
                assert_eq!(b.is_first[k], t == 0);
                n += 1;
            }
        }
        assert_eq!(n, st.num_states());
        assert!(calls > 1);
        let mut refuse =
            |_: &RolloutBlock| -> std::result::Result<Vec<f32>, String> { Err("no".to_owned()) };
        let err = st
            .transitions(options)?
            .next_with(Some(&mut refuse))
            .expect("an item")
            .expect_err("refused");
        assert!(err.to_string().ends_with(": no"), "{err}");
        Ok(())
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

    #[test]
    fn merge_refuses_incompatible_stores() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("a.h5");
        let b = dir.path().join("b.h5");
        write(&a, StateDtype::F32, &rollouts(3)).expect("a");
        write(&b, StateDtype::F16, &rollouts(3)).expect("b");
        let out = dir.path().join("ab.h5");
        let err = merge(&[&a, &b], &out)
            .expect_err("dtypes differ")
            .to_string();
        assert!(err.contains("state dtype f16 differs from f32"), "{err}");
        assert!(!out.exists() && !temp_path(&out).exists());
        assert_eq!(merge(&[&a, &a], &out).expect("same meta"), 6);
    }
}
