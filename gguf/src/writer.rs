//! The GGUF writer: plans the whole layout first (a dry run gives every offset and the file size), then streams
//! tensor data into a temporary file that is renamed into place only when complete. A file too large for one
//! output can be split into shards in llama.cpp's layout ([`Writer::split_by_size`], [`Writer::write_files`]).

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};
use crate::file::{
    split_path, split_prefix, MAX_SPLITS, SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS_COUNT,
};
use crate::metadata::Metadata;
use crate::reader::{align_up, Header, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use crate::types::GgmlType;
use crate::value::{Array, Value};

/// A GGUF file to be written: metadata and tensor descriptions, in the order they will appear.
#[derive(Clone, Debug)]
pub struct Writer {
    version: u32,
    metadata: Metadata,
    tensors: Vec<PlannedTensor>,
    names: HashSet<String>,
}

/// A tensor the writer will write: its name, shape (ggml order) and type.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub n_bytes: u64,
}

/// Where everything goes: the result of [`Writer::plan`].
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub alignment: u64,
    /// Bytes of magic, counts, metadata and tensor infos (before the padding to the data section).
    pub header_bytes: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// Offset of each tensor relative to the data section, in tensor order.
    pub tensor_offsets: Vec<u64>,
    /// Size of the finished file.
    pub total_bytes: u64,
}

impl Default for Writer {
    fn default() -> Self {
        Writer::new()
    }
}

impl Writer {
    /// An empty GGUF version 3 file.
    pub fn new() -> Writer {
        Writer {
            version: 3,
            metadata: Metadata::default(),
            tensors: Vec::new(),
            names: HashSet::new(),
        }
    }

    /// A writer that reproduces `header` (same version, metadata and tensors in the same order).
    pub fn from_header(header: &Header) -> Result<Writer> {
        let mut w = Writer::new();
        w.version = header.version;
        w.metadata = header.metadata.clone();
        for t in &header.tensors {
            w.add_tensor(&t.name, &t.dims, t.ty)?;
        }
        Ok(w)
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Sets (or replaces, keeping its position) a metadata value.
    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        self.metadata.push(key, value);
    }

