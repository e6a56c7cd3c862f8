//! Zero-copy reader of Hugging Face safetensors files and of sharded checkpoints (DSV4.md section 2).
//!
//! File format: a u64 little-endian header length `N`, `N` bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`), then the data;
//! offsets are relative to the start of the data. Every number in a file is treated as hostile: the header length
//! is capped and must lie within the file, the JSON is parsed into typed structs (duplicate names and unknown
//! fields are errors), each tensor's byte length must equal `product(shape) × dtype size` (checked arithmetic),
//! and the data ranges must be ordered, inside the data and non-overlapping. Files are memory-mapped; tensor bytes
//! are borrowed from the map, never copied.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The largest header accepted (the reference implementation's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Element types of safetensors (the byte-sized ones; sub-byte types such as `F4` are rejected as unknown:
/// DeepSeek V4 stores its FP4 experts as `I8` bytes, two E2M1 values each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    F8E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl Dtype {
    /// The dtype named `name` in a safetensors header.
    pub fn from_name(name: &str) -> Option<Dtype> {
        Some(match name {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E8M0" => Dtype::F8E8M0,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F64" => Dtype::F64,
            _ => return None,
        })
    }

    /// The header name of this dtype.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F8E8M0 => {
                1
            }
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a safetensors file or checkpoint was rejected. Every variant names the file; tensor-level ones name the
/// tensor and what was expected against what was found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: truncated: {len} bytes, expected at least 8 for the header length", path.display())]
    Truncated { path: PathBuf, len: u64 },
    #[error("{}: header length {header_len} exceeds the limit of {max} bytes", path.display())]
    HeaderTooLarge {
        path: PathBuf,
        header_len: u64,
        max: u64,
    },
    #[error("{}: header length {header_len} runs past the end of the file ({available} bytes after the length)",
        path.display())]
    HeaderPastEnd {
        path: PathBuf,
        header_len: u64,
        available: u64,
    },
    #[error("{}: bad header JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: tensor {tensor:?} appears more than once in the header", path.display())]
    DuplicateTensor { path: PathBuf, tensor: String },
    #[error("{}: tensor {tensor:?}: unknown dtype {dtype:?}", path.display())]
    UnknownDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{}: tensor {tensor:?}: data_offsets [{begin}, {end}] are reversed, expected begin <= end",
        path.display())]
    OffsetsReversed {
        path: PathBuf,
        tensor: String,
        begin: u64,
        end: u64,
    },
    #[error("{}: tensor {tensor:?}: data_offsets end {end} runs past the {data_len} data bytes of the file",
        path.display())]
    DataPastEnd {
        path: PathBuf,
        tensor: String,
        end: u64,
        data_len: u64,
    },
    #[error("{}: tensor {tensor:?}: shape {shape:?} of {dtype} overflows 64-bit byte counts", path.display())]
    ShapeOverflow {
        path: PathBuf,
        tensor: String,
        dtype: Dtype,
        shape: Vec<u64>,
    },
    #[error("{}: tensor {tensor:?}: shape {shape:?} of {dtype} needs {expected} bytes, data_offsets hold {found}",
        path.display())]
    SizeMismatch {
        path: PathBuf,
        tensor: String,
        dtype: Dtype,
        shape: Vec<u64>,
        expected: u64,
        found: u64,
    },
    #[error("{}: tensors {tensor:?} [{begin}, {end}) and {other:?} [{other_begin}, {other_end}) overlap",
        path.display())]
    Overlap {
        path: PathBuf,
        tensor: String,
        begin: u64,
        end: u64,
        other: String,
        other_begin: u64,
        other_end: u64,
    },
    #[error("{}: no tensor named {tensor:?}", path.display())]
    NoSuchTensor { path: PathBuf, tensor: String },
    #[error("{}: neither {INDEX_FILE} nor {SINGLE_FILE} is there", path.display())]
    NoCheckpoint { path: PathBuf },
    #[error("{}: tensor {tensor:?}: shard name {shard:?} is not a plain file name in the checkpoint folder",
        path.display())]
    BadShardName {
        path: PathBuf,
        tensor: String,
        shard: String,
    },
    #[error("{}: shard {shard:?} (listed for tensor {tensor:?}) does not exist", path.display())]
    MissingShard {
        path: PathBuf,
        tensor: String,
        shard: String,
    },
    #[error("{}: the index lists tensor {tensor:?} in this shard, which lacks it", path.display())]
    NotInShard { path: PathBuf, tensor: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One tensor's bytes, borrowed from the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorView<'a> {
    pub dtype: Dtype,
    pub shape: &'a [u64],
    pub bytes: &'a [u8],
}

impl TensorView<'_> {
    /// Number of elements (the product of the shape; checked against the byte length when the file was opened).
    pub fn len(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct TensorInfo {
    dtype: Dtype,
    shape: Vec<u64>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// A header entry as written in the JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header's top-level object in file order, keeping duplicate keys (a map type would silently drop them).
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(RawHeader(entries))
            }
        }
        d.deserialize_map(V)
    }
}

