//! Tiny DeepSeek V4 checkpoints in the official Hugging Face layout, for the tests of `ferrite quantize`
//! (checkpoint -> GGUF): `config.json` with the official keys (DSV4.md section 1), the demo vocabulary as
//! `tokenizer.json` + `tokenizer_config.json`, and safetensors shards with the official names, dtypes and shapes
//! (DSV4.md 2.1-2.5): FP8 E4M3 with one E8M0 scale per 128x128 tile for the attention, indexer query, shared-expert
//! and MTP projections; FP4 E2M1 (two per I8 byte) with one E8M0 scale per 32 inputs for the routed experts, one
//! tensor per expert; BF16 for embeddings, head, norms, compressors, indexer weights and the router; F32 for the
//! hyper-connection tensors, sinks, APEs and the router bias; I64 for `tid2eid`.
//!
//! [`Fill::Model`] stores the values of [`super::tiny`]'s seeded model rounded to those dtypes, and
//! [`write_tiny_model_official`] writes the GGUF holding exactly the dequantized checkpoint values, i.e. what a
//! correct converter makes of the checkpoint. [`Fill::Fast`] stores random bytes of the right kinds instead, streamed,
//! so multi-GB checkpoints (e.g. [`TinyConfig::big_experts`]) take seconds.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use quantize::dequant::{fp4_blocks, fp8_blocks};
use quantize::fp::{fp4_encode_rows, fp8_encode_blocks};
use quantize::safetensors::Dtype;
use quantize::safetensors_write::{self, TensorEntry, WriteError};
use serde::ser::{SerializeMap, Serializer};
use serde_json::{json, Value as Json};

use super::names::{blk, global, layer};
use super::tiny::{
    tensor_specs, tensor_values, write_specs, DemoVocab, Init, TensorSpec, TinyConfig, TinyError,
    TinyModel, Values, Vocabulary, ASSISTANT_TEXT, BOS_TEXT, EOS_TEXT, HC_MULT, THINK_END_TEXT,
    THINK_TEXT, USER_TEXT,
};

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
    /// The tiny model's seeded values ([`super::tiny`]) rounded to the official dtypes; matches
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
// The official layout: which checkpoint tensors make each GGUF tensor, in which dtype.

/// The official dtype family of a tensor (DSV4.md 2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Official {
    /// F8_E4M3 weight + F8_E8M0 `.scale` per 128x128 tile.
    Fp8,
    /// I8 weight (two E2M1 per byte) + F8_E8M0 `.scale` per 32 inputs, one tensor per expert.
    Fp4,
    Bf16,
    F32,
    I64,
}