    /// Removes a metadata key, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.metadata.remove(key)
    }

    /// Sets `general.alignment` (a non-zero power of two).
    pub fn set_alignment(&mut self, alignment: u32) -> Result<()> {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(GgufError::BadAlignment {
                got: alignment.into(),
            });
        }
        self.set(ALIGNMENT_KEY, Value::U32(alignment));
        Ok(())
    }

    /// The alignment the file will use: `general.alignment` when set, else 32.
    pub fn alignment(&self) -> Result<u64> {
        match self.metadata.get(ALIGNMENT_KEY) {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(Value::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
            Some(Value::U32(a)) => Err(GgufError::BadAlignment { got: u64::from(*a) }),
            Some(other) => Err(GgufError::wrong_type(
                ALIGNMENT_KEY,
                "uint32",
                other.value_type(),
            )),
        }
    }

    /// Adds a tensor description; its data is supplied when writing.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType) -> Result<()> {
        if dims.len() > MAX_DIMS as usize {
            return Err(GgufError::Write(format!(
                "tensor {name:?} has {} dimensions; at most 4",
                dims.len()
            )));
        }
        let n_bytes = ty.tensor_bytes(dims).ok_or_else(|| {
            GgufError::Write(format!(
                "tensor {name:?} of shape {dims:?} cannot be stored as {ty}: rows must be whole blocks of {} elements",
                ty.block_size()
            ))
        })?;
        if !self.names.insert(name.to_string()) {
            return Err(GgufError::Write(format!("tensor {name:?} added twice")));
        }
        self.tensors.push(PlannedTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            n_bytes,
        });
        Ok(())
    }

    pub fn tensors(&self) -> &[PlannedTensor] {
        &self.tensors
    }

    /// Plans the layout without writing anything: every tensor aligned and padded, as llama.cpp and gguf-py write.
    pub fn plan(&self) -> Result<Layout> {
        let alignment = self.alignment()?;
        let mut counter = CountingSink(0);
        self.write_header(&mut counter)
            .map_err(|e| GgufError::Write(e.to_string()))?;
        let header_bytes = counter.0;
        let overflow = || GgufError::Write("the planned file is larger than 2^64 bytes".into());
        let data_offset = align_up(header_bytes, alignment).ok_or_else(overflow)?;
        let mut offset = 0u64;
        let mut tensor_offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            tensor_offsets.push(offset);
            offset = offset
                .checked_add(t.n_bytes)
                .and_then(|end| align_up(end, alignment))
                .ok_or_else(overflow)?;
        }
        Ok(Layout {
            alignment,
            header_bytes,
            data_offset,
            tensor_offsets,
            total_bytes: data_offset.checked_add(offset).ok_or_else(overflow)?,
        })
    }

    /// Writes the file to `out`. `fill(i, tensor, sink)` must write exactly the tensor's bytes.
    pub fn write<W: Write>(
        &self,
        out: &mut W,
        mut fill: impl FnMut(usize, &PlannedTensor, &mut dyn Write) -> io::Result<()>,
    ) -> Result<Layout> {
        let layout = self.plan()?;
        let io_err = |e: io::Error| GgufError::io("output", e);
        let mut sink = CountingWriter {
            inner: out,
            count: 0,
        };
        self.write_header(&mut sink).map_err(io_err)?;
        pad_to(&mut sink, layout.data_offset).map_err(io_err)?;
        for (i, t) in self.tensors.iter().enumerate() {
            let start = layout.data_offset + layout.tensor_offsets[i];
            fill(i, t, &mut sink).map_err(io_err)?;
            let written = sink.count - start;
            if written != t.n_bytes {
                return Err(GgufError::Write(format!(
                    "tensor {:?}: {written} bytes of data were supplied, {} expected",
                    t.name, t.n_bytes
                )));
            }
            let next = align_up(sink.count, layout.alignment).unwrap_or(sink.count);
            pad_to(&mut sink, next).map_err(io_err)?;
        }
        sink.flush().map_err(io_err)?;
        Ok(layout)
    }

    /// Writes the file to `path` through a temporary file in the same folder, renamed into place when complete
    /// and synced. An existing `path` is replaced only with `overwrite`. On any error the temporary file is removed.
    pub fn write_file(
        &self,
        path: &Path,
        overwrite: bool,
        fill: impl FnMut(usize, &PlannedTensor, &mut dyn Write) -> io::Result<()>,
    ) -> Result<Layout> {
        self.write_file_as(path, overwrite, false, fill)
    }

    /// [`Writer::write_file`] where every aligned block of [`HOLE_BLOCK`] zero bytes is skipped with a
    /// seek instead of written: on filesystems with sparse files those ranges are holes
    /// that take no disk space and read back as zeros. For benchmark files whose large tensors are all zeros.
    pub fn write_file_sparse(
        &self,
        path: &Path,
        overwrite: bool,
        fill: impl FnMut(usize, &PlannedTensor, &mut dyn Write) -> io::Result<()>,
    ) -> Result<Layout> {
        self.write_file_as(path, overwrite, true, fill)
    }

    fn write_file_as(
        &self,
        path: &Path,
        overwrite: bool,
        sparse: bool,
        fill: impl FnMut(usize, &PlannedTensor, &mut dyn Write) -> io::Result<()>,
    ) -> Result<Layout> {
        if !overwrite && path.exists() {
            return Err(GgufError::Write(format!(
                "{} already exists (pass --overwrite to replace it)",
                path.display()
            )));
        }
        crate::atomic::write_file_atomically(
            path,
            |tmp, file| self.write_into(tmp, file, sparse, fill),
            |p, e| GgufError::io(p, e),
        )
    }

    /// Writes the file into `tmp` (created new) and syncs it (for [`Writer::write_files`]).
    fn write_temp(
        &self,
        tmp: &Path,
        sparse: bool,
        fill: impl FnMut(usize, &PlannedTensor, &mut dyn Write) -> io::Result<()>,
    ) -> Result<Layout> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| GgufError::io(tmp, e))?;
        let (layout, file) = self.write_into(tmp, file, sparse, fill)?;
        file.sync_all().map_err(|e| GgufError::io(tmp, e))?;
        Ok(layout)
    }

    /// Writes the file into `file` (named `tmp` in errors), with holes where `sparse` allows; gives the file back.
    fn write_into(
        &self,
        tmp: &Path,
        file: fs::File,
        sparse: bool,
        fill: impl FnMut(usize, &PlannedTensor, &mut dyn Write) -> io::Result<()>,
    ) -> Result<(Layout, fs::File)> {
        let mut out = BufWriter::with_capacity(8 << 20, HoleWriter::new(file, sparse));
        let layout = self.write(&mut out, fill).map_err(|e| match e {
            GgufError::Write(msg) => GgufError::Write(format!("{}: {msg}", tmp.display())),
            GgufError::Io { err, .. } => GgufError::io(tmp, err),
            other => other,
        })?;
        let file = out
            .into_inner()
            .map_err(|e| GgufError::io(tmp, e.into_error()))?
            .finish()
            .map_err(|e| GgufError::io(tmp, e))?;
        Ok((layout, file))
    }

    /// Splits this file's tensors into shards of at most `max_bytes` each, in llama.cpp's split layout (as
    /// `gguf-split --split-max-size` and `llama-quantize --keep-split` write it): the first shard carries all
    /// metadata, every shard carries `split.no` (uint16, 0-based), `split.count` (uint16) and
    /// `split.tensors.count` (int32, the tensors of all shards), and each shard holds a contiguous run of the
    /// tensors in order. Shards other than the first carry no other metadata, except `general.alignment` when it
    /// is set (without it they could not use the same alignment).
    ///
    /// The size of a shard is its exact planned file size (header, tensor infos, aligned tensor data). A new
    /// shard starts when adding the next tensor would make the current one exceed `max_bytes`; a tensor larger
    /// than `max_bytes` gets a shard of its own (the first shard always takes at least the first tensor, however
    /// large the metadata). When the whole file fits in `max_bytes`, or has at most one tensor, the result is one
    /// writer WITHOUT split keys (any `split.*` keys this writer carries are dropped in every case).
    pub fn split_by_size(&self, max_bytes: u64) -> Result<Vec<Writer>> {
        let alignment = self.alignment()?;
        let mut whole = self.clone();
        for key in [SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT] {
            whole.metadata.remove(key);
        }
        if whole.tensors.len() <= 1 || whole.plan()?.total_bytes <= max_bytes {
            return Ok(vec![whole]);
        }
        let n_tensors = i32::try_from(whole.tensors.len()).map_err(|_| {
            GgufError::Write(format!(
                "{} tensors do not fit {SPLIT_TENSORS_COUNT} (an int32)",
                whole.tensors.len()
            ))
        })?;
        let with_split_keys = |mut md: Metadata| {
            // Placeholder values of the final types: the header size does not depend on them.
            md.push(SPLIT_NO, Value::U16(0));
            md.push(SPLIT_COUNT, Value::U16(0));
            md.push(SPLIT_TENSORS_COUNT, Value::I32(n_tensors));
            md
        };
        let first_md = with_split_keys(whole.metadata.clone());
        let mut rest_md = Metadata::default();
        if let Some(a) = whole.metadata.get(ALIGNMENT_KEY) {
            rest_md.push(ALIGNMENT_KEY, a.clone());
        }
        let rest_md = with_split_keys(rest_md);
        let header_base = |md: &Metadata| {
            let mut counter = CountingSink(0);
            write_preamble(&mut counter, whole.version, 0, md).map(|()| counter.0)
        };
        let io_err = |e: io::Error| GgufError::Write(e.to_string());
        let first_base = header_base(&first_md).map_err(io_err)?;
        let rest_base = header_base(&rest_md).map_err(io_err)?;
        let overflow = || GgufError::Write("a planned shard is larger than 2^64 bytes".into());

        // Greedy, in tensor order: `ranges` ends each finished shard; the open one starts at `start`.
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
        let (mut start, mut infos, mut data) = (0usize, 0u64, 0u64);
        for (i, t) in whole.tensors.iter().enumerate() {
            let base = if ranges.is_empty() {
                first_base
            } else {
                rest_base
            };
            let info = tensor_info_bytes(t);
            let padded = align_up(t.n_bytes, alignment).ok_or_else(overflow)?;
            let size_with = base
                .checked_add(infos)
                .and_then(|h| h.checked_add(info))
                .and_then(|h| align_up(h, alignment))
                .and_then(|h| h.checked_add(data))
                .and_then(|h| h.checked_add(padded))
                .ok_or_else(overflow)?;
            if i > start && size_with > max_bytes {
                ranges.push(start..i);
                (start, infos, data) = (i, 0, 0);
            }
            infos = infos.checked_add(info).ok_or_else(overflow)?;
            data = data.checked_add(padded).ok_or_else(overflow)?;
        }
        ranges.push(start..whole.tensors.len());
        if ranges.len() == 1 {
            return Ok(vec![whole]);
        }
        if ranges.len() as u64 > MAX_SPLITS {
            return Err(GgufError::Write(format!(
                "splitting into shards of at most {max_bytes} bytes needs {} shards; at most {MAX_SPLITS} are allowed",
                ranges.len()
            )));
        }
        let count = ranges.len() as u16;
        let shards = ranges
            .into_iter()
            .enumerate()
            .map(|(no, range)| {
                let mut md = if no == 0 {
                    first_md.clone()
                } else {
                    rest_md.clone()
                };
                md.push(SPLIT_NO, Value::U16(no as u16));
                md.push(SPLIT_COUNT, Value::U16(count));
                let tensors = whole.tensors[range].to_vec();
                Writer {
                    version: whole.version,
                    metadata: md,
                    names: tensors.iter().map(|t| t.name.clone()).collect(),
                    tensors,
                }
            })
            .collect();
        Ok(shards)
    }

    /// The paths [`Writer::write_files`] writes `n_shards` shards to for the output `path`: `path` itself for one
    /// shard; otherwise llama.cpp's `PREFIX-00001-of-0000N.gguf`, where PREFIX is `path` without a trailing
    /// `.gguf` (`OUT.gguf` -> `OUT-00001-of-00003.gguf`), or without its split suffix when `path` is itself
    /// named like a shard (`OUT-00001-of-00002.gguf` -> `OUT-00001-of-00003.gguf`).
    pub fn shard_paths(path: &Path, n_shards: usize) -> Result<Vec<PathBuf>> {
        match n_shards {
            0 => Err(GgufError::Write("no shards to write".into())),
            1 => Ok(vec![path.to_path_buf()]),
            n if n as u64 > MAX_SPLITS => Err(GgufError::Write(format!(
                "{n} shards; at most {MAX_SPLITS} are allowed"
            ))),
            n => {
                let prefix = shard_prefix(path)?;
                Ok((1..=n as u64)
                    .map(|no| split_path(&prefix, no, n as u64))
                    .collect())
            }
        }
    }

    /// Files beside `path` that belong to an output of the same name with another split (the single file, or
    /// `PREFIX-NNNNN-of-MMMMM.gguf` shards of another count), none of `written`: what an earlier `--split-max-size`
    /// left behind. A loader given one of them reads the old model, so the caller names them.
    pub fn stale_outputs(path: &Path, written: &[PathBuf]) -> Vec<PathBuf> {
        let (Ok(prefix), Some(dir)) = (shard_prefix(path), path.parent()) else {
            return Vec::new();
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        // The single output of this name: `path`, or `PREFIX.gguf` when `path` is named like a shard.
        let single = match split_prefix(path) {
            Some(_) => {
                let mut name = prefix.clone().into_os_string();
                name.push(".gguf");
                PathBuf::from(name)
            }
            None => path.to_path_buf(),
        };
        let prefix_name =
            |p: &Path| split_prefix(p).and_then(|q| q.file_name().map(|n| n.to_owned()));
        let Some(ours) = prefix.file_name().map(|n| n.to_owned()) else {
            return Vec::new();
        };
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut stale: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| dir.join(e.file_name())))
            .filter(|p| {
                let is_single = p.file_name() == single.file_name();
                let is_shard = prefix_name(p).as_ref() == Some(&ours);
                (is_single || is_shard) && !written.iter().any(|w| w.file_name() == p.file_name())
            })
            .collect();
        stale.sort();
        stale
    }

    /// The size of all shards together, as they would be written (for a dry run).
    pub fn planned_total_bytes(shards: &[Writer]) -> Result<u64> {
        shards.iter().try_fold(0u64, |sum, w| {
            sum.checked_add(w.plan()?.total_bytes).ok_or_else(|| {
                GgufError::Write("the planned files are larger than 2^64 bytes".into())
            })
        })
    }

    /// Writes `shards` (from [`Writer::split_by_size`]) to the paths of [`Writer::shard_paths`]: every shard
    /// through a temporary file in the same folder, all renamed into place only after ALL were written and
    /// synced. On any error every temporary file is removed and no output appears (should a rename itself fail,
    /// the shards already renamed are removed again and the outputs they replaced, kept aside until every rename
    /// succeeded, are put back, so no mix of old and new shards is left and no old output is lost). Existing outputs
    /// are refused unless `overwrite`. `fill(i, tensor, sink)` gets the tensor's index over all shards together
    /// (its index in the writer that was split) and must write exactly its bytes. Returns each shard's path and
    /// layout.
    pub fn write_files(
        shards: &[Writer],
        path: &Path,
        overwrite: bool,
        mut fill: impl FnMut(usize, &PlannedTensor, &mut dyn Write) -> io::Result<()>,
    ) -> Result<Vec<(PathBuf, Layout)>> {
        let paths = Writer::shard_paths(path, shards.len())?;
        check_shard_keys(shards)?;
        if !overwrite {
            if let Some(p) = paths.iter().find(|p| p.exists()) {
                return Err(GgufError::Write(format!(
                    "{} already exists (pass --overwrite to replace it)",
                    p.display()
                )));
            }
        }
        let temps: Vec<PathBuf> = paths.iter().map(|p| temp_path(p)).collect();
        let mut layouts = Vec::with_capacity(shards.len());
        let mut first_index = 0usize;
        for (shard, tmp) in shards.iter().zip(&temps) {
            let base = first_index;
            match shard.write_temp(tmp, false, |i, t, sink| fill(base + i, t, sink)) {
                Ok(layout) => layouts.push(layout),
                Err(e) => {
                    // This one and every one before it (the later ones were never created).
                    for t in &temps[..=layouts.len()] {
                        let _ = fs::remove_file(t);
                    }
                    return Err(e);
                }
            }
            first_index += shard.tensors.len();
        }
        // Existing outputs (with `overwrite`) are moved aside first and put back if any rename fails, so an old
        // output is never lost before the whole new one is in place.
        let mut backups: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut renamed = 0usize;
        let mut failure = None;
        for p in paths.iter().filter(|p| p.exists()) {
            let aside = backup_path(p);
            match fs::rename(p, &aside) {
                Ok(()) => backups.push((p.clone(), aside)),
                Err(e) => {
                    failure = Some(GgufError::io(p, e));
                    break;
                }
            }
        }
        if failure.is_none() {
            for (tmp, p) in temps.iter().zip(&paths) {
                if let Err(e) = fs::rename(tmp, p) {
                    failure = Some(GgufError::io(p, e));
                    break;
                }
                renamed += 1;
            }
        }
        if let Some(e) = failure {
            for done in &paths[..renamed] {
                let _ = fs::remove_file(done);
            }
            for t in &temps[renamed..] {
                let _ = fs::remove_file(t);
            }
            for (p, aside) in &backups {
                let _ = fs::rename(aside, p);
            }
            return Err(e);
        }
        for (_, aside) in &backups {
            let _ = fs::remove_file(aside);
        }
        // Make the renames durable too.
        crate::atomic::sync_parent(path);
        Ok(paths.into_iter().zip(layouts).collect())
    }

    fn write_header(&self, out: &mut dyn Write) -> io::Result<()> {
        let alignment = self.alignment().unwrap_or(DEFAULT_ALIGNMENT);
        write_preamble(out, self.version, self.tensors.len() as u64, &self.metadata)?;
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(out, &t.name)?;
            out.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                out.write_all(&d.to_le_bytes())?;
            }
            out.write_all(&t.ty.id().to_le_bytes())?;
            out.write_all(&offset.to_le_bytes())?;
            offset = align_up(offset.saturating_add(t.n_bytes), alignment).unwrap_or(u64::MAX);
        }
        Ok(())
    }
}

