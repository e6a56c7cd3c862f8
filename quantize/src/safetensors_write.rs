//! Streaming writer of safetensors files and of sharded checkpoints (`model-0000K-of-0000N.safetensors` plus
//! `model.safetensors.index.json`), the counterpart of [`crate::safetensors`]'s reader.
//!
//! A [`Layout`] plans a file from the tensors' names, dtypes and shapes alone: the JSON header (with
//! `data_offsets`), padded with spaces to a multiple of 8 bytes after the 8-byte little-endian header length, and
//! the data order. Tensors are placed by decreasing element size (stable otherwise), as the reference
//! implementation does, so every tensor starts at a multiple of its element size. [`write_file`] then asks a
//! callback for each tensor's bytes in data order and streams them out (the whole file is never in memory),
//! checking that each tensor got exactly its byte count; it writes a temporary file next to the target and renames
//! it into place, so a failed write leaves no partial file under the final name.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::safetensors::{Dtype, INDEX_FILE, MAX_HEADER_LEN, SINGLE_FILE};

/// One tensor to write: its name, element type and shape (row-major, outermost first, as PyTorch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
}

impl TensorEntry {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: &[u64]) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Bytes of the tensor's data; `None` when the count overflows 64 bits.
    pub fn byte_len(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size(), |acc, &d| acc.checked_mul(d))
    }
}

/// Why a safetensors file or checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("tensor {name:?}: shape {shape:?} of {dtype} overflows 64-bit byte counts")]
    ShapeOverflow {
        name: String,
        dtype: Dtype,
        shape: Vec<u64>,
    },
    #[error("tensor {0:?} appears more than once")]
    Duplicate(String),
    #[error("{0:?} cannot be a tensor name (it is the header's metadata key)")]
    ReservedName(String),
    #[error("the header would take {len} bytes, more than readers accept ({max})")]
    HeaderTooLarge { len: u64, max: u64 },
    #[error("the tensors' data adds up to more than 2^64 bytes")]
    TooLarge,
    #[error("{}: tensor {tensor:?}: got {got} bytes of data, expected {expected}", path.display())]
    WrongLength {
        path: PathBuf,
        tensor: String,
        expected: u64,
        got: u64,
    },
    #[error("{}: tensor {tensor:?}: {source}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot split {n_tensors} tensors into {shards} shards (each shard needs at least one tensor)")]
    Shards { n_tensors: usize, shards: usize },
}

/// The plan of one safetensors file: header bytes and where each tensor's data goes.
#[derive(Clone, Debug)]
pub struct Layout {
    entries: Vec<TensorEntry>,
    /// `[begin, end)` of each entry (same index as `entries`), relative to the start of the data.
    offsets: Vec<[u64; 2]>,
    /// Entry indices in data order.
    order: Vec<usize>,
    /// The 8-byte length followed by the padded JSON header.
    header: Vec<u8>,
    data_len: u64,
}

impl Layout {
    /// Plans a file holding `entries` (any order; the data goes by decreasing element size, see the module docs)
    /// with the `__metadata__` strings `metadata` (omitted when empty).
    pub fn new(
        entries: Vec<TensorEntry>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Layout, WriteError> {
        let mut seen = HashSet::new();
        let mut sizes = Vec::with_capacity(entries.len());
        for e in &entries {
            if e.name == "__metadata__" {
                return Err(WriteError::ReservedName(e.name.clone()));
            }
            if !seen.insert(e.name.as_str()) {
                return Err(WriteError::Duplicate(e.name.clone()));
            }
            sizes.push(e.byte_len().ok_or_else(|| WriteError::ShapeOverflow {
                name: e.name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
            })?);
        }
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(entries[i].dtype.size()));
        let mut offsets = vec![[0u64; 2]; entries.len()];
        let mut at = 0u64;
        for &i in &order {
            let end = at.checked_add(sizes[i]).ok_or(WriteError::TooLarge)?;
            offsets[i] = [at, end];
            at = end;
        }

        // The JSON: metadata first, then the tensors in data order. Names and strings go through serde_json for
        // escaping.
        let mut json = String::from("{");
        let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let mut first = true;
        if !metadata.is_empty() {
            json.push_str("\"__metadata__\":{");
            for (k, (key, value)) in metadata.iter().enumerate() {
                if k > 0 {
                    json.push(',');
                }
                json.push_str(&quote(key));
                json.push(':');
                json.push_str(&quote(value));
            }
            json.push('}');
            first = false;
        }
        for &i in &order {
            let e = &entries[i];
            if !first {
                json.push(',');
            }
            first = false;
            let shape: Vec<String> = e.shape.iter().map(u64::to_string).collect();
            let [begin, end] = offsets[i];
            json.push_str(&format!(
                "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{begin},{end}]}}",
                quote(&e.name),
                e.dtype.name(),
                shape.join(",")
            ));
        }
        json.push('}');
        // Pad with spaces so that the data starts at a multiple of 8 (8 + header_len).
        let padded = json.len().div_ceil(8) * 8;
        let header_len = padded as u64;
        if header_len > MAX_HEADER_LEN {
            return Err(WriteError::HeaderTooLarge {
                len: header_len,
                max: MAX_HEADER_LEN,
            });
        }
        let mut header = Vec::with_capacity(8 + padded);
        header.extend_from_slice(&header_len.to_le_bytes());
        header.extend_from_slice(json.as_bytes());
        header.resize(8 + padded, b' ');
        Ok(Layout {
            entries,
            offsets,
            order,
            header,
            data_len: at,
        })
    }

