//! DeepSeek V4 weights bound by meaning: which tensor each part of the model uses, its expected shape (from the
//! config, never hard-coded), and one check that reports every missing or misshapen tensor at once.
//!
//! The structs are generic over the tensor handle, so the same table serves validation (over the GGUF tensor
//! table) and the forward pass (over ggml tensors).

use gguf::{GgmlType, Model};

use super::config::{Config, ConfigError, LayerKind};
use super::names::{blk, global, layer as lname};

/// The compressor of a compressed layer (or of the indexer keys).
#[derive(Clone, Debug)]
pub struct Compressor<T> {
    pub kv: T,
    pub gate: T,
    pub ape: T,
    pub norm: T,
}

/// The lightning indexer of a ratio-4 layer.
#[derive(Clone, Debug)]
pub struct Indexer<T> {
    pub q_b: T,
    pub proj: T,
    pub comp: Compressor<T>,
}

/// How a layer chooses its experts.
#[derive(Clone, Debug)]
pub enum Routing<T> {
    /// By token id: `tid2eid` {n_used, n_vocab}, I32.
    Hash { tid2eid: T },
    /// By score + selection bias `exp_probs_b` {n_expert}.
    Score { bias: T },
}

/// One main layer.
#[derive(Clone, Debug)]
pub struct LayerWeights<T> {
    pub kind: LayerKind,
    pub attn_norm: T,
    pub ffn_norm: T,
    pub hc_attn_fn: T,
    pub hc_attn_base: T,
    pub hc_attn_scale: T,
    pub hc_ffn_fn: T,
    pub hc_ffn_base: T,
    pub hc_ffn_scale: T,
    pub sinks: T,
    pub q_a: T,
    pub q_a_norm: T,
    pub q_b: T,
    pub kv: T,
    pub kv_norm: T,
    /// `attn_output_a`, {H·Dh/G, G·Og} in the file; the forward pass views it as {H·Dh/G, Og, G}.
    pub o_a: T,
    pub o_b: T,
    pub gate_inp: T,
    pub gate_exps: T,
    pub up_exps: T,
    pub down_exps: T,
    pub gate_shexp: T,
    pub up_shexp: T,
    pub down_shexp: T,
    pub routing: Routing<T>,
    pub compressor: Option<Compressor<T>>,
    pub indexer: Option<Indexer<T>>,
}

/// The whole model.
#[derive(Clone, Debug)]
pub struct Weights<T> {
    pub token_embd: T,
    pub output_norm: T,
    pub output: T,
    pub hc_head_fn: T,
    pub hc_head_base: T,
    pub hc_head_scale: T,
    pub layers: Vec<LayerWeights<T>>,
}

/// What a tensor's type must be, from what the CPU backend computes with it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// A matrix of `mul_mat` / `mul_mat_id`: a type with a ggml CPU dot product.
    Matrix,
    /// The token embedding: a type `get_rows` reads.
    Embedding,
    /// F32: 1-D weights (ggml's `mul` and norms take an F32 input with them; sinks and the hyper-connection base
    /// and scale are asserted F32).
    F32,
    /// I32 (the hash routing table).
    I32,
}

impl Want {
    fn accepts(self, ty: GgmlType) -> bool {
        use GgmlType as T;
        // No float type computes here: Q8_1 and Q8_K exist only as the other side of a dot product, F64 has no
        // dot product or get_rows on the CPU, and integers are not weights.
        let not_computed = matches!(ty, T::I8 | T::I16 | T::I32 | T::I64 | T::F64 | T::Q8K);
        match self {
            Want::Matrix => !not_computed && ty != T::Q8_1,
            // `get_rows` of a block type dequantizes rows with ggml's `to_float`, which Q8_1 lacks (found by
            // tests/mutants.rs: a Q8_1 embedding crashed at the first token).
            Want::Embedding => {
                !not_computed && (!ty.is_quantized() || crate::ggml::has_to_float(ty))
            }
            Want::F32 => ty == T::F32,
            Want::I32 => ty == T::I32,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Want::Matrix => "a float or quantized type the CPU multiplies (not q8_1, q8_k, f64 or an integer type)",
            Want::Embedding => "a float or quantized type the CPU reads rows of (not q8_1, q8_k, f64 or an integer type)",
            Want::F32 => "f32",
            Want::I32 => "i32",
        }
    }
}

