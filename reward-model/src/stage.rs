//! The reward stages as library calls: preparing preference pairs (the seeded train/held-out
//! split, the texts a reward scores), training a Bradley-Terry reward model on them, and
//! labelling a rollout store with a reward (resumable).

use recontrol_data::{
    render_prompt, ChatRenderer, PreferencePair, PromptFormat, Split, SplitSpec, Store,
};
use recontrol_lm::LanguageModel;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::features::FeatureMemo;
use crate::partition::{pairs_digest, Partition};
use crate::train::{
    length_baseline_accuracy, pair_features, train_head, train_top_k, EpochMetrics, PairTexts,
    RewardTrainConfig, RunControl,
};
use crate::{scored_text, Error, Result, RewardSource};

/// Preference pairs split into training and held-out sides, as texts the reward scores
/// (prompt + reply) and as replies alone (for the length-only baseline).
#[derive(Debug, Clone, Default)]
pub struct PreparedPairs {
    pub train: PairTexts,
    pub heldout: PairTexts,
    pub train_replies: PairTexts,
    pub heldout_replies: PairTexts,
    /// Pairs left out for an empty reply.
    pub skipped_empty: usize,
}

impl PreparedPairs {
    /// Keeps the first `n` training pairs (in file order; the split is a seeded hash, so
    /// these are a seeded sample of the train side).
    pub fn keep_train(&mut self, n: usize) {
        for texts in [&mut self.train, &mut self.train_replies] {
            texts.chosen.truncate(n);
            texts.rejected.truncate(n);
        }
    }

    /// Keeps part `partition` of the training pairs ([`Partition::indices`] with `seed`), in
    /// file order; the held-out pairs are untouched, so every part is evaluated on the same
    /// held-out pairs.
    pub fn keep_partition(&mut self, partition: Partition, seed: u64) {
        let keep = partition.indices(self.train.chosen.len(), seed);
        for texts in [&mut self.train, &mut self.train_replies] {
            for side in [&mut texts.chosen, &mut texts.rejected] {
                *side = keep.iter().map(|&i| std::mem::take(&mut side[i])).collect();
            }
        }
    }
}

/// Splits `pairs` by their prompt with `split` (the same split as every other stage) and
/// renders the texts a reward scores: the prompt in `format` and the reply after it (after a
/// space for the raw HH text, whose prompt ends with "Assistant:"). [`PromptFormat::ChatTemplate`]
/// needs the model's template in `chat`, the way rollouts and generations render prompts.
/// Both sides must keep some pairs.
pub fn prepare_pairs(
    pairs: &[PreferencePair],
    split: &SplitSpec,
    format: PromptFormat,
    chat: Option<&dyn ChatRenderer>,
) -> Result<PreparedPairs> {
    let mut prepared = PreparedPairs::default();
    let separator = if format == PromptFormat::ChatTemplate {
        ""
    } else {
        " "
    };
    for pair in pairs {
        if pair.chosen.is_empty() || pair.rejected.is_empty() {
            prepared.skipped_empty += 1;
            continue;
        }
        let prompt = render_prompt(format, &pair.prompt, None, chat)?;
        let (side, replies) = if split.side_of(&pair.prompt.raw) == Split::Test {
            (&mut prepared.heldout, &mut prepared.heldout_replies)
        } else {
            (&mut prepared.train, &mut prepared.train_replies)
        };
        side.chosen
            .push(scored_text(&prompt, &format!("{separator}{}", pair.chosen)));
        side.rejected.push(scored_text(
            &prompt,
            &format!("{separator}{}", pair.rejected),
        ));
        replies.chosen.push(pair.chosen.clone());
        replies.rejected.push(pair.rejected.clone());
    }
    if prepared.train.chosen.is_empty() || prepared.heldout.chosen.is_empty() {
        return Err(Error::EmptySide {
            train: prepared.train.chosen.len(),
            heldout: prepared.heldout.chosen.len(),
        });
    }
    Ok(prepared)
}