    /// The tensors, in the order given to [`Layout::new`].
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    /// `[begin, end)` of entry `i`'s data, relative to the start of the data.
    pub fn data_offsets(&self, i: usize) -> Option<[u64; 2]> {
        self.offsets.get(i).copied()
    }

    /// Entry indices in the order their data is written.
    pub fn data_order(&self) -> &[usize] {
        &self.order
    }

    /// The JSON header's length (padding included), as written in the first 8 bytes.
    pub fn header_len(&self) -> u64 {
        self.header.len() as u64 - 8
    }

    /// Bytes of tensor data.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// The whole file's size.
    pub fn file_len(&self) -> u64 {
        self.header.len() as u64 + self.data_len
    }
}

/// Passes bytes through and counts them; refuses to go past `limit`, so one tensor cannot spill into the next.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
    limit: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit - self.written;
        if buf.len() as u64 > room {
            self.written = self.limit + 1; // marks the overrun for the length check
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more bytes than the tensor holds",
            ));
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The temporary name a file is written under before it is renamed to `path`.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes `layout` to `path`: the header, then each tensor's data in [`Layout::data_order`], produced by
/// `fill(index, entry, out)` (index into [`Layout::entries`]), which must write exactly the entry's byte count.
/// Goes through a temporary file (`<name>.partial`) renamed into place, not synced to disk; on any error the
/// temporary file is removed. Returns the file size.
pub fn write_file<F>(path: &Path, layout: &Layout, mut fill: F) -> Result<u64, WriteError>
where
    F: FnMut(usize, &TensorEntry, &mut dyn Write) -> io::Result<()>,
{
    let tmp = temp_path(path);
    let result = (|| {
        let io_err = |source| WriteError::Io {
            path: tmp.clone(),
            source,
        };
        let file = File::create(&tmp).map_err(io_err)?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        out.write_all(&layout.header).map_err(io_err)?;
        for &i in &layout.order {
            let entry = &layout.entries[i];
            let [begin, end] = layout.offsets[i];
            let expected = end - begin;
            let mut counted = Counted {
                inner: &mut out,
                written: 0,
                limit: expected,
            };
            let filled = fill(i, entry, &mut counted);
            let got = counted.written;
            let wrong_length = || WriteError::WrongLength {
                path: path.to_path_buf(),
                tensor: entry.name.clone(),
                expected,
                got,
            };
            // An overrun is reported as such even though it surfaces as the callback's error.
            if got > expected {
                return Err(wrong_length());
            }
            filled.map_err(|source| WriteError::Tensor {
                path: path.to_path_buf(),
                tensor: entry.name.clone(),
                source,
            })?;
            if got != expected {
                return Err(wrong_length());
            }
        }
        // Not synced to disk: a reader sees the whole file or none (the rename), which is what tests need; a
        // multi-GB fsync would cost more than the writing.
        drop(out.into_inner().map_err(|e| io_err(e.into_error()))?);
        std::fs::rename(&tmp, path).map_err(|source| WriteError::Io {
            path: path.to_path_buf(),
            source,
        })
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(layout.file_len())
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
pub fn write_small_file(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let tmp = temp_path(path);
    let io_err = |p: &Path, source| WriteError::Io {
        path: p.to_path_buf(),
        source,
    };
    let result = std::fs::write(&tmp, bytes)
        .map_err(|e| io_err(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| io_err(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The file name of shard `k` (1-based) of `n`: `model-0000k-of-0000n.safetensors`, as Hugging Face names them.
pub fn shard_name(k: usize, n: usize) -> String {
    format!("model-{k:05}-of-{n:05}.safetensors")
}

/// Splits tensors (in order) into `n_shards` consecutive, non-empty runs of about equal byte size; returns the
/// shard of each tensor.
pub fn split_into_shards(sizes: &[u64], n_shards: usize) -> Result<Vec<usize>, WriteError> {
    if n_shards == 0 || n_shards > sizes.len() {
        return Err(WriteError::Shards {
            n_tensors: sizes.len(),
            shards: n_shards,
        });
    }
    let total: u128 = sizes.iter().map(|&s| u128::from(s)).sum();
    let mut shard_of = Vec::with_capacity(sizes.len());
    let (mut shard, mut in_shard, mut before) = (0usize, 0usize, 0u128);
    for (i, &size) in sizes.iter().enumerate() {
        let shards_after = n_shards - shard - 1;
        let tensors_left = sizes.len() - i;
        // Move on once this shard has its share of the bytes, or when every later shard needs one of the tensors
        // that are left.
        let full = before * n_shards as u128 >= total * (shard as u128 + 1);
        if in_shard > 0 && shards_after > 0 && (full || tensors_left <= shards_after) {
            shard += 1;
            in_shard = 0;
        }
        shard_of.push(shard);
        in_shard += 1;
        before += u128::from(size);
    }
    Ok(shard_of)
}

/// What [`write_checkpoint`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenCheckpoint {
    /// The safetensors files, in order.
    pub shards: Vec<PathBuf>,
    /// `model.safetensors.index.json`, when there is more than one shard.
    pub index: Option<PathBuf>,
    /// Bytes of tensor data (the index's `metadata.total_size`).
    pub total_size: u64,
    /// Bytes of all safetensors files together (headers included).
    pub file_bytes: u64,
    pub n_tensors: usize,
}

/// Writes `entries` into `dir` as a checkpoint: with `n_shards == 1` a single `model.safetensors` (and a stale
/// `model.safetensors.index.json` there is removed, as the reader would prefer it), else `n_shards` files named by
/// [`shard_name`], split by [`split_into_shards`], plus `model.safetensors.index.json`
/// (`{"metadata": {"total_size": N}, "weight_map": {tensor: file}}`). Every file gets the header metadata
/// `metadata`. `fill(index, entry, out)` writes the bytes of `entries[index]`, called once per tensor, shard after
/// shard (within a shard in data order, see [`Layout`]).
pub fn write_checkpoint<F>(
    dir: &Path,
    entries: &[TensorEntry],
    n_shards: usize,
    metadata: &BTreeMap<String, String>,
    mut fill: F,
) -> Result<WrittenCheckpoint, WriteError>
where
    F: FnMut(usize, &TensorEntry, &mut dyn Write) -> io::Result<()>,
{
    let sizes = entries
        .iter()
        .map(|e| {
            e.byte_len().ok_or_else(|| WriteError::ShapeOverflow {
                name: e.name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
            })
        })
        .collect::<Result<Vec<u64>, _>>()?;
    let total_size = sizes
        .iter()
        .try_fold(0u64, |acc, &s| acc.checked_add(s))
        .ok_or(WriteError::TooLarge)?;
    let shard_of = if n_shards == 1 {
        vec![0; entries.len()]
    } else {
        split_into_shards(&sizes, n_shards)?
    };
    // Plan every shard first: a bad name or a duplicate fails before anything is written.
    let mut plans = Vec::with_capacity(n_shards);
    for k in 0..n_shards {
        let members: Vec<usize> = (0..entries.len()).filter(|&i| shard_of[i] == k).collect();
        let layout = Layout::new(
            members.iter().map(|&i| entries[i].clone()).collect(),
            metadata,
        )?;
        let name = if n_shards == 1 {
            SINGLE_FILE.to_string()
        } else {
            shard_name(k + 1, n_shards)
        };
        plans.push((name, members, layout));
    }
    // Names must be unique across shards too.
    let mut seen = HashSet::new();
    for e in entries {
        if !seen.insert(e.name.as_str()) {
            return Err(WriteError::Duplicate(e.name.clone()));
        }
    }

    let mut shards = Vec::with_capacity(n_shards);
    let mut file_bytes = 0u64;
    let mut weight_map = BTreeMap::new();
    for (name, members, layout) in &plans {
        let path = dir.join(name);
        file_bytes += write_file(&path, layout, |j, entry, out| fill(members[j], entry, out))?;
        for &i in members {
            weight_map.insert(entries[i].name.clone(), name.clone());
        }
        shards.push(path);
    }
    let index_path = dir.join(INDEX_FILE);
    let index = if n_shards == 1 {
        match std::fs::remove_file(&index_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(WriteError::Io {
                    path: index_path,
                    source,
                })
            }
        }
        None
    } else {
        let json = serde_json::json!({
            "metadata": {"total_size": total_size},
            "weight_map": weight_map,
        });
        let mut text = serde_json::to_string_pretty(&json).map_err(|e| WriteError::Io {
            path: index_path.clone(),
            source: e.into(),
        })?;
        text.push('\n');
        write_small_file(&index_path, text.as_bytes())?;
        Some(index_path)
    };
    Ok(WrittenCheckpoint {
        shards,
        index,
        total_size,
        file_bytes,
        n_tensors: entries.len(),
    })
}
