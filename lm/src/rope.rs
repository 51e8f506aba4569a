//! Rotary position embeddings, computed the way transformers computes them (inverse frequencies
//! and angles in float32, cos/sin cast to the activation dtype).

use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

use crate::config::{RopeConfig, RopeScaling};
use crate::error::Result;

/// Inverse frequencies of one head dimension.
#[derive(Debug)]
pub struct Rope {
    /// `[head_dim / 2]`, float32.
    inv_freq: Tensor,
    /// LongRoPE: the frequencies of a forward pass whose positions reach past the given
    /// pretraining length, and the factor of cos and sin.
    long: Option<(Tensor, i64)>,
    attention_factor: f64,
}

impl Rope {
    /// Builds the (scaled) inverse frequencies for heads of `head_dim`.
    pub fn new(cfg: &RopeConfig, head_dim: usize, device: Device) -> Result<Self> {
        let dim = head_dim as f64;
        // 1 / theta^(2i / dim), as transformers' `_compute_default_rope_parameters`.
        let exponent = Tensor::f_arange_start_step(0, head_dim as i64, 2, (Kind::Int64, device))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(dim)?;
        let powers = Tensor::f_pow_scalar(cfg.theta, &exponent)?;
        let inv_freq = powers.f_reciprocal()?;
        let (mut long, mut attention_factor) = (None, 1.0);
        let inv_freq = match &cfg.scaling {
            RopeScaling::None => inv_freq,
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor: factor,
            } => {
                // transformers' `_compute_longrope_parameters`: 1 / (ext * theta^(2i / dim)).
                let with = |ext: &[f64]| -> Result<Tensor> {
                    let ext = Tensor::from_slice(ext)
                        .f_to_kind(Kind::Float)?
                        .f_to_device(device)?;
                    Ok(ext.f_mul(&powers)?.f_reciprocal()?)
                };
                long = Some((with(long_factor)?, *original_max_position_embeddings as i64));
                attention_factor = *factor;
                with(short_factor)?
            }
            RopeScaling::Linear { factor } => inv_freq.f_div_scalar(*factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let (factor, low_freq_factor, high_freq_factor, old_len) =
                    (*factor, *low_freq_factor, *high_freq_factor, *old_len);
                // transformers' `_compute_llama3_parameters`.
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                let wavelen = inv_freq.f_reciprocal()?.f_mul_scalar(2.0 * PI)?;
                let scaled = inv_freq.f_div_scalar(factor)?;
                let inv_freq_llama =
                    scaled.f_where_self(&wavelen.f_gt(low_freq_wavelen)?, &inv_freq)?;
                // smooth = (old_len / wavelen - low) / (high - low)
                let smooth = wavelen
                    .f_reciprocal()?
                    .f_mul_scalar(old_len)?
                    .f_sub_scalar(low_freq_factor)?
                    .f_div_scalar(high_freq_factor - low_freq_factor)?;
                let one_minus = smooth.f_neg()?.f_add_scalar(1.0)?;
                let smoothed = one_minus
                    .f_mul(&inv_freq_llama.f_div_scalar(factor)?)?
                    .f_add(&smooth.f_mul(&inv_freq_llama)?)?;
                let is_medium = wavelen
                    .f_lt(high_freq_wavelen)?
                    .f_logical_not()?
                    .f_logical_and(&wavelen.f_gt(low_freq_wavelen)?.f_logical_not()?)?;
                smoothed.f_where_self(&is_medium, &inv_freq_llama)?
            }
        };
        Ok(Self {
            inv_freq,
            long,
            attention_factor,
        })
    }

    /// LongRoPE's pretraining length (`original_max_position_embeddings`): a forward pass whose
    /// positions reach past it takes the long factors. `None` for other rotations.
    pub fn long_after(&self) -> Option<i64> {
        self.long.as_ref().map(|(_, original)| *original)
    }

    /// Whether a forward pass over `positions` takes LongRoPE's long factors: transformers
    /// decides per pass, on the largest position id (`max(position_ids) + 1 > original`).
    pub fn is_long(&self, positions: &Tensor) -> Result<bool> {
        match self.long_after() {
            Some(original) if positions.numel() > 0 => {
                Ok(positions.f_max()?.f_int64_value(&[])? + 1 > original)
            }
            _ => Ok(false),
        }
    }

    /// The inverse frequencies for a forward pass over `positions`.
    fn frequencies(&self, positions: &Tensor) -> Result<&Tensor> {
        match &self.long {
            Some((long, _)) if self.is_long(positions)? => Ok(long),
            _ => Ok(&self.inv_freq),
        }
    }

    /// `(cos, sin)`, each `[batch, 1, seq, head_dim]` in `kind`, for `positions` `[batch, seq]`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        // [batch, seq, head_dim / 2]
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(self.frequencies(positions)?)?;
        // [batch, 1, seq, head_dim]
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?;
        let (cos, sin) = (emb.f_cos()?, emb.f_sin()?);
        let (cos, sin) = if self.attention_factor == 1.0 {
            (cos, sin)
        } else {
            (
                cos.f_mul_scalar(self.attention_factor)?,
                sin.f_mul_scalar(self.attention_factor)?,
            )
        };
        Ok((cos.f_to_kind(kind)?, sin.f_to_kind(kind)?))
    }
}

