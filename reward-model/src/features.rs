//! Last-token features of many texts, computing a long shared beginning once.
//!
//! Reward models score many texts that begin alike: the chosen and rejected replies of one
//! dialogue, every method's reply to one evaluation prompt, best-of-N's samples. The texts are
//! tokenised, identical ones are computed once, and texts whose token ids share a long prefix
//! form a group: the prefix runs through the backbone once and each text's remaining tokens
//! continue from a copy of its keys and values. The result equals the one-pass features up to
//! float rounding (the same positions, the same causal attention). With a LongRoPE backbone,
//! whose long factors apply to a whole pass once one position is past its pretraining length,
//! texts on either side of that length run apart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use recontrol_lm::config::RopeScaling;
use recontrol_lm::{LanguageModel, Positions, StepInput};
use tch::{Kind, Tensor};

use crate::model::{encode_ids, text_ids};
use crate::{Error, Result};

/// Texts share a prefix only when it is at least this many tokens long (shorter ones cost more
/// in bookkeeping than they save).
pub const MIN_SHARED_PREFIX: usize = 16;

/// Texts that share `prefix` tokens (`members` index the unique texts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixGroup {
    pub members: Vec<usize>,
    pub prefix: usize,
}

fn common_prefix(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Groups distinct token sequences by shared prefix. Sequences are visited in lexicographic
/// order, so a run's shared prefix is that of its first and last member; a sequence joins the
/// run while the run keeps at least [`MIN_SHARED_PREFIX`] tokens, three quarters of what it
/// shared before, and half of the longer of the run's first sequence and the new one (a
/// dialogue's replies stay together; texts that share only a system message stay apart, since
/// batching them by length saves more than their short common beginning). Every group of two
/// or more keeps at least one token of each member outside the prefix; single sequences come
/// back as groups of one with prefix 0.
pub fn prefix_groups(ids: &[Vec<i64>]) -> Vec<PrefixGroup> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by(|&a, &b| ids[a].cmp(&ids[b]));
    let mut groups: Vec<PrefixGroup> = Vec::new();
    let mut current: Option<(Vec<usize>, usize)> = None;
    let close = |members: Vec<usize>, shared: usize, groups: &mut Vec<PrefixGroup>| {
        let prefix = if members.len() < 2 {
            0
        } else {
            let shortest = members.iter().map(|&m| ids[m].len()).min().unwrap_or(0);
            shared.min(shortest.saturating_sub(1))
        };
        groups.push(PrefixGroup { members, prefix });
    };
    for &i in &order {
        current = match current.take() {
            None => Some((vec![i], usize::MAX)),
            Some((mut members, shared)) => {
                let with = common_prefix(&ids[members[0]], &ids[i]);
                let keeps = shared == usize::MAX || with.saturating_mul(4) >= shared * 3;
                let most = 2 * with >= ids[members[0]].len().max(ids[i].len());
                if with >= MIN_SHARED_PREFIX && keeps && most {
                    members.push(i);
                    Some((members, with.min(shared)))
                } else {
                    close(members, shared, &mut groups);
                    Some((vec![i], usize::MAX))
                }
            }
        };
    }
    if let Some((members, shared)) = current {
        close(members, shared, &mut groups);
    }
    groups
}

/// Features already computed on one backbone, by token ids: reward models that share a frozen
/// backbone (a policy reward model and a judge with different heads) compute a text once.
/// Cloning shares the memo. It keeps at most `capacity_bytes` of features and then stops
/// adding.
#[derive(Debug, Clone)]
pub struct FeatureMemo {
    inner: Arc<Mutex<MemoEntries>>,
}

#[derive(Debug, Default)]
struct MemoEntries {
    rows: HashMap<Vec<i64>, Tensor>,
    bytes: usize,
    capacity_bytes: usize,
}

