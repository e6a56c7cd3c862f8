//! Exact decoding of the small float formats of DeepSeek V4 checkpoints (DSV4.md 2.7): FP8 E4M3 (dense weights),
//! E8M0 (block scales) and FP4 E2M1 (routed experts, two per byte).

/// FP8 E4M3 ("fn": no infinities): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; `S.1111.111` is NaN;
/// exponent 0 holds subnormals `m/8 · 2^-6`. Every value is exactly representable in f32.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0f);
    let man = f32::from(b & 0x07);
    if exp == 0x0f && man == 7.0 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        man / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    sign * magnitude
}

/// E8M0 scale byte `e` -> `2^(e - 127)`; 255 is NaN (OCP MX). `e = 0` gives 2^-127, as the converter computes it.
pub fn e8m0_to_f32(e: u8) -> f32 {
    if e == 0xff {
        return f32::NAN;
    }
    2f32.powi(i32::from(e) - 127)
}

/// FP4 E2M1 values by nibble (bit 3 is the sign).
pub const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The two FP4 values of a byte: the low nibble is the earlier input, the high nibble the next one.
pub fn e2m1_pair(b: u8) -> [f32; 2] {
    [E2M1[usize::from(b & 0x0f)], E2M1[usize::from(b >> 4)]]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent decoder: assemble the f32 bit pattern directly.
    fn e4m3_by_bits(b: u8) -> f32 {
        let sign = u32::from(b >> 7) << 31;
        let exp = u32::from((b >> 3) & 0x0f);
        let man = u32::from(b & 0x07);
        if exp == 0 {
            // Subnormal: m · 2^-9, exact as an integer times a power of two; the sign also on zero.
            let magnitude = man as f32 / 512.0;
            return f32::from_bits(sign | magnitude.to_bits());
        }
        f32::from_bits(sign | ((exp + 127 - 7) << 23) | (man << 20))
    }

    #[test]
    fn e4m3_every_code_point() {
        for b in 0..=255u8 {
            let (x, y) = (e4m3_to_f32(b), e4m3_by_bits(b));
            if b & 0x7f == 0x7f {
                assert!(x.is_nan(), "{b:#04x}");
            } else {
                assert_eq!(x.to_bits(), y.to_bits(), "{b:#04x}: {x} vs {y}");
            }
        }
        // Checked by hand against the OCP FP8 specification.
        for (b, v) in [
            (0x00, 0.0),
            (0x01, 0.001953125),
            (0x07, 0.013671875),
            (0x08, 0.015625),
            (0x38, 1.0),
            (0x3c, 1.5),
            (0x40, 2.0),
            (0x7e, 448.0),
            (0xb8, -1.0),
            (0xfe, -448.0),
        ] {
            assert_eq!(e4m3_to_f32(b), v, "{b:#04x}");
        }
        assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn e8m0_every_code_point() {
        for e in 0..255u8 {
            let want = f32::from_bits(if e == 0 {
                0x0040_0000
            } else {
                u32::from(e) << 23
            });
            assert_eq!(e8m0_to_f32(e).to_bits(), want.to_bits(), "{e}");
        }
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(130), 8.0);
        assert!(e8m0_to_f32(255).is_nan());
    }

    #[test]
    fn e2m1_pairs() {
        // 0x7a: low nibble 0xa = -1.0 (first input), high nibble 0x7 = 6.0.
        assert_eq!(e2m1_pair(0x7a), [-1.0, 6.0]);
        for n in 0..8usize {
            // Value = (1 + m/2) · 2^(e-1) for e > 0, m/2 for e = 0 (E2M1, bias 1).
            let (e, m) = ((n >> 1) as i32, (n & 1) as f32);
            let v = if e == 0 {
                m / 2.0
            } else {
                (1.0 + m / 2.0) * 2f32.powi(e - 1)
            };
            assert_eq!(E2M1[n], v, "{n}");
            assert_eq!(E2M1[n + 8], -v, "{n}");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Encoders: f32 -> FP8 E4M3, FP4 E2M1 and power-of-two E8M0 block scales, the inverses of the decoders above (used
// to write checkpoints in the official formats, e.g. ferrite's tiny Hugging Face checkpoints).

/// The largest finite FP8 E4M3 magnitude (code `0x7e`).
pub const E4M3_MAX: f32 = 448.0;
/// The largest FP4 E2M1 magnitude (nibble 7).
pub const E2M1_MAX: f32 = 6.0;
/// The E8M0 byte of the scale 1.0.
pub const E8M0_ONE: u8 = 127;

/// f32 -> FP8 E4M3 ("fn", OCP saturating conversion): round to nearest, ties to even; magnitudes past 448 (and
/// infinities) saturate to ±448 (`0x7e` / `0xfe`), so a finite or infinite input never gives the NaN codes `0x7f` /
/// `0xff`; NaN gives `0x7f`. The sign is kept, also on zero and on values that round to zero.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7e;
    }
    // Below the smallest normal 2^-6 the codes are m · 2^-9 (m = 0..8; m = 8 is the smallest normal, code 0x08).
    if a < 2f32.powi(-6) {
        // a · 2^9 is exact (a power-of-two scaling of a value far from the f32 limits).
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // Normal: keep 3 of the 23 mantissa bits, ties to even; a carry out of the mantissa bumps the exponent, which
    // the addition does by itself. a < 448 keeps the result at or below 0x7e (448 itself).
    let bits = a.to_bits();
    let exp = (bits >> 23) as i32 - 127; // -6..=8
    let mant = bits & 0x7f_ffff;
    let mut q = mant >> 20;
    let rem = mant & 0xf_ffff;
    if rem > 0x8_0000 || (rem == 0x8_0000 && q & 1 == 1) {
        q += 1;
    }
    let code = (((exp + 7) as u32) << 3) + q;
    sign | code.min(0x7e) as u8
}

/// f32 -> FP4 E2M1 nibble (bit 3 the sign, as [`E2M1`]): nearest value, ties to the even code (0.25 -> 0, 0.75 -> 1,
/// 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4); magnitudes past 6 (and infinities) saturate to ±6. E2M1 has no
/// NaN: NaN gives 0.
pub fn f32_to_e2m1(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let sign = if x.is_sign_negative() { 0x8 } else { 0 };
    let a = x.abs();
    // Midpoints between neighbours; `<=` where the lower neighbour has the even code, `<` where the upper one has.
    let code = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    sign | code
}

/// `2^k` as an f64, exact for -1022 <= k <= 1023.
fn pow2_f64(k: i32) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// The E8M0 byte of the smallest power-of-two scale `s = 2^(e-127)` (e in 0..=254) with `max_abs / s <= max_code`:
/// the block scale that lets a block whose largest magnitude is `max_abs` be coded without saturation, using as
/// much of the code range as possible (`max_code` = [`E4M3_MAX`] for FP8, [`E2M1_MAX`] for FP4). A block of zeros
/// gets [`E8M0_ONE`] (any scale codes it). `None` when `max_abs` is negative, infinite or NaN, or `max_code` is not
/// positive and finite. Every finite f32 fits: 254 gives 2^127, and 2^127 · max_code >= 2^128 for max_code >= 2.
pub fn e8m0_scale_for(max_abs: f32, max_code: f32) -> Option<u8> {
    if !max_abs.is_finite() || max_abs < 0.0 || !max_code.is_finite() || max_code <= 0.0 {
        return None;
    }
    if max_abs == 0.0 {
        return Some(E8M0_ONE);
    }
    // Both sides in f64 are exact: max_code · 2^k is a few significant bits times a power of two in range.
    let fits = |k: i32| f64::from(max_abs) <= f64::from(max_code) * pow2_f64(k);
    // Start near log2(max_abs / max_code), then step to the smallest k that fits.
    let k0 = max_abs.log2().floor() as i32 - max_code.log2().floor() as i32;
    let mut k = k0.clamp(-127, 127);
    while k > -127 && fits(k - 1) {
        k -= 1;
    }
    while k < 127 && !fits(k) {
        k += 1;
    }
    if !fits(k) {
        return None;
    }
    Some((k + 127) as u8)
}

/// Why values cannot be encoded into a block format.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EncodeError {
    #[error("{got} values do not make a [{rows}, {cols}] matrix")]
    Size {
        rows: usize,
        cols: usize,
        got: usize,
    },
    #[error("value {index} is {value}: only finite values can be encoded")]
    NonFinite { index: usize, value: f32 },
    #[error("an FP4 row of {cols} inputs is not a whole number of 32-input blocks")]
    PartialBlock { cols: usize },
    #[error("the block size must be positive")]
    ZeroBlock,
}

fn check_values(values: &[f32], rows: usize, cols: usize) -> Result<(), EncodeError> {
    if rows.checked_mul(cols) != Some(values.len()) {
        return Err(EncodeError::Size {
            rows,
            cols,
            got: values.len(),
        });
    }
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(EncodeError::NonFinite {
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

/// Row-major `[rows, cols]` f32 -> FP8 E4M3 bytes (same layout) and one E8M0 scale per `block x block` tile
/// (`[ceil(rows/block), ceil(cols/block)]`, row-major; edge tiles are partial): each tile's scale is
/// [`e8m0_scale_for`] its largest magnitude, each value `f32_to_e4m3(value / scale)`. The inverse of
/// [`crate::dequant::fp8_blocks`] up to FP8 rounding.
pub fn fp8_encode_blocks(
    values: &[f32],
    rows: usize,
    cols: usize,
    block: usize,
) -> Result<(Vec<u8>, Vec<u8>), EncodeError> {
    if block == 0 {
        return Err(EncodeError::ZeroBlock);
    }
    check_values(values, rows, cols)?;
    let (br, bc) = (rows.div_ceil(block), cols.div_ceil(block));
    let mut max = vec![0f32; br * bc];
    for (i, row) in values.chunks_exact(cols.max(1)).enumerate().take(rows) {
        for (j, v) in row.iter().enumerate() {
            let m = &mut max[(i / block) * bc + j / block];
            *m = m.max(v.abs());
        }
    }
    let scales: Vec<u8> = max
        .iter()
        .map(|&m| e8m0_scale_for(m, E4M3_MAX).unwrap_or(E8M0_ONE))
        .collect();
    // 1/scale = 2^(127-e) is a finite f32 for every e in 0..=254; multiplying by it is exact, except for results
    // below 2^-126, which lie far under the smallest FP8 step and round to zero either way.
    let inv: Vec<f32> = scales
        .iter()
        .map(|&e| pow2_f64(127 - i32::from(e)) as f32)
        .collect();
    let mut bytes = Vec::with_capacity(values.len());
    for (i, row) in values.chunks_exact(cols.max(1)).enumerate().take(rows) {
        let inv_row = &inv[(i / block) * bc..(i / block + 1) * bc];
        bytes.extend(
            row.iter()
                .enumerate()
                .map(|(j, &v)| f32_to_e4m3(v * inv_row[j / block])),
        );
    }
    Ok((bytes, scales))
}

/// Row-major `[rows, cols]` f32 -> FP4 (`[rows, cols/2]` bytes: input `2b` in the low nibble of byte `b`, `2b+1` in
/// the high nibble) and one E8M0 scale per 32 inputs (`[rows, cols/32]`): the scale is [`e8m0_scale_for`] the
/// block's largest magnitude with 6, each value `f32_to_e2m1(value / scale)`. The inverse of
/// [`crate::dequant::fp4_blocks`] up to FP4 rounding.
pub fn fp4_encode_rows(
    values: &[f32],
    rows: usize,
    cols: usize,
) -> Result<(Vec<u8>, Vec<u8>), EncodeError> {
    const BLOCK: usize = 32;
    if cols % BLOCK != 0 {
        return Err(EncodeError::PartialBlock { cols });
    }
    check_values(values, rows, cols)?;
    let mut bytes = Vec::with_capacity(values.len() / 2);
    let mut scales = Vec::with_capacity(values.len() / BLOCK);
    for block in values.chunks_exact(BLOCK) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let e = e8m0_scale_for(max, E2M1_MAX).unwrap_or(E8M0_ONE);
        let inv = pow2_f64(127 - i32::from(e)) as f32;
        scales.push(e);
        for pair in block.chunks_exact(2) {
            let lo = f32_to_e2m1(pair[0] * inv);
            let hi = f32_to_e2m1(pair[1] * inv);
            bytes.push(lo | (hi << 4));
        }
    }
    Ok((bytes, scales))
}
