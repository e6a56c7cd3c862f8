//! Tiny DeepSeek V4 models: seeded random `deepseek4` GGUFs of any size with every component active
//! (raw, ratio-4 and ratio-128 layers, indexer, hash and score routing, shared expert, SwiGLU clamp,
//! YaRN, hyper-connections), optionally with ferrite's own small byte-level BPE vocabulary.
//! They back `ferrite ... -m demo` and every model test; llama.cpp loads them (DSV4.md section 7).

use std::fmt;
use std::io;
use std::path::Path;

use gguf::{Array, GgmlType, Value, Writer};

use super::names::{self, blk, global, key};

/// Hyper-connection streams: fixed at 4 by llama.cpp's graph and fused ops.
pub const HC_MULT: u32 = 4;

/// Which vocabulary the file carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vocabulary {
    /// `tokenizer.ggml.model = "none"` plus `deepseek4.vocab_size`: feed token ids, no text.
    None,
    /// ferrite's demo byte-level BPE vocabulary ([`DemoVocab`]), padded to `n_vocab`.
    Demo,
}

/// Tensor types per weight family. 1-D tensors, hyper-connection and APE tensors are always F32, `tid2eid` I32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightTypes {
    /// Attention, compressor, indexer and router 2-D weights.
    pub dense: GgmlType,
    /// The stacked routed experts `ffn_{gate,up,down}_exps`.
    pub experts: GgmlType,
    /// The shared expert `ffn_{gate,up,down}_shexp`.
    pub shared: GgmlType,
    /// `token_embd` and `output`.
    pub embed: GgmlType,
}

impl WeightTypes {
    pub const F32: WeightTypes = WeightTypes::all(GgmlType::F32);

    /// The same type for every family.
    pub const fn all(ty: GgmlType) -> WeightTypes {
        WeightTypes {
            dense: ty,
            experts: ty,
            shared: ty,
            embed: ty,
        }
    }
}

/// Every shape and hyper-parameter of a tiny model. Field names follow DSV4.md's symbols.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyConfig {
    /// Main layers (`block_count`; no MTP tensors are written).
    pub n_layer: u32,
    /// Written as `nextn_predict_layers` only (like the converter); llama.cpp ignores it without MTP tensors.
    pub nextn_predict_layers: u32,
    pub n_embd: u32,
    pub n_vocab: u32,
    pub n_head: u32,
    /// K = V head dim (`key_length` = `value_length`).
    pub head_dim: u32,
    /// Rotary dims: the last `n_rot` of each head.
    pub n_rot: u32,
    pub q_lora_rank: u32,
    /// Output LoRA rank per group.
    pub o_lora_rank: u32,
    pub o_groups: u32,
    pub sliding_window: u32,
    /// One entry per layer, each 0, 4 or 128.
    pub compress_ratios: Vec<u32>,
    pub indexer_n_head: u32,
    pub indexer_head_dim: u32,
    pub indexer_top_k: u32,
    pub n_expert: u32,
    pub n_expert_used: u32,
    /// Routed and shared expert FFN width.
    pub expert_ffn: u32,
    pub n_expert_shared: u32,
    pub expert_weights_scale: f32,
    /// Layers `0..hash_layer_count` route by token id (`tid2eid`).
    pub hash_layer_count: u32,
    pub swiglu_clamp: f32,
    pub rope_freq_base: f32,
    pub compress_rope_freq_base: f32,
    pub yarn_factor: f32,
    pub yarn_orig_ctx: u32,
    pub context_length: u32,
    pub rms_eps: f32,
    pub hc_eps: f32,
    pub hc_sinkhorn_iters: u32,
    pub types: WeightTypes,
    pub vocab: Vocabulary,
}

impl TinyConfig {
    /// DSV4.md section 7's verified configuration: 6 layers, ratios [0,4,128,4,128,0], hidden 256, 4 heads of 128,
    /// 16 indexer heads of 64 (top-8), 8 experts top-2 of width 64, hash layers 0-1, window 16, YaRN 16 from 256.
    pub fn small() -> TinyConfig {
        TinyConfig {
            n_layer: 6,
            nextn_predict_layers: 0,
            n_embd: 256,
            n_vocab: 1024,
            n_head: 4,
            head_dim: 128,
            n_rot: 32,
            q_lora_rank: 64,
            o_lora_rank: 32,
            o_groups: 2,
            sliding_window: 16,
            compress_ratios: vec![0, 4, 128, 4, 128, 0],
            indexer_n_head: 16,
            indexer_head_dim: 64,
            indexer_top_k: 8,
            n_expert: 8,
            n_expert_used: 2,
            expert_ffn: 64,
            n_expert_shared: 1,
            expert_weights_scale: 1.5,
            hash_layer_count: 2,
            swiglu_clamp: 10.0,
            rope_freq_base: 10000.0,
            compress_rope_freq_base: 160000.0,
            yarn_factor: 16.0,
            yarn_orig_ctx: 256,
            context_length: 4096,
            rms_eps: 1e-6,
            hc_eps: 1e-6,
            hc_sinkhorn_iters: 20,
            types: WeightTypes::F32,
            vocab: Vocabulary::None,
        }
    }

