//! The conversion pipeline: a Hugging Face DeepSeek V4 checkpoint or a `deepseek4` GGUF in, a GGUF of a recipe's
//! types out. [`plan`] decides every tensor's type and method without reading tensor data (a dry run prints it);
//! [`execute`] streams tensor by tensor, a few rows at a time on every thread, so memory stays near a few chunks
//! whatever the model's size, and writes through temporary files renamed into place only when complete.
//!
//! Blocks are made by a [`Codec`] (ferrite's binding of ggml's own `ggml_quantize_chunk` and `to_float`), so they
//! are bit-identical to llama.cpp's for the same input.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use gguf::deepseek4::{key, ARCH};
use gguf::{GgmlType, GgufError, Layout, Value, Writer};

use crate::dequant::fp4_to_mxfp4;
use crate::fp::{e2m1_pair, e4m3_to_f32, e8m0_to_f32};
use crate::hf::{self, Encoded, HfConfig, HfData, HfError, HfMatrix, HfTensor};
use crate::imatrix::ImatrixData;
use crate::recipe::{block_fallback, Family, Recipe};
use crate::safetensors::Checkpoint;
use crate::vocab::HfVocab;

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

/// An output tensor before planning: name, GGUF shape, data.
type Source<'a> = (String, Vec<u64>, Data<'a>);

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

/// GGUF key of the quantization format version (llama.cpp writes 2).
const QUANTIZATION_VERSION: &str = "general.quantization_version";
const FILE_TYPE: &str = "general.file_type";

/// Decides every output tensor: type (recipe, overrides, llama.cpp's block fallbacks, the importance matrix), method,
/// sizes. Reads headers only.
pub fn plan<'a>(
    input: &'a Input,
    opts: &Options<'a>,
    codec: &dyn Codec,
) -> Result<Plan<'a>, ConvertError> {
    let mut notes = Vec::new();
    let (mut metadata, sources): (Vec<(String, Value)>, Vec<Source<'a>>) = match input {
        Input::Hf {
            dir,
            config,
            ckpt,
            vocab,
            has_mtp,
        } => {
            let with_mtp = *has_mtp && opts.keep_mtp;
            let tensors: Vec<HfTensor> = config.tensors(with_mtp);
            let data = hf::resolve(ckpt, config, &tensors, with_mtp)?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "DeepSeek V4".into());
            let mut md: Vec<(String, Value)> = config.metadata(with_mtp);
            md.insert(1, ("general.name".into(), Value::String(name)));
            match vocab {
                Some(v) => md.extend(v.metadata()),
                None => {
                    notes.push(format!(
                        "{} has no tokenizer.json: the GGUF gets no vocabulary (tokenizer.ggml.model = \"none\"); \
                         only token-id commands (ferrite logits) can use it",
                        dir.display()
                    ));
                    md.push((key::TOKENIZER_MODEL.into(), Value::String("none".into())));
                }
            }
            if with_mtp
                && ckpt
                    .names()
                    .any(|n| n.starts_with("mtp.") && n.contains(".hc_head_"))
            {
                notes.push(
                    "the MTP block's own hc_head_fn/base/scale have no slot in llama.cpp's deepseek4 layout (its MTP \
                     uses the main output_hc_*): left out"
                        .into(),
                );
            }
            if *has_mtp && !opts.keep_mtp {
                notes.push("the checkpoint's MTP block is left out (--no-mtp)".into());
            }
            let sources = tensors
                .into_iter()
                .zip(data)
                .map(|(t, d)| (t.gguf, t.dims, Data::Hf(d)))
                .collect();
            (md, sources)
        }
        Input::Gguf { model, .. } => {
            let md = model
                .metadata()
                .iter()
                .filter(|(k, _)| !k.starts_with("split."))
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            let sources = model
                .tensors()
                .iter()
                .map(|t| {
                    let data = Data::Ggml {
                        ty: t.info.ty,
                        bytes: model.tensor_data(t),
                    };
                    (t.info.name.clone(), t.info.dims.clone(), data)
                })
                .collect();
            (md, sources)
        }
    };
    set_meta(&mut metadata, FILE_TYPE, Value::U32(opts.recipe.file_type));
    set_meta(&mut metadata, QUANTIZATION_VERSION, Value::U32(2));
    if let Some(name) = &opts.name {
        set_meta(&mut metadata, "general.name", Value::String(name.clone()));
    }

    let mut items = Vec::with_capacity(sources.len());
    let mut imatrix_missing = Vec::new();
    for (name, dims, data) in sources {
        let item = plan_item(name, dims, data, opts, codec, &mut imatrix_missing)?;
        items.push(item);
    }
    if !imatrix_missing.is_empty() {
        notes.push(format!(
            "{} tensor(s) wanted an importance matrix for their type and had none (no --imatrix, or no entry in it): \
             they use Q2_K instead ({}{}); pass --imatrix FILE (llama.cpp's llama-imatrix makes one) for the \
             recipe's type",
            imatrix_missing.len(),
            imatrix_missing.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            if imatrix_missing.len() > 3 { ", ..." } else { "" }
        ));
    }
    Ok(Plan {
        metadata,
        items,
        notes,
    })
}

