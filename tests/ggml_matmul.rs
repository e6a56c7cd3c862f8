//! ggml's matrix product and row gather on quantized (Q8_0, Q4_0, Q4_K, MXFP4) and plain (F32, F16) weights, checked
//! against a dequantize-and-multiply reference written here from the block layouts in ggml-common.h, in f64. Q4_0
//! (the q4_0 cache's type) with rows of an odd number of blocks caught a miscompiled ggml: GCC 12 with Arm's int8
//! matmul turns the scalar tail of its Q4_0 dot product into USDOT on signed values (scripts/test-arm64.sh).
//!
//! Error budget (why the tolerances are what they are): ggml's CPU `mul_mat` first converts each f32 input column
//! to the weight type's `vec_dot_type` (Q8_0 for Q8_0 and MXFP4, Q8_K for Q4_K, F16 for F16, F32 for F32), then
//! takes integer (or f32) dot products against the unchanged weight blocks and accumulates in f32.
//! - Converting a block of the input with largest magnitude `amax` to Q8 gives `d = amax / 127`, `q = round(x / d)`,
//!   so each element moves by at most `d / 2`; Q8_0 also stores `d` as f16 (relative error <= 2^-11, times
//!   |q| <= 127), hence at most `(0.5 + 127 * 2^-11) * d`. Q8_K keeps `d` in f32 (0.5 * d).
//! - So for output `j`: |ggml - exact| <= sum over input blocks b of `c * amax_b / 127 * sum_{i in b} |w_ij|`, plus
//!   f32 accumulation, bounded by 1e-5 * sum_i |w_ij x_i| (a few hundred f32 roundings at 2^-24 each).
//! - When every input block holds integers times 2^-7 with one element at +-127 (`exact_inputs`), the Q8
//!   conversion is lossless (d = 2^-7 exactly, q = x / d exactly), so only the f32 accumulation term remains: a
//!   tolerance about 1e-5 of the result's scale, which a single corrupted weight exceeds by orders of magnitude
//!   (checked below).

use ferrite::ggml::{cpu_vec_dot_type, quantize_rows, Context, CpuBackend};
use gguf::GgmlType;
use half::f16;

/// Small deterministic generator (xorshift64*), so the test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---- reference dequantizers, from ggml-common.h ----------------------------------------------------------------

fn half_at(b: &[u8], at: usize) -> f64 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f64()
}

/// block_q8_0 (34 bytes): f16 d, i8 qs[32]; x = d * q.
fn dequant_q8_0(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(34)
        .flat_map(|b| {
            let d = half_at(b, 0);
            b[2..].iter().map(move |&q| d * (q as i8) as f64)
        })
        .collect()
}

/// block_q4_0 (18 bytes): f16 d, u8 qs[16]; value j is d * ((qs[j] & 15) - 8), value j + 16 is
/// d * ((qs[j] >> 4) - 8).
fn dequant_q4_0(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(18)
        .flat_map(|b| {
            let d = half_at(b, 0);
            let q = &b[2..];
            let lo = q.iter().map(move |&v| d * ((v & 15) as f64 - 8.0));
            let hi = q.iter().map(move |&v| d * ((v >> 4) as f64 - 8.0));
            lo.chain(hi).collect::<Vec<_>>()
        })
        .collect()
}

/// block_q4_K (144 bytes): f16 d, f16 dmin, u8 scales[12] (8 pairs of 6-bit scale and min), u8 qs[128]. Each
/// group of 64 values uses two (scale, min) pairs: low nibbles of 32 bytes, then high nibbles of the same bytes.
fn dequant_q4_k(bytes: &[u8]) -> Vec<f64> {
    let scale_min = |j: usize, s: &[u8]| -> (f64, f64) {
        if j < 4 {
            ((s[j] & 63) as f64, (s[j + 4] & 63) as f64)
        } else {
            let sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            let m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
            (sc as f64, m as f64)
        }
    };
    let mut out = Vec::new();
    for b in bytes.chunks_exact(144) {
        let (d, dmin) = (half_at(b, 0), half_at(b, 2));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for group in 0..4 {
            let q = &qs[group * 32..group * 32 + 32];
            let (sc1, m1) = scale_min(2 * group, scales);
            let (sc2, m2) = scale_min(2 * group + 1, scales);
            out.extend(q.iter().map(|&v| d * sc1 * (v & 0xF) as f64 - dmin * m1));
            out.extend(q.iter().map(|&v| d * sc2 * (v >> 4) as f64 - dmin * m2));
        }
    }
    out
}