/// Magic, version, the two counts and the metadata: the header up to the tensor infos.
fn write_preamble(
    out: &mut dyn Write,
    version: u32,
    n_tensors: u64,
    metadata: &Metadata,
) -> io::Result<()> {
    out.write_all(&MAGIC)?;
    out.write_all(&version.to_le_bytes())?;
    out.write_all(&n_tensors.to_le_bytes())?;
    out.write_all(&(metadata.len() as u64).to_le_bytes())?;
    for (key, value) in metadata.iter() {
        write_str(out, key)?;
        out.write_all(&(value.value_type() as u32).to_le_bytes())?;
        write_value(out, value)?;
    }
    Ok(())
}

/// Bytes of one tensor info record: name, dimension count, dimensions, type, offset.
fn tensor_info_bytes(t: &PlannedTensor) -> u64 {
    8 + t.name.len() as u64 + 4 + 8 * t.dims.len() as u64 + 4 + 8
}

/// Shards to be written together must say, in order, that they are shards 1..n of n (one shard needs no keys).
fn check_shard_keys(shards: &[Writer]) -> Result<()> {
    let n = shards.len() as u64;
    if n <= 1 {
        return Ok(());
    }
    let total: u64 = shards.iter().map(|s| s.tensors.len() as u64).sum();
    for (i, shard) in shards.iter().enumerate() {
        let md = &shard.metadata;
        let bad = |why: String| {
            GgufError::Write(format!(
                "shard {} of {n} is not a shard of this split ({why}); split the writer with split_by_size",
                i + 1
            ))
        };
        let no = md.uint(SPLIT_NO).map_err(|e| bad(e.to_string()))?;
        let count = md.uint(SPLIT_COUNT).map_err(|e| bad(e.to_string()))?;
        let tensors = md
            .uint(SPLIT_TENSORS_COUNT)
            .map_err(|e| bad(e.to_string()))?;
        if no != i as u64 || count != n {
            return Err(bad(format!(
                "its {SPLIT_NO} is {no} and {SPLIT_COUNT} {count}"
            )));
        }
        if tensors != total {
            return Err(bad(format!(
                "its {SPLIT_TENSORS_COUNT} is {tensors}, the shards hold {total} tensors"
            )));
        }
    }
    Ok(())
}

