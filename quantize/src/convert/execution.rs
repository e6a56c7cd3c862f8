//! [`execute`]: the streaming writer, a few rows at a time on every thread, and the decoding of checkpoint rows.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use gguf::{GgufError, Layout, Writer};

use crate::dequant::fp4_to_mxfp4;
use crate::fp::{e2m1_pair, e4m3_to_f32, e8m0_to_f32};
use crate::hf::{Encoded, HfData, HfMatrix};

use super::{Codec, ConvertError, Data, Input, Item, Method, Plan};

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
pub(super) fn token_ids(bytes: &[u8], wide: bool) -> Result<Vec<u8>, String> {
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
