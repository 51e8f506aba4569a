//! Bradley-Terry training of a reward head on a frozen backbone: last-token features of every
//! chosen and rejected text are computed once, so an epoch costs a few matrix products.
//! AdamW with warmup and cosine decay, seeded, with held-out accuracy and margin per epoch and a
//! checkpoint per epoch for exact `--resume`.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use recontrol_lm::LanguageModel;
use recontrol_train::{cosine_lr, AdamW, AdamWConfig, EpochLoop, Finished, Flow};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::features::{features_with, FeatureMemo};
use crate::loss::{accuracy_and_margin, bradley_terry_loss};
use crate::model::encode_batch;
use crate::{Error, Result};

/// Settings of a reward-model training run (recorded in checkpoints; a resume must match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardTrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// L2 penalty on the head: `l2 * ||w||^2` is added to every batch's loss.
    #[serde(default)]
    pub l2: f64,
    /// Train the head on standardised features (head-only training).
    #[serde(default)]
    pub standardize: bool,
    pub seed: u64,
}

impl Default for RewardTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 20,
            batch_size: 64,
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 10,
            weight_decay: 0.01,
            l2: 0.0,
            standardize: false,
            seed: 0,
        }
    }
}

/// Chosen and rejected texts of preference pairs (prompt + reply, as rewards score them).
#[derive(Debug, Clone, Default)]
pub struct PairTexts {
    pub chosen: Vec<String>,
    pub rejected: Vec<String>,
}

/// Metrics of one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub heldout_loss: f64,
    pub heldout_accuracy: f64,
    pub heldout_margin: f64,
    pub lr: f64,
}

/// A trained head and how it got there.
#[derive(Debug)]
pub struct TrainedHead {
    /// `[1, hidden]`, float32.
    pub score: Tensor,
    pub history: Vec<EpochMetrics>,
    /// Whether every epoch is done (false when capped by the run's `max_this_run`).
    pub complete: bool,
}

/// What a checkpoint must have been made with to be resumed.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Settings {
    config: RewardTrainConfig,
    hidden: usize,
    /// Backbone layers trained (0: the head alone).
    unfrozen: usize,
}

/// What training records as it goes (saved in checkpoints).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    history: Vec<EpochMetrics>,
}

/// Last-token features of pair texts: `(chosen, rejected)`, each `[n, hidden]`.
pub fn pair_features(
    lm: &LanguageModel,
    pairs: &PairTexts,
    batch_size: usize,
    memo: Option<&FeatureMemo>,
) -> Result<(Tensor, Tensor)> {
    // Together, so that a pair's chosen and rejected texts share their dialogue's features.
    let n = pairs.chosen.len() as i64;
    let both: Vec<String> = pairs
        .chosen
        .iter()
        .chain(&pairs.rejected)
        .cloned()
        .collect();
    let all = features_with(lm, &both, batch_size, memo)?;
    Ok((
        all.f_narrow(0, 0, n)?,
        all.f_narrow(0, n, all.size()[0] - n)?,
    ))
}

pub use recontrol_train::RunControl;

/// Trains the head. `train` and `heldout` are `(chosen, rejected)` feature pairs.
/// `on_epoch` sees each epoch's metrics; a checkpoint is written after each epoch. With
/// `config.standardize` the head is trained on features standardised with the training
/// pairs' mean and spread and the returned head folds the spread back in (`w / sigma`; the
/// mean only shifts every score by the same constant, which a Bradley-Terry reward ignores).
pub fn train_head(
    train: &(Tensor, Tensor),
    heldout: &(Tensor, Tensor),
    config: &RewardTrainConfig,
    run: RunControl<'_>,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<TrainedHead> {
    let n = train.0.size()[0] as usize;
    let hidden = train.0.size()[1];
    if heldout.0.size()[0] == 0 {
        return Err(Error::Training("no held-out pairs".into()));
    }
    if !config.l2.is_finite() || config.l2 < 0.0 {
        return Err(Error::Training(format!(
            "--l2 {} must be a finite number >= 0",
            config.l2
        )));
    }
    let scale = if config.standardize {
        Some(Standardizer::fit(train)?)
    } else {
        None
    };
    let prepare = |pairs: &(Tensor, Tensor)| -> Result<(Tensor, Tensor)> {
        Ok(match &scale {
            Some(s) => (s.apply(&pairs.0)?, s.apply(&pairs.1)?),
            None => (pairs.0.shallow_clone(), pairs.1.shallow_clone()),
        })
    };
    let (train, heldout) = (prepare(train)?, prepare(heldout)?);
    let score =
        Tensor::f_zeros([1, hidden], (Kind::Float, tch::Device::Cpu))?.set_requires_grad(true);
    let mut opt = AdamW::new(
        vec![("score.weight".to_owned(), score.shallow_clone())],
        adamw(config),
    )?;
    let w = || score.f_transpose(0, 1);
    let finished = fit(
        Fit {
            pairs: n,
            hidden: hidden as usize,
            unfrozen: 0,
            config,
            run,
        },
        &mut opt,
        &mut |chunk| {
            let index = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>());
            let c = train.0.f_index_select(0, &index)?.f_matmul(&w()?)?;
            let r = train.1.f_index_select(0, &index)?.f_matmul(&w()?)?;
            let loss = bradley_terry_loss(&c, &r)?;
            if config.l2 > 0.0 {
                Ok(loss.f_add(
                    &score
                        .f_square()?
                        .f_sum(Kind::Float)?
                        .f_mul_scalar(config.l2)?,
                )?)
            } else {
                Ok(loss)
            }
        },
        &mut || evaluate(&score, &heldout),
        on_epoch,
    )?;
    let score = score.f_detach()?;
    Ok(TrainedHead {
        score: match &scale {
            Some(s) => s.fold(&score)?,
            None => score,
        },
        complete: finished.complete,
        history: finished.record.history,
    })
}

