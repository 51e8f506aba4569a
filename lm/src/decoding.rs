//! Decoding settings shared by every stage that generates (rollouts, generation, the demo's
//! configuration): one serde type, checked once, turned into a model's [`GenerationConfig`].

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::generate::GenerationConfig;
use crate::sampling::Sampling;
use crate::LanguageModel;

/// How responses are decoded. The defaults are `recontrol generate`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodingSettings {
    /// Maximum number of new tokens per prompt.
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    pub temperature: f64,
    /// Sample only from the k most likely tokens.
    pub top_k: Option<usize>,
    /// Sample only from the smallest set of tokens whose probability reaches p.
    pub top_p: Option<f64>,
    /// Seed of the sampling (each prompt draws from its own stream of it).
    pub seed: u64,
    /// Prompts decoded together.
    pub batch_size: usize,
    /// Keep generating after end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
}

impl Default for DecodingSettings {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            batch_size: 8,
            ignore_eos: false,
        }
    }
}

impl DecodingSettings {
    /// The checked sampling settings (the batch size is checked too).
    pub fn sampling(&self) -> Result<Sampling> {
        if self.batch_size == 0 {
            return Err(Error::InvalidGeneration(
                "batch size must be at least 1".to_owned(),
            ));
        }
        Sampling::new(self.temperature, self.top_k, self.top_p, self.seed)
    }

    /// `lm`'s generation settings with these applied.
    pub fn config(&self, lm: &LanguageModel) -> Result<GenerationConfig> {
        let mut config = lm.generation_config(self.max_new_tokens, self.sampling()?);
        if self.ignore_eos {
            config.eos_token_ids.clear();
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_fields_and_bad_values_are_refused() {
        let s: DecodingSettings =
            serde_json::from_str(r#"{"max_new_tokens": 48, "temperature": 1.0}"#).expect("json");
        assert_eq!(s.max_new_tokens, 48);
        assert_eq!(s.batch_size, 8);
        assert!(matches!(s.sampling(), Ok(Sampling::Sample { .. })));
        assert_eq!(
            DecodingSettings::default().sampling().ok(),
            Some(Sampling::Greedy)
        );
        let zero_batch = DecodingSettings {
            batch_size: 0,
            ..DecodingSettings::default()
        };
        assert!(zero_batch.sampling().is_err());
        assert!(serde_json::from_str::<DecodingSettings>(r#"{"temprature": 1}"#).is_err());
    }
}
