//! Flag groups shared by subcommands.

use clap::{Args, ValueEnum};
use recontrol_lm::{DType, DeviceSpec};
use serde::{Serialize, Serializer};

/// Where and in which precision a model runs.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DeviceArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    #[serde(serialize_with = "as_display")]
    pub device: DeviceSpec,
    /// Weight and activation dtype.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
}

pub fn as_display<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse().map_err(|e: recontrol_lm::Error| e.to_string())
}

/// `--dtype` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::Bf16,
            DTypeArg::F16 => DType::F16,
        }
    }
}

/// Decoding settings shared by every command that generates.
#[derive(Debug, Clone, Args, Serialize)]
pub struct GenerationArgs {
    /// Maximum number of new tokens per prompt.
    #[arg(long, default_value_t = 128, value_parser = crate::args::num::at_least_one)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0, value_parser = crate::args::num::non_negative, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample only from the k most likely tokens.
    #[arg(long, value_parser = crate::args::num::at_least_one)]
    pub top_k: Option<usize>,
    /// Sample only from the smallest set of tokens whose probability reaches p.
    #[arg(long, value_parser = crate::args::num::probability, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// Seed of the sampling (each prompt draws from its own stream of it).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 8, value_parser = crate::args::num::at_least_one)]
    pub batch_size: usize,
    /// Keep generating after end-of-sequence tokens (benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
}

impl GenerationArgs {
    /// The library's decoding settings of these flags.
    pub fn settings(&self) -> recontrol_lm::DecodingSettings {
        recontrol_lm::DecodingSettings {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            batch_size: self.batch_size,
            ignore_eos: self.ignore_eos,
        }
    }

    /// The checked sampling settings.
    pub fn sampling(&self) -> anyhow::Result<recontrol_lm::Sampling> {
        if self.batch_size == 0 {
            anyhow::bail!("--batch-size must be at least 1");
        }
        self.settings()
            .sampling()
            .map_err(|e| anyhow::anyhow!("--temperature/--top-k/--top-p: {e}"))
    }

    /// The model's generation settings with these flags applied.
    pub fn config(
        &self,
        lm: &recontrol_lm::LanguageModel,
    ) -> anyhow::Result<recontrol_lm::GenerationConfig> {
        self.sampling()?;
        Ok(self.settings().config(lm)?)
    }
}

/// `--dataset-kind` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKindArg {
    /// Detect from the content.
    Auto,
    /// HH-RLHF chosen/rejected dialogues.
    Hh,
    /// HarmfulQA {topic: {subtopic: [question]}}.
    Harmfulqa,
    /// JSONL with --prompt-field (and optionally --chosen-field/--rejected-field).
    Jsonl,
}

/// How a dataset file is read.
#[derive(Debug, Clone, Args, Serialize)]
pub struct DatasetArgs {
    /// Kind of dataset file.
    #[arg(long, visible_alias = "format", value_enum, default_value_t = DatasetKindArg::Auto)]
    pub dataset_kind: DatasetKindArg,
    /// Field of a JSONL record that holds the prompt.
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    /// Field of a JSONL record that holds the preferred reply (or HH dialogue).
    #[arg(long, default_value = "chosen")]
    pub chosen_field: String,
    /// Field of a JSONL record that holds the other reply (or HH dialogue).
    #[arg(long, default_value = "rejected")]
    pub rejected_field: String,
    /// Skip (and count) malformed lines instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
}

impl DatasetArgs {
    /// The library's read options of these flags.
    pub fn options(&self) -> recontrol_data::ReadOptions {
        use recontrol_data::DatasetKind;
        recontrol_data::ReadOptions {
            kind: match self.dataset_kind {
                DatasetKindArg::Auto => None,
                DatasetKindArg::Hh => Some(DatasetKind::Hh),
                DatasetKindArg::Harmfulqa => Some(DatasetKind::HarmfulQa),
                DatasetKindArg::Jsonl => Some(DatasetKind::Jsonl),
            },
            fields: recontrol_data::Fields {
                prompt: self.prompt_field.clone(),
                chosen: self.chosen_field.clone(),
                rejected: self.rejected_field.clone(),
            },
            skip_bad: self.skip_bad,
        }
    }

