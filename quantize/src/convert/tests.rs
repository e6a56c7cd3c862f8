use crate::hf::{Encoded, HfMatrix};

use super::decode_rows;
use super::execution::token_ids;

#[test]
fn token_ids_narrow_and_check_range() {
    let ids: Vec<u8> = [3i64, 0, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
    let out = token_ids(&ids, true).unwrap();
    assert_eq!(
        out,
        [3i32, 0, 7]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>()
    );
    let bad: Vec<u8> = [-1i64].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(token_ids(&bad, true).unwrap_err().contains("-1"));
    let big: Vec<u8> = [1i64 << 40].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(token_ids(&big, true).is_err());
}

#[test]
fn decode_rows_of_every_encoding() {
    // FP8 2x3 with 2x2 blocks: scales [1, 2] cover rows 0-1 (block row 0), columns 0-1 and 2.
    let fp8 = [0x38u8, 0x40, 0xb8, 0x38, 0x00, 0x40]; // 1, 2, -1, 1, 0, 2
    let scales = [127u8, 128];
    let m = HfMatrix {
        rows: 2,
        cols: 3,
        parts: vec![(
            3,
            Encoded::Fp8 {
                weight: &fp8,
                scale: &scales,
                block: [2, 2],
            },
        )],
    };
    assert_eq!(decode_rows(&m, 0..2), vec![1.0, 2.0, -2.0, 1.0, 0.0, 4.0]);
    assert_eq!(decode_rows(&m, 1..2), vec![1.0, 0.0, 4.0]);
    // BF16 1.5 and F32 -3 side by side.
    let bf = 1.5f32.to_bits() >> 16;
    let bf = (bf as u16).to_le_bytes();
    let f = (-3.0f32).to_le_bytes();
    let m = HfMatrix {
        rows: 1,
        cols: 2,
        parts: vec![(1, Encoded::Bf16(&bf)), (1, Encoded::F32(&f))],
    };
    assert_eq!(decode_rows(&m, 0..1), vec![1.5, -3.0]);
    // FP4: one 32-input row, scale 2^1; byte 0x21 = inputs 0.5 (low) and 1.0 (high).
    let mut w = [0u8; 16];
    w[0] = 0x21;
    let s = [128u8];
    let m = HfMatrix {
        rows: 1,
        cols: 32,
        parts: vec![(
            32,
            Encoded::Fp4 {
                weight: &w,
                scale: &s,
            },
        )],
    };
    let v = decode_rows(&m, 0..1);
    assert_eq!(&v[..3], &[1.0, 2.0, 0.0]);
}