impl FeatureMemo {
    /// Room for 1 GiB of features (half a million texts of a 576-wide model, 65k of a 4096-wide
    /// one).
    pub const DEFAULT_CAPACITY_BYTES: usize = 1 << 30;

    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(MemoEntries {
                capacity_bytes,
                ..MemoEntries::default()
            })),
        }
    }

    /// How many texts' features it holds.
    pub fn len(&self) -> usize {
        self.entries().rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, MemoEntries> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, ids: &[i64]) -> Option<Tensor> {
        self.entries().rows.get(ids).map(Tensor::shallow_clone)
    }

    fn insert(&self, ids: &[i64], row: &Tensor) {
        let mut entries = self.entries();
        let bytes = row.numel() * 4 + ids.len() * 8;
        if entries.bytes + bytes <= entries.capacity_bytes {
            entries.bytes += bytes;
            entries.rows.insert(ids.to_vec(), row.shallow_clone());
        }
    }
}

/// Last-token post-norm hidden states `[n, hidden]` (float32, host) of `texts`, in the order
/// of `texts`. At most `batch_size` texts run through the backbone together.
pub fn features(lm: &LanguageModel, texts: &[String], batch_size: usize) -> Result<Tensor> {
    features_with(lm, texts, batch_size, None)
}

/// [`features`], reading and filling `memo` (which must hold features of this backbone only).
pub fn features_with(
    lm: &LanguageModel,
    texts: &[String],
    batch_size: usize,
    memo: Option<&FeatureMemo>,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    if texts.is_empty() {
        let hidden = lm.model.config().hidden_size as i64;
        return Ok(Tensor::f_zeros(
            [0, hidden],
            (Kind::Float, tch::Device::Cpu),
        )?);
    }
    let ids: Vec<Vec<i64>> = texts
        .iter()
        .map(|t| text_ids(lm, t))
        .collect::<Result<_>>()?;
    if let Some(index) = ids.iter().position(Vec::is_empty) {
        return Err(Error::EmptyText { index });
    }
    // Identical texts are computed once.
    let mut unique: Vec<Vec<i64>> = Vec::new();
    let mut seen: HashMap<&[i64], usize> = HashMap::new();
    let slot: Vec<usize> = ids
        .iter()
        .map(|row| {
            *seen.entry(row.as_slice()).or_insert_with(|| {
                unique.push(row.clone());
                unique.len() - 1
            })
        })
        .collect();
    let mut rows: Vec<Option<Tensor>> = unique
        .iter()
        .map(|ids| memo.and_then(|m| m.get(ids)))
        .collect();
    let missing: Vec<usize> = (0..unique.len()).filter(|&i| rows[i].is_none()).collect();
    // LongRoPE (Phi-3) takes its long factors for a whole pass once one row reaches past the
    // pretraining length: texts on either side of it run apart, each getting the factors it
    // gets alone.
    let long_after = match &lm.model.config().rope.scaling {
        RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } => Some(*original_max_position_embeddings),
        _ => None,
    };
    let (long, short): (Vec<usize>, Vec<usize>) = missing
        .iter()
        .partition(|&&i| long_after.is_some_and(|n| unique[i].len() > n));
    for part in [short, long] {
        compute_features(lm, &unique, &part, batch_size, &mut rows)?;
    }
    if let Some(memo) = memo {
        for &i in &missing {
            if let Some(row) = &rows[i] {
                memo.insert(&unique[i], row);
            }
        }
    }
    let rows: Vec<Tensor> = slot
        .iter()
        .map(|&s| {
            rows[s]
                .as_ref()
                .map(Tensor::shallow_clone)
                .ok_or(Error::EmptyBatch)
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::f_stack(&rows, 0)?)
}

