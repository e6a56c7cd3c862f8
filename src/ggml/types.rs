//! Mapping between `gguf::GgmlType` and ggml's `enum ggml_type`, and ggml's own size queries (block, type, row).

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

use super::error::{GgmlError, Result};

/// The raw ggml type id of `ty` (the same number in GGUF files and in ggml).
pub fn to_ggml(ty: GgmlType) -> sys::ggml_type {
    ty.id()
}

/// The `GgmlType` of a raw ggml type id, or an error for ids ferrite does not know.
pub fn from_ggml(id: u32) -> Result<GgmlType> {
    GgmlType::from_id(id).ok_or(GgmlError::UnknownType { id })
}

/// Number of type ids in the pinned ggml (`GGML_TYPE_COUNT`); some ids below it are removed types.
pub const TYPE_COUNT: u32 = sys::GGML_TYPE_COUNT;

/// ggml's elements per block for `ty` (`ggml_blck_size`).
pub fn block_size(ty: GgmlType) -> i64 {
    // SAFETY: `to_ggml` yields an id below GGML_TYPE_COUNT; ggml_blck_size only reads its static type table.
    unsafe { sys::ggml_blck_size(to_ggml(ty)) }
}

/// ggml's bytes per block for `ty` (`ggml_type_size`).
pub fn type_size(ty: GgmlType) -> usize {
    // SAFETY: as in `block_size`: a valid id, a read of a static table.
    unsafe { sys::ggml_type_size(to_ggml(ty)) }
}

/// ggml's name for `ty` (`ggml_type_name`).
pub fn type_name(ty: GgmlType) -> String {
    // SAFETY: a valid id; ggml_type_name returns a pointer to a static NUL-terminated string (or NULL).
    let ptr = unsafe { sys::ggml_type_name(to_ggml(ty)) };
    cstr_lossy(ptr)
}

/// Bytes of a row of `n` elements of `ty` (`ggml_row_size`), or an error when `n` is not a whole number of blocks
/// or the size overflows.
pub fn row_size(ty: GgmlType, n: i64) -> Result<usize> {
    let blck = block_size(ty);
    let bad = |detail: String| GgmlError::Op {
        op: "row_size",
        detail,
    };
    if n < 0 || blck <= 0 || n % blck != 0 {
        return Err(bad(format!(
            "{n} elements is not a whole number of {} blocks of {blck}",
            ty.name()
        )));
    }
    let blocks = usize::try_from(n / blck).map_err(|_| bad(format!("{n} elements overflow")))?;
    blocks.checked_mul(type_size(ty)).ok_or_else(|| {
        bad(format!(
            "a row of {n} {} elements overflows usize",
            ty.name()
        ))
    })
}

/// The type ggml's CPU backend converts the second `mul_mat` operand to before the dot product with weights of
/// type `ty` (`vec_dot_type` in ggml-cpu's type traits): e.g. Q8_0 for Q8_0 and MXFP4, Q8_K for the K-quants.
pub fn cpu_vec_dot_type(ty: GgmlType) -> Result<GgmlType> {
    // SAFETY: a valid id; ggml_get_type_traits_cpu returns a pointer into a static table of GGML_TYPE_COUNT entries.
    let traits = unsafe { sys::ggml_get_type_traits_cpu(to_ggml(ty)) };
    if traits.is_null() {
        return Err(GgmlError::UnknownType { id: ty.id() });
    }
    // SAFETY: non-null pointer to a static, initialized ggml_type_traits_cpu.
    let id = unsafe { (*traits).vec_dot_type };
    from_ggml(id)
}

/// Whether ggml converts rows of `ty` to f32 (`to_float` in its type traits): what the CPU's `get_rows` calls for a
/// block type. Q8_1 has none (it exists only as the other side of a dot product): `get_rows` would call NULL.
pub fn has_to_float(ty: GgmlType) -> bool {
    to_float_fn(ty).is_some()
}

/// ggml's row converter from `ty` to f32 (`to_float` in its type traits), if it has one.
pub(crate) fn to_float_fn(ty: GgmlType) -> sys::ggml_to_float_t {
    // SAFETY: a valid id; ggml_get_type_traits returns a pointer into a static table.
    let traits = unsafe { sys::ggml_get_type_traits(to_ggml(ty)) };
    if traits.is_null() {
        return None;
    }
    // SAFETY: non-null pointer to a static, initialized ggml_type_traits.
    unsafe { (*traits).to_float }
}

