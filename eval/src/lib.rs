//! Evaluation of generations, the paper's metrics for one or more methods decoded on the same
//! prompts (the first is the base): average reward with a bootstrap interval and the paired gain
//! over the base, diversity and rep-2/3/4, coherence, win rates against the dataset's reference
//! response and against the base, lengths, times and the slowdown over the base.
//!
//! An optional judge (a reward independent of the one the methods optimise, e.g. a reward model
//! trained on another part of the pairs) scores every response too: its average and gain get
//! their own columns and it computes the win rates, so that reward hacking shows as the gap
//! between the policy reward and the judge.
//!
//! [`evaluate`] computes a [`Report`]; [`write_report`] writes `report.json`, `report.md` and
//! `chart.svg`. `recontrol eval` and `recontrol demo` are thin callers.
//!
//! ```no_run
//! # fn main() -> Result<(), recontrol_eval::Error> {
//! use recontrol_eval::{evaluate, CoherenceEncoder, EvalSettings, Judges, MethodGenerations};
//! let methods = vec![
//!     MethodGenerations::read("base", "gens/base.jsonl".as_ref())?,
//!     MethodGenerations::read("re-control", "gens/rc.jsonl".as_ref())?,
//! ];
//! let mut reward = recontrol_reward_model::load_reward(
//!     "reward-model".as_ref(),
//!     recontrol_lm::DeviceSpec::Cpu,
//! )?;
//! let encoder = CoherenceEncoder::load("model".as_ref(), recontrol_lm::DeviceSpec::Cpu)?;
//! let judges = Judges { reward: reward.as_mut(), judge: None, coherence: &encoder };
//! let report = evaluate(&methods, None, judges, &EvalSettings::default())?;
//! println!("{}", recontrol_eval::report::table(&report.methods));
//! # Ok(()) }
//! ```

mod encoder;
mod error;
pub mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use recontrol_data::metrics::{
    bootstrap_mean_ci, bootstrap_paired_diff_ci, diversity, rep_n, win_rate,
};
use recontrol_data::{read_generations, truncate_response, GenerationRecord};
use recontrol_reward_model::RewardSource;
use serde::{Deserialize, Serialize};

pub use encoder::CoherenceEncoder;
pub use error::{Error, Result};
pub use report::{knob_chart, write_report};

/// The generations of one method.
#[derive(Debug, Clone)]
pub struct MethodGenerations {
    pub name: String,
    /// Where they were read from (recorded in the report).
    pub file: PathBuf,
    pub records: Vec<GenerationRecord>,
}

impl MethodGenerations {
    /// Reads a generations JSONL file under a method name.
    pub fn read(name: impl Into<String>, file: &Path) -> Result<Self> {
        Ok(Self {
            name: name.into(),
            file: file.to_owned(),
            records: read_generations(file)?,
        })
    }
}

/// The scorers: the policy reward (the one the methods optimise), an optional independent
/// judge, and the coherence encoder.
pub struct Judges<'a> {
    pub reward: &'a mut dyn RewardSource,
    /// An independent reward: with one, it also scores every response (and reference) and
    /// computes the win rates. (`'static` because no coercion reaches into an `Option`: a
    /// loaded `Option<Box<dyn RewardSource>>` passes as `judge.as_deref_mut()`.)
    pub judge: Option<&'a mut (dyn RewardSource + 'static)>,
    pub coherence: &'a CoherenceEncoder,
}

impl std::fmt::Debug for Judges<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Judges")
            .field("reward", &self.reward.describe())
            .field("judge", &self.judge.as_ref().map(|j| j.describe()))
            .field("coherence", &self.coherence.describe())
            .finish()
    }
}

/// Settings of the bootstrap intervals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSettings {
    /// Bootstrap resamples for the 95% intervals.
    pub bootstrap: usize,
    /// Seed of the resampling.
    pub seed: u64,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            bootstrap: 2000,
            seed: 0,
        }
    }
}

/// The metrics of one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Share of prompts whose response beats the reference response (ties count half), by the
    /// judge when there is one, else by the policy reward ([`Report::win_rates_by`]).
    pub win_rate_vs_reference: Option<f64>,
    /// Share of prompts whose response beats the base's, by the judge when there is one, else
    /// by the policy reward.
    pub win_rate_vs_base: f64,
    pub mean_response_words: f64,
    pub mean_response_tokens: f64,
    pub seconds: f64,
    pub seconds_per_token: f64,
    /// Seconds per token over the base's (the base: 1); absent when either is not timed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slowdown_vs_base: Option<f64>,
    /// The judge's scores, when there is a judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeMetrics>,
    /// With a judge, the policy reward's win rate against the reference (without one, the
    /// policy reward's win rates are `win_rate_vs_reference` and `win_rate_vs_base`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_win_rate_vs_reference: Option<f64>,
    /// With a judge, the policy reward's win rate against the base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_win_rate_vs_base: Option<f64>,
}

