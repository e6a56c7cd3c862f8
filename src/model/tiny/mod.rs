//! Tiny DeepSeek V4 models: seeded random `deepseek4` GGUFs of any size with every component active
//! (raw, ratio-4 and ratio-128 layers, indexer, hash and score routing, shared expert, SwiGLU clamp,
//! YaRN, hyper-connections), optionally with ferrite's own small byte-level BPE vocabulary.
//! They back `ferrite ... -m demo` and every model test; llama.cpp loads them (DSV4.md section 7).

use std::fmt;
use std::io;
use std::path::Path;

use gguf::{Array, GgmlType, Value, Writer};

use super::names::{self, key};

mod config;
mod rng;
mod tensors;
#[cfg(test)]
mod tests;
mod values;
mod vocab;

pub use config::TinyConfig;
// The building blocks of the writer, public for writers of other layouts of the same model (the official Hugging
// Face checkpoint of the workspace's `testkit`): the tensor table, the seeded values, their encoding, the file.
pub use tensors::{tensor_specs, Init, TensorSpec};
pub use values::{encode_values, tensor_values, Values};
use values::{spec_bytes, write_tensor};
pub use vocab::{
    gpt2_byte_chars, DemoVocab, ASSISTANT_TEXT, BOS_TEXT, EOS_TEXT, THINK_END_TEXT, THINK_TEXT,
    USER_TEXT,
};

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
    /// Write the routed experts (`ffn_{gate,up,down}_exps`) as zeros, left as holes in a sparse file: a file with
    /// the real layout and size whose expert data take no disk space. For benchmarks of everything but the
    /// experts (start-up, planning, paging); the model's answers are meaningless.
    pub zero_experts: bool,
}

impl Default for Generation {
    /// Every core, chunks of 8M values (32 MB of f32), [`Streams::DEFAULT`].
    fn default() -> Generation {
        Generation {
            threads: 0,
            chunk_values: 1 << 23,
            streams: Streams::DEFAULT,
            zero_experts: false,
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
    write_specs_streaming(path, cfg, &specs, generation.zero_experts, |spec, out| {
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

/// Writes the metadata of `cfg` and the tensors `specs` to `path` (replacing it atomically), each tensor's bytes
/// made by `bytes` one at a time.
pub fn write_specs(
    path: &Path,
    cfg: &TinyConfig,
    specs: &[TensorSpec],
    mut bytes: impl FnMut(&TensorSpec) -> Result<Vec<u8>, TinyError>,
) -> Result<TinyModel, TinyError> {
    write_specs_streaming(path, cfg, specs, false, |spec, out| {
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

/// [`write_specs`] where `fill` writes each tensor's bytes to the file itself, in as many pieces as it likes;
/// with `sparse`, blocks of zeros are left as holes ([`gguf::Writer::write_file_sparse`]).
pub(crate) fn write_specs_streaming(
    path: &Path,
    cfg: &TinyConfig,
    specs: &[TensorSpec],
    sparse: bool,
    mut fill: impl FnMut(&TensorSpec, &mut dyn io::Write) -> Result<(), Fill>,
) -> Result<TinyModel, TinyError> {
    let w = plan_writer(cfg, specs)?;
    // Tensor data is generated inside the writer's callback, one tensor at a time; a failure is parked here
    // because the callback can only return io::Error.
    let mut failure: Option<TinyError> = None;
    let fill_one =
        |i: usize, _: &gguf::PlannedTensor, out: &mut dyn io::Write| match fill(&specs[i], out) {
            Ok(()) => Ok(()),
            Err(Fill::Io(e)) => Err(e),
            Err(Fill::Tiny(e)) => {
                failure = Some(e);
                Err(io::Error::other("tensor generation failed"))
            }
        };
    let result = match sparse {
        true => w.write_file_sparse(path, true, fill_one),
        false => w.write_file(path, true, fill_one),
    };
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