/// block_mxfp4 (17 bytes): E8M0 exponent e, u8 qs[16]; value j is kvalues[low nibble of qs[j]] and value j + 16
/// kvalues[high nibble], kvalues being E2M1 doubled, times 2^(e - 128) (half of 2^(e - 127), undoing the doubling).
fn dequant_mxfp4(bytes: &[u8]) -> Vec<f64> {
    const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
    let mut out = Vec::new();
    for b in bytes.chunks_exact(17) {
        let d = 2f64.powi(b[0] as i32 - 128);
        out.extend(
            b[1..]
                .iter()
                .map(|&q| KVALUES[(q & 0xF) as usize] as f64 * d),
        );
        out.extend(
            b[1..]
                .iter()
                .map(|&q| KVALUES[(q >> 4) as usize] as f64 * d),
        );
    }
    out
}

fn dequant(ty: GgmlType, bytes: &[u8]) -> Vec<f64> {
    match ty {
        GgmlType::Q8_0 => dequant_q8_0(bytes),
        GgmlType::Q4_0 => dequant_q4_0(bytes),
        GgmlType::Q4K => dequant_q4_k(bytes),
        GgmlType::Mxfp4 => dequant_mxfp4(bytes),
        GgmlType::F16 => bytes.chunks_exact(2).map(|b| half_at(b, 0)).collect(),
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("no reference dequantizer for {other}"),
    }
}

/// Weights of `ty` for `m` rows of `k` values, as the bytes ggml stores (quantized with ggml's own quantizer).
fn weights(ty: GgmlType, k: usize, m: usize, rng: &mut Rng) -> Vec<u8> {
    let w: Vec<f32> = (0..k * m)
        .map(|i| rng.uniform() * (0.5 + (i / k % 4) as f32 * 0.5))
        .collect();
    match ty {
        GgmlType::F32 => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => w
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => quantize_rows(ty, &w, k, None).unwrap(),
    }
}

/// Random inputs in [-1, 1).
fn random_inputs(k: usize, n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..k * n).map(|_| rng.uniform()).collect()
}

/// Inputs the Q8 conversion represents exactly: q * 2^-7 with q in +-1..=127, every 32nd element +-127.
fn exact_inputs(k: usize, n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..k * n)
        .map(|i| {
            let q = if i % 32 == 0 {
                127
            } else {
                1 + rng.below(127) as i32
            };
            let sign = if rng.below(2) == 0 { 1 } else { -1 };
            (sign * q) as f32 / 128.0
        })
        .collect()
}

/// ggml's `mul_mat(W {k, m}, X {k, n})` -> `{m, n}` on the CPU backend.
fn ggml_mul_mat(ty: GgmlType, w: &[u8], k: usize, m: usize, x: &[f32], n: usize) -> Vec<f32> {
    let ctx = Context::with_capacity(8, 16).unwrap();
    let wt = ctx.new_tensor_2d(ty, k as i64, m as i64).unwrap();
    let xt = ctx
        .new_tensor_2d(GgmlType::F32, k as i64, n as i64)
        .unwrap();
    let y = ctx.mul_mat(wt, xt).unwrap();
    assert_eq!(y.ne(), [m as i64, n as i64, 1, 1]);
    let mut graph = ctx.new_graph(16).unwrap();
    graph.expand(y).unwrap();
    let backend = CpuBackend::new(2).unwrap();
    ctx.alloc_tensors(&backend).unwrap();
    wt.set_bytes(w).unwrap();
    xt.set_f32(x).unwrap();
    backend.compute(&graph).unwrap();
    y.get_f32().unwrap()
}

