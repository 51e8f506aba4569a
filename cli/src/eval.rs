//! `recontrol eval`: the paper's metrics for one or more generation files (the first is the
//! base): average reward with a bootstrap interval, diversity and rep-2/3/4, coherence, win
//! rates against the dataset's reference response and against the base, lengths and times.
//! Writes `report.json`, `report.md` and `chart.svg` into `--out`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use recontrol_data::metrics::{bootstrap_mean_ci, bootstrap_paired_diff_ci, diversity, rep_n};
use recontrol_data::truncate_response;
use recontrol_io::write_json_atomic;
use recontrol_lm::{DType, LanguageModel, Positions, StepInput};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::args::DeviceArgs;
use crate::output::provenance;

#[derive(Debug, Args, Serialize)]
pub struct EvalArgs {
    /// Generation files (recontrol generate JSONL), the base first; the same prompts in each.
    #[arg(long, num_args = 1.., required = true)]
    pub generations: Vec<PathBuf>,
    /// Method names, comma-separated, one per file (default: the file stems).
    #[arg(long, value_delimiter = ',')]
    pub names: Vec<String>,
    /// The judge: a reward model directory or a TOML file of rules.
    #[arg(long)]
    pub reward: PathBuf,
    /// JSONL with each prompt's reference (dataset-preferred) response, for the win rate
    /// against it.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Field of --reference records holding the reference response.
    #[arg(long, default_value = "reference")]
    pub reference_field: String,
    /// Model directory whose mean-pooled final hidden states embed prompts and responses for
    /// coherence (cosine similarity); default: the reward model's backbone.
    #[arg(long)]
    pub coherence_model: Option<PathBuf>,
    /// Output folder (report.json, report.md, chart.svg).
    #[arg(long)]
    pub out: PathBuf,
    /// Bootstrap resamples for the 95% intervals.
    #[arg(long, default_value_t = 2000)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
}

/// One generation line (the fields eval reads).
#[derive(Debug, Clone, Deserialize)]
struct Generation {
    prompt: String,
    response: String,
    #[serde(default)]
    num_tokens: usize,
    #[serde(default)]
    seconds: f64,
    #[serde(default)]
    batch: Option<usize>,
}

/// The metrics of one method.
#[derive(Debug, Clone, Serialize)]
pub struct MethodReport {
    pub name: String,
    pub file: PathBuf,
    pub responses: usize,
    pub avg_reward: f64,
    pub avg_reward_ci95: [f64; 2],
    pub reward_gain_vs_base: f64,
    pub reward_gain_vs_base_ci95: [f64; 2],
    pub diversity: f64,
    pub rep_2: f64,
    pub rep_3: f64,
    pub rep_4: f64,
    pub coherence: f64,
    pub win_rate_vs_reference: Option<f64>,
    pub win_rate_vs_base: f64,
    pub mean_response_words: f64,
    pub mean_response_tokens: f64,
    pub seconds: f64,
    pub seconds_per_token: f64,
}

