//! Byte-level BPE tokenizers trained with the `tokenizers` crate, saved the way Hugging Face
//! loads them (`tokenizer.json` + `tokenizer_config.json`).

use std::collections::HashSet;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder,
};

use crate::error::{Error, Result};

/// Special tokens, in id order: `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3.
pub const SPECIAL_TOKENS: [&str; 4] = ["<unk>", "<s>", "</s>", "<pad>"];
pub const BOS_ID: i64 = 1;
pub const EOS_ID: i64 = 2;
pub const PAD_ID: i64 = 3;

/// The chat template written with trained tokenizers: the HH-RLHF dialogue format, with a
/// system message as a leading instruction and `</s>` after each assistant turn.
pub const HH_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% elif m['role'] == 'user' %}\n\nHuman: {{ m['content'] }}{% else %}\n\nAssistant: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}\n\nAssistant:{% endif %}";

/// Trains a byte-level BPE tokenizer with `vocab_size` entries (special tokens included) on
/// `texts`. Encoding adds `<s>` in front, as Llama tokenizers do.
pub fn train_bpe<I>(texts: I, vocab_size: usize) -> Result<tokenizers::Tokenizer>
where
    I: Iterator<Item = String> + Send,
{
    let error = |e: tokenizers::Error| Error::Training(format!("tokenizer: {e}"));
    if vocab_size < 256 + SPECIAL_TOKENS.len() {
        return Err(Error::Training(format!(
            "a byte-level vocabulary needs at least {} entries, got {vocab_size}",
            256 + SPECIAL_TOKENS.len()
        )));
    }
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .and_then(|b| b.try_pair("<s> $A <s> $B"))
        .map_err(|e| Error::Training(format!("tokenizer template: {e}")))?
        .special_tokens(vec![("<s>", BOS_ID as u32)])
        .build()
        .map_err(|e| Error::Training(format!("tokenizer template: {e}")))?;
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_decoder(Some(ByteLevelDecoder::default().into()))
    .with_post_processor(Some(post.into()))
    .build()
    .map_err(error)?;
    tokenizer.train(&mut trainer, texts).map_err(error)?;
    Ok(tokenizer.into())
}

/// Writes `tokenizer.json` and a `tokenizer_config.json` naming the special tokens and the
/// HH chat template.
pub fn save_tokenizer(
    tokenizer: &tokenizers::Tokenizer,
    dir: &Path,
    max_length: usize,
) -> Result<()> {
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, false).map_err(|e| Error::Tokenizer {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": true,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": false,
        "chat_template": HH_CHAT_TEMPLATE,
    });
    let path = dir.join("tokenizer_config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&config).unwrap_or_default(),
    )
    .map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_a_byte_level_bpe_with_specials_first() -> Result<()> {
        let texts: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "\n\nHuman: what is {i} plus {i}?\n\nAssistant: It is {}.</s>",
                    2 * i
                )
            })
            .collect();
        let tok = train_bpe(texts.into_iter(), 300)?;
        for (id, t) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(t), Some(id as u32));
        }
        assert!(tok.get_vocab_size(true) <= 300);
        let enc = tok
            .encode("\n\nHuman: what is 7?</s>", true)
            .map_err(|e| Error::Training(e.to_string()))?;
        let ids = enc.get_ids();
        assert_eq!(ids[0], BOS_ID as u32);
        assert_eq!(
            *ids.last().unwrap_or(&0),
            EOS_ID as u32,
            "</s> in text is the special token"
        );
        let text = tok
            .decode(ids, true)
            .map_err(|e| Error::Training(e.to_string()))?;
        assert_eq!(text, "\n\nHuman: what is 7?");
        Ok(())
    }
}
