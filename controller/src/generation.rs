//! The generation stage: prompts in, one [`GenerationRecord`] per prompt out, decoded by one
//! [`Method`]: plainly, under a [`Controller`] (RE-Control), or by one of the paper's baselines
//! (static representation editing, best-of-N, ARGS, value-guided decoding). `recontrol
//! generate`, the demo and other callers use this one loop.

use std::time::Instant;

use recontrol_data::{BestOf, EditStats, GenerationRecord};
use recontrol_lm::{generate, Generation, GenerationConfig, LanguageModel, Sampling};
use recontrol_reward_model::RewardSource;

use crate::rerank::{args_generate, value_guided_generate, ArgsReward, RerankSettings};
use crate::steer::SteerHook;
use crate::{Controller, Error, GradientBackend, Result};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationPlan<'a> {
    /// The prompts as the user gave them: records keep these (what rewards judge).
    pub prompts: &'a [String],
    /// Text the model sees before every prompt (the paper's "+prompting" variant).
    pub prompt_prefix: Option<&'a str>,
    /// What the model decodes from instead of `prompt_prefix + prompt`, one per prompt (e.g.
    /// chat renderings with an instruction as the system message); records keep both.
    pub model_prompts: Option<&'a [String]>,
    /// Whether the tokenizer adds its special tokens (BOS); false for chat-template text,
    /// which carries its own.
    pub add_special_tokens: bool,
    /// Decoding settings (`first_row` is set per batch).
    pub config: GenerationConfig,
    /// Prompts decoded together.
    pub batch_size: usize,
}

/// Prompts as a run puts them to the model: as given (with an optional prefix before each),
/// or rendered as user messages in the model's chat template (the prefix, if any, then being
/// the system message of the renderings the model decodes from).
#[derive(Debug, Clone)]
pub struct RenderedPrompts {
    /// What records keep (the chat rendering without a system message, with `chat`).
    pub prompts: Vec<String>,
    /// With `chat` and a prefix: the renderings with the prefix as the system message.
    pub model_prompts: Option<Vec<String>>,
    prompt_prefix: Option<String>,
    chat: bool,
}

impl RenderedPrompts {
    /// Renders `prompts` for `lm`.
    pub fn new(
        lm: &LanguageModel,
        prompts: Vec<String>,
        prefix: Option<&str>,
        chat: bool,
    ) -> Result<Self> {
        if !chat {
            return Ok(Self {
                prompts,
                model_prompts: None,
                prompt_prefix: prefix.map(str::to_owned),
                chat,
            });
        }
        let render = |system: Option<&str>| {
            prompts
                .iter()
                .map(|p| chat_prompt(lm, system, p))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            model_prompts: prefix.map(|s| render(Some(s))).transpose()?,
            prompts: render(None)?,
            prompt_prefix: None,
            chat,
        })
    }

    /// The plan decoding these prompts with `config`, `batch_size` at a time.
    pub fn plan(&self, config: GenerationConfig, batch_size: usize) -> GenerationPlan<'_> {
        GenerationPlan {
            prompts: &self.prompts,
            prompt_prefix: self.prompt_prefix.as_deref(),
            model_prompts: self.model_prompts.as_deref(),
            add_special_tokens: !self.chat,
            config,
            batch_size,
        }
    }
}

/// `prompt` as a user message (after `system`, if any) in `lm`'s chat template.
pub fn chat_prompt(lm: &LanguageModel, system: Option<&str>, prompt: &str) -> Result<String> {
    let message = |role: &str, content: &str| recontrol_lm::ChatMessage {
        role: role.to_owned(),
        content: content.to_owned(),
    };
    let mut messages: Vec<_> = system.map(|s| message("system", s)).into_iter().collect();
    messages.push(message("user", prompt));
    Ok(lm.tokenizer.apply_chat_template(&messages, true)?)
}

/// What a generation run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationSummary {
    pub prompts: usize,
    pub tokens: usize,
    /// Time in the generation calls (model loading excluded).
    pub seconds: f64,
    /// Prompts whose oldest tokens were dropped to fit the model's positions.
    pub truncated_prompts: usize,
}