/// The prefix of the shards written for the output `path` (see [`Writer::shard_paths`]): `path` without its
/// split suffix when it is named like a shard, else without a trailing `.gguf`.
fn shard_prefix(path: &Path) -> Result<PathBuf> {
    if let Some(prefix) = split_prefix(path) {
        return Ok(prefix);
    }
    let name = path.file_name().ok_or_else(|| {
        GgufError::Write(format!(
            "{} is not a file name to write shards next to",
            path.display()
        ))
    })?;
    let name = name.to_string_lossy();
    Ok(match name.strip_suffix(".gguf").filter(|s| !s.is_empty()) {
        Some(stem) => path.with_file_name(stem),
        None => path.to_path_buf(),
    })
}

/// A hidden file beside `path` for this process: `.NAME.TAG-PID`.
fn beside(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Where a file is written before it is renamed into place.
/// The unit of [`Writer::write_file_sparse`]'s holes: every aligned block of this many bytes that is all zeros
/// is skipped (a hole where the filesystem has them); other blocks are written.
pub const HOLE_BLOCK: usize = 1 << 16;

/// The output file of [`Writer::write_temp`]: with `sparse`, each [`HOLE_BLOCK`]-aligned block of zeros is skipped
/// (the skipped bytes become a seek before the next real write, or the file's length at the end).
struct HoleWriter {
    file: fs::File,
    sparse: bool,
    /// Bytes written or skipped so far: the logical position.
    pos: u64,
    /// Zero bytes skipped since the last real write.
    pending_hole: u64,
}

impl HoleWriter {
    fn new(file: fs::File, sparse: bool) -> HoleWriter {
        HoleWriter {
            file,
            sparse,
            pos: 0,
            pending_hole: 0,
        }
    }

    fn settle_hole(&mut self) -> io::Result<()> {
        if self.pending_hole > 0 {
            self.file.seek(SeekFrom::Start(self.pos))?;
            self.pending_hole = 0;
        }
        Ok(())
    }

    /// The file, with any trailing hole made part of it.
    fn finish(mut self) -> io::Result<fs::File> {
        if self.pending_hole > 0 {
            self.file.set_len(self.pos)?;
            self.settle_hole()?;
        }
        Ok(self.file)
    }
}

impl Write for HoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.sparse {
            let n = self.file.write(buf)?;
            self.pos += n as u64;
            return Ok(n);
        }
        let mut rest = buf;
        while !rest.is_empty() {
            // Up to the next block boundary of the file.
            let into_block = (self.pos % HOLE_BLOCK as u64) as usize;
            let len = (HOLE_BLOCK - into_block).min(rest.len());
            let (piece, tail) = rest.split_at(len);
            // Only whole blocks become holes: a partly written block is allocated anyway.
            if len == HOLE_BLOCK && piece.iter().all(|&b| b == 0) {
                self.pending_hole += len as u64;
            } else {
                // `pos` already counts a pending hole: the piece goes right after it.
                self.settle_hole()?;
                self.file.write_all(piece)?;
            }
            self.pos += len as u64;
            rest = tail;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn temp_path(path: &Path) -> PathBuf {
    beside(path, "tmp")
}

/// Where [`Writer::write_files`] keeps an existing output while the new one is renamed into place.
fn backup_path(path: &Path) -> PathBuf {
    beside(path, "old")
}

fn write_str(out: &mut dyn Write, s: &str) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s.as_bytes())
}

