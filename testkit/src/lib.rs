//! Test support of the ferrite workspace: code that only tests use, so it stays out of the `ferrite` library.
//!
//! - [`expert_io`]: checks of expert reads (a slot against the mapped bytes), read jobs cut from slot buffers.
//! - [`ggml_gguf`]: ggml's own GGUF reader (`gguf_init_from_file`), to check that files ferrite writes read the same
//!   in ggml.
//! - [`mutants`]: mutants of model, session and other input files, each run in a forked child with limits.
//! - [`tiny_hf`]: tiny DeepSeek V4 checkpoints in the official Hugging Face layout (`ferrite quantize`'s input).

pub mod expert_io;
pub mod ggml_gguf;
pub mod mutants;
pub mod tiny_hf;