/// The pairs a training with `settings` uses: [`prepare_pairs`] with the settings' split, then
/// the settings' partition of the training pairs (seeded by `split_seed`), then at most
/// `max_train_pairs` of them. The partition comes first, so parts stay disjoint under the cap.
/// `recontrol reward train` and the demo both prepare their pairs here.
pub fn prepare_training_pairs(
    pairs: &[PreferencePair],
    settings: &RewardSettings,
    format: PromptFormat,
    chat: Option<&dyn ChatRenderer>,
) -> Result<PreparedPairs> {
    let mut prepared = prepare_pairs(pairs, &settings.split(), format, chat)?;
    if let Some(partition) = settings.partition {
        prepared.keep_partition(partition, settings.split_seed);
    }
    if let Some(n) = settings.max_train_pairs {
        prepared.keep_train(n);
    }
    if prepared.train.chosen.is_empty() {
        return Err(Error::EmptySide {
            train: 0,
            heldout: prepared.heldout.chosen.len(),
        });
    }
    Ok(prepared)
}

/// How a reward model is trained. The defaults are `recontrol reward train`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardSettings {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// L2 penalty on the head, added to the loss: `l2 * ||w||^2` (on standardised features
    /// with `standardize`).
    pub l2: f64,
    /// Choose `l2` among these instead (head-only training): each is fitted on 4/5 of the
    /// training pairs and scored on the other fifth; the best validation loss wins and the
    /// head is then trained on every training pair. The held-out pairs play no part.
    pub l2_candidates: Vec<f64>,
    /// Train the head on features standardised with the training pairs' mean and spread (the
    /// saved head folds the scale back in).
    pub standardize: bool,
    pub seed: u64,
    /// Also train the top K decoder layers and the final norm (0: the head alone, on cached
    /// features of the frozen backbone).
    pub unfreeze_top_k: usize,
    /// Texts run through the backbone together when computing features.
    pub feature_batch_size: usize,
    /// Train on at most this many pairs of the train side (features of a large backbone
    /// cost a forward pass per text).
    pub max_train_pairs: Option<usize>,
    /// Train on part K of N of the training pairs ("K/N"; after the split, before
    /// `max_train_pairs`): a seeded partition (seeded by `split_seed`), so models trained on
    /// different parts saw disjoint pairs. None: every training pair (and no field in the
    /// serialised settings, so that settings written before partitions keep their form).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<Partition>,
    /// Seed of the train/held-out split of the pairs (and of the partition).
    pub split_seed: u64,
    /// Share of pairs held out for accuracy.
    pub test_fraction: f64,
}

impl Default for RewardSettings {
    fn default() -> Self {
        let c = RewardTrainConfig::default();
        Self {
            epochs: c.epochs,
            batch_size: c.batch_size,
            lr: c.lr,
            min_lr: c.min_lr,
            warmup_steps: c.warmup_steps,
            weight_decay: c.weight_decay,
            l2: c.l2,
            l2_candidates: Vec::new(),
            standardize: c.standardize,
            seed: 0,
            unfreeze_top_k: 0,
            feature_batch_size: 16,
            max_train_pairs: None,
            partition: None,
            split_seed: 0,
            test_fraction: 0.1,
        }
    }
}

impl RewardSettings {
    /// The optimisation settings (what a checkpoint records).
    pub fn config(&self) -> RewardTrainConfig {
        RewardTrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            l2: self.l2,
            standardize: self.standardize,
            seed: self.seed,
        }
    }

    /// The split of the pairs.
    pub fn split(&self) -> SplitSpec {
        SplitSpec {
            seed: self.split_seed,
            test_fraction: self.test_fraction,
        }
    }
}

