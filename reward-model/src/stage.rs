//! The reward stages as library calls: preparing preference pairs (the seeded train/held-out
//! split, the texts a reward scores), training a Bradley-Terry reward model on them, and
//! labelling a rollout store with a reward (resumable).

use recontrol_data::{render_prompt, PreferencePair, PromptFormat, Split, SplitSpec, Store};
use recontrol_lm::LanguageModel;
use serde::{Deserialize, Serialize};
use tch::Tensor;

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

/// Splits `pairs` by their prompt with `split` (the same split as every other stage) and
/// renders the texts a reward scores; both sides must keep some pairs.
pub fn prepare_pairs(pairs: &[PreferencePair], split: &SplitSpec) -> Result<PreparedPairs> {
    let mut prepared = PreparedPairs::default();
    for pair in pairs {
        if pair.chosen.is_empty() || pair.rejected.is_empty() {
            prepared.skipped_empty += 1;
            continue;
        }
        let prompt = render_prompt(PromptFormat::Raw, &pair.prompt, None, None)?;
        let (side, replies) = if split.side_of(&pair.prompt.raw) == Split::Test {
            (&mut prepared.heldout, &mut prepared.heldout_replies)
        } else {
            (&mut prepared.train, &mut prepared.train_replies)
        };
        side.chosen
            .push(scored_text(&prompt, &format!(" {}", pair.chosen)));
        side.rejected
            .push(scored_text(&prompt, &format!(" {}", pair.rejected)));
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
    pub seed: u64,
    /// Also train the top K decoder layers and the final norm (0: the head alone, on cached
    /// features of the frozen backbone).
    pub unfreeze_top_k: usize,
    /// Texts run through the backbone together when computing features.
    pub feature_batch_size: usize,
    /// Seed of the train/held-out split of the pairs.
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
            seed: 0,
            unfreeze_top_k: 0,
            feature_batch_size: 16,
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
    pub train_pairs: usize,
    pub heldout_pairs: usize,
    pub skipped_empty: usize,
    pub history: Vec<EpochMetrics>,
    pub heldout_accuracy: f64,
    pub length_baseline_accuracy: f64,
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
/// backbone `lm` with the prepared pairs. `on_epoch` sees each epoch's metrics.
pub fn train_reward(
    lm: &LanguageModel,
    pairs: &PreparedPairs,
    settings: &RewardSettings,
    control: RunControl<'_>,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<RewardOutcome> {
    let config = settings.config();
    let trained = if settings.unfreeze_top_k == 0 {
        eprintln!(
            "features of {} training and {} held-out pairs",
            pairs.train.chosen.len(),
            pairs.heldout.chosen.len()
        );
        let train_features = pair_features(lm, &pairs.train, settings.feature_batch_size)?;
        let heldout_features = pair_features(lm, &pairs.heldout, settings.feature_batch_size)?;
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
            train_pairs: pairs.train.chosen.len(),
            heldout_pairs: pairs.heldout.chosen.len(),
            skipped_empty: pairs.skipped_empty,
            history: trained.history,
            heldout_accuracy,
            length_baseline_accuracy: baseline,
        },
    })
}

/// How labelling treats rewards already in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelMode {
    /// Label an unlabelled store; a (partly) labelled one is refused.
    Fresh,
    /// Finish a partly labelled store (an interrupted run) from its first unlabelled rollout.
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
            label_start(&[1.0, 2.0], LabelMode::Resume),
            Err(LabelRefusal::AlreadyLabelled)
        );
        assert_eq!(label_start(&[1.0, 2.0], LabelMode::Overwrite), Ok(0));
        assert_eq!(label_start(&[], LabelMode::Fresh), Ok(0));
    }
}
