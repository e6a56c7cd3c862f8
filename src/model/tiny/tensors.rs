//! Tensors: names, shapes (ggml order), types and how their values are drawn.

use gguf::GgmlType;

use super::{TinyConfig, HC_MULT};
use crate::model::names::{self, blk, global};

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// N(0, std²).
    Normal(f32),
    /// 1 + N(0, 0.1²): RMSNorm weights.
    Norm,
    /// Uniform in [lo, hi).
    Uniform(f32, f32),
    /// `n_used` distinct expert ids in 0..n_expert per token row (I32).
    ExpertIds { n_expert: u32 },
}

/// One GGUF tensor: name, shape (ggml order), type and how its values are drawn.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub init: Init,
}

/// Pre-activation std of the expert gate/up projections on RMS-normalised inputs: |x| > 10 for ~21 % of them,
/// so the SwiGLU clamp at 10 bites (DSV4.md section 7).
const EXPERT_PREACT_STD: f32 = 8.0;
/// Expert down projections are scaled so a clamped SwiGLU (rms ~ 40) gives O(1) outputs.
const EXPERT_DOWN_GAIN: f32 = 1.0 / 32.0;

pub fn tensor_specs(cfg: &TinyConfig) -> Vec<TensorSpec> {
    let mut v = Vec::new();
    let d = u64::from(cfg.n_embd);
    let n_vocab = u64::from(cfg.n_vocab);
    let hc_dim = u64::from(HC_MULT) * d;
    let hc_mix = u64::from((2 + HC_MULT) * HC_MULT);
    let t = cfg.types;
    let f32_ = GgmlType::F32;
    // Dense weights ~ N(0, 1/in): outputs keep the scale of their (normalised) inputs.
    let dense = |dims: &[u64]| Init::Normal(1.0 / (dims[0] as f32).sqrt());
    let mut push = |name: String, dims: &[u64], ty: GgmlType, init: Init| {
        v.push(TensorSpec {
            name,
            dims: dims.to_vec(),
            ty,
            init,
        })
    };

    push(
        global::TOKEN_EMBD.into(),
        &[d, n_vocab],
        t.embed,
        Init::Normal(1.0),
    );
    push(global::OUTPUT_NORM.into(), &[d], f32_, Init::Norm);
    push(global::OUTPUT.into(), &[d, n_vocab], t.embed, dense(&[d]));
    push(
        global::OUTPUT_HC_FN.into(),
        &[hc_dim, u64::from(HC_MULT)],
        f32_,
        dense(&[hc_dim]),
    );
    push(
        global::OUTPUT_HC_BASE.into(),
        &[u64::from(HC_MULT)],
        f32_,
        Init::Normal(1.0),
    );
    push(
        global::OUTPUT_HC_SCALE.into(),
        &[1],
        f32_,
        Init::Uniform(0.5, 1.5),
    );

    let h = u64::from(cfg.n_head);
    let dh = u64::from(cfg.head_dim);
    let q = u64::from(cfg.q_lora_rank);
    let groups = u64::from(cfg.o_groups);
    let o_rank = u64::from(cfg.o_lora_rank);
    let n_exp = u64::from(cfg.n_expert);
    let ff = u64::from(cfg.expert_ffn);
    let ff_sh = ff * u64::from(cfg.n_expert_shared);
    let ih = u64::from(cfg.indexer_n_head);
    let id = u64::from(cfg.indexer_head_dim);
    let gate_up = Init::Normal(EXPERT_PREACT_STD / (d as f32).sqrt());
    for il in 0..cfg.n_layer {
        let n = |suffix: &str| names::layer(il, suffix);
        push(n(blk::ATTN_NORM), &[d], f32_, Init::Norm);
        push(n(blk::FFN_NORM), &[d], f32_, Init::Norm);
        for (fn_, base, scale) in [
            (blk::HC_ATTN_FN, blk::HC_ATTN_BASE, blk::HC_ATTN_SCALE),
            (blk::HC_FFN_FN, blk::HC_FFN_BASE, blk::HC_FFN_SCALE),
        ] {
            push(n(fn_), &[hc_dim, hc_mix], f32_, dense(&[hc_dim]));
            push(n(base), &[hc_mix], f32_, Init::Normal(1.0));
            push(n(scale), &[3], f32_, Init::Uniform(0.5, 1.5));
        }
        push(n(blk::ATTN_SINKS), &[h], f32_, Init::Normal(1.0));
        push(n(blk::ATTN_Q_A), &[d, q], t.dense, dense(&[d]));
        push(n(blk::ATTN_Q_A_NORM), &[q], f32_, Init::Norm);
        push(n(blk::ATTN_Q_B), &[q, h * dh], t.dense, dense(&[q]));
        push(n(blk::ATTN_KV), &[d, dh], t.dense, dense(&[d]));
        push(n(blk::ATTN_KV_NORM), &[dh], f32_, Init::Norm);
        push(
            n(blk::ATTN_OUTPUT_A),
            &[h * dh / groups, groups * o_rank],
            t.dense,
            dense(&[h * dh / groups]),
        );
        push(
            n(blk::ATTN_OUTPUT_B),
            &[groups * o_rank, d],
            t.dense,
            dense(&[groups * o_rank]),
        );

        let ratio = u64::from(cfg.compress_ratios[il as usize]);
        if ratio != 0 {
            let coff = if ratio == 4 { 2 } else { 1 };
            push(n(blk::COMP_KV), &[d, coff * dh], t.dense, dense(&[d]));
            push(n(blk::COMP_GATE), &[d, coff * dh], t.dense, dense(&[d]));
            push(
                n(blk::COMP_APE),
                &[coff * dh, ratio],
                f32_,
                Init::Normal(0.5),
            );
            push(n(blk::COMP_NORM), &[dh], f32_, Init::Norm);
        }
        if ratio == 4 {
            push(n(blk::INDEXER_Q_B), &[q, ih * id], t.dense, dense(&[q]));
            push(n(blk::INDEXER_PROJ), &[d, ih], t.dense, dense(&[d]));
            push(n(blk::INDEXER_COMP_KV), &[d, 2 * id], t.dense, dense(&[d]));
            push(
                n(blk::INDEXER_COMP_GATE),
                &[d, 2 * id],
                t.dense,
                dense(&[d]),
            );
            push(
                n(blk::INDEXER_COMP_APE),
                &[2 * id, 4],
                f32_,
                Init::Normal(0.5),
            );
            push(n(blk::INDEXER_COMP_NORM), &[id], f32_, Init::Norm);
        }

        // Router logits ~ N(0, 1); the selection bias is big enough to change some choices, not all.
        push(n(blk::FFN_GATE_INP), &[d, n_exp], t.dense, dense(&[d]));
        if il < cfg.hash_layer_count {
            let init = Init::ExpertIds {
                n_expert: cfg.n_expert,
            };
            push(
                n(blk::FFN_TID2EID),
                &[u64::from(cfg.n_expert_used), n_vocab],
                GgmlType::I32,
                init,
            );
        } else {
            push(n(blk::FFN_EXP_PROBS_B), &[n_exp], f32_, Init::Normal(0.1));
        }
        let down = |width: u64| Init::Normal(EXPERT_DOWN_GAIN / (width as f32).sqrt());
        push(n(blk::FFN_GATE_EXPS), &[d, ff, n_exp], t.experts, gate_up);
        push(n(blk::FFN_UP_EXPS), &[d, ff, n_exp], t.experts, gate_up);
        push(n(blk::FFN_DOWN_EXPS), &[ff, d, n_exp], t.experts, down(ff));
        push(n(blk::FFN_GATE_SHEXP), &[d, ff_sh], t.shared, gate_up);
        push(n(blk::FFN_UP_SHEXP), &[d, ff_sh], t.shared, gate_up);
        push(n(blk::FFN_DOWN_SHEXP), &[ff_sh, d], t.shared, down(ff_sh));
    }
    v
}