/// How the checkpoint names map onto one GGUF tensor.
#[derive(Clone, Copy, Debug)]
enum Map {
    /// One checkpoint tensor (name suffix after the layer prefix, or a global name).
    Whole(&'static str, Official),
    /// Stacked experts `{in, out, E}` <- `ffn.experts.E.<w>.weight`, FP4.
    Experts(&'static str),
    /// `[e_proj | h_proj]` along the inputs <- `e_proj.weight`, `h_proj.weight`, FP8 each.
    ConcatInputs(&'static str, &'static str),
}

/// The checkpoint side of a per-layer GGUF tensor suffix (DSV4.md 2.2-2.5).
fn layer_map(suffix: &str) -> Option<Map> {
    use Map::{ConcatInputs, Experts, Whole};
    use Official::{Bf16, Fp8, F32, I64};
    Some(match suffix {
        blk::ATTN_NORM => Whole("attn_norm.weight", Bf16),
        blk::FFN_NORM => Whole("ffn_norm.weight", Bf16),
        blk::HC_ATTN_FN => Whole("hc_attn_fn", F32),
        blk::HC_ATTN_BASE => Whole("hc_attn_base", F32),
        blk::HC_ATTN_SCALE => Whole("hc_attn_scale", F32),
        blk::HC_FFN_FN => Whole("hc_ffn_fn", F32),
        blk::HC_FFN_BASE => Whole("hc_ffn_base", F32),
        blk::HC_FFN_SCALE => Whole("hc_ffn_scale", F32),
        blk::ATTN_SINKS => Whole("attn.attn_sink", F32),
        blk::ATTN_Q_A => Whole("attn.wq_a.weight", Fp8),
        blk::ATTN_Q_A_NORM => Whole("attn.q_norm.weight", Bf16),
        blk::ATTN_Q_B => Whole("attn.wq_b.weight", Fp8),
        blk::ATTN_KV => Whole("attn.wkv.weight", Fp8),
        blk::ATTN_KV_NORM => Whole("attn.kv_norm.weight", Bf16),
        blk::ATTN_OUTPUT_A => Whole("attn.wo_a.weight", Fp8),
        blk::ATTN_OUTPUT_B => Whole("attn.wo_b.weight", Fp8),
        blk::COMP_KV => Whole("attn.compressor.wkv.weight", Bf16),
        blk::COMP_GATE => Whole("attn.compressor.wgate.weight", Bf16),
        blk::COMP_APE => Whole("attn.compressor.ape", F32),
        blk::COMP_NORM => Whole("attn.compressor.norm.weight", Bf16),
        blk::INDEXER_Q_B => Whole("attn.indexer.wq_b.weight", Fp8),
        blk::INDEXER_PROJ => Whole("attn.indexer.weights_proj.weight", Bf16),
        blk::INDEXER_COMP_KV => Whole("attn.indexer.compressor.wkv.weight", Bf16),
        blk::INDEXER_COMP_GATE => Whole("attn.indexer.compressor.wgate.weight", Bf16),
        blk::INDEXER_COMP_APE => Whole("attn.indexer.compressor.ape", F32),
        blk::INDEXER_COMP_NORM => Whole("attn.indexer.compressor.norm.weight", Bf16),
        blk::FFN_GATE_INP => Whole("ffn.gate.weight", Bf16),
        blk::FFN_TID2EID => Whole("ffn.gate.tid2eid", I64),
        blk::FFN_EXP_PROBS_B => Whole("ffn.gate.bias", F32),
        blk::FFN_GATE_EXPS => Experts("w1"),
        blk::FFN_UP_EXPS => Experts("w3"),
        blk::FFN_DOWN_EXPS => Experts("w2"),
        blk::FFN_GATE_SHEXP => Whole("ffn.shared_experts.w1.weight", Fp8),
        blk::FFN_UP_SHEXP => Whole("ffn.shared_experts.w3.weight", Fp8),
        blk::FFN_DOWN_SHEXP => Whole("ffn.shared_experts.w2.weight", Fp8),
        blk::NEXTN_EH_PROJ => ConcatInputs("e_proj.weight", "h_proj.weight"),
        blk::NEXTN_ENORM => Whole("enorm.weight", Bf16),
        blk::NEXTN_HNORM => Whole("hnorm.weight", Bf16),
        blk::NEXTN_SHARED_HEAD_NORM => Whole("norm.weight", Bf16),
        _ => return None,
    })
}

/// The checkpoint side of a global GGUF tensor (DSV4.md 2.1).
fn global_map(name: &str) -> Option<Map> {
    use Official::{Bf16, F32};
    Some(Map::Whole(
        match name {
            global::TOKEN_EMBD => "embed.weight",
            global::OUTPUT_NORM => "norm.weight",
            global::OUTPUT => "head.weight",
            global::OUTPUT_HC_FN => "hc_head_fn",
            global::OUTPUT_HC_BASE => "hc_head_base",
            global::OUTPUT_HC_SCALE => "hc_head_scale",
            _ => return None,
        },
        match name {
            global::OUTPUT_HC_FN | global::OUTPUT_HC_BASE | global::OUTPUT_HC_SCALE => F32,
            _ => Bf16,
        },
    ))
}

/// The checkpoint name prefix and mapping of a GGUF tensor: `("layers.N." | "mtp.0." | "", map)`.
fn map_of(name: &str, n_layer: u32) -> Option<(String, Map)> {
    if let Some(m) = global_map(name) {
        return Some((String::new(), m));
    }
    let rest = name.strip_prefix("blk.")?;
    let (il, suffix) = rest.split_once('.')?;
    let il: u32 = il.parse().ok()?;
    let prefix = if il < n_layer {
        format!("layers.{il}.")
    } else {
        format!("mtp.{}.", il - n_layer)
    };
    Some((prefix, layer_map(suffix)?))
}

/// Which part of a GGUF tensor's values one checkpoint tensor holds, as a row-major `[rows, cols]` matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Slice {
    /// All of it: `cols = dims[0]`, `rows` = the other dims' product.
    All,
    /// Expert `e` of `{in, out, E}`: `[out, in]`.
    Expert(u64),
    /// Inputs `start..start + len` of `{in, out}`: `[out, len]`.
    Cols(u64, u64),
}

/// The bytes one checkpoint tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Fp8Weight,
    Fp8Scale,
    Fp4Weight,
    Fp4Scale,
    Bf16,
    F32,
    I64,
}

/// One checkpoint tensor: its entry, and the spec (index into the plan's specs) and slice its values come from.
#[derive(Clone, Debug)]
struct HfTensor {
    entry: TensorEntry,
    spec: usize,
    slice: Slice,
    part: Part,
}

/// Everything one checkpoint is made of.
struct Plan {
    /// The GGUF tensors, then the checkpoint-only ones (`mtp.0.hc_head_*`).
    specs: Vec<TensorSpec>,
    tensors: Vec<HfTensor>,
}

