//! llama.cpp importance matrices (`llama-imatrix` output), read into the per-column weights that
//! `llama-quantize --imatrix` hands to the quantizers.
//!
//! Two formats, told apart by the GGUF magic:
//!
//! - GGUF (the default since 2025): for each weight `NAME`, a tensor `NAME.in_sum2` (F32, `{n_per_row, n_mat}`,
//!   the sums of squared activations, one row per matrix: per expert for 3-D expert tensors) and `NAME.counts`
//!   (F32, `{1, n_mat}`, how many activation rows each matrix saw); an optional `NAME.in_sum` (plain sums) is not
//!   needed for quantizing and is ignored, as are other tensors. Metadata `imatrix.datasets` (array of strings),
//!   `imatrix.chunk_count` and `imatrix.chunk_size` (uint32). The weight of matrix `m`, column `i` is
//!   `in_sum2[m][i] / counts[m]`, and 1 for every column of a matrix whose count is 0 (a matrix that saw no input
//!   during calibration, e.g. an expert never routed to), as `llama-quantize` does.
//! - Legacy `.dat`: i32 entry count; per entry an i32 name length, the name, i32 `ncall`, i32 `nval` and `nval`
//!   f32 values (stored as mean * ncall); then, optionally, the i32 chunk count and an i32 length plus the dataset
//!   name. The weight is `value / ncall` (the value itself when `ncall` is 0), as `llama-quantize` does. The file
//!   does not record how the values split into matrices; [`ImatrixData::weights_for`] splits them by the shape of
//!   the tensor being quantized.
//!
//! Every number read is checked against the file before use: a truncated or corrupt file gives an
//! [`ImatrixError`] naming the file and what is wrong, never a panic or an allocation the file cannot back.
//! Weights must be finite and non-negative (they are means of squares); llama.cpp refuses non-finite ones too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gguf::{Array, GgmlType, GgufFile, Value};

/// `imatrix.datasets`: the calibration files, array of strings.
pub const KEY_DATASETS: &str = "imatrix.datasets";
/// `imatrix.chunk_count`: chunks of calibration text processed (uint32).
pub const KEY_CHUNK_COUNT: &str = "imatrix.chunk_count";
/// `imatrix.chunk_size`: tokens per chunk (uint32).
pub const KEY_CHUNK_SIZE: &str = "imatrix.chunk_size";
/// Tensor name suffixes of the GGUF format.
pub const SUFFIX_IN_SUM2: &str = ".in_sum2";
pub const SUFFIX_COUNTS: &str = ".counts";

/// Which of llama.cpp's two imatrix file formats a file was in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImatrixFormat {
    Gguf,
    /// The binary `.dat` format of `llama-imatrix --output-format dat` (and of every version before 2025).
    Legacy,
}

#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// The file starts like a GGUF file but is not a valid one.
    #[error("{}: not a valid GGUF imatrix: {err}", path.display())]
    Gguf {
        path: PathBuf,
        err: Box<gguf::GgufError>,
    },

    #[error("{}: truncated at byte {offset}: {what} needs {needed} bytes, only {available} remain", path.display())]
    Truncated {
        path: PathBuf,
        offset: u64,
        what: String,
        needed: u64,
        available: u64,
    },

    #[error("{}: {unexpected} unexpected bytes at the end, from byte {offset} (corrupt file, or not an imatrix)", path.display())]
    TrailingBytes {
        path: PathBuf,
        offset: u64,
        unexpected: u64,
    },

    #[error("{}: the file holds no importance matrix entries", path.display())]
    NoEntries { path: PathBuf },

    /// A count or length read from the file that cannot be right (negative, zero where data must follow).
    #[error("{}: {what} at byte {offset} is {got}: {why}", path.display())]
    BadCount {
        path: PathBuf,
        what: String,
        offset: u64,
        got: i64,
        why: &'static str,
    },

    #[error("{}: the name of entry {entry} (at byte {offset}) is not valid UTF-8", path.display())]
    BadName {
        path: PathBuf,
        entry: u64,
        offset: u64,
    },

    #[error("{}: entry {name:?} appears twice", path.display())]
    DuplicateEntry { path: PathBuf, name: String },

    /// A weight (or the sum it comes from) that is NaN, infinite or negative.
    #[error("{}: entry {name:?}: value {index} (matrix {matrix}) is {value}: {why}", path.display())]
    BadValue {
        path: PathBuf,
        name: String,
        matrix: usize,
        index: usize,
        value: f32,
        why: &'static str,
    },

    /// A count of the GGUF format (`NAME.counts`) that is NaN, infinite or negative.
    #[error("{}: entry {name:?}: the count of matrix {matrix} is {value}: counts must be finite and non-negative", path.display())]
    BadCounts {
        path: PathBuf,
        name: String,
        matrix: usize,
        value: f32,
    },

    /// The tensors of one GGUF entry do not fit together (a missing partner, wrong type or shape).
    #[error("{}: entry {name:?}: {why}", path.display())]
    Mismatched {
        path: PathBuf,
        name: String,
        why: String,
    },

    #[error("{}: metadata {key:?}: {why}", path.display())]
    BadMetadata {
        path: PathBuf,
        key: &'static str,
        why: String,
    },

    /// The entry for a tensor has a size that does not fit the tensor being quantized (llama.cpp aborts the
    /// quantization on this too: the imatrix was made for another model).
    #[error("{}: entry {name:?} has {got} weights{}, the tensor of shape {dims:?} needs {expected} (values per row x experts): the importance matrix was computed for another model",
        path.display(), rows_note(*stored_per_row))]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        dims: Vec<u64>,
        expected: u64,
        got: usize,
        /// Values per row in the file (GGUF format); 0 when the file does not say (legacy format).
        stored_per_row: usize,
    },
}