/// Per-feature mean and spread of the training pairs' features (both sides together).
struct Standardizer {
    mean: Tensor,
    /// Standard deviation, floored so that a constant feature does not divide by zero.
    std: Tensor,
}

impl Standardizer {
    fn fit(train: &(Tensor, Tensor)) -> Result<Self> {
        let all = Tensor::f_cat(&[&train.0, &train.1], 0)?;
        let mean = all.f_mean_dim(0, true, Kind::Float)?;
        let std = all.f_std_dim(0, false, true)?.f_clamp_min(1e-6)?;
        Ok(Self { mean, std })
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_sub(&self.mean)?.f_div(&self.std)?)
    }

    /// The head on raw features that scores like `score` on standardised ones, up to a
    /// constant.
    fn fold(&self, score: &Tensor) -> Result<Tensor> {
        Ok(score.f_div(&self.std)?)
    }
}

/// Trains the head together with the top `k` decoder layers and the final norm of `lm`'s
/// backbone (the rest stays frozen and runs without autograd). Held-out metrics use the
/// current weights each epoch; a checkpoint (trainable weights and AdamW moments) is written
/// after each epoch. The backbone's tensors are updated in place.
pub fn train_top_k(
    lm: &LanguageModel,
    k: usize,
    train: &PairTexts,
    heldout: &PairTexts,
    config: &RewardTrainConfig,
    run: RunControl<'_>,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<TrainedHead> {
    let layers = lm.model.num_layers();
    if k == 0 || k > layers {
        return Err(Error::Training(format!(
            "--unfreeze-top-k {k} must be between 1 and the backbone's {layers} layers"
        )));
    }
    if heldout.chosen.is_empty() {
        return Err(Error::Training("no held-out pairs".into()));
    }
    let from = layers - k;
    let trainable = |name: &str| {
        name == "model.norm.weight"
            || (from..layers).any(|i| name.starts_with(&format!("model.layers.{i}.")))
    };
    let hidden = lm.model.config().hidden_size;
    let score = Tensor::f_zeros([1, hidden as i64], (Kind::Float, lm.model.device()))?
        .set_requires_grad(true);
    let mut params: Vec<(String, Tensor)> = lm
        .model
        .named_params()
        .into_iter()
        .filter(|(name, _)| trainable(name))
        .map(|(name, t)| (name, t.set_requires_grad(true)))
        .collect();
    params.push(("score.weight".to_owned(), score.shallow_clone()));
    let mut opt = AdamW::new(params, adamw(config))?;
    let finished = fit(
        Fit {
            pairs: train.chosen.len(),
            hidden,
            unfrozen: k,
            config,
            run,
        },
        &mut opt,
        &mut |chunk| {
            let texts: Vec<String> = chunk
                .iter()
                .map(|&i| train.chosen[i].clone())
                .chain(chunk.iter().map(|&i| train.rejected[i].clone()))
                .collect();
            let batch = encode_batch(lm, &texts)?;
            let x = lm.model.forward_prefix(&batch.input(), from)?;
            let h = lm
                .model
                .forward_suffix(&x, &batch.input(), from)?
                .f_to_kind(Kind::Float)?;
            let rewards = h.f_matmul(&score.f_transpose(0, 1)?)?.f_squeeze_dim(1)?;
            let m = chunk.len() as i64;
            Ok(bradley_terry_loss(
                &rewards.f_narrow(0, 0, m)?,
                &rewards.f_narrow(0, m, m)?,
            )?)
        },
        &mut || {
            let features = pair_features(lm, heldout, config.batch_size, None)?;
            evaluate(&score.f_detach()?.f_to_device(tch::Device::Cpu)?, &features)
        },
        on_epoch,
    )?;
    Ok(TrainedHead {
        score: score.f_detach()?,
        complete: finished.complete,
        history: finished.record.history,
    })
}