/// Errors of a caller's record sink (e.g. a file being written).
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// How responses are decoded.
pub enum Method<'a, 'b> {
    /// The LM alone (greedy or sampled, as the plan's config says).
    Plain,
    /// RE-Control: every step's final hidden states edited up the value head's gradient.
    Control(&'a mut Controller<'b>),
    /// Static representation editing: a fixed vector added to every step's final state.
    Steer(&'a mut SteerHook),
    /// `n` seeded samples per prompt, the one with the highest reward returned.
    BestOfN {
        n: usize,
        reward: &'a mut dyn RewardSource,
    },
    /// ARGS: the top-k tokens reranked by `logit + w * reward` (greedy).
    Args {
        reward: &'a mut ArgsReward,
        settings: RerankSettings,
    },
    /// Value-guided decoding: the top-k tokens reranked by `logit + w * V(h(c))` (greedy).
    ValueGuided {
        value: &'a mut dyn GradientBackend,
        settings: RerankSettings,
    },
}

impl std::fmt::Debug for Method<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Method<'_, '_> {
    /// The name records carry (`plain`, `re-control`, `static-re`, `best-of-n`, `args`,
    /// `value-guided`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Control(_) => "re-control",
            Self::Steer(_) => "static-re",
            Self::BestOfN { .. } => "best-of-n",
            Self::Args { .. } => "args",
            Self::ValueGuided { .. } => "value-guided",
        }
    }

    /// Refuses settings that cannot work with `config` on `lm` before anything is decoded.
    fn check(&self, lm: &LanguageModel, config: &GenerationConfig) -> Result<()> {
        let vocab = lm.model.config().vocab_size;
        match self {
            Self::BestOfN { n, .. } => {
                if *n == 0 {
                    return Err(Error::BestOfCount);
                }
                if config.sampling == Sampling::Greedy {
                    return Err(Error::BestOfGreedy);
                }
            }
            Self::Args { settings, .. } => {
                settings.check(vocab, "--args-k", "--args-weight")?;
                if config.sampling != Sampling::Greedy {
                    return Err(Error::GreedyOnly { method: "ARGS" });
                }
            }
            Self::ValueGuided { settings, .. } => {
                settings.check(vocab, "--cd-k", "--cd-weight")?;
                if config.sampling != Sampling::Greedy {
                    return Err(Error::GreedyOnly {
                        method: "value-guided decoding",
                    });
                }
            }
            Self::Plain | Self::Control(_) | Self::Steer(_) => {}
        }
        Ok(())
    }
}

/// Generates a response to every prompt of `plan` with `method`, `batch_size` prompts at a
/// time, each batch's records handed to `sink` as soon as the batch is decoded. Records carry
/// the method's name; under RE-Control each carries its edit stats, under best-of-N its
/// samples and their rewards.
pub fn generate_records(
    lm: &LanguageModel,
    plan: &GenerationPlan<'_>,
    mut method: Method<'_, '_>,
    sink: &mut dyn FnMut(&[GenerationRecord]) -> std::result::Result<(), SinkError>,
) -> Result<GenerationSummary> {
    if plan.batch_size == 0 {
        return Err(Error::ZeroBatch);
    }
    method.check(lm, &plan.config)?;
    let prefix = plan.prompt_prefix.unwrap_or("");
    if let Some(seen) = plan.model_prompts {
        if seen.len() != plan.prompts.len() {
            return Err(Error::ModelPrompts {
                prompts: plan.prompts.len(),
                model_prompts: seen.len(),
            });
        }
    }
    let mut truncated_prompts = 0;
    let mut token_ids = Vec::with_capacity(plan.prompts.len());
    for (index, prompt) in plan.prompts.iter().enumerate() {
        let text = match plan.model_prompts {
            Some(seen) => seen[index].clone(),
            None => format!("{prefix}{prompt}"),
        };
        let (ids, cut) =
            lm.encode_prompt(&text, plan.config.max_new_tokens, plan.add_special_tokens)?;
        if ids.is_empty() {
            return Err(Error::EmptyPrompt { index });
        }
        truncated_prompts += usize::from(cut);
        token_ids.push(ids);
    }
    lm.model.warm_up(plan.batch_size.min(token_ids.len()))?;
    let mut config = plan.config.clone();
    let (mut tokens, mut seconds) = (0usize, 0f64);
    for (batch, chunk) in token_ids.chunks(plan.batch_size).enumerate() {
        let first = batch * plan.batch_size;
        let texts = &plan.prompts[first..first + chunk.len()];
        config.first_row = first as u64;
        let start = Instant::now();
        let (outputs, best_of) = decode_batch(lm, chunk, texts, &config, &mut method)?;
        let batch_seconds = start.elapsed().as_secs_f64();
        seconds += batch_seconds;
        let stats = match &mut method {
            Method::Control(c) => Some(c.take_stats()),
            _ => None,
        };
        let mut records = Vec::with_capacity(outputs.len());
        for (offset, out) in outputs.into_iter().enumerate() {
            tokens += out.tokens.len();
            let control = stats.as_ref().map(|stats| {
                let s = stats.get(offset).copied().unwrap_or_default();
                EditStats {
                    edit_norm_mean: s.edit_norm_mean(),
                    edit_norm_max: s.edit_norm_max,
                    value_before_mean: s.value_before_mean(),
                    value_after_mean: s.value_after_mean(),
                }
            });
            records.push(GenerationRecord {
                prompt_prefix: plan.prompt_prefix.map(str::to_owned),
                model_prompt: plan.model_prompts.map(|seen| seen[first + offset].clone()),
                batch: Some(batch),
                tokens: Some(out.tokens.clone()),
                num_tokens: Some(out.tokens.len()),
                finish_reason: Some(out.finish_reason.as_str().to_owned()),
                seconds: Some(batch_seconds),
                method: Some(method.name().to_owned()),
                control,
                best_of: best_of.as_ref().map(|b| b[offset].clone()),
                ..GenerationRecord::new(
                    plan.prompts[first + offset].clone(),
                    lm.tokenizer.decode(&out.tokens, true)?,
                )
            });
        }
        sink(&records).map_err(Error::Sink)?;
    }
    Ok(GenerationSummary {
        prompts: plan.prompts.len(),
        tokens,
        seconds,
        truncated_prompts,
    })
}

