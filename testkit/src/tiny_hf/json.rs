//! config.json and the tokenizer files.

use std::path::Path;

use quantize::safetensors_write;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{json, Value as Json};

use super::{CheckpointError, FP8_BLOCK};
use ferrite::model::tiny::{
    DemoVocab, TinyConfig, ASSISTANT_TEXT, BOS_TEXT, EOS_TEXT, HC_MULT, THINK_END_TEXT, THINK_TEXT,
    USER_TEXT,
};

/// An f32 as the JSON number of its shortest decimal form (1e-6, not 9.99999997e-7).
fn num(v: f32) -> Json {
    v.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Json::Null, Json::Number)
}

/// `config.json` with every key of the official DeepSeek-V4-Flash config (DSV4.md section 1).
pub(super) fn config_json(cfg: &TinyConfig, mtp: bool) -> Json {
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
pub(super) fn tokenizer_json(vocab: &DemoVocab) -> Result<Json, CheckpointError> {
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
pub(super) fn tokenizer_config_json(cfg: &TinyConfig) -> Json {
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

pub(super) fn write_json(path: &Path, value: &Json) -> Result<(), CheckpointError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| CheckpointError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    text.push('\n');
    safetensors_write::write_small_file(path, text.as_bytes())?;
    Ok(())
}