/// `[rows, cols]` of a slice of a spec's values.
fn matrix_of(dims: &[u64], slice: Slice) -> (u64, u64) {
    match slice {
        Slice::All => (
            dims.iter().skip(1).product(),
            dims.first().copied().unwrap_or(1),
        ),
        Slice::Expert(_) => (dims.get(1).copied().unwrap_or(1), dims[0]),
        Slice::Cols(_, len) => (dims.get(1).copied().unwrap_or(1), len),
    }
}

/// The checks the official formats add to [`TinyConfig::validate`]: FP4 rows are whole 32-input blocks.
fn validate_official(cfg: &TinyConfig) -> Result<(), TinyError> {
    let mut problems = Vec::new();
    for (name, v) in [("n_embd", cfg.n_embd), ("expert_ffn", cfg.expert_ffn)] {
        if v % FP4_BLOCK as u32 != 0 {
            problems.push(format!(
                "{name}: expected a multiple of {FP4_BLOCK} (FP4 experts have one scale per {FP4_BLOCK} inputs), got {v}"
            ));
        }
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(TinyError::Config(problems.join("; "))),
    }
}

/// The GGUF metadata configuration and tensors of `cfg` as a converter makes them from the checkpoint: with `mtp`
/// one more layer (ratio 0, score routing) plus `nextn.*`; `nextn_predict_layers` is 1 exactly with the MTP block.
/// Also the checkpoint-only MTP tensors (`mtp.0.hc_head_*`, which llama.cpp has no slot for), after the GGUF ones.
fn official_specs(
    cfg: &TinyConfig,
    mtp: bool,
) -> Result<(TinyConfig, Vec<TensorSpec>, usize), TinyError> {
    cfg.validate()?;
    validate_official(cfg)?;
    let mut meta = cfg.clone();
    meta.nextn_predict_layers = u32::from(mtp);
    if mtp {
        meta.n_layer += 1;
        meta.compress_ratios.push(0);
        meta.validate()?;
    }
    let mut specs = tensor_specs(&meta);
    if mtp {
        let d = u64::from(cfg.n_embd);
        let n = |suffix: &str| layer(cfg.n_layer, suffix);
        let f32_ = gguf::GgmlType::F32;
        let spec = |name: String, dims: &[u64], ty, init| TensorSpec {
            name,
            dims: dims.to_vec(),
            ty,
            init,
        };
        let dense = Init::Normal(1.0 / ((2 * d) as f32).sqrt());
        specs.push(spec(
            n(blk::NEXTN_EH_PROJ),
            &[2 * d, d],
            cfg.types.dense,
            dense,
        ));
        for s in [
            blk::NEXTN_ENORM,
            blk::NEXTN_HNORM,
            blk::NEXTN_SHARED_HEAD_NORM,
        ] {
            specs.push(spec(n(s), &[d], f32_, Init::Norm));
        }
        let n_gguf = specs.len();
        let hc = u64::from(HC_MULT);
        let hc_dim = hc * d;
        specs.push(spec(
            "mtp.0.hc_head_fn".into(),
            &[hc_dim, hc],
            f32_,
            Init::Normal(1.0 / (hc_dim as f32).sqrt()),
        ));
        specs.push(spec(
            "mtp.0.hc_head_base".into(),
            &[hc],
            f32_,
            Init::Normal(1.0),
        ));
        specs.push(spec(
            "mtp.0.hc_head_scale".into(),
            &[1],
            f32_,
            Init::Uniform(0.5, 1.5),
        ));
        return Ok((meta, specs, n_gguf));
    }
    let n_gguf = specs.len();
    Ok((meta, specs, n_gguf))
}

