//! The FP8 E4M3 / FP4 E2M1 / E8M0 encoders of `quantize::fp` against the exact decoders: every code point round-trips,
//! midpoints round to the even code, and each encoder agrees with an exhaustive search over all codes on a sweep of
//! f32 bit patterns; the block encoders against `quantize::dequant`.

use quantize::dequant::{fp4_blocks, fp8_blocks};
use quantize::fp::{
    e2m1_pair, e4m3_to_f32, e8m0_scale_for, e8m0_to_f32, f32_to_e2m1, f32_to_e4m3, fp4_encode_rows,
    fp8_encode_blocks, EncodeError, E2M1, E2M1_MAX, E4M3_MAX, E8M0_ONE,
};

/// splitmix64: deterministic test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The nonnegative codes in increasing order with their values: E4M3 0x00..=0x7e.
fn e4m3_positive() -> Vec<(u8, f32)> {
    (0..=0x7eu8).map(|c| (c, e4m3_to_f32(c))).collect()
}

/// E2M1 nibbles 0..=7.
fn e2m1_positive() -> Vec<(u8, f32)> {
    (0..8u8).map(|c| (c, E2M1[usize::from(c)])).collect()
}

/// Round to nearest by exhaustive search over the nonnegative codes (ties to the even code, codes past the largest
/// value saturate to it), the sign copied from `x`. `sign_bit` is the code's sign bit.
fn nearest(x: f32, codes: &[(u8, f32)], sign_bit: u8) -> u8 {
    let a = f64::from(x.abs());
    let top = codes[codes.len() - 1];
    if a >= f64::from(top.1) {
        // Saturate (also avoids f64 distances to far-away values that round to ties).
        return if x.is_sign_negative() {
            top.0 | sign_bit
        } else {
            top.0
        };
    }
    let mut best = codes[0];
    let mut best_d = f64::INFINITY;
    for &(c, v) in codes {
        let d = (f64::from(v) - a).abs();
        if d < best_d || (d == best_d && c & 1 == 0) {
            best = (c, v);
            best_d = d;
        }
    }
    if x.is_sign_negative() {
        best.0 | sign_bit
    } else {
        best.0
    }
}

/// A sweep over f32 bit patterns: a stride through all positive finite ones, their negatives, and random ones.
fn sweep() -> Vec<f32> {
    let mut xs = Vec::new();
    let mut bits = 0u32;
    while bits < 0x7f80_0000 {
        let x = f32::from_bits(bits);
        xs.push(x);
        xs.push(-x);
        bits += 3001;
    }
    let mut rng = Rng(1);
    for _ in 0..200_000 {
        let x = f32::from_bits(rng.next() as u32);
        if x.is_finite() {
            xs.push(x);
        }
    }
    // Dense around the FP8 and FP4 ranges.
    for _ in 0..200_000 {
        let r = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        xs.push((r * 1000.0 - 500.0) as f32);
        xs.push((r * 14.0 - 7.0) as f32);
    }
    xs
}

#[test]
fn e4m3_every_code_point_round_trips() {
    for b in 0..=255u8 {
        if b & 0x7f == 0x7f {
            continue; // NaN
        }
        let v = e4m3_to_f32(b);
        assert_eq!(f32_to_e4m3(v), b, "{b:#04x} = {v}");
        assert_eq!(
            e4m3_to_f32(f32_to_e4m3(v)).to_bits(),
            v.to_bits(),
            "{b:#04x}"
        );
    }
}