/// Exact products in f64 and, per output, sum |w x| (the result's scale).
fn reference(w: &[f64], k: usize, m: usize, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; m * n];
    let mut scale = vec![0.0; m * n];
    for j in 0..n {
        for r in 0..m {
            let (row, col) = (&w[r * k..(r + 1) * k], &x[j * k..(j + 1) * k]);
            out[j * m + r] = row.iter().zip(col).map(|(a, &b)| a * b as f64).sum();
            scale[j * m + r] = row
                .iter()
                .zip(col)
                .map(|(a, &b)| (a * b as f64).abs())
                .sum();
        }
    }
    (out, scale)
}

/// The worst-case error of converting input column `col` to `vec_dot_type` before the dot product with `row`.
fn conversion_bound(vec_dot: GgmlType, row: &[f64], col: &[f32]) -> f64 {
    let (block, c) = match vec_dot {
        GgmlType::Q8_0 => (32, 0.5 + 127.0 / 2048.0),
        GgmlType::Q8K => (256, 0.5 + 127.0 / 16_777_216.0),
        GgmlType::F16 => {
            return row
                .iter()
                .zip(col)
                .map(|(a, &b)| (a * b as f64).abs())
                .sum::<f64>()
                / 2048.0
        }
        GgmlType::F32 => return 0.0,
        other => panic!("unexpected vec_dot_type {other}"),
    };
    row.chunks(block)
        .zip(col.chunks(block))
        .map(|(w, x)| {
            let amax = x.iter().fold(0f64, |a, &v| a.max((v as f64).abs()));
            c * (1.0 + 1e-3) * amax / 127.0 * w.iter().map(|v| v.abs()).sum::<f64>()
        })
        .sum()
}

const ACCUMULATION: f64 = 1e-5;

/// (k, m, n): single row and column, several rows, a batch of inputs, one more chunking path.
const SHAPES: [(usize, usize, usize); 4] = [(256, 1, 1), (512, 7, 3), (768, 33, 5), (1024, 4, 17)];

/// What [`check_exact`] computed: the weights' bytes and values, the inputs, the exact products and their scales.
struct Exact {
    w: Vec<u8>,
    wd: Vec<f64>,
    x: Vec<f32>,
    want: Vec<f64>,
    scale: Vec<f64>,
}

/// Random `ty` weights `{k, m}` times inputs `{k, n}` that survive the Q8 conversion: ggml's product must equal the
/// exact one up to f32 accumulation.
fn check_exact(ty: GgmlType, (k, m, n): (usize, usize, usize), rng: &mut Rng) -> Exact {
    let w = weights(ty, k, m, rng);
    let x = exact_inputs(k, n, rng);
    let wd = dequant(ty, &w);
    let (want, scale) = reference(&wd, k, m, &x, n);
    let got = ggml_mul_mat(ty, &w, k, m, &x, n);
    let mut worst = 0f64;
    for i in 0..m * n {
        let tol = ACCUMULATION * scale[i] + 1e-30;
        let err = (got[i] as f64 - want[i]).abs();
        assert!(
            err <= tol,
            "{ty} k{k} m{m} n{n} out {i}: ggml {} ref {} err {err:e} tol {tol:e}",
            got[i],
            want[i]
        );
        worst = worst.max(err / tol);
    }
    println!("{ty} k{k} m{m} n{n}: worst error {worst:.3} of the tolerance");
    Exact {
        w,
        wd,
        x,
        want,
        scale,
    }
}

