//! Training a value net from a labelled rollout store, streaming: transitions come from the
//! store a few blocks at a time (memory bounded by the stream's buffer, not the store), the
//! train/validation split is by rollout (seeded), AdamW without decay by default, early
//! stopping on the validation loss (the best epoch's weights are kept), and a checkpoint per
//! epoch for exact `--resume`.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use recontrol_data::store::{RolloutBlock, StreamOptions, TargetError, TransitionBatch};
use recontrol_data::Store;
use recontrol_train::{AdamW, AdamWConfig, EpochLoop, Flow};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::loss::{bellman_loss, lambda_returns, td0_target, Target};
use crate::mlp::{Activation, ValueMlp};
use crate::{Error, Result};

/// Settings of a value training run (recorded in checkpoints; a resume must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueTrainConfig {
    pub hidden_dims: Vec<usize>,
    pub activation: Activation,
    pub target: Target,
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    /// Share of rollouts held out for validation.
    pub val_fraction: f64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    pub seed: u64,
    /// Rows read from the store per block, and blocks shuffled together.
    pub block_rows: usize,
    pub buffer_blocks: usize,
}

impl Default for ValueTrainConfig {
    fn default() -> Self {
        Self {
            hidden_dims: vec![256],
            activation: Activation::Relu,
            target: Target::Td0,
            epochs: 50,
            lr: 1e-3,
            batch_size: 512,
            val_fraction: 0.1,
            patience: 5,
            seed: 0,
            block_rows: 1024,
            buffer_blocks: 8,
        }
    }
}

/// Metrics of one epoch (validation metrics in reward units).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Mean Bellman loss over training transitions (normalised units).
    pub train_loss: f64,
    /// Mean Bellman loss over validation transitions (normalised units).
    pub val_loss: f64,
    /// Mean squared error of V at validation terminal states against the reward.
    pub terminal_mse: f64,
    /// Spearman correlation of V(s_0) and the reward over validation rollouts.
    pub spearman: f64,
    pub transitions_per_s: f64,
}

pub use recontrol_train::RunControl;

/// The trained net (the best validation epoch's weights) and how it got there.
#[derive(Debug)]
pub struct TrainedValue {
    pub mlp: ValueMlp,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub history: Vec<EpochMetrics>,
    pub best_epoch: usize,
    /// Whether training ended (all epochs, or early stopping) rather than being capped.
    pub complete: bool,
}

/// What a checkpoint must have been made with to be resumed: the settings and the store's
/// hidden size.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Settings {
    config: ValueTrainConfig,
    input_dim: usize,
}

/// What training records as it goes (saved in checkpoints; the best weights as `best.*`
/// tensors beside the optimizer's).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    history: Vec<EpochMetrics>,
    best_epoch: usize,
    best_val: f64,
    #[serde(skip)]
    best: Vec<(String, Tensor)>,
}

/// Refuses a store with unlabelled (NaN) or non-finite rewards, counting them.
pub fn check_labelled(store: &Store) -> Result<Vec<f32>> {
    let rewards = store.rewards()?;
    let bad = rewards.iter().filter(|r| !r.is_finite()).count();
    if bad > 0 || rewards.is_empty() {
        return Err(Error::Invalid {
            path: store.path().to_owned(),
            message: format!(
                "{bad} of {} rollouts have no (finite) reward; label the store first (recontrol reward label)",
                rewards.len()
            ),
        });
    }
    Ok(rewards)
}

/// The seeded split by rollout: `true` for validation rollouts.
pub fn validation_rollouts(n: usize, fraction: f64, seed: u64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_val =
        ((n as f64 * fraction).round() as usize).clamp(usize::from(n > 1), n.saturating_sub(1));
    let mut val = vec![false; n];
    for &i in &order[..n_val] {
        val[i] = true;
    }
    val
}

fn to_tensor(a: &ndarray::Array2<f32>, device: Device) -> Result<Tensor> {
    let (rows, cols) = a.dim();
    let t = match a.as_slice() {
        Some(flat) => Tensor::from_slice(flat),
        None => Tensor::from_slice(&a.iter().copied().collect::<Vec<f32>>()),
    };
    Ok(t.f_view([rows as i64, cols as i64])?.f_to_device(device)?)
}

/// Spearman rank correlation (average ranks for ties).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            let rank = (i + j) as f64 / 2.0;
            for &k in &idx[i..=j] {
                r[k] = rank;
            }
            i = j + 1;
        }
        r
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    if vx == 0.0 || vy == 0.0 {
        0.0
    } else {
        cov / (vx * vy).sqrt()
    }
}