/// A method's rewards by one reward (the judge's in [`MethodReport::judge`]): the average with
/// its interval and the gain over the base paired by prompt, computed like the policy reward's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeMetrics {
    pub avg_reward: f64,
    pub avg_reward_ci95: [f64; 2],
    pub gain_vs_base: f64,
    pub gain_vs_base_ci95: [f64; 2],
}

/// Which reward computed the win rates of a report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WinRatesBy {
    /// The policy reward (no judge was given).
    #[default]
    Reward,
    /// The independent judge.
    Judge,
}

/// How the bootstrap intervals were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapRecord {
    pub resamples: usize,
    pub seed: u64,
    pub interval: String,
}

/// The evaluation of several methods on the same prompts (`report.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub methods: Vec<MethodReport>,
    pub prompts: usize,
    /// The reward's identity.
    pub reward: String,
    /// The mean reward of the reference responses, when given.
    pub reference_avg_reward: Option<f64>,
    /// The judge's identity, when there is a judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
    /// The judge's mean reward of the reference responses, when both are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_reference_avg_reward: Option<f64>,
    /// Which reward computed `win_rate_vs_reference` and `win_rate_vs_base`.
    #[serde(default)]
    pub win_rates_by: WinRatesBy,
    pub coherence_encoder: String,
    pub truncation: String,
    pub bootstrap: BootstrapRecord,
}

/// Checks that every method has generations for the same prompts in the same order as the
/// first (the base).
pub fn check_aligned(methods: &[MethodGenerations]) -> Result<()> {
    let Some(base) = methods.first() else {
        return Err(Error::NoMethods);
    };
    if base.records.is_empty() {
        return Err(Error::NoGenerations {
            file: base.file.clone(),
        });
    }
    for m in &methods[1..] {
        if m.records.len() != base.records.len() {
            return Err(Error::LengthMismatch {
                file: m.file.clone(),
                len: m.records.len(),
                base_file: base.file.clone(),
                base_len: base.records.len(),
            });
        }
        if let Some(i) = m
            .records
            .iter()
            .zip(&base.records)
            .position(|(a, b)| a.prompt != b.prompt)
        {
            return Err(Error::PromptMismatch {
                file: m.file.clone(),
                line: i + 1,
            });
        }
    }
    Ok(())
}

/// Each prompt's reference response from a JSONL file (`prompt` and `field`), as written by
/// `recontrol data prompts`.
pub fn read_references(path: &Path, field: &str) -> Result<HashMap<String, String>> {
    use recontrol_data::jsonl::{read_lines, string_field};
    let (lines, _) = read_lines(path, false)?;
    let mut references = HashMap::new();
    for line in &lines {
        references.insert(
            string_field(path, line, "prompt")?.to_owned(),
            string_field(path, line, field)?.to_owned(),
        );
    }
    Ok(references)
}

