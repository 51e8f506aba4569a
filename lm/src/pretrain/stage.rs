//! The pretraining stage as a library call: a corpus in, the small default dialogue model out
//! as a Hugging Face model directory (config, weights, trained BPE tokenizer, generation
//! settings, `training.json` and three sample replies), resumable from a checkpoint.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use recontrol_data::{dialogue_document, Dataset, PromptFormat, ReadOptions, Split, SplitSpec};
use serde::{Deserialize, Serialize};
use tch::Device;

use recontrol_io::{write_json_atomic, AtomicDir};
use recontrol_train::{write_safetensors, AdamWConfig, RunControl};

use super::{unigram_perplexity, PackedCorpus, PretrainConfig, Pretrainer, TrainEvent};
use crate::bpe::{self, EOS_ID};
use crate::{generate, DType, DeviceSpec, Error, LanguageModel, Result, Sampling};

/// How a corpus file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CorpusFormat {
    /// A dataset if the first line is a JSON object, plain text otherwise.
    Auto,
    /// A dataset file (HH-RLHF dialogues, or JSONL with prompt/chosen/rejected fields).
    Dataset,
    /// Plain text, one document per line.
    Text,
}

/// Every setting of a pretraining run. The defaults are `recontrol lm pretrain`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainSettings {
    pub corpus_format: CorpusFormat,
    /// Seed of the train/held-out split (the held-out side gives the perplexity).
    pub split_seed: u64,
    /// Share of documents held out, in (0, 1).
    pub test_fraction: f64,
    /// A tokenizer.json to use instead of training one.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the trained tokenizer.
    pub vocab_size: usize,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`); default `heads`.
    pub kv_heads: Option<usize>,
    /// MLP width; default 8/3 of `hidden` rounded up to a multiple of 16.
    pub intermediate: Option<usize>,
    pub seq_len: usize,
    /// Positions the written model accepts.
    pub max_positions: usize,
    pub batch_size: usize,
    pub steps: usize,
    /// Peak learning rate (after warmup; cosine decay to `min_lr`).
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    /// Gradient-norm clip.
    pub clip: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub eval_every: usize,
    pub eval_sequences: usize,
    pub checkpoint_every: usize,
}

impl Default for PretrainSettings {
    fn default() -> Self {
        let c = PretrainConfig::default();
        Self {
            corpus_format: CorpusFormat::Auto,
            split_seed: 0,
            test_fraction: 0.1,
            tokenizer: None,
            vocab_size: 4096,
            layers: c.layers,
            hidden: c.hidden,
            heads: c.heads,
            kv_heads: None,
            intermediate: None,
            seq_len: c.seq_len,
            max_positions: c.max_positions,
            batch_size: c.batch_size,
            steps: c.steps,
            lr: c.lr,
            min_lr: c.min_lr,
            warmup: c.warmup,
            clip: c.clip,
            weight_decay: AdamWConfig::default().weight_decay,
            seed: 0,
            eval_every: c.eval_every,
            eval_sequences: c.eval_sequences,
            checkpoint_every: c.checkpoint_every,
        }
    }
}

impl PretrainSettings {
    /// The training run's configuration (what checkpoints record).
    pub fn config(&self) -> PretrainConfig {
        PretrainConfig {
            layers: self.layers,
            hidden: self.hidden,
            heads: self.heads,
            kv_heads: self.kv_heads.unwrap_or(self.heads),
            intermediate: self
                .intermediate
                .unwrap_or_else(|| (self.hidden * 8 / 3).div_ceil(16) * 16),
            max_positions: self.max_positions,
            seq_len: self.seq_len,
            batch_size: self.batch_size,
            steps: self.steps,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup: self.warmup,
            clip: self.clip,
            adamw: AdamWConfig {
                weight_decay: self.weight_decay,
                ..AdamWConfig::default()
            },
            seed: self.seed,
            eval_every: self.eval_every.max(1),
            eval_sequences: self.eval_sequences.max(1),
            checkpoint_every: self.checkpoint_every.max(1),
        }
    }

    /// The split of the corpus's documents.
    pub fn split(&self) -> SplitSpec {
        SplitSpec {
            seed: self.split_seed,
            test_fraction: self.test_fraction,
        }
    }

    /// Refuses settings no run can use.
    pub fn check(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.test_fraction) || self.test_fraction == 0.0 {
            return Err(Error::Training(format!(
                "test fraction must be in (0, 1), got {}",
                self.test_fraction
            )));
        }
        self.config().validate()
    }
}

/// A training event as TensorBoard scalars: the step and (tag, value) pairs.
pub fn event_scalars(event: &TrainEvent) -> (usize, Vec<(&'static str, f64)>) {
    match *event {
        TrainEvent::Step {
            step,
            loss,
            lr,
            grad_norm,
            tokens_per_s,
        } => (
            step,
            vec![
                ("train/loss", loss),
                ("train/perplexity", loss.exp()),
                ("train/lr", lr),
                ("train/grad_norm", grad_norm),
                ("train/tokens_per_s", tokens_per_s),
            ],
        ),
        TrainEvent::Eval {
            step,
            loss,
            perplexity,
        } => (
            step,
            vec![("eval/loss", loss), ("eval/perplexity", perplexity)],
        ),
    }
}

/// A corpus split into training and held-out documents, with held-out prompts for samples.
#[derive(Debug, Clone, Default)]
pub struct Documents {
    pub train: Vec<String>,
    pub heldout: Vec<String>,
    pub prompts: Vec<String>,
}

/// Reads and splits the corpus at `path`: a dataset's chosen and rejected dialogues (each an
/// end-of-sequence-terminated document), or plain text lines. `options` read a dataset.
pub fn corpus_documents(
    path: &Path,
    format: CorpusFormat,
    options: &ReadOptions,
    split: &SplitSpec,
) -> Result<Documents> {
    let is_dataset = match format {
        CorpusFormat::Dataset => true,
        CorpusFormat::Text => false,
        CorpusFormat::Auto => first_line_is_json_object(path)?,
    };
    let mut docs = Documents::default();
    let eos = "</s>";
    if is_dataset {
        let dataset = Dataset::read(path, options)?;
        let pairs = dataset.pairs.as_ref().ok_or_else(|| Error::Corpus {
            path: path.to_owned(),
            message: "a dataset corpus needs dialogues with replies (chosen/rejected)".into(),
        })?;
        for pair in pairs {
            let turns = &pair.prompt.dialogue.turns;
            let both = [
                dialogue_document(turns, &pair.chosen, eos),
                dialogue_document(turns, &pair.rejected, eos),
            ];
            if split.side_of(&pair.prompt.raw) == Split::Test {
                docs.heldout.extend(both);
                docs.prompts.push(recontrol_data::render_prompt(
                    PromptFormat::Hh,
                    &pair.prompt,
                    None,
                    None,
                )?);
            } else {
                docs.train.extend(both);
            }
        }
    } else {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.map_err(|e| Error::io(path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let doc = format!("{line}{eos}");
            if split.side_of(&line) == Split::Test {
                docs.prompts.push(line.chars().take(80).collect());
                docs.heldout.push(doc);
            } else {
                docs.train.push(doc);
            }
        }
    }
    if docs.train.is_empty() || docs.heldout.is_empty() {
        return Err(Error::Corpus {
            path: path.to_owned(),
            message: format!(
                "{} training and {} held-out documents; both sides of the split need some",
                docs.train.len(),
                docs.heldout.len()
            ),
        });
    }
    Ok(docs)
}

fn first_line_is_json_object(path: &Path) -> Result<bool> {
    let mut reader = recontrol_data::jsonl::open_maybe_gz(path)?;
    let mut line = String::new();
    while line.trim().is_empty() {
        line.clear();
        if reader
            .read_line(&mut line)
            .map_err(|e| Error::io(path, e))?
            == 0
        {
            return Err(Error::Corpus {
                path: path.to_owned(),
                message: "empty".into(),
            });
        }
    }
    Ok(matches!(
        serde_json::from_str::<serde_json::Value>(line.trim()),
        Ok(serde_json::Value::Object(_))
    ))
}

/// Where a run keeps its state until the model directory is complete.
#[derive(Debug, Clone, Copy)]
pub struct PretrainRun<'a> {
    /// A folder for the trained tokenizer (kept for a resume).
    pub work: &'a Path,
    pub checkpoint: &'a Path,
    pub resume: bool,
    /// Stop after this many steps of this call, keeping a checkpoint (time-boxed jobs).
    pub max_steps_this_run: Option<usize>,
    pub device: Device,
}

/// What `training.json` in the model directory records besides the caller's arguments and
/// provenance.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainSummary {
    pub config: PretrainConfig,
    pub vocab_size: usize,
    pub train_documents: usize,
    pub heldout_documents: usize,
    pub train_tokens: usize,
    pub heldout_tokens: usize,
    pub tokens_seen: u64,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    pub heldout_perplexity: f64,
    pub unigram_perplexity: f64,
}

/// One sample reply of the trained model (`samples.jsonl`).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub prompt: String,
    pub response: String,
    pub ends_with_eos: bool,
}

/// A pretraining call's outcome.
#[derive(Debug)]
pub enum PretrainOutcome {
    /// The model directory is written.
    Complete {
        summary: Box<PretrainSummary>,
        samples: Vec<Sample>,
    },
    /// Stopped at the step cap; the checkpoint is kept to resume from.
    Stopped { steps_done: usize },
}

#[derive(Serialize)]
struct TrainingRecord<'a, A: Serialize, P: Serialize> {
    args: &'a A,
    #[serde(flatten)]
    summary: &'a PretrainSummary,
    provenance: &'a P,
}

/// Trains the tokenizer (unless given) and the model on `docs`, then writes the model
/// directory `out` (under a temporary name, renamed when complete). `args` and `provenance`
/// are recorded in `training.json`. `on_event` sees training steps and evaluations.
pub fn pretrain_model<A: Serialize, P: Serialize>(
    settings: &PretrainSettings,
    docs: &Documents,
    out: &Path,
    run: PretrainRun<'_>,
    (args, provenance): (&A, &P),
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<PretrainOutcome> {
    settings.check()?;
    let config = settings.config();
    // The tokenizer: given, kept from an interrupted run, or trained on the training side.
    let tokenizer_path = run.work.join("tokenizer.json");
    let tokenizer = match (&settings.tokenizer, tokenizer_path.is_file() && run.resume) {
        (Some(path), _) => {
            tokenizers::Tokenizer::from_file(path).map_err(|e| Error::tokenizer(path, e))?
        }
        (None, true) => tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::tokenizer(&tokenizer_path, e))?,
        (None, false) => {
            eprintln!("training a {}-token BPE tokenizer", settings.vocab_size);
            let t = bpe::train_bpe(docs.train.iter().cloned(), settings.vocab_size)?;
            bpe::save_tokenizer(&t, run.work, config.max_positions)?;
            t
        }
    };
    for special in ["<s>", "</s>"] {
        if tokenizer.token_to_id(special).is_none() {
            return Err(Error::Training(format!(
                "the tokenizer has no {special} token"
            )));
        }
    }
    let vocab_size = tokenizer.get_vocab_size(true);
    let encode = |texts: &[String]| -> Result<Vec<Vec<i64>>> {
        texts
            .iter()
            .map(|d| {
                tokenizer
                    .encode(d.as_str(), true)
                    .map(|e| e.get_ids().iter().map(|&i| i64::from(i)).collect())
                    .map_err(|e| Error::Training(format!("tokenising the corpus: {e}")))
            })
            .collect()
    };
    let train = PackedCorpus::new(&encode(&docs.train)?, config.seq_len);
    let heldout = PackedCorpus::new(&encode(&docs.heldout)?, config.seq_len);
    let unigram = unigram_perplexity(&train, &heldout, config.eval_sequences, vocab_size);
    let trainer = Pretrainer {
        config: &config,
        vocab_size,
        train: &train,
        eval: &heldout,
        device: run.device,
    };
    let control = RunControl {
        checkpoint: run.checkpoint,
        resume: run.resume,
        max_this_run: run.max_steps_this_run,
    };
    let trained = trainer.run(control, on_event)?;
    if !trained.complete {
        return Ok(PretrainOutcome::Stopped {
            steps_done: trained.steps_done,
        });
    }

    // The model directory, written under a temporary name and renamed when complete.
    let dir = AtomicDir::create(out)?;
    let temp = dir.path();
    write_json_atomic(&temp.join("config.json"), &config.hf_config(vocab_size))?;
    write_json_atomic(
        &temp.join("generation_config.json"),
        &serde_json::json!({
            "bos_token_id": bpe::BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": bpe::PAD_ID,
        }),
    )?;
    write_safetensors(&temp.join("model.safetensors"), &trained.params, None)?;
    bpe::save_tokenizer(&tokenizer, temp, config.max_positions)?;

    let samples = sample_replies(temp, &docs.prompts, settings.seed)?;
    let summary = PretrainSummary {
        config: config.clone(),
        vocab_size,
        train_documents: docs.train.len(),
        heldout_documents: docs.heldout.len(),
        train_tokens: train.num_tokens(),
        heldout_tokens: heldout.num_tokens(),
        tokens_seen: trained.tokens_seen,
        train_seconds: trained.train_seconds,
        tokens_per_second: trained.tokens_seen as f64 / trained.train_seconds.max(1e-9),
        heldout_perplexity: trained.final_eval_loss.exp(),
        unigram_perplexity: unigram,
    };
    write_json_atomic(
        &temp.join("training.json"),
        &TrainingRecord {
            args,
            summary: &summary,
            provenance,
        },
    )?;
    let mut lines = String::new();
    for sample in &samples {
        lines.push_str(&serde_json::to_string(sample).map_err(|e| Error::Training(e.to_string()))?);
        lines.push('\n');
    }
    recontrol_io::write_atomic(&temp.join("samples.jsonl"), lines.as_bytes())?;
    dir.commit()?;
    let _ = std::fs::remove_file(run.checkpoint);
    Ok(PretrainOutcome::Complete {
        summary: Box::new(summary),
        samples,
    })
}

/// Three seeded sample replies to held-out prompts.
fn sample_replies(model_dir: &Path, prompts: &[String], seed: u64) -> Result<Vec<Sample>> {
    let lm = LanguageModel::load(model_dir, DeviceSpec::Cpu, DType::F32)?;
    let sampling = Sampling::new(0.7, None, Some(0.9), seed)?;
    let config = lm.generation_config(96, sampling);
    let mut samples = Vec::new();
    for prompt in prompts.iter().filter(|p| p.len() < 400).take(3) {
        let (ids, _) = lm.encode_prompt(prompt, 96, true)?;
        let out = generate(&lm.model, &[ids], &config, None)?;
        samples.push(Sample {
            prompt: prompt.clone(),
            response: lm.tokenizer.decode(&out[0].tokens, true)?,
            ends_with_eos: out[0].finish_reason == crate::FinishReason::Eos,
        });
    }
    Ok(samples)
}
