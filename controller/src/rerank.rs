//! Reranking decoders (greedy): at every step the LM's `k` most likely next tokens are
//! rescored and the best one is emitted.
//!
//! - **ARGS** (Khanov et al., ICLR 2024, greedy variant): candidate `c` scores
//!   `logit(c) + w * r(prompt + response so far + c)` under a reward model.
//! - **Value-guided decoding**, controlled decoding with a prefix scorer (Mudgal et al., ICML
//!   2024) whose scorer is our value net: `logit(c) + w * V(h(c))`, where `h(c)` is the final
//!   post-norm hidden state the LM computes on `c`. The same value head RE-Control edits with,
//!   used to rerank instead.
//!
//! Rows and candidates are batched: the KV cache (the LM's for value-guided decoding, the
//! reward model's for ARGS on token ids) holds `k` copies of each row, all `k` candidates are
//! run in one forward pass, and each row's copies then take the chosen candidate's entry
//! ([`recontrol_lm::KvCache::copy_rows`]). For value-guided decoding the chosen candidate's
//! state is the next step's, so a step costs one forward pass of `rows * k` tokens.

use std::path::Path;

use recontrol_lm::{
    CausalLm, DType, DeviceSpec, Generation, GenerationConfig, LanguageModel, Positions,
    PromptBatch, RowProgress, Sampling,
};
use recontrol_reward_model::{RewardModel, RewardSource, RuleReward};
use tch::{Kind, Tensor};

use crate::{Error, GradientBackend, Result};

/// How many candidates are rescored and how much the score counts against the logit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RerankSettings {
    pub k: usize,
    pub weight: f64,
}

impl RerankSettings {
    /// Refuses `k` outside `1..=vocab` and a weight that is not finite (`k_flag`, `weight_flag`
    /// name them in the message).
    pub fn check(
        &self,
        vocab: usize,
        k_flag: &'static str,
        weight_flag: &'static str,
    ) -> Result<()> {
        if self.k == 0 || self.k > vocab {
            return Err(Error::CandidateCount {
                setting: k_flag,
                k: self.k,
                vocab,
            });
        }
        if !self.weight.is_finite() {
            return Err(Error::NotFinite {
                setting: weight_flag,
                value: self.weight,
            });
        }
        Ok(())
    }
}

/// What ARGS scores candidates with.
pub enum ArgsReward {
    /// A reward model with the LM's vocabulary: candidates are scored on token ids (the LM's
    /// prompt ids, the response ids and the candidate), as the ARGS code does, with the reward
    /// model's KV cache reused across steps.
    Tokens(Box<RewardModel>),
    /// Any other reward (a reward model with another tokenizer, rules): each candidate is
    /// scored on `prompt + decoded response`, re-tokenised, exactly as `reward score` does.
    Text(Box<dyn RewardSource>),
}

impl std::fmt::Debug for ArgsReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ArgsReward {
    /// Opens a reward model directory or a `.toml` rules file for `lm`: a reward model that
    /// shares `lm`'s vocabulary scores token ids, anything else text.
    pub fn open(path: &Path, lm: &LanguageModel, device: DeviceSpec) -> Result<Self> {
        if path.is_file() && path.extension().is_some_and(|e| e == "toml") {
            return Ok(Self::Text(Box::new(RuleReward::from_file(path)?)));
        }
        let rm = RewardModel::load(path, device, DType::F32)?;
        Ok(if rm.lm.tokenizer.same_vocabulary(&lm.tokenizer) {
            Self::Tokens(Box::new(rm))
        } else {
            Self::Text(Box::new(rm))
        })
    }

    /// The reward and how candidates reach it.
    pub fn describe(&self) -> String {
        match self {
            Self::Tokens(rm) => format!("{} on the LM's token ids", rm.describe()),
            Self::Text(reward) => format!("{} on decoded text", reward.describe()),
        }
    }
}

/// The `k` highest logits of each row of final hidden states `[rows, hidden]` and their token
/// ids, row-major `[rows * k]`, as float32 (sorted, highest first).
fn top_k(model: &CausalLm, hidden: &Tensor, k: usize) -> Result<(Vec<f32>, Vec<i64>)> {
    let logits = model.logits(hidden)?.f_to_kind(Kind::Float)?;
    let (values, indices) = logits.f_topk(k as i64, -1, true, true)?;
    let host = |t: Tensor| t.f_to_device(tch::Device::Cpu)?.f_flatten(0, -1);
    Ok((
        Vec::<f32>::try_from(host(values)?)?,
        Vec::<i64>::try_from(host(indices)?)?,
    ))
}

