//! The GGUF writer: plans the whole layout first (a dry run gives every offset and the file size), then streams
//! tensor data into a temporary file that is renamed into place only when complete.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{GgufError, Result};
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
        if !overwrite && path.exists() {
            return Err(GgufError::Write(format!(
                "{} already exists (pass --overwrite to replace it)",
                path.display()
            )));
        }
        let tmp = temp_path(path);
        let result = self.write_temp(&tmp, fill);
        match result {
            Ok(layout) => {
                fs::rename(&tmp, path).map_err(|e| {
                    let _ = fs::remove_file(&tmp);
                    GgufError::io(path, e)
                })?;
                Ok(layout)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn write_temp(
        &self,
        tmp: &Path,
        fill: impl FnMut(usize, &PlannedTensor, &mut dyn Write) -> io::Result<()>,
    ) -> Result<Layout> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(|e| GgufError::io(tmp, e))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        let layout = self.write(&mut out, fill).map_err(|e| match e {
            GgufError::Write(msg) => GgufError::Write(format!("{}: {msg}", tmp.display())),
            GgufError::Io { err, .. } => GgufError::io(tmp, err),
            other => other,
        })?;
        let file = out
            .into_inner()
            .map_err(|e| GgufError::io(tmp, e.into_error()))?;
        file.sync_all().map_err(|e| GgufError::io(tmp, e))?;
        Ok(layout)
    }

    fn write_header(&self, out: &mut dyn Write) -> io::Result<()> {
        let alignment = self.alignment().unwrap_or(DEFAULT_ALIGNMENT);
        out.write_all(&MAGIC)?;
        out.write_all(&self.version.to_le_bytes())?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        out.write_all(&(self.metadata.len() as u64).to_le_bytes())?;
        for (key, value) in self.metadata.iter() {
            write_str(out, key)?;
            out.write_all(&(value.value_type() as u32).to_le_bytes())?;
            write_value(out, value)?;
        }
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

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
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