/// Computes the features of the unique texts `missing` into `rows`: groups of one in
/// left-padded batches of similar length, groups that share a prefix through
/// [`continue_prefixes`].
fn compute_features(
    lm: &LanguageModel,
    unique: &[Vec<i64>],
    missing: &[usize],
    batch_size: usize,
    rows: &mut [Option<Tensor>],
) -> Result<()> {
    let groups: Vec<PrefixGroup> = {
        let ids: Vec<Vec<i64>> = missing.iter().map(|&i| unique[i].clone()).collect();
        prefix_groups(&ids)
            .into_iter()
            .map(|g| PrefixGroup {
                members: g.members.iter().map(|&m| missing[m]).collect(),
                prefix: g.prefix,
            })
            .collect()
    };
    let batch_size = batch_size.max(1);
    // Groups of one: batches of similar length, left-padded.
    let mut singles: Vec<usize> = groups
        .iter()
        .filter(|g| g.members.len() == 1)
        .map(|g| g.members[0])
        .collect();
    singles.sort_by_key(|&i| unique[i].len());
    for chunk in singles.chunks(batch_size) {
        let batch = encode_ids(lm, chunk.iter().map(|&i| unique[i].clone()).collect())?;
        let mut cache = lm.model.new_cache(batch.input_ids.size()[1] as usize);
        let hidden = lm
            .model
            .forward_hidden(&batch.input(), &mut cache, Positions::Last)?
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)?;
        for (at, &i) in chunk.iter().enumerate() {
            rows[i] = Some(hidden.f_get(at as i64)?);
        }
    }
    // Groups of several: at most `batch_size` groups at a time, prefixes of similar length
    // together.
    let mut shared: Vec<PrefixGroup> = groups
        .into_iter()
        .filter(|g| g.members.len() > 1)
        .flat_map(|g| {
            g.members
                .chunks(batch_size)
                .map(|m| PrefixGroup {
                    members: m.to_vec(),
                    prefix: g.prefix,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    shared.sort_by_key(|g| g.prefix);
    for chunk in shared.chunks(batch_size) {
        for (i, row) in continue_prefixes(lm, unique, chunk, batch_size)? {
            rows[i] = Some(row);
        }
    }
    Ok(())
}

/// Features of the members of `groups`, each group sharing its first `prefix` tokens: the
/// groups' prefixes in one left-padded batch, then the members' rests, sorted by length, in
/// right-padded batches of at most `batch_size` after copies of their groups' cache rows (a
/// real token never sees the padding after it). Returns `(index into ids, features)` pairs.
fn continue_prefixes(
    lm: &LanguageModel,
    ids: &[Vec<i64>],
    groups: &[PrefixGroup],
    batch_size: usize,
) -> Result<Vec<(usize, Tensor)>> {
    let device = lm.model.device();
    let heads: Vec<Vec<i64>> = groups
        .iter()
        .map(|g| ids[g.members[0]][..g.prefix].to_vec())
        .collect();
    let head = encode_ids(lm, heads)?;
    let mut members: Vec<(usize, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, group)| group.members.iter().map(move |&m| (g, m)))
        .collect();
    let rest = |&(g, m): &(usize, usize)| &ids[m][groups[g].prefix..];
    members.sort_by_key(|member| rest(member).len());
    let longest = members.last().map_or(0, |m| rest(m).len());
    let mut cache = lm
        .model
        .new_cache(head.input_ids.size()[1] as usize + longest);
    // Only the keys and values it leaves in the cache are needed.
    let _ = lm
        .model
        .forward_hidden(&head.input(), &mut cache, Positions::Last)?;
    let mut out = Vec::with_capacity(members.len());
    for batch in members.chunks(batch_size.max(1)) {
        let of_group =
            Tensor::from_slice(&batch.iter().map(|&(g, _)| g as i64).collect::<Vec<_>>())
                .f_to_device(device)?;
        let mut rows = cache.select_rows(&of_group)?;
        let width = batch.iter().map(|m| rest(m).len()).max().unwrap_or(0);
        let (n, w) = (batch.len() as i64, width as i64);
        let (mut flat, mut mask, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        for member in batch {
            let tokens = rest(member);
            let pad = width - tokens.len();
            flat.extend(
                tokens
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(lm.pad_token_id, pad)),
            );
            mask.extend(
                std::iter::repeat_n(true, tokens.len()).chain(std::iter::repeat_n(false, pad)),
            );
            // Padding repeats the last real position: a pass's largest position is a real
            // one (LongRoPE picks its factors on it).
            let from = groups[member.0].prefix as i64;
            let last = from + tokens.len() as i64 - 1;
            positions.extend((from..=last).chain(std::iter::repeat_n(last, pad)));
        }
        let input_ids = Tensor::from_slice(&flat)
            .f_view([n, w])?
            .f_to_device(device)?;
        let position_ids = Tensor::from_slice(&positions)
            .f_view([n, w])?
            .f_to_device(device)?;
        let key_mask = Tensor::f_cat(
            &[
                head.key_mask.f_index_select(0, &of_group)?,
                Tensor::from_slice(&mask)
                    .f_view([n, w])?
                    .f_to_device(device)?,
            ],
            1,
        )?;
        let hidden = lm.model.forward_hidden(
            &StepInput {
                input_ids: &input_ids,
                position_ids: &position_ids,
                key_mask: Some(&key_mask),
            },
            &mut rows,
            Positions::All,
        )?;
        let last: Vec<i64> = batch.iter().map(|m| rest(m).len() as i64 - 1).collect();
        let index = Tensor::from_slice(&last)
            .f_to_device(device)?
            .f_view([n, 1, 1])?
            .f_expand([n, 1, hidden.size()[2]], false)?;
        let picked = hidden
            .f_gather(1, &index, false)?
            .f_squeeze_dim(1)?
            .f_to_kind(Kind::Float)?
            .f_to_device(tch::Device::Cpu)?;
        for (r, &(_, m)) in batch.iter().enumerate() {
            out.push((m, picked.f_get(r as i64)?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(start: i64, len: usize) -> Vec<i64> {
        (start..start + len as i64).collect()
    }

    fn with(prefix: &[i64], rest: &[i64]) -> Vec<i64> {
        prefix.iter().chain(rest).copied().collect()
    }

    #[test]
    fn replies_to_one_dialogue_share_it_and_other_dialogues_do_not() {
        let system = seq(1000, 20); // shared by every text, like a chat template's system message
        let a = with(&system, &seq(0, 100));
        let b = with(&system, &seq(500, 100));
        let ids = vec![
            with(&a, &[7, 8, 9]),
            with(&b, &[1]),
            with(&a, &[5]),
            with(&b, &[2, 3]),
            seq(9000, 30), // shares nothing
        ];
        let mut groups = prefix_groups(&ids);
        for g in &mut groups {
            g.members.sort_unstable();
        }
        groups.sort_by_key(|g| g.members[0]);
        assert_eq!(
            groups,
            vec![
                PrefixGroup {
                    members: vec![0, 2],
                    prefix: 120
                },
                PrefixGroup {
                    members: vec![1, 3],
                    prefix: 120
                },
                PrefixGroup {
                    members: vec![4],
                    prefix: 0
                },
            ]
        );
    }

    #[test]
    fn a_text_that_begins_another_keeps_its_last_token_outside_the_prefix() {
        let long = seq(0, 40);
        let ids = vec![long[..30].to_vec(), long.clone()];
        let groups = prefix_groups(&ids);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].prefix, 29);
    }

    #[test]
    fn texts_that_share_only_a_system_message_stay_apart() {
        let system = seq(1000, 24);
        let ids: Vec<Vec<i64>> = (0..4).map(|i| with(&system, &seq(100 * i, 80))).collect();
        assert!(prefix_groups(&ids).iter().all(|g| g.members.len() == 1));
    }

    #[test]
    fn short_common_beginnings_are_not_shared() {
        let ids = vec![
            with(&seq(0, MIN_SHARED_PREFIX - 1), &[100, 101]),
            with(&seq(0, MIN_SHARED_PREFIX - 1), &[200, 201]),
        ];
        assert!(prefix_groups(&ids).iter().all(|g| g.members.len() == 1));
    }
}
