//! The evaluation formulas, one pure function each (definitions in the RE-Control paper's
//! evaluation): repetition and diversity over whitespace word tokens, and seeded percentile
//! bootstrap intervals for a mean and for a paired difference of means, and win rates.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `rep_n = 100 * (1 - |unique n-grams| / (|n-grams| + 1))` over the whitespace-separated words
/// of `text`.
pub fn rep_n(text: &str, n: usize) -> f64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    if n == 0 || words.len() < n {
        return 100.0; // no n-grams: 100 * (1 - 0 / (0 + 1))
    }
    let grams: Vec<&[&str]> = words.windows(n).collect();
    let unique: std::collections::HashSet<&[&str]> = grams.iter().copied().collect();
    100.0 * (1.0 - unique.len() as f64 / (grams.len() as f64 + 1.0))
}

/// `diversity = prod over n = 2, 3, 4 of (1 - rep_n / 100)` of one text.
pub fn diversity(text: &str) -> f64 {
    (2..=4).map(|n| 1.0 - rep_n(text, n) / 100.0).product()
}

/// Share of pairs in which `a` beats `b`, ties counting half (0 for no pairs): a method's win
/// rate against another on the same prompts, and a reward model's pair accuracy (chosen
/// against rejected). A NaN on either side counts as a loss for `a`.
pub fn win_rate<T: PartialOrd>(a: &[T], b: &[T]) -> f64 {
    let wins: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| match x.partial_cmp(y) {
            Some(std::cmp::Ordering::Greater) => 1.0,
            Some(std::cmp::Ordering::Equal) => 0.5,
            _ => 0.0,
        })
        .sum();
    wins / a.len().max(1) as f64
}

/// The 95% percentile bootstrap interval of the mean of `values` (`resamples` draws, seeded).
pub fn bootstrap_mean_ci(values: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    bootstrap(values.len(), resamples, seed, |idx| {
        idx.iter().map(|&i| values[i]).sum::<f64>() / idx.len() as f64
    })
}

/// The 95% percentile bootstrap interval of `mean(a) - mean(b)` for paired samples (the same
/// prompts resampled for both).
pub fn bootstrap_paired_diff_ci(a: &[f64], b: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "paired samples");
    bootstrap(a.len(), resamples, seed, |idx| {
        idx.iter().map(|&i| a[i] - b[i]).sum::<f64>() / idx.len() as f64
    })
}

fn bootstrap(n: usize, resamples: usize, seed: u64, stat: impl Fn(&[usize]) -> f64) -> (f64, f64) {
    if n == 0 || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut idx = vec![0usize; n];
    let mut stats: Vec<f64> = (0..resamples)
        .map(|_| {
            for i in &mut idx {
                *i = rng.random_range(0..n);
            }
            stat(&idx)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    let at = |q: f64| stats[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    (at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_and_diversity_by_hand() {
        // "a b a b a": bigrams ab ba ab ba -> 2 unique of 4: 100 * (1 - 2/5) = 60.
        assert!((rep_n("a b a b a", 2) - 60.0).abs() < 1e-12);
        // trigrams aba bab aba -> 2 unique of 3: 100 * (1 - 2/4) = 50.
        assert!((rep_n("a b a b a", 3) - 50.0).abs() < 1e-12);
        // 4-grams abab baba -> 2 of 2: 100 * (1 - 2/3).
        assert!((rep_n("a b a b a", 4) - 100.0 / 3.0).abs() < 1e-12);
        let d = (1.0 - 0.6) * (1.0 - 0.5) * (1.0 - 1.0 / 3.0);
        assert!((diversity("a b a b a") - d).abs() < 1e-12);
        // No repetition: n-grams all unique, only the +1 in the denominator.
        assert!((rep_n("one two three four", 2) - 25.0).abs() < 1e-12);
        // Too short for any n-gram.
        assert!((rep_n("one", 2) - 100.0).abs() < 1e-12);
        assert!(diversity("") == 0.0);
    }

    #[test]
    fn win_rates_count_ties_half_and_nan_as_a_loss() {
        assert_eq!(win_rate(&[3.0, 1.0, 2.0, 0.0], &[1.0, 2.0, 2.0, 0.0]), 0.5);
        assert_eq!(win_rate(&[2.0f32, f32::NAN], &[1.0, 0.0]), 0.5);
        assert_eq!(win_rate(&[1, 2, 3], &[0, 0, 0]), 1.0);
        assert_eq!(win_rate::<f64>(&[], &[]), 0.0);
    }

    #[test]
    fn bootstrap_intervals_cover_the_mean_and_are_seeded() {
        let values: Vec<f64> = (0..200).map(|i| f64::from(i % 10)).collect();
        let (lo, hi) = bootstrap_mean_ci(&values, 2000, 1);
        assert!(lo < 4.5 && 4.5 < hi && hi - lo < 1.0, "({lo}, {hi})");
        assert_eq!(bootstrap_mean_ci(&values, 2000, 1), (lo, hi));
        let shifted: Vec<f64> = values.iter().map(|v| v + 1.0).collect();
        let (dlo, dhi) = bootstrap_paired_diff_ci(&shifted, &values, 500, 2);
        assert!((dlo - 1.0).abs() < 1e-12 && (dhi - 1.0).abs() < 1e-12);
        assert!(bootstrap_mean_ci(&[], 10, 0).0.is_nan());
    }
}