/// Each row's choice among its `k` candidates: the first highest `logit + weight * score`
/// (float32, as the reference computes it). Returns the tokens and the chosen flat indices.
fn choose(
    logits: &[f32],
    candidates: &[i64],
    scores: &[f32],
    k: usize,
    weight: f64,
) -> (Vec<i64>, Vec<usize>) {
    let weight = weight as f32;
    let rows = logits.len() / k;
    let mut tokens = Vec::with_capacity(rows);
    let mut chosen = Vec::with_capacity(rows);
    for r in 0..rows {
        let mut best = r * k;
        let mut best_total = f32::NEG_INFINITY;
        for j in r * k..(r + 1) * k {
            let total = logits[j] + weight * scores[j];
            if total > best_total {
                (best, best_total) = (j, total);
            }
        }
        tokens.push(candidates[best]);
        chosen.push(best);
    }
    (tokens, chosen)
}

/// For a cache of `k` copies per row: every copy's source row, the chosen one of its group.
fn group_sources(chosen: &[usize], k: usize, device: tch::Device) -> Result<Tensor> {
    let source: Vec<i64> = chosen
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c as i64, k))
        .collect();
    Ok(Tensor::from_slice(&source).f_to_device(device)?)
}

fn require_greedy(config: &GenerationConfig, method: &'static str) -> Result<()> {
    if config.sampling != Sampling::Greedy {
        return Err(Error::GreedyOnly { method });
    }
    Ok(())
}

/// ARGS decoding of `prompts` (token ids) as one batch; `texts` are the prompts as the user
/// gave them (what a text reward reads).
pub fn args_generate(
    lm: &LanguageModel,
    prompts: &[Vec<i64>],
    texts: &[String],
    config: &GenerationConfig,
    reward: &mut ArgsReward,
    settings: RerankSettings,
) -> Result<Vec<Generation>> {
    let _guard = tch::no_grad_guard();
    require_greedy(config, "ARGS")?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let model = &lm.model;
    let k = settings.k;
    let batch = PromptBatch::new(model, prompts, config)?;
    let capacity = batch.width + config.max_new_tokens;
    let mut cache = model.new_cache(capacity);
    let mut rows = RowProgress::new(&batch, config);
    let mut hidden = model.forward_hidden(&batch.input(), &mut cache, Positions::Last)?;
    // The reward model's prefix: the same ids, its own cache, k copies per row.
    let mut reward_cache = match reward {
        ArgsReward::Tokens(rm) => {
            let rm_model = &rm.lm.model;
            let rm_batch = PromptBatch::new(rm_model, prompts, config)?;
            let mut prefix = rm_model.new_cache(capacity);
            let _ = rm_model.forward_hidden(&rm_batch.input(), &mut prefix, Positions::Last)?;
            Some(prefix.repeat_rows(k)?)
        }
        ArgsReward::Text(_) => None,
    };
    for _ in 0..config.max_new_tokens {
        let (logits, candidates) = top_k(model, &hidden, k)?;
        rows.advance_position()?;
        let scores = match (&mut *reward, reward_cache.as_mut()) {
            (ArgsReward::Tokens(rm), Some(reward_cache)) => {
                let input = rows.step_tokens(&candidates, k)?;
                let h =
                    rm.lm
                        .model
                        .forward_hidden(&input.input(), reward_cache, Positions::Last)?;
                let head = rm.score.f_to_kind(Kind::Float)?.f_to_device(h.device())?;
                let r = h
                    .f_to_kind(Kind::Float)?
                    .f_matmul(&head.f_transpose(0, 1)?)?;
                Vec::<f32>::try_from(r.f_to_device(tch::Device::Cpu)?.f_flatten(0, -1)?)?
            }
            (_, _) => text_scores(lm, &rows, texts, &candidates, k, reward)?,
        };
        let (next, chosen) = choose(&logits, &candidates, &scores, k, settings.weight);
        if rows.record(&next) {
            break;
        }
        if let (Some(reward_cache), ArgsReward::Tokens(rm)) = (reward_cache.as_mut(), &*reward) {
            let at = reward_cache.len() - 1;
            let source = group_sources(&chosen, k, rm.lm.model.device())?;
            reward_cache.copy_rows(&source, at)?;
        }
        let fed = rows.feed(&next)?;
        hidden = model.forward_hidden(&fed.input(), &mut cache, Positions::Last)?;
    }
    Ok(rows.finish())
}

