//! A `tokenizer.json` from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! A GGUF file has no `tokenizer.json`: llama.cpp stores the vocabulary, the merges, the token
//! types and the special token ids as metadata. HF transformers rebuilds a tokenizer from them
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=..)`, in
//! `transformers/integrations/gguf/gguf_tokenizer_mapping.py`), and [`build_tokenizer`] does what
//! it does, step by step, so that both tokenize every text to the same ids:
//!
//! 1. The vocabulary goes to the class transformers hands it to: `gpt2` to `GPT2Tokenizer`
//!    (byte-level BPE; a token not spelled in the byte alphabet is respelled through it) and
//!    `llama` to `LlamaTokenizer` (SentencePiece-style BPE: `Metaspace`, byte fallback). Merges
//!    come from the file, or, when it has none, are derived from the vocabulary and its scores
//!    (`generate_merges`). That class adds its default special tokens: `<|endoftext|>` for
//!    `GPT2Tokenizer`, `<s>`, `</s>`, `<unk>` for `LlamaTokenizer`. One the vocabulary lacks
//!    (Llama 3 has no `<|endoftext|>`) gets a new id past the vocabulary, one the model has no
//!    embedding for, as in transformers; only a text holding it literally encodes to it.
//! 2. Tokens typed control (3) become special added tokens, except, for `gpt2`, ones spelled
//!    outside the byte alphabet (a llama.cpp mislabel); tokens typed user-defined (4) become
//!    plain added tokens when the vocabulary has them as spelled.
//! 3. `tokenizer.ggml.pre` picks the split regex (transformers' `GGUF_PRE_TOKENIZER_SPLITS`, see
//!    [`pre_tokenizer_split`]); a name it does not list keeps the class's pre-tokenizer.
//! 4. The file's BOS, EOS, UNK and PAD tokens become special added tokens, and the
//!    post-processor adds BOS and EOS as `add_bos_token` / `add_eos_token` say (`add_bos_token`
//!    defaults to true for `llama`, as llama.cpp and transformers do).
//!
//! `tokenizer.ggml.add_space_prefix` is read but, as in transformers, changes nothing: the
//! `llama` pre-tokenizer always prepends `▁` to the first word. Where transformers would fail or
//! silently cut (lengths that disagree, ids past the vocabulary, a malformed merge, a NaN score),
//! this refuses the metadata with a [`TokenizerError`].
//!
//! To load the result in transformers as built here, the `tokenizer_config.json` beside it names
//! `"tokenizer_class": "TokenizersBackend"` (what transformers writes when it saves a GGUF
//! tokenizer): a class of its own could rebuild parts of the tokenizer.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::metadata::Metadata;
use crate::GgufFile;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{Piece, Sequence, Template, TemplateProcessing};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// The `tokenizer.ggml.*` metadata of a GGUF file, as read from it (each field is the key of its
/// name, e.g. `tokens` is `tokenizer.ggml.tokens`; an absent key is `None`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizerMetadata {
    /// `gpt2` (byte-level BPE) or `llama` (SentencePiece-style BPE).
    pub model: String,
    /// The pre-tokenizer's name (`smollm`, `llama-bpe`, `qwen2`, ..).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub scores: Option<Vec<f32>>,
    /// llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_type: Option<Vec<i32>>,
    /// `"left right"` pairs, best first.
    pub merges: Option<Vec<String>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

impl TokenizerMetadata {
    /// The `tokenizer.ggml.*` metadata of a GGUF file.
    pub fn from_gguf(metadata: &Metadata) -> crate::Result<Self> {
        let key = |name: &str| format!("tokenizer.ggml.{name}");
        Ok(Self {
            model: metadata.require_str(&key("model"))?.to_owned(),
            pre: metadata.get_str(&key("pre"))?.map(str::to_owned),
            tokens: metadata.require_str_array(&key("tokens"))?.to_vec(),
            scores: metadata.get_f32_array(&key("scores"))?,
            token_type: metadata.get_i32_array(&key("token_type"))?,
            merges: metadata
                .get_str_array(&key("merges"))?
                .map(<[String]>::to_vec),
            bos_token_id: metadata.get_u32(&key("bos_token_id"))?,
            eos_token_id: metadata.get_u32(&key("eos_token_id"))?,
            unknown_token_id: metadata.get_u32(&key("unknown_token_id"))?,
            padding_token_id: metadata.get_u32(&key("padding_token_id"))?,
            add_bos_token: metadata.get_bool(&key("add_bos_token"))?,
            add_eos_token: metadata.get_bool(&key("add_eos_token"))?,
            add_space_prefix: metadata.get_bool(&key("add_space_prefix"))?,
        })
    }
}

/// The import's tokenizer step: the `tokenizer.json` that `file`'s metadata describes, at
/// `path`.
pub fn write_gguf_tokenizer(file: &GgufFile, path: &Path) -> crate::Result<()> {
    let metadata = TokenizerMetadata::from_gguf(file.metadata())?;
    write_tokenizer_json(&metadata, path).map_err(|source| crate::Error::Tokenizer {
        path: file.path().to_owned(),
        source,
    })
}

/// Why no tokenizer could be built from a file's tokenizer metadata.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer.ggml.model is {model:?}; supported: \"gpt2\" (byte-level BPE), \"llama\" (SentencePiece-style BPE)")]
    UnsupportedModel { model: String },

    #[error("tokenizer.ggml.tokens is empty")]
    EmptyVocabulary,

    #[error("tokenizer.ggml.tokens has {count} tokens, more than 32-bit ids can number")]
    TooManyTokens { count: usize },

    #[error("tokenizer.ggml.{key} has {len} entries for {tokens} tokens")]
    LengthMismatch {
        key: &'static str,
        len: usize,
        tokens: usize,
    },

    #[error("tokenizer.ggml.{key} is {id}, past the last of the {tokens} tokens")]
    TokenIdOutOfRange {
        key: &'static str,
        id: u32,
        tokens: usize,
    },

    #[error("tokenizer.ggml.merges[{index}] is {merge:?}, not two tokens joined by one space")]
    MalformedMerge { index: usize, merge: String },

    #[error("tokenizer.ggml.merges[{index}] is {merge:?}, but {token:?} is not in the vocabulary")]
    MergeOutOfVocabulary {
        index: usize,
        merge: String,
        token: String,
    },

    #[error(
        "tokenizer.ggml.merges is absent and so is tokenizer.ggml.scores, to derive them from"
    )]
    NoMergesNorScores,

    #[error("tokenizer.ggml.scores[{index}] is NaN")]
    NanScore { index: usize },

    #[error("cannot build the tokenizer's {part}")]
    Build {
        part: &'static str,
        #[source]
        source: tokenizers::Error,
    },

    #[error(transparent)]
    Write(#[from] recontrol_io::Error),
}

type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// llama.cpp's token type of a control token (`<|im_start|>`, `<s>`).
const CONTROL: i32 = 3;
/// llama.cpp's token type of a user-defined token (`<think>`).
const USER_DEFINED: i32 = 4;

/// The two tokenizer families a GGUF file can state that are supported here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// `gpt2`: byte-level BPE, built as transformers' `GPT2Tokenizer`.
    ByteLevel,
    /// `llama`: SentencePiece-style BPE, built as transformers' `LlamaTokenizer`.
    SentencePiece,
}

impl Family {
    fn of(model: &str) -> Result<Self> {
        match model {
            "gpt2" => Ok(Self::ByteLevel),
            "llama" => Ok(Self::SentencePiece),
            _ => Err(TokenizerError::UnsupportedModel {
                model: model.to_owned(),
            }),
        }
    }

    /// The special tokens the transformers class adds by default (its `bos_token`,
    /// `eos_token`, `unk_token` defaults, in that order, once each).
    fn default_special_tokens(self) -> &'static [&'static str] {
        match self {
            Self::ByteLevel => &["<|endoftext|>"],
            Self::SentencePiece => &["<s>", "</s>", "<unk>"],
        }
    }
}

/// Builds the tokenizer HF transformers builds from this GGUF tokenizer metadata (see the module
/// documentation for the steps).
pub fn build_tokenizer(meta: &TokenizerMetadata) -> Result<Tokenizer> {
    let family = Family::of(&meta.model)?;
    validate(meta)?;
    let merges = merges(meta)?;
    let mut tokenizer = match family {
        Family::ByteLevel => byte_level(&meta.tokens, merges)?,
        Family::SentencePiece => sentencepiece(&meta.tokens, merges)?,
    };
    let defaults: Vec<AddedToken> = family
        .default_special_tokens()
        .iter()
        .map(|token| AddedToken::from(*token, true))
        .collect();
    tokenizer.add_tokens(&defaults);
    add_typed_tokens(&mut tokenizer, meta, family);
    if let Some(split) = meta.pre.as_deref().and_then(pre_tokenizer_split) {
        tokenizer.with_pre_tokenizer(Some(split_then_bytes(split)?));
    }
    add_named_special_tokens(&mut tokenizer, meta);
    let post_processor = bos_eos_template(&tokenizer, meta, family)?;
    tokenizer.with_post_processor(Some(post_processor));
    Ok(tokenizer)
}

/// Builds the tokenizer ([`build_tokenizer`]) and writes it as `tokenizer.json` (pretty, as
/// transformers saves one) to `path`, atomically.
pub fn write_tokenizer_json(meta: &TokenizerMetadata, path: &Path) -> Result<()> {
    let tokenizer = build_tokenizer(meta)?;
    let mut json = tokenizer
        .to_string(true)
        .map_err(|source| TokenizerError::Build {
            part: "JSON form",
            source,
        })?;
    json.push('\n');
    recontrol_io::write_atomic(path, json.as_bytes())?;
    Ok(())
}

/// The split regex transformers uses for the pre-tokenizer llama.cpp calls `pre`
/// (`GGUF_PRE_TOKENIZER_SPLITS`); `None` for a name it does not list, which keeps the class's
/// own pre-tokenizer (GPT-2's split for `gpt2`).
pub fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => Some(LLAMA3),
        "tekken" => Some(TEKKEN),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => Some(QWEN2),
        "qwen35" => Some(QWEN35),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => Some(GPT4O),
        _ => None,
    }
}

/// GPT-2's map from bytes to the printable characters that spell them in a byte-level
/// vocabulary (`bytes_to_unicode`): printable Latin-1 bytes stand for themselves, the other 68
/// are shifted to U+0100 onwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        table[usize::from(b)] = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            // 0x100 + at most 67: always a valid scalar value
            char::from_u32(0xFF + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
    }
    table
}

/// Checks the metadata against itself: a vocabulary, lengths that agree with it, ids inside it.
fn validate(meta: &TokenizerMetadata) -> Result<()> {
    let tokens = meta.tokens.len();
    if tokens == 0 {
        return Err(TokenizerError::EmptyVocabulary);
    }
    if u32::try_from(tokens).is_err() {
        return Err(TokenizerError::TooManyTokens { count: tokens });
    }
    let lengths = [
        ("scores", meta.scores.as_ref().map(Vec::len)),
        ("token_type", meta.token_type.as_ref().map(Vec::len)),
    ];
    for (key, len) in lengths {
        if let Some(len) = len.filter(|&len| len != tokens) {
            return Err(TokenizerError::LengthMismatch { key, len, tokens });
        }
    }
    let ids = [
        ("bos_token_id", meta.bos_token_id),
        ("eos_token_id", meta.eos_token_id),
        ("unknown_token_id", meta.unknown_token_id),
        ("padding_token_id", meta.padding_token_id),
    ];
    for (key, id) in ids {
        if let Some(id) = id.filter(|&id| id as usize >= tokens) {
            return Err(TokenizerError::TokenIdOutOfRange { key, id, tokens });
        }
    }
    Ok(())
}

/// The merges, best first: the file's, or those its vocabulary and scores imply.
fn merges(meta: &TokenizerMetadata) -> Result<Vec<(String, String)>> {
    match (&meta.merges, &meta.scores) {
        (Some(merges), _) => parse_merges(merges),
        (None, Some(scores)) => {
            if let Some(index) = scores.iter().position(|s| s.is_nan()) {
                return Err(TokenizerError::NanScore { index });
            }
            Ok(generate_merges(&meta.tokens, scores))
        }
        (None, None) => Err(TokenizerError::NoMergesNorScores),
    }
}

/// `"left right"` strings as pairs; exactly one space each, as transformers splits them.
fn parse_merges(merges: &[String]) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .enumerate()
        .map(|(index, merge)| match merge.split_once(' ') {
            Some((left, right)) if !right.contains(' ') => Ok((left.to_owned(), right.to_owned())),
            _ => Err(TokenizerError::MalformedMerge {
                index,
                merge: merge.clone(),
            }),
        })
        .collect()
}

/// The merges a SentencePiece-style vocabulary implies (transformers' `generate_merges` with
/// scores): every split of a token into two tokens of the vocabulary is a merge, ranked by the
/// token's score, best first, then by the lengths of the two halves, longer first; equal ones
/// keep the order of the tokens, and the halves' ids order the splits of one token.
///
/// A token listed twice counts once, at its first place, with its last id and score (as the
/// Python dictionaries have it). Scores must not be NaN.
fn generate_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (id, (token, &score)) in tokens.iter().zip(scores).enumerate() {
        if ids.insert(token, id).is_none() {
            order.push(token);
        }
        score_of.insert(token, score);
    }

    // (left, right, score of left+right)
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for token in order {
        let score = score_of[token];
        let mut splits: Vec<(&str, &str)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(left, right)| ids.contains_key(left) && ids.contains_key(right))
            .collect();
        splits.sort_by_key(|(left, right)| (ids[left], ids[right]));
        merges.extend(splits.into_iter().map(|(left, right)| (left, right, score)));
    }
    let key = |(left, right, score): &(&str, &str, f32)| {
        (*score, left.chars().count(), right.chars().count())
    };
    // best first; a stable sort keeps equal merges in order, like Python's `reverse=True`
    merges.sort_by(|a, b| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    merges
        .into_iter()
        .map(|(left, right, _)| (left.to_owned(), right.to_owned()))
        .collect()
}

/// token -> id; a token listed twice keeps its last id (as transformers' dictionary does).
fn vocabulary<'a>(tokens: impl Iterator<Item = &'a str>) -> Vocab {
    tokens
        .enumerate()
        .map(|(id, token)| (token.to_owned(), id as u32))
        .collect()
}

/// Checks that both halves of every merge, and what they make, are in the vocabulary.
fn check_merges(vocab: &Vocab, merges: &[(String, String)]) -> Result<()> {
    for (index, (left, right)) in merges.iter().enumerate() {
        let joined = format!("{left}{right}");
        for token in [left, right, &joined] {
            if !vocab.contains_key(token) {
                return Err(TokenizerError::MergeOutOfVocabulary {
                    index,
                    merge: format!("{left} {right}"),
                    token: token.clone(),
                });
            }
        }
    }
    Ok(())
}

fn build_error(part: &'static str) -> impl FnOnce(tokenizers::Error) -> TokenizerError {
    move |source| TokenizerError::Build { part, source }
}

/// transformers' `GPT2Tokenizer`: byte-level BPE over the vocabulary spelled in the byte
/// alphabet, GPT-2's split, the byte-level decoder.
fn byte_level(tokens: &[String], merges: Vec<(String, String)>) -> Result<Tokenizer> {
    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let spelled: Vec<String> = tokens
        .iter()
        .map(|token| {
            if token.chars().all(|c| alphabet.contains(&c)) {
                token.clone()
            } else {
                token.bytes().map(|b| spelling[usize::from(b)]).collect()
            }
        })
        .collect();
    let vocab = vocabulary(spelled.iter().map(String::as_str));
    check_merges(&vocab, &merges)?;
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(build_error("BPE model"))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// transformers' `LlamaTokenizer`: BPE with byte fallback and fused unknowns, `▁` for spaces
/// and before the first word, a decoder that undoes both and joins byte tokens.
fn sentencepiece(tokens: &[String], merges: Vec<(String, String)>) -> Result<Tokenizer> {
    let vocab = vocabulary(tokens.iter().map(String::as_str));
    check_merges(&vocab, &merges)?;
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(build_error("BPE model"))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let replace = Replace::new("▁", " ").map_err(build_error("decoder"))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    Ok(tokenizer)
}

/// Adds the tokens the file types control as special tokens (for `gpt2`, only those spelled in
/// the byte alphabet), then those it types user-defined, when the vocabulary has them as
/// spelled, as plain added tokens; both matched whole in text, never normalized.
fn add_typed_tokens(tokenizer: &mut Tokenizer, meta: &TokenizerMetadata, family: Family) {
    let Some(types) = &meta.token_type else {
        return;
    };
    let alphabet: HashSet<char> = bytes_to_unicode().into_iter().collect();
    let spelled = |token: &str| token.chars().all(|c| alphabet.contains(&c));
    let typed = |kind: i32| {
        meta.tokens
            .iter()
            .zip(types)
            .filter(move |&(_, &t)| t == kind)
            .map(|(token, _)| token)
    };
    let control: Vec<AddedToken> = typed(CONTROL)
        .filter(|token| family == Family::SentencePiece || spelled(token))
        .map(|token| AddedToken::from(token.as_str(), true))
        .collect();
    if !control.is_empty() {
        tokenizer.add_special_tokens(&control);
    }
    let user_defined: Vec<AddedToken> = typed(USER_DEFINED)
        .filter(|token| tokenizer.token_to_id(token).is_some())
        .map(|token| AddedToken::from(token.as_str(), false).normalized(false))
        .collect();
    if !user_defined.is_empty() {
        tokenizer.add_tokens(&user_defined);
    }
}

/// The file's BOS, EOS, UNK and PAD tokens, as spelled in the file, in that order.
fn named_special_tokens(meta: &TokenizerMetadata) -> [Option<&str>; 4] {
    let token =
        |id: Option<u32>| id.and_then(|id| meta.tokens.get(id as usize).map(String::as_str));
    [
        token(meta.bos_token_id),
        token(meta.eos_token_id),
        token(meta.unknown_token_id),
        token(meta.padding_token_id),
    ]
}

/// Adds the file's BOS, EOS, UNK and PAD tokens that are not added tokens yet as special ones.
fn add_named_special_tokens(tokenizer: &mut Tokenizer, meta: &TokenizerMetadata) {
    let added: HashSet<String> = tokenizer
        .get_added_tokens_decoder()
        .into_values()
        .map(|token| token.content)
        .collect();
    let mut new: Vec<&str> = Vec::new();
    for token in named_special_tokens(meta).into_iter().flatten() {
        if !added.contains(token) && !new.contains(&token) {
            new.push(token);
        }
    }
    let new: Vec<AddedToken> = new
        .into_iter()
        .map(|token| AddedToken::from(token, true))
        .collect();
    if !new.is_empty() {
        tokenizer.add_tokens(&new);
    }
}

/// transformers' `update_post_processor`: `[BOS] $A [EOS]` for one sequence and
/// `[BOS] $A [EOS] [BOS] $B [EOS]` for a pair, BOS and EOS each where the file asks for them
/// and has them (`add_bos_token` defaults to true for `llama`, to false for `gpt2`).
fn bos_eos_template(
    tokenizer: &Tokenizer,
    meta: &TokenizerMetadata,
    family: Family,
) -> Result<TemplateProcessing> {
    let [bos, eos, ..] = named_special_tokens(meta);
    let bos = bos.filter(|_| {
        meta.add_bos_token
            .unwrap_or(family == Family::SentencePiece)
    });
    let eos = eos.filter(|_| meta.add_eos_token.unwrap_or(false));

    // `[BOS] $X [EOS]`, each piece on one type id
    let framed = |sequence: Sequence, type_id: u32| -> Vec<Piece> {
        let special = |token: &str| Piece::SpecialToken {
            id: token.to_owned(),
            type_id,
        };
        let mut pieces: Vec<Piece> = bos.map(special).into_iter().collect();
        pieces.push(Piece::Sequence {
            id: sequence,
            type_id,
        });
        pieces.extend(eos.map(special));
        pieces
    };
    let single = framed(Sequence::A, 0);
    let pair = [single.clone(), framed(Sequence::B, 1)].concat();

    let mut special_tokens: Vec<(String, u32)> = Vec::new();
    for token in [bos, eos].into_iter().flatten() {
        // added above, so always found
        if let Some(id) = tokenizer.token_to_id(token) {
            special_tokens.push((token.to_owned(), id));
        }
    }
    // A template is parsed from text by the builder, which would cut a token holding a space
    // or a colon; built from pieces (through their serde form), any token fits.
    let template = |pieces: Vec<Piece>| -> Result<Template> {
        serde_json::to_value(pieces)
            .and_then(serde_json::from_value)
            .map_err(|e| TokenizerError::Build {
                part: "post-processor",
                source: e.into(),
            })
    };
    TemplateProcessing::builder()
        .single(template(single)?)
        .pair(template(pair)?)
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| TokenizerError::Build {
            part: "post-processor",
            source: e.into(),
        })
}

/// transformers' `set_split_regex`: split on `split` (matches kept as pieces), then byte-level
/// without GPT-2's own split.
fn split_then_bytes(split: &str) -> Result<PreTokenizerSequence> {
    let split = Split::new(
        SplitPattern::Regex(split.to_owned()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(build_error("pre-tokenizer"))?;
    Ok(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece-style vocabulary: `<unk>`, `<s>`, `</s>`, then pieces scored by rank.
    fn spm(pieces: &[&str]) -> TokenizerMetadata {
        let tokens: Vec<String> = ["<unk>", "<s>", "</s>"]
            .iter()
            .chain(pieces)
            .map(|t| t.to_string())
            .collect();
        let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
        let token_type = (0..tokens.len())
            .map(|i| {
                if i == 0 {
                    2
                } else if i < 3 {
                    CONTROL
                } else {
                    1
                }
            })
            .collect();
        TokenizerMetadata {
            model: "llama".into(),
            tokens,
            scores: Some(scores),
            token_type: Some(token_type),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            unknown_token_id: Some(0),
            ..Default::default()
        }
    }

    fn error(meta: &TokenizerMetadata) -> TokenizerError {
        match build_tokenizer(meta) {
            Ok(_) => panic!("built a tokenizer from bad metadata: {meta:?}"),
            Err(e) => e,
        }
    }

    fn ids(tokenizer: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
        tokenizer
            .encode(text, special)
            .expect("encode")
            .get_ids()
            .to_vec()
    }

    #[test]
    fn bytes_to_unicode_is_gpt2s_byte_alphabet() {
        let table = bytes_to_unicode();
        let ours: HashSet<char> = table.iter().copied().collect();
        let theirs: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours, theirs);
        assert_eq!(table[usize::from(b' ')], 'Ġ');
        assert_eq!(table[usize::from(b'\n')], 'Ċ');
        assert_eq!(table[usize::from(b'a')], 'a');
        assert_eq!(table[0], 'Ā');
        assert_eq!(table[0xAD], 'Ń'); // the last byte outside the printable ranges
    }

    /// transformers' `generate_merges` gives, for these tokens and scores (checked in Python):
    /// `[('b','c'), ('c','a'), ('é','a'), ('ab','c'), ('a','bc'), ('a','b')]`: ties on score go
    /// to the longer left half, then keep token order; `ab` listed twice keeps its last score.
    #[test]
    fn generate_merges_ranks_like_transformers() {
        let tokens: Vec<String> = [
            "<unk>", "a", "b", "c", "ab", "bc", "abc", "ab", "ca", "é", "éa",
        ]
        .iter()
        .map(|t| t.to_string())
        .collect();
        let scores = [
            0.0, -1.0, -1.0, -1.0, -2.0, -2.0, -3.0, -5.0, -2.0, -1.0, -2.0,
        ];
        let merges = generate_merges(&tokens, &scores);
        let merges: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(
            merges,
            [
                ("b", "c"),
                ("c", "a"),
                ("é", "a"),
                ("ab", "c"),
                ("a", "bc"),
                ("a", "b")
            ]
        );
    }

    #[test]
    fn sentencepiece_adds_bos_and_eos_as_asked() {
        let mut meta = spm(&["▁", "h", "i", "▁h", "▁hi"]);
        let tokenizer = build_tokenizer(&meta).expect("build");
        assert_eq!(ids(&tokenizer, "hi", true), [1, 7]); // add_bos_token defaults to true
        assert_eq!(ids(&tokenizer, "hi", false), [7]);
        meta.add_bos_token = Some(false);
        meta.add_eos_token = Some(true);
        let tokenizer = build_tokenizer(&meta).expect("build");
        assert_eq!(ids(&tokenizer, "hi", true), [7, 2]);
        meta.eos_token_id = None; // nothing to add
        let tokenizer = build_tokenizer(&meta).expect("build");
        assert_eq!(ids(&tokenizer, "hi", true), [7]);
    }

    /// A BOS token holding a colon and a space, which a template parsed from text would cut.
    #[test]
    fn any_bos_token_fits_the_template() {
        let mut meta = spm(&["▁", "h", "i", "▁h", "▁hi", "<bos: x>"]);
        meta.bos_token_id = Some(8);
        let tokenizer = build_tokenizer(&meta).expect("build");
        assert_eq!(ids(&tokenizer, "hi", true), [8, 7]);
        let pair = tokenizer.encode(("hi", "hi"), true).expect("encode pair");
        assert_eq!(pair.get_ids(), [8, 7, 8, 7]);
        assert_eq!(pair.get_type_ids(), [0, 0, 1, 1]);
    }

    #[test]
    fn unknown_model_is_refused_naming_it_and_the_supported_ones() {
        let mut meta = spm(&["a"]);
        meta.model = "t5".into();
        let e = error(&meta);
        assert!(matches!(&e, TokenizerError::UnsupportedModel { model } if model == "t5"));
        let message = e.to_string();
        for needle in ["\"t5\"", "\"gpt2\"", "\"llama\""] {
            assert!(message.contains(needle), "{message}");
        }
    }

    #[test]
    fn lengths_that_disagree_with_the_vocabulary_are_refused() {
        let mut meta = spm(&["a", "b"]);
        meta.scores.as_mut().expect("scores").pop();
        assert!(matches!(
            error(&meta),
            TokenizerError::LengthMismatch {
                key: "scores",
                len: 4,
                tokens: 5
            }
        ));
        let mut meta = spm(&["a", "b"]);
        meta.token_type.as_mut().expect("types").push(1);
        assert!(matches!(
            error(&meta),
            TokenizerError::LengthMismatch {
                key: "token_type",
                len: 6,
                tokens: 5
            }
        ));
        let meta = TokenizerMetadata {
            model: "gpt2".into(),
            merges: Some(vec![]),
            ..Default::default()
        };
        assert!(matches!(error(&meta), TokenizerError::EmptyVocabulary));
    }

    #[test]
    fn ids_past_the_vocabulary_are_refused() {
        type Spoil = fn(&mut TokenizerMetadata);
        let cases: [(&str, Spoil); 4] = [
            ("bos_token_id", |m| m.bos_token_id = Some(5)),
            ("eos_token_id", |m| m.eos_token_id = Some(u32::MAX)),
            ("unknown_token_id", |m| m.unknown_token_id = Some(7)),
            ("padding_token_id", |m| m.padding_token_id = Some(5)),
        ];
        for (key, spoil) in cases {
            let mut meta = spm(&["a", "b"]);
            spoil(&mut meta);
            let e = error(&meta);
            assert!(
                matches!(&e, TokenizerError::TokenIdOutOfRange { key: k, tokens: 5, .. } if *k == key),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn bad_merges_are_refused() {
        for bad in ["ab", "a b c", "a  b"] {
            let mut meta = spm(&["a", "b", "ab"]);
            meta.merges = Some(vec!["a b".into(), bad.into()]);
            let e = error(&meta);
            assert!(
                matches!(&e, TokenizerError::MalformedMerge { index: 1, merge } if merge == bad),
                "{bad:?}: {e}"
            );
        }
        let mut meta = spm(&["a", "b", "ab"]);
        meta.merges = Some(vec!["a c".into()]);
        let e = error(&meta);
        assert!(
            matches!(&e, TokenizerError::MergeOutOfVocabulary { index: 0, token, .. } if token == "c"),
            "{e}"
        );
        let mut meta = spm(&["a", "b"]);
        meta.merges = Some(vec!["a b".into()]); // makes "ab", which is not a token
        assert!(matches!(
            error(&meta),
            TokenizerError::MergeOutOfVocabulary { token, .. } if token == "ab"
        ));
    }

    #[test]
    fn merges_need_scores_to_be_derived_and_scores_must_be_numbers() {
        let mut meta = spm(&["a", "b", "ab"]);
        meta.scores = None;
        assert!(matches!(error(&meta), TokenizerError::NoMergesNorScores));
        let mut meta = spm(&["a", "b", "ab"]);
        meta.scores.as_mut().expect("scores")[4] = f32::NAN;
        assert!(matches!(
            error(&meta),
            TokenizerError::NanScore { index: 4 }
        ));
        // scores are not needed when the file has merges
        meta.merges = Some(vec!["a b".into()]);
        build_tokenizer(&meta).expect("merges given");
    }

    /// A byte-level vocabulary: a token spelled outside the byte alphabet is respelled through
    /// it, and one typed control there is not added (llama.cpp's mislabel), nor is one typed
    /// user-defined whose spelling is not in the vocabulary.
    #[test]
    fn byte_level_respells_and_skips_mislabelled_tokens() {
        let tokens: Vec<String> = [
            "<|endoftext|>",
            "h",
            "i",
            "hi",
            "Ġ",
            "<a b>",
            "<x>",
            "<y z>",
        ]
        .iter()
        .map(|t| t.to_string())
        .collect();
        let meta = TokenizerMetadata {
            model: "gpt2".into(),
            tokens,
            token_type: Some(vec![
                CONTROL,
                1,
                1,
                1,
                1,
                CONTROL,
                USER_DEFINED,
                USER_DEFINED,
            ]),
            merges: Some(vec!["h i".into()]),
            ..Default::default()
        };
        let tokenizer = build_tokenizer(&meta).expect("build");
        assert_eq!(tokenizer.token_to_id("<aĠb>"), Some(5));
        assert_eq!(tokenizer.token_to_id("<a b>"), None);
        assert_eq!(tokenizer.token_to_id("<yĠz>"), Some(7));
        let added: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .collect();
        assert_eq!(added.len(), 2, "{added:?}");
        assert_eq!(ids(&tokenizer, "hi<x>hi<|endoftext|>", false), [3, 6, 3, 0]);
        assert_eq!(
            tokenizer.decode(&[3, 0, 4, 3], true).expect("decode"),
            "hi hi"
        );
    }

    #[test]
    fn written_file_is_the_built_tokenizer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tokenizer.json");
        let meta = spm(&["▁", "h", "i", "▁h", "▁hi"]);
        write_tokenizer_json(&meta, &path).expect("write");
        let loaded = Tokenizer::from_file(&path).expect("load");
        let built = build_tokenizer(&meta).expect("build");
        assert_eq!(
            loaded.to_string(false).expect("json"),
            built.to_string(false).expect("json")
        );
        // a bad file writes nothing
        let bad = dir.path().join("bad.json");
        let mut meta = meta;
        meta.model = "bert".into();
        assert!(write_tokenizer_json(&meta, &bad).is_err());
        assert!(!bad.exists());
    }
}
