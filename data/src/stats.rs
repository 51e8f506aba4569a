//! Counts and length percentiles of a dataset (`recontrol data stats`).

use serde::Serialize;

use crate::datasets::{Dataset, ReadReport};

/// Percentiles of a length distribution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: usize,
    pub p90: usize,
    pub p99: usize,
    pub max: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (empty gives zeros).
    pub fn of(mut values: Vec<usize>) -> Self {
        values.sort_unstable();
        let at = |q: f64| -> usize {
            if values.is_empty() {
                return 0;
            }
            let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
            values[rank - 1]
        };
        Self {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: values.last().copied().unwrap_or(0),
        }
    }
}

/// What `recontrol data stats` prints.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetStats {
    pub kind: String,
    pub report: ReadReport,
    pub prompts: usize,
    pub pairs: Option<usize>,
    pub prompt_turns: Percentiles,
    pub prompt_words: Percentiles,
    pub chosen_words: Option<Percentiles>,
    pub rejected_words: Option<Percentiles>,
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

impl DatasetStats {
    /// Statistics of a dataset read into memory.
    pub fn of(d: &Dataset) -> Self {
        let pairs = d.pairs.as_ref();
        Self {
            kind: format!("{:?}", d.kind),
            report: d.report.clone(),
            prompts: d.prompts.len(),
            pairs: pairs.map(Vec::len),
            prompt_turns: Percentiles::of(
                d.prompts.iter().map(|p| p.dialogue.turns.len()).collect(),
            ),
            prompt_words: Percentiles::of(
                d.prompts
                    .iter()
                    .map(|p| p.dialogue.turns.iter().map(|t| words(&t.text)).sum())
                    .collect(),
            ),
            chosen_words: pairs
                .map(|ps| Percentiles::of(ps.iter().map(|p| words(&p.chosen)).collect())),
            rejected_words: pairs
                .map(|ps| Percentiles::of(ps.iter().map(|p| words(&p.rejected)).collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).collect());
        assert_eq!(
            p,
            Percentiles {
                p50: 50,
                p90: 90,
                p99: 99,
                max: 100
            }
        );
        assert_eq!(Percentiles::of(vec![7]).p50, 7);
        assert_eq!(Percentiles::of(vec![]).max, 0);
    }
}
