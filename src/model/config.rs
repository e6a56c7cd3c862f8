//! The typed DeepSeek V4 configuration, read from `deepseek4.*` metadata: every shape comes from the file,
//! every key is checked (type and range), and all problems are reported at once.

use std::fmt::Display;

use gguf::{Array, GgufError, Metadata, Model, Value};

use super::names::{self, blk, key, ARCH, GATING_SQRT_SOFTPLUS};
use super::sizes::blocks_with_tensors;
use super::weights::Weights;

/// Most layers a file may have (llama.cpp's LLAMA_MAX_LAYERS); per-layer tables are sized from it.
pub const MAX_LAYERS: usize = 512;
/// Most routed experts per layer (llama.cpp's LLAMA_MAX_EXPERTS).
pub const MAX_EXPERTS: usize = 1024;
/// Most Sinkhorn iterations: each adds 64 graph nodes per layer (DeepSeek V4 uses 20).
pub const MAX_SINKHORN_ITERS: usize = 100;
/// Longest indexer key: its Hadamard rotation is up to this squared in F32 (16 MiB; DeepSeek V4 uses 128).
pub const MAX_INDEXER_DIM: usize = 2048;

/// The hint of a value no DeepSeek V4 converter writes.
const DAMAGED: &str = "the file is damaged or was not converted for DeepSeek V4; re-convert it";

/// Attention kind of a layer, from its compress ratio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Ratio 0: the raw sliding window only.
    Raw,
    /// Ratio 4: overlapping compressed rows chosen by the lightning indexer (CSA).
    Csa,
    /// Ratio 128: compressed rows, all visible (HCA).
    Hca,
}

impl LayerKind {
    /// Tokens per compressed row (0 for raw layers).
    pub fn ratio(self) -> usize {
        match self {
            LayerKind::Raw => 0,
            LayerKind::Csa => 4,
            LayerKind::Hca => 128,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Raw => "raw",
            LayerKind::Csa => "csa",
            LayerKind::Hca => "hca",
        }
    }
}

/// RoPE parameters of one family (raw layers, or compressed layers with YaRN).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub freq_base: f32,
    /// 1 / YaRN factor (1 = no scaling).
    pub freq_scale: f32,
    /// YaRN's extrapolation mix: 1 with YaRN, 0 without.
    pub ext_factor: f32,
    /// Cancels ggml's YaRN magnitude scaling so cos/sin keep magnitude 1 (DSV4.md 3.5).
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    pub n_ctx_orig: i32,
}

/// Everything the forward pass needs to know about a DeepSeek V4 file.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Main layers (without the MTP block).
    pub n_layer: usize,
    /// Whether the file carries the MTP (next-n) block as layer `n_layer`.
    pub has_mtp: bool,
    pub n_embd: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_head: usize,
    /// K = V head width (512 for Flash).
    pub head_dim: usize,
    /// Rotary dims at the end of each head (64 for Flash).
    pub n_rot: usize,
    pub q_lora: usize,
    pub o_lora: usize,
    pub o_groups: usize,
    pub window: usize,
    /// Attention kind of each main layer.
    pub kinds: Vec<LayerKind>,
    pub rope_raw: Rope,
    pub rope_compressed: Rope,
    pub eps: f32,
    pub n_expert: usize,
    pub n_expert_used: usize,
    /// Routed and shared expert width (per layer: the key may be an array).
    pub expert_width: Vec<usize>,
    pub n_expert_shared: usize,
    pub expert_weights_scale: f32,
    pub expert_weights_norm: bool,
    pub n_hash_layers: usize,
    pub clamp_exp: Vec<f32>,
    pub clamp_shexp: Vec<f32>,
    pub indexer_heads: usize,
    pub indexer_dim: usize,
    pub indexer_top_k: usize,
    pub hc: usize,
    pub sinkhorn_iters: usize,
    pub hc_eps: f32,
    /// Things that are accepted but worth telling the user (missing keys taken as DeepSeek's values).
    pub warnings: Vec<String>,
}

/// All problems found in a file's metadata or tensors, reported together.
#[derive(Debug, thiserror::Error)]
#[error("{}", format_problems(.problems))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

fn format_problems(problems: &[String]) -> String {
    match problems {
        [one] => one.clone(),
        many => format!("{} problems:\n  - {}", many.len(), many.join("\n  - ")),
    }
}

