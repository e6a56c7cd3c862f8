//! A Hugging Face DeepSeek V4 checkpoint as llama.cpp's `deepseek4` GGUF sees it: `config.json` -> the metadata of
//! DSV4.md section 1 (exact GGUF types), and every GGUF tensor -> the checkpoint tensors it is made of (DSV4.md 2.1
//! to 2.5), checked for presence, dtype and shape before anything is written.

use std::path::PathBuf;

mod config;
mod data;
mod layout;

pub use data::{has_mtp, resolve, Encoded, HfData, HfMatrix};
pub use layout::{HfTensor, Source};

/// Why a checkpoint cannot be converted.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {key}: {problem}", path.display())]
    Config {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{}: architectures is {got}, expected [\"DeepseekV4ForCausalLM\"]", path.display())]
    Architecture { path: PathBuf, got: String },
    #[error(transparent)]
    Checkpoint(#[from] crate::safetensors::Error),
    #[error("{}: tensor {name:?} (for {gguf}) is missing", dir.display())]
    Missing {
        dir: PathBuf,
        name: String,
        gguf: String,
    },
    #[error("{}: tensor {name:?} has dtype {got}, expected {expected}", dir.display())]
    Dtype {
        dir: PathBuf,
        name: String,
        expected: String,
        got: String,
    },
    #[error("{}: tensor {name:?} has shape {got:?}, expected {expected:?}", dir.display())]
    Shape {
        dir: PathBuf,
        name: String,
        expected: Vec<u64>,
        got: Vec<u64>,
    },
    #[error("{}: {n} checkpoint tensors have no place in a deepseek4 GGUF, e.g. {examples}", dir.display())]
    Unknown {
        dir: PathBuf,
        n: usize,
        examples: String,
    },
}

/// The hyperparameters of `config.json` that the GGUF needs.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    pub n_layer: u32,
    pub nextn_predict_layers: u32,
    pub context_length: u32,
    pub n_embd: u32,
    pub n_vocab: u32,
    pub n_head: u32,
    pub head_dim: u32,
    pub n_rot: u32,
    pub q_lora_rank: u32,
    pub o_lora_rank: u32,
    pub o_groups: u32,
    pub sliding_window: u32,
    /// As many entries as the config lists (main layers, then the MTP block's).
    pub compress_ratios: Vec<u32>,
    pub compress_rope_theta: f32,
    pub rope_theta: f32,
    pub yarn: Option<Yarn>,
    pub rms_eps: f32,
    pub n_expert: u32,
    pub n_expert_used: u32,
    pub expert_ffn: u32,
    pub n_expert_shared: u32,
    pub routed_scale: f32,
    pub norm_topk_prob: bool,
    pub n_hash_layers: u32,
    pub swiglu_limit: f32,
    pub indexer_n_head: u32,
    pub indexer_head_dim: u32,
    pub indexer_top_k: u32,
    pub hc_mult: u32,
    pub hc_sinkhorn_iters: u32,
    pub hc_eps: f32,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// `quantization_config.weight_block_size` of the FP8 weights: [rows, cols].
    pub fp8_block: [u64; 2],
}

/// YaRN rope scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f32,
    pub original_context: u32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}