fn adamw(config: &RewardTrainConfig) -> AdamWConfig {
    AdamWConfig {
        weight_decay: config.weight_decay,
        ..AdamWConfig::default()
    }
}

/// What a training run fits: `pairs` training pairs, a head of `hidden` inputs, `unfrozen`
/// backbone layers.
struct Fit<'a> {
    pairs: usize,
    hidden: usize,
    unfrozen: usize,
    config: &'a RewardTrainConfig,
    run: RunControl<'a>,
}

/// The epoch loop shared by both trainers (on the resumable [`EpochLoop`]): continues an
/// interrupted run from the checkpoint (made with the same settings), then per epoch shuffles
/// the pairs with the seed, runs `step` (the batch's loss) and an AdamW update with the
/// warmup and cosine rate, evaluates with `eval` (held-out loss, accuracy, margin), reports
/// and checkpoints.
fn fit(
    fit: Fit<'_>,
    opt: &mut AdamW,
    step: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
    eval: &mut dyn FnMut() -> Result<(f64, f64, f64)>,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<Finished<Record>> {
    let Fit {
        pairs: n,
        hidden,
        unfrozen,
        config,
        run,
    } = fit;
    if n == 0 {
        return Err(Error::Training("no training pairs".into()));
    }
    if config.batch_size == 0 || config.epochs == 0 || !config.lr.is_finite() || config.lr <= 0.0 {
        return Err(Error::Training(
            "--epochs, --batch-size and --lr must be positive".into(),
        ));
    }
    let per_epoch = steps_per_epoch(n, config);
    let total = per_epoch * config.epochs;
    let settings = Settings {
        config: config.clone(),
        hidden,
        unfrozen,
    };
    let (epochs, _) =
        EpochLoop::resume_or_start(run, config.epochs, settings, Record::default(), opt)?;
    epochs.run::<Error>(
        opt,
        &mut |epoch, opt, record| {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut StdRng::seed_from_u64(
                config.seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
            let (mut loss_sum, mut batches, mut lr) = (0.0, 0, config.lr);
            for (b, chunk) in order.chunks(config.batch_size).enumerate() {
                let loss = step(chunk)?;
                opt.zero_grad();
                loss.f_backward()?;
                lr = cosine_lr(
                    epoch * per_epoch + b,
                    total,
                    config.warmup_steps,
                    config.lr,
                    config.min_lr,
                );
                opt.step(lr)?;
                loss_sum += loss.f_double_value(&[])?;
                batches += 1;
            }
            let (heldout_loss, heldout_accuracy, heldout_margin) = eval()?;
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                train_loss: loss_sum / f64::from(batches.max(1)),
                heldout_loss,
                heldout_accuracy,
                heldout_margin,
                lr,
            };
            on_epoch(&metrics);
            record.history.push(metrics);
            Ok(Flow::Continue)
        },
        &|_| Vec::new(),
    )
}

fn steps_per_epoch(n: usize, config: &RewardTrainConfig) -> usize {
    n.div_ceil(config.batch_size.max(1))
}

/// Held-out loss, accuracy and mean margin of a head.
pub fn evaluate(score: &Tensor, pairs: &(Tensor, Tensor)) -> Result<(f64, f64, f64)> {
    let _guard = tch::no_grad_guard();
    let w = score.f_transpose(0, 1)?;
    let c = pairs.0.f_matmul(&w)?.f_squeeze_dim(1)?;
    let r = pairs.1.f_matmul(&w)?.f_squeeze_dim(1)?;
    let loss = bradley_terry_loss(&c, &r)?.f_double_value(&[])?;
    let (acc, margin) = accuracy_and_margin(&Vec::<f32>::try_from(&c)?, &Vec::<f32>::try_from(&r)?);
    Ok((loss, acc, margin))
}

/// The response-length-only baseline: a one-feature model that prefers the longer reply, or
/// the shorter one if that does better on the training pairs, scored on the held-out pairs
/// (ties count half). A reward model that does not beat it has learned nothing beyond length.
pub fn length_baseline_accuracy(
    train: (&[String], &[String]),
    heldout: (&[String], &[String]),
) -> f64 {
    let words = |texts: &[String]| -> Vec<f32> {
        texts
            .iter()
            .map(|s| s.split_whitespace().count() as f32)
            .collect()
    };
    let (train_longer, _) = accuracy_and_margin(&words(train.0), &words(train.1));
    let (heldout_longer, _) = accuracy_and_margin(&words(heldout.0), &words(heldout.1));
    if train_longer >= 0.5 {
        heldout_longer
    } else {
        1.0 - heldout_longer
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use rand::Rng;

    /// Features where the chosen text is better along a known direction.
    fn synthetic(n: usize, seed: u64) -> (Tensor, Tensor) {
        let mut rng = StdRng::seed_from_u64(seed);
        let h = 8;
        let mut c = Vec::new();
        let mut r = Vec::new();
        for _ in 0..n {
            let base: Vec<f32> = (0..h).map(|_| rng.random_range(-1.0..1.0)).collect();
            let delta: f32 = rng.random_range(0.2..1.0);
            c.extend(
                base.iter()
                    .enumerate()
                    .map(|(i, v)| if i == 0 { v + delta } else { *v }),
            );
            r.extend(
                base.iter()
                    .enumerate()
                    .map(|(i, v)| if i == 0 { v - delta } else { *v }),
            );
        }
        (
            Tensor::from_slice(&c).view([n as i64, h]),
            Tensor::from_slice(&r).view([n as i64, h]),
        )
    }

    fn run(checkpoint: &Path, resume: bool, cap: Option<usize>) -> RunControl<'_> {
        RunControl {
            checkpoint,
            resume,
            max_this_run: cap,
        }
    }

    #[test]
    fn the_length_baseline_picks_its_direction_on_the_training_pairs() {
        let texts = |v: &[&str]| -> Vec<String> { v.iter().map(|s| (*s).to_owned()).collect() };
        // Training: the shorter reply wins 2 of 3; held-out: shorter wins 1, longer 1, a tie.
        let (tc, tr) = (
            texts(&["a", "a b", "a b c d"]),
            texts(&["a b", "a b c", "a"]),
        );
        let (hc, hr) = (texts(&["a", "a b c", "a b"]), texts(&["a b", "a", "c d"]));
        let acc = length_baseline_accuracy((&tc, &tr), (&hc, &hr));
        assert!((acc - 0.5).abs() < 1e-12, "{acc}");
        let acc = length_baseline_accuracy((&tr, &tc), (&hc, &hr));
        assert!((acc - 0.5).abs() < 1e-12, "{acc}");
        let acc = length_baseline_accuracy((&tc, &tr), (&texts(&["a"]), &texts(&["a b"])));
        assert_eq!(acc, 1.0);
    }

    #[test]
    fn learns_the_preferred_direction_and_resumes_exactly() -> Result<()> {
        let train = synthetic(200, 1);
        let heldout = synthetic(50, 2);
        let config = RewardTrainConfig {
            epochs: 6,
            batch_size: 32,
            ..RewardTrainConfig::default()
        };
        let dir = tempfile::tempdir().map_err(|source| Error::Io {
            path: "tmp".into(),
            source,
        })?;
        let (a_path, b_path) = (
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
        );
        let a = train_head(
            &train,
            &heldout,
            &config,
            run(&a_path, false, None),
            &mut |_| {},
        )?;
        assert!(a.complete);
        let last = a.history.last().expect("epochs");
        assert_eq!(last.heldout_accuracy, 1.0);
        assert!(last.heldout_margin > 0.0 && last.heldout_loss < a.history[0].heldout_loss);

        // Interrupted after three epochs, then resumed: the same head as the uninterrupted run.
        let part = train_head(
            &train,
            &heldout,
            &config,
            run(&b_path, true, Some(3)),
            &mut |_| {},
        )?;
        assert!(!part.complete && part.history.len() == 3);
        let mut epochs = Vec::new();
        let b = train_head(
            &train,
            &heldout,
            &config,
            run(&b_path, true, None),
            &mut |m| epochs.push(m.epoch),
        )?;
        assert_eq!(epochs, [4, 5, 6]);
        assert!(b.complete && b.score.equal(&a.score));
        assert_eq!(b.history.len(), 6);
        // Other settings cannot resume that checkpoint.
        let other = RewardTrainConfig {
            seed: 9,
            ..config.clone()
        };
        let err = train_head(
            &train,
            &heldout,
            &other,
            run(&b_path, true, None),
            &mut |_| {},
        )
        .expect_err("other settings");
        assert!(err.to_string().contains("other settings"), "{err}");
        Ok(())
    }
}
