//! Pretraining a small Llama-architecture LM from scratch with libtorch autograd: the project's
//! own default model. Packed token sequences, AdamW with warmup + cosine decay and gradient
//! clipping, seeded initialisation and data order, exact resumption from a checkpoint, held-out
//! perplexity, and an HF model directory at the end.

pub mod stage;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::bpe::{BOS_ID, EOS_ID, PAD_ID};
use crate::config::{HfConfig, ModelConfig};
use crate::device::DType;
use crate::error::{Error, Result};
use crate::model::CausalLm;
use crate::weights::ParamSource;
use recontrol_train::{cosine_lr, AdamW, AdamWConfig, RunControl};

/// Every setting of a pretraining run (recorded in checkpoints; a resume must match it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    /// Positions the written model accepts (training sequences are `seq_len`).
    pub max_positions: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    pub clip: f64,
    pub adamw: AdamWConfig,
    pub seed: u64,
    pub eval_every: usize,
    /// Held-out sequences scored at each evaluation (at most).
    pub eval_sequences: usize,
    pub checkpoint_every: usize,
}

impl Default for PretrainConfig {
    /// Sized to train in about five minutes on two CPU cores.
    fn default() -> Self {
        Self {
            layers: 4,
            hidden: 256,
            heads: 4,
            kv_heads: 4,
            intermediate: 688,
            max_positions: 1024,
            seq_len: 256,
            batch_size: 16,
            steps: 500,
            lr: 2e-3,
            min_lr: 2e-4,
            warmup: 20,
            clip: 1.0,
            adamw: AdamWConfig::default(),
            seed: 0,
            eval_every: 50,
            eval_sequences: 64,
            checkpoint_every: 50,
        }
    }
}

impl PretrainConfig {
    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Training(m));
        if self.layers == 0 || self.hidden == 0 || self.heads == 0 || self.steps == 0 {
            return bad("--layers, --hidden, --heads and --steps must be positive".into());
        }
        if !self.hidden.is_multiple_of(self.heads) || !(self.hidden / self.heads).is_multiple_of(2)
        {
            return bad(format!(
                "--hidden {} must be a multiple of --heads {} with an even head size",
                self.hidden, self.heads
            ));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "--heads {} must be a multiple of the kv heads {}",
                self.heads, self.kv_heads
            ));
        }
        if self.seq_len < 2 || self.seq_len > self.max_positions || self.batch_size == 0 {
            return bad(format!(
                "--seq-len {} must be in [2, {}] and --batch-size positive",
                self.seq_len, self.max_positions
            ));
        }
        if !(self.lr > 0.0 && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return bad(format!(
                "--lr {} and min lr {} must satisfy 0 <= min <= lr, lr > 0",
                self.lr, self.min_lr
            ));
        }
        Ok(())
    }

    /// The HF `config.json` of the model (transformers 4.x layout, which 5.x reads too).
    pub fn hf_config(&self, vocab_size: usize) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden / self.heads,
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": true,
            "initializer_range": 0.02,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "torch_dtype": "float32",
        })
    }
}

/// A token stream cut into training sequences of `seq_len + 1` tokens (inputs and targets).
#[derive(Debug, Clone)]
pub struct PackedCorpus {
    tokens: Vec<i64>,
    window: usize,
}

impl PackedCorpus {
    /// Packs documents (token ids, each already starting with `<s>`) back to back.
    pub fn new(documents: &[Vec<i64>], seq_len: usize) -> Self {
        Self {
            tokens: documents.iter().flatten().copied().collect(),
            window: seq_len + 1,
        }
    }

    /// Number of whole sequences.
    pub fn len(&self) -> usize {
        self.tokens.len() / self.window
    }

