//! Value functions on LM hidden states for RE-Control.
//!
//! This crate will hold the value MLP, its Bellman-consistent training loss (terminal reward at
//! the last valid step, stop-gradient on the bootstrap target) and streaming training from the
//! rollout store. Nothing is implemented yet.