/// `x * cos + rotate_half(x) * sin` for `x` `[batch, heads, seq, head_dim]`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.f_narrow(-1, 0, half)?;
    let x2 = x.f_narrow(-1, half, half)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
    Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_match_the_formula() -> Result<()> {
        let cfg = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        };
        let rope = Rope::new(&cfg, 8, Device::Cpu)?;
        let got = Vec::<f32>::try_from(&rope.inv_freq)?;
        let want: Vec<f32> = (0..4)
            .map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / 8.0) as f32)
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-7, "{got:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn llama3_keeps_high_and_scales_low_frequencies() -> Result<()> {
        let base = RopeConfig {
            theta: 500_000.0,
            scaling: RopeScaling::None,
        };
        let scaled = RopeConfig {
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 32.0,
            },
            ..base.clone()
        };
        let b = Vec::<f32>::try_from(&Rope::new(&base, 16, Device::Cpu)?.inv_freq)?;
        let s = Vec::<f32>::try_from(&Rope::new(&scaled, 16, Device::Cpu)?.inv_freq)?;
        // Highest frequency: wavelength 2*pi < 32/4, untouched.
        assert_eq!(b[0], s[0]);
        // Lowest frequency: wavelength far above 32, divided by the factor.
        assert!((s[7] - b[7] / 8.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn longrope_switches_to_long_factors_past_the_pretraining_length() -> Result<()> {
        let cfg = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::LongRope {
                short_factor: vec![1.0, 2.0],
                long_factor: vec![4.0, 8.0],
                original_max_position_embeddings: 8,
                attention_factor: 1.5,
            },
        };
        let rope = Rope::new(&cfg, 4, Device::Cpu)?;
        let base = [1.0f64, 1.0 / 100.0]; // 1 / 10000^(2i / 4)
        let freq = |positions: &[i64]| -> Result<Vec<f32>> {
            let t = Tensor::from_slice(positions).f_view([1, positions.len() as i64])?;
            Ok(Vec::<f32>::try_from(rope.frequencies(&t)?)?)
        };
        // Positions 0..=7 (length 8): the short factors; one more: the long ones.
        let short = freq(&[0, 7])?;
        let long = freq(&[0, 8])?;
        for i in 0..2 {
            assert!(
                (short[i] as f64 - base[i] / [1.0, 2.0][i]).abs() < 1e-7,
                "{short:?}"
            );
            assert!(
                (long[i] as f64 - base[i] / [4.0, 8.0][i]).abs() < 1e-7,
                "{long:?}"
            );
        }
        // cos and sin carry the attention factor: cos(0) = 1.5.
        let (cos, _) = rope.cos_sin(&Tensor::from_slice(&[0i64]).f_view([1, 1])?, Kind::Float)?;
        assert!((cos.f_max()?.f_double_value(&[])? - 1.5).abs() < 1e-6);
        Ok(())
    }
}
