//! ggml's own GGUF reader (`gguf_init_from_file`, metadata only) turned into a plain Rust summary, so tests can check
//! that files ferrite writes are read by ggml exactly as ferrite reads them.

use std::ffi::CString;
use std::path::Path;
use std::ptr::NonNull;

use ferrite::ggml::capture_log;
use llama_cpp_sys_2 as sys;

/// ggml's own GGUF reader rejected a file.
#[derive(Debug, thiserror::Error)]
#[error("ggml rejected GGUF file {path}: {detail}")]
pub struct GgufRejected {
    pub path: String,
    pub detail: String,
}

/// A C string ggml owns as an owned Rust string (lossy), empty for NULL.
fn cstr_lossy(ptr: *const std::os::raw::c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: callers pass pointers ggml documents as NUL-terminated strings that outlive this call.
    unsafe { std::ffi::CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// A metadata value as ggml read it.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// `elem_type` is the GGUF type id of the elements (arrays do not nest in GGUF as ggml reads it).
    Array {
        elem_type: u32,
        items: Vec<GgufValue>,
    },
}

/// One key-value pair: key, GGUF type id (`GGUF_TYPE_ARRAY` = 9 for arrays) and value.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufKv {
    pub key: String,
    pub type_id: u32,
    pub value: GgufValue,
}

/// One tensor info: name, ggml type id, extents (ggml order, padded with 1), offset from the data section, bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub type_id: u32,
    pub ne: [i64; 4],
    pub offset: usize,
    pub size: usize,
}

/// What ggml read from a GGUF file's header, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufSummary {
    pub version: u32,
    pub alignment: usize,
    pub data_offset: usize,
    pub kvs: Vec<GgufKv>,
    pub tensors: Vec<GgufTensorInfo>,
}

/// A gguf_context freed on drop.
struct GgufCtx(NonNull<sys::gguf_context>);

impl Drop for GgufCtx {
    fn drop(&mut self) {
        // SAFETY: created by gguf_init_from_file and freed once.
        unsafe { sys::gguf_free(self.0.as_ptr()) }
    }
}

/// Reads `path` with ggml's GGUF parser (metadata only, no tensor data) or returns the rejection as an error.
pub fn read_gguf_with_ggml(path: &Path) -> Result<GgufSummary, GgufRejected> {
    let shown = path.display().to_string();
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| GgufRejected {
        path: shown.clone(),
        detail: "path contains NUL".into(),
    })?;
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: std::ptr::null_mut(),
    };
    let (raw, log) = capture_log(|| {
        // SAFETY: a NUL-terminated path; with ctx = NULL ggml builds no tensor context; returns NULL on any failure.
        unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) }
    });
    let ctx = GgufCtx(NonNull::new(raw).ok_or_else(|| GgufRejected {
        path: shown,
        detail: if log.is_empty() {
            "gguf_init_from_file failed".into()
        } else {
            log.replace('\n', "; ")
        },
    })?);
    let g = ctx.0.as_ptr();
    // SAFETY: `g` is a valid gguf context for the rest of this function; the getters read its parsed header.
    let (version, alignment, data_offset, n_kv, n_tensors) = unsafe {
        (
            sys::gguf_get_version(g),
            sys::gguf_get_alignment(g),
            sys::gguf_get_data_offset(g),
            sys::gguf_get_n_kv(g),
            sys::gguf_get_n_tensors(g),
        )
    };
    let kvs = (0..n_kv).map(|i| read_kv(g, i)).collect();
    let tensors = (0..n_tensors).map(|i| read_tensor(g, i)).collect();
    Ok(GgufSummary {
        version,
        alignment,
        data_offset,
        kvs,
        tensors,
    })
}

fn read_kv(g: *mut sys::gguf_context, i: i64) -> GgufKv {
    // SAFETY: `i` < gguf_get_n_kv; the key is a NUL-terminated string owned by the context.
    let key = cstr_lossy(unsafe { sys::gguf_get_key(g, i) });
    // SAFETY: as above.
    let type_id = unsafe { sys::gguf_get_kv_type(g, i) };
    let value = if type_id == sys::GGUF_TYPE_ARRAY {
        read_array(g, i)
    } else if type_id == sys::GGUF_TYPE_STRING {
        // SAFETY: a string-typed key; ggml returns its NUL-terminated value.
        GgufValue::Str(cstr_lossy(unsafe { sys::gguf_get_val_str(g, i) }))
    } else {
        // SAFETY: a non-string scalar: ggml returns a pointer to its bytes (size of the type), valid while `g` is.
        let data = unsafe { sys::gguf_get_val_data(g, i) } as *const u8;
        // SAFETY: `data` points to one value of `type_id`.
        unsafe { read_scalar(type_id, data) }
    };
    GgufKv {
        key,
        type_id,
        value,
    }
}

fn read_array(g: *mut sys::gguf_context, i: i64) -> GgufValue {
    // SAFETY: `i` is an array key of the live context.
    let (elem_type, n) = unsafe { (sys::gguf_get_arr_type(g, i), sys::gguf_get_arr_n(g, i)) };
    let items = if elem_type == sys::GGUF_TYPE_STRING {
        (0..n)
            // SAFETY: a string array and `j` < its length.
            .map(|j| GgufValue::Str(cstr_lossy(unsafe { sys::gguf_get_arr_str(g, i, j) })))
            .collect()
    } else {
        let size = scalar_size(elem_type);
        // SAFETY: a non-string array: ggml returns its packed elements, n * size bytes, valid while `g` is.
        let data = unsafe { sys::gguf_get_arr_data(g, i) } as *const u8;
        (0..n)
            // SAFETY: element `j` < n lies inside the array's bytes.
            .map(|j| unsafe { read_scalar(elem_type, data.add(j * size)) })
            .collect()
    };
    GgufValue::Array { elem_type, items }
}

