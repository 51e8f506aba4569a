//! `recontrol lm pretrain`: train the project's small default dialogue model from scratch.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use recontrol_data::{dialogue_document, Dataset, PromptFormat, SplitSpec};
use recontrol_io::{write_json_atomic, AtomicDir, Provenance, WorkDirs};
use recontrol_lm::bpe::{self, EOS_ID};
use recontrol_lm::pretrain::{
    unigram_perplexity, PackedCorpus, PretrainConfig, Pretrainer, TrainEvent,
};
use recontrol_lm::{generate, DType, DeviceSpec, LanguageModel, Sampling};
use recontrol_train::{write_safetensors, AdamWConfig, RunControl};
use serde::Serialize;

use crate::args::DatasetArgs;
use crate::output::provenance;

/// Language-model utilities.
#[derive(Debug, Args)]
pub struct LmCommand {
    #[command(subcommand)]
    pub command: LmSubcommand,
}

#[derive(Debug, Subcommand)]
pub enum LmSubcommand {
    /// Train a small Llama-architecture dialogue model (and its tokenizer) from scratch.
    Pretrain(Box<PretrainArgs>),
}

impl LmCommand {
    pub fn run(self) -> Result<()> {
        match self.command {
            LmSubcommand::Pretrain(args) => args.run(),
        }
    }
}

/// `--corpus-format` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CorpusFormat {
    /// A dataset if the first line is a JSON object, plain text otherwise.
    Auto,
    /// A dataset file (HH-RLHF dialogues, or JSONL with --prompt-field).
    Dataset,
    /// Plain text, one document per line.
    Text,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct PretrainArgs {
    /// Training corpus: HH-RLHF JSONL(.gz) (chosen and rejected dialogues) or plain text.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Output HF model directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = CorpusFormat::Auto)]
    pub corpus_format: CorpusFormat,
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DatasetArgs,
    /// Seed of the train/held-out split (the held-out side gives the perplexity).
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Share of documents held out.
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f64,
    /// A tokenizer.json to use instead of training one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the trained tokenizer.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = PretrainConfig::default().layers)]
    pub layers: usize,
    #[arg(long, default_value_t = PretrainConfig::default().hidden)]
    pub hidden: usize,
    #[arg(long, default_value_t = PretrainConfig::default().heads)]
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than --heads); default --heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// MLP width; default 8/3 of --hidden rounded up to a multiple of 16.
    #[arg(long)]
    pub intermediate: Option<usize>,
    #[arg(long, default_value_t = PretrainConfig::default().seq_len)]
    pub seq_len: usize,
    /// Positions the written model accepts.
    #[arg(long, default_value_t = PretrainConfig::default().max_positions)]
    pub max_positions: usize,
    #[arg(long, default_value_t = PretrainConfig::default().batch_size)]
    pub batch_size: usize,
    #[arg(long, default_value_t = PretrainConfig::default().steps)]
    pub steps: usize,
    /// Peak learning rate (after warmup; cosine decay to --min-lr).
    #[arg(long, default_value_t = PretrainConfig::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = PretrainConfig::default().min_lr)]
    pub min_lr: f64,
    #[arg(long, default_value_t = PretrainConfig::default().warmup)]
    pub warmup: usize,
    /// Gradient-norm clip.
    #[arg(long, default_value_t = PretrainConfig::default().clip)]
    pub clip: f64,
    #[arg(long, default_value_t = AdamWConfig::default().weight_decay)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = PretrainConfig::default().eval_every)]
    pub eval_every: usize,
    #[arg(long, default_value_t = PretrainConfig::default().eval_sequences)]
    pub eval_sequences: usize,
    #[arg(long, default_value_t = PretrainConfig::default().checkpoint_every)]
    pub checkpoint_every: usize,
    /// Continue an interrupted run (same flags) from OUT.work/checkpoint.safetensors.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps of this invocation, keeping a checkpoint (time-boxed jobs).
    #[arg(long)]
    pub max_steps_per_run: Option<usize>,
    /// TensorBoard folder; default OUT.work/logs.
    #[arg(long)]
    pub logdir: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = |s: &str| s.parse::<DeviceSpec>().map_err(|e| e.to_string()))]
    #[serde(serialize_with = "crate::args::as_display")]
    pub device: DeviceSpec,
}

/// What `training.json` in the model directory records.
#[derive(Debug, Serialize)]
struct TrainingRecord<'a> {
    args: &'a PretrainArgs,
    config: &'a PretrainConfig,
    vocab_size: usize,
    train_documents: usize,
    heldout_documents: usize,
    train_tokens: usize,
    heldout_tokens: usize,
    tokens_seen: u64,
    train_seconds: f64,
    tokens_per_second: f64,
    heldout_perplexity: f64,
    unigram_perplexity: f64,
    provenance: Provenance,
}

/// One sample reply of the trained model.
#[derive(Debug, Serialize)]
struct Sample {
    prompt: String,
    response: String,
    ends_with_eos: bool,
}

