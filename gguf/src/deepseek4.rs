//! Every GGUF key and tensor name of DeepSeek V4 (`deepseek4`) in one table, as llama.cpp spells them. The model
//! (ferrite::model), the converter (quantize) and the tests all name tensors through it.

/// `general.architecture` of DeepSeek V4.
pub const ARCH: &str = "deepseek4";

/// Metadata keys (the `deepseek4.` prefix included).
pub mod key {
    pub const ARCHITECTURE: &str = "general.architecture";
    pub const BLOCK_COUNT: &str = "deepseek4.block_count";
    pub const NEXTN_PREDICT_LAYERS: &str = "deepseek4.nextn_predict_layers";
    pub const CONTEXT_LENGTH: &str = "deepseek4.context_length";
    pub const EMBEDDING_LENGTH: &str = "deepseek4.embedding_length";
    pub const VOCAB_SIZE: &str = "deepseek4.vocab_size";
    pub const HEAD_COUNT: &str = "deepseek4.attention.head_count";
    pub const HEAD_COUNT_KV: &str = "deepseek4.attention.head_count_kv";
    pub const KEY_LENGTH: &str = "deepseek4.attention.key_length";
    pub const VALUE_LENGTH: &str = "deepseek4.attention.value_length";
    pub const ROPE_DIMENSION_COUNT: &str = "deepseek4.rope.dimension_count";
    pub const Q_LORA_RANK: &str = "deepseek4.attention.q_lora_rank";
    pub const OUTPUT_LORA_RANK: &str = "deepseek4.attention.output_lora_rank";
    pub const OUTPUT_GROUP_COUNT: &str = "deepseek4.attention.output_group_count";
    pub const SLIDING_WINDOW: &str = "deepseek4.attention.sliding_window";
    pub const COMPRESS_RATIOS: &str = "deepseek4.attention.compress_ratios";
    pub const COMPRESS_ROPE_FREQ_BASE: &str = "deepseek4.attention.compress_rope_freq_base";
    pub const ROPE_FREQ_BASE: &str = "deepseek4.rope.freq_base";
    pub const ROPE_SCALING_TYPE: &str = "deepseek4.rope.scaling.type";
    pub const ROPE_SCALING_FACTOR: &str = "deepseek4.rope.scaling.factor";
    pub const ROPE_SCALING_ORIG_CTX: &str = "deepseek4.rope.scaling.original_context_length";
    pub const ROPE_SCALING_BETA_FAST: &str = "deepseek4.rope.scaling.yarn_beta_fast";
    pub const ROPE_SCALING_BETA_SLOW: &str = "deepseek4.rope.scaling.yarn_beta_slow";
    pub const RMS_EPS: &str = "deepseek4.attention.layer_norm_rms_epsilon";
    pub const EXPERT_COUNT: &str = "deepseek4.expert_count";
    pub const EXPERT_USED_COUNT: &str = "deepseek4.expert_used_count";
    pub const EXPERT_FFN_LENGTH: &str = "deepseek4.expert_feed_forward_length";
    pub const EXPERT_SHARED_COUNT: &str = "deepseek4.expert_shared_count";
    pub const EXPERT_WEIGHTS_SCALE: &str = "deepseek4.expert_weights_scale";
    pub const EXPERT_WEIGHTS_NORM: &str = "deepseek4.expert_weights_norm";
    pub const EXPERT_GATING_FUNC: &str = "deepseek4.expert_gating_func";
    pub const HASH_LAYER_COUNT: &str = "deepseek4.hash_layer_count";
    pub const SWIGLU_CLAMP_EXP: &str = "deepseek4.swiglu_clamp_exp";
    pub const SWIGLU_CLAMP_SHEXP: &str = "deepseek4.swiglu_clamp_shexp";
    pub const INDEXER_HEAD_COUNT: &str = "deepseek4.attention.indexer.head_count";
    pub const INDEXER_KEY_LENGTH: &str = "deepseek4.attention.indexer.key_length";
    pub const INDEXER_TOP_K: &str = "deepseek4.attention.indexer.top_k";
    pub const HC_COUNT: &str = "deepseek4.hyper_connection.count";
    pub const HC_SINKHORN_ITERS: &str = "deepseek4.hyper_connection.sinkhorn_iterations";
    pub const HC_EPS: &str = "deepseek4.hyper_connection.epsilon";
    pub const EXPERT_GROUP_COUNT: &str = "deepseek4.expert_group_count";
    pub const EXPERT_GROUP_USED_COUNT: &str = "deepseek4.expert_group_used_count";

    pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
    pub const TOKENIZER_PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENIZER_TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKENIZER_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const TOKENIZER_MERGES: &str = "tokenizer.ggml.merges";
    pub const TOKENIZER_BOS: &str = "tokenizer.ggml.bos_token_id";
    pub const TOKENIZER_EOS: &str = "tokenizer.ggml.eos_token_id";
    pub const TOKENIZER_PAD: &str = "tokenizer.ggml.padding_token_id";
    pub const TOKENIZER_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const TOKENIZER_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// `expert_gating_func` value for sqrt(softplus(x)) scoring (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SQRT_SOFTPLUS).
pub const GATING_SQRT_SOFTPLUS: u32 = 4;

/// Global tensors.
pub mod global {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    pub const OUTPUT: &str = "output.weight";
    pub const OUTPUT_HC_FN: &str = "output_hc_fn.weight";
    pub const OUTPUT_HC_BASE: &str = "output_hc_base.weight";
    pub const OUTPUT_HC_SCALE: &str = "output_hc_scale.weight";
}

/// Per-layer tensor suffixes: the full name is `blk.{layer}.{suffix}` (see [`layer`]).
pub mod blk {
    pub const ATTN_NORM: &str = "attn_norm.weight";
    pub const FFN_NORM: &str = "ffn_norm.weight";
    pub const HC_ATTN_FN: &str = "hc_attn_fn.weight";
    pub const HC_ATTN_BASE: &str = "hc_attn_base.weight";
    pub const HC_ATTN_SCALE: &str = "hc_attn_scale.weight";
    pub const HC_FFN_FN: &str = "hc_ffn_fn.weight";
    pub const HC_FFN_BASE: &str = "hc_ffn_base.weight";
    pub const HC_FFN_SCALE: &str = "hc_ffn_scale.weight";
    pub const ATTN_SINKS: &str = "attn_sinks.weight";
    pub const ATTN_Q_A: &str = "attn_q_a.weight";
    pub const ATTN_Q_A_NORM: &str = "attn_q_a_norm.weight";
    pub const ATTN_Q_B: &str = "attn_q_b.weight";
    pub const ATTN_KV: &str = "attn_kv.weight";
    pub const ATTN_KV_NORM: &str = "attn_kv_a_norm.weight";
    pub const ATTN_OUTPUT_A: &str = "attn_output_a.weight";
    pub const ATTN_OUTPUT_B: &str = "attn_output_b.weight";
    pub const FFN_GATE_INP: &str = "ffn_gate_inp.weight";
    pub const FFN_GATE_EXPS: &str = "ffn_gate_exps.weight";
    pub const FFN_UP_EXPS: &str = "ffn_up_exps.weight";
    pub const FFN_DOWN_EXPS: &str = "ffn_down_exps.weight";
    pub const FFN_GATE_SHEXP: &str = "ffn_gate_shexp.weight";
    pub const FFN_UP_SHEXP: &str = "ffn_up_shexp.weight";
    pub const FFN_DOWN_SHEXP: &str = "ffn_down_shexp.weight";
    pub const FFN_TID2EID: &str = "ffn_gate_tid2eid.weight";
    pub const FFN_EXP_PROBS_B: &str = "exp_probs_b.bias";
    pub const COMP_KV: &str = "attn_compressor_kv.weight";
    pub const COMP_GATE: &str = "attn_compressor_gate.weight";
    pub const COMP_APE: &str = "attn_compressor_ape.weight";
    pub const COMP_NORM: &str = "attn_compressor_norm.weight";
    pub const INDEXER_Q_B: &str = "indexer.attn_q_b.weight";
    pub const INDEXER_PROJ: &str = "indexer.proj.weight";
    pub const INDEXER_COMP_KV: &str = "indexer_compressor_kv.weight";
    pub const INDEXER_COMP_GATE: &str = "indexer_compressor_gate.weight";
    pub const INDEXER_COMP_APE: &str = "indexer_compressor_ape.weight";
    pub const INDEXER_COMP_NORM: &str = "indexer_compressor_norm.weight";
    pub const NEXTN_EH_PROJ: &str = "nextn.eh_proj.weight";
    pub const NEXTN_ENORM: &str = "nextn.enorm.weight";
    pub const NEXTN_HNORM: &str = "nextn.hnorm.weight";
    pub const NEXTN_SHARED_HEAD_NORM: &str = "nextn.shared_head_norm.weight";
    pub const NEXTN_SHARED_HEAD_HEAD: &str = "nextn.shared_head_head.weight";
    pub const NEXTN_EMBED_TOKENS: &str = "nextn.embed_tokens.weight";
}

/// The full name of a per-layer tensor: `blk.{layer}.{suffix}`.
pub fn layer(layer: u32, suffix: &str) -> String {
    format!("blk.{layer}.{suffix}")
}
