//! Seeded, deterministic train/test splits. A record's side is a function of its prompt text and
//! the seed alone, so duplicated prompts never straddle the split and adding records does not
//! move the others.

use serde::{Deserialize, Serialize};

use crate::datasets::PromptRecord;

/// A side of the split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
    /// Every record.
    All,
}

/// How records are split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    pub seed: u64,
    /// Share of prompts in the test side, in [0, 1].
    pub test_fraction: f64,
}

impl Default for SplitSpec {
    fn default() -> Self {
        Self {
            seed: 0,
            test_fraction: 0.1,
        }
    }
}

impl SplitSpec {
    /// The side a prompt text falls on.
    pub fn side_of(&self, key: &str) -> Split {
        // Top 53 bits of a seeded hash as a uniform number in [0, 1).
        let u = (stable_hash(self.seed, key.as_bytes()) >> 11) as f64 / (1u64 << 53) as f64;
        if u < self.test_fraction {
            Split::Test
        } else {
            Split::Train
        }
    }

    /// The records on side `split`, in file order.
    pub fn select<'a>(&self, records: &'a [PromptRecord], split: Split) -> Vec<&'a PromptRecord> {
        records
            .iter()
            .filter(|r| split == Split::All || self.side_of(&r.raw) == split)
            .collect()
    }
}

/// FNV-1a, finished with splitmix64 and keyed by `seed`: stable across platforms and releases.
fn stable_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialogue::Dialogue;

    fn records(n: usize) -> Vec<PromptRecord> {
        (0..n)
            .map(|i| PromptRecord {
                index: i,
                raw: format!("prompt number {i}"),
                dialogue: Dialogue::question("q"),
            })
            .collect()
    }

    #[test]
    fn split_is_deterministic_seeded_and_sized() {
        let rs = records(10_000);
        let spec = SplitSpec {
            seed: 1,
            test_fraction: 0.2,
        };
        let test = spec.select(&rs, Split::Test);
        let train = spec.select(&rs, Split::Train);
        assert_eq!(test.len() + train.len(), rs.len());
        assert!(
            (test.len() as f64 / 10_000.0 - 0.2).abs() < 0.02,
            "{}",
            test.len()
        );
        let again: Vec<usize> = spec
            .select(&rs, Split::Test)
            .iter()
            .map(|r| r.index)
            .collect();
        assert_eq!(again, test.iter().map(|r| r.index).collect::<Vec<_>>());
        let other = SplitSpec { seed: 2, ..spec };
        assert_ne!(
            other
                .select(&rs, Split::Test)
                .iter()
                .map(|r| r.index)
                .collect::<Vec<_>>(),
            again
        );
        assert_eq!(spec.select(&rs, Split::All).len(), rs.len());
    }

    #[test]
    fn hash_is_stable() {
        // Pinned values (computed independently in Python): a change here silently moves every
        // user's split.
        assert_eq!(stable_hash(0, b"abc"), 0x0dd4_9049_0804_b508);
        assert_eq!(stable_hash(7, b"prompt"), 0x869c_a15b_4ee9_8bb2);
    }
}