fn plan(cfg: &TinyConfig, mtp: bool) -> Result<Plan, CheckpointError> {
    let (_, specs, n_gguf) = official_specs(cfg, mtp)?;
    let mut tensors = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (prefix, map) = if i >= n_gguf {
            // Checkpoint-only: named as is.
            (String::new(), Map::Whole("", Official::F32))
        } else {
            map_of(&spec.name, cfg.n_layer).ok_or_else(|| {
                CheckpointError::Options(format!(
                    "no checkpoint name for GGUF tensor {}",
                    spec.name
                ))
            })?
        };
        let mut push = |name: String, slice: Slice, official: Official| {
            let (rows, cols) = matrix_of(&spec.dims, slice);
            let reversed: Vec<u64> = spec.dims.iter().rev().copied().collect();
            let mut add = |name: String, dtype: Dtype, shape: Vec<u64>, part: Part| {
                tensors.push(HfTensor {
                    entry: TensorEntry { name, dtype, shape },
                    spec: i,
                    slice,
                    part,
                })
            };
            let base = name.strip_suffix(".weight").unwrap_or(&name).to_string();
            match official {
                Official::Fp8 => {
                    let b = FP8_BLOCK as u64;
                    add(name, Dtype::F8E4M3, vec![rows, cols], Part::Fp8Weight);
                    let scale = vec![rows.div_ceil(b), cols.div_ceil(b)];
                    add(
                        format!("{base}.scale"),
                        Dtype::F8E8M0,
                        scale,
                        Part::Fp8Scale,
                    );
                }
                Official::Fp4 => {
                    add(name, Dtype::I8, vec![rows, cols / 2], Part::Fp4Weight);
                    let scale = vec![rows, cols / FP4_BLOCK as u64];
                    add(
                        format!("{base}.scale"),
                        Dtype::F8E8M0,
                        scale,
                        Part::Fp4Scale,
                    );
                }
                Official::Bf16 => add(name, Dtype::BF16, reversed, Part::Bf16),
                Official::F32 => add(name, Dtype::F32, reversed, Part::F32),
                Official::I64 => add(name, Dtype::I64, reversed, Part::I64),
            }
        };
        match map {
            Map::Whole(suffix, official) => {
                let name = if i >= n_gguf {
                    spec.name.clone()
                } else {
                    format!("{prefix}{suffix}")
                };
                push(name, Slice::All, official);
            }
            Map::Experts(w) => {
                let n_expert = spec.dims.get(2).copied().unwrap_or(1);
                for e in 0..n_expert {
                    let name = format!("{prefix}ffn.experts.{e}.{w}.weight");
                    push(name, Slice::Expert(e), Official::Fp4);
                }
            }
            Map::ConcatInputs(first, second) => {
                let half = spec.dims[0] / 2;
                push(
                    format!("{prefix}{first}"),
                    Slice::Cols(0, half),
                    Official::Fp8,
                );
                push(
                    format!("{prefix}{second}"),
                    Slice::Cols(half, half),
                    Official::Fp8,
                );
            }
        }
    }
    Ok(Plan { specs, tensors })
}