fn write_value(out: &mut dyn Write, value: &Value) -> io::Result<()> {
    match value {
        Value::U8(v) => out.write_all(&v.to_le_bytes()),
        Value::I8(v) => out.write_all(&v.to_le_bytes()),
        Value::U16(v) => out.write_all(&v.to_le_bytes()),
        Value::I16(v) => out.write_all(&v.to_le_bytes()),
        Value::U32(v) => out.write_all(&v.to_le_bytes()),
        Value::I32(v) => out.write_all(&v.to_le_bytes()),
        Value::F32(v) => out.write_all(&v.to_le_bytes()),
        Value::Bool(v) => out.write_all(&[u8::from(*v)]),
        Value::String(s) => write_str(out, s),
        Value::U64(v) => out.write_all(&v.to_le_bytes()),
        Value::I64(v) => out.write_all(&v.to_le_bytes()),
        Value::F64(v) => out.write_all(&v.to_le_bytes()),
        Value::Array(a) => write_array(out, a),
    }
}

fn write_array(out: &mut dyn Write, a: &Array) -> io::Result<()> {
    out.write_all(&(a.elem_type() as u32).to_le_bytes())?;
    out.write_all(&(a.len() as u64).to_le_bytes())?;
    macro_rules! le {
        ($v:expr) => {{
            for x in $v {
                out.write_all(&x.to_le_bytes())?;
            }
            Ok(())
        }};
    }
    match a {
        Array::U8(v) => out.write_all(v),
        Array::I8(v) => le!(v),
        Array::U16(v) => le!(v),
        Array::I16(v) => le!(v),
        Array::U32(v) => le!(v),
        Array::I32(v) => le!(v),
        Array::F32(v) => le!(v),
        Array::U64(v) => le!(v),
        Array::I64(v) => le!(v),
        Array::F64(v) => le!(v),
        Array::Bool(v) => le!(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => v.iter().try_for_each(|s| write_str(out, s)),
        Array::Array(v) => v.iter().try_for_each(|inner| write_array(out, inner)),
    }
}

fn pad_to<W: Write>(out: &mut CountingWriter<W>, target: u64) -> io::Result<()> {
    const ZEROS: [u8; 64] = [0; 64];
    while out.count < target {
        let n = (target - out.count).min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..n])?;
    }
    Ok(())
}

/// Counts bytes without storing them (for planning).
struct CountingSink(u64);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Passes writes through and counts them.
struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
