//! FP4 experts repacked into ggml's MXFP4 blocks lose nothing: ggml dequantizes the repacked blocks to exactly the
//! values ferrite's own FP4 decoder gives for the checkpoint bytes (up to the sign of zero).

use ferrite::ggml::dequantize_rows;
use gguf::GgmlType;
use quantize::dequant::{fp4_blocks, fp4_to_mxfp4};

#[test]
fn repacked_fp4_dequantizes_identically_in_ggml() {
    let (rows, cols) = (5, 96);
    let mut s = 0x1234_5678u32;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    };
    let weight: Vec<u8> = (0..rows * cols / 2).map(|_| next() as u8).collect();
    // Scales around 2^0 (E8M0 127), some small and large.
    let scales: Vec<u8> = (0..rows * cols / 32)
        .map(|_| 110 + (next() % 30) as u8)
        .collect();
    let want = fp4_blocks(&weight, &scales, rows, cols).unwrap();
    let packed = fp4_to_mxfp4(&weight, &scales, rows, cols).unwrap();
    let got = dequantize_rows(GgmlType::Mxfp4, &packed, cols).unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        // Equal as numbers (exact); ggml's table has +0 where E2M1 has -0 (code 8).
        assert!(a == b, "element {i}: ggml {a} vs checkpoint {b}");
    }
    // And the packing is not the identity: the checkpoint's byte order is not ggml's.
    assert_ne!(&packed[1..17], &weight[..16]);
}
