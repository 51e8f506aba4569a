//! Reward models: a causal-LM backbone and a scalar head on the final hidden state of the last
//! real token, stored as Hugging Face `LlamaForSequenceClassification` (`score.weight`).

use std::path::{Path, PathBuf};

use recontrol_io::AtomicDir;
use recontrol_lm::{DType, DeviceSpec, LanguageModel, StepInput};
use recontrol_train::write_safetensors;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::{scored_text, Error, Result, RewardSource};

/// A backbone and its scalar head.
#[derive(Debug)]
pub struct RewardModel {
    pub dir: PathBuf,
    /// The decoder (without its LM head) and tokenizer.
    pub lm: LanguageModel,
    /// `[1, hidden]`.
    pub score: Tensor,
    /// Texts scored together.
    pub batch_size: usize,
    /// Features computed before on this backbone, shared with other reward models on it
    /// ([`RewardModel::share_features`]).
    pub memo: Option<FeatureMemo>,
}

impl RewardModel {
    /// Loads a sequence-classification model directory (one label).
    pub fn load(dir: &Path, device: DeviceSpec, dtype: DType) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !dir.is_dir() {
            return Err(Error::invalid(dir, "reward model directory does not exist"));
        }
        let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(&config_path, format!("malformed JSON: {e}")))?;
        let labels = config
            .get("num_labels")
            .and_then(Value::as_u64)
            .or_else(|| {
                config
                    .get("id2label")
                    .and_then(Value::as_object)
                    .map(|m| m.len() as u64)
            })
            .unwrap_or(1);
        if labels != 1 {
            return Err(Error::LabelCount {
                path: config_path,
                labels,
            });
        }
        let lm = LanguageModel::load_backbone(dir, device, dtype)?;
        let hidden = lm.model.config().hidden_size as i64;
        let score = read_score_head(dir, hidden, lm.model.device(), dtype)?;
        Ok(Self {
            dir: dir.to_owned(),
            lm,
            score,
            batch_size: 8,
            memo: None,
        })
    }

    /// A reward model from a backbone and a trained head `[1, hidden]`.
    pub fn from_parts(lm: LanguageModel, score: Tensor) -> Self {
        Self {
            dir: lm.dir.clone(),
            lm,
            score,
            batch_size: 8,
            memo: None,
        }
    }

    /// Writes an HF `*ForSequenceClassification` directory of the backbone's family (config, float32 safetensors with
    /// the backbone and `score.weight`, tokenizer files) into the new folder `out`, which appears
    /// only when complete. `extra` files (name, JSON) are written beside them.
    pub fn save(&self, out: &Path, extra: &[(&str, Value)]) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        let dir = AtomicDir::create(out)?;
        let temp = dir.path();
        let base_config = self.lm.dir.join("config.json");
        let text = std::fs::read_to_string(&base_config).map_err(io(&base_config))?;
        let mut config: Value = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(&base_config, format!("malformed JSON: {e}")))?;
        let fields = config
            .as_object_mut()
            .ok_or_else(|| Error::invalid(&base_config, "not a JSON object"))?;
        let arch = self
            .lm
            .model
            .config()
            .architecture
            .sequence_classification_class();
        fields.insert("architectures".into(), serde_json::json!([arch]));
        fields.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
        fields.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        fields.insert("pad_token_id".into(), self.lm.pad_token_id.into());
        fields.remove("num_labels");
        let mut files = vec![("config.json".to_owned(), config)];
        files.extend(extra.iter().map(|(n, v)| ((*n).to_owned(), v.clone())));
        for (file, value) in files {
            let path = temp.join(&file);
            let text = serde_json::to_string_pretty(&value)
                .map_err(|e| Error::invalid(&path, e.to_string()))?;
            std::fs::write(&path, text).map_err(io(&path))?;
        }
        let mut tensors = self.lm.model.named_params();
        tensors.push(("score.weight".to_owned(), self.score.shallow_clone()));
        write_safetensors(&temp.join("model.safetensors"), &tensors, None)?;
        for file in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "chat_template.jinja",
        ] {
            let src = self.lm.dir.join(file);
            if src.is_file() {
                std::fs::copy(&src, temp.join(file)).map_err(io(&src))?;
            }
        }
        Ok(dir.commit()?)
    }

    /// Final post-norm hidden states `[n, hidden]` (float32, host) of the last token of each
    /// text; texts too long for the model lose their oldest tokens.
    pub fn features(&self, texts: &[String]) -> Result<Tensor> {
        features_with(&self.lm, texts, self.batch_size, self.memo.as_ref())
    }

    /// Whether `other` runs the same backbone: the same configuration, vocabulary, dtype and
    /// device, and equal weights (compared tensor by tensor; only the heads may differ).
    pub fn same_backbone(&self, other: &RewardModel) -> Result<bool> {
        let (a, b) = (&self.lm.model, &other.lm.model);
        if a.config() != b.config()
            || a.kind() != b.kind()
            || a.device() != b.device()
            || !self.lm.tokenizer.same_vocabulary(&other.lm.tokenizer)
        {
            return Ok(false);
        }
        let (pa, pb) = (a.named_params(), b.named_params());
        if pa.len() != pb.len() {
            return Ok(false);
        }
        for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
            if na != nb || ta.size() != tb.size() || !ta.f_equal(tb)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Shares computed features with `other` when both run the same backbone
    /// ([`RewardModel::same_backbone`]); returns whether they do.
    pub fn share_features(&mut self, other: &mut RewardModel) -> Result<bool> {
        if !self.same_backbone(other)? {
            return Ok(false);
        }
        let memo = self
            .memo
            .clone()
            .or_else(|| other.memo.clone())
            .unwrap_or_else(|| FeatureMemo::new(FeatureMemo::DEFAULT_CAPACITY_BYTES));
        self.memo = Some(memo.clone());
        other.memo = Some(memo);
        Ok(true)
    }

    /// Rewards of whole texts.
    pub fn score_texts(&self, texts: &[String]) -> Result<Vec<f32>> {
        let _guard = tch::no_grad_guard();
        let feats = self.features(texts)?;
        let head = self
            .score
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)?;
        // Row by row (not one matmul, whose blocking can round equal rows differently): a
        // text scores the same wherever it sits in the batch.
        let rewards = Vec::<f32>::try_from(feats.f_mul(&head)?.f_sum_dim_intlist(
            1,
            false,
            Kind::Float,
        )?)?;
        if let Some((index, &value)) = rewards.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite { index, value });
        }
        Ok(rewards)
    }
}

