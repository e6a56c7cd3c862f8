//! Checkpoint blocks to floats (DSV4.md 2.7): FP8 weights with one E8M0 scale per 128x128 block, FP4 experts with
//! one E8M0 scale per 32 inputs; and the lossless repack of FP4 experts into ggml's MXFP4 blocks.

use crate::fp::{e2m1_pair, e4m3_to_f32, e8m0_to_f32};

/// Why a block layout does not fit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DequantError {
    #[error("{what} holds {got} bytes, expected {expected} for a [{rows}, {cols}] weight")]
    Size {
        what: &'static str,
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
    #[error("an FP4 row of {cols} inputs is not a whole number of 32-input blocks")]
    PartialBlock { cols: usize },
}

fn check(
    what: &'static str,
    rows: usize,
    cols: usize,
    expected: Option<usize>,
    got: usize,
) -> Result<(), DequantError> {
    match expected {
        Some(e) if e == got => Ok(()),
        _ => Err(DequantError::Size {
            what,
            rows,
            cols,
            expected: expected.unwrap_or(usize::MAX),
            got,
        }),
    }
}

/// `[rows, cols]` FP8 E4M3 bytes (row-major, as PyTorch stores `W[out, in]`) times the E8M0 scale of their
/// `block x block` tile (`scales` is `[ceil(rows/block), ceil(cols/block)]`) -> f32, row-major.
pub fn fp8_blocks(
    weight: &[u8],
    scales: &[u8],
    rows: usize,
    cols: usize,
    block: usize,
) -> Result<Vec<f32>, DequantError> {
    check(
        "the FP8 weight",
        rows,
        cols,
        rows.checked_mul(cols),
        weight.len(),
    )?;
    let (br, bc) = (rows.div_ceil(block.max(1)), cols.div_ceil(block.max(1)));
    check(
        "the FP8 block scales",
        rows,
        cols,
        br.checked_mul(bc),
        scales.len(),
    )?;
    let mut out = Vec::with_capacity(weight.len());
    for (i, row) in weight.chunks_exact(cols.max(1)).enumerate().take(rows) {
        let scale_row = &scales[(i / block) * bc..(i / block + 1) * bc];
        out.extend(
            row.iter()
                .enumerate()
                .map(|(j, &b)| e4m3_to_f32(b) * e8m0_to_f32(scale_row[j / block])),
        );
    }
    Ok(out)
}

/// Inputs per FP4 scale.
pub const FP4_BLOCK: usize = 32;

/// An FP4 weight `[rows, cols/2]` with scales `[rows, cols/32]`: whole blocks and matching sizes.
fn check_fp4(weight: &[u8], scales: &[u8], rows: usize, cols: usize) -> Result<(), DequantError> {
    if cols % FP4_BLOCK != 0 {
        return Err(DequantError::PartialBlock { cols });
    }
    check(
        "the FP4 weight",
        rows,
        cols,
        rows.checked_mul(cols / 2),
        weight.len(),
    )?;
    check(
        "the FP4 scales",
        rows,
        cols,
        rows.checked_mul(cols / FP4_BLOCK),
        scales.len(),
    )
}

/// `[rows, cols/2]` FP4 bytes (byte `b` of a row holds input `2b` in its low nibble, `2b+1` in its high nibble) with
/// `[rows, cols/32]` E8M0 scales -> f32 `[rows, cols]`, row-major.
pub fn fp4_blocks(
    weight: &[u8],
    scales: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, DequantError> {
    check_fp4(weight, scales, rows, cols)?;
    let mut out = Vec::with_capacity(rows * cols);
    for (block, &e) in weight.chunks_exact(FP4_BLOCK / 2).zip(scales) {
        let scale = e8m0_to_f32(e);
        for &b in block {
            let [lo, hi] = e2m1_pair(b);
            out.push(lo * scale);
            out.push(hi * scale);
        }
    }
    Ok(out)
}

/// Bytes of one ggml MXFP4 block: the E8M0 scale, then 16 bytes whose low nibbles are inputs 0..16 and high
/// nibbles inputs 16..32.
pub const MXFP4_BLOCK_BYTES: usize = 1 + FP4_BLOCK / 2;

/// Repacks FP4 experts into ggml's MXFP4 layout without changing a value: ggml's MXFP4 uses the same E2M1 codes
/// and the same E8M0 scale, only the nibble order within a block differs.
pub fn fp4_to_mxfp4(
    weight: &[u8],
    scales: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Vec<u8>, DequantError> {
    check_fp4(weight, scales, rows, cols)?;
    let mut out = Vec::with_capacity(scales.len() * MXFP4_BLOCK_BYTES);
    for (block, &e) in weight.chunks_exact(FP4_BLOCK / 2).zip(scales) {
        let nibble = |i: usize| (block[i / 2] >> (4 * (i % 2))) & 0x0f;
        out.push(e);
        out.extend((0..FP4_BLOCK / 2).map(|j| nibble(j) | (nibble(j + FP4_BLOCK / 2) << 4)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_scales_apply_per_tile() {
        // A 3x3 weight of 1.0 (0x38) with 2x2 tiles: scales 2^0, 2^1 / 2^2, 2^3.
        let w = vec![0x38u8; 9];
        let s = [127, 128, 129, 130];
        let out = fp8_blocks(&w, &s, 3, 3, 2).unwrap();
        assert_eq!(out, vec![1.0, 1.0, 2.0, 1.0, 1.0, 2.0, 4.0, 4.0, 8.0]);
        assert!(matches!(
            fp8_blocks(&w, &s[..3], 3, 3, 2),
            Err(DequantError::Size { .. })
        ));
        assert!(matches!(
            fp8_blocks(&w[..8], &s, 3, 3, 2),
            Err(DequantError::Size { .. })
        ));
    }

    #[test]
    fn fp4_nibble_order_and_scale() {
        // One row of 32 inputs: byte 0 = 0x7a -> inputs 0, 1 = -1.0, 6.0; the rest 0x21 -> 0.5, 1.0; scale 2^1.
        let mut w = vec![0x21u8; 16];
        w[0] = 0x7a;
        let out = fp4_blocks(&w, &[128], 1, 32).unwrap();
        assert_eq!(&out[..4], &[-2.0, 12.0, 1.0, 2.0]);
        assert_eq!(out.len(), 32);
        assert_eq!(
            fp4_blocks(&w, &[128], 1, 30),
            Err(DequantError::PartialBlock { cols: 30 })
        );
    }

    #[test]
    fn mxfp4_repack_moves_nibbles_only() {
        let w: Vec<u8> = (0..16u8).map(|i| i | ((15 - i) << 4)).collect();
        let packed = fp4_to_mxfp4(&w, &[120], 1, 32).unwrap();
        assert_eq!(packed[0], 120);
        // Input k of the checkpoint row: byte k/2, nibble k%2.
        let input = |k: usize| (w[k / 2] >> (4 * (k % 2))) & 0x0f;
        for j in 0..16 {
            assert_eq!(packed[1 + j] & 0x0f, input(j));
            assert_eq!(packed[1 + j] >> 4, input(j + 16));
        }
    }
}
