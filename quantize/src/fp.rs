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
