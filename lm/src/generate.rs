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
    validate(model, prompts, config)?;
    let device = model.device();
    let batch = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let padded = prompts.iter().any(|p| p.len() != width);

    // [batch, width], left padded; positions count real tokens (padding gets 1, as in HF).
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
    let input_ids = Tensor::from_slice(&ids)
        .f_view(shape)?
        .f_to_device(device)?;
    let position_ids = Tensor::from_slice(&positions)
        .f_view(shape)?
        .f_to_device(device)?;
    let mut key_mask = if padded {
        Some(
            Tensor::from_slice(&valid)
                .f_view(shape)?
                .f_to_device(device)?,
        )
    } else {
        None
    };

    let mut cache = model.new_cache(width + config.max_new_tokens);
    let mut samplers: Vec<Sampler> = (0..batch as u64)
        .map(|r| Sampler::new(config.sampling.clone(), config.first_row + r))
        .collect();
    let mut next_pos: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();
    let mut outputs: Vec<Vec<i64>> = vec![Vec::new(); batch];
    let mut finished: Vec<Option<FinishReason>> = vec![None; batch];

    let mut hidden = model.forward_hidden(
        &StepInput {
            input_ids: &input_ids,
            position_ids: &position_ids,
            key_mask: key_mask.as_ref(),
        },
        &mut cache,
        Positions::Last,
    )?;
    for step in 0..config.max_new_tokens {
        let rows: Vec<usize> = (0..batch).filter(|&r| finished[r].is_none()).collect();
        if let Some(hook) = hook.as_deref_mut() {
            hidden = apply_hook(hook, step, &rows, hidden)?;
        }
        let next = choose_tokens(model, &hidden, &mut samplers, &rows)?;
        for &r in &rows {
            let token = next[r];
            outputs[r].push(token);
            if config.eos_token_ids.contains(&token) {
                finished[r] = Some(FinishReason::Eos);
            } else if outputs[r].len() == config.max_new_tokens {
                finished[r] = Some(FinishReason::Length);
            }
        }
        if finished.iter().all(Option::is_some) {
            break;
        }
        // Finished rows are fed padding (their outputs are no longer read).
        let feed: Vec<i64> = (0..batch)
            .map(|r| match finished[r] {
                None => next[r],
                Some(_) => config.pad_token_id,
            })
            .collect();
        let step_ids = Tensor::from_slice(&feed)
            .f_view([batch as i64, 1])?
            .f_to_device(device)?;
        let step_pos = Tensor::from_slice(&next_pos)
            .f_view([batch as i64, 1])?
            .f_to_device(device)?;
        for p in &mut next_pos {
            *p += 1;
        }
        if let Some(mask) = &key_mask {
            let ones = Tensor::f_ones([batch as i64, 1], (Kind::Bool, device))?;
            key_mask = Some(Tensor::f_cat(&[mask, &ones], 1)?);
        }
        hidden = model.forward_hidden(
            &StepInput {
                input_ids: &step_ids,
                position_ids: &step_pos,
                key_mask: key_mask.as_ref(),
            },
            &mut cache,
            Positions::Last,
        )?;
    }
    Ok(outputs
        .into_iter()
        .zip(finished)
        .map(|(tokens, reason)| Generation {
            tokens,
            finish_reason: reason.unwrap_or(FinishReason::Length),
        })
        .collect())
}

fn validate(model: &CausalLm, prompts: &[Vec<i64>], config: &GenerationConfig) -> Result<()> {
    if config.max_new_tokens == 0 {
        return Err(Error::InvalidGeneration(
            "max-new-tokens must be at least 1".to_owned(),
        ));
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
        let next = logits.f_argmax(-1, false)?.f_to_device(tch::Device::Cpu)?;
        return Ok(Vec::<i64>::try_from(next)?);
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
