//! `recontrol lm`: import a llama.cpp GGUF model as a Hugging Face model directory
//! (`import-gguf`), or train the project's small dialogue model from scratch (`pretrain`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use recontrol_io::WorkDirs;
use recontrol_lm::pretrain::stage::{
    corpus_documents, event_scalars, pretrain_model, CorpusFormat, PretrainOutcome, PretrainRun,
    PretrainSettings, PretrainSummary, Sample,
};
use recontrol_lm::pretrain::{PretrainConfig, TrainEvent};
use recontrol_lm::DeviceSpec;
use recontrol_train::AdamWConfig;
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
    /// Import a llama.cpp GGUF model (llama, mistral, qwen2; F32, F16, BF16, Q8_0, Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) as a Hugging Face model directory.
    ImportGguf(ImportGgufArgs),
    /// Train a small Llama-architecture dialogue model (and its tokenizer) from scratch.
    Pretrain(Box<PretrainArgs>),
}

impl LmCommand {
    pub fn run(self) -> Result<()> {
        match self.command {
            LmSubcommand::ImportGguf(args) => args.run(),
            LmSubcommand::Pretrain(args) => args.run(),
        }
    }
}

/// `--dtype` choices of an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImportDtypeArg {
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Args)]
pub struct ImportGgufArgs {
    /// The GGUF file (v2 or v3).
    pub file: PathBuf,
    /// Output model directory: config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json (chat template), generation_config.json, gguf_import.json. It
    /// must not exist, unless it holds an import of the same file in the same dtype (then
    /// nothing is done).
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype of the output.
    #[arg(long, value_enum, default_value_t = ImportDtypeArg::F32)]
    pub dtype: ImportDtypeArg,
}