/// Collects problems while reading keys, so one pass reports all of them.
struct Reader<'a> {
    md: &'a Metadata,
    problems: Vec<String>,
    warnings: Vec<String>,
}

impl Reader<'_> {
    fn note(&mut self, e: GgufError) {
        self.problems.push(e.to_string());
    }

    fn u32(&mut self, k: &str) -> usize {
        self.md.u32(k).map(|v| v as usize).unwrap_or_else(|e| {
            self.note(e);
            0
        })
    }

    fn f32(&mut self, k: &str) -> f32 {
        self.md.f32(k).unwrap_or_else(|e| {
            self.note(e);
            0.0
        })
    }

    fn f32_or(&mut self, k: &str, default: f32) -> f32 {
        if self.md.contains(k) {
            self.f32(k)
        } else {
            default
        }
    }

    fn bool(&mut self, k: &str) -> bool {
        self.md.bool(k).unwrap_or_else(|e| {
            self.note(e);
            false
        })
    }

    /// A per-layer value given as a scalar or an array of exactly `n` entries (llama.cpp's get_key_or_arr).
    fn per_layer_f32(&mut self, k: &str, n: usize) -> Vec<f32> {
        match self.md.get(k) {
            Some(Value::F32(v)) => vec![*v; n],
            Some(Value::Array(Array::F32(v))) if v.len() == n => v.clone(),
            Some(Value::Array(Array::F32(v))) => {
                self.problems.push(format!(
                    "metadata key {k:?} has {} entries, expected block_count = {n}",
                    v.len()
                ));
                vec![0.0; n]
            }
            Some(other) => {
                self.problems.push(format!(
                    "metadata key {k:?} has type {}, expected float32 or array of float32",
                    other.value_type()
                ));
                vec![0.0; n]
            }
            None => {
                self.problems.push(format!("metadata key {k:?} is missing"));
                vec![0.0; n]
            }
        }
    }

    fn per_layer_u32(&mut self, k: &str, n: usize) -> Vec<usize> {
        match self.md.get(k) {
            Some(Value::U32(v)) => vec![*v as usize; n],
            Some(Value::Array(_)) => match self.md.int_array(k) {
                Ok(v) if v.len() == n && v.iter().all(|&x| x >= 0) => {
                    v.iter().map(|&x| x as usize).collect()
                }
                Ok(v) => {
                    self.problems.push(format!(
                        "metadata key {k:?} has {} entries, expected block_count = {n}",
                        v.len()
                    ));
                    vec![0; n]
                }
                Err(e) => {
                    self.note(e);
                    vec![0; n]
                }
            },
            _ => vec![self.u32(k); n],
        }
    }

    fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.problems.push(problem());
        }
    }

    /// A problem unless `ok`: key `k` holds `got`, outside `allowed`, with `hint` on what to do or why it matters.
    fn range(&mut self, k: &str, ok: bool, got: impl Display, allowed: &str, hint: &str) {
        if !ok {
            self.problems
                .push(format!("{k} is {got}, expected {allowed} (hint: {hint})"));
        }
    }

    /// A float that must be finite and at least `min` (epsilons, clamps, scales).
    fn finite_min(&mut self, k: &str, v: f32, min: f32, hint: &str) {
        let allowed = format!("a finite number >= {min}");
        self.range(k, v.is_finite() && v >= min, v, &allowed, hint);
    }

    /// Every entry of a per-layer float array finite and >= 0; the first bad one is reported.
    fn finite_entries(&mut self, k: &str, values: &[f32], hint: &str) {
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            self.problems.push(format!(
                "{k} entry {i} is {v}, expected a finite number >= 0 (hint: {hint})"
            ));
        }
    }
}

/// `block_count` checked against the `blk.N` tensors present (and [`MAX_LAYERS`]) before any per-layer table is
/// sized from it; a larger count is a problem and the rest of the file is read with the count it can hold.
fn cap_block_count(r: &mut Reader, model: &Model, n: usize) -> usize {
    let blocks = blocks_with_tensors(model).min(MAX_LAYERS as u64) as usize;
    if n <= blocks {
        return n;
    }
    let held = match blocks {
        0 => "the file has no blk.N tensors".to_string(),
        b => format!("the file has tensors for blk.0 to blk.{} only", b - 1),
    };
    r.problems.push(format!(
        "{} is {n}, expected at most {blocks}: {held} (at most {MAX_LAYERS} layers are supported) (hint: {DAMAGED})",
        key::BLOCK_COUNT
    ));
    blocks
}

