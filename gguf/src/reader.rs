//! Parses a GGUF header (metadata and tensor infos) from a byte slice, treating every number in it as hostile.

use std::collections::HashMap;

use crate::error::{GgufError, Result, Section};
use crate::metadata::Metadata;
use crate::types::GgmlType;
use crate::value::{Array, Value, ValueType};

/// The GGUF magic, "GGUF" in file order.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The key that overrides the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Deepest array nesting accepted (the reference writer and real files use one level at most).
pub const MAX_NESTING: u32 = 8;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: u32 = 4;
/// Byte offsets of the two counts in the header.
const N_TENSORS_OFFSET: u64 = 8;
const N_KV_OFFSET: u64 = 16;

/// Where one tensor lives and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Shape in ggml order (`ne0` first, the contiguous dimension).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Bytes of data (derived from type and shape).
    pub n_bytes: u64,
    /// Byte offset of this tensor's info record in the file (for error messages).
    pub info_offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        // Checked to fit i64 when the file was parsed.
        self.dims.iter().product()
    }
}

/// Everything before the tensor data: version, metadata, tensor infos, and where the data begins.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub alignment: u64,
    pub metadata: Metadata,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
    /// Length of the parsed bytes (the file size).
    pub file_len: u64,
}

impl Header {
    /// Parses and validates a whole GGUF file held in `bytes` (usually a memory map). Copies no tensor data.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let mut cur = Cursor { buf: bytes, pos: 0 };
        let version = read_preamble(&mut cur)?;
        let n_tensors = cur.u64(Section::Header, "tensor count")?;
        let n_kv = cur.u64(Section::Header, "metadata count")?;
        // Each key/value pair needs at least a u64 key length, a u32 type and a one-byte value.
        cur.check_count("metadata count", N_KV_OFFSET, n_kv, 8 + 4 + 1)?;
        let metadata = read_metadata(&mut cur, n_kv)?;
        let alignment = alignment_of(&metadata)?;
        // Each tensor info needs at least a u64 name length, a u32 dim count, a u32 type and a u64 offset.
        cur.check_count("tensor count", N_TENSORS_OFFSET, n_tensors, 8 + 4 + 4 + 8)?;
        let (tensors, index) = read_tensor_infos(&mut cur, n_tensors)?;
        let file_len = bytes.len() as u64;
        let data_offset = align_up(cur.pos as u64, alignment).ok_or(GgufError::CountTooLarge {
            what: "data section offset",
            offset: cur.pos as u64,
            count: cur.pos as u64,
            max: u64::MAX - alignment,
        })?;
        check_tensor_data(&tensors, alignment, data_offset, file_len)?;
        Ok(Header {
            version,
            alignment,
            metadata,
            tensors,
            index,
            data_offset,
            file_len,
        })
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
}

/// Rounds `x` up to a multiple of `align` (a power of two), or `None` on overflow.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

fn read_preamble(cur: &mut Cursor) -> Result<u32> {
    let magic = cur.bytes(4, Section::Header, "magic")?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic {
            got: magic.to_vec(),
        });
    }
    let version = cur.u32(Section::Header, "version")?;
    match version {
        2 | 3 => Ok(version),
        1 => Err(GgufError::UnsupportedVersion {
            got: 1,
            hint: "; version 1 files predate 2023-10: convert the model again",
        }),
        v if matches!(v.swap_bytes(), 2 | 3) => Err(GgufError::UnsupportedVersion {
            got: v,
            hint: "; this looks like a big-endian GGUF, and ferrite reads little-endian files",
        }),
        v => Err(GgufError::UnsupportedVersion { got: v, hint: "" }),
    }
}

fn read_metadata(cur: &mut Cursor, n_kv: u64) -> Result<Metadata> {
    let mut metadata = Metadata::default();
    for _ in 0..n_kv {
        let key_offset = cur.pos as u64;
        let key = cur.string(Section::MetadataKey, "metadata key")?;
        let ty = cur.value_type(Section::MetadataValue)?;
        let value = read_value(cur, ty, 0)?;
        if metadata.get(&key).is_some() {
            return Err(GgufError::DuplicateKey {
                key,
                offset: key_offset,
            });
        }
        metadata.push(key, value);
    }
    Ok(metadata)
}