    /// Whether there is no whole sequence.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens in the stream.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    fn sequence(&self, i: usize) -> &[i64] {
        &self.tokens[i * self.window..(i + 1) * self.window]
    }

    /// Sequences `[n, seq_len + 1]` as a tensor.
    fn batch(&self, indices: &[usize], device: Device) -> Result<Tensor> {
        let flat: Vec<i64> = indices
            .iter()
            .flat_map(|&i| self.sequence(i).iter().copied())
            .collect();
        Ok(Tensor::from_slice(&flat)
            .f_view([indices.len() as i64, self.window as i64])?
            .f_to_device(device)?)
    }

    /// The prediction targets of the first `n` sequences (positions 1.. of each).
    fn targets(&self, n: usize) -> impl Iterator<Item = i64> + '_ {
        (0..n.min(self.len())).flat_map(|i| self.sequence(i)[1..].iter().copied())
    }
}

/// Fresh parameters for training: N(0, 0.02) for matrices and embeddings, ones for norm
/// weights, zeros for biases; drawn from a seeded RNG in a fixed order.
struct InitSource {
    rng: RefCell<StdRng>,
    device: Device,
    params: RefCell<Vec<(String, Tensor)>>,
}

impl ParamSource for InitSource {
    fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n as usize]
        } else if name.ends_with(".bias") {
            vec![0.0; n as usize]
        } else {
            let mut rng = self.rng.borrow_mut();
            (0..n).map(|_| 0.02 * standard_normal(&mut rng)).collect()
        };
        let t = Tensor::from_slice(&values)
            .f_view(shape)?
            .f_to_device(self.device)?
            .set_requires_grad(true);
        self.params
            .borrow_mut()
            .push((name.to_owned(), t.shallow_clone()));
        Ok(t)
    }

    fn get_opt(&self, name: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        self.get(name, shape).map(Some)
    }
}

/// Parameters restored from a checkpoint, made trainable.
struct RestoreSource {
    tensors: HashMap<String, Tensor>,
    params: RefCell<Vec<(String, Tensor)>>,
}

impl ParamSource for RestoreSource {
    fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.get_opt(name, shape)?
            .ok_or_else(|| Error::Checkpoint(format!("lacks parameter {name:?}")))
    }

    fn get_opt(&self, name: &str, shape: &[i64]) -> Result<Option<Tensor>> {
        let Some(t) = self.tensors.get(name) else {
            return Ok(None);
        };
        if t.size() != shape {
            return Err(Error::Checkpoint(format!(
                "parameter {name:?} has shape {:?}, expected {shape:?}",
                t.size()
            )));
        }
        let t = t.f_detach_copy()?.set_requires_grad(true);
        self.params
            .borrow_mut()
            .push((name.to_owned(), t.shallow_clone()));
        Ok(Some(t))
    }
}

/// A standard normal draw (Box-Muller).
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// What a training run reports as it goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrainEvent {
    Step {
        step: usize,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_s: f64,
    },
    Eval {
        step: usize,
        loss: f64,
        perplexity: f64,
    },
}

/// The state saved in a checkpoint besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    config: PretrainConfig,
    vocab_size: usize,
    tokens_seen: u64,
}

/// A finished (or stopped) run.
#[derive(Debug)]
pub struct Trained {
    /// Parameters by HF name.
    pub params: Vec<(String, Tensor)>,
    pub steps_done: usize,
    /// Whether all `config.steps` are done (false when stopped early by the run's cap).
    pub complete: bool,
    pub final_eval_loss: f64,
    pub tokens_seen: u64,
    pub train_seconds: f64,
}

/// A pretraining run.
#[derive(Debug)]
pub struct Pretrainer<'a> {
    pub config: &'a PretrainConfig,
    pub vocab_size: usize,
    pub train: &'a PackedCorpus,
    pub eval: &'a PackedCorpus,
    pub device: Device,
}

