//! Quantization with ggml's own routines (`ggml_quantize_chunk`), so blocks are bit-identical to llama.cpp's, and
//! dequantization with ggml's `to_float`.

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

use super::error::{GgmlError, Result};
use super::types::{row_size, to_float_fn, to_ggml};

/// Types `ggml_quantize_chunk` can produce (others hit `assert(false)` in ggml).
pub fn can_quantize_to(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | Bf16
            | Q1_0
            | Q2_0
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Mxfp4
            | Nvfp4
            | Q2K
            | Q3K
            | Q4K
            | Q5K
            | Q6K
            | Tq1_0
            | Tq2_0
            | Iq2Xxs
            | Iq2Xs
            | Iq3Xxs
            | Iq3S
            | Iq2S
            | Iq1S
            | Iq1M
            | Iq4Nl
            | Iq4Xs
    )
}

/// True when ggml refuses to quantize to `ty` without an importance matrix.
pub fn requires_imatrix(ty: GgmlType) -> bool {
    // SAFETY: a valid type id; the function only compares it.
    unsafe { sys::ggml_quantize_requires_imatrix(to_ggml(ty)) }
}

/// Quantizes rows of `n_per_row` f32 values (`src.len()` must be a multiple) to `ty`, exactly as llama.cpp does.
/// `imatrix` (one weight per column, `n_per_row` values) guides the K- and IQ-quants; some types require it.
pub fn quantize_rows(
    ty: GgmlType,
    src: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
) -> Result<Vec<u8>> {
    let err = |detail: String| GgmlError::Quantize {
        ty: ty.to_string(),
        detail,
    };
    if !can_quantize_to(ty) {
        return Err(err("ggml has no quantizer for this type".into()));
    }
    if n_per_row == 0 || src.len() % n_per_row != 0 {
        return Err(err(format!(
            "{} values are not whole rows of {n_per_row}",
            src.len()
        )));
    }
    let n = i64::try_from(n_per_row).map_err(|_| err("row too long".into()))?;
    let row = row_size(ty, n).map_err(|e| err(e.to_string()))?;
    let n_rows = src.len() / n_per_row;
    match imatrix {
        Some(w) if w.len() != n_per_row => {
            return Err(err(format!(
                "imatrix has {} values, rows have {n_per_row}",
                w.len()
            )))
        }
        None if requires_imatrix(ty) => {
            return Err(err("this type needs an importance matrix".into()))
        }
        _ => {}
    }
    if ty.is_quantized() {
        if let Some(i) = src.iter().position(|v| !v.is_finite()) {
            return Err(err(format!("value {} at index {i} is not finite", src[i])));
        }
    }
    let bytes = row
        .checked_mul(n_rows)
        .ok_or_else(|| err("output size overflows".into()))?;
    let mut out = vec![0u8; bytes];
    if n_rows == 0 {
        return Ok(out);
    }
    let im = imatrix.map_or(std::ptr::null(), |w| w.as_ptr());
    // SAFETY: `src` holds n_rows * n_per_row values, `out` holds n_rows rows of `row` bytes, start = 0 (a whole block
    // and row), the imatrix is NULL or n_per_row values, the type has a quantizer and an imatrix when required.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            to_ggml(ty),
            src.as_ptr(),
            out.as_mut_ptr().cast(),
            0,
            n_rows as i64,
            n,
            im,
        )
    };
    if written != bytes {
        return Err(err(format!("ggml wrote {written} bytes, expected {bytes}")));
    }
    Ok(out)
}

/// Converts rows of `ty` (whole rows of `n_per_row` elements) back to f32 with ggml's `to_float`.
pub fn dequantize_rows(ty: GgmlType, data: &[u8], n_per_row: usize) -> Result<Vec<f32>> {
    let err = |detail: String| GgmlError::Quantize {
        ty: ty.to_string(),
        detail,
    };
    let to_float =
        to_float_fn(ty).ok_or_else(|| err("ggml has no dequantizer for this type".into()))?;
    let n = i64::try_from(n_per_row).map_err(|_| err("row too long".into()))?;
    let row = row_size(ty, n).map_err(|e| err(e.to_string()))?;
    if row == 0 || data.len() % row != 0 {
        return Err(err(format!(
            "{} bytes are not whole rows of {row} bytes",
            data.len()
        )));
    }
    let n_rows = data.len() / row;
    let total = n_rows
        .checked_mul(n_per_row)
        .ok_or_else(|| err("output size overflows".into()))?;
    let mut out = vec![0f32; total];
    // SAFETY: `data` holds exactly `total` elements of `ty` and `out` has room for `total` floats.
    unsafe { to_float(data.as_ptr().cast(), out.as_mut_ptr(), total as i64) };
    Ok(out)
}

/// The converter's block codec (`quantize::convert::Codec`) over ggml's own routines.
pub struct GgmlCodec;

impl quantize::convert::Codec for GgmlCodec {
    fn quantize(
        &self,
        ty: GgmlType,
        src: &[f32],
        n_per_row: usize,
        imatrix: Option<&[f32]>,
    ) -> std::result::Result<Vec<u8>, String> {
        quantize_rows(ty, src, n_per_row, imatrix).map_err(|e| e.to_string())
    }

    fn dequantize(
        &self,
        ty: GgmlType,
        data: &[u8],
        n_per_row: usize,
    ) -> std::result::Result<Vec<f32>, String> {
        if ty == GgmlType::F32 {
            // ggml has no to_float for F32 itself.
            return Ok(data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect());
        }
        dequantize_rows(ty, data, n_per_row).map_err(|e| e.to_string())
    }

    fn can_quantize(&self, ty: GgmlType) -> bool {
        can_quantize_to(ty)
    }

    fn requires_imatrix(&self, ty: GgmlType) -> bool {
        requires_imatrix(ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trip_and_errors() {
        let src: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 8.0).collect();
        let q = quantize_rows(GgmlType::Q8_0, &src, 32, None).unwrap();
        assert_eq!(q.len(), 2 * 34);
        let back = dequantize_rows(GgmlType::Q8_0, &q, 32).unwrap();
        for (a, b) in src.iter().zip(&back) {
            assert!((a - b).abs() <= 4.0 / 127.0 / 2.0 + 1e-3, "{a} vs {b}");
        }
        assert!(
            quantize_rows(GgmlType::Q8_0, &src, 48, None).is_err(),
            "not whole rows"
        );
        assert!(
            quantize_rows(GgmlType::Q8_0, &src[..48], 48, None).is_err(),
            "not whole blocks"
        );
        assert!(
            quantize_rows(GgmlType::Q8K, &src, 64, None).is_err(),
            "no quantizer"
        );
        assert!(
            quantize_rows(GgmlType::Iq2Xxs, &vec![0.0; 256], 256, None).is_err(),
            "needs imatrix"
        );
        assert!(
            quantize_rows(GgmlType::Q8_0, &src, 32, Some(&[1.0; 31])).is_err(),
            "imatrix length"
        );
        let mut nan = src.clone();
        nan[5] = f32::NAN;
        assert!(
            quantize_rows(GgmlType::Q8_0, &nan, 32, None).is_err(),
            "NaN"
        );
        assert!(dequantize_rows(GgmlType::Q8_0, &q[..33], 32).is_err());
    }
}
