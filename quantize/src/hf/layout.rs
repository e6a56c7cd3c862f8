//! The `deepseek4.*` metadata and llama.cpp's GGUF tensor layout, each tensor with the checkpoint tensors it is
//! made of (DSV4.md section 1 and 2.1 to 2.5).

use gguf::deepseek4::{blk, global, key, layer, ARCH, GATING_SQRT_SOFTPLUS};
use gguf::{Array, Value};

use super::HfConfig;

/// One GGUF tensor and where its values come from.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTensor {
    pub gguf: String,
    /// GGUF shape (ggml order: inputs first).
    pub dims: Vec<u64>,
    pub source: Source,
}

/// The checkpoint tensors behind one GGUF tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// A weight or norm: FP8 (with a `.scale` sibling), BF16, F16 or F32.
    Dense(String),
    /// A tensor that is F32 in the official checkpoint (hyper-connections, sinks, APE, router bias); BF16/F16 accepted.
    Float32(String),
    /// Per-expert weights stacked in expert order into `{in, out, E}`: FP4 (I8 + `.scale`), FP8, BF16, F16 or F32.
    Experts(Vec<String>),
    /// `tid2eid`: I64 (or I32) expert ids -> I32.
    TokenIds(String),
    /// Matrices with the same rows placed side by side along the input dimension (the MTP `eh_proj` = [e | h]).
    ConcatInputs(Vec<String>),
}