/// One memory-mapped safetensors file with a validated header.
pub struct SafeTensors {
    path: PathBuf,
    mmap: Mmap,
    /// Tensors sorted by name.
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafeTensors")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafeTensors {
    /// Maps and validates the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<SafeTensors> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(Error::Truncated { path, len });
        }
        // SAFETY: the map is only read. As with any memory-mapped file, another process truncating or rewriting the
        // file while it is mapped is outside what this reader can guard against (checkpoints are read-only inputs).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (tensors, metadata) = parse(&path, &mmap)?;
        Ok(SafeTensors {
            path,
            mmap,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The `__metadata__` strings.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Drops this file's pages under `bytes` (a slice of one of its tensors) from the process's memory: the data
    /// stays in the OS page cache, but no longer counts towards this process's resident set. Returns false when
    /// `bytes` is not inside this file's map. Streaming readers call it after each tensor.
    pub fn release(&self, bytes: &[u8]) -> bool {
        gguf::release_pages(&self.mmap, bytes)
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let info = self.tensors.get(name).ok_or_else(|| Error::NoSuchTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        Ok(TensorView {
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &self.mmap[info.start..info.end],
        })
    }
}

type Parsed = (BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

/// Validates the header of the file bytes `buf`; every range returned lies within `buf`.
fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let path_buf = || path.to_path_buf();
    let file_len = buf.len() as u64;
    if file_len < 8 {
        return Err(Error::Truncated {
            path: path_buf(),
            len: file_len,
        });
    }
    let header_len = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if header_len > MAX_HEADER_LEN {
        return Err(Error::HeaderTooLarge {
            path: path_buf(),
            header_len,
            max: MAX_HEADER_LEN,
        });
    }
    let available = file_len - 8;
    if header_len > available {
        return Err(Error::HeaderPastEnd {
            path: path_buf(),
            header_len,
            available,
        });
    }
    // Both fit in the buffer, hence in usize.
    let data_start = 8 + header_len as usize;
    let data_len = file_len - 8 - header_len;
    let json = |source| Error::Json {
        path: path_buf(),
        source,
    };
    let RawHeader(entries) = serde_json::from_slice(&buf[8..data_start]).map_err(json)?;

    let mut tensors = BTreeMap::new();
    let mut metadata = None;
    for (name, value) in entries {
        if name == "__metadata__" {
            if metadata.is_some() {
                return Err(Error::DuplicateTensor {
                    path: path_buf(),
                    tensor: name,
                });
            }
            metadata = Some(serde_json::from_value(value).map_err(json)?);
            continue;
        }
        if tensors.contains_key(&name) {
            return Err(Error::DuplicateTensor {
                path: path_buf(),
                tensor: name,
            });
        }
        let raw: RawTensor = serde_json::from_value(value).map_err(json)?;
        let info = check_tensor(path, &name, raw, data_start, data_len)?;
        tensors.insert(name, info);
    }

    // No two ranges may share a byte: sort by (start, end) and compare neighbours.
    let mut ranges: Vec<(&String, &TensorInfo)> = tensors.iter().collect();
    ranges.sort_by_key(|(_, t)| (t.start, t.end));
    for pair in ranges.windows(2) {
        let ((a_name, a), (b_name, b)) = (pair[0], pair[1]);
        if b.start < a.end {
            let rel = |x: usize| (x - data_start) as u64;
            return Err(Error::Overlap {
                path: path_buf(),
                tensor: b_name.clone(),
                begin: rel(b.start),
                end: rel(b.end),
                other: a_name.clone(),
                other_begin: rel(a.start),
                other_end: rel(a.end),
            });
        }
    }
    Ok((tensors, metadata.unwrap_or_default()))
}

fn check_tensor(
    path: &Path,
    name: &str,
    raw: RawTensor,
    data_start: usize,
    data_len: u64,
) -> Result<TensorInfo> {
    let path_buf = || path.to_path_buf();
    let dtype = Dtype::from_name(&raw.dtype).ok_or_else(|| Error::UnknownDtype {
        path: path_buf(),
        tensor: name.to_string(),
        dtype: raw.dtype.clone(),
    })?;
    let [begin, end] = raw.data_offsets;
    if begin > end {
        return Err(Error::OffsetsReversed {
            path: path_buf(),
            tensor: name.to_string(),
            begin,
            end,
        });
    }
    let expected = raw
        .shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::ShapeOverflow {
            path: path_buf(),
            tensor: name.to_string(),
            dtype,
            shape: raw.shape.clone(),
        })?;
    let found = end - begin;
    if expected != found {
        return Err(Error::SizeMismatch {
            path: path_buf(),
            tensor: name.to_string(),
            dtype,
            shape: raw.shape,
            expected,
            found,
        });
    }
    if end > data_len {
        return Err(Error::DataPastEnd {
            path: path_buf(),
            tensor: name.to_string(),
            end,
            data_len,
        });
    }
    // end <= data_len, and data_start + data_len is the buffer length: no overflow, fits in usize.
    Ok(TensorInfo {
        dtype,
        shape: raw.shape,
        start: data_start + begin as usize,
        end: data_start + end as usize,
    })
}

/// `model.safetensors.index.json`; fields other than `weight_map` (e.g. `metadata.total_size`) are ignored.
#[derive(Deserialize)]
struct RawIndex {
    weight_map: BTreeMap<String, String>,
}

/// A checkpoint folder: the shards named by `model.safetensors.index.json`, or a single `model.safetensors`.
/// Each shard is opened (mapped and validated) once; every tensor the index lists is checked to be in its shard.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<SafeTensors>,
    /// Tensor name -> index into `shards`.
    map: BTreeMap<String, usize>,
}

