//! ONNX artifacts for RE-Control value heads.
//!
//! This crate will write `value.onnx`, `value_grad.onnx` (the value and its gradient with respect
//! to the hidden state) and `controller.onnx` (the whole gradient-ascent edit) from a value
//! directory. It does not depend on libtorch. Nothing is implemented yet.
