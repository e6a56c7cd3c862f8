//! The official layout: which checkpoint tensors make each GGUF tensor, in which dtype.

use quantize::safetensors::Dtype;
use quantize::safetensors_write::TensorEntry;

use super::{CheckpointError, FP4_BLOCK, FP8_BLOCK};
use ferrite::model::names::{blk, global, layer};
use ferrite::model::tiny::{tensor_specs, Init, TensorSpec, TinyConfig, TinyError, HC_MULT};

/// The official dtype family of a tensor (DSV4.md 2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Official {
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
pub(super) enum Slice {
    /// All of it: `cols = dims[0]`, `rows` = the other dims' product.
    All,
    /// Expert `e` of `{in, out, E}`: `[out, in]`.
    Expert(u64),
    /// Inputs `start..start + len` of `{in, out}`: `[out, len]`.
    Cols(u64, u64),
}

/// The bytes one checkpoint tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Part {
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
pub(super) struct HfTensor {
    pub(super) entry: TensorEntry,
    pub(super) spec: usize,
    pub(super) slice: Slice,
    pub(super) part: Part,
}

/// Everything one checkpoint is made of.
pub(super) struct Plan {
    /// The GGUF tensors, then the checkpoint-only ones (`mtp.0.hc_head_*`).
    pub(super) specs: Vec<TensorSpec>,
    pub(super) tensors: Vec<HfTensor>,
}

/// `[rows, cols]` of a slice of a spec's values.
pub(super) fn matrix_of(dims: &[u64], slice: Slice) -> (u64, u64) {
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
pub(super) fn official_specs(
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

pub(super) fn plan(cfg: &TinyConfig, mtp: bool) -> Result<Plan, CheckpointError> {
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
pub(super) fn official_of(name: &str, n_layer: u32) -> Option<Official> {
    Some(match map_of(name, n_layer)?.1 {
        Map::Whole(_, official) => official,
        Map::Experts(_) => Official::Fp4,
        Map::ConcatInputs(..) => Official::Fp8,
    })
}