impl ImportGgufArgs {
    fn run(&self) -> Result<()> {
        use recontrol_gguf::{import_gguf_once, Error, ImportOptions, ImportOutcome, OutDtype};
        let dtype = match self.dtype {
            ImportDtypeArg::F32 => OutDtype::F32,
            ImportDtypeArg::Bf16 => OutDtype::BF16,
            ImportDtypeArg::F16 => OutDtype::F16,
        };
        let start = Instant::now();
        let options = ImportOptions {
            dtype,
            ..ImportOptions::default()
        };
        let summary = match import_gguf_once(&self.file, &self.out, &options) {
            Ok(ImportOutcome::Imported(summary)) => summary,
            Ok(ImportOutcome::AlreadyImported(record)) => {
                eprintln!(
                    "{}: already imported from {} ({} bytes, sha256 {}), nothing to do",
                    self.out.display(),
                    record.source,
                    record.bytes,
                    record.sha256
                );
                return Ok(());
            }
            Err(e @ Error::OutputOccupied { .. }) => anyhow::bail!("--out {e}"),
            Err(e) => return Err(e.into()),
        };
        eprintln!(
            "{}: {} ({} layers, hidden {}), {} tensors, {} parameters, {} in {:.1} s",
            summary.out.display(),
            summary.architecture.model_type(),
            summary.config.num_layers,
            summary.config.hidden_size,
            summary.tensors,
            summary.parameters,
            dtype.torch_name(),
            start.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// `--corpus-format` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CorpusFormatArg {
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
    #[arg(long, value_enum, default_value_t = CorpusFormatArg::Auto)]
    pub corpus_format: CorpusFormatArg,
    #[command(flatten)]
    #[serde(flatten)]
    pub data: DatasetArgs,
    /// Seed of the train/held-out split (the held-out side gives the perplexity).
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Share of documents held out.
    #[arg(long, default_value_t = 0.1, value_parser = crate::args::num::fraction, allow_negative_numbers = true)]
    pub test_fraction: f64,
    /// A tokenizer.json to use instead of training one.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the trained tokenizer.
    #[arg(long, default_value_t = 4096, value_parser = crate::args::num::at_least_one)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = PretrainConfig::default().layers, value_parser = crate::args::num::at_least_one)]
    pub layers: usize,
    #[arg(long, default_value_t = PretrainConfig::default().hidden, value_parser = crate::args::num::at_least_one)]
    pub hidden: usize,
    #[arg(long, default_value_t = PretrainConfig::default().heads, value_parser = crate::args::num::at_least_one)]
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than --heads); default --heads.
    #[arg(long, value_parser = crate::args::num::at_least_one)]
    pub kv_heads: Option<usize>,
    /// MLP width; default 8/3 of --hidden rounded up to a multiple of 16.
    #[arg(long, value_parser = crate::args::num::at_least_one)]
    pub intermediate: Option<usize>,
    #[arg(long, default_value_t = PretrainConfig::default().seq_len, value_parser = crate::args::num::at_least_one)]
    pub seq_len: usize,
    /// Positions the written model accepts.
    #[arg(long, default_value_t = PretrainConfig::default().max_positions, value_parser = crate::args::num::at_least_one)]
    pub max_positions: usize,
    #[arg(long, default_value_t = PretrainConfig::default().batch_size, value_parser = crate::args::num::at_least_one)]
    pub batch_size: usize,
    #[arg(long, default_value_t = PretrainConfig::default().steps, value_parser = crate::args::num::at_least_one)]
    pub steps: usize,
    /// Peak learning rate (after warmup; cosine decay to --min-lr).
    #[arg(long, default_value_t = PretrainConfig::default().lr, value_parser = crate::args::num::positive, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = PretrainConfig::default().min_lr, value_parser = crate::args::num::non_negative, allow_negative_numbers = true)]
    pub min_lr: f64,
    #[arg(long, default_value_t = PretrainConfig::default().warmup)]
    pub warmup: usize,
    /// Gradient-norm clip.
    #[arg(long, default_value_t = PretrainConfig::default().clip, value_parser = crate::args::num::positive, allow_negative_numbers = true)]
    pub clip: f64,
    #[arg(long, default_value_t = AdamWConfig::default().weight_decay, value_parser = crate::args::num::non_negative, allow_negative_numbers = true)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = PretrainConfig::default().eval_every, value_parser = crate::args::num::at_least_one)]
    pub eval_every: usize,
    #[arg(long, default_value_t = PretrainConfig::default().eval_sequences, value_parser = crate::args::num::at_least_one)]
    pub eval_sequences: usize,
    #[arg(long, default_value_t = PretrainConfig::default().checkpoint_every, value_parser = crate::args::num::at_least_one)]
    pub checkpoint_every: usize,
    /// Continue an interrupted run (same flags) from OUT.work/checkpoint.safetensors.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps of this invocation, keeping a checkpoint (time-boxed jobs).
    #[arg(long, value_parser = crate::args::num::at_least_one)]
    pub max_steps_per_run: Option<usize>,
    /// TensorBoard folder; default OUT.work/logs.
    #[arg(long)]
    pub logdir: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = |s: &str| s.parse::<DeviceSpec>().map_err(|e| e.to_string()))]
    #[serde(serialize_with = "crate::args::as_display")]
    pub device: DeviceSpec,
}

impl PretrainArgs {
    /// The library's settings of these flags.
    fn settings(&self) -> PretrainSettings {
        PretrainSettings {
            corpus_format: match self.corpus_format {
                CorpusFormatArg::Auto => CorpusFormat::Auto,
                CorpusFormatArg::Dataset => CorpusFormat::Dataset,
                CorpusFormatArg::Text => CorpusFormat::Text,
            },
            split_seed: self.split_seed,
            test_fraction: self.test_fraction,
            tokenizer: self.tokenizer.clone(),
            vocab_size: self.vocab_size,
            layers: self.layers,
            hidden: self.hidden,
            heads: self.heads,
            kv_heads: self.kv_heads,
            intermediate: self.intermediate,
            seq_len: self.seq_len,
            max_positions: self.max_positions,
            batch_size: self.batch_size,
            steps: self.steps,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup: self.warmup,
            clip: self.clip,
            weight_decay: self.weight_decay,
            seed: self.seed,
            eval_every: self.eval_every,
            eval_sequences: self.eval_sequences,
            checkpoint_every: self.checkpoint_every,
        }
    }