/// YaRN's magnitude correction that llama.cpp passes as `attn_factor` to cancel ggml's own (DSV4.md 3.5).
fn yarn_attn_factor(freq_scale: f32) -> f32 {
    1.0 / (1.0 + 0.1 * (1.0 / freq_scale).ln())
}

impl Config {
    /// Reads and validates the configuration of a DeepSeek V4 model: every key in range, then every tensor bound
    /// to it (name, shape, type, routing ids), so no size computed from the config exceeds what the file holds.
    pub fn from_model(model: &Model) -> Result<Config, ConfigError> {
        Config::bound(model, |_| ()).map(|(config, _)| config)
    }

    /// [`Config::from_model`] and the weights it binds, each tensor turned into the caller's handle by `make(name)`
    /// (see [`Weights::bind`]): one pass over the tensors for a caller that needs both (`Engine::open`).
    pub fn bound<T>(
        model: &Model,
        make: impl FnMut(&str) -> T,
    ) -> Result<(Config, Weights<T>), ConfigError> {
        let md = model.metadata();
        match md.str(key::ARCHITECTURE) {
            Ok(ARCH) => {}
            Ok(other) => {
                return Err(ConfigError {
                    problems: vec![format!(
                        "the model's architecture is {other:?}; ferrite runs DeepSeek V4 ({ARCH:?}) only"
                    )],
                })
            }
            Err(e) => return Err(ConfigError { problems: vec![e.to_string()] }),
        }
        let mut r = Reader {
            md,
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let n_layer_all = r.u32(key::BLOCK_COUNT);
        let n_layer_all = cap_block_count(&mut r, model, n_layer_all);
        let nextn = if md.contains(key::NEXTN_PREDICT_LAYERS) {
            r.u32(key::NEXTN_PREDICT_LAYERS)
        } else {
            0
        };
        // llama.cpp counts the MTP block only when its tensors are really there (DSV4.md 1.2).
        let has_mtp = nextn > 0
            && n_layer_all > 0
            && model
                .tensor(&names::layer(n_layer_all as u32 - 1, blk::NEXTN_EH_PROJ))
                .is_some();
        r.check(nextn <= 1, || {
            format!(
                "{} is {nextn}; only one MTP block is supported",
                key::NEXTN_PREDICT_LAYERS
            )
        });
        let n_layer = n_layer_all - usize::from(has_mtp);
        let n_embd = r.u32(key::EMBEDDING_LENGTH);
        let n_vocab = model
            .tensor(names::global::TOKEN_EMBD)
            .and_then(|t| t.info.dims.get(1).copied())
            .unwrap_or(0) as usize;
        let n_ctx_train = r.u32(key::CONTEXT_LENGTH);
        let n_head = r.u32(key::HEAD_COUNT);
        let n_head_kv = if md.contains(key::HEAD_COUNT_KV) {
            r.u32(key::HEAD_COUNT_KV)
        } else {
            r.warnings.push(format!(
                "{} is missing; taking 1 (DeepSeek V4 has a single K=V head)",
                key::HEAD_COUNT_KV
            ));
            1
        };
        r.check(n_head_kv == 1, || {
            format!(
                "{} is {n_head_kv}, expected 1 (one shared K=V head)",
                key::HEAD_COUNT_KV
            )
        });
        let head_dim = r.u32(key::KEY_LENGTH);
        let value_len = r.u32(key::VALUE_LENGTH);
        r.check(head_dim == value_len, || {
            format!("key_length {head_dim} != value_length {value_len}: K and V are one vector")
        });
        let n_rot = r.u32(key::ROPE_DIMENSION_COUNT);
        let q_lora = r.u32(key::Q_LORA_RANK);
        let o_lora = r.u32(key::OUTPUT_LORA_RANK);
        let o_groups = r.u32(key::OUTPUT_GROUP_COUNT);
        let window = r.u32(key::SLIDING_WINDOW);
        let kinds = read_kinds(&mut r, n_layer_all);

        let rope_base = r.f32_or(key::ROPE_FREQ_BASE, 10000.0);
        let compress_base = r.f32(key::COMPRESS_ROPE_FREQ_BASE);
        for (k, base) in [
            (key::ROPE_FREQ_BASE, rope_base),
            (key::COMPRESS_ROPE_FREQ_BASE, compress_base),
        ] {
            r.range(
                k,
                base.is_finite() && base > 0.0,
                base,
                "a finite number > 0",
                "RoPE raises it to fractional powers; DeepSeek V4 uses 10000 and 160000",
            );
        }
        let scaling = md.str(key::ROPE_SCALING_TYPE).ok();
        match scaling {
            Some("yarn") => {}
            None => r.warnings.push(format!(
                "{} is missing; taking \"yarn\" as DeepSeek V4 uses (llama.cpp would take \"linear\" here and compute wrong results)",
                key::ROPE_SCALING_TYPE
            )),
            Some(other) => r.problems.push(format!("{} is {other:?}, expected \"yarn\"", key::ROPE_SCALING_TYPE)),
        }
        let factor = r.f32_or(key::ROPE_SCALING_FACTOR, 1.0);
        r.range(
            key::ROPE_SCALING_FACTOR,
            factor.is_finite() && factor >= 1.0,
            factor,
            "a finite number >= 1",
            "1 turns YaRN off; DeepSeek V4 uses 16",
        );
        let orig_ctx = if md.contains(key::ROPE_SCALING_ORIG_CTX) {
            r.u32(key::ROPE_SCALING_ORIG_CTX)
        } else {
            n_ctx_train
        };
        r.range(
            key::ROPE_SCALING_ORIG_CTX,
            orig_ctx <= i32::MAX as usize,
            orig_ctx,
            &format!("at most {}", i32::MAX),
            "ggml takes it as a 32-bit signed integer; DeepSeek V4 uses 65536",
        );
        let freq_scale = 1.0 / factor.max(1.0);
        let yarn = freq_scale < 1.0;
        let rope_raw = Rope {
            freq_base: rope_base,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 0.0,
            beta_slow: 0.0,
            n_ctx_orig: 0,
        };
        // llama.cpp ignores the file's yarn_beta_* keys and uses 32 / 1 (DSV4.md 5.2); so do we.
        let rope_compressed = Rope {
            freq_base: compress_base,
            freq_scale,
            ext_factor: if yarn { 1.0 } else { 0.0 },
            attn_factor: if yarn {
                yarn_attn_factor(freq_scale)
            } else {
                1.0
            },
            beta_fast: 32.0,
            beta_slow: 1.0,
            n_ctx_orig: i32::try_from(orig_ctx).unwrap_or(i32::MAX),
        };

        let eps = r.f32(key::RMS_EPS);
        r.finite_min(
            key::RMS_EPS,
            eps,
            0.0,
            "every RMS norm adds it under the square root; DeepSeek V4 uses 1e-6",
        );
        let n_expert = r.u32(key::EXPERT_COUNT);
        r.range(
            key::EXPERT_COUNT,
            n_expert <= MAX_EXPERTS,
            n_expert,
            &format!("at most {MAX_EXPERTS}"),
            DAMAGED,
        );
        let n_expert_used = r.u32(key::EXPERT_USED_COUNT);
        let expert_width = r.per_layer_u32(key::EXPERT_FFN_LENGTH, n_layer_all);
        let n_expert_shared = r.u32(key::EXPERT_SHARED_COUNT);
        let expert_weights_scale = r.f32(key::EXPERT_WEIGHTS_SCALE);
        r.range(
            key::EXPERT_WEIGHTS_SCALE,
            expert_weights_scale.is_finite(),
            expert_weights_scale,
            "a finite number",
            "it scales every routed expert's output; DeepSeek V4 uses 1.5",
        );
        let expert_weights_norm = r.bool(key::EXPERT_WEIGHTS_NORM);
        let gating = r.u32(key::EXPERT_GATING_FUNC);
        r.check(gating == GATING_SQRT_SOFTPLUS as usize, || {
            format!(
                "{} is {gating}, expected {GATING_SQRT_SOFTPLUS} (sqrt-softplus scoring)",
                key::EXPERT_GATING_FUNC
            )
        });
        let n_hash_layers = r.u32(key::HASH_LAYER_COUNT);
        let clamp_exp = r.per_layer_f32(key::SWIGLU_CLAMP_EXP, n_layer_all);
        let clamp_shexp = if md.contains(key::SWIGLU_CLAMP_SHEXP) {
            r.per_layer_f32(key::SWIGLU_CLAMP_SHEXP, n_layer_all)
        } else {
            clamp_exp.clone()
        };
        let clamp_hint = "0 turns the SwiGLU clamp off; DeepSeek V4 uses 10";
        r.finite_entries(key::SWIGLU_CLAMP_EXP, &clamp_exp, clamp_hint);
        if md.contains(key::SWIGLU_CLAMP_SHEXP) {
            r.finite_entries(key::SWIGLU_CLAMP_SHEXP, &clamp_shexp, clamp_hint);
        }
        let indexer_heads = r.u32(key::INDEXER_HEAD_COUNT);
        let indexer_dim = r.u32(key::INDEXER_KEY_LENGTH);
        r.range(
            key::INDEXER_KEY_LENGTH,
            indexer_dim <= MAX_INDEXER_DIM,
            indexer_dim,
            &format!("at most {MAX_INDEXER_DIM}"),
            "the indexer's Hadamard rotation is a square matrix of up to this size; DeepSeek V4 uses 128",
        );
        let indexer_top_k = r.u32(key::INDEXER_TOP_K);
        let hc = r.u32(key::HC_COUNT);
        let sinkhorn_iters = r.u32(key::HC_SINKHORN_ITERS);
        r.range(
            key::HC_SINKHORN_ITERS,
            sinkhorn_iters <= MAX_SINKHORN_ITERS,
            sinkhorn_iters,
            &format!("1..={MAX_SINKHORN_ITERS}"),
            "each iteration adds graph nodes to every layer; DeepSeek V4 uses 20",
        );
        let hc_eps = r.f32(key::HC_EPS);
        r.finite_min(
            key::HC_EPS,
            hc_eps,
            0.0,
            "the hyper-connection weights add it to stay positive; DeepSeek V4 uses 1e-6",
        );
        if md.contains(key::EXPERT_GROUP_COUNT) {
            let groups = r.u32(key::EXPERT_GROUP_COUNT);
            r.check(groups <= 1, || {
                format!(
                    "{} is {groups}: grouped expert selection is not part of DeepSeek V4",
                    key::EXPERT_GROUP_COUNT
                )
            });
        }

        let config = Config {
            n_layer,
            has_mtp,
            n_embd,
            n_vocab,
            n_ctx_train,
            n_head,
            head_dim,
            n_rot,
            q_lora,
            o_lora,
            o_groups,
            window,
            kinds: kinds.into_iter().take(n_layer).collect(),
            rope_raw,
            rope_compressed,
            eps,
            n_expert,
            n_expert_used,
            expert_width,
            n_expert_shared,
            expert_weights_scale,
            expert_weights_norm,
            n_hash_layers,
            clamp_exp,
            clamp_shexp,
            indexer_heads,
            indexer_dim,
            indexer_top_k,
            hc,
            sinkhorn_iters,
            hc_eps,
            warnings: Vec::new(),
        };
        if r.problems.is_empty() {
            config.check_ranges(&mut r.problems);
        }
        if !r.problems.is_empty() {
            return Err(ConfigError {
                problems: r.problems,
            });
        }
        // The shapes bound here cap every size the planner and the caches compute from the config.
        let weights = Weights::bind(model, &config, make)?;
        let config = Config {
            warnings: r.warnings,
            ..config
        };
        Ok((config, weights))
    }

    /// The constraints the maths relies on (DSV4.md section 7), each a problem when broken.
    fn check_ranges(&self, problems: &mut Vec<String>) {
        let mut check = |ok: bool, what: String| {
            if !ok {
                problems.push(what);
            }
        };
        check(
            self.n_layer >= 1,
            format!("block_count leaves {} main layers", self.n_layer),
        );
        check(
            self.n_embd > 0 && self.n_head > 0 && self.head_dim > 0,
            "embedding_length, head_count and key_length must be positive".into(),
        );
        check(
            self.n_vocab > 0,
            format!(
                "{} has no rows (vocabulary size 0)",
                names::global::TOKEN_EMBD
            ),
        );
        check(
            self.n_rot > 0
                && self.n_rot % 2 == 0
                && self.n_rot <= self.head_dim
                && (self.head_dim - self.n_rot) % 2 == 0,
            format!(
                "{} is {}, expected an even number in 2..={} (key_length) with an even rest (hint: the last rope dims of each head are rotated; DeepSeek V4 uses 64)",
                key::ROPE_DIMENSION_COUNT,
                self.n_rot,
                self.head_dim
            ),
        );
        check(
            self.o_groups > 0 && self.n_head % self.o_groups == 0,
            format!(
                "head_count {} is not a multiple of output_group_count {}",
                self.n_head, self.o_groups
            ),
        );
        check(
            self.window > 0 && self.window <= self.n_ctx_train,
            format!(
                "{} is {}, expected 1..={} = {} (hint: the raw cache holds this many rows per layer; DeepSeek V4 uses 128)",
                key::SLIDING_WINDOW,
                self.window,
                self.n_ctx_train,
                key::CONTEXT_LENGTH
            ),
        );
        check(
            self.hc == 4,
            format!("hyper_connection.count is {}, expected 4", self.hc),
        );
        check(
            self.sinkhorn_iters >= 1,
            "hyper_connection.sinkhorn_iterations must be at least 1".into(),
        );
        check(
            self.n_expert_used >= 1 && self.n_expert_used <= self.n_expert,
            format!(
                "expert_used_count {} must be in 1..=expert_count {}",
                self.n_expert_used, self.n_expert
            ),
        );
        check(
            self.n_expert_shared == 1,
            format!(
                "expert_shared_count is {}, expected 1",
                self.n_expert_shared
            ),
        );
        check(
            self.n_hash_layers <= self.n_layer,
            format!(
                "hash_layer_count {} exceeds the {} layers",
                self.n_hash_layers, self.n_layer
            ),
        );
        let has_csa = self.kinds.contains(&LayerKind::Csa);
        if has_csa {
            check(
                self.indexer_heads > 0 && self.indexer_top_k > 0,
                "the indexer needs heads and a top-k".into(),
            );
            check(
                self.indexer_dim >= self.n_rot && (self.indexer_dim - self.n_rot) % 2 == 0,
                format!(
                    "indexer key_length {} must be >= rope dims {} with an even rest",
                    self.indexer_dim, self.n_rot
                ),
            );
        }
    }

    /// Width of the routed (and shared) experts of `layer`.
    pub fn expert_width(&self, layer: usize) -> usize {
        self.expert_width[layer]
    }

    /// RoPE parameters of `layer`: compressed layers use YaRN with the compress base.
    pub fn rope(&self, layer: usize) -> Rope {
        match self.kinds[layer] {
            LayerKind::Raw => self.rope_raw,
            _ => self.rope_compressed,
        }
    }

    /// Whether `layer` routes by token id (`tid2eid`) instead of by score.
    pub fn is_hash_layer(&self, layer: usize) -> bool {
        layer < self.n_hash_layers
    }
}

fn read_kinds(r: &mut Reader, n_layer_all: usize) -> Vec<LayerKind> {
    let ratios = match r.md.int_array(key::COMPRESS_RATIOS) {
        Ok(v) => v,
        Err(e) => {
            r.note(e);
            return vec![LayerKind::Raw; n_layer_all];
        }
    };
    if ratios.len() < n_layer_all {
        r.problems.push(format!(
            "{} has {} entries, fewer than block_count {n_layer_all}",
            key::COMPRESS_RATIOS,
            ratios.len()
        ));
    }
    let mut kinds = Vec::with_capacity(n_layer_all);
    for (i, &ratio) in ratios.iter().take(n_layer_all).enumerate() {
        kinds.push(match ratio {
            0 => LayerKind::Raw,
            4 => LayerKind::Csa,
            128 => LayerKind::Hca,
            other => {
                r.problems.push(format!(
                    "{} entry {i} is {other}; DeepSeek V4 layers use 0, 4 or 128",
                    key::COMPRESS_RATIOS
                ));
                LayerKind::Raw
            }
        });
    }
    kinds.resize(n_layer_all, LayerKind::Raw);
    kinds
}