/// The hint of a tensor type the CPU cannot compute with.
const TYPE_HINT: &str = "re-quantize the file (e.g. `ferrite quantize`) with supported types";

/// Looks tensors up by name and checks them, collecting every problem.
struct Check<'m, F> {
    model: &'m Model,
    /// Routed experts per layer: the bound of the ids in `tid2eid`.
    n_expert: usize,
    problems: Vec<String>,
    make: F,
}

impl<T, F: FnMut(&str) -> T> Check<'_, F> {
    fn get(&mut self, name: &str, dims: &[usize], want: Want) -> T {
        match self.model.tensor(name) {
            None => self.problems.push(format!(
                "tensor {name:?} is missing (expected shape {dims:?})"
            )),
            Some(t) => {
                let got: Vec<usize> = t.info.dims.iter().map(|&d| d as usize).collect();
                if got != dims {
                    self.problems.push(format!(
                        "tensor {name:?} has shape {got:?}, expected {dims:?}"
                    ));
                }
                if !want.accepts(t.info.ty) {
                    self.problems.push(format!(
                        "tensor {name:?} has type {}, expected {} (hint: {TYPE_HINT})",
                        t.info.ty,
                        want.expected()
                    ));
                } else if want == Want::I32 && got == dims {
                    self.check_expert_ids(name, self.model.tensor_data(t), dims[0]);
                }
            }
        }
        (self.make)(name)
    }

    /// A 1-D weight (a norm's scale): F32, as llama.cpp keeps them and ggml's `mul` needs with an F32 input.
    fn vec(&mut self, name: &str, n: usize) -> T {
        self.get(name, &[n], Want::F32)
    }

    /// Every id of a hash routing table is an expert of the layer: `mul_mat_id` indexes with them unchecked.
    fn check_expert_ids(&mut self, name: &str, data: &[u8], per_token: usize) {
        let ids = data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let mut bad = ids
            .enumerate()
            .filter(|&(_, id)| usize::try_from(id).map_or(true, |id| id >= self.n_expert));
        if let Some((i, id)) = bad.next() {
            let more = bad.count();
            let rest = match more {
                0 => String::new(),
                n => format!(" and {n} more out-of-range ids"),
            };
            self.problems.push(format!(
                "tensor {name:?} holds expert id {id} for token {}{rest}, expected 0..{} (expert_count {}) \
                 (hint: the routing table is damaged; re-convert the file)",
                i / per_token.max(1),
                self.n_expert,
                self.n_expert
            ));
        }
    }
}

impl<T> Weights<T> {
    /// Binds every tensor of `cfg` in `model`, checking names, shapes and types; `make(name)` turns a
    /// (present) tensor name into the handle the caller wants. All problems are reported together.
    pub fn bind(
        model: &Model,
        cfg: &Config,
        make: impl FnMut(&str) -> T,
    ) -> Result<Weights<T>, ConfigError> {
        let mut c = Check {
            model,
            n_expert: cfg.n_expert,
            problems: Vec::new(),
            make,
        };
        let d = cfg.n_embd;
        let hc_dim = cfg.hc * d;
        let hc_mix = (2 + cfg.hc) * cfg.hc;
        let token_embd = c.get(global::TOKEN_EMBD, &[d, cfg.n_vocab], Want::Embedding);
        let output_norm = c.vec(global::OUTPUT_NORM, d);
        let output = c.get(global::OUTPUT, &[d, cfg.n_vocab], Want::Matrix);
        let hc_head_fn = c.get(global::OUTPUT_HC_FN, &[hc_dim, cfg.hc], Want::Matrix);
        let hc_head_base = c.get(global::OUTPUT_HC_BASE, &[cfg.hc], Want::F32);
        let hc_head_scale = c.get(global::OUTPUT_HC_SCALE, &[1], Want::F32);
        let layers = (0..cfg.n_layer)
            .map(|il| bind_layer(&mut c, cfg, il, hc_dim, hc_mix))
            .collect();
        if !c.problems.is_empty() {
            return Err(ConfigError {
                problems: c.problems,
            });
        }
        Ok(Weights {
            token_embd,
            output_norm,
            output,
            hc_head_fn,
            hc_head_base,
            hc_head_scale,
            layers,
        })
    }
}