fn read_generations(path: &Path) -> Result<Vec<Generation>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--generations {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "--generations {}:{}: expected a JSON object with prompt and response",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

fn read_references(path: &Path, field: &str) -> Result<HashMap<String, String>> {
    use recontrol_data::jsonl::{read_lines, string_field};
    let flag = || format!("--reference {}", path.display());
    let (lines, _) = read_lines(path, false).with_context(flag)?;
    lines
        .iter()
        .map(|line| {
            Ok((
                string_field(path, line, "prompt")?.to_owned(),
                string_field(path, line, field)?.to_owned(),
            ))
        })
        .collect::<Result<_, recontrol_data::Error>>()
        .with_context(flag)
}

/// Mean-pooled final (post-norm) hidden states of a model: the coherence encoder.
struct Encoder {
    lm: LanguageModel,
    max_tokens: usize,
}

impl Encoder {
    fn embed(&self, text: &str) -> Result<Option<Tensor>> {
        let mut ids = self.lm.tokenizer.encode(text, true)?;
        ids.truncate(self.max_tokens);
        if ids.is_empty() {
            return Ok(None);
        }
        let _guard = tch::no_grad_guard();
        let device = self.lm.model.device();
        let n = ids.len() as i64;
        let input = Tensor::from_slice(&ids)
            .f_view([1, n])?
            .f_to_device(device)?;
        let pos = Tensor::f_arange(n, (Kind::Int64, device))?.f_unsqueeze(0)?;
        let mut cache = self.lm.model.new_cache(ids.len());
        let h = self.lm.model.forward_hidden(
            &StepInput {
                input_ids: &input,
                position_ids: &pos,
                key_mask: None,
            },
            &mut cache,
            Positions::All,
        )?;
        Ok(Some(h.f_to_kind(Kind::Float)?.f_mean_dim(
            [1i64].as_slice(),
            false,
            Kind::Float,
        )?))
    }

    /// Cosine similarity of the prompt's and the response's embeddings (0 for an empty one).
    fn coherence(&self, prompt: &str, response: &str) -> Result<f64> {
        let (Some(a), Some(b)) = (self.embed(prompt)?, self.embed(response)?) else {
            return Ok(0.0);
        };
        Ok(Tensor::f_cosine_similarity(&a, &b, 1, 1e-8)?.f_double_value(&[0])?)
    }
}

impl EvalArgs {
    pub fn run(self) -> Result<()> {
        if !self.names.is_empty() && self.names.len() != self.generations.len() {
            anyhow::bail!(
                "--names has {} names for {} --generations files",
                self.names.len(),
                self.generations.len()
            );
        }
        if self.out.exists() && !self.out.is_dir() {
            anyhow::bail!("--out {}: exists and is not a folder", self.out.display());
        }
        let files: Vec<Vec<Generation>> = self
            .generations
            .iter()
            .map(|p| read_generations(p))
            .collect::<Result<_>>()?;
        let base = &files[0];
        if base.is_empty() {
            anyhow::bail!(
                "--generations {}: no generations",
                self.generations[0].display()
            );
        }
        for (file, gens) in self.generations.iter().zip(&files).skip(1) {
            if gens.len() != base.len() {
                anyhow::bail!(
                    "--generations {}: {} generations, the base ({}) has {}",
                    file.display(),
                    gens.len(),
                    self.generations[0].display(),
                    base.len()
                );
            }
            if let Some(i) = gens
                .iter()
                .zip(base)
                .position(|(a, b)| a.prompt != b.prompt)
            {
                anyhow::bail!(
                    "--generations {}:{}: its prompt differs from the base's at that line",
                    file.display(),
                    i + 1
                );
            }
        }
        let names: Vec<String> = if self.names.is_empty() {
            self.generations
                .iter()
                .map(|p| {
                    p.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .collect()
        } else {
            self.names.clone()
        };
        let references = self
            .reference
            .as_ref()
            .map(|p| read_references(p, &self.reference_field))
            .transpose()?;
        if let (Some(refs), Some(path)) = (&references, &self.reference) {
            let missing = base
                .iter()
                .filter(|g| !refs.contains_key(&g.prompt))
                .count();
            if missing > 0 {
                anyhow::bail!(
                    "--reference {}: {missing} of {} prompts have no reference",
                    path.display(),
                    base.len()
                );
            }
        }

        eprintln!("loading the reward {}", self.reward.display());
        let mut reward = recontrol_reward_model::load_reward(&self.reward, self.device.device)
            .with_context(|| format!("--reward {}", self.reward.display()))?;
        let coherence_dir = match &self.coherence_model {
            Some(d) => d.clone(),
            None if self.reward.is_dir() => self.reward.clone(),
            None => anyhow::bail!(
                "--coherence-model is needed with a rules reward (a model directory whose hidden states embed texts)"
            ),
        };
        let lm = LanguageModel::load_backbone(&coherence_dir, self.device.device, DType::F32)
            .with_context(|| format!("coherence encoder {}", coherence_dir.display()))?;
        let max_tokens = lm.model.config().max_position_embeddings.unwrap_or(2048);
        let encoder = Encoder { lm, max_tokens };

        let score = |reward: &mut dyn recontrol_reward_model::RewardSource,
                     pairs: Vec<(String, String)>|
         -> Result<Vec<f64>> {
            let mut out = Vec::with_capacity(pairs.len());
            for chunk in pairs.chunks(16) {
                out.extend(reward.score(chunk)?.into_iter().map(f64::from));
            }
            Ok(out)
        };
        let reference_rewards = match &references {
            Some(refs) => Some(score(
                reward.as_mut(),
                base.iter()
                    .map(|g| (g.prompt.clone(), refs[&g.prompt].clone()))
                    .collect(),
            )?),
            None => None,
        };
        let mut rewards = Vec::new();
        for (name, gens) in names.iter().zip(&files) {
            eprintln!("scoring {name}");
            rewards.push(score(
                reward.as_mut(),
                gens.iter()
                    .map(|g| (g.prompt.clone(), g.response.clone()))
                    .collect(),
            )?);
        }
        let win = |a: &[f64], b: &[f64]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| {
                    if x > y {
                        1.0
                    } else if x == y {
                        0.5
                    } else {
                        0.0
                    }
                })
                .sum::<f64>()
                / a.len() as f64
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mut methods = Vec::new();
        for (k, (name, gens)) in names.iter().zip(&files).enumerate() {
            eprintln!("coherence and diversity of {name}");
            let responses: Vec<&str> = gens
                .iter()
                .map(|g| truncate_response(&g.response))
                .collect();
            let coherence = gens
                .iter()
                .zip(&responses)
                .map(|(g, r)| encoder.coherence(&g.prompt, r))
                .collect::<Result<Vec<f64>>>()?;
            let r = &rewards[k];
            let (lo, hi) = bootstrap_mean_ci(r, self.bootstrap, self.seed);
            let (glo, ghi) = bootstrap_paired_diff_ci(r, &rewards[0], self.bootstrap, self.seed);
            let seconds = if gens.iter().all(|g| g.batch.is_none()) {
                gens.iter().map(|g| g.seconds).sum()
            } else {
                // Lines of one batch share its seconds: count each batch once.
                let mut per_batch = HashMap::new();
                for g in gens {
                    per_batch.insert(g.batch, g.seconds);
                }
                per_batch.values().sum()
            };
            let tokens: usize = gens.iter().map(|g| g.num_tokens).sum();
            let rep = |n: usize| mean(&responses.iter().map(|t| rep_n(t, n)).collect::<Vec<_>>());
            methods.push(MethodReport {
                name: name.clone(),
                file: self.generations[k].clone(),
                responses: gens.len(),
                avg_reward: mean(r),
                avg_reward_ci95: [lo, hi],
                reward_gain_vs_base: mean(r) - mean(&rewards[0]),
                reward_gain_vs_base_ci95: [glo, ghi],
                diversity: mean(&responses.iter().map(|t| diversity(t)).collect::<Vec<_>>()),
                rep_2: rep(2),
                rep_3: rep(3),
                rep_4: rep(4),
                coherence: mean(&coherence),
                win_rate_vs_reference: reference_rewards.as_ref().map(|rr| win(r, rr)),
                win_rate_vs_base: win(r, &rewards[0]),
                mean_response_words: mean(
                    &responses
                        .iter()
                        .map(|t| t.split_whitespace().count() as f64)
                        .collect::<Vec<_>>(),
                ),
                mean_response_tokens: tokens as f64 / gens.len() as f64,
                seconds,
                seconds_per_token: seconds / tokens.max(1) as f64,
            });
        }
        let report = serde_json::json!({
            "methods": methods,
            "prompts": base.len(),
            "reward": reward.describe(),
            "reference_avg_reward": reference_rewards.as_deref().map(mean),
            "coherence_encoder": format!("mean-pooled final hidden states of {}", coherence_dir.display()),
            "truncation": "responses cut at the first hallucinated turn marker (recontrol_data::truncate_response), for every method and the reward alike",
            "bootstrap": { "resamples": self.bootstrap, "seed": self.seed, "interval": "95% percentile; gains paired by prompt" },
            "args": &self,
            "provenance": provenance(),
        });
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("--out {}", self.out.display()))?;
        write_json_atomic(&self.out.join("report.json"), &report)?;
        crate::report::write_markdown(&self.out.join("report.md"), &methods, &report)?;
        crate::report::write_chart(&self.out.join("chart.svg"), &methods)?;
        println!("{}", crate::report::table(&methods));
        eprintln!("wrote {}", self.out.display());
        Ok(())
    }
}