impl PretrainArgs {
    fn config(&self) -> PretrainConfig {
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

    /// Training and held-out documents, and held-out prompts for samples.
    fn documents(&self) -> Result<(Vec<String>, Vec<String>, Vec<String>)> {
        let split = SplitSpec {
            seed: self.split_seed,
            test_fraction: self.test_fraction,
        };
        let is_dataset = match self.corpus_format {
            CorpusFormat::Dataset => true,
            CorpusFormat::Text => false,
            CorpusFormat::Auto => first_line_is_json_object(&self.corpus)?,
        };
        let (mut train, mut heldout, mut prompts) = (Vec::new(), Vec::new(), Vec::new());
        let eos = "</s>";
        if is_dataset {
            let dataset: Dataset = self.data.read(&self.corpus)?;
            let pairs = dataset.pairs.as_ref().with_context(|| {
                format!(
                    "--corpus {}: a dataset corpus needs dialogues with replies (chosen/rejected)",
                    self.corpus.display()
                )
            })?;
            for pair in pairs {
                let turns = &pair.prompt.dialogue.turns;
                let docs = [
                    dialogue_document(turns, &pair.chosen, eos),
                    dialogue_document(turns, &pair.rejected, eos),
                ];
                if split.side_of(&pair.prompt.raw) == recontrol_data::Split::Test {
                    heldout.extend(docs);
                    prompts.push(
                        recontrol_data::render_prompt(PromptFormat::Hh, &pair.prompt, None, None)
                            .map_err(anyhow::Error::msg)?,
                    );
                } else {
                    train.extend(docs);
                }
            }
        } else {
            let file = std::fs::File::open(&self.corpus)
                .with_context(|| format!("--corpus {}", self.corpus.display()))?;
            for line in std::io::BufReader::new(file).lines() {
                let line = line.with_context(|| format!("--corpus {}", self.corpus.display()))?;
                if line.trim().is_empty() {
                    continue;
                }
                let doc = format!("{line}{eos}");
                if split.side_of(&line) == recontrol_data::Split::Test {
                    prompts.push(line.chars().take(80).collect());
                    heldout.push(doc);
                } else {
                    train.push(doc);
                }
            }
        }
        if train.is_empty() || heldout.is_empty() {
            anyhow::bail!(
                "--corpus {}: {} training and {} held-out documents; both sides of the split need some",
                self.corpus.display(),
                train.len(),
                heldout.len()
            );
        }
        Ok((train, heldout, prompts))
    }

    pub fn run(&self) -> Result<()> {
        let started = Instant::now();
        let config = self.config();
        config.validate()?;
        if !(0.0..1.0).contains(&self.test_fraction) || self.test_fraction == 0.0 {
            anyhow::bail!(
                "--test-fraction must be in (0, 1), got {}",
                self.test_fraction
            );
        }
        if self.out.exists() {
            anyhow::bail!(
                "--out {}: exists; remove it or choose another name",
                self.out.display()
            );
        }
        let WorkDirs {
            work,
            checkpoint,
            logdir,
        } = WorkDirs::prepare(&self.out, self.resume, self.logdir.as_deref())?;
        let device = self.device.resolve()?;

        let (train_docs, heldout_docs, prompts) = self.documents()?;
        eprintln!(
            "{} training and {} held-out documents",
            train_docs.len(),
            heldout_docs.len()
        );
        // The tokenizer: given, kept from an interrupted run, or trained on the training side.
        let tokenizer_path = work.join("tokenizer.json");
        let tokenizer = match (&self.tokenizer, tokenizer_path.is_file() && self.resume) {
            (Some(path), _) => tokenizers::Tokenizer::from_file(path)
                .map_err(|e| anyhow::anyhow!("--tokenizer {}: {e}", path.display()))?,
            (None, true) => tokenizers::Tokenizer::from_file(&tokenizer_path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tokenizer_path.display()))?,
            (None, false) => {
                eprintln!("training a {}-token BPE tokenizer", self.vocab_size);
                let t = bpe::train_bpe(train_docs.iter().cloned(), self.vocab_size)?;
                bpe::save_tokenizer(&t, &work, config.max_positions)?;
                t
            }
        };
        for special in ["<s>", "</s>"] {
            if tokenizer.token_to_id(special).is_none() {
                anyhow::bail!("the tokenizer has no {special} token");
            }
        }
        let vocab_size = tokenizer.get_vocab_size(true);
        let encode = |docs: &[String]| -> Result<Vec<Vec<i64>>> {
            docs.iter()
                .map(|d| {
                    tokenizer
                        .encode(d.as_str(), true)
                        .map(|e| e.get_ids().iter().map(|&i| i64::from(i)).collect())
                        .map_err(|e| anyhow::anyhow!("tokenising the corpus: {e}"))
                })
                .collect()
        };
        let train = PackedCorpus::new(&encode(&train_docs)?, config.seq_len);
        let heldout = PackedCorpus::new(&encode(&heldout_docs)?, config.seq_len);
        let unigram = unigram_perplexity(&train, &heldout, config.eval_sequences, vocab_size);

        let mut tb = tensorboard_rs::summary_writer::SummaryWriter::new(&logdir);
        let progress = ProgressBar::new(config.steps as u64).with_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len}  {elapsed} (eta {eta})  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let trainer = Pretrainer {
            config: &config,
            vocab_size,
            train: &train,
            eval: &heldout,
            device,
        };
        let mut last_eval = f64::NAN;
        let mut on_event = |e: TrainEvent| match e {
            TrainEvent::Step {
                step,
                loss,
                lr,
                grad_norm,
                tokens_per_s,
            } => {
                tb.add_scalar("train/loss", loss as f32, step);
                tb.add_scalar("train/perplexity", loss.exp() as f32, step);
                tb.add_scalar("train/lr", lr as f32, step);
                tb.add_scalar("train/grad_norm", grad_norm as f32, step);
                tb.add_scalar("train/tokens_per_s", tokens_per_s as f32, step);
                progress.set_position(step as u64);
                progress.set_message(format!(
                    "loss {loss:.3}  held-out ppl {last_eval:.1}  {tokens_per_s:.0} tok/s"
                ));
            }
            TrainEvent::Eval {
                step,
                loss,
                perplexity,
            } => {
                tb.add_scalar("eval/loss", loss as f32, step);
                tb.add_scalar("eval/perplexity", perplexity as f32, step);
                tb.flush();
                last_eval = perplexity;
            }
        };
        let trained = trainer.run(
            RunControl {
                checkpoint: &checkpoint,
                resume: self.resume,
                max_this_run: self.max_steps_per_run,
            },
            &mut on_event,
        )?;
        tb.flush();
        progress.finish_and_clear();
        if !trained.complete {
            eprintln!(
                "stopped after step {} of {}; continue with --resume",
                trained.steps_done, config.steps
            );
            return Ok(());
        }