fn bind_layer<T, F: FnMut(&str) -> T>(
    c: &mut Check<'_, F>,
    cfg: &Config,
    il: usize,
    hc_dim: usize,
    hc_mix: usize,
) -> LayerWeights<T> {
    let n = |suffix: &str| lname(il as u32, suffix);
    let d = cfg.n_embd;
    let (h, dh) = (cfg.n_head, cfg.head_dim);
    let (e, ff) = (cfg.n_expert, cfg.expert_width(il));
    let kind = cfg.kinds[il];
    let compressor = (kind != LayerKind::Raw).then(|| {
        let coff = if kind == LayerKind::Csa { 2 } else { 1 };
        Compressor {
            kv: c.get(&n(blk::COMP_KV), &[d, coff * dh], Want::Matrix),
            gate: c.get(&n(blk::COMP_GATE), &[d, coff * dh], Want::Matrix),
            ape: c.get(&n(blk::COMP_APE), &[coff * dh, kind.ratio()], Want::F32),
            norm: c.vec(&n(blk::COMP_NORM), dh),
        }
    });
    let indexer = (kind == LayerKind::Csa).then(|| {
        let (ih, id) = (cfg.indexer_heads, cfg.indexer_dim);
        Indexer {
            q_b: c.get(&n(blk::INDEXER_Q_B), &[cfg.q_lora, ih * id], Want::Matrix),
            proj: c.get(&n(blk::INDEXER_PROJ), &[d, ih], Want::Matrix),
            comp: Compressor {
                kv: c.get(&n(blk::INDEXER_COMP_KV), &[d, 2 * id], Want::Matrix),
                gate: c.get(&n(blk::INDEXER_COMP_GATE), &[d, 2 * id], Want::Matrix),
                ape: c.get(&n(blk::INDEXER_COMP_APE), &[2 * id, 4], Want::F32),
                norm: c.vec(&n(blk::INDEXER_COMP_NORM), id),
            },
        }
    });
    let routing = if cfg.is_hash_layer(il) {
        Routing::Hash {
            tid2eid: c.get(
                &n(blk::FFN_TID2EID),
                &[cfg.n_expert_used, cfg.n_vocab],
                Want::I32,
            ),
        }
    } else {
        Routing::Score {
            bias: c.get(&n(blk::FFN_EXP_PROBS_B), &[e], Want::F32),
        }
    };
    LayerWeights {
        kind,
        attn_norm: c.vec(&n(blk::ATTN_NORM), d),
        ffn_norm: c.vec(&n(blk::FFN_NORM), d),
        hc_attn_fn: c.get(&n(blk::HC_ATTN_FN), &[hc_dim, hc_mix], Want::Matrix),
        hc_attn_base: c.get(&n(blk::HC_ATTN_BASE), &[hc_mix], Want::F32),
        hc_attn_scale: c.get(&n(blk::HC_ATTN_SCALE), &[3], Want::F32),
        hc_ffn_fn: c.get(&n(blk::HC_FFN_FN), &[hc_dim, hc_mix], Want::Matrix),
        hc_ffn_base: c.get(&n(blk::HC_FFN_BASE), &[hc_mix], Want::F32),
        hc_ffn_scale: c.get(&n(blk::HC_FFN_SCALE), &[3], Want::F32),
        sinks: c.get(&n(blk::ATTN_SINKS), &[h], Want::F32),
        q_a: c.get(&n(blk::ATTN_Q_A), &[d, cfg.q_lora], Want::Matrix),
        q_a_norm: c.vec(&n(blk::ATTN_Q_A_NORM), cfg.q_lora),
        q_b: c.get(&n(blk::ATTN_Q_B), &[cfg.q_lora, h * dh], Want::Matrix),
        kv: c.get(&n(blk::ATTN_KV), &[d, dh], Want::Matrix),
        kv_norm: c.vec(&n(blk::ATTN_KV_NORM), dh),
        o_a: c.get(
            &n(blk::ATTN_OUTPUT_A),
            &[h * dh / cfg.o_groups.max(1), cfg.o_groups * cfg.o_lora],
            Want::Matrix,
        ),
        o_b: c.get(
            &n(blk::ATTN_OUTPUT_B),
            &[cfg.o_groups * cfg.o_lora, d],
            Want::Matrix,
        ),
        gate_inp: c.get(&n(blk::FFN_GATE_INP), &[d, e], Want::Matrix),
        gate_exps: c.get(&n(blk::FFN_GATE_EXPS), &[d, ff, e], Want::Matrix),
        up_exps: c.get(&n(blk::FFN_UP_EXPS), &[d, ff, e], Want::Matrix),
        down_exps: c.get(&n(blk::FFN_DOWN_EXPS), &[ff, d, e], Want::Matrix),
        gate_shexp: c.get(
            &n(blk::FFN_GATE_SHEXP),
            &[d, ff * cfg.n_expert_shared],
            Want::Matrix,
        ),
        up_shexp: c.get(
            &n(blk::FFN_UP_SHEXP),
            &[d, ff * cfg.n_expert_shared],
            Want::Matrix,
        ),
        down_shexp: c.get(
            &n(blk::FFN_DOWN_SHEXP),
            &[ff * cfg.n_expert_shared, d],
            Want::Matrix,
        ),
        routing,
        compressor,
        indexer,
    }
}

