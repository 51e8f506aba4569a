//! Reward models for RE-Control.
//!
//! This crate will hold Bradley-Terry reward models trained on preference pairs (an LM backbone
//! plus a scalar head, the layout of Hugging Face `LlamaForSequenceClassification`), rule-based
//! rewards from a TOML spec, and the labelling of rollout stores. Nothing is implemented yet.
