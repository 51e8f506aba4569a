//! Importing a GGUF model into a Hugging Face model directory that recontrol and transformers
//! both load:
//!
//! - `config.json` ([`ModelConfig::hf_config`]) and `generation_config.json`;
//! - `model.safetensors`: every weight dequantized to f32, Q/K rows put back in HF order for
//!   the llama family, stored as [`OutDtype`] (bit for bit what transformers' GGUF loader
//!   gives, in f32; rounded to nearest even for f16/bf16, as torch's `.to()` does);
//! - `tokenizer_config.json`: special token strings, `add_bos_token` / `add_eos_token`, the
//!   chat template;
//! - `tokenizer.json`, by [`ImportOptions::tokenizer`] (the tokenizer step).
//!
//! Everything is checked before `out` is touched (architecture, config, every tensor's
//! presence, shape and type); the directory is written under a temporary name beside `out`
//! and renamed into place when complete, so on any error nothing is left at `out`. Weights are
//! converted one at a time, a row at a time, while `model.safetensors` is written, so memory
//! peaks at about one output tensor.

use std::borrow::Cow;
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use recontrol_io::{write_json_atomic, AtomicDir};
use safetensors::{Dtype, View};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::config::{Architecture, ModelConfig};
use crate::file::GgufFile;
use crate::metadata::Metadata;
use crate::quant::dequantize_into;
use crate::tensor_map::{plan, TensorPlan};
use crate::{Error, Result};

/// The element type of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutDtype {
    #[default]
    F32,
    F16,
    BF16,
}

impl OutDtype {
    /// Its name in `config.json` (`dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// Appends `values` in this type, little-endian.
    fn extend(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            Self::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            Self::F16 => out.extend(
                values
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes()),
            ),
            Self::BF16 => out.extend(
                values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()),
            ),
        }
    }
}

/// The tokenizer step of an import: writes `tokenizer.json` for a file to the given path.
pub type TokenizerWriter = fn(&GgufFile, &Path) -> Result<()>;

/// How to import.
#[derive(Debug, Clone, Copy)]
pub struct ImportOptions {
    pub dtype: OutDtype,
    /// Writes `tokenizer.json`; `None` writes none (weights and configs only).
    pub tokenizer: Option<TokenizerWriter>,
}

impl Default for ImportOptions {
    /// f32 weights and `tokenizer.json` from [`crate::tokenizer::write_gguf_tokenizer`].
    fn default() -> Self {
        Self {
            dtype: OutDtype::F32,
            tokenizer: Some(crate::tokenizer::write_gguf_tokenizer),
        }
    }
}

/// What an import wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportSummary {
    pub out: PathBuf,
    pub architecture: Architecture,
    pub config: ModelConfig,
    /// Weights written (a tied `lm_head` is not one).
    pub tensors: usize,
    pub parameters: u64,
    pub dtype: OutDtype,
    pub tokenizer_json: bool,
}

/// The files an import writes, in the order it writes them.
pub const OUTPUT_FILES: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "model.safetensors",
    IMPORT_RECORD,
];

/// The file in an imported directory that records where it came from ([`ImportRecord`]).
pub const IMPORT_RECORD: &str = "gguf_import.json";

/// Where an imported directory came from: the GGUF file (name, size, sha256) and the dtype,
/// so that a set-up can tell an import it already made from one to redo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRecord {
    /// The GGUF file's name.
    pub source: String,
    pub bytes: u64,
    pub sha256: String,
    /// `float32`, `float16` or `bfloat16`.
    pub dtype: String,
    /// The recontrol version that imported it.
    pub importer: String,
}

