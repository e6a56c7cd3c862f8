//! Test support of the ferrite workspace: code that only tests use, so it stays out of the `ferrite` library.
//!
//! - [`tiny_hf`]: tiny DeepSeek V4 checkpoints in the official Hugging Face layout (`ferrite quantize`'s input).

pub mod tiny_hf;
