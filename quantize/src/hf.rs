//! A Hugging Face DeepSeek V4 checkpoint as llama.cpp's `deepseek4` GGUF sees it: `config.json` -> the metadata of
//! DSV4.md section 1 (exact GGUF types), and every GGUF tensor -> the checkpoint tensors it is made of (DSV4.md 2.1
//! to 2.5), checked for presence, dtype and shape before anything is written.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use gguf::deepseek4::{blk, global, key, layer, ARCH, GATING_SQRT_SOFTPLUS};
use gguf::{Array, Value};
use serde_json::{Map, Value as Json};

use crate::safetensors::{Checkpoint, Dtype, TensorView};

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

/// Reads typed fields of a JSON object, naming the file and key in every error.
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Json>,
}

impl Fields<'_> {
    fn err(&self, key: &str, problem: impl Into<String>) -> HfError {
        HfError::Config {
            path: self.path.to_path_buf(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&Json> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn u32_opt(&self, key: &str) -> Result<Option<u32>, HfError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.err(key, format!("expected an unsigned 32-bit integer, got {v}"))
                }),
        }
    }

    fn u32(&self, key: &str) -> Result<u32, HfError> {
        self.u32_opt(key)?
            .ok_or_else(|| self.err(key, "missing (a DeepSeek V4 config.json has it)"))
    }

    fn f32_opt(&self, key: &str) -> Result<Option<f32>, HfError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }

    fn f32(&self, key: &str) -> Result<f32, HfError> {
        self.f32_opt(key)?
            .ok_or_else(|| self.err(key, "missing (a DeepSeek V4 config.json has it)"))
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, HfError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Json::as_str)
    }
}

const CONFIG_FILE: &str = "config.json";
const ARCHITECTURE: &str = "DeepseekV4ForCausalLM";

