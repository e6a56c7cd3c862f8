//! DeepSeek V4 (GGUF arch `deepseek4`): the typed config, the weights bound by meaning, and the forward pass,
//! one short file per sublayer.

pub mod attention;
pub mod compressor;
pub mod config;
pub mod forward;
pub mod hc;
pub mod moe;
pub mod names;
pub mod paged;
pub mod sizes;
pub mod step;
pub mod tiny;
pub mod weights;