impl<T: Copy> Compressor<T> {
    fn map<U>(&self, f: &impl Fn(T) -> U) -> Compressor<U> {
        Compressor {
            kv: f(self.kv),
            gate: f(self.gate),
            ape: f(self.ape),
            norm: f(self.norm),
        }
    }
}

impl<T: Copy> LayerWeights<T> {
    fn map<U>(&self, f: &impl Fn(T) -> U) -> LayerWeights<U> {
        LayerWeights {
            kind: self.kind,
            attn_norm: f(self.attn_norm),
            ffn_norm: f(self.ffn_norm),
            hc_attn_fn: f(self.hc_attn_fn),
            hc_attn_base: f(self.hc_attn_base),
            hc_attn_scale: f(self.hc_attn_scale),
            hc_ffn_fn: f(self.hc_ffn_fn),
            hc_ffn_base: f(self.hc_ffn_base),
            hc_ffn_scale: f(self.hc_ffn_scale),
            sinks: f(self.sinks),
            q_a: f(self.q_a),
            q_a_norm: f(self.q_a_norm),
            q_b: f(self.q_b),
            kv: f(self.kv),
            kv_norm: f(self.kv_norm),
            o_a: f(self.o_a),
            o_b: f(self.o_b),
            gate_inp: f(self.gate_inp),
            gate_exps: f(self.gate_exps),
            up_exps: f(self.up_exps),
            down_exps: f(self.down_exps),
            gate_shexp: f(self.gate_shexp),
            up_shexp: f(self.up_shexp),
            down_shexp: f(self.down_shexp),
            routing: match &self.routing {
                Routing::Hash { tid2eid } => Routing::Hash {
                    tid2eid: f(*tid2eid),
                },
                Routing::Score { bias } => Routing::Score { bias: f(*bias) },
            },
            compressor: self.compressor.as_ref().map(|c| c.map(f)),
            indexer: self.indexer.as_ref().map(|i| Indexer {
                q_b: f(i.q_b),
                proj: f(i.proj),
                comp: i.comp.map(f),
            }),
        }
    }
}

impl<T: Copy> Weights<T> {
    /// The same weights with each handle turned into another (e.g. an index into a ggml tensor).
    pub fn map<U>(&self, f: impl Fn(T) -> U) -> Weights<U> {
        Weights {
            token_embd: f(self.token_embd),
            output_norm: f(self.output_norm),
            output: f(self.output),
            hc_head_fn: f(self.hc_head_fn),
            hc_head_base: f(self.hc_head_base),
            hc_head_scale: f(self.hc_head_scale),
            layers: self.layers.iter().map(|l| l.map(&f)).collect(),
        }
    }
}