/// One entry: the weights of every matrix of a tensor.
#[derive(Clone, Debug, PartialEq)]
struct Entry {
    n_per_row: usize,
    n_mat: usize,
    values: Vec<f32>,
}

/// The weights of one tensor: `n_mat` matrices (experts of a 3-D tensor; 1 otherwise) of `n_per_row` values,
/// matrix `m` at `values[m * n_per_row ..][.. n_per_row]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImatrixEntry<'a> {
    pub n_per_row: usize,
    pub n_mat: usize,
    pub values: &'a [f32],
}

impl<'a> ImatrixEntry<'a> {
    /// The weights of matrix `m` (expert `m`), `None` past the last.
    pub fn matrix(&self, m: usize) -> Option<&'a [f32]> {
        let start = m.checked_mul(self.n_per_row)?;
        self.values
            .get(start..start.checked_add(self.n_per_row)?)
            .filter(|_| m < self.n_mat)
    }
}

/// An importance matrix: per-column quantization weights for each tensor it has data for.
#[derive(Clone, Debug)]
pub struct ImatrixData {
    path: PathBuf,
    format: ImatrixFormat,
    entries: BTreeMap<String, Entry>,
    datasets: Vec<String>,
    chunks: Option<u64>,
    chunk_size: Option<u64>,
}

impl ImatrixData {
    /// Reads `path` in either format (GGUF when it starts with the GGUF magic, else the legacy format).
    pub fn read(path: &Path) -> Result<ImatrixData, ImatrixError> {
        let io = |err| ImatrixError::Io {
            path: path.to_path_buf(),
            err,
        };
        let mut magic = [0u8; 4];
        let n = {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(io)?;
            let mut n = 0;
            while n < 4 {
                match f.read(&mut magic[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io(e)),
                }
            }
            n
        };
        if n == 4 && magic == gguf::MAGIC {
            read_gguf(path)
        } else {
            let bytes = std::fs::read(path).map_err(io)?;
            read_legacy(path, &bytes)
        }
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> ImatrixFormat {
        self.format
    }

    /// The weights of `tensor` (a GGUF tensor name, e.g. `blk.0.ffn_up_exps.weight`) as the file holds them;
    /// `None` when the file has no entry for it. A legacy file does not record the matrix count: its entries
    /// read as one matrix of all values (use [`ImatrixData::weights_for`] to split them by a tensor's shape).
    pub fn get(&self, tensor: &str) -> Option<ImatrixEntry<'_>> {
        self.entries.get(tensor).map(|e| ImatrixEntry {
            n_per_row: e.n_per_row,
            n_mat: e.n_mat,
            values: &e.values,
        })
    }

