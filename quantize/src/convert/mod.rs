//! The conversion pipeline: a Hugging Face DeepSeek V4 checkpoint or a `deepseek4` GGUF in, a GGUF of a recipe's
//! types out. [`plan`] decides every tensor's type and method without reading tensor data (a dry run prints it);
//! [`execute`] streams tensor by tensor, a few rows at a time on every thread, so memory stays near a few chunks
//! whatever the model's size, and writes through temporary files renamed into place only when complete.
//!
//! Blocks are made by a [`Codec`] (ferrite's binding of ggml's own `ggml_quantize_chunk` and `to_float`), so they
//! are bit-identical to llama.cpp's for the same input.

use std::path::{Path, PathBuf};

use gguf::deepseek4::{key, ARCH};
use gguf::{GgmlType, GgufError, Value, Writer};

use crate::hf::{self, HfConfig, HfData, HfError};
use crate::imatrix::ImatrixData;
use crate::recipe::Recipe;
use crate::safetensors::Checkpoint;
use crate::vocab::HfVocab;

mod execution;
mod planning;
#[cfg(test)]
mod tests;

pub use execution::{decode_rows, execute, Progress, Quiet};
pub use planning::plan;

/// Block coding with ggml's own routines (implemented by the ferrite binary over its ggml binding).
pub trait Codec: Sync {
    /// Quantizes rows of `n_per_row` f32 values to `ty` (F32, F16 and BF16 included), as `ggml_quantize_chunk`.
    fn quantize(
        &self,
        ty: GgmlType,
        src: &[f32],
        n_per_row: usize,
        imatrix: Option<&[f32]>,
    ) -> Result<Vec<u8>, String>;
    /// Whole rows of `ty` back to f32, as ggml's `to_float`.
    fn dequantize(&self, ty: GgmlType, data: &[u8], n_per_row: usize) -> Result<Vec<f32>, String>;
    /// True when ggml can quantize to `ty`.
    fn can_quantize(&self, ty: GgmlType) -> bool;
    /// True when ggml refuses `ty` without an importance matrix.
    fn requires_imatrix(&self, ty: GgmlType) -> bool;
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Hf(#[from] HfError),
    #[error(transparent)]
    Checkpoint(#[from] crate::safetensors::Error),
    #[error(transparent)]
    Vocab(#[from] crate::vocab::VocabError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{}: {problem}", path.display())]
    Input { path: PathBuf, problem: String },
    #[error("tensor {tensor}: {detail}")]
    Tensor { tensor: String, detail: String },
    #[error("interrupted; nothing was written (the temporary output was removed)")]
    Cancelled,
    #[error("no space left on the device while writing {}; nothing was written (the temporary output was removed)", path.display())]
    DiskFull { path: PathBuf },
}

/// What is being converted.
#[allow(clippy::large_enum_variant)] // one per run
pub enum Input {
    /// A Hugging Face checkpoint folder.
    Hf {
        dir: PathBuf,
        config: HfConfig,
        ckpt: Checkpoint,
        /// None when the folder has no tokenizer.json.
        vocab: Option<HfVocab>,
        /// The checkpoint has an MTP block (`mtp.0.*`).
        has_mtp: bool,
    },
    /// A `deepseek4` GGUF, single or split.
    Gguf { path: PathBuf, model: gguf::Model },
}

impl Input {
    /// Opens `path`: a folder is a Hugging Face checkpoint, a file a GGUF (any shard of a split one).
    pub fn open(path: &Path) -> Result<Input, ConvertError> {
        if path.is_dir() {
            let config = HfConfig::read(path)?;
            let ckpt = Checkpoint::open(path)?;
            let vocab = if path.join("tokenizer.json").is_file() {
                Some(HfVocab::read(path, Some(config.n_vocab))?)
            } else {
                None
            };
            let has_mtp = hf::has_mtp(&ckpt);
            return Ok(Input::Hf {
                dir: path.to_path_buf(),
                config,
                ckpt,
                vocab,
                has_mtp,
            });
        }
        if !path.exists() {
            return Err(ConvertError::Input {
                path: path.to_path_buf(),
                problem: "no such file or folder".into(),
            });
        }
        let model = gguf::Model::open(path)?;
        let arch = model.metadata().str(key::ARCHITECTURE).unwrap_or("(none)");
        if arch != ARCH {
            return Err(ConvertError::Input {
                path: path.to_path_buf(),
                problem: format!(
                    "general.architecture is {arch:?}, expected {ARCH:?}: ferrite quantizes DeepSeek V4 models only"
                ),
            });
        }
        Ok(Input::Gguf {
            path: path.to_path_buf(),
            model,
        })
    }

    /// One line saying what the input is.
    pub fn describe(&self) -> String {
        match self {
            Input::Hf {
                dir, ckpt, has_mtp, ..
            } => format!(
                "Hugging Face checkpoint {} ({} tensors in {} shard(s){})",
                dir.display(),
                ckpt.len(),
                ckpt.shards().len(),
                if *has_mtp { ", with an MTP block" } else { "" }
            ),
            Input::Gguf { path, model } => format!(
                "GGUF {} ({} tensors in {} file(s))",
                path.display(),
                model.tensors().len(),
                model.shards().len()
            ),
        }
    }

    fn release(&self, bytes: &[u8]) {
        match self {
            Input::Hf { ckpt, .. } => ckpt.release(bytes),
            Input::Gguf { model, .. } => model.release(bytes),
        }
    }
}

/// Per-family types that replace the recipe's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub experts: Option<GgmlType>,
    pub attention: Option<GgmlType>,
    pub shared: Option<GgmlType>,
    pub output: Option<GgmlType>,
    pub embeddings: Option<GgmlType>,
}

/// What to make.
pub struct Options<'a> {
    pub recipe: Recipe,
    pub overrides: Overrides,
    pub imatrix: Option<&'a ImatrixData>,
    /// Export the checkpoint's MTP block (when it has one).
    pub keep_mtp: bool,
    /// `general.name`; default: the input's.
    pub name: Option<String>,
}

/// How a tensor's bytes are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// The source bytes as they are (same type).
    Copy,
    /// FP4 experts regrouped into ggml's MXFP4 blocks: the same codes and scales, no rounding.
    Repack,
    /// Decoded to f32 and encoded with ggml.
    Quantize,
    /// Expert ids to I32.
    Ids,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Copy => "copy",
            Method::Repack => "repack",
            Method::Quantize => "quantize",
            Method::Ids => "ids",
        }
    }
}