fn set_meta(md: &mut Vec<(String, Value)>, key: &str, value: Value) {
    match md.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => {
            // After general.architecture / general.name, like llama.cpp's writers.
            let at = md
                .iter()
                .position(|(k, _)| !k.starts_with("general."))
                .unwrap_or(md.len());
            md.insert(at, (key.to_string(), value));
        }
    }
}

fn plan_item<'a>(
    name: String,
    dims: Vec<u64>,
    data: Data<'a>,
    opts: &Options<'a>,
    codec: &dyn Codec,
    imatrix_missing: &mut Vec<String>,
) -> Result<Item<'a>, ConvertError> {
    let family = Family::of(&name, dims.len());
    let o = &opts.overrides;
    let wanted = match family {
        Family::ExpertsGateUp | Family::ExpertsDown => o.experts,
        Family::Shared => o.shared,
        Family::Attention => o.attention,
        Family::Output => o.output,
        Family::Embeddings => o.embeddings,
        Family::KeepF32 | Family::TokenIds => None,
    }
    .unwrap_or_else(|| opts.recipe.target(family));
    let err = |detail: String| ConvertError::Tensor {
        tensor: name.clone(),
        detail,
    };
    let (source_type, source_bytes) = match &data {
        Data::Hf(HfData::Matrices(ms)) => {
            let enc = ms[0].parts[0].1;
            (
                enc.name().to_string(),
                ms.iter()
                    .flat_map(|m| m.parts.iter().map(|p| p.1.n_bytes()))
                    .sum(),
            )
        }
        Data::Hf(HfData::TokenIds { bytes, wide }) => (
            (if *wide { "I64" } else { "I32" }).to_string(),
            bytes.len() as u64,
        ),
        Data::Ggml { ty, bytes } => (ty.name().to_string(), bytes.len() as u64),
    };

    if family == Family::TokenIds {
        return match &data {
            Data::Ggml { ty, .. } if *ty != GgmlType::I32 => {
                Err(err(format!("expert ids are {ty}, expected I32")))
            }
            _ => Ok(Item {
                name,
                dims,
                source_type,
                source_bytes,
                ty: GgmlType::I32,
                method: if matches!(data, Data::Ggml { .. }) {
                    Method::Copy
                } else {
                    Method::Ids
                },
                note: None,
                data,
                imatrix: None,
            }),
        };
    }

    let n_per_row = dims[0];
    let mut ty = wanted;
    let mut note = None;
    if !codec.can_quantize(ty) {
        return Err(err(format!("ggml cannot make {ty} tensors")));
    }
    if let Some(fallback) = block_fallback(ty, n_per_row) {
        note = Some(format!(
            "rows of {n_per_row} are not whole {ty} blocks of {}: {fallback} (llama.cpp's fallback)",
            ty.block_size()
        ));
        ty = fallback;
    }
    let mut imatrix = None;
    if ty.is_quantized() {
        if let Some(im) = opts.imatrix {
            // llama.cpp's check: n_per_row x n_mat values (a legacy file's are split by the tensor's shape).
            let entry = im
                .weights_for(&name, &dims)
                .map_err(|e| err(e.to_string()))?;
            imatrix = entry.map(|e| e.values);
        }
        if imatrix.is_none() && codec.requires_imatrix(ty) {
            imatrix_missing.push(name.clone());
            let q2k = GgmlType::Q2K;
            ty = block_fallback(q2k, n_per_row).unwrap_or(q2k);
            note = Some(format!("{wanted} needs an importance matrix: {ty} instead"));
        }
    }

    let method = match &data {
        Data::Ggml { ty: src, .. } if *src == ty => Method::Copy,
        Data::Ggml { ty: src, .. } => {
            if dequantizable(*src) {
                Method::Quantize
            } else {
                return Err(err(format!(
                    "its type {src} cannot be converted (no ggml dequantizer)"
                )));
            }
        }
        Data::Hf(HfData::Matrices(ms)) => {
            let single = ms.iter().all(|m| m.parts.len() == 1);
            let enc = ms[0].parts[0].1;
            match (enc, ty) {
                (Encoded::Fp4 { .. }, GgmlType::Mxfp4) if single => Method::Repack,
                (Encoded::F32(_), GgmlType::F32)
                | (Encoded::F16(_), GgmlType::F16)
                | (Encoded::Bf16(_), GgmlType::Bf16)
                    if single =>
                {
                    Method::Copy
                }
                _ => Method::Quantize,
            }
        }
        Data::Hf(HfData::TokenIds { .. }) => {
            return Err(err("expert ids in a weight's place".into()))
        }
    };
    Ok(Item {
        name,
        dims,
        source_type,
        source_bytes,
        ty,
        method,
        note,
        data,
        imatrix,
    })
}

