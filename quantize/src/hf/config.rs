//! `config.json` -> [`HfConfig`], checked against what llama.cpp's `deepseek4` loader and graph accept.

use std::path::Path;

use serde_json::{Map, Value as Json};

use super::{HfConfig, HfError, Yarn};

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

/// llama.cpp's `LLAMA_MAX_LAYERS`.
pub const MAX_LAYERS: u32 = 512;
/// llama.cpp's `LLAMA_MAX_EXPERTS`.
pub const MAX_EXPERTS: u32 = 1024;

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
        // llama.cpp's LLAMA_MAX_LAYERS and LLAMA_MAX_EXPERTS: a file beyond them does not load there, and the
        // tensor names are built from these counts (the checkpoint is checked to hold them before that).
        for (key, value, max) in [
            ("num_hidden_layers", self.n_layer, MAX_LAYERS),
            ("n_routed_experts", self.n_expert, MAX_EXPERTS),
        ] {
            if value == 0 || value > max {
                return Err(f.err(
                    key,
                    format!("{value}, expected 1 to {max} (llama.cpp's limit)"),
                ));
            }
        }
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

    /// Routed-expert tensors the checkpoint must hold for this config: gate, up and down of every expert of every
    /// layer (with the MTP block's when it is converted).
    pub fn expert_tensors(&self, with_mtp: bool) -> u64 {
        let layers = self.n_layer as u64
            + if with_mtp {
                self.nextn_predict_layers as u64
            } else {
                0
            };
        3 * layers * self.n_expert as u64
    }

    /// Compression ratio of layer `il` (the MTP block, past the main layers, defaults to 0).
    pub fn ratio(&self, il: u32) -> u32 {
        self.compress_ratios.get(il as usize).copied().unwrap_or(0)
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
