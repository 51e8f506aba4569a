//! The coherence encoder: mean-pooled final (post-norm) hidden states of a model directory, and
//! the cosine similarity of a prompt's and a response's embeddings.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use recontrol_lm::{DType, DeviceSpec, LanguageModel, Positions, StepInput};
use tch::{Kind, Tensor};

use crate::Result;

/// Embeds texts as the mean of a model's final hidden states (the paper used a SimCSE BERT).
#[derive(Debug)]
pub struct CoherenceEncoder {
    lm: LanguageModel,
    /// Texts are cut to the model's positions.
    max_tokens: usize,
    /// Prompt embeddings already computed: every method answers the same prompts.
    prompts: RefCell<HashMap<String, Option<Tensor>>>,
}

impl CoherenceEncoder {
    /// The backbone of a model directory (an LM or a sequence-classification reward model), f32.
    pub fn load(dir: &Path, device: DeviceSpec) -> Result<Self> {
        let lm = LanguageModel::load_backbone(dir, device, DType::F32)?;
        let max_tokens = lm.model.config().max_position_embeddings.unwrap_or(2048);
        Ok(Self {
            lm,
            max_tokens,
            prompts: RefCell::new(HashMap::new()),
        })
    }

    /// What the report records as the encoder.
    pub fn describe(&self) -> String {
        format!(
            "mean-pooled final hidden states of {}",
            self.lm.dir.display()
        )
    }

    /// `[1, hidden]` mean of the final hidden states of `text`, or None for no tokens.
    fn embed(&self, text: &str) -> Result<Option<Tensor>> {
        let mut ids = self.lm.tokenizer.encode(text, true)?;
        ids.truncate(self.max_tokens);
        if ids.is_empty() {
            return Ok(None);
        }
        let _guard = tch::no_grad_guard();
        let device = self.lm.model.device();
        let n = ids.len() as i64;
        let input = Tensor::from_slice(&ids)
            .f_view([1, n])?
            .f_to_device(device)?;
        let pos = Tensor::f_arange(n, (Kind::Int64, device))?.f_unsqueeze(0)?;
        let mut cache = self.lm.model.new_cache(ids.len());
        // [1, n, hidden]
        let h = self.lm.model.forward_hidden(
            &StepInput {
                input_ids: &input,
                position_ids: &pos,
                key_mask: None,
            },
            &mut cache,
            Positions::All,
        )?;
        Ok(Some(h.f_to_kind(Kind::Float)?.f_mean_dim(
            [1i64].as_slice(),
            false,
            Kind::Float,
        )?))
    }

    /// The prompt's embedding, computed once per prompt.
    fn embed_prompt(&self, prompt: &str) -> Result<Option<Tensor>> {
        if let Some(e) = self.prompts.borrow().get(prompt) {
            return Ok(e.as_ref().map(Tensor::shallow_clone));
        }
        let e = self.embed(prompt)?;
        let copy = e.as_ref().map(Tensor::shallow_clone);
        self.prompts.borrow_mut().insert(prompt.to_owned(), e);
        Ok(copy)
    }

    /// Cosine similarity of the prompt's and the response's embeddings (0 for an empty one).
    pub fn coherence(&self, prompt: &str, response: &str) -> Result<f64> {
        let (Some(a), Some(b)) = (self.embed_prompt(prompt)?, self.embed(response)?) else {
            return Ok(0.0);
        };
        Ok(Tensor::f_cosine_similarity(&a, &b, 1, 1e-8)?.f_double_value(&[0])?)
    }
}