/// Copies a C string owned by ggml into a `String` (lossy UTF-8); NULL gives "".
pub(crate) fn cstr_lossy(ptr: *const std::os::raw::c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: callers pass pointers ggml documents as NUL-terminated strings that outlive this call.
    unsafe { std::ffi::CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Block sizes and bytes per block from ggml-common.h (and ggml.c's type_traits for the removed ids), written
    /// independently of both ggml and the gguf crate: (id, elements per block, bytes per block); 0/0 = removed id.
    const GGML_COMMON_H: &[(u32, i64, usize)] = &[
        (0, 1, 4),     // F32
        (1, 1, 2),     // F16
        (2, 32, 18),   // Q4_0: f16 d + 16 nibble bytes
        (3, 32, 20),   // Q4_1: f16 d, m + 16
        (4, 0, 0),     // removed Q4_2
        (5, 0, 0),     // removed Q4_3
        (6, 32, 22),   // Q5_0: f16 d + 4 qh + 16
        (7, 32, 24),   // Q5_1: f16 d, m + 4 + 16
        (8, 32, 34),   // Q8_0: f16 d + 32 i8
        (9, 32, 36),   // Q8_1: f16 d, s + 32 i8
        (10, 256, 84), // Q2_K: 16 scales + 64 qs + f16 d, dmin
        (11, 256, 110),
        (12, 256, 144), // Q4_K: f16 d, dmin + 12 scales + 128 qs
        (13, 256, 176),
        (14, 256, 210),
        (15, 256, 292), // Q8_K: f32 d + 256 i8 + 16 i16 bsums
        (16, 256, 66),
        (17, 256, 74),
        (18, 256, 98),
        (19, 256, 50),
        (20, 32, 18),
        (21, 256, 110),
        (22, 256, 82),
        (23, 256, 136),
        (24, 1, 1),
        (25, 1, 2),
        (26, 1, 4),
        (27, 1, 8),
        (28, 1, 8),
        (29, 256, 56),
        (30, 1, 2),
        (31, 0, 0),
        (32, 0, 0),
        (33, 0, 0),
        (34, 256, 54),
        (35, 256, 66),
        (36, 0, 0),
        (37, 0, 0),
        (38, 0, 0),
        (39, 32, 17), // MXFP4: e8m0 + 16 nibble bytes
        (40, 64, 36), // NVFP4
        (41, 128, 18),
        (42, 64, 18),
    ];

    #[test]
    fn every_ggml_type_matches_the_gguf_table_and_ggml_common_h() {
        assert_eq!(
            GGML_COMMON_H.len() as u32,
            TYPE_COUNT,
            "a type was added to ggml; extend the table"
        );
        for &(id, blck, size) in GGML_COMMON_H {
            // SAFETY: id < GGML_TYPE_COUNT; both functions read ggml's static type table.
            let (g_blck, g_size) = unsafe { (sys::ggml_blck_size(id), sys::ggml_type_size(id)) };
            match GgmlType::from_id(id) {
                Some(ty) => {
                    println!("{id:2} {:8} blck {g_blck:3} size {g_size:3}", type_name(ty));
                    assert_eq!(
                        (g_blck, g_size),
                        (blck, size),
                        "ggml vs ggml-common.h for id {id}"
                    );
                    assert_eq!(
                        ty.block_size(),
                        g_blck as u64,
                        "gguf crate block size of {ty}"
                    );
                    assert_eq!(
                        ty.type_size(),
                        g_size as u64,
                        "gguf crate type size of {ty}"
                    );
                    assert_eq!(ty.name(), type_name(ty), "gguf crate name of id {id}");
                    assert_eq!(from_ggml(id), Ok(ty));
                }
                None => {
                    assert_eq!(
                        (blck, size),
                        (0, 0),
                        "id {id} is live in ggml but unknown to gguf::GgmlType"
                    );
                    // Removed ids keep a zero-sized placeholder entry in ggml's table.
                    assert_eq!(
                        (g_blck, g_size),
                        (0, 0),
                        "removed id {id} has a size in ggml"
                    );
                }
            }
        }
        assert_eq!(
            from_ggml(TYPE_COUNT),
            Err(GgmlError::UnknownType { id: TYPE_COUNT })
        );
    }

    #[test]
    fn row_sizes_and_vec_dot_types() {
        assert_eq!(row_size(GgmlType::Q4K, 4096), Ok(4096 / 256 * 144));
        assert_eq!(row_size(GgmlType::F32, 7), Ok(28));
        assert!(row_size(GgmlType::Q8_0, 33).is_err());
        assert!(row_size(GgmlType::Q8_0, -32).is_err());
        assert_eq!(cpu_vec_dot_type(GgmlType::Q8_0), Ok(GgmlType::Q8_0));
        assert_eq!(cpu_vec_dot_type(GgmlType::Q4K), Ok(GgmlType::Q8K));
        assert_eq!(cpu_vec_dot_type(GgmlType::Mxfp4), Ok(GgmlType::Q8_0));
    }
}
