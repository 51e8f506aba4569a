//! Batched generation: left padding, per-row stopping, an optional hidden-state hook.

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::hook::{HiddenStateHook, HookContext};
use crate::model::{CausalLm, Positions, StepInput};
use crate::sampling::{Sampler, Sampling};

/// Settings of one generation call.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// A row stops after producing any of these (kept in its output).
    pub eos_token_ids: Vec<i64>,
    /// Fed to finished rows and used for left padding; never attended to.
    pub pad_token_id: i64,
    /// Index of this batch's first prompt in the whole run: row `r` samples from random stream
    /// `first_row + r` of the seed, so a prompt's draws do not depend on its batch.
    pub first_row: u64,
    /// Each row's random stream when the rows are not consecutive prompts of the run (rollouts
    /// sorted by length): overrides `first_row + r`; one entry per prompt.
    pub row_streams: Option<Vec<u64>>,
}

impl GenerationConfig {
    /// The random stream of row `r`.
    pub fn stream(&self, r: usize) -> u64 {
        match &self.row_streams {
            Some(streams) => streams[r],
            None => self.first_row + r as u64,
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced an end-of-sequence token.
    Eos,
    /// It reached `max_new_tokens`.
    Length,
}

impl FinishReason {
    /// `"eos"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::Length => "length",
        }
    }
}

/// One row's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New token ids, the end-of-sequence token included when one was produced.
    pub tokens: Vec<i64>,
    pub finish_reason: FinishReason,
}

/// Generates continuations of `prompts` (token ids) together as one batch.
///
/// Prompts are left-padded; padding is masked out of attention and position ids count real
/// tokens only, so each row gets the tokens it would get alone. At every step the final
/// post-norm hidden state of the newest position of each unfinished row goes through `hook`
/// (if any) before its logits are computed.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<i64>],
    config: &GenerationConfig,
    mut hook: Option<&mut dyn HiddenStateHook>,
) -> Result<Vec<Generation>> {
    let _guard = tch::no_grad_guard();
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let batch = PromptBatch::new(model, prompts, config)?;
    let mut cache = model.new_cache(batch.width + config.max_new_tokens);
    let mut samplers: Vec<Sampler> = (0..prompts.len())
        .map(|r| Sampler::new(config.sampling.clone(), config.stream(r)))
        .collect();
    let mut rows = RowProgress::new(&batch, config);
    let mut hidden = model.forward_hidden(&batch.input(), &mut cache, Positions::Last)?;
    for step in 0..config.max_new_tokens {
        let unfinished = rows.unfinished();
        if let Some(hook) = hook.as_deref_mut() {
            hidden = apply_hook(hook, step, &unfinished, hidden)?;
        }
        let next = choose_tokens(model, &hidden, &mut samplers, &unfinished)?;
        if rows.record(&next) {
            break;
        }
        let fed = rows.advance(&next)?;
        hidden = model.forward_hidden(&fed.input(), &mut cache, Positions::Last)?;
    }
    Ok(rows.finish())
}

/// Prompts (token ids) as one left-padded batch on the model's device: the prefill's input.
/// Position ids count real tokens only (padding gets 1, as in HF), and padding is masked out.
#[derive(Debug)]
pub struct PromptBatch {
    pub input_ids: Tensor,
    pub position_ids: Tensor,
    /// `[batch, width]`, true at real tokens; `None` when no row is padded.
    pub key_mask: Option<Tensor>,
    /// Tokens of each prompt.
    pub lengths: Vec<usize>,
    /// The longest prompt's length.
    pub width: usize,
}

impl PromptBatch {
    /// Checks `prompts` against the model and `config` (ids within the vocabulary, room for
    /// `max_new_tokens`) and pads them.
    pub fn new(model: &CausalLm, prompts: &[Vec<i64>], config: &GenerationConfig) -> Result<Self> {
        validate(model, prompts, config)?;
        let device = model.device();
        let batch = prompts.len();
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let padded = prompts.iter().any(|p| p.len() != width);
        let mut ids = Vec::with_capacity(batch * width);
        let mut valid = Vec::with_capacity(batch * width);
        let mut positions = Vec::with_capacity(batch * width);
        for p in prompts {
            let pad = width - p.len();
            ids.extend(std::iter::repeat_n(config.pad_token_id, pad).chain(p.iter().copied()));
            valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, p.len())));
            positions.extend(std::iter::repeat_n(1i64, pad).chain(0..p.len() as i64));
        }
        let shape = [batch as i64, width as i64];
        let key_mask = if padded {
            Some(
                Tensor::from_slice(&valid)
                    .f_view(shape)?
                    .f_to_device(device)?,
            )
        } else {
            None
        };
        Ok(Self {
            input_ids: Tensor::from_slice(&ids)
                .f_view(shape)?
                .f_to_device(device)?,
            position_ids: Tensor::from_slice(&positions)
                .f_view(shape)?
                .f_to_device(device)?,
            key_mask,
            lengths: prompts.iter().map(Vec::len).collect(),
            width,
        })
    }

    /// The prefill's input.
    pub fn input(&self) -> StepInput<'_> {
        StepInput {
            input_ids: &self.input_ids,
            position_ids: &self.position_ids,
            key_mask: self.key_mask.as_ref(),
        }
    }
}