impl HfConfig {
    /// The `deepseek4.*` metadata for `block_count` blocks (main layers, plus 1 with the MTP block).
    pub fn metadata(&self, with_mtp: bool) -> Vec<(String, Value)> {
        let blocks = self.n_layer + u32::from(with_mtp);
        let u = Value::U32;
        let f = Value::F32;
        let mut m: Vec<(&str, Value)> = vec![
            (key::ARCHITECTURE, Value::String(ARCH.into())),
            (key::BLOCK_COUNT, u(blocks)),
            (key::NEXTN_PREDICT_LAYERS, u(u32::from(with_mtp))),
            (key::CONTEXT_LENGTH, u(self.context_length)),
            (key::EMBEDDING_LENGTH, u(self.n_embd)),
            (key::VOCAB_SIZE, u(self.n_vocab)),
            (key::HEAD_COUNT, u(self.n_head)),
            (key::HEAD_COUNT_KV, u(1)),
            (key::KEY_LENGTH, u(self.head_dim)),
            (key::VALUE_LENGTH, u(self.head_dim)),
            (key::ROPE_DIMENSION_COUNT, u(self.n_rot)),
            (key::Q_LORA_RANK, u(self.q_lora_rank)),
            (key::OUTPUT_LORA_RANK, u(self.o_lora_rank)),
            (key::OUTPUT_GROUP_COUNT, u(self.o_groups)),
            (key::SLIDING_WINDOW, u(self.sliding_window)),
            (
                key::COMPRESS_RATIOS,
                Value::Array(Array::I32(
                    (0..blocks).map(|il| self.ratio(il) as i32).collect(),
                )),
            ),
            (key::COMPRESS_ROPE_FREQ_BASE, f(self.compress_rope_theta)),
            (key::ROPE_FREQ_BASE, f(self.rope_theta)),
            (key::RMS_EPS, f(self.rms_eps)),
            (key::EXPERT_COUNT, u(self.n_expert)),
            (key::EXPERT_USED_COUNT, u(self.n_expert_used)),
            (key::EXPERT_FFN_LENGTH, u(self.expert_ffn)),
            (key::EXPERT_SHARED_COUNT, u(self.n_expert_shared)),
            (key::EXPERT_WEIGHTS_SCALE, f(self.routed_scale)),
            (key::EXPERT_WEIGHTS_NORM, Value::Bool(self.norm_topk_prob)),
            (key::EXPERT_GATING_FUNC, u(GATING_SQRT_SOFTPLUS)),
            (key::HASH_LAYER_COUNT, u(self.n_hash_layers)),
            (
                key::SWIGLU_CLAMP_EXP,
                Value::Array(Array::F32(vec![self.swiglu_limit; blocks as usize])),
            ),
            (key::INDEXER_HEAD_COUNT, u(self.indexer_n_head)),
            (key::INDEXER_KEY_LENGTH, u(self.indexer_head_dim)),
            (key::INDEXER_TOP_K, u(self.indexer_top_k)),
            (key::HC_COUNT, u(self.hc_mult)),
            (key::HC_SINKHORN_ITERS, u(self.hc_sinkhorn_iters)),
            (key::HC_EPS, f(self.hc_eps)),
        ];
        if let Some(y) = self.yarn {
            m.extend([
                (key::ROPE_SCALING_TYPE, Value::String("yarn".into())),
                (key::ROPE_SCALING_FACTOR, f(y.factor)),
                (key::ROPE_SCALING_ORIG_CTX, u(y.original_context)),
                (key::ROPE_SCALING_BETA_FAST, f(y.beta_fast)),
                (key::ROPE_SCALING_BETA_SLOW, f(y.beta_slow)),
            ]);
        }
        m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// Every GGUF tensor of the model in llama.cpp's layout, each with the checkpoint tensors it is made of.
    pub fn tensors(&self, with_mtp: bool) -> Vec<HfTensor> {
        let mut v = Vec::new();
        let d = u64::from(self.n_embd);
        let n_vocab = u64::from(self.n_vocab);
        let hc = u64::from(self.hc_mult);
        let hc_dim = hc * d;
        let hc_mix = (2 + hc) * hc;
        let mut push = |gguf: String, dims: &[u64], source: Source| {
            v.push(HfTensor {
                gguf,
                dims: dims.to_vec(),
                source,
            })
        };
        use Source::{Dense, Float32};
        push(
            global::TOKEN_EMBD.into(),
            &[d, n_vocab],
            Dense("embed.weight".into()),
        );
        push(
            global::OUTPUT_NORM.into(),
            &[d],
            Dense("norm.weight".into()),
        );
        push(
            global::OUTPUT.into(),
            &[d, n_vocab],
            Dense("head.weight".into()),
        );
        push(
            global::OUTPUT_HC_FN.into(),
            &[hc_dim, hc],
            Float32("hc_head_fn".into()),
        );
        push(
            global::OUTPUT_HC_BASE.into(),
            &[hc],
            Float32("hc_head_base".into()),
        );
        push(
            global::OUTPUT_HC_SCALE.into(),
            &[1],
            Float32("hc_head_scale".into()),
        );

        let h = u64::from(self.n_head);
        let dh = u64::from(self.head_dim);
        let q = u64::from(self.q_lora_rank);
        let groups = u64::from(self.o_groups);
        let o_rank = u64::from(self.o_lora_rank);
        let n_exp = u64::from(self.n_expert);
        let ff = u64::from(self.expert_ffn);
        let ff_sh = ff * u64::from(self.n_expert_shared);
        let ih = u64::from(self.indexer_n_head);
        let id = u64::from(self.indexer_head_dim);
        let blocks = self.n_layer + u32::from(with_mtp);
        for il in 0..blocks {
            let mtp = il >= self.n_layer;
            let hf = |s: &str| {
                if mtp {
                    format!("mtp.{}.{s}", il - self.n_layer)
                } else {
                    format!("layers.{il}.{s}")
                }
            };
            let n = |s: &str| layer(il, s);
            push(n(blk::ATTN_NORM), &[d], Dense(hf("attn_norm.weight")));
            push(n(blk::FFN_NORM), &[d], Dense(hf("ffn_norm.weight")));
            for (part, fn_, base, scale) in [
                (
                    "attn",
                    blk::HC_ATTN_FN,
                    blk::HC_ATTN_BASE,
                    blk::HC_ATTN_SCALE,
                ),
                ("ffn", blk::HC_FFN_FN, blk::HC_FFN_BASE, blk::HC_FFN_SCALE),
            ] {
                push(
                    n(fn_),
                    &[hc_dim, hc_mix],
                    Float32(hf(&format!("hc_{part}_fn"))),
                );
                push(n(base), &[hc_mix], Float32(hf(&format!("hc_{part}_base"))));
                push(n(scale), &[3], Float32(hf(&format!("hc_{part}_scale"))));
            }
            push(n(blk::ATTN_SINKS), &[h], Float32(hf("attn.attn_sink")));
            push(n(blk::ATTN_Q_A), &[d, q], Dense(hf("attn.wq_a.weight")));
            push(n(blk::ATTN_Q_A_NORM), &[q], Dense(hf("attn.q_norm.weight")));
            push(
                n(blk::ATTN_Q_B),
                &[q, h * dh],
                Dense(hf("attn.wq_b.weight")),
            );
            push(n(blk::ATTN_KV), &[d, dh], Dense(hf("attn.wkv.weight")));
            push(
                n(blk::ATTN_KV_NORM),
                &[dh],
                Dense(hf("attn.kv_norm.weight")),
            );
            push(
                n(blk::ATTN_OUTPUT_A),
                &[h * dh / groups, groups * o_rank],
                Dense(hf("attn.wo_a.weight")),
            );
            push(
                n(blk::ATTN_OUTPUT_B),
                &[groups * o_rank, d],
                Dense(hf("attn.wo_b.weight")),
            );
            let ratio = u64::from(self.ratio(il));
            if ratio != 0 {
                let coff = if ratio == 4 { 2 } else { 1 };
                push(
                    n(blk::COMP_KV),
                    &[d, coff * dh],
                    Dense(hf("attn.compressor.wkv.weight")),
                );
                push(
                    n(blk::COMP_GATE),
                    &[d, coff * dh],
                    Dense(hf("attn.compressor.wgate.weight")),
                );
                push(
                    n(blk::COMP_APE),
                    &[coff * dh, ratio],
                    Float32(hf("attn.compressor.ape")),
                );
                push(
                    n(blk::COMP_NORM),
                    &[dh],
                    Dense(hf("attn.compressor.norm.weight")),
                );
            }
            if ratio == 4 {
                push(
                    n(blk::INDEXER_Q_B),
                    &[q, ih * id],
                    Dense(hf("attn.indexer.wq_b.weight")),
                );
                push(
                    n(blk::INDEXER_PROJ),
                    &[d, ih],
                    Dense(hf("attn.indexer.weights_proj.weight")),
                );
                push(
                    n(blk::INDEXER_COMP_KV),
                    &[d, 2 * id],
                    Dense(hf("attn.indexer.compressor.wkv.weight")),
                );
                push(
                    n(blk::INDEXER_COMP_GATE),
                    &[d, 2 * id],
                    Dense(hf("attn.indexer.compressor.wgate.weight")),
                );
                push(
                    n(blk::INDEXER_COMP_APE),
                    &[2 * id, 4],
                    Float32(hf("attn.indexer.compressor.ape")),
                );
                push(
                    n(blk::INDEXER_COMP_NORM),
                    &[id],
                    Dense(hf("attn.indexer.compressor.norm.weight")),
                );
            }
            push(
                n(blk::FFN_GATE_INP),
                &[d, n_exp],
                Dense(hf("ffn.gate.weight")),
            );
            if !mtp && il < self.n_hash_layers {
                push(
                    n(blk::FFN_TID2EID),
                    &[u64::from(self.n_expert_used), n_vocab],
                    Source::TokenIds(hf("ffn.gate.tid2eid")),
                );
            } else {
                push(
                    n(blk::FFN_EXP_PROBS_B),
                    &[n_exp],
                    Float32(hf("ffn.gate.bias")),
                );
            }
            let experts = |w: &str| {
                Source::Experts(
                    (0..self.n_expert)
                        .map(|e| hf(&format!("ffn.experts.{e}.{w}.weight")))
                        .collect(),
                )
            };
            push(n(blk::FFN_GATE_EXPS), &[d, ff, n_exp], experts("w1"));
            push(n(blk::FFN_UP_EXPS), &[d, ff, n_exp], experts("w3"));
            push(n(blk::FFN_DOWN_EXPS), &[ff, d, n_exp], experts("w2"));
            push(
                n(blk::FFN_GATE_SHEXP),
                &[d, ff_sh],
                Dense(hf("ffn.shared_experts.w1.weight")),
            );
            push(
                n(blk::FFN_UP_SHEXP),
                &[d, ff_sh],
                Dense(hf("ffn.shared_experts.w3.weight")),
            );
            push(
                n(blk::FFN_DOWN_SHEXP),
                &[ff_sh, d],
                Dense(hf("ffn.shared_experts.w2.weight")),
            );
            if mtp {
                push(
                    n(blk::NEXTN_EH_PROJ),
                    &[2 * d, d],
                    Source::ConcatInputs(vec![hf("e_proj.weight"), hf("h_proj.weight")]),
                );
                push(n(blk::NEXTN_ENORM), &[d], Dense(hf("enorm.weight")));
                push(n(blk::NEXTN_HNORM), &[d], Dense(hf("hnorm.weight")));
                push(
                    n(blk::NEXTN_SHARED_HEAD_NORM),
                    &[d],
                    Dense(hf("norm.weight")),
                );
            }
        }
        v
    }
}