    pub fn run(&self) -> Result<()> {
        let started = Instant::now();
        let settings = self.settings();
        settings.config().validate()?;
        if !(0.0..1.0).contains(&self.test_fraction) || self.test_fraction == 0.0 {
            anyhow::bail!(
                "--test-fraction must be in (0, 1), got {}",
                self.test_fraction
            );
        }
        // A finished run resumed (a requeued job) does nothing and succeeds.
        if crate::output::already_complete(&self.out, self.resume, "training.json", "/args", self)?
        {
            return Ok(());
        }
        let dirs = WorkDirs::prepare(&self.out, self.resume, self.logdir.as_deref())?;
        let WorkDirs {
            work,
            checkpoint,
            logdir,
        } = dirs.clone();
        let device = self.device.resolve()?;

        let docs = corpus_documents(
            &self.corpus,
            settings.corpus_format,
            &self.data.options(),
            &settings.split(),
        )
        .with_context(|| format!("--corpus {}", self.corpus.display()))?;
        eprintln!(
            "{} training and {} held-out documents",
            docs.train.len(),
            docs.heldout.len()
        );
        dirs.create()?;
        let mut progress = Progress::new(&logdir, settings.steps);
        let mut on_event = |e: TrainEvent| progress.event(e);
        let run = PretrainRun {
            work: &work,
            checkpoint: &checkpoint,
            resume: self.resume,
            max_steps_this_run: self.max_steps_per_run,
            device,
        };
        let outcome = pretrain_model(
            &settings,
            &docs,
            &self.out,
            run,
            (self, &provenance()),
            &mut on_event,
        )?;
        progress.finish();
        let (summary, samples) = match outcome {
            PretrainOutcome::Stopped { steps_done } => {
                eprintln!(
                    "stopped after step {steps_done} of {}; continue with --resume",
                    settings.steps
                );
                return Ok(());
            }
            PretrainOutcome::Complete { summary, samples } => (summary, samples),
        };
        print_summary(&summary, &samples, started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// TensorBoard scalars and a progress bar of a pretraining run.
struct Progress {
    tb: tensorboard_rs::summary_writer::SummaryWriter,
    bar: ProgressBar,
    last_eval: f64,
}

impl Progress {
    fn new(logdir: &std::path::Path, steps: usize) -> Self {
        let bar = ProgressBar::new(steps as u64).with_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len}  {elapsed} (eta {eta})  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Self {
            tb: tensorboard_rs::summary_writer::SummaryWriter::new(logdir),
            bar,
            last_eval: f64::NAN,
        }
    }

    fn event(&mut self, e: TrainEvent) {
        let (step, scalars) = event_scalars(&e);
        for (tag, value) in scalars {
            self.tb.add_scalar(tag, value as f32, step);
        }
        match e {
            TrainEvent::Step {
                step,
                loss,
                tokens_per_s,
                ..
            } => {
                self.bar.set_position(step as u64);
                self.bar.set_message(format!(
                    "loss {loss:.3}  held-out ppl {:.1}  {tokens_per_s:.0} tok/s",
                    self.last_eval
                ));
            }
            TrainEvent::Eval { perplexity, .. } => {
                self.tb.flush();
                self.last_eval = perplexity;
            }
        }
    }

    fn finish(&mut self) {
        self.tb.flush();
        self.bar.finish_and_clear();
    }
}

/// The run's figures and the sample replies, on standard output.
fn print_summary(summary: &PretrainSummary, samples: &[Sample], seconds: f64) {
    println!(
        "held-out perplexity {:.2} (unigram {:.2}); {} tokens in {:.0} s ({:.0} tokens/s); {seconds:.0} s in all",
        summary.heldout_perplexity,
        summary.unigram_perplexity,
        summary.tokens_seen,
        summary.train_seconds,
        summary.tokens_per_second,
    );
    for s in samples {
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
}