impl Checkpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            let text = std::fs::read(&index_path).map_err(|source| Error::Io {
                path: index_path.clone(),
                source,
            })?;
            let index: RawIndex = serde_json::from_slice(&text).map_err(|source| Error::Json {
                path: index_path.clone(),
                source,
            })?;
            let mut shards: Vec<SafeTensors> = Vec::new();
            let mut shard_ids: HashMap<String, usize> = HashMap::new();
            let mut map = BTreeMap::new();
            for (tensor, shard) in index.weight_map {
                let id = match shard_ids.get(&shard) {
                    Some(&id) => id,
                    None => {
                        let mut parts = Path::new(&shard).components();
                        let plain = matches!(
                            (parts.next(), parts.next()),
                            (Some(std::path::Component::Normal(_)), None)
                        );
                        if !plain {
                            return Err(Error::BadShardName {
                                path: index_path,
                                tensor,
                                shard,
                            });
                        }
                        let shard_path = dir.join(&shard);
                        if !shard_path.exists() {
                            return Err(Error::MissingShard {
                                path: index_path,
                                tensor,
                                shard,
                            });
                        }
                        shards.push(SafeTensors::open(&shard_path)?);
                        shard_ids.insert(shard, shards.len() - 1);
                        shards.len() - 1
                    }
                };
                if !shards[id].contains(&tensor) {
                    return Err(Error::NotInShard {
                        path: shards[id].path.clone(),
                        tensor,
                    });
                }
                map.insert(tensor, id);
            }
            return Ok(Checkpoint { dir, shards, map });
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            let shard = SafeTensors::open(&single)?;
            let map = shard.names().map(|n| (n.to_string(), 0)).collect();
            return Ok(Checkpoint {
                dir,
                shards: vec![shard],
                map,
            });
        }
        Err(Error::NoCheckpoint { path: dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The shards, in the order first named by the index.
    pub fn shards(&self) -> &[SafeTensors] {
        &self.shards
    }

    /// Drops the pages under `bytes` (a slice of one of the checkpoint's tensors) from the resident set; see
    /// [`SafeTensors::release`].
    pub fn release(&self, bytes: &[u8]) {
        for shard in &self.shards {
            if shard.release(bytes) {
                return;
            }
        }
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        match self.map.get(name) {
            Some(&id) => self.shards[id].tensor(name),
            None => Err(Error::NoSuchTensor {
                path: self.dir.clone(),
                tensor: name.to_string(),
            }),
        }
    }
}