/// Types ggml can turn back into f32 (everything but the integer types).
fn dequantizable(ty: GgmlType) -> bool {
    !matches!(
        ty,
        GgmlType::I8 | GgmlType::I16 | GgmlType::I32 | GgmlType::I64 | GgmlType::F64
    )
}

/// Progress reports of [`execute`] (called from the writing thread).
pub trait Progress {
    /// Before the first tensor.
    fn begin(&self, _n_tensors: usize, _input_bytes: u64) {}
    /// Tensor `index` starts.
    fn tensor(&self, _index: usize, _item: &Item) {}
    /// `input_bytes` more of the input are done.
    fn advance(&self, _input_bytes: u64) {}
    /// All data written (the files are being synced and renamed).
    fn end(&self) {}
}

/// No progress output.
pub struct Quiet;
impl Progress for Quiet {}

/// f32 values decoded per work unit: big enough to amortise thread hand-offs, small enough that memory stays at a
/// few MiB per thread.
const CHUNK_VALUES: usize = 1 << 20;

/// Writes the plan to `out` (split when `shards` has several writers; see `Writer::split_by_size`). `threads`
/// workers encode chunks in parallel; `cancel` (set by a Ctrl-C handler) stops between chunks.
#[allow(clippy::too_many_arguments)]
pub fn execute(
    plan: &Plan,
    input: &Input,
    codec: &dyn Codec,
    shards: &[Writer],
    out: &Path,
    overwrite: bool,
    threads: usize,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Vec<(PathBuf, Layout)>, ConvertError> {
    let threads = threads.max(1);
    progress.begin(plan.items.len(), plan.input_bytes());
    let mut failure: Option<ConvertError> = None;
    let result = Writer::write_files(shards, out, overwrite, |i, _, sink| {
        let item = &plan.items[i];
        progress.tensor(i, item);
        let r = write_item(item, codec, threads, progress, cancel, sink);
        // The tensor's input pages are not needed again: keep the resident set bounded.
        release(input, item);
        r.map_err(|e| match e {
            ItemError::Io(e) => e,
            ItemError::Convert(e) => {
                failure = Some(e);
                std::io::Error::other("conversion failed")
            }
        })
    });
    if let Some(e) = failure {
        return Err(e);
    }
    match result {
        Ok(files) => {
            progress.end();
            Ok(files)
        }
        Err(GgufError::Io { path, err }) if is_disk_full(&err) => {
            Err(ConvertError::DiskFull { path })
        }
        Err(e) => Err(e.into()),
    }
}

fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

fn release(input: &Input, item: &Item) {
    match &item.data {
        Data::Ggml { bytes, .. } => input.release(bytes),
        Data::Hf(HfData::TokenIds { bytes, .. }) => input.release(bytes),
        Data::Hf(HfData::Matrices(ms)) => {
            for (_, enc) in ms.iter().flat_map(|m| &m.parts) {
                match enc {
                    Encoded::F32(b) | Encoded::F16(b) | Encoded::Bf16(b) => input.release(b),
                    Encoded::Fp8 { weight, scale, .. } | Encoded::Fp4 { weight, scale } => {
                        input.release(weight);
                        input.release(scale);
                    }
                }
            }
        }
    }
}

enum ItemError {
    Io(std::io::Error),
    Convert(ConvertError),
}

impl From<std::io::Error> for ItemError {
    fn from(e: std::io::Error) -> Self {
        ItemError::Io(e)
    }
}

/// A run of rows of one matrix (one expert of a stacked tensor).
#[derive(Clone, Copy, Debug)]
struct Chunk {
    matrix: usize,
    start: usize,
    end: usize,
}

impl Chunk {
    fn rows(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

fn write_item(
    item: &Item,
    codec: &dyn Codec,
    threads: usize,
    progress: &dyn Progress,
    cancel: &AtomicBool,
    sink: &mut dyn std::io::Write,
) -> Result<(), ItemError> {
    let fail = |detail: String| {
        ItemError::Convert(ConvertError::Tensor {
            tensor: item.name.clone(),
            detail,
        })
    };
    if cancel.load(Ordering::Relaxed) {
        return Err(ItemError::Convert(ConvertError::Cancelled));
    }
    if item.method == Method::Ids {
        let Data::Hf(HfData::TokenIds { bytes, wide }) = &item.data else {
            return Err(fail("expert ids expected".into()));
        };
        sink.write_all(&token_ids(bytes, *wide).map_err(fail)?)?;
        progress.advance(item.source_bytes);
        return Ok(());
    }
    let n_per_row = item.dims[0] as usize;
    let rows_per_matrix = item.dims.get(1).copied().unwrap_or(1) as usize;
    let n_mat = item.dims.iter().skip(2).product::<u64>() as usize;
    let step = (CHUNK_VALUES / n_per_row.max(1)).max(1);
    let chunks: Vec<Chunk> = (0..n_mat)
        .flat_map(|m| {
            (0..rows_per_matrix).step_by(step).map(move |r| Chunk {
                matrix: m,
                start: r,
                end: (r + step).min(rows_per_matrix),
            })
        })
        .collect();
    let total_rows = (rows_per_matrix * n_mat).max(1) as u64;
    for wave in chunks.chunks(threads) {
        if cancel.load(Ordering::Relaxed) {
            return Err(ItemError::Convert(ConvertError::Cancelled));
        }
        let outputs: Vec<Result<Vec<u8>, String>> = if wave.len() == 1 {
            vec![encode_chunk(item, codec, wave[0], rows_per_matrix)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = wave
                    .iter()
                    .map(|&c| s.spawn(move || encode_chunk(item, codec, c, rows_per_matrix)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("an encoding thread panicked".into()))
                    })
                    .collect()
            })
        };
        for (c, bytes) in wave.iter().zip(outputs) {
            sink.write_all(&bytes.map_err(fail)?)?;
            let rows = c.rows().len() as u64;
            progress.advance(item.source_bytes * rows / total_rows);
        }
    }
    Ok(())
}

/// `tid2eid` to little-endian I32.
fn token_ids(bytes: &[u8], wide: bool) -> Result<Vec<u8>, String> {
    if !wide {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::with_capacity(bytes.len() / 2);
    for (i, b) in bytes.chunks_exact(8).enumerate() {
        let v = i64::from_le_bytes(b.try_into().expect("8 bytes"));
        let v = i32::try_from(v)
            .ok()
            .filter(|v| *v >= 0)
            .ok_or_else(|| format!("expert id {v} at index {i} is not a valid expert"))?;
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

/// The output bytes of one chunk.
fn encode_chunk(
    item: &Item,
    codec: &dyn Codec,
    c: Chunk,
    rows_per_matrix: usize,
) -> Result<Vec<u8>, String> {
    let n_per_row = item.dims[0] as usize;
    let imatrix = item
        .imatrix
        .map(|w| &w[c.matrix * n_per_row..(c.matrix + 1) * n_per_row]);
    match &item.data {
        Data::Ggml { ty, bytes } => {
            let row = ty.row_bytes(n_per_row as u64).ok_or("row size overflows")? as usize;
            let first = c.matrix * rows_per_matrix + c.start;
            let src = bytes
                .get(first * row..(first + c.rows().len()) * row)
                .ok_or("tensor data shorter than its shape")?;
            if item.method == Method::Copy {
                return Ok(src.to_vec());
            }
            let values = codec.dequantize(*ty, src, n_per_row)?;
            codec.quantize(item.ty, &values, n_per_row, imatrix)
        }
        Data::Hf(HfData::Matrices(ms)) => {
            let m = &ms[c.matrix];
            match item.method {
                Method::Repack => {
                    let (_, Encoded::Fp4 { weight, scale }) = m.parts[0] else {
                        return Err("FP4 data expected".into());
                    };
                    let (wb, sb) = (m.cols / 2, m.cols / 32);
                    fp4_to_mxfp4(
                        &weight[c.start * wb..c.end * wb],
                        &scale[c.start * sb..c.end * sb],
                        c.rows().len(),
                        m.cols,
                    )
                    .map_err(|e| e.to_string())
                }
                Method::Copy => {
                    let (_, Encoded::F32(b) | Encoded::F16(b) | Encoded::Bf16(b)) = m.parts[0]
                    else {
                        return Err("plain data expected".into());
                    };
                    let width = b.len() / (m.rows * m.cols).max(1) * m.cols;
                    Ok(b[c.start * width..c.end * width].to_vec())
                }
                _ => {
                    let values = decode_rows(m, c.rows());
                    codec.quantize(item.ty, &values, n_per_row, imatrix)
                }
            }
        }
        Data::Hf(HfData::TokenIds { .. }) => Err("expert ids are not chunked".into()),
    }
}

/// FP8 E4M3 byte -> f32, every code.
fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| e4m3_to_f32(b as u8)))
}

/// Rows `rows` of a checkpoint matrix as f32 (exact: every checkpoint format is a subset of f32).
pub fn decode_rows(m: &HfMatrix, rows: std::ops::Range<usize>) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * m.cols);
    let e4m3 = e4m3_table();
    for r in rows {
        for &(cols, enc) in &m.parts {
            match enc {
                Encoded::F32(b) => out.extend(
                    b[r * cols * 4..(r + 1) * cols * 4]
                        .chunks_exact(4)
                        .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])),
                ),
                Encoded::F16(b) => out.extend(
                    b[r * cols * 2..(r + 1) * cols * 2]
                        .chunks_exact(2)
                        .map(|x| half::f16::from_le_bytes([x[0], x[1]]).to_f32()),
                ),
                Encoded::Bf16(b) => out.extend(
                    b[r * cols * 2..(r + 1) * cols * 2]
                        .chunks_exact(2)
                        .map(|x| f32::from_bits(u32::from(u16::from_le_bytes([x[0], x[1]])) << 16)),
                ),
                Encoded::Fp8 {
                    weight,
                    scale,
                    block: [b0, b1],
                } => {
                    let scale_row = &scale[(r / b0) * cols.div_ceil(b1)..];
                    let w = &weight[r * cols..(r + 1) * cols];
                    for (j, tile) in w.chunks(b1).enumerate() {
                        let s = e8m0_to_f32(scale_row[j]);
                        out.extend(tile.iter().map(|&b| e4m3[b as usize] * s));
                    }
                }
                Encoded::Fp4 { weight, scale } => {
                    let w = &weight[r * cols / 2..(r + 1) * cols / 2];
                    let sc = &scale[r * cols / 32..(r + 1) * cols / 32];
                    for (block, &e) in w.chunks_exact(16).zip(sc) {
                        let s = e8m0_to_f32(e);
                        for &b in block {
                            let [lo, hi] = e2m1_pair(b);
                            out.push(lo * s);
                            out.push(hi * s);
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_narrow_and_check_range() {
        let ids: Vec<u8> = [3i64, 0, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let out = token_ids(&ids, true).unwrap();
        assert_eq!(
            out,
            [3i32, 0, 7]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        );
        let bad: Vec<u8> = [-1i64].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(token_ids(&bad, true).unwrap_err().contains("-1"));
        let big: Vec<u8> = [1i64 << 40].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(token_ids(&big, true).is_err());
    }

    #[test]
    fn decode_rows_of_every_encoding() {
        // FP8 2x3 with 2x2 blocks: scales [1, 2] cover rows 0-1 (block row 0), columns 0-1 and 2.
        let fp8 = [0x38u8, 0x40, 0xb8, 0x38, 0x00, 0x40]; // 1, 2, -1, 1, 0, 2
        let scales = [127u8, 128];
        let m = HfMatrix {
            rows: 2,
            cols: 3,
            parts: vec![(
                3,
                Encoded::Fp8 {
                    weight: &fp8,
                    scale: &scales,
                    block: [2, 2],
                },
            )],
        };
        assert_eq!(decode_rows(&m, 0..2), vec![1.0, 2.0, -2.0, 1.0, 0.0, 4.0]);
        assert_eq!(decode_rows(&m, 1..2), vec![1.0, 0.0, 4.0]);
        // BF16 1.5 and F32 -3 side by side.
        let bf = 1.5f32.to_bits() >> 16;
        let bf = (bf as u16).to_le_bytes();
        let f = (-3.0f32).to_le_bytes();
        let m = HfMatrix {
            rows: 1,
            cols: 2,
            parts: vec![(1, Encoded::Bf16(&bf)), (1, Encoded::F32(&f))],
        };
        assert_eq!(decode_rows(&m, 0..1), vec![1.5, -3.0]);
        // FP4: one 32-input row, scale 2^1; byte 0x21 = inputs 0.5 (low) and 1.0 (high).
        let mut w = [0u8; 16];
        w[0] = 0x21;
        let s = [128u8];
        let m = HfMatrix {
            rows: 1,
            cols: 32,
            parts: vec![(
                32,
                Encoded::Fp4 {
                    weight: &w,
                    scale: &s,
                },
            )],
        };
        let v = decode_rows(&m, 0..1);
        assert_eq!(&v[..3], &[1.0, 2.0, 0.0]);
    }
}