/// The official family of a GGUF tensor's values (for the GGUF side of the rounding).
fn official_of(name: &str, n_layer: u32) -> Option<Official> {
    Some(match map_of(name, n_layer)?.1 {
        Map::Whole(_, official) => official,
        Map::Experts(_) => Official::Fp4,
        Map::ConcatInputs(..) => Official::Fp8,
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Values: the slice of a spec's values, encoded in the official formats and decoded back.

/// `[rows, cols]` of `values` (a spec's values in ggml order) for `slice`.
fn slice_values(values: &[f32], dims: &[u64], slice: Slice) -> Vec<f32> {
    let (rows, cols) = matrix_of(dims, slice);
    let (rows, cols) = (rows as usize, cols as usize);
    match slice {
        Slice::All => values.to_vec(),
        Slice::Expert(e) => {
            let n = rows * cols;
            values[e as usize * n..(e as usize + 1) * n].to_vec()
        }
        Slice::Cols(start, _) => {
            let width = dims[0] as usize;
            let start = start as usize;
            (0..rows)
                .flat_map(|r| {
                    values[r * width + start..r * width + start + cols]
                        .iter()
                        .copied()
                })
                .collect()
        }
    }
}

/// A matrix in an official block format.
struct Encoded {
    weight: Vec<u8>,
    scale: Vec<u8>,
}

fn encode_blocks(
    tensor: &str,
    values: &[f32],
    rows: usize,
    cols: usize,
    official: Official,
) -> Result<Encoded, String> {
    let (weight, scale) = match official {
        Official::Fp8 => fp8_encode_blocks(values, rows, cols, FP8_BLOCK),
        Official::Fp4 => fp4_encode_rows(values, rows, cols),
        _ => return Err(format!("{tensor} is not block-quantized")),
    }
    .map_err(|e| e.to_string())?;
    Ok(Encoded { weight, scale })
}

fn decode_blocks(
    enc: &Encoded,
    rows: usize,
    cols: usize,
    official: Official,
) -> Result<Vec<f32>, String> {
    match official {
        Official::Fp8 => fp8_blocks(&enc.weight, &enc.scale, rows, cols, FP8_BLOCK),
        _ => fp4_blocks(&enc.weight, &enc.scale, rows, cols),
    }
    .map_err(|e| e.to_string())
}

fn bf16_round(v: f32) -> f32 {
    half::bf16::from_f32(v).to_f32()
}

/// A GGUF tensor's values after a round trip through the official checkpoint dtypes: FP8/FP4 encoded and decoded
/// with `quantize`'s exact decoders (FP8 tiles and FP4 blocks per checkpoint tensor: per expert, per half of
/// `eh_proj`), BF16 rounded to nearest even, F32 and ids unchanged.
fn official_values(spec: &TensorSpec, n_layer: u32, seed: u64) -> Result<Values, TinyError> {
    let type_err = |detail: String| TinyError::Type {
        tensor: spec.name.clone(),
        ty: spec.ty,
        detail,
    };
    let official = official_of(&spec.name, n_layer)
        .ok_or_else(|| type_err("no official checkpoint dtype for this tensor".into()))?;
    let values = match tensor_values(spec, seed) {
        Values::Ids(ids) => return Ok(Values::Ids(ids)),
        Values::F32(values) => values,
    };
    Ok(Values::F32(match official {
        Official::F32 | Official::I64 => values,
        Official::Bf16 => values.into_iter().map(bf16_round).collect(),
        Official::Fp8 | Official::Fp4 => {
            let width = spec.dims[0] as usize;
            // Blocks never straddle the two halves of eh_proj: each half is its own checkpoint tensor.
            let parts: Vec<(usize, usize)> = if spec.name.ends_with(blk::NEXTN_EH_PROJ) {
                vec![(0, width / 2), (width / 2, width - width / 2)]
            } else {
                vec![(0, width)]
            };
            let rows = values.len() / width.max(1);
            let mut out = values.clone();
            for (start, len) in parts {
                let part: Vec<f32> = (0..rows)
                    .flat_map(|r| {
                        values[r * width + start..r * width + start + len]
                            .iter()
                            .copied()
                    })
                    .collect();
                // FP4 blocks run along rows, so the stacked experts can go as one matrix; FP8 tiles need 2-D.
                let enc =
                    encode_blocks(&spec.name, &part, rows, len, official).map_err(type_err)?;
                let dec = decode_blocks(&enc, rows, len, official).map_err(type_err)?;
                for r in 0..rows {
                    out[r * width + start..r * width + start + len]
                        .copy_from_slice(&dec[r * len..(r + 1) * len]);
                }
            }
            out
        }
    }))
}

/// Writes the GGUF a correct converter makes of [`write_tiny_checkpoint`]`(dir, cfg, seed, {mtp, Fill::Model})`: the
/// tensors of [`super::tiny::write_tiny_model`] (names, shapes, and types from `cfg.types`; per-expert tensors
/// stacked `{in, out, E}`) holding exactly the dequantized checkpoint values. With `cfg.types` all F32 (`tid2eid`
/// I32) that is the exact F32 GGUF of the checkpoint. With `mtp`, block `n_layer` (ratio 0) and its `nextn.eh_proj`
/// / `enorm` / `hnorm` / `shared_head_norm` are there too (block_count `n_layer + 1`), and `nextn_predict_layers`
/// is 1; without, it is 0 (whatever `cfg.nextn_predict_layers` says), as in the checkpoint's `config.json`.
/// FP8 tiles and FP4 blocks follow the checkpoint tensors: `n_embd` and `expert_ffn` must be multiples of 32.
pub fn write_tiny_model_official(
    path: &Path,
    cfg: &TinyConfig,
    seed: u64,
    mtp: bool,
) -> Result<TinyModel, TinyError> {
    let (meta, specs, n_gguf) = official_specs(cfg, mtp)?;
    let specs = &specs[..n_gguf];
    write_specs(path, &meta, specs, |spec| {
        match official_values(spec, cfg.n_layer, seed)? {
            Values::Ids(ids) => Ok(ids.into_iter().flat_map(i32::to_le_bytes).collect()),
            Values::F32(values) => super::tiny::encode_values(spec, &values),
        }
    })
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

/// [`Fill::Model`]: each checkpoint tensor's bytes from its spec's values. Keeps the values of the last few specs
/// (the experts of a layer come from three stacked tensors) and the last encoded block matrices (a weight and its
/// `.scale` are written one after the other).
struct ModelFill<'p> {
    plan: &'p Plan,
    seed: u64,
    values: Vec<(usize, std::rc::Rc<Values>)>,
    encoded: Vec<((usize, Slice), std::rc::Rc<Encoded>)>,
}

const VALUE_CACHE: usize = 4;
const ENCODED_CACHE: usize = 2;

impl<'p> ModelFill<'p> {
    fn new(plan: &'p Plan, seed: u64) -> ModelFill<'p> {
        ModelFill {
            plan,
            seed,
            values: Vec::new(),
            encoded: Vec::new(),
        }
    }

    fn values(&mut self, spec: usize) -> std::rc::Rc<Values> {
        if let Some((_, v)) = self.values.iter().find(|(s, _)| *s == spec) {
            return v.clone();
        }
        let v = std::rc::Rc::new(tensor_values(&self.plan.specs[spec], self.seed));
        if self.values.len() == VALUE_CACHE {
            self.values.remove(0);
        }
        self.values.push((spec, v.clone()));
        v
    }

    fn encoded(
        &mut self,
        t: &HfTensor,
        official: Official,
    ) -> Result<std::rc::Rc<Encoded>, CheckpointError> {
        let key = (t.spec, t.slice);
        if let Some((_, e)) = self.encoded.iter().find(|(k, _)| *k == key) {
            return Ok(e.clone());
        }
        let spec = &self.plan.specs[t.spec];
        let values = match &*self.values(t.spec) {
            Values::F32(v) => slice_values(v, &spec.dims, t.slice),
            Values::Ids(_) => return Err(self.encode_err(t, "expert ids are not a weight")),
        };
        let (rows, cols) = matrix_of(&spec.dims, t.slice);
        let enc = encode_blocks(
            &t.entry.name,
            &values,
            rows as usize,
            cols as usize,
            official,
        )
        .map_err(|d| self.encode_err(t, &d))?;
        let enc = std::rc::Rc::new(enc);
        if self.encoded.len() == ENCODED_CACHE {
            self.encoded.remove(0);
        }
        self.encoded.push((key, enc.clone()));
        Ok(enc)
    }

    fn encode_err(&self, t: &HfTensor, detail: &str) -> CheckpointError {
        CheckpointError::Encode {
            tensor: t.entry.name.clone(),
            detail: detail.to_string(),
        }
    }

    fn bytes(&mut self, t: &HfTensor) -> Result<Vec<u8>, CheckpointError> {
        match t.part {
            Part::Fp8Weight => Ok(self.encoded(t, Official::Fp8)?.weight.clone()),
            Part::Fp8Scale => Ok(self.encoded(t, Official::Fp8)?.scale.clone()),
            Part::Fp4Weight => Ok(self.encoded(t, Official::Fp4)?.weight.clone()),
            Part::Fp4Scale => Ok(self.encoded(t, Official::Fp4)?.scale.clone()),
            Part::I64 => match &*self.values(t.spec) {
                Values::Ids(ids) => Ok(ids
                    .iter()
                    .flat_map(|&e| i64::from(e).to_le_bytes())
                    .collect()),
                Values::F32(_) => Err(self.encode_err(t, "not expert ids")),
            },
            Part::Bf16 | Part::F32 => {
                let spec = &self.plan.specs[t.spec];
                let values = match &*self.values(t.spec) {
                    Values::F32(v) => slice_values(v, &spec.dims, t.slice),
                    Values::Ids(_) => return Err(self.encode_err(t, "expert ids are not floats")),
                };
                Ok(match t.part {
                    Part::Bf16 => values
                        .iter()
                        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                        .collect(),
                    _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                })
            }
        }
    }
}

/// [`Fill::Fast`]: random bytes of the right kind, generated and written in chunks.
struct FastFill {
    seed: u64,
    n_expert: u64,
    buf: Vec<u8>,
}

/// Bytes generated per write: the writer's buffer size, so that big tensors bypass its copy.
const FAST_CHUNK: usize = 8 << 20;

/// wyrand: a fast 64-bit generator (one multiply per 8 bytes).
struct WyRand(u64);

impl WyRand {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }
}

impl FastFill {
    fn new(seed: u64, n_expert: u32) -> FastFill {
        FastFill {
            seed,
            n_expert: u64::from(n_expert.max(1)),
            buf: Vec::with_capacity(FAST_CHUNK),
        }
    }

    fn write(&mut self, t: &HfTensor, out: &mut dyn Write) -> io::Result<()> {
        let hash = t.entry.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = WyRand(self.seed ^ hash.rotate_left(29));
        let total = t.entry.byte_len().unwrap_or(0) as usize;
        if t.part == Part::I64 {
            // Rows of n_used distinct ids: consecutive experts from a random start.
            let n_used = t.entry.shape.get(1).copied().unwrap_or(1);
            let rows = t.entry.shape.first().copied().unwrap_or(0);
            self.buf.clear();
            for _ in 0..rows {
                let start = rng.next() % self.n_expert;
                for j in 0..n_used {
                    let id = (start + j) % self.n_expert;
                    self.buf.extend_from_slice(&(id as i64).to_le_bytes());
                }
                if self.buf.len() >= FAST_CHUNK {
                    out.write_all(&self.buf)?;
                    self.buf.clear();
                }
            }
            return out.write_all(&self.buf);
        }
        let mut left = total;
        while left > 0 {
            let n = left.min(FAST_CHUNK);
            self.buf.clear();
            // Whole words, then the bytes needed; every kind keeps its element boundaries (chunks are a multiple
            // of 8 bytes except the last).
            while self.buf.len() < n {
                let w = fast_word(t.part, rng.next());
                self.buf.extend_from_slice(&w.to_le_bytes());
            }
            self.buf.truncate(n);
            out.write_all(&self.buf)?;
            left -= n;
        }
        Ok(())
    }
}

/// The random word `r` made into 8 bytes of one kind.
fn fast_word(part: Part, r: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    match part {
        // FP8: flip the lowest bit of every byte whose low 7 bits are all ones (0x7f / 0xff are NaN).
        Part::Fp8Weight => {
            let y = (r & LOW7) ^ LOW7; // zero bytes where the low 7 bits were all ones
            let nonzero = (y + LOW7) & !LOW7; // high bit set in nonzero bytes (no carries: bytes <= 0x7f)
            let zero = !nonzero & 0x8080_8080_8080_8080;
            r ^ (zero >> 7)
        }
        // Scales 2^-8..2^0: bytes 119..=127.
        Part::Fp8Scale | Part::Fp4Scale => {
            let mut w = 0u64;
            let mut x = r;
            for k in 0..8 {
                w |= (119 + (x & 0xff) % 9) << (8 * k);
                x >>= 8;
            }
            w
        }
        Part::Fp4Weight => r,
        // BF16: sign, exponent 120..=123 (2^-7..2^-4 times 1..2), any mantissa.
        Part::Bf16 => (r & 0x81ff_81ff_81ff_81ff) | 0x3c00_3c00_3c00_3c00,
        // F32: the same magnitudes.
        Part::F32 => (r & 0x81ff_ffff_81ff_ffff) | 0x3c00_0000_3c00_0000,
        // Not used: ids are written row by row.
        Part::I64 => r,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// config.json and the tokenizer files.

/// An f32 as the JSON number of its shortest decimal form (1e-6, not 9.99999997e-7).
fn num(v: f32) -> Json {
    v.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Json::Null, Json::Number)
}

/// `config.json` with every key of the official DeepSeek-V4-Flash config (DSV4.md section 1).
fn config_json(cfg: &TinyConfig, mtp: bool) -> Json {
    let mut ratios = cfg.compress_ratios.clone();
    if mtp {
        ratios.push(0);
    }
    let entries: Vec<(&str, Json)> = vec![
        ("architectures", json!(["DeepseekV4ForCausalLM"])),
        ("model_type", json!("deepseek_v4")),
        ("num_hidden_layers", json!(cfg.n_layer)),
        ("num_nextn_predict_layers", json!(u32::from(mtp))),
        ("max_position_embeddings", json!(cfg.context_length)),
        ("hidden_size", json!(cfg.n_embd)),
        ("vocab_size", json!(cfg.n_vocab)),
        ("num_attention_heads", json!(cfg.n_head)),
        ("num_key_value_heads", json!(1)),
        ("head_dim", json!(cfg.head_dim)),
        ("qk_rope_head_dim", json!(cfg.n_rot)),
        ("q_lora_rank", json!(cfg.q_lora_rank)),
        ("o_lora_rank", json!(cfg.o_lora_rank)),
        ("o_groups", json!(cfg.o_groups)),
        ("sliding_window", json!(cfg.sliding_window)),
        ("compress_ratios", json!(ratios)),
        (
            "compress_rope_theta",
            json!(num(cfg.compress_rope_freq_base)),
        ),
        ("rope_theta", json!(num(cfg.rope_freq_base))),
        (
            "rope_scaling",
            json!({
                "type": "yarn",
                "factor": num(cfg.yarn_factor),
                "original_max_position_embeddings": cfg.yarn_orig_ctx,
                "beta_fast": 32,
                "beta_slow": 1,
            }),
        ),
        ("rms_norm_eps", json!(num(cfg.rms_eps))),
        ("n_routed_experts", json!(cfg.n_expert)),
        ("num_experts_per_tok", json!(cfg.n_expert_used)),
        ("moe_intermediate_size", json!(cfg.expert_ffn)),
        ("n_shared_experts", json!(cfg.n_expert_shared)),
        (
            "routed_scaling_factor",
            json!(num(cfg.expert_weights_scale)),
        ),
        ("norm_topk_prob", json!(true)),
        ("scoring_func", json!("sqrtsoftplus")),
        ("topk_method", json!("noaux_tc")),
        ("num_hash_layers", json!(cfg.hash_layer_count)),
        ("swiglu_limit", json!(num(cfg.swiglu_clamp))),
        ("index_n_heads", json!(cfg.indexer_n_head)),
        ("index_head_dim", json!(cfg.indexer_head_dim)),
        ("index_topk", json!(cfg.indexer_top_k)),
        ("hc_mult", json!(HC_MULT)),
        ("hc_sinkhorn_iters", json!(cfg.hc_sinkhorn_iters)),
        ("hc_eps", json!(num(cfg.hc_eps))),
        ("bos_token_id", json!(0)),
        ("eos_token_id", json!(1)),
        ("tie_word_embeddings", json!(false)),
        ("hidden_act", json!("silu")),
        ("attention_bias", json!(false)),
        ("torch_dtype", json!("bfloat16")),
        (
            "quantization_config",
            json!({
                "quant_method": "fp8",
                "fmt": "e4m3",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
                "scale_fmt": "ue8m0",
                "activation_scheme": "dynamic",
            }),
        ),
    ];
    Json::Object(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// DeepSeek V3/V4's pre-tokenizer regexes, as their tokenizer.json spells them (the same as ferrite's tokenizer).
const PRE_TOKENIZER_REGEXES: [&str; 3] = [
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

/// A JSON object of token -> id in id order (a map type would sort the keys).
struct OrderedVocab<'a>(&'a [(String, u32)]);

impl serde::Serialize for OrderedVocab<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (token, id) in self.0 {
            map.serialize_entry(token, id)?;
        }
        map.end()
    }
}

/// The demo vocabulary as a Hugging Face `tokenizer.json`, laid out like DeepSeek V4's: byte-level BPE whose
/// `model.vocab` holds BOS, EOS, the bytes and the merges (ids `0..first_added`), and `added_tokens` with BOS/EOS
/// and everything past the merges (`<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>` as normalized non-special
/// tokens, the placeholders special, as DeepSeek marks them); the DeepSeek pre-tokenizer and ByteLevel decoder.
fn tokenizer_json(vocab: &DemoVocab) -> Result<Json, CheckpointError> {
    let first_added = vocab.user as usize;
    let model_vocab: Vec<(String, u32)> = vocab.tokens[..first_added]
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let added = |id: usize, content: &str, special: bool| {
        json!({
            "id": id,
            "content": content,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": !special,
            "special": special,
        })
    };
    let mut added_tokens = vec![
        added(vocab.bos as usize, BOS_TEXT, true),
        added(vocab.eos as usize, EOS_TEXT, true),
    ];
    for (id, token) in vocab.tokens.iter().enumerate().skip(first_added) {
        let plain =
            [USER_TEXT, ASSISTANT_TEXT, THINK_TEXT, THINK_END_TEXT].contains(&token.as_str());
        added_tokens.push(added(id, token, !plain));
    }
    let splits: Vec<Json> = PRE_TOKENIZER_REGEXES
        .iter()
        .map(|re| {
            json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false})
        })
        .collect();
    let mut pre = splits;
    pre.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
    let vocab_json =
        serde_json::to_value(OrderedVocab(&model_vocab)).map_err(|e| CheckpointError::Encode {
            tensor: "tokenizer.json".into(),
            detail: e.to_string(),
        })?;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": {"type": "Sequence", "normalizers": []},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "vocab": vocab_json,
            "merges": vocab.merges,
        },
    }))
}