#[test]
fn e4m3_midpoints_round_to_even_and_neighbours_to_nearest() {
    let codes = e4m3_positive();
    for pair in codes.windows(2) {
        let ((c0, v0), (c1, v1)) = (pair[0], pair[1]);
        // Values have at most 4 significant bits: the midpoint is exact in f32.
        let mid = (v0 + v1) / 2.0;
        assert_eq!(f64::from(mid), (f64::from(v0) + f64::from(v1)) / 2.0);
        let even = if c0 & 1 == 0 { c0 } else { c1 };
        assert_eq!(
            f32_to_e4m3(mid),
            even,
            "midpoint {mid} of {c0:#04x}, {c1:#04x}"
        );
        assert_eq!(f32_to_e4m3(-mid), even | 0x80, "-{mid}");
        assert_eq!(f32_to_e4m3(mid.next_down()), c0, "below {mid}");
        assert_eq!(f32_to_e4m3(mid.next_up()), c1, "above {mid}");
    }
    // Saturation: no NaN code for any finite or infinite input.
    for x in [
        448.0f32,
        449.0,
        463.9,
        464.0,
        480.0,
        1e6,
        f32::MAX,
        f32::INFINITY,
    ] {
        assert_eq!(f32_to_e4m3(x), 0x7e, "{x}");
        assert_eq!(f32_to_e4m3(-x), 0xfe, "-{x}");
    }
    assert_eq!(f32_to_e4m3(f32::NAN), 0x7f);
    assert_eq!(f32_to_e4m3(-0.0), 0x80);
    assert_eq!(f32_to_e4m3(1e-30), 0x00);
    assert_eq!(f32_to_e4m3(-1e-30), 0x80);
    // Hand-checked: the smallest subnormal is 2^-9; half of it ties to 0, a bit more rounds up.
    assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00);
    assert_eq!(f32_to_e4m3(2f32.powi(-10) * 1.01), 0x01);
    assert_eq!(f32_to_e4m3(1.0625), 0x38); // 1 + 1/16: tie between 1.0 (0x38) and 1.125 (0x39)
    assert_eq!(f32_to_e4m3(1.1875), 0x3a); // tie between 1.125 (0x39) and 1.25 (0x3a)
    assert_eq!(f32_to_e4m3(15.5), 0x58); // tie between 15 (0x57) and 16 (0x58)
}

#[test]
fn e4m3_agrees_with_exhaustive_nearest_search() {
    let codes = e4m3_positive();
    for x in sweep() {
        let got = f32_to_e4m3(x);
        let want = nearest(x, &codes, 0x80);
        assert_eq!(got, want, "{x:e} ({:#010x})", x.to_bits());
        assert_ne!(got & 0x7f, 0x7f, "{x}");
    }
}

#[test]
fn e2m1_every_code_point_round_trips() {
    for n in 0..16u8 {
        let v = E2M1[usize::from(n)];
        assert_eq!(f32_to_e2m1(v), n, "nibble {n} = {v}");
        let [lo, hi] = e2m1_pair(f32_to_e2m1(v) | (f32_to_e2m1(-v) << 4));
        assert_eq!((lo.to_bits(), hi.to_bits()), (v.to_bits(), (-v).to_bits()));
    }
}

#[test]
fn e2m1_midpoints_round_to_even() {
    for (x, want) in [
        (0.25f32, 0u8),
        (0.75, 2),
        (1.25, 2),
        (1.75, 4),
        (2.5, 4),
        (3.5, 6),
        (5.0, 6),
    ] {
        assert_eq!(f32_to_e2m1(x), want, "{x}");
        assert_eq!(f32_to_e2m1(-x), want | 8, "-{x}");
    }
    let codes = e2m1_positive();
    for pair in codes.windows(2) {
        let ((c0, v0), (c1, v1)) = (pair[0], pair[1]);
        let mid = (v0 + v1) / 2.0;
        assert_eq!(f32_to_e2m1(mid.next_down()), c0);
        assert_eq!(f32_to_e2m1(mid.next_up()), c1);
    }
    for x in [6.0f32, 7.0, 100.0, f32::INFINITY] {
        assert_eq!(f32_to_e2m1(x), 7);
        assert_eq!(f32_to_e2m1(-x), 15);
    }
    assert_eq!(f32_to_e2m1(f32::NAN), 0);
}