impl HfConfig {
    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<HfConfig, HfError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read(&path).map_err(|source| HfError::Io {
            path: path.clone(),
            source,
        })?;
        let json: Json = serde_json::from_slice(&text).map_err(|source| HfError::Json {
            path: path.clone(),
            source,
        })?;
        HfConfig::from_json(&json, &path)
    }

    /// Parses a config.json object; `path` only names the file in errors.
    pub fn from_json(json: &Json, path: &Path) -> Result<HfConfig, HfError> {
        let obj = json.as_object().ok_or_else(|| HfError::Config {
            path: path.to_path_buf(),
            key: "(top level)".into(),
            problem: "expected a JSON object".into(),
        })?;
        let f = Fields { path, obj };
        let archs = f.get("architectures");
        let is_v4 = archs
            .and_then(Json::as_array)
            .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(ARCHITECTURE)));
        if !is_v4 {
            return Err(HfError::Architecture {
                path: path.to_path_buf(),
                got: archs.map_or("missing".into(), |v| v.to_string()),
            });
        }

        let n_layer = f.u32("num_hidden_layers")?;
        let head_dim = f.u32("head_dim")?;
        let n_rot = match f.u32_opt("qk_rope_head_dim")? {
            Some(n) => n,
            // transformers' spelling: a fraction of the head.
            None => match f.f32_opt("partial_rotary_factor")? {
                Some(p) => (p * head_dim as f32).round() as u32,
                None => {
                    return Err(f.err(
                        "qk_rope_head_dim",
                        "missing (a DeepSeek V4 config.json has it)",
                    ))
                }
            },
        };
        let compress_ratios = compress_ratios(&f, n_layer)?;
        let n_hash_layers = match f.u32_opt("num_hash_layers")? {
            Some(n) => n,
            None => match f.get("mlp_layer_types").and_then(Json::as_array) {
                Some(types) => types
                    .iter()
                    .take_while(|t| t.as_str() == Some("hash_moe"))
                    .count() as u32,
                None => {
                    return Err(f.err(
                        "num_hash_layers",
                        "missing (a DeepSeek V4 config.json has it)",
                    ))
                }
            },
        };
        let rope_scaling = f.get("rope_scaling").or_else(|| f.get("rope_parameters"));
        let yarn = match rope_scaling {
            None => None,
            Some(Json::Object(o)) => {
                let s = Fields { path, obj: o };
                let kind = s
                    .str_opt("type")
                    .or_else(|| s.str_opt("rope_type"))
                    .unwrap_or("");
                match kind {
                    "yarn" => Some(Yarn {
                        factor: s.f32("factor")?,
                        original_context: s.u32("original_max_position_embeddings")?,
                        beta_fast: s.f32_opt("beta_fast")?.unwrap_or(32.0),
                        beta_slow: s.f32_opt("beta_slow")?.unwrap_or(1.0),
                    }),
                    "" | "default" => None,
                    other => {
                        return Err(f.err(
                            "rope_scaling.type",
                            format!("{other:?} is not supported; DeepSeek V4 uses \"yarn\""),
                        ))
                    }
                }
            }
            Some(v) => return Err(f.err("rope_scaling", format!("expected an object, got {v}"))),
        };
        let scoring = f.str_opt("scoring_func").unwrap_or("sqrtsoftplus");
        if scoring != "sqrtsoftplus" {
            return Err(f.err(
                "scoring_func",
                format!("{scoring:?}: llama.cpp's deepseek4 graph only runs \"sqrtsoftplus\""),
            ));
        }
        let fp8_block = match f
            .get("quantization_config")
            .and_then(|q| q.get("weight_block_size"))
        {
            None => [128, 128],
            Some(v) => {
                let b: Vec<u64> = v
                    .as_array()
                    .map(|a| a.iter().filter_map(Json::as_u64).collect())
                    .unwrap_or_default();
                match b.as_slice() {
                    [r, c] if *r > 0 && *c > 0 => [*r, *c],
                    _ => {
                        return Err(f.err(
                            "quantization_config.weight_block_size",
                            format!("expected two positive integers, got {v}"),
                        ))
                    }
                }
            }
        };
        let cfg = HfConfig {
            n_layer,
            nextn_predict_layers: f.u32_opt("num_nextn_predict_layers")?.unwrap_or(0),
            context_length: f.u32("max_position_embeddings")?,
            n_embd: f.u32("hidden_size")?,
            n_vocab: f.u32("vocab_size")?,
            n_head: f.u32("num_attention_heads")?,
            head_dim,
            n_rot,
            q_lora_rank: f.u32("q_lora_rank")?,
            o_lora_rank: f.u32("o_lora_rank")?,
            o_groups: f.u32("o_groups")?,
            sliding_window: f.u32("sliding_window")?,
            compress_ratios,
            compress_rope_theta: f.f32("compress_rope_theta")?,
            rope_theta: f.f32_opt("rope_theta")?.unwrap_or(10000.0),
            yarn,
            rms_eps: f.f32("rms_norm_eps")?,
            n_expert: f.u32("n_routed_experts")?,
            n_expert_used: f.u32("num_experts_per_tok")?,
            expert_ffn: f.u32("moe_intermediate_size")?,
            n_expert_shared: f.u32_opt("n_shared_experts")?.unwrap_or(1),
            routed_scale: f.f32("routed_scaling_factor")?,
            norm_topk_prob: f.bool_or("norm_topk_prob", true)?,
            n_hash_layers,
            swiglu_limit: f.f32("swiglu_limit")?,
            indexer_n_head: f.u32("index_n_heads")?,
            indexer_head_dim: f.u32("index_head_dim")?,
            indexer_top_k: f.u32("index_topk")?,
            hc_mult: f.u32("hc_mult")?,
            hc_sinkhorn_iters: f.u32("hc_sinkhorn_iters")?,
            hc_eps: f.f32("hc_eps")?,
            bos_token_id: f.u32_opt("bos_token_id")?,
            eos_token_id: f.u32_opt("eos_token_id")?,
            fp8_block,
        };
        cfg.check(&f)?;
        Ok(cfg)
    }

    /// The constraints llama.cpp's loader and graph put on the hyperparameters (DSV4.md section 7).
    fn check(&self, f: &Fields) -> Result<(), HfError> {
        let kv = f.u32_opt("num_key_value_heads")?.unwrap_or(1);
        if kv != 1 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{kv}, expected 1 (one shared K=V head)"),
            ));
        }
        if self.hc_mult != 4 {
            return Err(f.err(
                "hc_mult",
                format!("{}, expected 4 (fixed in llama.cpp's graph)", self.hc_mult),
            ));
        }
        if self.n_rot % 2 != 0 || self.n_rot > self.head_dim {
            return Err(f.err(
                "qk_rope_head_dim",
                format!(
                    "{} must be even and at most head_dim {}",
                    self.n_rot, self.head_dim
                ),
            ));
        }
        if self.o_groups == 0 || self.n_head % self.o_groups != 0 {
            return Err(f.err(
                "o_groups",
                format!(
                    "{} must divide num_attention_heads {}",
                    self.o_groups, self.n_head
                ),
            ));
        }
        if self.n_expert_used == 0 || self.n_expert_used > self.n_expert {
            return Err(f.err(
                "num_experts_per_tok",
                format!(
                    "{} must be between 1 and n_routed_experts {}",
                    self.n_expert_used, self.n_expert
                ),
            ));
        }
        if self.n_hash_layers > self.n_layer {
            return Err(f.err(
                "num_hash_layers",
                format!(
                    "{} is more than num_hidden_layers {}",
                    self.n_hash_layers, self.n_layer
                ),
            ));
        }
        Ok(())
    }

    /// Compression ratio of layer `il` (the MTP block, past the main layers, defaults to 0).
    pub fn ratio(&self, il: u32) -> u32 {
        self.compress_ratios.get(il as usize).copied().unwrap_or(0)
    }

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