/// `tokenizer_config.json` as DeepSeek V4 ships it: BOS/EOS, no automatic BOS/EOS.
fn tokenizer_config_json(cfg: &TinyConfig) -> Json {
    let token = |content: &str| {
        json!({
            "__type": "AddedToken",
            "content": content,
            "lstrip": false,
            "normalized": true,
            "rstrip": false,
            "single_word": false,
        })
    };
    json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "bos_token": token(BOS_TEXT),
        "clean_up_tokenization_spaces": false,
        "eos_token": token(EOS_TEXT),
        "legacy": true,
        "model_max_length": cfg.context_length,
        "pad_token": token(EOS_TEXT),
        "sp_model_kwargs": {},
        "unk_token": null,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

fn write_json(path: &Path, value: &Json) -> Result<(), CheckpointError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| CheckpointError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    text.push('\n');
    safetensors_write::write_small_file(path, text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gguf_tensor_has_a_checkpoint_name() {
        for mtp in [false, true] {
            for cfg in [TinyConfig::small(), TinyConfig::alt()] {
                let p = plan(&cfg, mtp).unwrap();
                let mut names = std::collections::HashSet::new();
                for t in &p.tensors {
                    assert!(names.insert(t.entry.name.clone()), "{}", t.entry.name);
                    assert!(!t.entry.name.starts_with("model."), "{}", t.entry.name);
                }
                let (_, _, n_gguf) = official_specs(&cfg, mtp).unwrap();
                for (i, s) in p.specs.iter().enumerate().take(n_gguf) {
                    assert!(p.tensors.iter().any(|t| t.spec == i), "{}", s.name);
                }
            }
        }
    }

    #[test]
    fn fast_words_are_of_their_kind() {
        let mut rng = WyRand(5);
        for _ in 0..20000 {
            let r = rng.next();
            let w = fast_word(Part::Fp8Weight, r).to_le_bytes();
            assert!(w.iter().all(|b| b & 0x7f != 0x7f), "{w:x?}");
            // Only the NaN bytes change.
            for (a, b) in r.to_le_bytes().iter().zip(w) {
                assert!(*a == b || a & 0x7f == 0x7f);
            }
            let s = fast_word(Part::Fp8Scale, r).to_le_bytes();
            assert!(s.iter().all(|b| (119..=127).contains(b)), "{s:?}");
            for pair in fast_word(Part::Bf16, r).to_le_bytes().chunks(2) {
                let v = half::bf16::from_le_bytes([pair[0], pair[1]]).to_f32().abs();
                assert!((2f32.powi(-7)..2f32.powi(-3)).contains(&v), "{v}");
            }
            for quad in fast_word(Part::F32, r).to_le_bytes().chunks(4) {
                let v = f32::from_le_bytes(quad.try_into().unwrap()).abs();
                assert!((2f32.powi(-7)..2f32.powi(-3)).contains(&v), "{v}");
            }
        }
    }
}