/// One decoding step's input: a token per row (or per row and candidate), at the next
/// position, with the key mask including it.
#[derive(Debug)]
pub struct StepTokens {
    pub input_ids: Tensor,
    pub position_ids: Tensor,
    pub key_mask: Option<Tensor>,
}

impl StepTokens {
    /// The forward pass's input.
    pub fn input(&self) -> StepInput<'_> {
        StepInput {
            input_ids: &self.input_ids,
            position_ids: &self.position_ids,
            key_mask: self.key_mask.as_ref(),
        }
    }
}

/// The per-row state of a decoding loop: each row's tokens so far, whether and why it
/// stopped, its next position and the key mask of everything fed so far. Every decoding
/// method (plain, hooked, reranking) runs its steps through this.
#[derive(Debug)]
pub struct RowProgress {
    outputs: Vec<Vec<i64>>,
    finished: Vec<Option<FinishReason>>,
    /// Position of each row's next token.
    next_pos: Vec<i64>,
    key_mask: Option<Tensor>,
    eos_token_ids: Vec<i64>,
    pad_token_id: i64,
    max_new_tokens: usize,
    device: tch::Device,
}

impl RowProgress {
    /// Nothing generated yet for the rows of `batch`.
    pub fn new(batch: &PromptBatch, config: &GenerationConfig) -> Self {
        Self {
            outputs: vec![Vec::new(); batch.lengths.len()],
            finished: vec![None; batch.lengths.len()],
            next_pos: batch.lengths.iter().map(|&l| l as i64).collect(),
            key_mask: batch.key_mask.as_ref().map(Tensor::shallow_clone),
            eos_token_ids: config.eos_token_ids.clone(),
            pad_token_id: config.pad_token_id,
            max_new_tokens: config.max_new_tokens,
            device: batch.input_ids.device(),
        }
    }

    /// Rows still generating, in order.
    pub fn unfinished(&self) -> Vec<usize> {
        (0..self.finished.len())
            .filter(|&r| self.finished[r].is_none())
            .collect()
    }

    /// The tokens row `row` has produced so far.
    pub fn tokens(&self, row: usize) -> &[i64] {
        &self.outputs[row]
    }

    /// Appends `next[r]` to every unfinished row `r` (finished rows' entries are ignored) and
    /// stops rows at an end-of-sequence token or the length limit; true when every row has
    /// stopped.
    pub fn record(&mut self, next: &[i64]) -> bool {
        for r in self.unfinished() {
            let token = next[r];
            self.outputs[r].push(token);
            if self.eos_token_ids.contains(&token) {
                self.finished[r] = Some(FinishReason::Eos);
            } else if self.outputs[r].len() == self.max_new_tokens {
                self.finished[r] = Some(FinishReason::Length);
            }
        }
        self.finished.iter().all(Option::is_some)
    }

    /// Moves every row one position on and returns the input that feeds `next` (one token per
    /// row; finished rows are fed padding, their outputs are no longer read).
    pub fn advance(&mut self, next: &[i64]) -> Result<StepTokens> {
        self.advance_position()?;
        self.feed(next)
    }

    /// The input feeding `next` (one token per row, padding for finished rows) at the current
    /// position, for a caller that moved on with [`RowProgress::advance_position`] already.
    pub fn feed(&self, next: &[i64]) -> Result<StepTokens> {
        let feed: Vec<i64> = (0..self.finished.len())
            .map(|r| match self.finished[r] {
                None => next[r],
                Some(_) => self.pad_token_id,
            })
            .collect();
        self.step_tokens(&feed, 1)
    }

    /// Moves every row one position on without choosing its token yet: the positions and mask
    /// of [`RowProgress::step_tokens`] are then those of the new position.
    pub fn advance_position(&mut self) -> Result<()> {
        for p in &mut self.next_pos {
            *p += 1;
        }
        if let Some(mask) = &self.key_mask {
            let batch = self.finished.len() as i64;
            let ones = Tensor::f_ones([batch, 1], (Kind::Bool, self.device))?;
            self.key_mask = Some(Tensor::f_cat(&[mask, &ones], 1)?);
        }
        Ok(())
    }