fn compress_ratios(f: &Fields, n_layer: u32) -> Result<Vec<u32>, HfError> {
    let ratios: Vec<u32> = if let Some(v) = f.get("compress_ratios") {
        let bad = || {
            f.err(
                "compress_ratios",
                format!("expected an array of 0, 4 or 128, got {v}"),
            )
        };
        let a = v.as_array().ok_or_else(bad)?;
        a.iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<_, _>>()?
    } else if let Some(v) = f.get("layer_types") {
        // transformers' spelling: one attention kind per layer.
        let bad = |t: &Json| f.err("layer_types", format!("unknown layer type {t}"));
        v.as_array()
            .ok_or_else(|| f.err("layer_types", "expected an array"))?
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(0),
                Some("compressed_sparse_attention") => Ok(4),
                Some("heavily_compressed_attention") => Ok(128),
                _ => Err(bad(t)),
            })
            .collect::<Result<_, _>>()?
    } else {
        return Err(f.err(
            "compress_ratios",
            "missing (a DeepSeek V4 config.json has it)",
        ));
    };
    if ratios.len() < n_layer as usize {
        return Err(f.err(
            "compress_ratios",
            format!(
                "{} entries, expected at least num_hidden_layers = {n_layer}",
                ratios.len()
            ),
        ));
    }
    if let Some(r) = ratios.iter().find(|r| ![0, 4, 128].contains(*r)) {
        return Err(f.err(
            "compress_ratios",
            format!("ratio {r}: llama.cpp supports only 0, 4 and 128"),
        ));
    }
    if !ratios[..n_layer as usize].contains(&4) {
        return Err(f.err(
            "compress_ratios",
            "no layer has ratio 4; llama.cpp needs at least one (its indexer cache cannot be empty)",
        ));
    }
    Ok(ratios)
}

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

/// How one checkpoint matrix is encoded.
#[derive(Clone, Copy, Debug)]
pub enum Encoded<'a> {
    F32(&'a [u8]),
    F16(&'a [u8]),
    Bf16(&'a [u8]),
    /// FP8 E4M3 with one E8M0 scale per `block` tile (`scale` is [ceil(rows/b0), ceil(cols/b1)]).
    Fp8 {
        weight: &'a [u8],
        scale: &'a [u8],
        block: [usize; 2],
    },
    /// FP4 E2M1, two per byte, with one E8M0 scale per 32 inputs.
    Fp4 {
        weight: &'a [u8],
        scale: &'a [u8],
    },
}

impl Encoded<'_> {
    /// The checkpoint's name of this encoding.
    pub fn name(&self) -> &'static str {
        match self {
            Encoded::F32(_) => "F32",
            Encoded::F16(_) => "F16",
            Encoded::Bf16(_) => "BF16",
            Encoded::Fp8 { .. } => "FP8",
            Encoded::Fp4 { .. } => "FP4",
        }
    }

    /// Bytes read from the checkpoint, scales included.
    pub fn n_bytes(&self) -> u64 {
        (match self {
            Encoded::F32(b) | Encoded::F16(b) | Encoded::Bf16(b) => b.len(),
            Encoded::Fp8 { weight, scale, .. } | Encoded::Fp4 { weight, scale } => {
                weight.len() + scale.len()
            }
        }) as u64
    }
}