    pub fn read(&self, path: &std::path::Path) -> anyhow::Result<recontrol_data::Dataset> {
        Ok(recontrol_data::Dataset::read(path, &self.options())?)
    }
}

/// `--split` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitArg {
    Train,
    Test,
    All,
}

/// Which side of the seeded train/test split to use.
#[derive(Debug, Clone, Args, Serialize)]
pub struct SplitArgs {
    /// Side of the split.
    #[arg(long, value_enum, default_value_t = SplitArg::Train)]
    pub split: SplitArg,
    /// Seed of the split (a prompt's side depends only on its text and this seed).
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Share of prompts on the test side.
    #[arg(long, default_value_t = 0.1, value_parser = crate::args::num::fraction, allow_negative_numbers = true)]
    pub test_fraction: f64,
}

impl SplitArgs {
    /// The library's prompt selection of these flags (no limit or shard).
    pub fn selection(&self) -> anyhow::Result<recontrol_data::selection::PromptSelection> {
        if !(0.0..=1.0).contains(&self.test_fraction) {
            anyhow::bail!(
                "--test-fraction must be in [0, 1], got {}",
                self.test_fraction
            );
        }
        Ok(recontrol_data::selection::PromptSelection {
            split: match self.split {
                SplitArg::Train => recontrol_data::Split::Train,
                SplitArg::Test => recontrol_data::Split::Test,
                SplitArg::All => recontrol_data::Split::All,
            },
            split_seed: self.split_seed,
            test_fraction: self.test_fraction,
            limit: None,
            shard: None,
        })
    }
}

/// `--prompt-format` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptFormatArg {
    Raw,
    Hh,
    Vicuna,
    ChatTemplate,
}

impl From<PromptFormatArg> for recontrol_data::PromptFormat {
    fn from(f: PromptFormatArg) -> Self {
        match f {
            PromptFormatArg::Raw => Self::Raw,
            PromptFormatArg::Hh => Self::Hh,
            PromptFormatArg::Vicuna => Self::Vicuna,
            PromptFormatArg::ChatTemplate => Self::ChatTemplate,
        }
    }
}

/// How dataset prompts become model input.
#[derive(Debug, Clone, Args, Serialize)]
pub struct PromptArgs {
    /// Prompt format.
    #[arg(long, value_enum, default_value_t = PromptFormatArg::Hh)]
    pub prompt_format: PromptFormatArg,
    /// An instruction put before every prompt (the paper's "+prompting").
    #[arg(long, conflicts_with = "helpful_prompt")]
    pub prompt_prefix: Option<String>,
    /// Put the paper's helpful-assistant instruction before every prompt.
    #[arg(long)]
    pub helpful_prompt: bool,
}

impl PromptArgs {
    /// The instruction, if any.
    pub fn instruction(&self) -> Option<&str> {
        match (&self.prompt_prefix, self.helpful_prompt) {
            (Some(p), _) => Some(p),
            (None, true) => Some(recontrol_data::HELPFUL_INSTRUCTION),
            (None, false) => None,
        }
    }
}

/// How an epoch-based training command runs: resumption, a cap for time-boxed jobs, and where
/// TensorBoard logs go.
#[derive(Debug, Clone, Args, Serialize)]
pub struct EpochRunArgs {
    /// Continue an interrupted run (same flags) from OUT.work/checkpoint.safetensors.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many epochs of this invocation, keeping a checkpoint.
    #[arg(long, value_parser = crate::args::num::at_least_one)]
    pub max_epochs_per_run: Option<usize>,
    /// TensorBoard folder; default OUT.work/logs.
    #[arg(long)]
    pub logdir: Option<std::path::PathBuf>,
}