    /// A second, different layout: 7 layers [0,4,128,4,0,128,4], hidden 384, 8 heads of 96 (rope 32), 4 output
    /// groups, window 32, 16 experts top-4 of width 32, 3 hash layers (raw, ratio 4 and ratio 128), indexer
    /// 16 x 64 top-16, YaRN 8 from 512, `nextn_predict_layers = 1` without MTP tensors (as the converter writes it).
    pub fn alt() -> TinyConfig {
        TinyConfig {
            n_layer: 7,
            nextn_predict_layers: 1,
            n_embd: 384,
            n_vocab: 768,
            n_head: 8,
            head_dim: 96,
            n_rot: 32,
            q_lora_rank: 96,
            o_lora_rank: 48,
            o_groups: 4,
            sliding_window: 32,
            compress_ratios: vec![0, 4, 128, 4, 0, 128, 4],
            indexer_n_head: 16,
            indexer_head_dim: 64,
            indexer_top_k: 16,
            n_expert: 16,
            n_expert_used: 4,
            expert_ffn: 32,
            n_expert_shared: 1,
            expert_weights_scale: 2.5,
            hash_layer_count: 3,
            swiglu_clamp: 10.0,
            rope_freq_base: 10000.0,
            compress_rope_freq_base: 160000.0,
            yarn_factor: 8.0,
            yarn_orig_ctx: 512,
            context_length: 8192,
            rms_eps: 1e-6,
            hc_eps: 1e-6,
            hc_sinkhorn_iters: 20,
            types: WeightTypes::F32,
            vocab: Vocabulary::None,
        }
    }

    /// The `-m demo` model: small and quick (4 layers [0,4,128,0]), with the demo vocabulary so text goes in and out.
    pub fn demo() -> TinyConfig {
        TinyConfig {
            n_layer: 4,
            n_vocab: 512,
            compress_ratios: vec![0, 4, 128, 0],
            vocab: Vocabulary::Demo,
            ..TinyConfig::small()
        }
    }

    /// Big experts for size tests of checkpoint conversion: [`TinyConfig::small`]'s layout with hidden 1024, 256 experts
    /// (top 8) of width 1024. As an official checkpoint (FP4 experts) that is about 2.6 GB, almost all routed
    /// experts; meant for [`super::tiny_hf::Fill::Fast`] checkpoints or quantized GGUFs (as F32 it is ~20 GB).
    pub fn big_experts() -> TinyConfig {
        TinyConfig {
            n_embd: 1024,
            n_expert: 256,
            n_expert_used: 8,
            expert_ffn: 1024,
            ..TinyConfig::small()
        }
    }

    /// DeepSeek V4 Flash at its real widths (DSV4.md sections 1-2) with `n_layer` layers, for speed measurements at the
    /// real matrix sizes: hidden 4096, vocabulary 129280 (`tokenizer.ggml.model = "none"`), 64 heads of 512 (rope
    /// 64), q LoRA 1024, 8 output groups of rank 1024, window 128, compressors of ratio 4 and 128, indexer 64 x 128
    /// top-512, 256 routed experts top-6 and 1 shared expert, all of width 2048, YaRN 16 from 65536, context 1M.
    ///
    /// Layer schedule: layer 0 raw (ratio 0), then 4, 128, 4, 128, ... (a single layer is ratio 4: llama.cpp needs one);
    /// hash routing in the first min(3, n_layer) layers, like Flash. Weight types: Q4_K routed experts, Q8_0 for the
    /// rest (the `Q4_K_M` recipe); [`TinyConfig::with_types`] changes them. At these types a layer is about 3.8 GB
    /// (3.6 GB of routed experts) and the embedding and output 1.1 GB: two layers make 8.7 GB. Written with
    /// [`write_tiny_model`] in chunks on every core (see [`Generation`]); `examples/flash_model.rs` is the command.
    pub fn flash(n_layer: u32) -> TinyConfig {
        let compress_ratios = match n_layer {
            1 => vec![4],
            n => (0..n)
                .map(|il| match il {
                    0 => 0,
                    il if il % 2 == 1 => 4,
                    _ => 128,
                })
                .collect(),
        };
        TinyConfig {
            n_layer,
            nextn_predict_layers: 0,
            n_embd: 4096,
            n_vocab: 129280,
            n_head: 64,
            head_dim: 512,
            n_rot: 64,
            q_lora_rank: 1024,
            o_lora_rank: 1024,
            o_groups: 8,
            sliding_window: 128,
            compress_ratios,
            indexer_n_head: 64,
            indexer_head_dim: 128,
            indexer_top_k: 512,
            n_expert: 256,
            n_expert_used: 6,
            expert_ffn: 2048,
            n_expert_shared: 1,
            expert_weights_scale: 1.5,
            hash_layer_count: n_layer.min(3),
            swiglu_clamp: 10.0,
            rope_freq_base: 10000.0,
            compress_rope_freq_base: 160000.0,
            yarn_factor: 16.0,
            yarn_orig_ctx: 65536,
            context_length: 1 << 20,
            rms_eps: 1e-6,
            hc_eps: 1e-6,
            hc_sinkhorn_iters: 20,
            types: WeightTypes {
                dense: GgmlType::Q8_0,
                experts: GgmlType::Q4K,
                shared: GgmlType::Q8_0,
                embed: GgmlType::Q8_0,
            },
            vocab: Vocabulary::None,
        }
    }

    /// The same configuration with other weight types.
    pub fn with_types(self, types: WeightTypes) -> TinyConfig {
        TinyConfig { types, ..self }
    }