/// A `[rows, cols]` row-major matrix of the checkpoint (the GGUF's `{cols, rows}`), possibly made of several
/// matrices side by side along the columns.
#[derive(Clone, Debug)]
pub struct HfMatrix<'a> {
    pub rows: usize,
    pub cols: usize,
    /// Parts in column order: (columns, encoding).
    pub parts: Vec<(usize, Encoded<'a>)>,
}

/// A GGUF tensor's data in the checkpoint, checked.
#[derive(Clone, Debug)]
pub enum HfData<'a> {
    /// One matrix per expert (one for other tensors); 1-D tensors are a single row.
    Matrices(Vec<HfMatrix<'a>>),
    /// `tid2eid`: little-endian I64 or I32 ids.
    TokenIds { bytes: &'a [u8], wide: bool },
}

/// Looks every tensor of `tensors` up in the checkpoint and checks dtype and shape; also refuses checkpoint tensors
/// that none of them uses (other than the MTP block's when it is not exported).
pub fn resolve<'a>(
    ckpt: &'a Checkpoint,
    cfg: &HfConfig,
    tensors: &[HfTensor],
    with_mtp: bool,
) -> Result<Vec<HfData<'a>>, HfError> {
    let dir = ckpt.dir().to_path_buf();
    let mut used = BTreeSet::new();
    let mut out = Vec::with_capacity(tensors.len());
    for t in tensors {
        let get = |name: &str, used: &mut BTreeSet<String>| -> Result<TensorView<'a>, HfError> {
            used.insert(name.to_string());
            ckpt.tensor(name).map_err(|e| match e {
                crate::safetensors::Error::NoSuchTensor { .. } => HfError::Missing {
                    dir: dir.clone(),
                    name: name.into(),
                    gguf: t.gguf.clone(),
                },
                other => other.into(),
            })
        };
        let rows_cols = |dims: &[u64]| -> (u64, u64) {
            match dims.len() {
                1 => (1, dims[0]),
                _ => (dims[1], dims[0]),
            }
        };
        let data = match &t.source {
            Source::Dense(name) | Source::Float32(name) => {
                let (rows, cols) = rows_cols(&t.dims);
                let shape = if t.dims.len() == 1 {
                    vec![cols]
                } else {
                    vec![rows, cols]
                };
                let m = matrix(&dir, cfg, name, &shape, false, &mut used, &get)?;
                HfData::Matrices(vec![m])
            }
            Source::Experts(names) => {
                let (rows, cols) = (t.dims[1], t.dims[0]);
                let ms = names
                    .iter()
                    .map(|name| matrix(&dir, cfg, name, &[rows, cols], true, &mut used, &get))
                    .collect::<Result<Vec<_>, _>>()?;
                HfData::Matrices(ms)
            }
            Source::ConcatInputs(names) => {
                let rows = t.dims[1];
                let cols = t.dims[0] / names.len() as u64;
                let mut parts = Vec::new();
                for name in names {
                    let m = matrix(&dir, cfg, name, &[rows, cols], false, &mut used, &get)?;
                    parts.extend(m.parts);
                }
                HfData::Matrices(vec![HfMatrix {
                    rows: rows as usize,
                    cols: t.dims[0] as usize,
                    parts,
                }])
            }
            Source::TokenIds(name) => {
                let view = get(name, &mut used)?;
                let wide = match view.dtype {
                    Dtype::I64 => true,
                    Dtype::I32 => false,
                    other => return Err(dtype_err(&dir, name, "I64 (or I32)", other)),
                };
                let expected = vec![t.dims[1], t.dims[0]];
                if view.shape != expected.as_slice() {
                    return Err(shape_err(&dir, name, expected, view.shape));
                }
                HfData::TokenIds {
                    bytes: view.bytes,
                    wide,
                }
            }
        };
        out.push(data);
    }
    let unknown: Vec<&str> = ckpt
        .names()
        .filter(|n| !used.contains(*n))
        .filter(|n| {
            !(n.ends_with(".scale")
                && used.contains(&format!("{}.weight", n.trim_end_matches(".scale"))))
        })
        .filter(|n| with_mtp || !n.starts_with("mtp."))
        // The MTP block's own output mixer has no slot in llama.cpp's layout (it uses output_hc_*; DSV4.md 2.5).
        .filter(|n| !(n.starts_with("mtp.") && n.contains(".hc_head_")))
        .collect();
    if !unknown.is_empty() {
        return Err(HfError::Unknown {
            dir,
            n: unknown.len(),
            examples: unknown
                .iter()
                .take(5)
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(out)
}

fn dtype_err(dir: &Path, name: &str, expected: &str, got: Dtype) -> HfError {
    HfError::Dtype {
        dir: dir.to_path_buf(),
        name: name.into(),
        expected: expected.into(),
        got: got.name().into(),
    }
}

fn shape_err(dir: &Path, name: &str, expected: Vec<u64>, got: &[u64]) -> HfError {
    HfError::Shape {
        dir: dir.to_path_buf(),
        name: name.into(),
        expected,
        got: got.to_vec(),
    }
}

/// Looks a checkpoint tensor up and records it as used.
type Lookup<'a, 'f> = dyn Fn(&str, &mut BTreeSet<String>) -> Result<TensorView<'a>, HfError> + 'f;

/// One checkpoint matrix of shape `shape` ([rows, cols], or [cols] for 1-D) in any encoding the checkpoint uses.
fn matrix<'a>(
    dir: &Path,
    cfg: &HfConfig,
    name: &str,
    shape: &[u64],
    fp4_allowed: bool,
    used: &mut BTreeSet<String>,
    get: &Lookup<'a, '_>,
) -> Result<HfMatrix<'a>, HfError> {
    let view = get(name, used)?;
    let (rows, cols) = match shape {
        [c] => (1u64, *c),
        [r, c] => (*r, *c),
        _ => unreachable!("matrices are 1-D or 2-D"),
    };
    let scale_name = format!("{}.scale", name.trim_end_matches(".weight"));
    let enc = match view.dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
            if view.shape != shape {
                return Err(shape_err(dir, name, shape.to_vec(), view.shape));
            }
            match view.dtype {
                Dtype::F32 => Encoded::F32(view.bytes),
                Dtype::F16 => Encoded::F16(view.bytes),
                _ => Encoded::Bf16(view.bytes),
            }
        }
        Dtype::F8E4M3 if shape.len() == 2 => {
            if view.shape != shape {
                return Err(shape_err(dir, name, shape.to_vec(), view.shape));
            }
            let [b0, b1] = cfg.fp8_block;
            let scale = get(&scale_name, used)?;
            let expected = vec![rows.div_ceil(b0), cols.div_ceil(b1)];
            check_scale(dir, &scale_name, &scale, expected)?;
            Encoded::Fp8 {
                weight: view.bytes,
                scale: scale.bytes,
                block: [b0 as usize, b1 as usize],
            }
        }
        Dtype::I8 | Dtype::U8 if fp4_allowed => {
            let expected = vec![rows, cols / 2];
            if cols % 32 != 0 || view.shape != expected.as_slice() {
                return Err(shape_err(dir, name, expected, view.shape));
            }
            let scale = get(&scale_name, used)?;
            check_scale(dir, &scale_name, &scale, vec![rows, cols / 32])?;
            Encoded::Fp4 {
                weight: view.bytes,
                scale: scale.bytes,
            }
        }
        other => {
            let expected = match (shape.len(), fp4_allowed) {
                (1, _) => "BF16, F16 or F32",
                (_, false) => "F8_E4M3 (with a .scale), BF16, F16 or F32",
                (_, true) => "I8 FP4 (with a .scale), F8_E4M3, BF16, F16 or F32",
            };
            return Err(dtype_err(dir, name, expected, other));
        }
    };
    Ok(HfMatrix {
        rows: rows as usize,
        cols: cols as usize,
        parts: vec![(cols as usize, enc)],
    })
}

fn check_scale(
    dir: &Path,
    name: &str,
    scale: &TensorView,
    expected: Vec<u64>,
) -> Result<(), HfError> {
    if scale.dtype != Dtype::F8E8M0 {
        return Err(dtype_err(dir, name, "F8_E8M0", scale.dtype));
    }
    if scale.shape != expected.as_slice() {
        return Err(shape_err(dir, name, expected, scale.shape));
    }
    Ok(())
}

/// True when the checkpoint has an MTP block (`mtp.0.*`).
pub fn has_mtp(ckpt: &Checkpoint) -> bool {
    ckpt.names().any(|n| n.starts_with("mtp.0."))
}