impl RewardSource for RewardModel {
    fn score(&mut self, pairs: &[(String, String)]) -> Result<Vec<f32>> {
        let texts: Vec<String> = pairs.iter().map(|(p, r)| scored_text(p, r)).collect();
        self.score_texts(&texts)
    }

    fn describe(&self) -> String {
        format!("reward model {} ({})", self.dir.display(), self.lm.identity)
    }
}

/// Texts tokenised for one forward pass: left-padded ids, HF position ids and the key mask.
#[derive(Debug)]
pub struct EncodedBatch {
    pub input_ids: Tensor,
    pub position_ids: Tensor,
    pub key_mask: Tensor,
    /// Whether any row is padded (else the mask can be left out).
    pub padded: bool,
}

impl EncodedBatch {
    /// The model input.
    pub fn input(&self) -> StepInput<'_> {
        StepInput {
            input_ids: &self.input_ids,
            position_ids: &self.position_ids,
            key_mask: self.padded.then_some(&self.key_mask),
        }
    }
}

/// Token ids of a text as the reward model reads it: special tokens added (as HF does); a
/// text too long for the model loses its oldest tokens (BOS kept), since the response at the
/// end is what is judged.
pub fn text_ids(lm: &LanguageModel, text: &str) -> Result<Vec<i64>> {
    let max = lm
        .model
        .config()
        .max_position_embeddings
        .unwrap_or(usize::MAX);
    let bos = lm.model.config().bos_token_id;
    let mut ids = lm.tokenizer.encode(text, true)?;
    if ids.len() > max {
        let keep_bos = usize::from(bos.is_some() && ids.first().copied() == bos);
        let tail = ids.split_off(ids.len() - (max - keep_bos));
        ids.truncate(keep_bos);
        ids.extend(tail);
    }
    Ok(ids)
}

/// Tokenises texts ([`text_ids`]) into one left-padded batch on the model's device.
pub fn encode_batch(lm: &LanguageModel, texts: &[String]) -> Result<EncodedBatch> {
    let ids = texts
        .iter()
        .map(|t| text_ids(lm, t))
        .collect::<Result<Vec<_>>>()?;
    encode_ids(lm, ids)
}

/// Token id rows as one left-padded batch on the model's device, with HF's position ids.
pub fn encode_ids(lm: &LanguageModel, ids: Vec<Vec<i64>>) -> Result<EncodedBatch> {
    let device = lm.model.device();
    if ids.is_empty() {
        return Err(Error::EmptyBatch);
    }
    if let Some(index) = ids.iter().position(Vec::is_empty) {
        return Err(Error::EmptyText { index });
    }
    let width = ids.iter().map(Vec::len).max().unwrap_or(0);
    let (mut flat, mut mask, mut pos) = (Vec::new(), Vec::new(), Vec::new());
    for row in &ids {
        let pad = width - row.len();
        flat.extend(std::iter::repeat_n(lm.pad_token_id, pad).chain(row.iter().copied()));
        mask.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, row.len())));
        pos.extend(std::iter::repeat_n(1i64, pad).chain(0..row.len() as i64));
    }
    let shape = [ids.len() as i64, width as i64];
    Ok(EncodedBatch {
        input_ids: Tensor::from_slice(&flat)
            .f_view(shape)?
            .f_to_device(device)?,
        position_ids: Tensor::from_slice(&pos)
            .f_view(shape)?
            .f_to_device(device)?,
        key_mask: Tensor::from_slice(&mask)
            .f_view(shape)?
            .f_to_device(device)?,
        padded: ids.iter().any(|r| r.len() != width),
    })
}

pub use crate::features::{features, features_with, FeatureMemo};

/// `score.weight` `[1, hidden]` from a sequence-classification checkpoint.
fn read_score_head(dir: &Path, hidden: i64, device: tch::Device, dtype: DType) -> Result<Tensor> {
    use recontrol_lm::weights::{ParamSource, Weights};
    let w = Weights::open(dir, device, dtype.kind())?;
    match w.get_opt("score.weight", &[1, hidden])? {
        Some(t) => Ok(t),
        None => Err(Error::NoScoreHead {
            path: dir.to_owned(),
        }),
    }
}
