//! Memory-mapped GGUF files, and models split over several files (`NAME-00001-of-0000N.gguf`) opened as one.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{GgufError, Result};
use crate::metadata::Metadata;
use crate::reader::{Header, TensorInfo};

/// Keys written by llama.cpp's `gguf-split` into every shard.
pub const SPLIT_NO: &str = "split.no";
pub const SPLIT_COUNT: &str = "split.count";
pub const SPLIT_TENSORS_COUNT: &str = "split.tensors.count";
/// Most shards a split model may have (llama.cpp writes the count as a u16).
pub const MAX_SPLITS: u64 = 9999;

/// One GGUF file, mapped read-only, with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    map: Option<Mmap>,
    header: Header,
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| GgufError::io(&path, e))?;
        let len = file.metadata().map_err(|e| GgufError::io(&path, e))?.len();
        // An empty file cannot be mapped; parsing no bytes reports the truncation.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only and private to this process. If another process truncates the
            // file while it is mapped, reads past the new end fault (SIGBUS); that is the documented risk
            // of memory-mapped model files, shared with llama.cpp, and cannot be prevented from user space.
            Some(unsafe { Mmap::map(&file) }.map_err(|e| GgufError::io(&path, e))?)
        };
        let header =
            Header::parse(map.as_deref().unwrap_or(&[])).map_err(|e| GgufError::InFile {
                path: path.clone(),
                source: Box::new(e),
            })?;
        Ok(GgufFile { path, map, header })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Drops this file's pages under `bytes` (a slice of its map) from the process's resident set; the data stays
    /// in the OS page cache. Streaming readers (the quantizer) call it after each tensor so their memory stays
    /// bounded. Returns false when `bytes` is not inside this file's map.
    pub fn release(&self, bytes: &[u8]) -> bool {
        self.map
            .as_ref()
            .is_some_and(|map| release_pages(map, bytes))
    }

    /// The data of tensor `t` (an info of this file), borrowed from the map.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        // Bounds were checked against the file length when the header was parsed.
        let start = (self.header.data_offset + t.offset) as usize;
        &self.bytes()[start..start + t.n_bytes as usize]
    }
}

/// A tensor of a (possibly split) model: its info and the shard that holds it.
#[derive(Clone, Debug)]
pub struct ModelTensor {
    pub info: TensorInfo,
    pub shard: usize,
}

/// A model in one GGUF file or split over several, seen as one: metadata from the first shard, tensors of all.
pub struct Model {
    shards: Vec<GgufFile>,
    tensors: Vec<ModelTensor>,
    index: HashMap<String, usize>,
}

impl Model {
    /// Opens `path`; when it is a shard of a split model (any shard), opens every shard.
    pub fn open(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        let first = GgufFile::open(path)?;
        let count = match first.metadata().get(SPLIT_COUNT) {
            None => 1,
            Some(_) => first.metadata().uint(SPLIT_COUNT)?,
        };
        if count <= 1 {
            return Model::from_shards(vec![first]);
        }
        let split_err = |why: String| GgufError::Split {
            path: path.to_path_buf(),
            why,
        };
        if count > MAX_SPLITS {
            return Err(split_err(format!(
                "split.count is {count}, more than {MAX_SPLITS}"
            )));
        }
        let prefix = split_prefix(path).ok_or_else(|| {
            split_err(format!(
                "split.count is {count} but the file name is not of the form NAME-00001-of-{count:05}.gguf, so the other shards cannot be found"
            ))
        })?;
        let mut shards = Vec::with_capacity(count as usize);
        for i in 1..=count {
            let shard_path = split_path(&prefix, i, count);
            let shard = if shard_path == path {
                GgufFile::open(path)?
            } else if !shard_path.exists() {
                return Err(split_err(format!(
                    "shard {i} of {count} is missing: expected {}",
                    shard_path.display()
                )));
            } else {
                GgufFile::open(&shard_path)?
            };
            check_shard(&shard, i - 1, count)?;
            shards.push(shard);
        }
        let model = Model::from_shards(shards)?;
        let declared = model.shards[0].metadata().uint(SPLIT_TENSORS_COUNT).ok();
        if let Some(declared) = declared.filter(|&d| d != model.tensors.len() as u64) {
            return Err(split_err(format!(
                "{SPLIT_TENSORS_COUNT} says {declared} tensors, the shards hold {}",
                model.tensors.len()
            )));
        }
        Ok(model)
    }

