//! llama.cpp GGUF files imported into Hugging Face model directories.
//!
//! - [`tokenizer`]: a `tokenizer.json` from the `tokenizer.ggml.*` metadata, tokenizing as HF
//!   transformers' own GGUF tokenizer does.

pub mod tokenizer;