/// Rewards of `prompt + decode(response + c)` for every unfinished row and candidate (0 for
/// finished rows, whose choice is not read).
fn text_scores(
    lm: &LanguageModel,
    rows: &RowProgress,
    texts: &[String],
    candidates: &[i64],
    k: usize,
    reward: &mut ArgsReward,
) -> Result<Vec<f32>> {
    let unfinished = rows.unfinished();
    let mut pairs = Vec::with_capacity(unfinished.len() * k);
    for &r in &unfinished {
        let mut tokens = rows.tokens(r).to_vec();
        for &c in &candidates[r * k..(r + 1) * k] {
            tokens.push(c);
            pairs.push((texts[r].clone(), lm.tokenizer.decode(&tokens, true)?));
            tokens.pop();
        }
    }
    let rewards = match reward {
        ArgsReward::Text(source) => source.score(&pairs)?,
        ArgsReward::Tokens(rm) => rm.score(&pairs)?,
    };
    let mut scores = vec![0f32; candidates.len()];
    for (i, &r) in unfinished.iter().enumerate() {
        scores[r * k..(r + 1) * k].copy_from_slice(&rewards[i * k..(i + 1) * k]);
    }
    Ok(scores)
}

/// Value-guided decoding of `prompts` (token ids) as one batch, `value` scoring each
/// candidate's next final hidden state.
pub fn value_guided_generate(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    config: &GenerationConfig,
    value: &mut dyn GradientBackend,
    settings: RerankSettings,
) -> Result<Vec<Generation>> {
    let _guard = tch::no_grad_guard();
    require_greedy(config, "value-guided decoding")?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let k = settings.k;
    let batch = PromptBatch::new(model, prompts, config)?;
    let mut prefix = model.new_cache(batch.width + config.max_new_tokens);
    let mut rows = RowProgress::new(&batch, config);
    let mut hidden = model.forward_hidden(&batch.input(), &mut prefix, Positions::Last)?;
    let mut cache = prefix.repeat_rows(k)?;
    drop(prefix);
    for _ in 0..config.max_new_tokens {
        let (logits, candidates) = top_k(model, &hidden, k)?;
        rows.advance_position()?;
        let input = rows.step_tokens(&candidates, k)?;
        let next_hidden = model.forward_hidden(&input.input(), &mut cache, Positions::Last)?;
        let v = value.value(&next_hidden.f_to_kind(Kind::Float)?)?;
        let scores =
            Vec::<f32>::try_from(v.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?)?;
        let (next, chosen) = choose(&logits, &candidates, &scores, k, settings.weight);
        if rows.record(&next) {
            break;
        }
        let at = cache.len() - 1;
        cache.copy_rows(&group_sources(&chosen, k, model.device())?, at)?;
        let picked: Vec<i64> = chosen.iter().map(|&c| c as i64).collect();
        let picked = Tensor::from_slice(&picked).f_to_device(model.device())?;
        hidden = next_hidden.f_index_select(0, &picked)?;
    }
    Ok(rows.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_takes_its_first_best_total() {
        // Two rows, k = 3: row 0's reward overturns the logits, row 1 ties (first wins).
        let logits = [3.0, 2.0, 1.0, 1.0, 1.0, 0.0];
        let candidates = [10, 11, 12, 20, 21, 22];
        let scores = [0.0, 0.0, 5.0, 0.5, 0.5, 0.0];
        let (tokens, chosen) = choose(&logits, &candidates, &scores, 3, 1.0);
        assert_eq!(tokens, vec![12, 20]);
        assert_eq!(chosen, vec![2, 3]);
        let (tokens, _) = choose(&logits, &candidates, &scores, 3, 0.0);
        assert_eq!(tokens, vec![10, 20]);
    }

    #[test]
    fn bad_settings_are_refused_by_flag() {
        let ok = RerankSettings { k: 10, weight: 1.0 };
        assert!(ok.check(32, "--args-k", "--args-weight").is_ok());
        let message = RerankSettings { k: 0, weight: 1.0 }
            .check(32, "--args-k", "--args-weight")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("--args-k"), "{message}");
        assert!(RerankSettings { k: 33, weight: 1.0 }
            .check(32, "--cd-k", "--cd-weight")
            .is_err());
        let message = RerankSettings {
            k: 2,
            weight: f64::NAN,
        }
        .check(32, "--cd-k", "--cd-weight")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(message.contains("--cd-weight"), "{message}");
    }
}