fn scalar_size(type_id: u32) -> usize {
    match type_id {
        sys::GGUF_TYPE_UINT8 | sys::GGUF_TYPE_INT8 | sys::GGUF_TYPE_BOOL => 1,
        sys::GGUF_TYPE_UINT16 | sys::GGUF_TYPE_INT16 => 2,
        sys::GGUF_TYPE_UINT32 | sys::GGUF_TYPE_INT32 | sys::GGUF_TYPE_FLOAT32 => 4,
        _ => 8,
    }
}

/// # Safety
/// `p` must point to one readable value of GGUF scalar type `type_id` (not a string or array).
unsafe fn read_scalar(type_id: u32, p: *const u8) -> GgufValue {
    // SAFETY (whole body): the caller guarantees `p` holds a value of this type; unaligned reads need no alignment,
    // and bools are read as bytes so any byte value is defined.
    unsafe {
        match type_id {
            sys::GGUF_TYPE_UINT8 => GgufValue::U8(p.read()),
            sys::GGUF_TYPE_INT8 => GgufValue::I8(p.cast::<i8>().read()),
            sys::GGUF_TYPE_BOOL => GgufValue::Bool(p.read() != 0),
            sys::GGUF_TYPE_UINT16 => GgufValue::U16(p.cast::<u16>().read_unaligned()),
            sys::GGUF_TYPE_INT16 => GgufValue::I16(p.cast::<i16>().read_unaligned()),
            sys::GGUF_TYPE_UINT32 => GgufValue::U32(p.cast::<u32>().read_unaligned()),
            sys::GGUF_TYPE_INT32 => GgufValue::I32(p.cast::<i32>().read_unaligned()),
            sys::GGUF_TYPE_FLOAT32 => GgufValue::F32(p.cast::<f32>().read_unaligned()),
            sys::GGUF_TYPE_UINT64 => GgufValue::U64(p.cast::<u64>().read_unaligned()),
            sys::GGUF_TYPE_INT64 => GgufValue::I64(p.cast::<i64>().read_unaligned()),
            _ => GgufValue::F64(p.cast::<f64>().read_unaligned()),
        }
    }
}

fn read_tensor(g: *mut sys::gguf_context, i: i64) -> GgufTensorInfo {
    // SAFETY: `i` < gguf_get_n_tensors; name is NUL-terminated, ne points to GGML_MAX_DIMS (4) values, all owned by
    // the live context.
    unsafe {
        let ne_ptr = sys::gguf_get_tensor_ne(g, i);
        GgufTensorInfo {
            name: cstr_lossy(sys::gguf_get_tensor_name(g, i)),
            type_id: sys::gguf_get_tensor_type(g, i),
            ne: [*ne_ptr, *ne_ptr.add(1), *ne_ptr.add(2), *ne_ptr.add(3)],
            offset: sys::gguf_get_tensor_offset(g, i),
            size: sys::gguf_get_tensor_size(g, i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal GGUF v3 file written by hand: 2 keys, 1 tensor.
    fn tiny_gguf() -> Vec<u8> {
        let mut b = Vec::new();
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes()); // tensors
        b.extend(2u64.to_le_bytes()); // kvs
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "test");
        s(&mut b, "test.list");
        b.extend(9u32.to_le_bytes());
        b.extend(5u32.to_le_bytes()); // int32 elements
        b.extend(2u64.to_le_bytes());
        b.extend((-7i32).to_le_bytes());
        b.extend(9i32.to_le_bytes());
        s(&mut b, "w");
        b.extend(2u32.to_le_bytes()); // n_dims
        b.extend(4u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(0u64.to_le_bytes()); // offset
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend([0u8; 32]);
        b
    }

    #[test]
    fn reads_a_handmade_file_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.gguf");
        std::fs::write(&good, tiny_gguf()).unwrap();
        let s = read_gguf_with_ggml(&good).unwrap();
        assert_eq!((s.version, s.alignment), (3, 32));
        assert_eq!(s.kvs[0].value, GgufValue::Str("test".into()));
        assert_eq!(
            s.kvs[1].value,
            GgufValue::Array {
                elem_type: sys::GGUF_TYPE_INT32,
                items: vec![GgufValue::I32(-7), GgufValue::I32(9)]
            }
        );
        assert_eq!(s.tensors[0].ne, [4, 2, 1, 1]);
        assert_eq!((s.tensors[0].type_id, s.tensors[0].size), (0, 32));
        assert_eq!(s.data_offset % 32, 0);

        let bad = dir.path().join("bad.gguf");
        let mut bytes = tiny_gguf();
        bytes.truncate(40);
        std::fs::write(&bad, bytes).unwrap();
        let err = read_gguf_with_ggml(&bad).unwrap_err();
        assert!(
            err.to_string().contains("exceeds remaining file size"),
            "{err}"
        );
        assert!(read_gguf_with_ggml(&dir.path().join("missing.gguf")).is_err());
    }
}