/// A store read for training: its transitions as tensors on `device`, rewards normalised
/// with `norm` (mean, std).
struct Data<'a> {
    store: &'a Store,
    config: &'a ValueTrainConfig,
    norm: (f64, f64),
    device: Device,
}

impl Data<'_> {
    /// Streams the transitions of the rollouts `keep` marks (shuffled with `seed`) and calls
    /// `f` with each minibatch, V(s) (with autograd unless the caller disabled it) and the
    /// minibatch's Bellman loss (its target computed without autograd). TD(lambda) returns are
    /// computed with the current net as whole rollouts enter the stream's buffer (a target
    /// net refreshed every `buffer_blocks * block_rows` transitions).
    fn for_each_batch(
        &self,
        seed: u64,
        keep: &[bool],
        mlp: &ValueMlp,
        f: &mut dyn FnMut(&TransitionBatch, &Tensor, Tensor) -> Result<()>,
    ) -> Result<()> {
        let options = StreamOptions {
            batch_size: self.config.batch_size,
            seed,
            block_rows: self.config.block_rows,
            buffer_blocks: self.config.buffer_blocks,
        };
        let kind = mlp.kind();
        let (mean, std) = self.norm;
        let mut returns = |block: &RolloutBlock| -> std::result::Result<Vec<f32>, TargetError> {
            match self.config.target {
                Target::Lambda(lambda) => block_returns(mlp, block, lambda, self.norm, self.device)
                    .map_err(TargetError::from),
                _ => Ok(vec![f32::NAN; block.states.nrows()]),
            }
        };
        let lambda = matches!(self.config.target, Target::Lambda(_));
        let mut stream = self.store.transitions_of(options, Some(keep.to_vec()))?;
        while let Some(batch) = stream.next_with(if lambda { Some(&mut returns) } else { None }) {
            let b = batch?;
            let s = to_tensor(&b.state, self.device)?.f_to_kind(kind)?;
            let v = mlp.forward_raw(&s)?;
            let target = match self.config.target {
                Target::Td0 => {
                    let s_next = to_tensor(&b.next_state, self.device)?.f_to_kind(kind)?;
                    let v_next = tch::no_grad(|| mlp.forward_raw(&s_next))?;
                    let term = Tensor::from_slice(&b.is_terminal).f_to_device(self.device)?;
                    td0_target(
                        &v_next,
                        &term,
                        &normalised(&b.reward, mean, std, self.device)?,
                    )?
                }
                Target::Mc => normalised(&b.reward, mean, std, self.device)?,
                Target::Lambda(_) => Tensor::from_slice(&b.target).f_to_device(self.device)?,
            };
            let loss = bellman_loss(&v, &target.f_to_kind(kind)?)?;
            f(&b, &v, loss)?;
        }
        Ok(())
    }
}

/// Rewards in normalised units, `[batch]`, f32.
fn normalised(reward: &[f32], mean: f64, std: f64, device: Device) -> Result<Tensor> {
    let r: Vec<f32> = reward
        .iter()
        .map(|&r| ((f64::from(r) - mean) / std) as f32)
        .collect();
    Ok(Tensor::from_slice(&r).f_to_device(device)?)
}

/// The lambda-returns (normalised units) of every row of a block of whole rollouts, from the
/// net's current values.
fn block_returns(
    mlp: &ValueMlp,
    block: &RolloutBlock,
    lambda: f64,
    (mean, std): (f64, f64),
    device: Device,
) -> Result<Vec<f32>> {
    let values = tch::no_grad(|| -> Result<Vec<f64>> {
        let s = to_tensor(&block.states, device)?.f_to_kind(mlp.kind())?;
        let v = mlp.forward_raw(&s)?;
        Ok(Vec::<f64>::try_from(
            v.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?,
        )?)
    })?;
    let mut out = vec![f32::NAN; values.len()];
    for r in &block.rollouts {
        let reward = (f64::from(r.reward) - mean) / std;
        for (k, g) in lambda_returns(&values[r.rows.clone()], reward, lambda)
            .into_iter()
            .enumerate()
        {
            out[r.rows.start + k] = g as f32;
        }
    }
    Ok(out)
}