    /// The weights for quantizing `tensor` of shape `dims` (ggml order: `dims[0]` values per row, `dims[2]`
    /// experts for a 3-D tensor), checked as llama.cpp checks them: the entry must hold `dims[0] * dims[2]`
    /// values (and, in the GGUF format, rows of `dims[0]`). `Ok(None)` when the file has no entry for it.
    pub fn weights_for(
        &self,
        tensor: &str,
        dims: &[u64],
    ) -> Result<Option<ImatrixEntry<'_>>, ImatrixError> {
        let Some(e) = self.entries.get(tensor) else {
            return Ok(None);
        };
        let n_per_row = dims.first().copied().unwrap_or(1);
        let n_mat = dims.get(2).copied().unwrap_or(1);
        let expected = n_per_row.checked_mul(n_mat);
        let fits = expected == Some(e.values.len() as u64)
            && (self.format == ImatrixFormat::Legacy || e.n_per_row as u64 == n_per_row);
        if !fits {
            return Err(ImatrixError::ShapeMismatch {
                path: self.path.clone(),
                name: tensor.to_string(),
                dims: dims.to_vec(),
                expected: expected.unwrap_or(u64::MAX),
                got: e.values.len(),
                stored_per_row: match self.format {
                    ImatrixFormat::Gguf => e.n_per_row,
                    ImatrixFormat::Legacy => 0,
                },
            });
        }
        Ok(Some(ImatrixEntry {
            n_per_row: n_per_row as usize,
            n_mat: n_mat as usize,
            values: &e.values,
        }))
    }

    /// Number of entries (tensors with data).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tensor names with data, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The calibration datasets the file names (the legacy format names at most one).
    pub fn datasets(&self) -> &[String] {
        &self.datasets
    }

    /// Chunks of calibration text the matrix was computed on, when the file says.
    pub fn chunks(&self) -> Option<u64> {
        self.chunks
    }

    /// Tokens per chunk, when the file says (GGUF format only).
    pub fn chunk_size(&self) -> Option<u64> {
        self.chunk_size
    }
}

fn rows_note(per_row: usize) -> String {
    if per_row == 0 {
        String::new()
    } else {
        format!(" in rows of {per_row}")
    }
}

/// Checks a computed weight: finite and non-negative.
fn check_weight(
    path: &Path,
    name: &str,
    n_per_row: usize,
    index: usize,
    value: f32,
) -> Result<(), ImatrixError> {
    let why = if value.is_nan() {
        "NaN"
    } else if value.is_infinite() {
        "infinite"
    } else if value < 0.0 {
        "negative, but it is a mean of squares"
    } else {
        return Ok(());
    };
    Err(ImatrixError::BadValue {
        path: path.to_path_buf(),
        name: name.to_string(),
        matrix: index / n_per_row.max(1),
        index,
        value,
        why,
    })
}

