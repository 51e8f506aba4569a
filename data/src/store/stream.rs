//! The seeded, bounded-memory stream of training transitions: [`Store::transitions`] reads
//! blocks of whole rollouts a few at a time into a shuffle buffer and hands out
//! [`TransitionBatch`]es.

use ndarray::{s, Array2};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{Result, Store, StoreError, TargetError};

impl Store {
    /// A seeded, shuffling stream of training transitions whose memory is bounded by
    /// `options` (blocks of whole rollouts are read a few at a time), not by the store's size.
    pub fn transitions(&self, options: StreamOptions) -> Result<TransitionStream<'_>> {
        self.transitions_of(options, None)
    }

    /// [`Store::transitions`] of the rollouts `keep` marks (one flag per rollout), e.g. one
    /// side of a train/validation split. Only the marked rollouts' rows are read.
    pub fn transitions_of(
        &self,
        options: StreamOptions,
        keep: Option<Vec<bool>>,
    ) -> Result<TransitionStream<'_>> {
        if let Some(k) = &keep {
            if k.len() != self.len() {
                return Err(StoreError::FilterLength {
                    path: self.path().to_owned(),
                    filter: k.len(),
                    rollouts: self.len(),
                });
            }
        }
        let rewards = self.rewards()?;
        let kept: Vec<usize> = (0..self.len())
            .filter(|&i| keep.as_ref().is_none_or(|k| k[i]))
            .collect();
        // Blocks of consecutive kept rollouts, visited in a seeded order.
        let lengths: Vec<usize> = kept.iter().map(|&i| self.rollout_rows(i).len()).collect();
        let mut blocks = group_blocks(&lengths, options.block_rows);
        let mut rng = StdRng::seed_from_u64(options.seed);
        blocks.shuffle(&mut rng);
        Ok(TransitionStream {
            store: self,
            rewards,
            kept,
            options,
            blocks,
            next_block: 0,
            rng,
            buffer: Vec::new(),
            arena: Vec::new(),
        })
    }

    /// The states of `rollouts` (ascending indices), back to back; runs of consecutive
    /// rollouts are read at once.
    fn read_block(&self, rollouts: &[usize], rewards: &[f32]) -> Result<RolloutBlock> {
        let h = self.meta().hidden_size;
        let total: usize = rollouts.iter().map(|&i| self.rollout_rows(i).len()).sum();
        let mut data = Vec::with_capacity(total * h);
        let mut parts = Vec::with_capacity(rollouts.len());
        let (Some(&first), Some(&last)) = (rollouts.first(), rollouts.last()) else {
            return Ok(RolloutBlock {
                states: Array2::zeros((0, h)),
                rollouts: Vec::new(),
            });
        };
        let span = self.rollout_rows(first).start..self.rollout_rows(last).end;
        if 2 * total >= span.len() {
            // Mostly kept: one read of the span, then the kept rows.
            let all = self.read_states(span.clone())?;
            for &i in rollouts {
                let rows = self.rollout_rows(i);
                let local = rows.start - span.start..rows.end - span.start;
                data.extend(all.slice(s![local, ..]).iter().copied());
            }
        } else {
            // Sparse: one read per run of consecutive rollouts.
            let mut k = 0;
            while k < rollouts.len() {
                let mut end = k + 1;
                while end < rollouts.len() && rollouts[end] == rollouts[end - 1] + 1 {
                    end += 1;
                }
                let rows =
                    self.rollout_rows(rollouts[k]).start..self.rollout_rows(rollouts[end - 1]).end;
                data.extend(self.read_states(rows)?.iter().copied());
                k = end;
            }
        }
        let mut row = 0;
        for &i in rollouts {
            let len = self.rollout_rows(i).len();
            parts.push(BlockRollout {
                index: i,
                rows: row..row + len,
                reward: rewards[i],
            });
            row += len;
        }
        let states = Array2::from_shape_vec((total, h), data).map_err(|e| StoreError::Layout {
            path: self.path().to_owned(),
            message: e.to_string(),
        })?;
        Ok(RolloutBlock {
            states,
            rollouts: parts,
        })
    }
}

/// Settings of [`Store::transitions`].
#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    pub batch_size: usize,
    pub seed: u64,
    /// Rows per block read from disk (blocks hold whole rollouts, so a block may be longer).
    pub block_rows: usize,
    /// Blocks held (and shuffled together) at once.
    pub buffer_blocks: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            batch_size: 512,
            seed: 0,
            block_rows: 1024,
            buffer_blocks: 8,
        }
    }
}