    /// Checks every loader and graph constraint of llama.cpp (DSV4.md section 7) that this generator can break;
    /// reports all problems at once.
    pub fn validate(&self) -> Result<(), TinyError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, what: &str, expected: &str, got: String| {
            if !ok {
                problems.push(format!("{what}: expected {expected}, got {got}"));
            }
        };
        let (ratios, n_layer) = (&self.compress_ratios, self.n_layer);
        check(
            (1..=512).contains(&n_layer),
            "n_layer",
            "1..=512",
            n_layer.to_string(),
        );
        check(
            ratios.len() == n_layer as usize,
            "compress_ratios",
            "one entry per layer",
            format!("{ratios:?}"),
        );
        let known = ratios.iter().all(|r| [0, 4, 128].contains(r));
        check(
            known,
            "compress_ratios",
            "entries 0, 4 or 128",
            format!("{ratios:?}"),
        );
        let csa = "at least one ratio-4 layer (llama.cpp dies with SIGFPE without one)";
        check(
            ratios.contains(&4),
            "compress_ratios",
            csa,
            format!("{ratios:?}"),
        );
        let hca = "a ratio-128 layer, as head_dim == indexer_head_dim";
        let hca_ok = self.head_dim != self.indexer_head_dim || ratios.contains(&128);
        check(hca_ok, "compress_ratios", hca, format!("{ratios:?}"));
        for (name, v) in [
            ("n_embd", self.n_embd),
            ("n_vocab", self.n_vocab),
            ("n_head", self.n_head),
            ("q_lora_rank", self.q_lora_rank),
            ("o_lora_rank", self.o_lora_rank),
            ("o_groups", self.o_groups),
            ("sliding_window", self.sliding_window),
            ("indexer_n_head", self.indexer_n_head),
            ("indexer_top_k", self.indexer_top_k),
            ("n_expert_used", self.n_expert_used),
            ("expert_ffn", self.expert_ffn),
            ("n_expert_shared", self.n_expert_shared),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters),
            ("yarn_orig_ctx", self.yarn_orig_ctx),
            ("context_length", self.context_length),
        ] {
            check(v > 0, name, "> 0", "0".into());
        }
        let (dh, rot, idh) = (self.head_dim, self.n_rot, self.indexer_head_dim);
        let rot_ok = rot > 0 && rot % 2 == 0 && rot <= dh && (dh - rot) % 2 == 0;
        check(
            rot_ok,
            "n_rot",
            "even, > 0, <= head_dim, head_dim - n_rot even",
            format!("{rot} (head_dim {dh})"),
        );
        let idx_ok = idh % 64 == 0 && idh >= rot;
        check(
            idx_ok,
            "indexer_head_dim",
            "a multiple of 64, >= n_rot",
            format!("{idh} (n_rot {rot})"),
        );
        let groups_ok = self.o_groups > 0 && self.n_head % self.o_groups == 0;
        check(
            groups_ok,
            "o_groups",
            "a divisor of n_head",
            format!("{} (n_head {})", self.o_groups, self.n_head),
        );
        let experts_ok = self.n_expert <= 1024 && self.n_expert_used <= self.n_expert;
        let experts = format!("{} of {}", self.n_expert_used, self.n_expert);
        check(
            experts_ok,
            "n_expert_used of n_expert",
            "n_expert_used <= n_expert <= 1024",
            experts,
        );
        let hash_ok = self.hash_layer_count <= n_layer;
        check(
            hash_ok,
            "hash_layer_count",
            "<= n_layer",
            format!("{} (n_layer {n_layer})", self.hash_layer_count),
        );
        let t = self.types;
        for (family, ty) in [
            ("dense", t.dense),
            ("experts", t.experts),
            ("shared", t.shared),
            ("embed", t.embed),
        ] {
            let storable = "F32, F16, BF16 or a block type ggml can quantize to";
            check(
                is_weight_type(ty),
                &format!("types.{family}"),
                storable,
                ty.to_string(),
            );
        }
        let vocab_ok =
            self.vocab == Vocabulary::None || self.n_vocab as usize >= DemoVocab::base_len();
        let min_vocab = format!(">= {} for the demo vocabulary", DemoVocab::base_len());
        check(vocab_ok, "n_vocab", &min_vocab, self.n_vocab.to_string());
        match problems.is_empty() {
            true => Ok(()),
            false => Err(TinyError::Config(problems.join("; "))),
        }
    }
}

/// What [`write_tiny_model`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TinyModel {
    pub n_tensors: usize,
    pub file_bytes: u64,
    pub n_vocab: u32,
}

/// Why a tiny model could not be written.
#[derive(Debug)]
pub enum TinyError {
    /// The configuration breaks a llama.cpp constraint.
    Config(String),
    /// A tensor cannot be stored in the requested type.
    Type {
        tensor: String,
        ty: GgmlType,
        detail: String,
    },
    Gguf(gguf::GgufError),
    /// The caller stopped [`write_tiny_model_with`]; no file was left.
    Cancelled,
}

impl fmt::Display for TinyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TinyError::Config(detail) => write!(f, "tiny model configuration: {detail}"),
            TinyError::Type { tensor, ty, detail } => {
                write!(f, "tiny model tensor {tensor} as {ty}: {detail}")
            }
            TinyError::Gguf(e) => write!(f, "writing the tiny model: {e}"),
            TinyError::Cancelled => write!(f, "writing the tiny model: cancelled"),
        }
    }
}

impl std::error::Error for TinyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TinyError::Gguf(e) => Some(e),
            _ => None,
        }
    }
}

impl From<gguf::GgufError> for TinyError {
    fn from(e: gguf::GgufError) -> TinyError {
        TinyError::Gguf(e)
    }
}

/// Writes a seeded random tiny model to `path` (replacing it atomically). Same config and seed give the same bytes.
/// Large tensors are streamed in chunks on every core ([`Generation::default`]).
pub fn write_tiny_model(path: &Path, cfg: &TinyConfig, seed: u64) -> Result<TinyModel, TinyError> {
    write_tiny_model_with(path, cfg, seed, &Generation::default(), &mut |_| true)
}

/// How tensor data is generated: in chunks of whole rows, quantized on several threads, so a model of any size is
/// written with little memory (about `threads` + 1 chunks of f32 values and their encodings at a time).
///
/// `threads` and `chunk_values` never change a value. [`Streams`] defines the values: a tensor drawn from one random
/// stream is drawn chunk after chunk, in order, on the calling thread and only its quantization runs in parallel; a
/// tensor big enough for block streams is drawn and quantized block by block on every thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation {
    /// Worker threads; 0 = every core (`std::thread::available_parallelism`).
    pub threads: usize,
    /// About how many values one chunk holds (whole rows, and whole blocks for block-stream tensors; at least one
    /// row or block). A tensor that fits in one chunk is generated in one piece on the calling thread.
    pub chunk_values: usize,
    /// Which tensors draw their values from per-block streams.
    pub streams: Streams,
}