fn alignment_of(metadata: &Metadata) -> Result<u64> {
    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => return Ok(DEFAULT_ALIGNMENT),
        Some(Value::U32(a)) => u64::from(*a),
        Some(other) => {
            return Err(GgufError::wrong_type(
                ALIGNMENT_KEY,
                ValueType::U32,
                other.value_type(),
            ))
        }
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::BadAlignment { got: alignment });
    }
    Ok(alignment)
}

fn read_value(cur: &mut Cursor, ty: ValueType, depth: u32) -> Result<Value> {
    const S: Section = Section::MetadataValue;
    Ok(match ty {
        ValueType::U8 => Value::U8(cur.u8(S)?),
        ValueType::I8 => Value::I8(cur.u8(S)? as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(cur.array(S, "u16 value")?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(cur.array(S, "i16 value")?)),
        ValueType::U32 => Value::U32(cur.u32(S, "u32 value")?),
        ValueType::I32 => Value::I32(i32::from_le_bytes(cur.array(S, "i32 value")?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(cur.array(S, "f32 value")?)),
        ValueType::Bool => Value::Bool(cur.bool()?),
        ValueType::String => Value::String(cur.string(S, "string value")?),
        ValueType::U64 => Value::U64(cur.u64(S, "u64 value")?),
        ValueType::I64 => Value::I64(i64::from_le_bytes(cur.array(S, "i64 value")?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(cur.array(S, "f64 value")?)),
        ValueType::Array => Value::Array(read_array(cur, depth)?),
    })
}

fn read_array(cur: &mut Cursor, depth: u32) -> Result<Array> {
    const S: Section = Section::MetadataValue;
    let start = cur.pos as u64;
    if depth >= MAX_NESTING {
        return Err(GgufError::NestingTooDeep {
            offset: start,
            max: MAX_NESTING,
        });
    }
    let elem = cur.value_type(S)?;
    let n = cur.u64(S, "array length")?;
    cur.check_count("array length", cur.pos as u64 - 8, n, elem.min_size())?;
    // `n` now fits in the remaining bytes, so every allocation below is bounded by the file size.
    let n = n as usize;
    fn fixed<T, const W: usize>(cur: &mut Cursor, n: usize, f: fn([u8; W]) -> T) -> Result<Vec<T>> {
        let raw = cur.bytes(n * W, S, "array elements")?;
        Ok(raw
            .chunks_exact(W)
            .map(|c| f(c.try_into().unwrap_or([0; W])))
            .collect())
    }
    Ok(match elem {
        ValueType::U8 => Array::U8(fixed(cur, n, u8::from_le_bytes)?),
        ValueType::I8 => Array::I8(fixed(cur, n, i8::from_le_bytes)?),
        ValueType::U16 => Array::U16(fixed(cur, n, u16::from_le_bytes)?),
        ValueType::I16 => Array::I16(fixed(cur, n, i16::from_le_bytes)?),
        ValueType::U32 => Array::U32(fixed(cur, n, u32::from_le_bytes)?),
        ValueType::I32 => Array::I32(fixed(cur, n, i32::from_le_bytes)?),
        ValueType::F32 => Array::F32(fixed(cur, n, f32::from_le_bytes)?),
        ValueType::U64 => Array::U64(fixed(cur, n, u64::from_le_bytes)?),
        ValueType::I64 => Array::I64(fixed(cur, n, i64::from_le_bytes)?),
        ValueType::F64 => Array::F64(fixed(cur, n, f64::from_le_bytes)?),
        ValueType::Bool => Array::Bool((0..n).map(|_| cur.bool()).collect::<Result<_>>()?),
        ValueType::String => Array::String(
            (0..n)
                .map(|_| cur.string(S, "string in array"))
                .collect::<Result<_>>()?,
        ),
        ValueType::Array => Array::Array(
            (0..n)
                .map(|_| read_array(cur, depth + 1))
                .collect::<Result<_>>()?,
        ),
    })
}

type TensorList = (Vec<TensorInfo>, HashMap<String, usize>);

fn read_tensor_infos(cur: &mut Cursor, n_tensors: u64) -> Result<TensorList> {
    const S: Section = Section::TensorInfo;
    // `n_tensors` was checked against the bytes left, so these allocations are bounded by the file size.
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut index = HashMap::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let info_offset = cur.pos as u64;
        let name = cur.string(S, "tensor name")?;
        let n_dims = cur.u32(S, "dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(GgufError::BadDimCount {
                name,
                offset: info_offset,
                got: n_dims,
            });
        }
        let dims = (0..n_dims)
            .map(|_| cur.u64(S, "dimension"))
            .collect::<Result<Vec<u64>>>()?;
        let type_id = cur.u32(S, "tensor type")?;
        let offset = cur.u64(S, "tensor data offset")?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.clone(),
            offset: info_offset,
            id: type_id,
        })?;
        let n_bytes = tensor_bytes(&name, info_offset, &dims, ty)?;
        if index.insert(name.clone(), tensors.len()).is_some() {
            return Err(GgufError::DuplicateTensor {
                name,
                offset: info_offset,
            });
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            n_bytes,
            info_offset,
        });
    }
    Ok((tensors, index))
}

