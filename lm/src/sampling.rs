//! Next-token choice: greedy, or seeded sampling with temperature, top-k and top-p applied in
//! transformers' order. Sampling runs on host memory with a seeded RNG, so the same seed gives
//! the same tokens on every device and thread count.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The highest logit (the first one on ties, as `argmax`).
    Greedy,
    /// A draw from the softmax of `logits / temperature`, restricted to the `top_k` most likely
    /// tokens and then to the smallest set whose probability reaches `top_p`.
    Sample {
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
    },
}

impl Sampling {
    /// Greedy for temperature 0, sampling otherwise; checks the ranges.
    pub fn new(
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
    ) -> Result<Self> {
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(Error::InvalidGeneration(format!(
                "temperature must be a finite number >= 0, got {temperature}"
            )));
        }
        if top_k == Some(0) {
            return Err(Error::InvalidGeneration(
                "top-k must be at least 1".to_owned(),
            ));
        }
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::InvalidGeneration(format!(
                    "top-p must be in (0, 1], got {p}"
                )));
            }
        }
        Ok(if temperature == 0.0 {
            Self::Greedy
        } else {
            Self::Sample {
                temperature,
                top_k,
                top_p,
                seed,
            }
        })
    }
}

/// Draws tokens from rows of logits.
#[derive(Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler drawing from stream `stream` of the sampling seed (one stream per prompt, so a
    /// prompt's draws do not depend on what else is in its batch). Greedy draws nothing.
    pub fn new(sampling: Sampling, stream: u64) -> Self {
        let seed = match sampling {
            Sampling::Sample { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Self {
            sampling,
            rng: StdRng::seed_from_u64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        }
    }

    /// The settings.
    pub fn sampling(&self) -> &Sampling {
        &self.sampling
    }

    /// Chooses a token from one row of logits.
    pub fn choose(&mut self, logits: &[f32]) -> usize {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => {
                if top_k.is_none() && top_p.is_none() {
                    return self.draw_unfiltered(logits, temperature);
                }
                let candidates = filtered_probabilities(logits, temperature, top_k, top_p);
                let total: f64 = candidates.iter().map(|&(_, p)| p).sum();
                let u = self.rng.random::<f64>() * total;
                walk(&candidates, u)
            }
        }
    }
}

impl Sampler {
    /// The draw of [`Sampler::choose`] without top-k or top-p, the same token for the same
    /// random number, without sorting the whole vocabulary: the candidates are walked most
    /// likely first, and the walk almost always ends among the first few, so only the
    /// [`HEAD`] most likely are ordered (with the same order as a full sort); the rest is
    /// sorted only when the walk gets past them.
    fn draw_unfiltered(&mut self, logits: &[f32], temperature: f64) -> usize {
        /// Candidates ordered before the first walk.
        const HEAD: usize = 64;
        let mut probs = unnormalised(logits, temperature);
        let total: f64 = probs.iter().map(|&(_, p)| p).sum();
        let u = self.rng.random::<f64>() * total;
        if probs.len() > HEAD {
            probs.select_nth_unstable_by(HEAD, most_likely_first);
            let (head, _) = probs.split_at_mut(HEAD);
            head.sort_by(most_likely_first);
            let mass: f64 = head.iter().map(|&(_, p)| p).sum();
            if u < mass {
                return walk(head, u);
            }
        }
        probs.sort_by(most_likely_first);
        walk(&probs, u)
    }
}

/// The token at which `u` falls in the cumulative probabilities of `candidates` (in their
/// order); the last one if `u` is past them all (round-off).
fn walk(candidates: &[(usize, f64)], mut u: f64) -> usize {
    for &(token, p) in candidates {
        if u < p {
            return token;
        }
        u -= p;
    }
    candidates.last().map_or(0, |&(t, _)| t)
}

/// Most likely first; ties keep token order.
fn most_likely_first(a: &(usize, f64), b: &(usize, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// `(token, exp((logit - max) / temperature))` of the finite logits, in token order.
fn unnormalised(logits: &[f32], temperature: f64) -> Vec<(usize, f64)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i, ((l as f64 - max) / temperature).exp()))
        .collect()
}