impl Pretrainer<'_> {
    fn model_config(&self) -> Result<ModelConfig> {
        let hf: HfConfig = serde_json::from_value(self.config.hf_config(self.vocab_size))
            .map_err(|e| Error::Training(e.to_string()))?;
        ModelConfig::from_hf(&hf, Path::new("config.json"))
    }

    /// Sequence indices of step `step`'s batch: a seeded permutation per epoch.
    fn batch_indices(&self, step: usize, perm: &mut (usize, Vec<usize>)) -> Vec<usize> {
        let n = self.train.len();
        let b = self.config.batch_size;
        (step * b..(step + 1) * b)
            .map(|g| {
                let epoch = g / n;
                if perm.0 != epoch || perm.1.is_empty() {
                    let mut order: Vec<usize> = (0..n).collect();
                    let mut rng = StdRng::seed_from_u64(
                        self.config.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    order.shuffle(&mut rng);
                    *perm = (epoch, order);
                }
                perm.1[g % n]
            })
            .collect()
    }

    /// Mean next-token loss on the held-out sequences.
    pub fn eval_loss(&self, model: &CausalLm) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let n = self.eval.len().min(self.config.eval_sequences);
        if n == 0 {
            return Err(Error::Training(
                "the held-out corpus has no whole sequence".into(),
            ));
        }
        let (mut total, mut count) = (0.0, 0.0);
        let indices: Vec<usize> = (0..n).collect();
        for chunk in indices.chunks(self.config.batch_size) {
            let batch = self.eval.batch(chunk, self.device)?;
            let (sum, tokens) = sequence_loss(model, &batch, tch::Reduction::Sum)?;
            total += sum.f_double_value(&[])?;
            count += tokens as f64;
        }
        Ok(total / count)
    }

    /// Trains, continuing the interrupted run in `run.checkpoint` if `run.resume` and it
    /// exists, saving a checkpoint there every `checkpoint_every` steps. `run.max_this_run`
    /// ends the run early (as if interrupted) after that many steps of this call.
    pub fn run(
        &self,
        run: RunControl<'_>,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<Trained> {
        let c = self.config;
        c.validate()?;
        if self.train.len() < c.batch_size {
            return Err(Error::Training(format!(
                "the training corpus holds {} sequences of {} tokens, fewer than one batch of {}",
                self.train.len(),
                c.seq_len,
                c.batch_size
            )));
        }
        let model_config = self.model_config()?;
        let resumed = run.resume_point(|state: &CheckpointState| {
            state.config == *c && state.vocab_size == self.vocab_size
        })?;
        let (model, mut opt, mut step, mut tokens_seen) = if let Some((state, tensors)) = resumed {
            let source = RestoreSource {
                tensors,
                params: RefCell::new(Vec::new()),
            };
            let model = CausalLm::build(model_config, &source, self.device, DType::F32)?;
            let mut opt = AdamW::new(source.params.into_inner(), c.adamw)?;
            opt.load_state(&source.tensors, state.step as i64)?;
            (model, opt, state.step, state.tokens_seen)
        } else {
            let source = InitSource {
                rng: RefCell::new(StdRng::seed_from_u64(c.seed)),
                device: self.device,
                params: RefCell::new(Vec::new()),
            };
            let model = CausalLm::build(model_config, &source, self.device, DType::F32)?;
            (
                model,
                AdamW::new(source.params.into_inner(), c.adamw)?,
                0,
                0,
            )
        };

        let mut perm = (usize::MAX, Vec::new());
        let started = Instant::now();
        let end = run.end(step, c.steps);
        let mut window = (Instant::now(), 0u64);
        while step < end {
            let indices = self.batch_indices(step, &mut perm);
            let batch = self.train.batch(&indices, self.device)?;
            let (loss, tokens) = sequence_loss(&model, &batch, tch::Reduction::Mean)?;
            let loss_value = loss.f_double_value(&[])?;
            if !loss_value.is_finite() {
                return Err(Error::Training(format!(
                    "loss is {loss_value} at step {step}; lower --lr"
                )));
            }
            opt.zero_grad();
            loss.f_backward()?;
            let grad_norm = opt.clip_grad_norm(c.clip)?;
            let lr = cosine_lr(step, c.steps, c.warmup, c.lr, c.min_lr);
            opt.step(lr)?;
            step += 1;
            tokens_seen += tokens as u64;
            window.1 += tokens as u64;
            let elapsed = window.0.elapsed().as_secs_f64();
            on_event(TrainEvent::Step {
                step,
                loss: loss_value,
                lr,
                grad_norm,
                tokens_per_s: window.1 as f64 / elapsed.max(1e-9),
            });
            if elapsed > 10.0 {
                window = (Instant::now(), 0);
            }
            if step % c.eval_every == 0 || step == c.steps {
                let loss = self.eval_loss(&model)?;
                on_event(TrainEvent::Eval {
                    step,
                    loss,
                    perplexity: loss.exp(),
                });
            }
            if step % c.checkpoint_every == 0 && step < c.steps {
                save_checkpoint(run, step, c, self.vocab_size, tokens_seen, &opt)?;
            }
        }
        let complete = step >= c.steps;
        if !complete {
            save_checkpoint(run, step, c, self.vocab_size, tokens_seen, &opt)?;
        }
        let final_eval_loss = self.eval_loss(&model)?;
        Ok(Trained {
            params: named_clones(opt.params()),
            steps_done: step,
            complete,
            final_eval_loss,
            tokens_seen,
            train_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Next-token cross-entropy of sequences `[batch, seq + 1]`, and the number of targets.
fn sequence_loss(
    model: &CausalLm,
    batch: &Tensor,
    reduction: tch::Reduction,
) -> Result<(Tensor, i64)> {
    let width = batch.size()[1];
    let inputs = batch.f_narrow(1, 0, width - 1)?;
    let targets = batch.f_narrow(1, 1, width - 1)?.f_reshape([-1])?;
    let logits = model.forward_train(&inputs)?;
    let vocab = logits.size()[2];
    let logits = logits.f_reshape([-1, vocab])?;
    let loss = logits.f_log_softmax(-1, Kind::Float)?.f_nll_loss(
        &targets,
        None::<&Tensor>,
        reduction,
        -100,
    )?;
    Ok((loss, targets.size()[0]))
}

/// Perplexity of a unigram model (add-one smoothed counts of the training tokens) on the
/// held-out targets: the baseline a trained LM must beat by far.
pub fn unigram_perplexity(
    train: &PackedCorpus,
    eval: &PackedCorpus,
    eval_sequences: usize,
    vocab: usize,
) -> f64 {
    let mut counts = vec![1.0f64; vocab];
    for &t in &train.tokens {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    let (mut nll, mut n) = (0.0f64, 0.0f64);
    for t in eval.targets(eval_sequences) {
        let p = counts.get(t as usize).copied().unwrap_or(1.0) / total;
        nll -= p.ln();
        n += 1.0;
    }
    (nll / n.max(1.0)).exp()
}

/// Shallow copies (shared storage) of named tensors.
fn named_clones(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

fn save_checkpoint(
    run: RunControl<'_>,
    step: usize,
    config: &PretrainConfig,
    vocab_size: usize,
    tokens_seen: u64,
    opt: &AdamW,
) -> Result<()> {
    let state = CheckpointState {
        step,
        config: config.clone(),
        vocab_size,
        tokens_seen,
    };
    Ok(run.save(&state, opt, &[])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(n_docs: usize, seed: u64) -> Vec<Vec<i64>> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n_docs)
            .map(|_| {
                let mut d = vec![BOS_ID];
                // A learnable pattern: counting up modulo 20, offset 4.
                let start = rng.random_range(0..20);
                d.extend((0..30).map(|k| 4 + (start + k) % 20));
                d.push(EOS_ID);
                d
            })
            .collect()
    }

    fn tiny() -> PretrainConfig {
        PretrainConfig {
            layers: 1,
            hidden: 16,
            heads: 2,
            kv_heads: 2,
            intermediate: 32,
            max_positions: 64,
            seq_len: 16,
            batch_size: 4,
            steps: 40,
            lr: 1e-2,
            min_lr: 1e-3,
            warmup: 4,
            eval_every: 20,
            eval_sequences: 8,
            checkpoint_every: 10,
            ..PretrainConfig::default()
        }
    }

    fn trainer<'a>(
        c: &'a PretrainConfig,
        train: &'a PackedCorpus,
        eval: &'a PackedCorpus,
    ) -> Pretrainer<'a> {
        Pretrainer {
            config: c,
            vocab_size: 24,
            train,
            eval,
            device: Device::Cpu,
        }
    }

    fn control(checkpoint: &Path, resume: bool, cap: Option<usize>) -> RunControl<'_> {
        RunControl {
            checkpoint,
            resume,
            max_this_run: cap,
        }
    }

    /// Every parameter's values, in order; an error (not an empty list) if one cannot be read.
    fn flat(params: &[(String, Tensor)]) -> Result<Vec<f32>> {
        assert!(!params.is_empty(), "no parameters to compare");
        let mut values = Vec::new();
        for (_, t) in params {
            values.extend(Vec::<f32>::try_from(t.f_detach()?.f_flatten(0, -1)?)?);
        }
        assert!(!values.is_empty(), "parameters without values");
        Ok(values)
    }

    #[test]
    fn learns_a_pattern_far_below_unigram_perplexity() -> Result<()> {
        let c = tiny();
        let train = PackedCorpus::new(&corpus(64, 1), c.seq_len);
        let eval = PackedCorpus::new(&corpus(16, 2), c.seq_len);
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let out = trainer(&c, &train, &eval).run(
            control(&dir.path().join("ckpt.safetensors"), false, None),
            &mut |_| {},
        )?;
        let ppl = out.final_eval_loss.exp();
        let unigram = unigram_perplexity(&train, &eval, c.eval_sequences, 24);
        assert!(unigram > 15.0, "{unigram}");
        assert!(ppl < 0.5 * unigram, "ppl {ppl} vs unigram {unigram}");
        Ok(())
    }

    #[test]
    fn same_seed_same_weights_and_resume_is_exact() -> Result<()> {
        let c = tiny();
        let train = PackedCorpus::new(&corpus(64, 1), c.seq_len);
        let eval = PackedCorpus::new(&corpus(16, 2), c.seq_len);
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let t = trainer(&c, &train, &eval);
        let a_path = dir.path().join("a.safetensors");
        let b_path = dir.path().join("b.safetensors");
        let a = t.run(control(&a_path, false, None), &mut |_| {})?;
        let b = t.run(control(&b_path, false, None), &mut |_| {})?;
        assert_eq!(
            flat(&a.params)?,
            flat(&b.params)?,
            "same seed, same weights"
        );

        // Interrupted after 13 steps (checkpoint written on stopping), then resumed.
        let ckpt = dir.path().join("c.safetensors");
        let part = t.run(control(&ckpt, true, Some(13)), &mut |_| {})?;
        assert!(!part.complete && part.steps_done == 13);
        let mut steps = Vec::new();
        let rest = t.run(control(&ckpt, true, None), &mut |e| {
            if let TrainEvent::Step { step, .. } = e {
                steps.push(step)
            }
        })?;
        assert_eq!(steps.first(), Some(&14));
        assert!(rest.complete);
        assert_eq!(
            flat(&rest.params)?,
            flat(&a.params)?,
            "resumed run equals the uninterrupted one"
        );

        let other = PretrainConfig {
            seed: 1,
            ..c.clone()
        };
        let d = trainer(&other, &train, &eval).run(
            control(&dir.path().join("d.safetensors"), false, None),
            &mut |_| {},
        )?;
        assert_ne!(flat(&d.params)?, flat(&a.params)?);
        // The last periodic checkpoint (step 30) is still there: other settings cannot resume it.
        let err = trainer(&other, &train, &eval)
            .run(control(&ckpt, true, None), &mut |_| {})
            .expect_err("other settings");
        assert!(
            err.to_string().contains("was made with other settings"),
            "{err}"
        );
        Ok(())
    }
}