impl Default for Generation {
    /// Every core, chunks of 8M values (32 MB of f32), [`Streams::DEFAULT`].
    fn default() -> Generation {
        Generation {
            threads: 0,
            chunk_values: 1 << 23,
            streams: Streams::DEFAULT,
        }
    }
}

impl Generation {
    fn thread_count(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Which tensors draw their values from one random stream and which from one stream per block of rows.
///
/// Every tensor has its own stream (from the seed and its name), drawn in ggml order. A single stream is drawn on one
/// thread (about 20 ns a value: 40 s for one of Flash's 2^31-value routed-expert stacks), so a tensor with at least
/// `block_min_values` values is split into blocks of `max(1, block_values / ne0)` whole rows, block `b` drawn from a
/// stream derived from the seed, the name and `b` (splitmix64 of `b` mixed into the tensor's stream state); blocks
/// are independent and drawn in parallel. `tid2eid` ids always come from one stream. The default threshold, 2^30
/// values, is above every tensor of the small presets (the largest, [`TinyConfig::big_experts`]' expert stacks, has
/// 2^28), so their files are exactly what they were before streaming existed, and below Flash's expert stacks, whose
/// blocks of 2^23 values are one expert each. Changing either field changes the values of the tensors it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Streams {
    /// Tensors with at least this many values use block streams.
    pub block_min_values: u64,
    /// Values per block (rounded down to whole rows, at least one row).
    pub block_values: u64,
}

impl Streams {
    pub const DEFAULT: Streams = Streams {
        block_min_values: 1 << 30,
        block_values: 1 << 23,
    };