    fn from_shards(shards: Vec<GgufFile>) -> Result<Model> {
        let mut tensors = Vec::new();
        let mut index = HashMap::new();
        for (shard, file) in shards.iter().enumerate() {
            for info in &file.header().tensors {
                if index.insert(info.name.clone(), tensors.len()).is_some() {
                    return Err(GgufError::DuplicateTensor {
                        name: info.name.clone(),
                        offset: info.info_offset,
                    });
                }
                tensors.push(ModelTensor {
                    info: info.clone(),
                    shard,
                });
            }
        }
        Ok(Model {
            shards,
            tensors,
            index,
        })
    }

    /// Metadata of the first shard (split models keep all metadata there).
    pub fn metadata(&self) -> &Metadata {
        self.shards[0].metadata()
    }

    pub fn shards(&self) -> &[GgufFile] {
        &self.shards
    }

    /// All tensors, shard by shard, each in file order.
    pub fn tensors(&self) -> &[ModelTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&ModelTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The data of `t`, borrowed from its shard's map.
    /// Drops the pages under `bytes` (a slice of one of the shards) from the resident set; see
    /// [`GgufFile::release`].
    pub fn release(&self, bytes: &[u8]) {
        for shard in &self.shards {
            if shard.release(bytes) {
                return;
            }
        }
    }

    pub fn tensor_data(&self, t: &ModelTensor) -> &[u8] {
        self.shards[t.shard].tensor_data(&t.info)
    }

    /// Total bytes of all shard files.
    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.header().file_len).sum()
    }
}

fn check_shard(shard: &GgufFile, expected_no: u64, count: u64) -> Result<()> {
    let md = shard.metadata();
    let err = |why: String| GgufError::Split {
        path: shard.path().to_path_buf(),
        why,
    };
    let no = md.uint(SPLIT_NO).map_err(|e| err(e.to_string()))?;
    let its_count = md.uint(SPLIT_COUNT).map_err(|e| err(e.to_string()))?;
    if no != expected_no || its_count != count {
        return Err(err(format!(
            "expected shard {} of {count}, the file says it is shard {} of {its_count}",
            expected_no + 1,
            no.saturating_add(1)
        )));
    }
    Ok(())
}

/// `/dir/NAME` for `/dir/NAME-00002-of-00003.gguf`.
pub fn split_prefix(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    // "-00001-of-00003" is 15 ASCII bytes; work on bytes so a multi-byte name cannot split a character.
    let b = stem.as_bytes();
    let cut = b.len().checked_sub(15)?;
    let tail = &b[cut..];
    let digits = |r: std::ops::Range<usize>| tail[r].iter().all(u8::is_ascii_digit);
    if tail[0] != b'-' || &tail[6..10] != b"-of-" || !digits(1..6) || !digits(10..15) {
        return None;
    }
    Some(path.with_file_name(stem.get(..cut)?))
}

/// The path of shard `no` (1-based) of `count`, in llama.cpp's naming.
pub fn split_path(prefix: &Path, no: u64, count: u64) -> PathBuf {
    let mut name = prefix
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!("-{no:05}-of-{count:05}.gguf"));
    prefix.with_file_name(name)
}

/// `madvise(MADV_DONTNEED)` over the whole pages of the read-only file map `map` that `bytes` (a slice of it) covers:
/// the pages leave this process's resident set and stay in the OS page cache. False when `bytes` is outside `map`.
pub fn release_pages(map: &Mmap, bytes: &[u8]) -> bool {
    let base = map.as_ptr() as usize;
    let start = bytes.as_ptr() as usize;
    if bytes.is_empty() || start < base || start + bytes.len() > base + map.len() {
        return false;
    }
    const PAGE: usize = 4096;
    let first = (start - base) / PAGE * PAGE;
    let end = ((start - base + bytes.len()).div_ceil(PAGE) * PAGE).min(map.len());
    // SAFETY: a read-only file mapping: MADV_DONTNEED only drops this process's page-table entries; the next access
    // reads the same contents back from the page cache, so no borrowed slice sees a change.
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first)
    };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        let p = Path::new("/m/DeepSeek-V4-Flash-Q4_K_M-00002-of-00004.gguf");
        let prefix = split_prefix(p).unwrap();
        assert_eq!(prefix, Path::new("/m/DeepSeek-V4-Flash-Q4_K_M"));
        assert_eq!(split_path(&prefix, 2, 4), p);
        assert_eq!(split_prefix(Path::new("/m/model.gguf")), None);
        assert_eq!(split_prefix(Path::new("/m/x-0000a-of-00004.gguf")), None);
        assert_eq!(split_prefix(Path::new("/m/éaaaaaaaaaaaaaa.gguf")), None);
        assert_eq!(split_prefix(Path::new("/m/x-00001-ofé0000.gguf")), None);
        assert_eq!(
            split_prefix(Path::new("/m/é-00001-of-00002.gguf")).unwrap(),
            Path::new("/m/é")
        );
    }
}
