//! Seeded, disjoint partitions of the training pairs: part K of N ("K/N"). Two reward models
//! trained on different parts of the same pairs never saw each other's pairs, so one can judge
//! what the other was used to optimise (an independent judge).

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::train::PairTexts;

/// Mixed (XOR) into the split seed to seed the partition's shuffle, so that the partition is
/// not a function of the same random stream as anything else seeded with the split seed.
/// The bytes spell "partitio".
pub const PARTITION_SEED_MIX: u64 = 0x7061_7274_6974_696f;

/// Part `k` of `n` (1-based, `1 <= k <= n`) of a seeded partition of the training pairs;
/// written and parsed as "K/N" (also in TOML and JSON: `partition = "1/2"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Partition {
    k: usize,
    n: usize,
}

/// A partition that is not "K/N" with `1 <= K <= N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?}: expected K/N with 1 <= K <= N")]
pub struct PartitionError {
    pub value: String,
}

impl Partition {
    /// Part `k` of `n`; refused unless `1 <= k <= n`.
    pub fn new(k: usize, n: usize) -> Result<Self, PartitionError> {
        if k == 0 || k > n {
            return Err(PartitionError {
                value: format!("{k}/{n}"),
            });
        }
        Ok(Self { k, n })
    }

    /// The part, 1-based.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The number of parts.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Indices in `0..len` of this part, ascending: the indices shuffled with a generator
    /// seeded by `seed ^ PARTITION_SEED_MIX` and dealt round-robin, part K taking the shuffled
    /// positions K-1, K-1+N, K-1+2N, ... The parts 1/N..N/N are disjoint, cover `0..len` and
    /// differ in size by at most one.
    pub fn indices(&self, len: usize, seed: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..len).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed ^ PARTITION_SEED_MIX));
        let mut part: Vec<usize> = order.into_iter().skip(self.k - 1).step_by(self.n).collect();
        part.sort_unstable();
        part
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.k, self.n)
    }
}

impl FromStr for Partition {
    type Err = PartitionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let refused = || PartitionError {
            value: s.to_owned(),
        };
        let (k, n) = s.split_once('/').ok_or_else(refused)?;
        let k = k.trim().parse().map_err(|_| refused())?;
        let n = n.trim().parse().map_err(|_| refused())?;
        Self::new(k, n).map_err(|_| refused())
    }
}

impl TryFrom<String> for Partition {
    type Error = PartitionError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Partition> for String {
    fn from(p: Partition) -> Self {
        p.to_string()
    }
}

/// An order-independent digest of preference pairs: the XOR over pairs of the first 8 bytes of
/// SHA-256(chosen, 0, rejected), as 16 hex digits. The digests of disjoint parts XOR to the
/// digest of their union, so a record of it shows which pairs a model trained on.
pub fn pairs_digest(texts: &PairTexts) -> String {
    let folded = texts
        .chosen
        .iter()
        .zip(&texts.rejected)
        .map(|(c, r)| pair_hash(c, r))
        .fold(0, |acc, h| acc ^ h);
    format!("{folded:016x}")
}

fn pair_hash(chosen: &str, rejected: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(chosen.as_bytes())
        .chain_update([0u8])
        .chain_update(rejected.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_parts(n: usize, len: usize, seed: u64) -> Vec<Vec<usize>> {
        (1..=n)
            .map(|k| Partition::new(k, n).expect("valid").indices(len, seed))
            .collect()
    }

    #[test]
    fn parts_are_disjoint_cover_every_index_and_are_seeded() {
        for (n, len) in [(1, 7), (2, 10), (3, 10), (4, 3), (5, 0)] {
            let parts = all_parts(n, len, 11);
            let mut seen: Vec<usize> = parts.concat();
            seen.sort_unstable();
            assert_eq!(seen, (0..len).collect::<Vec<_>>(), "{n} parts of {len}");
            for part in &parts {
                assert!(part.windows(2).all(|w| w[0] < w[1]), "file order: {part:?}");
                assert!(part.len().abs_diff(len / n) <= 1, "{part:?}");
            }
        }
        assert_eq!(all_parts(2, 10, 11), all_parts(2, 10, 11));
        assert_ne!(all_parts(2, 10, 11), all_parts(2, 10, 12));
        assert_eq!(
            Partition::new(1, 1).expect("valid").indices(5, 3),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn partitions_parse_from_k_slash_n_and_refuse_the_rest() {
        assert_eq!("1/2".parse(), Partition::new(1, 2));
        assert_eq!(
            "2/2".parse::<Partition>().map(|p| (p.k(), p.n())),
            Ok((2, 2))
        );
        for bad in ["0/2", "3/2", "a/b", "2", "1/0", "/", "1/2/3", "-1/2", ""] {
            let err = bad.parse::<Partition>().expect_err(bad);
            assert_eq!(
                err.to_string(),
                format!("{bad:?}: expected K/N with 1 <= K <= N")
            );
        }
        let p = Partition::new(3, 4).expect("valid");
        assert_eq!(p.to_string(), "3/4");
        assert_eq!(serde_json::to_string(&p).expect("json"), "\"3/4\"");
        assert_eq!(serde_json::from_str::<Partition>("\"3/4\"").ok(), Some(p));
        let err = serde_json::from_str::<Partition>("\"0/4\"").expect_err("0/4");
        assert!(
            err.to_string()
                .contains("\"0/4\": expected K/N with 1 <= K <= N"),
            "{err}"
        );
    }

    #[test]
    fn digests_of_disjoint_parts_xor_to_the_whole() {
        let texts = |pairs: &[(&str, &str)]| PairTexts {
            chosen: pairs.iter().map(|p| p.0.to_owned()).collect(),
            rejected: pairs.iter().map(|p| p.1.to_owned()).collect(),
        };
        let (a, b) = (texts(&[("a", "b"), ("c", "d")]), texts(&[("e", "f")]));
        let whole = texts(&[("e", "f"), ("a", "b"), ("c", "d")]);
        let hex = |s: String| u64::from_str_radix(&s, 16).expect("hex");
        assert_eq!(
            hex(pairs_digest(&a)) ^ hex(pairs_digest(&b)),
            hex(pairs_digest(&whole))
        );
        // Chosen and rejected are not interchangeable, nor is the split between them.
        assert_ne!(
            pairs_digest(&texts(&[("a", "b")])),
            pairs_digest(&texts(&[("b", "a")]))
        );
        assert_ne!(
            pairs_digest(&texts(&[("ab", "")])),
            pairs_digest(&texts(&[("a", "b")]))
        );
        assert_eq!(pairs_digest(&PairTexts::default()), "0000000000000000");
    }
}