    /// Rows per block when `spec` uses block streams, `None` when it is one stream.
    fn block_rows(&self, spec: &TensorSpec) -> Option<usize> {
        if matches!(spec.init, Init::ExpertIds { .. }) {
            return None;
        }
        let n: u64 = spec.dims.iter().product();
        let ne0 = spec.dims[0].max(1);
        (n >= self.block_min_values).then(|| (self.block_values / ne0).max(1) as usize)
    }
}

/// Where [`write_tiny_model_with`] is, reported after each chunk it writes.
#[derive(Clone, Copy, Debug)]
pub struct Progress<'a> {
    /// The tensor being written (or just finished).
    pub tensor: &'a str,
    /// Tensors written completely so far, and in all.
    pub tensors_done: usize,
    pub tensors_total: usize,
    /// Tensor data bytes written so far and in all (without header and padding).
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// [`write_tiny_model`] with a choice of threads, chunk size and streams, calling `progress` after each chunk
/// written; when it returns false, writing stops with [`TinyError::Cancelled`] and leaves no file. With
/// [`Generation::default`] it writes the same bytes as [`write_tiny_model`].
pub fn write_tiny_model_with(
    path: &Path,
    cfg: &TinyConfig,
    seed: u64,
    generation: &Generation,
    progress: &mut dyn FnMut(&Progress<'_>) -> bool,
) -> Result<TinyModel, TinyError> {
    cfg.validate()?;
    if generation.chunk_values == 0 || generation.streams.block_values == 0 {
        let detail = format!("chunk_values and streams.block_values must be > 0: {generation:?}");
        return Err(TinyError::Config(detail));
    }
    let specs = tensor_specs(cfg);
    let bytes_total = specs.iter().map(spec_bytes).sum();
    let (mut done, mut bytes_done) = (0, 0);
    write_specs_streaming(path, cfg, &specs, |spec, out| {
        let mut report = |bytes: u64, finished: bool| {
            bytes_done += bytes;
            done += usize::from(finished);
            let go_on = progress(&Progress {
                tensor: &spec.name,
                tensors_done: done,
                tensors_total: specs.len(),
                bytes_done,
                bytes_total,
            });
            match go_on {
                true => Ok(()),
                false => Err(Fill::Tiny(TinyError::Cancelled)),
            }
        };
        write_tensor(spec, seed, generation, out, &mut report)
    })
}

/// The exact file size [`write_tiny_model`] writes for `cfg`, without writing anything.
pub fn tiny_model_bytes(cfg: &TinyConfig) -> Result<u64, TinyError> {
    cfg.validate()?;
    Ok(plan_writer(cfg, &tensor_specs(cfg))?.plan()?.total_bytes)
}

/// One tensor of a tiny model: name, shape (ggml order, `ne0` first) and type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TinyTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

/// The tensors [`write_tiny_model`] writes for `cfg`, in file order (nothing is generated).
pub fn tiny_tensors(cfg: &TinyConfig) -> Vec<TinyTensor> {
    tensor_specs(cfg)
        .into_iter()
        .map(|s| TinyTensor {
            name: s.name,
            dims: s.dims,
            ty: s.ty,
        })
        .collect()
}

/// The GGUF the checkpoint of [`super::tiny_hf::write_tiny_checkpoint`] converts to: the same tensors with their
/// values rounded to the official checkpoint dtypes (see [`super::tiny_hf::write_tiny_model_official`]).
pub use super::tiny_hf::write_tiny_model_official;

/// Writes the metadata of `cfg` and the tensors `specs` to `path` (replacing it atomically), each tensor's bytes
/// made by `bytes` one at a time.
pub(crate) fn write_specs(
    path: &Path,
    cfg: &TinyConfig,
    specs: &[TensorSpec],
    mut bytes: impl FnMut(&TensorSpec) -> Result<Vec<u8>, TinyError>,
) -> Result<TinyModel, TinyError> {
    write_specs_streaming(path, cfg, specs, |spec, out| {
        let bytes = bytes(spec)?;
        out.write_all(&bytes).map_err(Fill::Io)
    })
}

/// Why filling a tensor's data stopped: the output failed, or generating the data did.
pub(crate) enum Fill {
    Io(io::Error),
    Tiny(TinyError),
}

impl From<TinyError> for Fill {
    fn from(e: TinyError) -> Fill {
        Fill::Tiny(e)
    }
}

impl From<io::Error> for Fill {
    fn from(e: io::Error) -> Fill {
        Fill::Io(e)
    }
}

/// The writer with the metadata of `cfg` and the tensor table of `specs`.
fn plan_writer(cfg: &TinyConfig, specs: &[TensorSpec]) -> Result<Writer, TinyError> {
    let mut w = Writer::new();
    write_metadata(&mut w, cfg);
    for s in specs {
        w.add_tensor(&s.name, &s.dims, s.ty)
            .map_err(|e| TinyError::Type {
                tensor: s.name.clone(),
                ty: s.ty,
                detail: e.to_string(),
            })?;
    }
    Ok(w)
}

/// [`write_specs`] where `fill` writes each tensor's bytes to the file itself, in as many pieces as it likes.
pub(crate) fn write_specs_streaming(
    path: &Path,
    cfg: &TinyConfig,
    specs: &[TensorSpec],
    mut fill: impl FnMut(&TensorSpec, &mut dyn io::Write) -> Result<(), Fill>,
) -> Result<TinyModel, TinyError> {
    let w = plan_writer(cfg, specs)?;
    // Tensor data is generated inside the writer's callback, one tensor at a time; a failure is parked here
    // because the callback can only return io::Error.
    let mut failure: Option<TinyError> = None;
    let result = w.write_file(path, true, |i, _, out| match fill(&specs[i], out) {
        Ok(()) => Ok(()),
        Err(Fill::Io(e)) => Err(e),
        Err(Fill::Tiny(e)) => {
            failure = Some(e);
            Err(io::Error::other("tensor generation failed"))
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let layout = result?;
    Ok(TinyModel {
        n_tensors: specs.len(),
        file_bytes: layout.total_bytes,
        n_vocab: cfg.n_vocab,
    })
}

fn write_metadata(w: &mut Writer, cfg: &TinyConfig) {
    let u = |v: u32| Value::U32(v);
    let f = |v: f32| Value::F32(v);
    w.set(key::ARCHITECTURE, Value::String(names::ARCH.into()));
    w.set(
        "general.name",
        Value::String("ferrite tiny deepseek4".into()),
    );
    w.set(key::BLOCK_COUNT, u(cfg.n_layer));
    w.set(key::NEXTN_PREDICT_LAYERS, u(cfg.nextn_predict_layers));
    w.set(key::CONTEXT_LENGTH, u(cfg.context_length));
    w.set(key::EMBEDDING_LENGTH, u(cfg.n_embd));
    w.set(key::VOCAB_SIZE, u(cfg.n_vocab));
    w.set(key::HEAD_COUNT, u(cfg.n_head));
    w.set(key::HEAD_COUNT_KV, u(1));
    w.set(key::KEY_LENGTH, u(cfg.head_dim));
    w.set(key::VALUE_LENGTH, u(cfg.head_dim));
    w.set(key::ROPE_DIMENSION_COUNT, u(cfg.n_rot));
    w.set(key::Q_LORA_RANK, u(cfg.q_lora_rank));
    w.set(key::OUTPUT_LORA_RANK, u(cfg.o_lora_rank));
    w.set(key::OUTPUT_GROUP_COUNT, u(cfg.o_groups));
    w.set(key::SLIDING_WINDOW, u(cfg.sliding_window));
    let ratios = cfg.compress_ratios.iter().map(|&r| r as i32).collect();
    w.set(key::COMPRESS_RATIOS, Value::Array(Array::I32(ratios)));
    w.set(key::COMPRESS_ROPE_FREQ_BASE, f(cfg.compress_rope_freq_base));
    w.set(key::ROPE_FREQ_BASE, f(cfg.rope_freq_base));
    w.set(key::ROPE_SCALING_TYPE, Value::String("yarn".into()));
    w.set(key::ROPE_SCALING_FACTOR, f(cfg.yarn_factor));
    w.set(key::ROPE_SCALING_ORIG_CTX, u(cfg.yarn_orig_ctx));
    w.set(key::ROPE_SCALING_BETA_FAST, f(32.0));
    w.set(key::ROPE_SCALING_BETA_SLOW, f(1.0));
    w.set(key::RMS_EPS, f(cfg.rms_eps));
    w.set(key::EXPERT_COUNT, u(cfg.n_expert));
    w.set(key::EXPERT_USED_COUNT, u(cfg.n_expert_used));
    w.set(key::EXPERT_FFN_LENGTH, u(cfg.expert_ffn));
    w.set(key::EXPERT_SHARED_COUNT, u(cfg.n_expert_shared));
    w.set(key::EXPERT_WEIGHTS_SCALE, f(cfg.expert_weights_scale));
    w.set(key::EXPERT_WEIGHTS_NORM, Value::Bool(true));
    w.set(key::EXPERT_GATING_FUNC, u(names::GATING_SQRT_SOFTPLUS));
    w.set(key::HASH_LAYER_COUNT, u(cfg.hash_layer_count));
    let clamp = vec![cfg.swiglu_clamp; cfg.n_layer as usize];
    w.set(key::SWIGLU_CLAMP_EXP, Value::Array(Array::F32(clamp)));
    w.set(key::INDEXER_HEAD_COUNT, u(cfg.indexer_n_head));
    w.set(key::INDEXER_KEY_LENGTH, u(cfg.indexer_head_dim));
    w.set(key::INDEXER_TOP_K, u(cfg.indexer_top_k));
    w.set(key::HC_COUNT, u(HC_MULT));
    w.set(key::HC_SINKHORN_ITERS, u(cfg.hc_sinkhorn_iters));
    w.set(key::HC_EPS, f(cfg.hc_eps));
    match cfg.vocab {
        Vocabulary::None => w.set(key::TOKENIZER_MODEL, Value::String("none".into())),
        Vocabulary::Demo => DemoVocab::new(cfg.n_vocab).write_metadata(w),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tensors: names, shapes (ggml order), types and how their values are drawn.

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Init {
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
pub(crate) struct TensorSpec {
    pub(crate) name: String,
    pub(crate) dims: Vec<u64>,
    pub(crate) ty: GgmlType,
    pub(crate) init: Init,
}

/// Pre-activation std of the expert gate/up projections on RMS-normalised inputs: |x| > 10 for ~21 % of them,
/// so the SwiGLU clamp at 10 bites (DSV4.md section 7).
const EXPERT_PREACT_STD: f32 = 8.0;
/// Expert down projections are scaled so a clamped SwiGLU (rms ~ 40) gives O(1) outputs.
const EXPERT_DOWN_GAIN: f32 = 1.0 / 32.0;

pub(crate) fn tensor_specs(cfg: &TinyConfig) -> Vec<TensorSpec> {
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

/// The bytes of one tensor in its type, made in one piece. Every tensor has its own random stream (seed and name),
/// so a tensor's values do not depend on which other tensors the configuration has.
fn tensor_bytes(spec: &TensorSpec, seed: u64, streams: &Streams) -> Result<Vec<u8>, TinyError> {
    match tensor_values_with(spec, seed, streams) {
        Values::Ids(ids) => Ok(ids.into_iter().flat_map(i32::to_le_bytes).collect()),
        Values::F32(values) => encode(&spec.name, spec.ty, &values, spec.dims[0] as usize),
    }
}

/// Bytes of one tensor's data in its type.
fn spec_bytes(spec: &TensorSpec) -> u64 {
    spec.ty.tensor_bytes(&spec.dims).unwrap_or(0)
}

/// Writes one tensor's bytes to `out`: in one piece when it fits in a chunk (or holds ids), otherwise in chunks of
/// whole rows (whole blocks for block streams) on `generation.threads` threads, written in order. A one-stream
/// tensor's chunks are drawn in order from its stream on this thread, each handed to a thread to encode, so the
/// values are those of [`tensor_values`]; block-stream chunks are drawn and encoded on their threads. `report`
/// gets the bytes of each piece written and whether the tensor is complete; its error stops the writing.
fn write_tensor(
    spec: &TensorSpec,
    seed: u64,
    generation: &Generation,
    out: &mut dyn io::Write,
    report: &mut dyn FnMut(u64, bool) -> Result<(), Fill>,
) -> Result<(), Fill> {
    let streams = &generation.streams;
    let n_per_row = spec.dims[0].max(1) as usize;
    let n_rows = (spec.dims.iter().product::<u64>() as usize) / n_per_row;
    let block_rows = streams.block_rows(spec);
    let chunk_rows = match block_rows {
        None => (generation.chunk_values / n_per_row).max(1),
        Some(b) => b * (generation.chunk_values / (b * n_per_row)).max(1),
    };
    if matches!(spec.init, Init::ExpertIds { .. }) || chunk_rows >= n_rows {
        let bytes = tensor_bytes(spec, seed, streams)?;
        out.write_all(&bytes)?;
        return report(bytes.len() as u64, true);
    }
    let threads = generation.thread_count().max(1);
    let encode_rows = |values: &[f32]| -> Result<Vec<u8>, TinyError> {
        encode(&spec.name, spec.ty, values, n_per_row)
    };
    let panicked = || TinyError::Type {
        tensor: spec.name.clone(),
        ty: spec.ty,
        detail: "a generation thread panicked".into(),
    };
    let mut rng = Rng::for_tensor(seed, &spec.name);
    let (n_chunks, mut n_written) = (n_rows.div_ceil(chunk_rows), 0);
    let mut write = |bytes: Vec<u8>| -> Result<(), Fill> {
        out.write_all(&bytes)?;
        n_written += 1;
        report(bytes.len() as u64, n_written == n_chunks)
    };
    std::thread::scope(|s| -> Result<(), Fill> {
        let mut in_flight = std::collections::VecDeque::new();
        for start in (0..n_rows).step_by(chunk_rows) {
            let rows = start..(start + chunk_rows).min(n_rows);
            let handle = match block_rows {
                None => {
                    let values = draw(spec.init, &mut rng, rows.len() * n_per_row);
                    s.spawn(move || encode_rows(&values))
                }
                Some(b) => s.spawn(move || encode_rows(&block_values(spec, seed, b, n_rows, rows))),
            };
            in_flight.push_back(handle);
            if in_flight.len() >= threads {
                let done = in_flight.pop_front().expect("not empty");
                write(done.join().map_err(|_| panicked())??)?;
            }
        }
        for done in in_flight {
            write(done.join().map_err(|_| panicked())??)?;
        }
        Ok(())
    })
}

/// A tensor's values before they are stored in its type, in ggml order (`dims[0]` fastest).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Values {
    F32(Vec<f32>),
    /// `tid2eid` rows of expert ids.
    Ids(Vec<i32>),
}

/// The values of one tensor, drawn from its own random stream (seed and name), or from per-block streams for a
/// tensor of at least 2^30 values ([`Streams::DEFAULT`]).
pub(crate) fn tensor_values(spec: &TensorSpec, seed: u64) -> Values {
    tensor_values_with(spec, seed, &Streams::DEFAULT)
}

/// [`tensor_values`] with other [`Streams`].
fn tensor_values_with(spec: &TensorSpec, seed: u64, streams: &Streams) -> Values {
    let mut rng = Rng::for_tensor(seed, &spec.name);
    let n: u64 = spec.dims.iter().product();
    let n = n as usize;
    if let Init::ExpertIds { n_expert } = spec.init {
        let n_used = (spec.dims[0] as usize).max(1);
        let ids = (0..n / n_used)
            .flat_map(|_| rng.distinct(n_used, n_expert as usize))
            .map(|e| e as i32);
        return Values::Ids(ids.collect());
    }
    match streams.block_rows(spec) {
        None => Values::F32(draw(spec.init, &mut rng, n)),
        Some(b) => {
            let n_rows = n / (spec.dims[0].max(1) as usize);
            Values::F32(block_values(spec, seed, b, n_rows, 0..n_rows))
        }
    }
}

/// The next `n` values of `rng` for `init` (not ids).
fn draw(init: Init, rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match init {
            Init::Normal(std) => std * rng.normal(),
            Init::Norm => 1.0 + 0.1 * rng.normal(),
            Init::Uniform(lo, hi) => lo + (hi - lo) * rng.uniform() as f32,
            Init::ExpertIds { .. } => unreachable!("ids are drawn by tensor_values"),
        })
        .collect()
}

/// Values of `rows` (starting on a block boundary) of a block-stream tensor with `n_rows` rows in blocks of
/// `block_rows`: each block from its own stream ([`Rng::for_block`]).
fn block_values(
    spec: &TensorSpec,
    seed: u64,
    block_rows: usize,
    n_rows: usize,
    rows: std::ops::Range<usize>,
) -> Vec<f32> {
    debug_assert!(rows.start % block_rows == 0 && rows.end <= n_rows);
    let n_per_row = spec.dims[0].max(1) as usize;
    let mut values = Vec::with_capacity(rows.len() * n_per_row);
    for start in (rows.start..rows.end).step_by(block_rows) {
        let block = (start / block_rows) as u64;
        let mut rng = Rng::for_block(seed, &spec.name, block);
        let end = (start + block_rows).min(rows.end);
        values.extend(draw(spec.init, &mut rng, (end - start) * n_per_row));
    }
    values
}

/// A tensor's f32 values as the bytes of its type.
pub(crate) fn encode_values(spec: &TensorSpec, values: &[f32]) -> Result<Vec<u8>, TinyError> {
    encode(&spec.name, spec.ty, values, spec.dims[0] as usize)
}

/// Types a weight can be stored in: those ggml has a quantizer for (not the activation-only Q8_1 / Q8_K).
fn is_weight_type(ty: GgmlType) -> bool {
    crate::ggml::can_quantize_to(ty)
}

/// f32 values -> the bytes of `ty`: F32/F16/BF16 directly, block types through ggml's own quantizer.
fn encode(
    name: &str,
    ty: GgmlType,
    values: &[f32],
    n_per_row: usize,
) -> Result<Vec<u8>, TinyError> {
    match ty {
        GgmlType::F32 => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::F16 => Ok(values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect()),
        GgmlType::Bf16 => Ok(values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect()),
        _ => quantize_rows(ty, values, n_per_row).map_err(|detail| TinyError::Type {
            tensor: name.into(),
            ty,
            detail,
        }),
    }
}

/// Quantizes whole rows with ggml's own quantizer; types that need an importance matrix get a uniform one.
fn quantize_rows(ty: GgmlType, values: &[f32], n_per_row: usize) -> Result<Vec<u8>, String> {
    let uniform = vec![1.0f32; n_per_row];
    let imatrix = crate::ggml::requires_imatrix(ty).then_some(uniform.as_slice());
    crate::ggml::quantize_rows(ty, values, n_per_row, imatrix).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------------------------------
// Random numbers: splitmix64 with Box-Muller normals. Small, seeded, identical on every platform.

struct Rng {
    state: u64,
    spare: Option<f32>,
}

impl Rng {
    /// A stream for one tensor: the seed mixed with the FNV-1a hash of its name.
    fn for_tensor(seed: u64, name: &str) -> Rng {
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = Rng {
            state: seed ^ hash.rotate_left(17),
            spare: None,
        };
        rng.next_u64();
        rng
    }

    /// The stream of block `block` of a block-stream tensor ([`Streams`]): the tensor's stream state mixed with a
    /// splitmix64 hash of the block index, so blocks start at unrelated points of the sequence.
    fn for_block(seed: u64, name: &str, block: u64) -> Rng {
        let tensor = Rng::for_tensor(seed, name);
        let mut key = Rng {
            state: block,
            spare: None,
        };
        let mut rng = Rng {
            state: tensor.state ^ key.next_u64(),
            spare: None,
        };
        rng.next_u64();
        rng
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller; the second value of each pair is kept for the next call).
    fn normal(&mut self) -> f32 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some((r * s) as f32);
        (r * c) as f32
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }

    /// `k` distinct values of 0..n in random order (partial Fisher-Yates).
    fn distinct(&mut self, k: usize, n: usize) -> Vec<usize> {
        let mut pool: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            pool.swap(i, j);
        }
        pool.truncate(k);
        pool
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The demo vocabulary.

/// ferrite's demo vocabulary: byte-level BPE in GPT-2's byte-to-unicode alphabet with DeepSeek V4's pre-tokenizer
/// (`deepseek-v3`), a few English merges, DeepSeek's special tokens, padded with placeholders to `n_vocab`.
///
/// Layout: 0 BOS, 1 EOS, 2..258 the 256 byte tokens (in byte order), then one token per merge, then `<｜User｜>`,
/// `<｜Assistant｜>`, `<think>`, `</think>`, then `<｜place▁holder▁no▁K｜>` up to `n_vocab`.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoVocab {
    pub tokens: Vec<String>,
    /// llama.cpp token types: 1 normal, 3 control, 4 user-defined.
    pub token_types: Vec<i32>,
    /// `"left right"` pairs in rank order.
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
    pub user: u32,
    pub assistant: u32,
    pub think: u32,
    pub think_end: u32,
}

pub const BOS_TEXT: &str = "<｜begin▁of▁sentence｜>";
pub const EOS_TEXT: &str = "<｜end▁of▁sentence｜>";
pub const USER_TEXT: &str = "<｜User｜>";
pub const ASSISTANT_TEXT: &str = "<｜Assistant｜>";
pub const THINK_TEXT: &str = "<think>";
pub const THINK_END_TEXT: &str = "</think>";

/// llama.cpp's `llama_token_type` values used here.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// Common English pairs, in the GPT-2 alphabet (`Ġ` is a space), in rank order. Each result is a token, and every
/// pair's parts are bytes or results of earlier merges.
const DEMO_MERGES: &[&str] = &[
    "Ġ t", "h e", "i n", "e r", "a n", "o n", "r e", "Ġ a", "Ġ s", "Ġ w", "Ġ o", "Ġ c", "Ġ b",
    "Ġ f", "Ġ m", "Ġ p", "e n", "o u", "a t", "i s", "o r", "e s", "i t", "a r", "n d", "l l",
    "Ġt he", "in g", "Ġ i", "Ġ h", "e d", "Ġo f", "Ġa nd", "Ġt o", "Ġi n", "Ġi s", "Ġ d", "Ġ l",
    "Ġw he", "o w",
];

impl DemoVocab {
    /// Tokens before padding: 2 + 256 + merges + 4 added tokens.
    pub fn base_len() -> usize {
        2 + 256 + DEMO_MERGES.len() + 4
    }

    /// The vocabulary padded to `n_vocab` entries (at least [`DemoVocab::base_len`]; fewer gives the base only).
    pub fn new(n_vocab: u32) -> DemoVocab {
        let mut tokens = vec![BOS_TEXT.to_string(), EOS_TEXT.to_string()];
        let mut token_types = vec![TOKEN_CONTROL, TOKEN_CONTROL];
        tokens.extend(gpt2_byte_chars().iter().map(|c| c.to_string()));
        token_types.resize(tokens.len(), TOKEN_NORMAL);
        let mut merges = Vec::with_capacity(DEMO_MERGES.len());
        for merge in DEMO_MERGES {
            merges.push(merge.to_string());
            tokens.push(merge.replace(' ', ""));
            token_types.push(TOKEN_NORMAL);
        }
        let first_added = tokens.len() as u32;
        for (text, ty) in [
            (USER_TEXT, TOKEN_CONTROL),
            (ASSISTANT_TEXT, TOKEN_CONTROL),
            (THINK_TEXT, TOKEN_USER_DEFINED),
            (THINK_END_TEXT, TOKEN_USER_DEFINED),
        ] {
            tokens.push(text.into());
            token_types.push(ty);
        }
        let mut k = 0;
        while tokens.len() < n_vocab as usize {
            tokens.push(format!("<｜place▁holder▁no▁{k}｜>"));
            token_types.push(TOKEN_CONTROL);
            k += 1;
        }
        DemoVocab {
            tokens,
            token_types,
            merges,
            bos: 0,
            eos: 1,
            user: first_added,
            assistant: first_added + 1,
            think: first_added + 2,
            think_end: first_added + 3,
        }
    }

    fn write_metadata(self, w: &mut Writer) {
        w.set(key::TOKENIZER_MODEL, Value::String("gpt2".into()));
        w.set(key::TOKENIZER_PRE, Value::String("deepseek-v3".into()));
        w.set(
            key::TOKENIZER_TOKENS,
            Value::Array(Array::String(self.tokens)),
        );
        w.set(
            key::TOKENIZER_TOKEN_TYPE,
            Value::Array(Array::I32(self.token_types)),
        );
        w.set(
            key::TOKENIZER_MERGES,
            Value::Array(Array::String(self.merges)),
        );
        w.set(key::TOKENIZER_BOS, Value::U32(self.bos));
        w.set(key::TOKENIZER_EOS, Value::U32(self.eos));
        w.set(key::TOKENIZER_ADD_BOS, Value::Bool(false));
        w.set(key::TOKENIZER_ADD_EOS, Value::Bool(false));
    }
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the other 68 to U+0100.. in byte order.
pub fn gpt2_byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).expect("code points below 0x200 are valid");
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_alphabet_is_a_bijection_with_space_as_g_dot() {
        let t = gpt2_byte_chars();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
    }

    #[test]
    fn demo_merges_build_on_existing_tokens() {
        let v = DemoVocab::new(0);
        assert_eq!(v.tokens.len(), DemoVocab::base_len());
        for (i, merge) in DEMO_MERGES.iter().enumerate() {
            let (l, r) = merge.split_once(' ').unwrap();
            let known = |s: &str| v.tokens[..2 + 256 + i].iter().any(|t| t == s);
            assert!(known(l) && known(r), "merge {l} {r}");
        }
        let unique: std::collections::HashSet<&String> = v.tokens.iter().collect();
        assert_eq!(unique.len(), v.tokens.len());
        assert_eq!(DemoVocab::new(600).tokens.len(), 600);
    }

    #[test]
    fn rng_is_seeded_and_sane() {
        let mut a = Rng::for_tensor(7, "x");
        let mut b = Rng::for_tensor(7, "x");
        let xs: Vec<f32> = (0..20000).map(|_| a.normal()).collect();
        assert!(xs
            .iter()
            .zip((0..20000).map(|_| b.normal()))
            .all(|(x, y)| *x == y));
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / xs.len() as f32;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
        let ids = a.distinct(4, 16);
        let set: std::collections::HashSet<usize> = ids.iter().copied().collect();
        assert_eq!(set.len(), 4);
        assert!(ids.iter().all(|&e| e < 16));
    }

    #[test]
    fn presets_validate_and_bad_configs_are_refused() {
        for cfg in [
            TinyConfig::small(),
            TinyConfig::alt(),
            TinyConfig::demo(),
            TinyConfig::big_experts(),
            TinyConfig::flash(1),
            TinyConfig::flash(2),
            TinyConfig::flash(43),
        ] {
            cfg.validate().unwrap();
        }
        let no_csa = TinyConfig {
            compress_ratios: vec![0, 128, 0, 128, 0, 0],
            ..TinyConfig::small()
        };
        assert!(no_csa
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ratio-4"));
        let odd_groups = TinyConfig {
            o_groups: 3,
            ..TinyConfig::small()
        };
        assert!(odd_groups.validate().is_err());
        let q8_k = TinyConfig::small().with_types(WeightTypes {
            experts: GgmlType::Q8K,
            ..WeightTypes::F32
        });
        assert!(q8_k
            .validate()
            .unwrap_err()
            .to_string()
            .contains("types.experts"));
    }
}
