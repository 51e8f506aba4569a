//! Controlled generation for RE-Control.
//!
//! This crate will hold the editor that moves the LM's final post-norm hidden state up the value
//! function's gradient at every decoding step (`h <- h + alpha * dV/dh`), behind the `lm` crate's
//! hidden-state hook, with ONNX Runtime and libtorch gradient backends. Nothing is implemented yet.