/// Parsers of numeric flags, so that a value out of range is refused while parsing, before any
/// file is read; clap names the flag and the value, these say what was expected. Floats are
/// declared with `allow_negative_numbers`, so that `--temperature -1` reads as a (refused) value,
/// not as an unknown flag.
pub mod num {
    fn parse<T: std::str::FromStr>(s: &str, expected: &str) -> Result<T, String> {
        s.trim()
            .parse()
            .map_err(|_| format!("expected {expected}, got {s:?}"))
    }

    fn float(s: &str, expected: &str, ok: impl Fn(f64) -> bool) -> Result<f64, String> {
        let v: f64 = parse(s, expected)?;
        if v.is_finite() && ok(v) {
            Ok(v)
        } else {
            Err(format!("expected {expected}, got {s}"))
        }
    }

    /// An integer >= 1.
    pub fn at_least_one(s: &str) -> Result<usize, String> {
        match parse::<usize>(s, "an integer >= 1")? {
            0 => Err("expected an integer >= 1, got 0".to_owned()),
            v => Ok(v),
        }
    }

    /// Any finite number.
    pub fn finite(s: &str) -> Result<f64, String> {
        float(s, "a finite number", |_| true)
    }

    /// A finite number (single precision).
    pub fn finite_f32(s: &str) -> Result<f32, String> {
        finite(s).and_then(|v| {
            let narrow = v as f32;
            if narrow.is_finite() {
                Ok(narrow)
            } else {
                Err(format!("expected a finite 32-bit number, got {s}"))
            }
        })
    }

    /// A finite number >= 0.
    pub fn non_negative(s: &str) -> Result<f64, String> {
        float(s, "a finite number >= 0", |v| v >= 0.0)
    }

    /// A finite number > 0.
    pub fn positive(s: &str) -> Result<f64, String> {
        float(s, "a finite number > 0", |v| v > 0.0)
    }

    /// A finite number > 0 (single precision).
    pub fn positive_f32(s: &str) -> Result<f32, String> {
        positive(s).map(|v| v as f32)
    }

    /// A probability mass in (0, 1].
    pub fn probability(s: &str) -> Result<f64, String> {
        float(s, "a number in (0, 1]", |v| v > 0.0 && v <= 1.0)
    }

    /// A fraction in [0, 1).
    pub fn fraction(s: &str) -> Result<f64, String> {
        float(s, "a number in [0, 1)", |v| (0.0..1.0).contains(&v))
    }

    /// A number in [0, 1].
    pub fn unit(s: &str) -> Result<f64, String> {
        float(s, "a number in [0, 1]", |v| (0.0..=1.0).contains(&v))
    }

    /// A quantile of a two-sided split, in (0, 0.5].
    pub fn half_quantile(s: &str) -> Result<f64, String> {
        float(s, "a number in (0, 0.5]", |v| v > 0.0 && v <= 0.5)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn values_out_of_range_say_what_was_expected() {
            assert_eq!(at_least_one("3"), Ok(3));
            assert!(at_least_one("0").is_err_and(|e| e.contains(">= 1")));
            assert!(at_least_one("-2").is_err());
            assert_eq!(non_negative("0"), Ok(0.0));
            for bad in ["-1", "NaN", "inf", "x"] {
                assert!(
                    non_negative(bad).is_err_and(|e| e.contains(">= 0")),
                    "{bad}"
                );
            }
            assert!(positive("0").is_err());
            assert_eq!(probability("1"), Ok(1.0));
            assert!(probability("1.5").is_err());
            assert!(probability("0").is_err());
            assert!(fraction("1").is_err());
            assert_eq!(fraction("0"), Ok(0.0));
            assert!(half_quantile("0.6").is_err());
            assert!(finite_f32("1e300").is_err());
            assert!(finite("-3.5").is_ok());
        }
    }
}