/// Validation metrics of a net on the rollouts `keep` marks: Bellman loss (normalised units),
/// terminal MSE and Spearman(V(s_0), r) (reward units).
pub fn evaluate(
    store: &Store,
    mlp: &ValueMlp,
    keep: &[bool],
    norm: (f64, f64),
    config: &ValueTrainConfig,
    device: Device,
) -> Result<(f64, f64, f64)> {
    let _guard = tch::no_grad_guard();
    let (mean, std) = norm;
    let data = Data {
        store,
        config,
        norm,
        device,
    };
    let (mut loss_sum, mut n, mut term_se, mut n_term) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    // V(s_0) and r of each validation rollout, in stream order.
    let (mut v0, mut r) = (Vec::new(), Vec::new());
    data.for_each_batch(0, keep, mlp, &mut |b, v, loss| {
        let count = b.reward.len() as f64;
        loss_sum += loss.f_double_value(&[])? * count;
        n += count;
        let values = Vec::<f64>::try_from(v.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)?;
        for (k, value) in values.iter().enumerate() {
            let reward = f64::from(b.reward[k]);
            if b.is_terminal[k] {
                term_se += (value * std + mean - reward).powi(2);
                n_term += 1.0;
            }
            if b.is_first[k] {
                v0.push(*value);
                r.push(reward);
            }
        }
        Ok(())
    })?;
    Ok((
        loss_sum / n.max(1.0),
        term_se / n_term.max(1.0),
        spearman(&v0, &r),
    ))
}

/// Trains a value net on a labelled store. `on_epoch` sees each epoch's metrics.
pub fn train_value(
    store: &Store,
    config: &ValueTrainConfig,
    device: Device,
    run: RunControl<'_>,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<TrainedValue> {
    if config.epochs == 0 || config.batch_size == 0 || !(config.lr.is_finite() && config.lr > 0.0) {
        return Err(Error::Invalid {
            path: run.checkpoint.to_owned(),
            message: "--epochs, --batch-size and --lr must be positive".into(),
        });
    }
    config.target.check().map_err(|e| Error::Invalid {
        path: run.checkpoint.to_owned(),
        message: e.to_string(),
    })?;
    let rewards = check_labelled(store)?;
    let n = rewards.len();
    let val = validation_rollouts(n, config.val_fraction, config.seed);
    let train: Vec<bool> = val.iter().map(|v| !v).collect();
    // Reward normalisation from the training rollouts.
    let train_rewards: Vec<f64> = (0..n)
        .filter(|&i| train[i])
        .map(|i| f64::from(rewards[i]))
        .collect();
    let mean = train_rewards.iter().sum::<f64>() / train_rewards.len().max(1) as f64;
    let var = train_rewards
        .iter()
        .map(|r| (r - mean).powi(2))
        .sum::<f64>()
        / train_rewards.len().max(1) as f64;
    let std = if var.sqrt() > 1e-8 { var.sqrt() } else { 1.0 };

    let input_dim = store.meta().hidden_size;
    let mut mlp = ValueMlp::new(
        input_dim,
        &config.hidden_dims,
        config.activation,
        config.seed,
        device,
    )?;
    // Adam with PyTorch's defaults (no weight decay).
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut opt = AdamW::new(mlp.named_params(), adamw)?;
    let settings = Settings {
        config: config.clone(),
        input_dim,
    };
    let record = Record {
        history: Vec::new(),
        best_epoch: 0,
        best_val: f64::INFINITY,
        best: copy_params(&mlp)?,
    };
    let (mut epochs, saved) =
        EpochLoop::resume_or_start(run, config.epochs, settings, record, &mut opt)?;
    if let Some(tensors) = saved {
        epochs.record_mut().best = opt
            .params()
            .iter()
            .map(|(name, _)| {
                let best = run.tensor(&tensors, &format!("best.{name}"))?;
                Ok((name.clone(), best.shallow_clone()))
            })
            .collect::<Result<_>>()?;
    }
    let data = Data {
        store,
        config,
        norm: (mean, std),
        device,
    };
    let finished = epochs.run::<Error>(
        &mut opt,
        &mut |epoch, opt, record| {
            let started = std::time::Instant::now();
            let (mut loss_sum, mut count) = (0.0, 0.0);
            let seed = config.seed.wrapping_add(epoch as u64 + 1);
            data.for_each_batch(seed, &train, &mlp, &mut |b, _, loss| {
                opt.zero_grad();
                loss.f_backward()?;
                opt.step(config.lr)?;
                let k = b.reward.len() as f64;
                loss_sum += loss.f_double_value(&[])? * k;
                count += k;
                Ok(())
            })?;
            let train_seconds = started.elapsed().as_secs_f64();
            let (val_loss, terminal_mse, rho) =
                evaluate(store, &mlp, &val, (mean, std), config, device)?;
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                train_loss: loss_sum / count.max(1.0),
                val_loss,
                terminal_mse,
                spearman: rho,
                transitions_per_s: count / train_seconds.max(1e-9),
            };
            on_epoch(&metrics);
            record.history.push(metrics);
            if val_loss < record.best_val {
                record.best_val = val_loss;
                record.best_epoch = epoch + 1;
                record.best = copy_params(&mlp)?;
            } else if epoch + 1 - record.best_epoch >= config.patience {
                return Ok(Flow::Stop);
            }
            Ok(Flow::Continue)
        },
        &|record| {
            record
                .best
                .iter()
                .map(|(n, t)| (format!("best.{n}"), t.shallow_clone()))
                .collect()
        },
    )?;
    let record = finished.record;
    let named: HashMap<String, Tensor> = record.best.into_iter().collect();
    mlp = ValueMlp::from_named(&named, config.activation, false)?;
    Ok(TrainedValue {
        mlp,
        reward_mean: mean,
        reward_std: std,
        history: record.history,
        best_epoch: record.best_epoch,
        complete: finished.complete,
    })
}