/// An epoch's metrics as TensorBoard scalars (tag, value).
pub fn epoch_scalars(m: &EpochMetrics) -> [(&'static str, f64); 5] {
    [
        ("reward/train_loss", m.train_loss),
        ("reward/heldout_loss", m.heldout_loss),
        ("reward/heldout_accuracy", m.heldout_accuracy),
        ("reward/heldout_margin", m.heldout_margin),
        ("reward/lr", m.lr),
    ]
}

/// What a finished training recorded (`reward_training.json`, with the caller's run record).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RewardSummary {
    pub backbone_identity: String,
    /// The part of the training pairs trained on, when partitioned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<Partition>,
    pub train_pairs: usize,
    /// [`pairs_digest`] of the training pairs (order-independent: the digests of disjoint
    /// parts XOR to their union's).
    pub train_pairs_digest: String,
    pub heldout_pairs: usize,
    pub skipped_empty: usize,
    pub history: Vec<EpochMetrics>,
    pub heldout_accuracy: f64,
    pub length_baseline_accuracy: f64,
    /// How `l2` was chosen, when it was tuned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2_tuning: Option<L2Tuning>,
}

/// The choice of the head's L2 penalty on a validation part of the training pairs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct L2Tuning {
    pub chosen: f64,
    pub validation_pairs: usize,
    /// `(l2, validation loss, validation accuracy)` per candidate.
    pub candidates: Vec<(f64, f64, f64)>,
}

/// A training call's outcome: a head trained through every epoch, or a run stopped at its
/// epoch cap (a checkpoint is kept to resume from).
#[derive(Debug)]
pub enum RewardOutcome {
    Complete {
        /// `[1, hidden]` score head, float32.
        score: Tensor,
        summary: RewardSummary,
    },
    Stopped {
        epochs_done: usize,
    },
}

/// Trains a Bradley-Terry head (and with `unfreeze_top_k`, the top decoder layers) on the
/// backbone `lm` with the prepared pairs. `on_epoch` sees each epoch's metrics. A frozen
/// backbone's features are read from and added to `memo` (e.g. the held-out pairs' features,
/// which a policy reward model and a judge on the same backbone both need); with
/// `unfreeze_top_k` the backbone changes and `memo` is not used.
pub fn train_reward(
    lm: &LanguageModel,
    memo: Option<&FeatureMemo>,
    pairs: &PreparedPairs,
    settings: &RewardSettings,
    control: RunControl<'_>,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<RewardOutcome> {
    let mut config = settings.config();
    let mut l2_tuning = None;
    let trained = if settings.unfreeze_top_k == 0 {
        eprintln!(
            "features of {} training and {} held-out pairs",
            pairs.train.chosen.len(),
            pairs.heldout.chosen.len()
        );
        let batch = settings.feature_batch_size;
        let train_features = pair_features(lm, &pairs.train, batch, memo)?;
        let heldout_features = pair_features(lm, &pairs.heldout, batch, memo)?;
        if !settings.l2_candidates.is_empty() {
            let tuning = tune_l2(
                &train_features,
                &config,
                &settings.l2_candidates,
                control.checkpoint,
            )?;
            config.l2 = tuning.chosen;
            l2_tuning = Some(tuning);
        }
        train_head(
            &train_features,
            &heldout_features,
            &config,
            control,
            on_epoch,
        )?
    } else {
        train_top_k(
            lm,
            settings.unfreeze_top_k,
            &pairs.train,
            &pairs.heldout,
            &config,
            control,
            on_epoch,
        )?
    };
    if !trained.complete {
        return Ok(RewardOutcome::Stopped {
            epochs_done: trained.history.len(),
        });
    }
    let heldout_accuracy = trained.history.last().map_or(0.0, |m| m.heldout_accuracy);
    let baseline = length_baseline_accuracy(
        (&pairs.train_replies.chosen, &pairs.train_replies.rejected),
        (
            &pairs.heldout_replies.chosen,
            &pairs.heldout_replies.rejected,
        ),
    );
    Ok(RewardOutcome::Complete {
        score: trained.score,
        summary: RewardSummary {
            backbone_identity: lm.identity.clone(),
            partition: settings.partition,
            train_pairs: pairs.train.chosen.len(),
            train_pairs_digest: pairs_digest(&pairs.train),
            heldout_pairs: pairs.heldout.chosen.len(),
            skipped_empty: pairs.skipped_empty,
            history: trained.history,
            heldout_accuracy,
            length_baseline_accuracy: baseline,
            l2_tuning,
        },
    })
}