        // The model directory, which appears only when complete.
        let dir = AtomicDir::create(&self.out)?;
        let temp = dir.path();
        let hf_config = config.hf_config(vocab_size);
        std::fs::write(
            temp.join("config.json"),
            serde_json::to_string_pretty(&hf_config)?,
        )?;
        std::fs::write(
            temp.join("generation_config.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "bos_token_id": bpe::BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": bpe::PAD_ID,
            }))?,
        )?;
        write_safetensors(&temp.join("model.safetensors"), &trained.params, None)?;
        bpe::save_tokenizer(&tokenizer, temp, config.max_positions)?;

        let heldout_ppl = trained.final_eval_loss.exp();
        let samples = sample_replies(temp, &prompts, self.seed)?;
        let tokens_per_second = trained.tokens_seen as f64 / trained.train_seconds.max(1e-9);
        write_json_atomic(
            &temp.join("training.json"),
            &TrainingRecord {
                args: self,
                config: &config,
                vocab_size,
                train_documents: train_docs.len(),
                heldout_documents: heldout_docs.len(),
                train_tokens: train.num_tokens(),
                heldout_tokens: heldout.num_tokens(),
                tokens_seen: trained.tokens_seen,
                train_seconds: trained.train_seconds,
                tokens_per_second,
                heldout_perplexity: heldout_ppl,
                unigram_perplexity: unigram,
                provenance: provenance(),
            },
        )?;
        let lines: Vec<String> = samples
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        std::fs::write(temp.join("samples.jsonl"), lines.join("\n") + "\n")?;
        dir.commit()?;
        let _ = std::fs::remove_file(&checkpoint);

        println!(
            "held-out perplexity {heldout_ppl:.2} (unigram {unigram:.2}); {} tokens in {:.0} s ({tokens_per_second:.0} tokens/s); {:.0} s in all",
            trained.tokens_seen,
            trained.train_seconds,
            started.elapsed().as_secs_f64()
        );
        for s in &samples {
            println!(
                "---\n{}{}{}",
                s.prompt,
                s.response,
                if s.ends_with_eos {
                    " </s>"
                } else {
                    " [no eos]"
                }
            );
        }
        Ok(())
    }
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
            ends_with_eos: out[0].finish_reason == recontrol_lm::FinishReason::Eos,
        });
    }
    Ok(samples)
}

fn first_line_is_json_object(path: &Path) -> Result<bool> {
    let mut reader = recontrol_data::jsonl::open_maybe_gz(path)?;
    let mut line = String::new();
    while line.trim().is_empty() {
        line.clear();
        if reader
            .read_line(&mut line)
            .with_context(|| format!("--corpus {}", path.display()))?
            == 0
        {
            anyhow::bail!("--corpus {}: empty", path.display());
        }
    }
    Ok(matches!(
        serde_json::from_str::<serde_json::Value>(line.trim()),
        Ok(serde_json::Value::Object(_))
    ))
}