impl ImportRecord {
    /// The record an import of `src` in `dtype` writes (reads the whole file for its digest).
    pub fn of(src: &Path, dtype: OutDtype) -> Result<Self> {
        use sha2::{Digest, Sha256};
        let read = |source| Error::Io {
            path: src.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(src).map_err(read)?;
        let mut hasher = Sha256::new();
        let bytes = std::io::copy(&mut file, &mut hasher).map_err(read)?;
        Ok(Self {
            source: src
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes,
            sha256: format!("{:x}", hasher.finalize()),
            dtype: dtype.torch_name().to_owned(),
            importer: format!("recontrol {}", env!("CARGO_PKG_VERSION")),
        })
    }

    /// The record of the imported directory `dir`, if it has a readable one.
    pub fn read(dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(dir.join(IMPORT_RECORD)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Whether `dir` holds an import of the same file in the same dtype (whatever the
    /// importer's version).
    pub fn same_import(&self, dir: &Path) -> bool {
        Self::read(dir).is_some_and(|r| {
            (r.bytes, &r.sha256, &r.dtype) == (self.bytes, &self.sha256, &self.dtype)
        })
    }
}

/// Imports the GGUF model `src` into the new directory `out`. `out` must not exist, or be an
/// empty directory (which is replaced); its parent must exist.
pub fn import_gguf(src: &Path, out: &Path, options: &ImportOptions) -> Result<ImportSummary> {
    let file = GgufFile::open(src)?;
    let config = ModelConfig::from_gguf(file.metadata(), file.tensors())?;
    let plans = plan(&config, file.tensors())?;
    let weights = plans
        .iter()
        .map(|p| Weight::new(&file, p, options.dtype))
        .collect::<Result<Vec<_>>>()?;
    let tokenizer_config = tokenizer_config(file.metadata())?;
    let record = ImportRecord::of(src, options.dtype)?;

    replace_empty_dir(out)?;
    let dir = AtomicDir::create(out)?;
    let at = |name: &str| dir.path().join(name);
    write_json_atomic(
        &at("config.json"),
        &config.hf_config(options.dtype.torch_name()),
    )?;
    write_json_atomic(&at("generation_config.json"), &config.generation_config())?;
    write_json_atomic(&at("tokenizer_config.json"), &tokenizer_config)?;
    if let Some(write_tokenizer) = options.tokenizer {
        write_tokenizer(&file, &at("tokenizer.json"))?;
    }
    let parameters = weights.iter().map(|w| w.n_elements).sum();
    write_safetensors(weights, &at("model.safetensors"))?;
    write_json_atomic(&at(IMPORT_RECORD), &record)?;
    dir.commit()?;
    Ok(ImportSummary {
        out: out.to_owned(),
        architecture: config.architecture,
        tensors: plans.len(),
        parameters,
        dtype: options.dtype,
        tokenizer_json: options.tokenizer.is_some(),
        config,
    })
}

/// What [`import_gguf_once`] did.
#[derive(Debug)]
pub enum ImportOutcome {
    Imported(ImportSummary),
    /// `out` already held an import of the same file in the same dtype: nothing was done.
    AlreadyImported(ImportRecord),
}

/// [`import_gguf`], unless `out` already holds an import of the same file (size and sha256)
/// in the same dtype: what a set-up runs every time. Any other `out` that exists and is not
/// an empty directory is refused ([`Error::OutputOccupied`]).
pub fn import_gguf_once(src: &Path, out: &Path, options: &ImportOptions) -> Result<ImportOutcome> {
    if out.exists() {
        let record = ImportRecord::of(src, options.dtype)?;
        if record.same_import(out) {
            return Ok(ImportOutcome::AlreadyImported(record));
        }
        let empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_none());
        if !empty {
            return Err(Error::OutputOccupied {
                out: out.to_owned(),
                dtype: options.dtype.torch_name(),
            });
        }
    }
    import_gguf(src, out, options).map(ImportOutcome::Imported)
}

/// Removes `out` if it is an empty directory (`remove_dir` removes nothing else).
fn replace_empty_dir(out: &Path) -> Result<()> {
    let is_empty_dir = out.is_dir()
        && std::fs::read_dir(out)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(false);
    if is_empty_dir {
        std::fs::remove_dir(out).map_err(|source| Error::Write {
            path: out.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// `tokenizer_config.json`: special token strings (looked up by id in
/// `tokenizer.ggml.tokens`), `add_bos_token` (default: true for a SentencePiece `llama`
/// vocabulary, as llama.cpp and transformers do, else false), `add_eos_token` (default false)
/// and `tokenizer.chat_template`.
pub fn tokenizer_config(metadata: &Metadata) -> Result<Value> {
    let tokens = metadata.require_str_array("tokenizer.ggml.tokens")?;
    let model = metadata.get_str("tokenizer.ggml.model")?;
    let add_bos = metadata.get_bool("tokenizer.ggml.add_bos_token")?;
    let add_eos = metadata.get_bool("tokenizer.ggml.add_eos_token")?;
    let mut c = Map::new();
    c.insert(
        "add_bos_token".into(),
        json!(add_bos.unwrap_or(model == Some("llama"))),
    );
    c.insert("add_eos_token".into(), json!(add_eos.unwrap_or(false)));
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        let Some(id) = metadata.get_u32(key)? else {
            continue;
        };
        let token = tokens.get(id as usize).ok_or_else(|| Error::KeyValue {
            key: key.to_owned(),
            problem: format!("token id {id} is past the {} tokens", tokens.len()),
        })?;
        c.insert(name.into(), json!(token));
    }
    if let Some(template) = metadata.get_str("tokenizer.chat_template")? {
        c.insert("chat_template".into(), json!(template));
    }
    c.insert("clean_up_tokenization_spaces".into(), json!(false));
    c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok(Value::Object(c))
}

/// One output weight, converted when `model.safetensors` is written. A conversion error is
/// kept in `failed` (a [`View`] cannot return one) and reported after the write.
struct Weight<'a> {
    file: &'a GgufFile,
    plan: &'a TensorPlan<'a>,
    dtype: OutDtype,
    shape: Vec<usize>,
    n_elements: u64,
    data_len: usize,
    failed: RefCell<Option<Error>>,
}

impl<'a> Weight<'a> {
    fn new(file: &'a GgufFile, plan: &'a TensorPlan<'a>, dtype: OutDtype) -> Result<Self> {
        let n_elements = plan.source.n_elements;
        let too_large = || Error::TooLarge {
            tensor: plan.source.name.clone(),
            elements: n_elements,
        };
        let shape = plan
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| too_large()))
            .collect::<Result<Vec<_>>>()?;
        let data_len = usize::try_from(n_elements)
            .ok()
            .and_then(|n| n.checked_mul(dtype.size()))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(too_large)?;
        Ok(Self {
            file,
            plan,
            dtype,
            shape,
            n_elements,
            data_len,
            failed: RefCell::new(None),
        })
    }

    /// The weight in HF row order and the output type.
    fn convert(&self) -> Result<Vec<u8>> {
        let info = self.plan.source;
        let mut out = Vec::with_capacity(self.data_len);
        let mut row = Vec::with_capacity(usize::try_from(info.row_len()).unwrap_or(0));
        for r in 0..self.plan.rows() {
            row.clear();
            let bytes = self.file.row_data(info, self.plan.source_row(r), 1)?;
            dequantize_into(info.ggml_type, bytes, &mut row)?;
            self.dtype.extend(&row, &mut out);
        }
        Ok(out)
    }
}

impl View for &Weight<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self.convert() {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                self.failed.borrow_mut().get_or_insert(e);
                Cow::Borrowed(&[])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.data_len
    }
}

/// Writes the weights to `path`, converting each as it is written.
fn write_safetensors(weights: Vec<Weight<'_>>, path: &Path) -> Result<()> {
    let metadata = [("format".to_owned(), "pt".to_owned())].into();
    let views = weights.iter().map(|w| (w.plan.hf_name.as_str(), w));
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| {
        Error::Safetensors {
            path: path.to_owned(),
            message: e.to_string(),
        }
    })?;
    match weights.into_iter().find_map(|w| w.failed.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