/// Fits a head per candidate L2 penalty on 4/5 of the training pairs and picks the one with
/// the lowest loss on the remaining fifth (every fifth pair).
fn tune_l2(
    train: &(Tensor, Tensor),
    config: &RewardTrainConfig,
    candidates: &[f64],
    checkpoint: &std::path::Path,
) -> Result<L2Tuning> {
    let n = train.0.size()[0];
    let (fit_rows, validation_rows): (Vec<i64>, Vec<i64>) = (0..n).partition(|i| i % 5 != 0);
    if fit_rows.is_empty() || validation_rows.is_empty() {
        return Err(Error::Training(format!(
            "{n} training pairs are too few to tune the L2 penalty"
        )));
    }
    let take = |rows: &[i64]| -> Result<(Tensor, Tensor)> {
        let index = Tensor::from_slice(rows);
        Ok((
            train.0.f_index_select(0, &index)?,
            train.1.f_index_select(0, &index)?,
        ))
    };
    let (fit, validation) = (take(&fit_rows)?, take(&validation_rows)?);
    let scratch = checkpoint.with_extension("l2-tuning");
    let mut results = Vec::with_capacity(candidates.len());
    for &l2 in candidates {
        let trial = RewardTrainConfig {
            l2,
            ..config.clone()
        };
        let control = RunControl {
            checkpoint: &scratch,
            resume: false,
            max_this_run: None,
        };
        let head = train_head(&fit, &validation, &trial, control, &mut |_| {})?;
        let _ = std::fs::remove_file(&scratch);
        let last = head
            .history
            .last()
            .ok_or_else(|| Error::Training("the L2 tuning run finished without an epoch".into()))?;
        eprintln!(
            "l2 {l2}: validation loss {:.4}, accuracy {:.3}",
            last.heldout_loss, last.heldout_accuracy
        );
        results.push((l2, last.heldout_loss, last.heldout_accuracy));
    }
    let chosen = results
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(config.l2, |r| r.0);
    Ok(L2Tuning {
        chosen,
        validation_pairs: validation_rows.len(),
        candidates: results,
    })
}

/// How labelling treats rewards already in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelMode {
    /// Label an unlabelled store; a (partly) labelled one is refused.
    Fresh,
    /// Finish a partly labelled store (an interrupted run) from its first unlabelled rollout;
    /// a fully labelled store is left as it is.
    Resume,
    /// Relabel every rollout.
    Overwrite,
}

/// Where labelling starts in a store holding `rewards` (NaN: unlabelled), or why it cannot.
pub fn label_start(rewards: &[f32], mode: LabelMode) -> Result<usize, LabelRefusal> {
    let labelled = rewards.iter().filter(|r| !r.is_nan()).count();
    let n = rewards.len();
    match mode {
        LabelMode::Overwrite => Ok(0),
        // A finished run resumed (a requeued job): nothing left to do.
        LabelMode::Resume if labelled == n => Ok(n),
        _ if labelled == n && n > 0 => Err(LabelRefusal::AlreadyLabelled),
        LabelMode::Fresh if labelled > 0 => Err(LabelRefusal::PartlyLabelled { labelled, n }),
        // Labelling goes in order: resume at the first unlabelled rollout.
        _ => Ok(rewards.iter().position(|r| r.is_nan()).unwrap_or(n)),
    }
}