#[test]
fn e2m1_agrees_with_exhaustive_nearest_search() {
    let codes = e2m1_positive();
    for x in sweep() {
        assert_eq!(f32_to_e2m1(x), nearest(x, &codes, 8), "{x:e}");
    }
}

/// The smallest e in 0..=254 with max_abs <= max_code · 2^(e-127), by trying every e (exact in f64).
fn scale_by_search(max_abs: f32, max_code: f32) -> Option<u8> {
    if max_abs == 0.0 {
        return Some(E8M0_ONE);
    }
    (0..=254u8).find(|&e| f64::from(max_abs) <= f64::from(max_code) * f64::from(e8m0_to_f32(e)))
}

#[test]
fn e8m0_scale_is_the_smallest_power_of_two_that_fits() {
    for max_code in [E4M3_MAX, E2M1_MAX] {
        for x in sweep() {
            let a = x.abs();
            assert_eq!(
                e8m0_scale_for(a, max_code),
                scale_by_search(a, max_code),
                "{a:e} / {max_code}"
            );
        }
        // Exact boundaries: max_code · 2^k fits 2^k; one ulp more needs 2^(k+1).
        for k in -120..=110 {
            let edge = max_code * 2f32.powi(k);
            assert_eq!(
                e8m0_scale_for(edge, max_code),
                Some((127 + k) as u8),
                "{edge}"
            );
            assert_eq!(
                e8m0_scale_for(edge.next_up(), max_code),
                Some((128 + k) as u8),
                "{edge} + ulp"
            );
        }
    }
    assert_eq!(e8m0_scale_for(0.0, E4M3_MAX), Some(E8M0_ONE));
    assert_eq!(e8m0_scale_for(f32::MAX, E2M1_MAX), Some(253)); // 6 · 2^126 > f32::MAX
    assert_eq!(e8m0_scale_for(2f32.powi(127), 1.0), Some(254));
    assert_eq!(e8m0_scale_for(f32::MAX, 1.0), None); // would need 2^128
    assert_eq!(e8m0_scale_for(f32::from_bits(1), E4M3_MAX), Some(0));
    for bad in [f32::NAN, f32::INFINITY, -1.0] {
        assert_eq!(e8m0_scale_for(bad, E4M3_MAX), None, "{bad}");
    }
    assert_eq!(e8m0_scale_for(1.0, 0.0), None);
    assert_eq!(e8m0_scale_for(1.0, f32::NAN), None);
}

#[test]
fn fp8_blocks_round_trip_exactly_representable_values() {
    // 200 x 300 with 128 blocks: 2 x 3 tiles, the last row and column of tiles partial. Each tile holds codes times
    // its own power of two, one of them ±448 so that the encoder picks the same scale back.
    let (rows, cols, block) = (200usize, 300usize, 128usize);
    let mut rng = Rng(7);
    let tile_exp = |ti: usize, tj: usize| (ti * 3 + tj) as i32 * 5 - 14;
    let mut values = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            let mut code = (rng.next() % 255) as u8;
            if code & 0x7f == 0x7f {
                code = 0;
            }
            values[i * cols + j] = e4m3_to_f32(code) * 2f32.powi(tile_exp(i / block, j / block));
        }
    }
    for ti in 0..2 {
        for tj in 0..3 {
            let (i, j) = (ti * block + 3, tj * block + 5);
            values[i * cols + j] = -448.0 * 2f32.powi(tile_exp(ti, tj));
        }
    }
    let (bytes, scales) = fp8_encode_blocks(&values, rows, cols, block).unwrap();
    assert_eq!((bytes.len(), scales.len()), (rows * cols, 6));
    for ti in 0..2 {
        for tj in 0..3 {
            assert_eq!(scales[ti * 3 + tj] as i32 - 127, tile_exp(ti, tj));
        }
    }
    let back = fp8_blocks(&bytes, &scales, rows, cols, block).unwrap();
    for (k, (a, b)) in values.iter().zip(&back).enumerate() {
        assert_eq!(a.to_bits() & 0x7fff_ffff, b.to_bits() & 0x7fff_ffff, "{k}");
        if *a != 0.0 {
            assert_eq!(a.to_bits(), b.to_bits(), "{k}");
        }
    }
}