/// Every row's greedy token from `logits` `[rows, vocab]` on any device: libtorch's
/// `argmax(-1)` (the first maximum; the first NaN where a row has one), by a CPU kernel
/// for float32 and bfloat16 logits on the CPU.
pub fn greedy_tokens(logits: &tch::Tensor) -> Result<Vec<i64>> {
    if let Some(tokens) = crate::kernels::argmax_rows(logits)? {
        return Ok(tokens);
    }
    let next = logits.f_argmax(-1, false)?.f_to_device(tch::Device::Cpu)?;
    Ok(Vec::<i64>::try_from(next)?)
}

/// Index of the largest value; the first on ties; NaN never wins.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best
}

/// `(token, unnormalised probability)` of the tokens that survive temperature, top-k and top-p,
/// most likely first.
pub fn filtered_probabilities(
    logits: &[f32],
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
) -> Vec<(usize, f64)> {
    let mut probs = unnormalised(logits, temperature);
    probs.sort_by(most_likely_first);
    if let Some(k) = top_k {
        probs.truncate(k.max(1));
    }
    if let Some(p) = top_p {
        let total: f64 = probs.iter().map(|&(_, q)| q).sum();
        let mut cumulative = 0.0;
        let mut keep = probs.len();
        for (n, &(_, q)) in probs.iter().enumerate() {
            cumulative += q / total;
            if cumulative >= p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
    }
    probs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_keep_the_right_tokens() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 (log-space logits).
        let logits: Vec<f32> = [0.5f64, 0.25, 0.125, 0.125]
            .iter()
            .map(|p| p.ln() as f32)
            .collect();
        let kept = |k, p| -> Vec<usize> {
            filtered_probabilities(&logits, 1.0, k, p)
                .iter()
                .map(|&(t, _)| t)
                .collect()
        };
        assert_eq!(kept(None, None), vec![0, 1, 2, 3]);
        assert_eq!(kept(Some(2), None), vec![0, 1]);
        assert_eq!(kept(None, Some(0.5)), vec![0]);
        assert_eq!(kept(None, Some(0.7)), vec![0, 1]);
        assert_eq!(kept(Some(3), Some(0.99)), vec![0, 1, 2]);
    }

    #[test]
    fn low_temperature_sharpens() {
        let p = filtered_probabilities(&[1.0, 0.0], 0.1, None, None);
        let total: f64 = p.iter().map(|x| x.1).sum();
        assert!(p[0].1 / total > 0.9999);
    }

    #[test]
    fn same_seed_same_draws_and_roughly_right_frequencies() -> Result<()> {
        let logits: Vec<f32> = [0.6f64, 0.3, 0.1].iter().map(|p| p.ln() as f32).collect();
        let s = Sampling::new(1.0, None, None, 7)?;
        let draw = |n| {
            let mut sampler = Sampler::new(s.clone(), 3);
            (0..n).map(|_| sampler.choose(&logits)).collect::<Vec<_>>()
        };
        let a = draw(20_000);
        assert_eq!(a, draw(20_000));
        let share = a.iter().filter(|&&t| t == 0).count() as f64 / a.len() as f64;
        assert!((share - 0.6).abs() < 0.02, "share of token 0: {share}");
        Ok(())
    }

    #[test]
    fn the_fast_unfiltered_draw_picks_what_a_full_sort_picks() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(5);
        for (case, temperature) in [(0u64, 1.0), (1, 0.7), (2, 3.0)] {
            // Peaked logits (the walk ends in the head) and flat ones (it goes past it).
            let scale = if case == 1 { 8.0 } else { 0.05 };
            let logits: Vec<f32> = (0..3000)
                .map(|_| rng.random::<f32>() * scale)
                .chain([f32::NEG_INFINITY])
                .collect();
            let s = Sampling::new(temperature, None, None, case)?;
            let mut fast = Sampler::new(s.clone(), 9);
            let mut sorted = Sampler::new(s, 9);
            for _ in 0..500 {
                let candidates = filtered_probabilities(&logits, temperature, None, None);
                let total: f64 = candidates.iter().map(|&(_, p)| p).sum();
                let want = walk(&candidates, sorted.rng.random::<f64>() * total);
                assert_eq!(fast.choose(&logits), want, "case {case}");
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(Sampling::new(-1.0, None, None, 0).is_err());
        assert!(Sampling::new(1.0, Some(0), None, 0).is_err());
        assert!(Sampling::new(1.0, None, Some(0.0), 0).is_err());
        assert!(Sampling::new(1.0, None, Some(1.5), 0).is_err());
        assert_eq!(
            Sampling::new(0.0, Some(5), None, 0).ok(),
            Some(Sampling::Greedy)
        );
    }
}