/// Bytes of a tensor, checking what ggml checks: each dimension and the element count fit an i64, and rows are whole blocks.
fn tensor_bytes(name: &str, offset: u64, dims: &[u64], ty: GgmlType) -> Result<u64> {
    let bad = |why: String| GgufError::BadShape {
        name: name.to_string(),
        offset,
        dims: dims.to_vec(),
        why,
    };
    let fits_i64 = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .is_some_and(|count| count <= i64::MAX as u64);
    if !fits_i64 {
        return Err(bad(
            "the element count overflows a 64-bit signed integer".into()
        ));
    }
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % ty.block_size() != 0 {
        return Err(bad(format!(
            "a row of {ne0} elements is not a whole number of {ty} blocks ({} elements each)",
            ty.block_size()
        )));
    }
    ty.tensor_bytes(dims)
        .ok_or_else(|| bad("the byte size overflows a 64-bit integer".into()))
}

fn check_tensor_data(
    tensors: &[TensorInfo],
    alignment: u64,
    data_offset: u64,
    file_len: u64,
) -> Result<()> {
    for t in tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                name: t.name.clone(),
                data_offset: t.offset,
                alignment,
            });
        }
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes))
            .filter(|&end| end <= file_len);
        if end.is_none() {
            return Err(GgufError::DataPastEnd {
                name: t.name.clone(),
                end: data_offset
                    .saturating_add(t.offset)
                    .saturating_add(t.n_bytes),
                file_len,
            });
        }
    }
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.offset + a.n_bytes > b.offset {
            return Err(GgufError::OverlappingTensors {
                first: a.name.clone(),
                second: b.name.clone(),
                first_end: a.offset + a.n_bytes,
                second_start: b.offset,
            });
        }
    }
    Ok(())
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn bytes(&mut self, n: usize, section: Section, what: &str) -> Result<&'a [u8]> {
        if (n as u64) > self.remaining() {
            return Err(GgufError::Truncated {
                section,
                offset: self.pos as u64,
                what: what.to_string(),
                needed: n as u64,
                available: self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, section: Section, what: &str) -> Result<[u8; N]> {
        let b = self.bytes(N, section, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u8(&mut self, section: Section) -> Result<u8> {
        Ok(self.array::<1>(section, "u8 value")?[0])
    }

    fn u32(&mut self, section: Section, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(section, what)?))
    }

    fn u64(&mut self, section: Section, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(section, what)?))
    }

    /// A bool byte; like ggml, any non-zero byte is true.
    fn bool(&mut self) -> Result<bool> {
        Ok(self.u8(Section::MetadataValue)? != 0)
    }

    fn value_type(&mut self, section: Section) -> Result<ValueType> {
        let offset = self.pos as u64;
        let id = self.u32(section, "value type")?;
        ValueType::from_id(id).ok_or(GgufError::UnknownValueType { id, offset })
    }

    /// A u64 length followed by that many UTF-8 bytes.
    fn string(&mut self, section: Section, what: &'static str) -> Result<String> {
        let len_at = self.pos as u64;
        let len = self.u64(section, what)?;
        if len > self.remaining() {
            return Err(GgufError::Truncated {
                section,
                offset: self.pos as u64,
                what: format!("{what} of {len} bytes (length at byte {len_at})"),
                needed: len,
                available: self.remaining(),
            });
        }
        let at = self.pos as u64;
        let raw = self.bytes(len as usize, section, what)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| GgufError::BadUtf8 { what, offset: at })
    }

    /// Refuses a count (read at byte `at`) when `count` items of at least `min_size` bytes cannot fit in the rest of the file.
    fn check_count(&self, what: &'static str, at: u64, count: u64, min_size: u64) -> Result<()> {
        let max = self.remaining() / min_size.max(1);
        if count > max {
            return Err(GgufError::CountTooLarge {
                what,
                offset: at,
                count,
                max,
            });
        }
        Ok(())
    }
}