/// Where one output tensor's data is.
enum Data<'a> {
    Hf(HfData<'a>),
    Ggml { ty: GgmlType, bytes: &'a [u8] },
}

/// One output tensor of the plan.
pub struct Item<'a> {
    pub name: String,
    /// GGUF shape (ggml order).
    pub dims: Vec<u64>,
    /// The source encoding, e.g. "FP8", "FP4", "BF16", "Q8_0".
    pub source_type: String,
    /// Bytes read from the input (scales included).
    pub source_bytes: u64,
    pub ty: GgmlType,
    pub method: Method,
    /// Why the type differs from the recipe's, when it does.
    pub note: Option<String>,
    data: Data<'a>,
    imatrix: Option<&'a [f32]>,
}

impl Item<'_> {
    /// Bytes of this tensor in the output (without alignment padding).
    pub fn bytes(&self) -> u64 {
        self.ty.tensor_bytes(&self.dims).unwrap_or(u64::MAX)
    }
}

/// Every output tensor and the metadata, decided before any tensor data is read.
pub struct Plan<'a> {
    pub metadata: Vec<(String, Value)>,
    pub items: Vec<Item<'a>>,
    /// Things the user should know (fallbacks taken, keys missing).
    pub notes: Vec<String>,
}

impl Plan<'_> {
    /// Bytes the conversion reads from the input.
    pub fn input_bytes(&self) -> u64 {
        self.items.iter().map(|i| i.source_bytes).sum()
    }

    /// The GGUF writer of this plan (one file; split it with `Writer::split_by_size`).
    pub fn writer(&self) -> Result<Writer, ConvertError> {
        let mut w = Writer::new();
        for (k, v) in &self.metadata {
            if k == gguf::ALIGNMENT_KEY {
                if let Value::U32(a) = v {
                    w.set_alignment(*a)?;
                }
                continue;
            }
            w.set(k.clone(), v.clone());
        }
        for it in &self.items {
            w.add_tensor(&it.name, &it.dims, it.ty)?;
        }
        Ok(w)
    }
}