/// Whole rollouts read together: what a per-row target function (e.g. TD(lambda) returns)
/// sees when the rollouts enter the shuffle buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutBlock {
    /// `[rows, hidden]`: the rollouts' states back to back.
    pub states: Array2<f32>,
    pub rollouts: Vec<BlockRollout>,
}

/// One rollout of a [`RolloutBlock`].
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRollout {
    /// Its index in the store.
    pub index: usize,
    /// Its rows in the block's `states`.
    pub rows: std::ops::Range<usize>,
    /// Its reward (NaN if unlabelled).
    pub reward: f32,
}

/// Computes one target per row of a block.
pub type BlockTargets<'f> =
    dyn FnMut(&RolloutBlock) -> std::result::Result<Vec<f32>, TargetError> + 'f;

/// A minibatch of transitions `(s_t, s_{t+1}, terminal, reward)`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionBatch {
    /// `[batch, hidden]`.
    pub state: Array2<f32>,
    /// `[batch, hidden]`; zeros where `is_terminal`.
    pub next_state: Array2<f32>,
    pub is_terminal: Vec<bool>,
    /// Whether the state is its rollout's first (at the last prompt token).
    pub is_first: Vec<bool>,
    /// The rollout's reward (NaN if unlabelled).
    pub reward: Vec<f32>,
    /// The rollout each row belongs to.
    pub rollout: Vec<usize>,
    /// Per-row targets from [`TransitionStream::next_with`] (NaN without a target function).
    pub target: Vec<f32>,
}

/// One transition held in the shuffle buffer.
struct Held {
    /// Offset of the state in the arena; the next state (unless terminal) follows it.
    offset: usize,
    terminal: bool,
    first: bool,
    rollout: usize,
    target: f32,
}

/// Iterator of [`TransitionBatch`]es over one pass of a store.
pub struct TransitionStream<'a> {
    store: &'a Store,
    rewards: Vec<f32>,
    /// The rollouts streamed, ascending.
    kept: Vec<usize>,
    options: StreamOptions,
    /// Ranges of `kept`, in visiting order.
    blocks: Vec<std::ops::Range<usize>>,
    next_block: usize,
    rng: StdRng,
    buffer: Vec<Held>,
    /// States of the rollouts held, back to back (each state followed by its successor).
    arena: Vec<f32>,
}

impl std::fmt::Debug for TransitionStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransitionStream")
            .field("next_block", &self.next_block)
            .finish()
    }
}

