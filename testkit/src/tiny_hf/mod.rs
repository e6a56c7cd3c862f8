//! Tiny DeepSeek V4 checkpoints in the official Hugging Face layout, for the tests of `ferrite quantize`
//! (checkpoint -> GGUF): `config.json` with the official keys (DSV4.md section 1), the demo vocabulary as
//! `tokenizer.json` + `tokenizer_config.json`, and safetensors shards with the official names, dtypes and shapes
//! (DSV4.md 2.1-2.5): FP8 E4M3 with one E8M0 scale per 128x128 tile for the attention, indexer query, shared-expert
//! and MTP projections; FP4 E2M1 (two per I8 byte) with one E8M0 scale per 32 inputs for the routed experts, one
//! tensor per expert; BF16 for embeddings, head, norms, compressors, indexer weights and the router; F32 for the
//! hyper-connection tensors, sinks, APEs and the router bias; I64 for `tid2eid`.
//!
//! [`Fill::Model`] stores the values of [`ferrite::model::tiny`]'s seeded model rounded to those dtypes, and
//! [`write_tiny_model_official`] writes the GGUF holding exactly the dequantized checkpoint values, i.e. what a
//! correct converter makes of the checkpoint. [`Fill::Fast`] stores random bytes of the right kinds instead, streamed,
//! so multi-GB checkpoints (e.g. [`TinyConfig::big_experts`]) take seconds.

use std::io;
use std::path::{Path, PathBuf};

use quantize::safetensors_write::{self, TensorEntry, WriteError};

use ferrite::model::tiny::{DemoVocab, TinyConfig, TinyError, Vocabulary};

mod fast;
mod json;
mod layout;
#[cfg(test)]
mod tests;
mod values;

use fast::FastFill;
use json::{config_json, tokenizer_config_json, tokenizer_json, write_json};
use layout::plan;
pub use values::write_tiny_model_official;
use values::ModelFill;

/// FP8 tile size (`quantization_config.weight_block_size`).
pub const FP8_BLOCK: usize = 128;
/// Inputs per FP4 scale.
pub const FP4_BLOCK: usize = 32;

/// What [`write_tiny_checkpoint`] writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// Safetensors files: 1 gives a single `model.safetensors` (no index, as Hugging Face saves a model that fits
    /// one shard); N >= 2 gives `model-0000K-of-0000N.safetensors` plus `model.safetensors.index.json`.
    pub shards: usize,
    /// Also the MTP block `mtp.0.*` (config `num_nextn_predict_layers` 1).
    pub mtp: bool,
    pub fill: Fill,
}

impl Default for CheckpointOptions {
    fn default() -> CheckpointOptions {
        CheckpointOptions {
            shards: 2,
            mtp: false,
            fill: Fill::Model,
        }
    }
}

/// Where the tensor data comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// The tiny model's seeded values ([`ferrite::model::tiny`]) rounded to the official dtypes; matches
    /// [`write_tiny_model_official`] with the same configuration and seed. Holds one tensor (a stacked expert
    /// tensor for the routed experts) in memory at a time: meant for small configurations.
    Model,
    /// Random bytes of the right kinds, streamed: FP8 bytes never NaN, scales 2^-8..2^0, any FP4 nibbles, small
    /// finite BF16/F32 values, valid expert ids. For size tests.
    Fast,
}

/// What [`write_tiny_checkpoint`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointSummary {
    /// Bytes of tensor data (the index's `metadata.total_size`).
    pub total_size: u64,
    /// Bytes of the safetensors files (headers included).
    pub file_bytes: u64,
    pub n_tensors: usize,
    /// The safetensors files, in order.
    pub shards: Vec<PathBuf>,
    /// `model.safetensors.index.json` (absent with one shard).
    pub index: Option<PathBuf>,
    pub config: PathBuf,
    /// `tokenizer.json` and `tokenizer_config.json`, with the demo vocabulary.
    pub tokenizer: Option<[PathBuf; 2]>,
}

/// Why a checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Config(#[from] TinyError),
    #[error("checkpoint options: {0}")]
    Options(String),
    #[error("writing the checkpoint: {0}")]
    Write(#[from] WriteError),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("checkpoint tensor {tensor}: {detail}")]
    Encode { tensor: String, detail: String },
}

// ---------------------------------------------------------------------------------------------------------------
// The checkpoint writer.

/// Writes a tiny checkpoint of `cfg` into the folder `dir` (created if missing): `config.json`, with
/// [`Vocabulary::Demo`] `tokenizer.json` + `tokenizer_config.json`, and the safetensors shards (see
/// [`CheckpointOptions`]). Same configuration, seed and options give the same files.
pub fn write_tiny_checkpoint(
    dir: &Path,
    cfg: &TinyConfig,
    seed: u64,
    opts: &CheckpointOptions,
) -> Result<CheckpointSummary, CheckpointError> {
    if opts.shards == 0 {
        return Err(CheckpointError::Options("shards must be at least 1".into()));
    }
    let plan = plan(cfg, opts.mtp)?;
    if opts.shards > plan.tensors.len() {
        return Err(CheckpointError::Options(format!(
            "{} shards for {} tensors: each shard needs at least one",
            opts.shards,
            plan.tensors.len()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let config = dir.join("config.json");
    write_json(&config, &config_json(cfg, opts.mtp))?;
    let tokenizer = match cfg.vocab {
        Vocabulary::None => None,
        Vocabulary::Demo => {
            let vocab = DemoVocab::new(cfg.n_vocab);
            let tok = dir.join("tokenizer.json");
            let tok_cfg = dir.join("tokenizer_config.json");
            write_json(&tok, &tokenizer_json(&vocab)?)?;
            write_json(&tok_cfg, &tokenizer_config_json(cfg))?;
            Some([tok, tok_cfg])
        }
    };

    let entries: Vec<TensorEntry> = plan.tensors.iter().map(|t| t.entry.clone()).collect();
    let metadata = [("format".to_string(), "pt".to_string())].into();
    // The callback can only return io::Error: a generation failure is parked here.
    let mut failure: Option<CheckpointError> = None;
    let written = {
        let mut model = ModelFill::new(&plan, seed);
        let mut fast = FastFill::new(seed, cfg.n_expert);
        safetensors_write::write_checkpoint(dir, &entries, opts.shards, &metadata, |i, _, out| {
            let t = &plan.tensors[i];
            let result = match opts.fill {
                Fill::Model => model.bytes(t).and_then(|b| {
                    out.write_all(&b).map_err(|source| CheckpointError::Io {
                        path: dir.to_path_buf(),
                        source,
                    })
                }),
                Fill::Fast => fast.write(t, out).map_err(|source| CheckpointError::Io {
                    path: dir.to_path_buf(),
                    source,
                }),
            };
            result.map_err(|e| {
                let msg = e.to_string();
                failure = Some(e);
                io::Error::other(msg)
            })
        })
    };
    if let Some(e) = failure {
        return Err(e);
    }
    let written = written?;
    Ok(CheckpointSummary {
        total_size: written.total_size,
        file_bytes: written.file_bytes,
        n_tensors: written.n_tensors,
        shards: written.shards,
        index: written.index,
        config,
        tokenizer,
    })
}