/// Wall time of a method's generations: the sum over generation calls, each batch counted
/// once (the lines of a batch share its seconds).
pub fn generation_seconds(records: &[GenerationRecord]) -> f64 {
    if records.iter().all(|g| g.batch.is_none()) {
        return records.iter().filter_map(|g| g.seconds).sum();
    }
    let mut per_batch = HashMap::new();
    for g in records {
        per_batch.insert(g.batch, g.seconds.unwrap_or(0.0));
    }
    per_batch.values().sum()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Seconds per generated token of `records`, when they are timed and count their tokens.
fn seconds_per_token(records: &[GenerationRecord]) -> Option<f64> {
    let seconds = generation_seconds(records);
    let tokens: usize = records.iter().filter_map(|g| g.num_tokens).sum();
    (seconds > 0.0 && tokens > 0).then(|| seconds / tokens as f64)
}

/// One reward's scores of every method's responses and of the references.
struct Scores {
    /// Per method (the base first), per prompt.
    methods: Vec<Vec<f64>>,
    /// Per prompt, when references are given.
    references: Option<Vec<f64>>,
}

impl Scores {
    /// Scores the responses of `methods` and the references of their prompts with `reward`
    /// (`what` names it in the progress lines). A few prompts at a time, each with all its
    /// responses in one call: a reward model then reads each prompt once for all of them.
    fn of(
        reward: &mut dyn RewardSource,
        methods: &[MethodGenerations],
        references: Option<&HashMap<String, String>>,
        what: &str,
    ) -> Result<Self> {
        const PROMPTS_PER_CALL: usize = 4;
        let base = &methods[0].records;
        let per_prompt = methods.len() + usize::from(references.is_some());
        let mut scores = vec![Vec::with_capacity(base.len()); methods.len()];
        let mut reference_scores = references.map(|_| Vec::with_capacity(base.len()));
        for start in (0..base.len()).step_by(PROMPTS_PER_CALL) {
            let end = (start + PROMPTS_PER_CALL).min(base.len());
            eprintln!(
                "scoring prompts {}-{end} of {} ({per_prompt} responses each) with {what}",
                start + 1,
                base.len()
            );
            let mut pairs = Vec::with_capacity((end - start) * per_prompt);
            for (p, record) in base.iter().enumerate().take(end).skip(start) {
                let prompt = &record.prompt;
                if let Some(refs) = references {
                    pairs.push((prompt.clone(), refs[prompt].clone()));
                }
                pairs.extend(
                    methods
                        .iter()
                        .map(|m| (prompt.clone(), m.records[p].response.clone())),
                );
            }
            let rewards = reward.score(&pairs)?;
            for row in rewards.chunks(per_prompt) {
                let row: Vec<f64> = row.iter().copied().map(f64::from).collect();
                let responses = match reference_scores.as_mut() {
                    Some(r) => {
                        r.push(row[0]);
                        &row[1..]
                    }
                    None => &row[..],
                };
                for (m, &v) in responses.iter().enumerate() {
                    scores[m].push(v);
                }
            }
        }
        Ok(Self {
            methods: scores,
            references: reference_scores,
        })
    }

    fn win_rate_vs_reference(&self, method: usize) -> Option<f64> {
        self.references
            .as_ref()
            .map(|refs| win_rate(&self.methods[method], refs))
    }

    fn win_rate_vs_base(&self, method: usize) -> f64 {
        win_rate(&self.methods[method], &self.methods[0])
    }

    /// The average and the paired gain over the base, with their bootstrap intervals.
    fn metrics(&self, method: usize, settings: &EvalSettings) -> JudgeMetrics {
        let (r, base) = (&self.methods[method], &self.methods[0]);
        let (lo, hi) = bootstrap_mean_ci(r, settings.bootstrap, settings.seed);
        let (glo, ghi) = bootstrap_paired_diff_ci(r, base, settings.bootstrap, settings.seed);
        JudgeMetrics {
            avg_reward: mean(r),
            avg_reward_ci95: [lo, hi],
            gain_vs_base: mean(r) - mean(base),
            gain_vs_base_ci95: [glo, ghi],
        }
    }
}

/// Evaluates `methods` (the first is the base) with `judges`; `references` maps each prompt to
/// the dataset's preferred response, for the win rate against it. With a judge, the win rates
/// are the judge's and the policy reward's are kept as `policy_win_rate_*`.
pub fn evaluate(
    methods: &[MethodGenerations],
    references: Option<&HashMap<String, String>>,
    judges: Judges<'_>,
    settings: &EvalSettings,
) -> Result<Report> {
    check_aligned(methods)?;
    let base = &methods[0].records;
    if let Some(refs) = references {
        let missing = base
            .iter()
            .filter(|g| !refs.contains_key(&g.prompt))
            .count();
        if missing > 0 {
            return Err(Error::MissingReferences {
                missing,
                prompts: base.len(),
            });
        }
    }
    let Judges {
        reward,
        mut judge,
        coherence,
    } = judges;
    let policy = Scores::of(reward, methods, references, "the reward")?;
    let judged = judge
        .as_deref_mut()
        .map(|j| Scores::of(j, methods, references, "the judge"))
        .transpose()?;
    // The win rates are the judge's when there is one.
    let wins = judged.as_ref().unwrap_or(&policy);
    let base_seconds_per_token = seconds_per_token(base);
    let mut reports = Vec::with_capacity(methods.len());
    for (i, m) in methods.iter().enumerate() {
        eprintln!("coherence and diversity of {}", m.name);
        let gens = &m.records;
        let responses: Vec<&str> = gens
            .iter()
            .map(|g| truncate_response(&g.response))
            .collect();
        let coherences = gens
            .iter()
            .zip(&responses)
            .map(|(g, text)| coherence.coherence(&g.prompt, text))
            .collect::<Result<Vec<f64>>>()?;
        let rewards = policy.metrics(i, settings);
        let seconds = generation_seconds(gens);
        let tokens: usize = gens.iter().filter_map(|g| g.num_tokens).sum();
        let per_token = seconds_per_token(gens);
        let per_response = |f: &dyn Fn(&str) -> f64| -> f64 {
            mean(&responses.iter().map(|t| f(t)).collect::<Vec<_>>())
        };
        reports.push(MethodReport {
            name: m.name.clone(),
            file: m.file.clone(),
            responses: gens.len(),
            avg_reward: rewards.avg_reward,
            avg_reward_ci95: rewards.avg_reward_ci95,
            reward_gain_vs_base: rewards.gain_vs_base,
            reward_gain_vs_base_ci95: rewards.gain_vs_base_ci95,
            diversity: per_response(&diversity),
            rep_2: per_response(&|t| rep_n(t, 2)),
            rep_3: per_response(&|t| rep_n(t, 3)),
            rep_4: per_response(&|t| rep_n(t, 4)),
            coherence: mean(&coherences),
            win_rate_vs_reference: wins.win_rate_vs_reference(i),
            win_rate_vs_base: wins.win_rate_vs_base(i),
            mean_response_words: per_response(&|t| t.split_whitespace().count() as f64),
            mean_response_tokens: tokens as f64 / gens.len() as f64,
            seconds,
            seconds_per_token: seconds / tokens.max(1) as f64,
            slowdown_vs_base: per_token
                .zip(base_seconds_per_token)
                .map(|(method, base)| method / base),
            judge: judged.as_ref().map(|j| j.metrics(i, settings)),
            policy_win_rate_vs_reference: judged
                .as_ref()
                .and_then(|_| policy.win_rate_vs_reference(i)),
            policy_win_rate_vs_base: judged.as_ref().map(|_| policy.win_rate_vs_base(i)),
        });
    }
    Ok(Report {
        methods: reports,
        prompts: base.len(),
        reward: reward.describe(),
        reference_avg_reward: policy.references.as_deref().map(mean),
        judge: judge.as_ref().map(|j| j.describe()),
        judge_reference_avg_reward: judged
            .as_ref()
            .and_then(|j| j.references.as_deref().map(mean)),
        win_rates_by: if judged.is_some() {
            WinRatesBy::Judge
        } else {
            WinRatesBy::Reward
        },
        coherence_encoder: coherence.describe(),
        truncation: "responses cut at the first hallucinated turn marker (recontrol_data::truncate_response), for every method and the reward alike".into(),
        bootstrap: BootstrapRecord {
            resamples: settings.bootstrap,
            seed: settings.seed,
            interval: "95% percentile; gains paired by prompt".into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(prompt: &str, batch: Option<usize>, seconds: f64) -> GenerationRecord {
        GenerationRecord {
            batch,
            seconds: Some(seconds),
            ..GenerationRecord::new(prompt, "r")
        }
    }

    #[test]
    fn seconds_count_each_batch_once() {
        let batched = [
            record("a", Some(0), 2.0),
            record("b", Some(0), 2.0),
            record("c", Some(1), 3.0),
        ];
        assert_eq!(generation_seconds(&batched), 5.0);
        let unbatched = [record("a", None, 2.0), record("b", None, 1.5)];
        assert_eq!(generation_seconds(&unbatched), 3.5);
    }

    #[test]
    fn methods_must_share_their_prompts() {
        let method = |name: &str, prompts: &[&str]| MethodGenerations {
            name: name.into(),
            file: format!("{name}.jsonl").into(),
            records: prompts.iter().map(|p| record(p, None, 0.0)).collect(),
        };
        let base = method("base", &["p1", "p2"]);
        assert!(check_aligned(&[base.clone(), method("same", &["p1", "p2"])]).is_ok());
        let err = check_aligned(&[base.clone(), method("b", &["p1", "x"])]).expect_err("differs");
        assert_eq!(
            err.to_string(),
            "b.jsonl:2: its prompt differs from the base's at that line"
        );
        let err = check_aligned(&[base, method("short", &["p1"])]).expect_err("shorter");
        assert_eq!(
            err.to_string(),
            "short.jsonl: 1 generations, the base (base.jsonl) has 2"
        );
        let err = check_aligned(&[method("empty", &[])]).expect_err("empty");
        assert_eq!(err.to_string(), "empty.jsonl: no generations");
    }
}