/// Why a store cannot be labelled in the mode asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LabelRefusal {
    #[error("already labelled; pass --overwrite to relabel")]
    AlreadyLabelled,
    #[error(
        "partly labelled ({labelled} of {n}); pass --resume to finish or --overwrite to relabel"
    )]
    PartlyLabelled { labelled: usize, n: usize },
}

/// What labelling did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelSummary {
    /// Rollouts in the store.
    pub rollouts: usize,
    /// Rollouts labelled by this call.
    pub labelled: usize,
}

/// Fills the `reward` of the store's rollouts from `start`, `chunk` at a time, each chunk
/// written as soon as it is scored (so an interrupted run resumes where it stopped).
/// `progress(done)` follows each chunk.
pub fn label_store(
    store: &Store,
    reward: &mut dyn RewardSource,
    start: usize,
    chunk: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<LabelSummary> {
    let texts = store.texts().map_err(Error::Store)?;
    let mut at = start;
    for batch in texts[start.min(texts.len())..].chunks(chunk.max(1)) {
        let scores = reward.score(batch)?;
        if let Some(k) = scores.iter().position(|r| !r.is_finite()) {
            return Err(Error::NonFiniteReward {
                source_name: reward.describe(),
                index: at + k,
                value: scores[k],
            });
        }
        store.write_rewards(at, &scores).map_err(Error::Store)?;
        at += batch.len();
        progress(at);
    }
    Ok(LabelSummary {
        rollouts: texts.len(),
        labelled: at - start.min(texts.len()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use recontrol_data::{Dialogue, PromptRecord};

    /// `n` pairs with distinct prompts, replies "chosen {i}" / "rejected {i}".
    fn pairs(n: usize) -> Vec<PreferencePair> {
        (0..n)
            .map(|i| PreferencePair {
                prompt: PromptRecord {
                    index: i,
                    raw: format!("Human: question {i}\n\nAssistant:"),
                    dialogue: Dialogue::question(&format!("question {i}")),
                },
                chosen: format!("chosen {i}"),
                rejected: format!("rejected {i}"),
            })
            .collect()
    }

    fn training(pairs: &[PreferencePair], settings: &RewardSettings) -> Result<PreparedPairs> {
        prepare_training_pairs(pairs, settings, PromptFormat::Raw, None)
    }

    /// The training pairs' chosen replies (they name their pair).
    fn trained_on(prepared: &PreparedPairs) -> Vec<String> {
        prepared.train_replies.chosen.clone()
    }

    #[test]
    fn partitions_of_the_training_pairs_are_disjoint_seeded_and_leave_held_out_alone() {
        let pairs = pairs(60);
        let settings = |partition: Option<&str>, split_seed, max| RewardSettings {
            partition: partition.map(|p| p.parse().expect("partition")),
            split_seed,
            max_train_pairs: max,
            test_fraction: 0.2,
            ..RewardSettings::default()
        };
        let whole = training(&pairs, &settings(None, 5, None)).expect("whole");
        for n in [2, 3] {
            let parts: Vec<PreparedPairs> = (1..=n)
                .map(|k| training(&pairs, &settings(Some(&format!("{k}/{n}")), 5, None)))
                .collect::<Result<_>>()
                .expect("parts");
            let mut union: Vec<String> = parts.iter().flat_map(trained_on).collect();
            union.sort();
            let mut all = trained_on(&whole);
            all.sort();
            assert_eq!(
                union, all,
                "the {n} parts are disjoint and cover the training pairs"
            );
            for part in &parts {
                // Held-out pairs are never partitioned.
                assert_eq!(part.heldout.chosen, whole.heldout.chosen);
                assert_eq!(
                    part.heldout_replies.rejected,
                    whole.heldout_replies.rejected
                );
                // Texts and replies stay in step, chosen with its rejected, in file order.
                for (i, reply) in part.train_replies.chosen.iter().enumerate() {
                    let pair = reply.trim_start_matches("chosen ");
                    assert_eq!(part.train_replies.rejected[i], format!("rejected {pair}"));
                    assert!(part.train.chosen[i].ends_with(&format!(" chosen {pair}")));
                    assert!(part.train.rejected[i].ends_with(&format!(" rejected {pair}")));
                }
                let order: Vec<usize> = trained_on(part)
                    .iter()
                    .map(|r| r.trim_start_matches("chosen ").parse().expect("index"))
                    .collect();
                assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
            }
        }
        let half =
            |seed| trained_on(&training(&pairs, &settings(Some("1/2"), seed, None)).expect("1/2"));
        assert_eq!(half(5), half(5));
        // Another seed: another split, and another partition of the same training pairs.
        assert_ne!(half(5), half(6));
        let mut other = prepare_pairs(
            &pairs,
            &settings(None, 5, None).split(),
            PromptFormat::Raw,
            None,
        )
        .expect("pairs");
        other.keep_partition("1/2".parse().expect("1/2"), 6);
        assert_ne!(trained_on(&other), half(5));
    }

    #[test]
    fn the_partition_comes_before_the_pair_cap() {
        let pairs = pairs(80);
        let part = |k| {
            let settings = RewardSettings {
                partition: Some(Partition::new(k, 2).expect("partition")),
                max_train_pairs: Some(10),
                ..RewardSettings::default()
            };
            trained_on(&training(&pairs, &settings).expect("part"))
        };
        let (first, second) = (part(1), part(2));
        assert_eq!((first.len(), second.len()), (10, 10));
        assert!(
            first.iter().all(|r| !second.contains(r)),
            "{first:?} {second:?}"
        );
    }

    #[test]
    fn settings_read_a_partition_as_k_slash_n() {
        let settings: RewardSettings =
            toml::from_str("partition = \"1/2\"\nepochs = 3\n").expect("toml");
        assert_eq!(settings.partition, Partition::new(1, 2).ok());
        let err = toml::from_str::<RewardSettings>("partition = \"3/2\"").expect_err("3/2");
        assert!(
            err.to_string()
                .contains("\"3/2\": expected K/N with 1 <= K <= N"),
            "{err}"
        );
        // Unpartitioned settings serialise as before partitions existed.
        let json = serde_json::to_value(RewardSettings::default()).expect("json");
        assert!(json.get("partition").is_none(), "{json}");
        let json = serde_json::to_value(settings).expect("json");
        assert_eq!(json["partition"], "1/2");
    }

    #[test]
    fn a_partition_with_no_training_pairs_is_refused() {
        let pairs = pairs(6);
        let settings = RewardSettings {
            partition: Some(Partition::new(9, 9).expect("partition")),
            test_fraction: 0.5,
            ..RewardSettings::default()
        };
        let err = training(&pairs, &settings).expect_err("empty part");
        assert!(matches!(err, Error::EmptySide { train: 0, .. }), "{err}");
    }

    #[test]
    fn labelling_starts_where_the_mode_says() {
        let nan = f32::NAN;
        assert_eq!(label_start(&[nan, nan, nan], LabelMode::Fresh), Ok(0));
        assert_eq!(label_start(&[1.0, 2.0, nan], LabelMode::Resume), Ok(2));
        assert_eq!(label_start(&[1.0, 2.0, nan], LabelMode::Overwrite), Ok(0));
        assert_eq!(
            label_start(&[1.0, nan, nan], LabelMode::Fresh),
            Err(LabelRefusal::PartlyLabelled { labelled: 1, n: 3 })
        );
        assert_eq!(
            label_start(&[1.0, 2.0], LabelMode::Fresh),
            Err(LabelRefusal::AlreadyLabelled)
        );
        assert_eq!(label_start(&[1.0, 2.0], LabelMode::Resume), Ok(2));
        assert_eq!(label_start(&[1.0, 2.0], LabelMode::Overwrite), Ok(0));
        assert_eq!(label_start(&[], LabelMode::Fresh), Ok(0));
    }
}