impl TransitionStream<'_> {
    /// Reads the next `buffer_blocks` blocks into the (shuffled) buffer, with per-row targets
    /// from `targets` if given.
    fn refill(&mut self, mut targets: Option<&mut BlockTargets<'_>>) -> Result<()> {
        let h = self.store.meta().hidden_size;
        let want = self.options.buffer_blocks.max(1) * self.options.block_rows.max(1);
        // Compact what is left: each held state and its successor, back to back.
        let mut arena = Vec::with_capacity((self.buffer.len() * 2 + want) * h);
        for held in &mut self.buffer {
            let offset = arena.len();
            let len = if held.terminal { h } else { 2 * h };
            arena.extend_from_slice(&self.arena[held.offset..held.offset + len]);
            held.offset = offset;
        }
        while self.next_block < self.blocks.len() && self.buffer.len() < want {
            let ids = &self.kept[self.blocks[self.next_block].clone()];
            self.next_block += 1;
            let block = self.store.read_block(ids, &self.rewards)?;
            let rows = block.states.nrows();
            let row_targets = match targets.as_deref_mut() {
                Some(f) => {
                    let t = f(&block).map_err(|error| StoreError::Targets {
                        path: self.store.path().to_owned(),
                        error,
                    })?;
                    if t.len() != rows {
                        return Err(StoreError::TargetCount {
                            path: self.store.path().to_owned(),
                            targets: t.len(),
                            rows,
                        });
                    }
                    Some(t)
                }
                None => None,
            };
            let base = arena.len();
            arena.extend(block.states.iter().copied());
            for r in &block.rollouts {
                for row in r.rows.clone() {
                    self.buffer.push(Held {
                        offset: base + row * h,
                        terminal: row + 1 == r.rows.end,
                        first: row == r.rows.start,
                        rollout: r.index,
                        target: row_targets.as_ref().map_or(f32::NAN, |t| t[row]),
                    });
                }
            }
        }
        self.arena = arena;
        self.buffer.shuffle(&mut self.rng);
        Ok(())
    }

    /// The next minibatch; rollouts read into the buffer get per-row targets from `targets`
    /// (e.g. TD(lambda) returns computed with the current value net).
    pub fn next_with(
        &mut self,
        targets: Option<&mut BlockTargets<'_>>,
    ) -> Option<Result<TransitionBatch>> {
        if self.buffer.len() < self.options.batch_size {
            if let Err(e) = self.refill(targets) {
                return Some(Err(e));
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let n = self.options.batch_size.max(1).min(self.buffer.len());
        let h = self.store.meta().hidden_size;
        let mut state = Array2::<f32>::zeros((n, h));
        let mut next_state = Array2::<f32>::zeros((n, h));
        let mut is_terminal = Vec::with_capacity(n);
        let mut is_first = Vec::with_capacity(n);
        let mut reward = Vec::with_capacity(n);
        let mut rollout = Vec::with_capacity(n);
        let mut target = Vec::with_capacity(n);
        let from = self.buffer.len() - n;
        for (i, t) in self.buffer.drain(from..).enumerate() {
            if let Some(dst) = state.row_mut(i).as_slice_mut() {
                dst.copy_from_slice(&self.arena[t.offset..t.offset + h]);
            }
            if !t.terminal {
                if let Some(dst) = next_state.row_mut(i).as_slice_mut() {
                    dst.copy_from_slice(&self.arena[t.offset + h..t.offset + 2 * h]);
                }
            }
            is_terminal.push(t.terminal);
            is_first.push(t.first);
            reward.push(self.rewards[t.rollout]);
            rollout.push(t.rollout);
            target.push(t.target);
        }
        Some(Ok(TransitionBatch {
            state,
            next_state,
            is_terminal,
            is_first,
            reward,
            rollout,
            target,
        }))
    }
}

impl Iterator for TransitionStream<'_> {
    type Item = Result<TransitionBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_with(None)
    }
}