fn copy_params(mlp: &ValueMlp) -> Result<Vec<(String, Tensor)>> {
    mlp.named_params()
        .into_iter()
        .map(|(n, t)| Ok((n, t.f_detach_copy()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use rand::Rng;
    use recontrol_data::{Rollout, StateDtype, StoreMeta, StoreWriter};

    /// A store whose true value is known: every state of a rollout lies on the hyperplane
    /// w . s = r of its reward (states differ by noise orthogonal to w), so V(s) = w . s.
    fn synthetic_store(path: &Path, rollouts: usize, labelled: bool) -> Vec<f32> {
        let w = [1.0f32, -2.0, 0.5, 0.0];
        let meta = StoreMeta {
            hidden_size: 4,
            model: "synthetic".into(),
            model_hash: "sha256:synthetic".into(),
            state_dtype: StateDtype::F32,
            prompt_format: recontrol_data::PromptFormat::Raw,
            generation: serde_json::json!({}),
            seed: 0,
            recontrol_version: "test".into(),
            dataset: "synthetic".into(),
        };
        let mut rng = StdRng::seed_from_u64(5);
        let mut writer = StoreWriter::create(path, &meta).expect("create");
        let mut rewards = Vec::new();
        for i in 0..rollouts {
            let t = rng.random_range(1..6);
            let terminal: Vec<f32> = (0..4).map(|_| rng.random_range(-1.0..1.0)).collect();
            let r: f32 = terminal.iter().zip(&w).map(|(a, b)| a * b).sum();
            // Noise along (2, 1, 0, 0) and (0, 0, 0, 1): both orthogonal to w.
            let states = ndarray::Array2::from_shape_fn((t, 4), |(k, c)| {
                let a = (k as f32 * 0.37 + i as f32 * 0.11).sin();
                let b = (k as f32 * 0.73 + i as f32 * 0.29).cos();
                terminal[c] + a * [2.0, 1.0, 0.0, 0.0][c] + b * [0.0, 0.0, 0.0, 1.0][c]
            });
            rewards.push(r);
            writer
                .append(&[Rollout {
                    prompt_index: i as i64,
                    prompt: String::new(),
                    response: String::new(),
                    tokens: (0..t as i64).collect(),
                    states,
                    reward: if labelled { r } else { f32::NAN },
                }])
                .expect("append");
        }
        writer.finish().expect("finish");
        rewards
    }

    fn config() -> ValueTrainConfig {
        ValueTrainConfig {
            hidden_dims: vec![32],
            epochs: 60,
            lr: 3e-3,
            batch_size: 64,
            patience: 60,
            block_rows: 64,
            buffer_blocks: 4,
            ..ValueTrainConfig::default()
        }
    }

    /// Every target learns the known value function: TD(0), TD(lambda) and Monte-Carlo.
    #[test]
    fn learns_a_known_value_function() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        synthetic_store(&path, 400, true);
        let store = Store::open(&path).expect("open");
        for target in [Target::Td0, Target::Lambda(0.8), Target::Mc] {
            let run = RunControl {
                checkpoint: &dir.path().join("ckpt.safetensors"),
                resume: false,
                max_this_run: None,
            };
            let c = ValueTrainConfig { target, ..config() };
            let trained = train_value(&store, &c, Device::Cpu, run, &mut |_| {})?;
            let last = trained.history[trained.best_epoch - 1];
            // Rewards spread over about +-2.3 (std ~1.3): the terminal error is small next to it.
            assert!(
                last.terminal_mse < 0.01,
                "{target:?}: terminal MSE {}",
                last.terminal_mse
            );
            assert!(
                last.spearman > 0.98,
                "{target:?}: spearman {}",
                last.spearman
            );
            assert!(trained.complete);
        }
        Ok(())
    }

    #[test]
    fn resuming_gives_the_uninterrupted_net_and_unlabelled_stores_are_refused() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        synthetic_store(&path, 60, true);
        let store = Store::open(&path).expect("open");
        let c = ValueTrainConfig {
            epochs: 4,
            ..config()
        };
        // Every weight, in order; an error (not an empty list) if one cannot be read.
        let flat = |m: &ValueMlp| -> Result<Vec<f32>> {
            let mut values = Vec::new();
            for (_, t) in m.named_params() {
                values.extend(Vec::<f32>::try_from(t.f_flatten(0, -1)?)?);
            }
            assert!(!values.is_empty(), "a net without weights");
            Ok(values)
        };
        let a_path = dir.path().join("a.safetensors");
        let a = train_value(
            &store,
            &c,
            Device::Cpu,
            RunControl {
                checkpoint: &a_path,
                resume: false,
                max_this_run: None,
            },
            &mut |_| {},
        )?;
        let b_path = dir.path().join("b.safetensors");
        let part = train_value(
            &store,
            &c,
            Device::Cpu,
            RunControl {
                checkpoint: &b_path,
                resume: true,
                max_this_run: Some(2),
            },
            &mut |_| {},
        )?;
        assert!(!part.complete);
        let b = train_value(
            &store,
            &c,
            Device::Cpu,
            RunControl {
                checkpoint: &b_path,
                resume: true,
                max_this_run: None,
            },
            &mut |_| {},
        )?;
        assert_eq!(flat(&b.mlp)?, flat(&a.mlp)?);
        let losses = |h: &[EpochMetrics]| -> Vec<(f64, f64)> {
            h.iter().map(|m| (m.train_loss, m.val_loss)).collect()
        };
        assert_eq!(losses(&b.history), losses(&a.history));
        // Other settings cannot resume that checkpoint.
        let err = train_value(
            &store,
            &ValueTrainConfig {
                seed: 9,
                ..c.clone()
            },
            Device::Cpu,
            RunControl {
                checkpoint: &b_path,
                resume: true,
                max_this_run: None,
            },
            &mut |_| {},
        )
        .expect_err("other settings")
        .to_string();
        assert!(err.contains("was made with other settings"), "{err}");

        let unlabelled = dir.path().join("u.h5");
        synthetic_store(&unlabelled, 10, false);
        let store = Store::open(&unlabelled).expect("open");
        let err = train_value(
            &store,
            &c,
            Device::Cpu,
            RunControl {
                checkpoint: &dir.path().join("u.ckpt"),
                resume: false,
                max_this_run: None,
            },
            &mut |_| {},
        )
        .expect_err("unlabelled")
        .to_string();
        assert!(
            err.contains("10 of 10 rollouts have no (finite) reward"),
            "{err}"
        );
        // Partly labelled: two of 20 rollouts lack a finite reward.
        let partly = dir.path().join("p.h5");
        synthetic_store(&partly, 20, true);
        Store::open_rw(&partly)
            .expect("open")
            .write_rewards(7, &[f32::NAN, f32::INFINITY])
            .expect("write");
        let err = check_labelled(&Store::open(&partly).expect("open"))
            .expect_err("partly labelled")
            .to_string();
        assert!(
            err.contains("2 of 20 rollouts have no (finite) reward"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn spearman_hand_cases() {
        assert!((spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // Ties get average ranks: x ranks (0.5, 0.5, 2), y ranks (0, 1, 2).
        let rho = spearman(&[1.0, 1.0, 2.0], &[1.0, 2.0, 3.0]);
        assert!((rho - 0.866_025_403_784_438_6).abs() < 1e-9, "{rho}");
    }
}