#[test]
fn quantized_matmul_is_exact_when_inputs_survive_q8() {
    let mut rng = Rng(0x5eed_0001);
    for ty in [GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Mxfp4] {
        for (k, m, n) in SHAPES {
            let Exact {
                w,
                wd,
                x,
                want,
                scale,
            } = check_exact(ty, (k, m, n), &mut rng);

            // The same check must catch one wrong weight: change one byte of the first row's last block.
            let mut bad = w.clone();
            let at = ty.row_bytes(k as u64).unwrap() as usize - 3;
            bad[at] ^= 0x44;
            assert_ne!(
                dequant(ty, &bad)[..k],
                wd[..k],
                "corruption must change a weight"
            );
            let got_bad = ggml_mul_mat(ty, &bad, k, m, &x, n);
            let worst = (0..n)
                .map(|j| {
                    (got_bad[j * m] as f64 - want[j * m]).abs() / (ACCUMULATION * scale[j * m])
                })
                .fold(0f64, f64::max);
            assert!(
                worst > 100.0,
                "{ty} k{k}: a corrupted weight moved row 0 only {worst:.1} tolerances"
            );
        }
    }
}

/// (k, m, n) for types of 32-value blocks (the q4_0 and q8_0 cache types): rows of 96 values (three blocks, the
/// tiny `alt` model's head width) and 160; even row and column counts, which ggml's int8-matmul dot products (Arm
/// i8mm) take two at a time, and odd ones, which they take one at a time.
const SHAPES_32: [(usize, usize, usize); 4] = [(96, 6, 4), (96, 7, 3), (160, 8, 2), (96, 64, 16)];

#[test]
fn block_32_matmul_is_exact_when_inputs_survive_q8() {
    let mut rng = Rng(0x5eed_0006);
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0] {
        for shape in SHAPES_32 {
            check_exact(ty, shape, &mut rng);
        }
    }
}

#[test]
fn quantized_matmul_stays_within_the_q8_conversion_budget() {
    let mut rng = Rng(0x5eed_0002);
    for ty in [GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Mxfp4] {
        let vec_dot = cpu_vec_dot_type(ty).unwrap();
        for (k, m, n) in SHAPES {
            let w = weights(ty, k, m, &mut rng);
            let x = random_inputs(k, n, &mut rng);
            let wd = dequant(ty, &w);
            let (want, scale) = reference(&wd, k, m, &x, n);
            let got = ggml_mul_mat(ty, &w, k, m, &x, n);
            let (mut worst, mut widest) = (0f64, 0f64);
            for j in 0..n {
                for r in 0..m {
                    let i = j * m + r;
                    let bound =
                        conversion_bound(vec_dot, &wd[r * k..(r + 1) * k], &x[j * k..(j + 1) * k])
                            + ACCUMULATION * scale[i];
                    // The bound is meaningful: a small fraction of the result's scale.
                    assert!(
                        bound < 0.02 * scale[i],
                        "{ty}: bound {bound:e} vs scale {:e}",
                        scale[i]
                    );
                    let err = (got[i] as f64 - want[i]).abs();
                    assert!(
                        err <= bound,
                        "{ty} k{k} m{m} n{n} out ({r},{j}): err {err:e} > bound {bound:e}"
                    );
                    worst = worst.max(err / bound);
                    widest = widest.max(bound / scale[i]);
                }
            }
            println!("{ty} k{k} m{m} n{n}: worst error {worst:.3} of the bound; bound <= {widest:.4} of the scale");
        }
    }
}