/// Groups consecutive rollouts (of `lengths` rows each) into blocks: a block closes once it
/// holds at least `block_rows` rows (so a long rollout ends the block it joins), and the last
/// block holds what is left. Returns ranges of rollout positions.
fn group_blocks(lengths: &[usize], block_rows: usize) -> Vec<std::ops::Range<usize>> {
    let block_rows = block_rows.max(1);
    let mut blocks = Vec::new();
    let (mut begin, mut rows) = (0, 0);
    for (k, &len) in lengths.iter().enumerate() {
        rows += len;
        if rows >= block_rows || k + 1 == lengths.len() {
            blocks.push(begin..k + 1);
            (begin, rows) = (k + 1, 0);
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{rollouts, write};
    use crate::store::StateDtype;

    #[test]
    fn transition_stream_covers_every_state_once_with_correct_successors() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        let rs = rollouts(23);
        write(&path, StateDtype::F32, &rs)?;
        let st = Store::open(&path)?;
        let options = StreamOptions {
            batch_size: 5,
            seed: 9,
            block_rows: 4,
            buffer_blocks: 2,
        };
        let mut seen = Vec::new();
        let mut first_pass = Vec::new();
        for batch in st.transitions(options)? {
            let b = batch?;
            assert!(b.state.nrows() <= 5);
            for k in 0..b.state.nrows() {
                let (i, t) = (b.state[[k, 0]] as usize, b.state[[k, 1]] as usize);
                assert_eq!(b.rollout[k], i);
                let len = rs[i].tokens.len();
                assert_eq!(b.is_terminal[k], t + 1 == len, "rollout {i} step {t}");
                assert_eq!(b.reward[k], rs[i].reward);
                assert_eq!(b.is_first[k], t == 0);
                assert!(b.target[k].is_nan());
                if t + 1 < len {
                    assert_eq!(
                        b.next_state.row(k).to_vec(),
                        vec![i as f32, (t + 1) as f32, (i + t + 1) as f32]
                    );
                } else {
                    assert!(b.next_state.row(k).iter().all(|&v| v == 0.0));
                }
                seen.push((i, t));
                first_pass.push((i, t));
            }
        }
        seen.sort_unstable();
        let all: Vec<(usize, usize)> = rs
            .iter()
            .enumerate()
            .flat_map(|(i, r)| (0..r.tokens.len()).map(move |t| (i, t)))
            .collect();
        assert_eq!(seen, all, "every state exactly once");
        // Seeded: the same order again; another seed, another order.
        let again: Vec<(usize, usize)> = st
            .transitions(options)?
            .flat_map(|b| {
                let b = b.expect("batch");
                (0..b.state.nrows())
                    .map(move |k| (b.state[[k, 0]] as usize, b.state[[k, 1]] as usize))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(again, first_pass);
        let other: Vec<usize> = st
            .transitions(StreamOptions {
                seed: 10,
                ..options
            })?
            .flat_map(|b| b.expect("batch").rollout)
            .collect();
        assert_ne!(other, first_pass.iter().map(|p| p.0).collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn filtered_streams_keep_only_the_marked_rollouts() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        let rs = rollouts(12);
        write(&path, StateDtype::F32, &rs)?;
        let st = Store::open(&path)?;
        let keep: Vec<bool> = (0..12).map(|i| i % 3 == 0).collect();
        let options = StreamOptions {
            batch_size: 4,
            seed: 1,
            block_rows: 3,
            buffer_blocks: 2,
        };
        let mut seen: Vec<usize> = Vec::new();
        for b in st.transitions_of(options, Some(keep.clone()))? {
            seen.extend(b?.rollout);
        }
        let want: usize = (0..12)
            .filter(|i| i % 3 == 0)
            .map(|i| rs[i].tokens.len())
            .sum();
        assert_eq!(seen.len(), want);
        assert!(seen.iter().all(|&r| keep[r]));
        assert!(st.transitions_of(options, Some(vec![true; 3])).is_err());
        Ok(())
    }

    /// A target function sees whole rollouts (every row of a rollout in one block, in order)
    /// and its targets come back with their rows.
    #[test]
    fn block_targets_see_whole_rollouts_and_follow_their_rows() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.h5");
        let rs = rollouts(17);
        write(&path, StateDtype::F32, &rs)?;
        let st = Store::open(&path)?;
        let options = StreamOptions {
            batch_size: 3,
            seed: 4,
            block_rows: 5,
            buffer_blocks: 2,
        };
        let mut calls = 0;
        let mut target = |block: &RolloutBlock| -> std::result::Result<Vec<f32>, TargetError> {
            calls += 1;
            let mut out = vec![f32::NAN; block.states.nrows()];
            for r in &block.rollouts {
                assert_eq!(r.reward, rs[r.index].reward);
                assert_eq!(r.rows.len(), rs[r.index].tokens.len(), "whole rollout");
                for (t, row) in r.rows.clone().enumerate() {
                    assert_eq!(block.states[[row, 0]] as usize, r.index);
                    assert_eq!(block.states[[row, 1]] as usize, t);
                    // Remaining steps to the end: known only with the whole rollout.
                    out[row] = (r.rows.end - row) as f32;
                }
            }
            Ok(out)
        };
        let mut stream = st.transitions(options)?;
        let mut n = 0;
        while let Some(b) = stream.next_with(Some(&mut target)) {
            let b = b?;
            for k in 0..b.state.nrows() {
                let (i, t) = (b.state[[k, 0]] as usize, b.state[[k, 1]] as usize);
                assert_eq!(b.target[k], (rs[i].tokens.len() - t) as f32);
                assert_eq!(b.is_first[k], t == 0);
                n += 1;
            }
        }
        assert_eq!(n, st.num_states());
        assert!(calls > 1);
        let mut refuse =
            |_: &RolloutBlock| -> std::result::Result<Vec<f32>, TargetError> { Err("no".into()) };
        let err = st
            .transitions(options)?
            .next_with(Some(&mut refuse))
            .expect("an item")
            .expect_err("refused");
        assert!(err.to_string().ends_with(": no"), "{err}");
        Ok(())
    }

    #[test]
    fn blocks_close_once_they_hold_block_rows() {
        // Rows 2 3 | 1 1 4 | 5 | 1 (the rest).
        assert_eq!(
            group_blocks(&[2, 3, 1, 1, 4, 5, 1], 5),
            vec![0..2, 2..5, 5..6, 6..7]
        );
        // A block size of 0 counts as 1: each rollout a block.
        assert_eq!(group_blocks(&[3, 1], 0), vec![0..1, 1..2]);
        assert_eq!(group_blocks(&[1, 1], 10), vec![0..2]);
        assert!(group_blocks(&[], 4).is_empty());
    }
}