/// One batch's outputs under `method` (and, for best-of-N, every prompt's samples).
fn decode_batch(
    lm: &LanguageModel,
    prompts: &[Vec<i64>],
    texts: &[String],
    config: &GenerationConfig,
    method: &mut Method<'_, '_>,
) -> Result<(Vec<Generation>, Option<Vec<BestOf>>)> {
    let model = &lm.model;
    let outputs = match method {
        Method::Plain => generate(model, prompts, config, None)?,
        Method::Control(controller) => generate(model, prompts, config, Some(&mut **controller))?,
        Method::Steer(hook) => generate(model, prompts, config, Some(&mut **hook))?,
        Method::BestOfN { n, reward } => {
            let (outputs, samples) = best_of_n(lm, prompts, texts, config, *n, &mut **reward)?;
            return Ok((outputs, Some(samples)));
        }
        Method::Args { reward, settings } => {
            args_generate(lm, prompts, texts, config, reward, *settings)?
        }
        Method::ValueGuided { value, settings } => {
            value_guided_generate(model, prompts, config, &mut **value, *settings)?
        }
    };
    Ok((outputs, None))
}

/// Best-of-N on one batch: `n` samples of each prompt decoded together (sample `j` of the
/// run's prompt `p` draws from random stream `p * n + j`, so with `n = 1` it is plain
/// sampling), each scored by `reward` on `prompt + truncated response` as `reward score`
/// does, the first highest returned.
fn best_of_n(
    lm: &LanguageModel,
    prompts: &[Vec<i64>],
    texts: &[String],
    config: &GenerationConfig,
    n: usize,
    reward: &mut dyn RewardSource,
) -> Result<(Vec<Generation>, Vec<BestOf>)> {
    let expanded: Vec<Vec<i64>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), n))
        .collect();
    let mut config = config.clone();
    config.first_row *= n as u64;
    let mut samples = generate(&lm.model, &expanded, &config, None)?;
    let responses = samples
        .iter()
        .map(|s| lm.tokenizer.decode(&s.tokens, true))
        .collect::<recontrol_lm::Result<Vec<_>>>()?;
    let pairs: Vec<(String, String)> = responses
        .iter()
        .enumerate()
        .map(|(i, r)| (texts[i / n].clone(), r.clone()))
        .collect();
    let rewards = reward.score(&pairs)?;
    let mut outputs = Vec::with_capacity(prompts.len());
    let mut best = Vec::with_capacity(prompts.len());
    for p in 0..prompts.len() {
        let group = &rewards[p * n..(p + 1) * n];
        let chosen = (0..n).fold(0, |b, j| if group[j] > group[b] { j } else { b });
        outputs.push(std::mem::replace(
            &mut samples[p * n + chosen],
            Generation {
                tokens: Vec::new(),
                finish_reason: recontrol_lm::FinishReason::Length,
            },
        ));
        best.push(BestOf {
            n,
            chosen,
            rewards: group.iter().map(|&r| f64::from(r)).collect(),
            responses: responses[p * n..(p + 1) * n].to_vec(),
        });
    }
    Ok((outputs, best))
}

/// How to open a value head for an LM.
#[derive(Debug, Clone)]
pub struct ValueOptions {
    pub backend: crate::BackendKind,
    /// Accept a value head trained on another model's states (same hidden size).
    pub allow_foreign: bool,
    /// The ONNX Runtime library for the onnx backend (default: `$ORT_DYLIB_PATH`, then the
    /// project venv).
    pub onnxruntime: Option<std::path::PathBuf>,
}

/// Opens the value head at `path` (export directory, `.onnx` file or value directory), checks
/// it against `lm` (hidden size, identity) and builds its gradient backend on the LM's device.
pub fn open_value_backend(
    path: &std::path::Path,
    lm: &LanguageModel,
    options: &ValueOptions,
) -> Result<Box<dyn crate::GradientBackend>> {
    let artifact = crate::ValueArtifact::open(path)?;
    artifact.check_lm(
        &lm.identity,
        lm.model.config().hidden_size,
        options.allow_foreign,
    )?;
    let runtime = match options.backend {
        crate::BackendKind::Onnx => Some(recontrol_export::OrtRuntime::load(
            options.onnxruntime.as_deref(),
        )?),
        crate::BackendKind::Torch => None,
    };
    // On the CPU one ONNX Runtime thread: a decoding step's graph is small products of a few
    // rows, and a second ORT thread would wait for the core that libtorch's OpenMP worker
    // spins on (batch 8, SmolLM2: overhead 1.32x with ORT's default two threads).
    let threads = (lm.model.device() == tch::Device::Cpu).then_some(1);
    artifact.backend(options.backend, lm.model.device(), runtime, threads)
}