    /// The input feeding `tokens` at the current position: `group` tokens per row (row `r`'s
    /// are `tokens[r * group..(r + 1) * group]`), each row's position and mask repeated for its
    /// group (e.g. the k candidate tokens of a reranking method, on a cache whose rows were
    /// repeated `group` times with [`crate::KvCache::repeat_rows`]).
    pub fn step_tokens(&self, tokens: &[i64], group: usize) -> Result<StepTokens> {
        let rows = (self.finished.len() * group) as i64;
        let positions: Vec<i64> = self
            .next_pos
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p - 1, group))
            .collect();
        let key_mask = match &self.key_mask {
            Some(mask) if group > 1 => {
                Some(mask.f_repeat_interleave_self_int(group as i64, 0, None::<i64>)?)
            }
            Some(mask) => Some(mask.shallow_clone()),
            None => None,
        };
        Ok(StepTokens {
            input_ids: Tensor::from_slice(tokens)
                .f_view([rows, 1])?
                .f_to_device(self.device)?,
            position_ids: Tensor::from_slice(&positions)
                .f_view([rows, 1])?
                .f_to_device(self.device)?,
            key_mask,
        })
    }

    /// Each row's output.
    pub fn finish(self) -> Vec<Generation> {
        self.outputs
            .into_iter()
            .zip(self.finished)
            .map(|(tokens, reason)| Generation {
                tokens,
                finish_reason: reason.unwrap_or(FinishReason::Length),
            })
            .collect()
    }
}

fn validate(model: &CausalLm, prompts: &[Vec<i64>], config: &GenerationConfig) -> Result<()> {
    if config.max_new_tokens == 0 {
        return Err(Error::InvalidGeneration(
            "max-new-tokens must be at least 1".to_owned(),
        ));
    }
    if let Some(streams) = &config.row_streams {
        if streams.len() != prompts.len() {
            return Err(Error::InvalidGeneration(format!(
                "{} row streams for {} prompts",
                streams.len(),
                prompts.len()
            )));
        }
    }
    let vocab = model.config().vocab_size as i64;
    for (index, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::EmptyPrompt { index });
        }
        if let Some(bad) = p.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(Error::InvalidGeneration(format!(
                "prompt {index} has token id {bad}, outside the model's vocabulary of {vocab}"
            )));
        }
        if let Some(max) = model.config().max_position_embeddings {
            if p.len() + config.max_new_tokens > max {
                return Err(Error::PromptTooLong {
                    index,
                    tokens: p.len(),
                    new: config.max_new_tokens,
                    max,
                });
            }
        }
    }
    Ok(())
}

/// Runs the hook on the unfinished rows and writes its output back into the batch.
fn apply_hook(
    hook: &mut dyn HiddenStateHook,
    step: usize,
    rows: &[usize],
    hidden: Tensor,
) -> Result<Tensor> {
    let ctx = HookContext { step, rows };
    // Only unfinished rows go to the hook; `None` when that is every row.
    let index = if rows.len() as i64 == hidden.size()[0] {
        None
    } else {
        let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        Some(Tensor::from_slice(&index).f_to_device(hidden.device())?)
    };
    let selected = match &index {
        None => hidden.shallow_clone(),
        Some(index) => hidden.f_index_select(0, index)?,
    };
    let expected = selected.size();
    let edited = hook.apply(&ctx, selected).map_err(Error::Hook)?;
    if edited.size() != expected {
        return Err(Error::HookShape {
            expected,
            found: edited.size(),
        });
    }
    let edited = edited
        .f_to_kind(hidden.kind())?
        .f_to_device(hidden.device())?;
    match &index {
        None => Ok(edited),
        Some(index) => Ok(hidden.f_index_copy(0, index, &edited)?),
    }
}

/// Next token of every row from final hidden states `[batch, hidden]` (rows not in `rows`,
/// the finished ones, get a token that is never read).
fn choose_tokens(
    model: &CausalLm,
    hidden: &Tensor,
    samplers: &mut [Sampler],
    rows: &[usize],
) -> Result<Vec<i64>> {
    let logits = model.logits(hidden)?; // [batch, vocab]
    if samplers.first().map(Sampler::sampling) == Some(&Sampling::Greedy) {
        return crate::sampling::greedy_tokens(&logits);
    }
    let vocab = logits.size()[1] as usize;
    let flat = Vec::<f32>::try_from(
        logits
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)?
            .f_flatten(0, -1)?,
    )?;
    let mut next = vec![0i64; samplers.len()];
    for &r in rows {
        next[r] = samplers[r].choose(&flat[r * vocab..(r + 1) * vocab]) as i64;
    }
    Ok(next)
}