fn read_gguf(path: &Path) -> Result<ImatrixData, ImatrixError> {
    let file = GgufFile::open(path).map_err(|e| match e {
        gguf::GgufError::Io { err, .. } => ImatrixError::Io {
            path: path.to_path_buf(),
            err,
        },
        gguf::GgufError::InFile { source, .. } => ImatrixError::Gguf {
            path: path.to_path_buf(),
            err: source,
        },
        other => ImatrixError::Gguf {
            path: path.to_path_buf(),
            err: Box::new(other),
        },
    })?;
    let md = file.metadata();
    let bad_md = |key: &'static str, why: String| ImatrixError::BadMetadata {
        path: path.to_path_buf(),
        key,
        why,
    };
    let datasets = match md.get(KEY_DATASETS) {
        None => Vec::new(),
        Some(Value::Array(Array::String(v))) => v.clone(),
        Some(Value::Array(a)) => {
            return Err(bad_md(
                KEY_DATASETS,
                format!(
                    "an array of {}, expected an array of strings",
                    a.elem_type()
                ),
            ))
        }
        Some(other) => {
            return Err(bad_md(
                KEY_DATASETS,
                format!("a {}, expected an array of strings", other.value_type()),
            ))
        }
    };
    let uint = |key: &'static str| -> Result<Option<u64>, ImatrixError> {
        match md.get(key) {
            None => Ok(None),
            Some(_) => md
                .uint(key)
                .map(Some)
                .map_err(|e| bad_md(key, e.to_string())),
        }
    };
    let chunks = uint(KEY_CHUNK_COUNT)?;
    let chunk_size = uint(KEY_CHUNK_SIZE)?;
    if file.header().tensors.is_empty() {
        return Err(ImatrixError::NoEntries {
            path: path.to_path_buf(),
        });
    }

    // Pair NAME.in_sum2 with NAME.counts.
    let mut pairs: BTreeMap<&str, (Option<&gguf::TensorInfo>, Option<&gguf::TensorInfo>)> =
        BTreeMap::new();
    for t in &file.header().tensors {
        if let Some(name) = t.name.strip_suffix(SUFFIX_IN_SUM2) {
            pairs.entry(name).or_default().0 = Some(t);
        } else if let Some(name) = t.name.strip_suffix(SUFFIX_COUNTS) {
            pairs.entry(name).or_default().1 = Some(t);
        }
    }
    let mut entries = BTreeMap::new();
    for (name, pair) in pairs {
        let mismatched = |why: String| ImatrixError::Mismatched {
            path: path.to_path_buf(),
            name: name.to_string(),
            why,
        };
        let (sums, counts) = match pair {
            (Some(s), Some(c)) => (s, c),
            (Some(_), None) => {
                return Err(mismatched(format!(
                    "{name}{SUFFIX_IN_SUM2} has no {name}{SUFFIX_COUNTS}"
                )))
            }
            (None, _) => {
                return Err(mismatched(format!(
                    "{name}{SUFFIX_COUNTS} has no {name}{SUFFIX_IN_SUM2}"
                )))
            }
        };
        for t in [sums, counts] {
            if t.ty != GgmlType::F32 {
                return Err(mismatched(format!("{} is {}, expected F32", t.name, t.ty)));
            }
        }
        // ggml writes {n_per_row, n_mat}; GGUF drops trailing dimensions of 1, so one matrix is {n_per_row}.
        let n_per_row = sums.dims.first().copied().unwrap_or(1);
        let n_mat = sums.dims.iter().skip(1).product::<u64>();
        if sums.dims.len() > 2 && sums.dims[2..].iter().any(|&d| d != 1) {
            return Err(mismatched(format!(
                "{} has shape {:?}, expected {{n_per_row, n_mat}}",
                sums.name, sums.dims
            )));
        }
        if n_per_row == 0 || n_mat == 0 {
            return Err(mismatched(format!(
                "{} has shape {:?}, with no values",
                sums.name, sums.dims
            )));
        }
        if counts.n_elements() != n_mat {
            return Err(mismatched(format!(
                "{} has {} values for the {n_mat} matrices of {} (shape {:?})",
                counts.name,
                counts.n_elements(),
                sums.name,
                sums.dims
            )));
        }
        // Element counts were checked against the file size by the GGUF reader, so they fit in memory's address space.
        let (n_per_row, n_mat) = (n_per_row as usize, n_mat as usize);
        let sums_data = f32s(file.tensor_data(sums));
        let counts_data = f32s(file.tensor_data(counts));
        let mut values = Vec::with_capacity(sums_data.len());
        for (m, (&count, row)) in counts_data
            .iter()
            .zip(sums_data.chunks_exact(n_per_row))
            .enumerate()
        {
            if !count.is_finite() || count < 0.0 {
                return Err(ImatrixError::BadCounts {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    matrix: m,
                    value: count,
                });
            }
            for (i, &s) in row.iter().enumerate() {
                // The sum itself must be sane even where a zero count makes it unused.
                check_weight(path, name, n_per_row, m * n_per_row + i, s)?;
                let w = if count > 0.0 { s / count } else { 1.0 };
                check_weight(path, name, n_per_row, m * n_per_row + i, w)?;
                values.push(w);
            }
        }
        entries.insert(
            name.to_string(),
            Entry {
                n_per_row,
                n_mat,
                values,
            },
        );
    }
    if entries.is_empty() {
        return Err(ImatrixError::NoEntries {
            path: path.to_path_buf(),
        });
    }
    Ok(ImatrixData {
        path: path.to_path_buf(),
        format: ImatrixFormat::Gguf,
        entries,
        datasets,
        chunks,
        chunk_size,
    })
}