#[test]
fn f32_and_f16_matmul_match_almost_exactly() {
    let mut rng = Rng(0x5eed_0003);
    for ty in [GgmlType::F32, GgmlType::F16] {
        let vec_dot = cpu_vec_dot_type(ty).unwrap();
        for (k, m, n) in [(16, 3, 1), (64, 5, 4), (300, 9, 17)] {
            let w = weights(ty, k, m, &mut rng);
            let x = random_inputs(k, n, &mut rng);
            let wd = dequant(ty, &w);
            let (want, scale) = reference(&wd, k, m, &x, n);
            let got = ggml_mul_mat(ty, &w, k, m, &x, n);
            for j in 0..n {
                for r in 0..m {
                    let i = j * m + r;
                    let bound =
                        conversion_bound(vec_dot, &wd[r * k..(r + 1) * k], &x[j * k..(j + 1) * k])
                            + ACCUMULATION * scale[i];
                    let err = (got[i] as f64 - want[i]).abs();
                    assert!(
                        err <= bound,
                        "{ty} k{k} out ({r},{j}): {} vs {} err {err:e} > {bound:e}",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
}

#[test]
fn mul_mat_broadcasts_weight_planes_over_input_planes() {
    // a {k, m, 2} x b {k, n, 4}: input plane p uses weight plane p / 2.
    let (k, m, n) = (32, 3, 2);
    let mut rng = Rng(0x5eed_0004);
    let w: Vec<f32> = (0..k * m * 2).map(|_| rng.uniform()).collect();
    let x: Vec<f32> = (0..k * n * 4).map(|_| rng.uniform()).collect();
    let ctx = Context::with_capacity(4, 8).unwrap();
    let a = ctx
        .new_tensor_3d(GgmlType::F32, k as i64, m as i64, 2)
        .unwrap();
    let b = ctx
        .new_tensor_3d(GgmlType::F32, k as i64, n as i64, 4)
        .unwrap();
    let y = ctx.mul_mat(a, b).unwrap();
    assert_eq!(y.ne(), [m as i64, n as i64, 4, 1]);
    let mut g = ctx.new_graph(8).unwrap();
    g.expand(y).unwrap();
    let backend = CpuBackend::new(1).unwrap();
    ctx.alloc_tensors(&backend).unwrap();
    a.set_f32(&w).unwrap();
    b.set_f32(&x).unwrap();
    backend.compute(&g).unwrap();
    let got = y.get_f32().unwrap();
    let wd: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    for p in 0..4 {
        let plane = &wd[(p / 2) * k * m..][..k * m];
        let (want, scale) = reference(plane, k, m, &x[p * k * n..][..k * n], n);
        for i in 0..m * n {
            let err = (got[p * m * n + i] as f64 - want[i]).abs();
            assert!(
                err <= ACCUMULATION * scale[i],
                "plane {p} out {i}: err {err:e}"
            );
        }
    }
}

#[test]
fn get_rows_gathers_dequantized_rows() {
    let (k, rows) = (64, 6);
    let ids = [4i32, 0, 4, 5];
    let mut rng = Rng(0x5eed_0005);
    for ty in [GgmlType::F32, GgmlType::Q8_0] {
        let w = weights(ty, k, rows, &mut rng);
        let ctx = Context::with_capacity(4, 8).unwrap();
        let table = ctx.new_tensor_2d(ty, k as i64, rows as i64).unwrap();
        let idx = ctx.new_tensor_1d(GgmlType::I32, ids.len() as i64).unwrap();
        let out = ctx.get_rows(table, idx).unwrap();
        assert_eq!(
            (out.ne(), out.ty()),
            ([k as i64, ids.len() as i64, 1, 1], Some(GgmlType::F32))
        );
        let mut g = ctx.new_graph(8).unwrap();
        g.expand(out).unwrap();
        let backend = CpuBackend::new(2).unwrap();
        ctx.alloc_tensors(&backend).unwrap();
        table.set_bytes(&w).unwrap();
        idx.set_i32(&ids).unwrap();
        backend.compute(&g).unwrap();
        let got = out.get_f32().unwrap();
        let wd = dequant(ty, &w);
        for (j, &id) in ids.iter().enumerate() {
            for c in 0..k {
                let want = wd[id as usize * k + c];
                let have = got[j * k + c] as f64;
                // One f32 rounding of d * q at most.
                assert!(
                    (have - want).abs() <= want.abs() * 1e-7,
                    "{ty} row {id} col {c}: {have} vs {want}"
                );
            }
        }
    }
}