#[test]
fn fp8_blocks_round_to_nearest_with_the_smallest_scale() {
    let (rows, cols, block) = (130usize, 70usize, 64usize);
    let mut rng = Rng(9);
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| ((rng.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * 0.03)
        .collect();
    let (bytes, scales) = fp8_encode_blocks(&values, rows, cols, block).unwrap();
    let bc = cols.div_ceil(block);
    assert_eq!(scales.len(), rows.div_ceil(block) * bc);
    for i in 0..rows {
        for j in 0..cols {
            let tile = (i / block) * bc + j / block;
            let s = e8m0_to_f32(scales[tile]);
            let v = values[i * cols + j];
            assert_eq!(bytes[i * cols + j], f32_to_e4m3(v / s), "({i}, {j})");
        }
    }
    // Each tile's scale is the smallest that fits its largest magnitude.
    for (tile, &e) in scales.iter().enumerate() {
        let (ti, tj) = (tile / bc, tile % bc);
        let mut max = 0f32;
        for i in ti * block..((ti + 1) * block).min(rows) {
            for j in tj * block..((tj + 1) * block).min(cols) {
                max = max.max(values[i * cols + j].abs());
            }
        }
        assert_eq!(Some(e), scale_by_search(max, E4M3_MAX), "tile {tile}");
    }
}

#[test]
fn fp4_rows_round_trip_exactly_representable_values() {
    let (rows, cols) = (5usize, 96usize);
    let mut rng = Rng(3);
    let block_exp = |r: usize, b: usize| (r * 3 + b) as i32 - 6;
    let mut values = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let n = (rng.next() % 16) as usize;
            values[r * cols + c] = E2M1[n] * 2f32.powi(block_exp(r, c / 32));
        }
        for b in 0..3 {
            values[r * cols + b * 32 + 7] = 6.0 * 2f32.powi(block_exp(r, b));
        }
    }
    let (bytes, scales) = fp4_encode_rows(&values, rows, cols).unwrap();
    assert_eq!((bytes.len(), scales.len()), (rows * cols / 2, rows * 3));
    let back = fp4_blocks(&bytes, &scales, rows, cols).unwrap();
    assert_eq!(
        values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        back.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // Nibble order: input 2b in the low nibble.
    let (b, _) = fp4_encode_rows(&[[0.5f32, -6.0].as_slice(), &[0.0; 30]].concat(), 1, 32).unwrap();
    assert_eq!(b[0], 0x1 | (0xf << 4));
}

#[test]
fn encoders_refuse_bad_input() {
    assert!(matches!(
        fp8_encode_blocks(&[1.0, f32::NAN], 1, 2, 128),
        Err(EncodeError::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        fp8_encode_blocks(&[1.0, f32::INFINITY], 1, 2, 128),
        Err(EncodeError::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        fp8_encode_blocks(&[1.0; 5], 2, 3, 128),
        Err(EncodeError::Size { .. })
    ));
    assert_eq!(
        fp8_encode_blocks(&[1.0; 6], 2, 3, 0),
        Err(EncodeError::ZeroBlock)
    );
    assert_eq!(
        fp4_encode_rows(&[1.0; 30], 1, 30),
        Err(EncodeError::PartialBlock { cols: 30 })
    );
    assert!(matches!(
        fp4_encode_rows(&[1.0; 64], 1, 32),
        Err(EncodeError::Size { .. })
    ));
    assert!(matches!(
        fp4_encode_rows(&[f32::NAN; 32], 1, 32),
        Err(EncodeError::NonFinite { index: 0, .. })
    ));
    // Empty inputs are fine.
    assert_eq!(fp8_encode_blocks(&[], 0, 0, 128), Ok((vec![], vec![])));
    assert_eq!(fp4_encode_rows(&[], 0, 64), Ok((vec![], vec![])));
}