/// Little-endian f32s (tensor data is not necessarily 4-byte aligned in memory).
fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A bounds-checked little-endian reader over the legacy file.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: impl Into<String>) -> Result<&'a [u8], ImatrixError> {
        if n > self.remaining() {
            return Err(ImatrixError::Truncated {
                path: self.path.to_path_buf(),
                offset: self.pos as u64,
                what: what.into(),
                needed: n as u64,
                available: self.remaining() as u64,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn i32(&mut self, what: impl Into<String>) -> Result<i32, ImatrixError> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An i32 that must be at least `min` (a length or count), as a usize.
    fn count(
        &mut self,
        what: impl Into<String>,
        min: i32,
        why: &'static str,
    ) -> Result<usize, ImatrixError> {
        let what = what.into();
        let offset = self.pos as u64;
        let v = self.i32(what.clone())?;
        if v < min {
            return Err(ImatrixError::BadCount {
                path: self.path.to_path_buf(),
                what,
                offset,
                got: v.into(),
                why,
            });
        }
        Ok(v as usize)
    }
}

fn read_legacy(path: &Path, bytes: &[u8]) -> Result<ImatrixData, ImatrixError> {
    let mut cur = Cursor {
        path,
        buf: bytes,
        pos: 0,
    };
    if bytes.is_empty() {
        return Err(ImatrixError::NoEntries {
            path: path.to_path_buf(),
        });
    }
    let n_entries = cur.count(
        "entry count",
        1,
        "a legacy imatrix holds at least one entry",
    )?;
    // Each entry takes at least 16 bytes (name length, a one-byte name, ncall, nval, one value).
    if n_entries > cur.remaining() / 16 {
        return Err(ImatrixError::Truncated {
            path: path.to_path_buf(),
            offset: 0,
            what: format!("{n_entries} entries"),
            needed: n_entries as u64 * 16,
            available: cur.remaining() as u64,
        });
    }
    let mut entries = BTreeMap::new();
    for entry in 0..n_entries {
        let label = |what: &str| format!("{what} of entry {}", entry + 1);
        let len = cur.count(label("name length"), 1, "a name is at least one byte")?;
        let name_at = cur.pos as u64;
        let raw = cur.take(len, label("name"))?;
        // llama.cpp reads the name as a C string: it ends at the first NUL.
        let raw = raw.split(|&b| b == 0).next().unwrap_or(raw);
        let name = std::str::from_utf8(raw)
            .map_err(|_| ImatrixError::BadName {
                path: path.to_path_buf(),
                entry: entry as u64 + 1,
                offset: name_at,
            })?
            .to_string();
        let ncall = cur.count(
            format!("ncall of {name:?}"),
            0,
            "a call count cannot be negative",
        )?;
        let nval = cur.count(
            format!("value count of {name:?}"),
            1,
            "an entry holds at least one value",
        )?;
        let raw = cur.take(nval.saturating_mul(4), format!("{nval} values of {name:?}"))?;
        let mut values = f32s(raw);
        for (i, v) in values.iter_mut().enumerate() {
            check_weight(path, &name, nval, i, *v)?;
            if ncall > 0 {
                *v /= ncall as f32;
            }
        }
        if entries.contains_key(&name) {
            return Err(ImatrixError::DuplicateEntry {
                path: path.to_path_buf(),
                name,
            });
        }
        entries.insert(
            name,
            Entry {
                n_per_row: nval,
                n_mat: 1,
                values,
            },
        );
    }
    // The optional trailer: the chunk count, then the dataset name (length and bytes).
    let mut chunks = None;
    let mut datasets = Vec::new();
    if cur.remaining() > 0 {
        let n = cur.count("chunk count", 0, "a chunk count cannot be negative")?;
        chunks = Some(n as u64);
        if cur.remaining() > 0 {
            let len = cur.count("dataset name length", 0, "a length cannot be negative")?;
            let raw = cur.take(len, "dataset name")?;
            let raw = raw.split(|&b| b == 0).next().unwrap_or(raw);
            if !raw.is_empty() {
                datasets.push(String::from_utf8_lossy(raw).into_owned());
            }
        }
        if cur.remaining() > 0 {
            return Err(ImatrixError::TrailingBytes {
                path: path.to_path_buf(),
                offset: cur.pos as u64,
                unexpected: cur.remaining() as u64,
            });
        }
    }
    Ok(ImatrixData {
        path: path.to_path_buf(),
        format: ImatrixFormat::Legacy,
        entries,
        datasets,
        chunks,
        chunk_size: None,
    })
}
