//! The grouped expert products (`Context::grouped_rows` + `mul_mat_id_grouped`: ggml's repacked GEMM kernels over
//! each expert's rows) against `mul_mat_id` (ggml's repacked GEMV kernel row by row) on the same repacked experts
//! and inputs, for Q4_K, Q2_K and MXFP4 experts: uneven expert loads (experts with 0, 1..3, 4 and more rows, a bias
//! towards a few), a shared input and one input per slot (as the down projection), and both thread counts.
//!
//! Also a measurement, not a check, of both at Flash's expert size: `cargo test --release --test grouped_experts --
//! --ignored --nocapture`.

use std::time::Instant;

use ferrite::ggml::{
    quantize_rows, Context, CpuBackend, GroupedKernel, RepackType, RepackWeight, WeightOp,
};
use gguf::GgmlType;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `n_used` distinct experts per token; `skewed`: half the picks among the first quarter of the experts and the
/// last one never, so some experts get many rows and some none; else uniform.
fn routes(rng: &mut Rng, n_expert: usize, n_used: usize, n: usize, skewed: bool) -> Vec<i32> {
    let mut ids = Vec::with_capacity(n_used * n);
    for _ in 0..n {
        let mut chosen: Vec<i32> = Vec::new();
        while chosen.len() < n_used {
            let r = rng.next() as usize;
            let e = match skewed {
                true if r % 2 == 0 => (r >> 8) % (n_expert / 4),
                true => (r >> 8) % (n_expert - 1),
                false => (r >> 8) % n_expert,
            };
            if !chosen.contains(&(e as i32)) {
                chosen.push(e as i32);
            }
        }
        ids.extend(chosen);
    }
    ids
}

/// A context holding `{d, m, n_expert}` experts of `ty` (its first tensor), repacked from `bytes`; `None` when the
/// host has no repacked layout for them.
fn repacked_experts(
    rt: RepackType,
    ty: GgmlType,
    [d, m, n_expert]: [i64; 3],
    n_used: usize,
    bytes: &[u8],
) -> Option<Context<'static>> {
    let weights = Context::with_capacity(1, 0).unwrap();
    let w = weights.new_tensor_3d(ty, d, m, n_expert).unwrap();
    let op = WeightOp::MulMatId { n_used };
    if !rt.supports(w, op).unwrap() {
        return None;
    }
    let tensor = RepackWeight {
        tensor: w,
        bytes,
        op,
    };
    weights.repack(rt, &[tensor], |_| {}).unwrap();
    Some(weights)
}

/// Worst |a - b| relative to the largest |b|.
fn worst(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check(ty: GgmlType, threads: usize, per_slot_input: bool) {
    let Some(rt) = RepackType::cpu() else {
        eprintln!("no CPU_REPACK buffer type: nothing to check");
        return;
    };
    let (d, m, n_expert, n_used, n) = (512i64, 64i64, 16usize, 4usize, 37usize);
    let mut rng = Rng(0x5eed ^ ty as u64 ^ (threads as u64) << 8);
    let w_f32: Vec<f32> = (0..d * m * n_expert as i64)
        .map(|_| rng.uniform())
        .collect();
    let w_bytes = quantize_rows(ty, &w_f32, d as usize, None).unwrap();

    let Some(weights) = repacked_experts(rt, ty, [d, m, n_expert as i64], n_used, &w_bytes) else {
        eprintln!("{ty}: the host has no repacked layout: nothing to check");
        return;
    };
    let w = weights.tensors()[0];
    let Some(kernel) = GroupedKernel::of(w, &rt) else {
        eprintln!("{ty}: repacked in a layout the grouped products do not take: nothing to check");
        return;
    };

    let ctx = Context::with_capacity(16, 16).unwrap();
    let b1 = if per_slot_input { n_used as i64 } else { 1 };
    let x = ctx.new_tensor_3d(GgmlType::F32, d, b1, n as i64).unwrap();
    let ids = ctx
        .new_tensor_2d(GgmlType::I32, n_used as i64, n as i64)
        .unwrap();
    let want = ctx.mul_mat_id(w, x, ids).unwrap();
    let rows = ctx.grouped_rows(kernel, w, x, ids).unwrap();
    let got = ctx.mul_mat_id_grouped(w, rows).unwrap();
    let mut graph = ctx.new_graph(16).unwrap();
    graph.expand(want).unwrap();
    graph.expand(got).unwrap();
    ctx.alloc_tensors_host().unwrap();
    let xs: Vec<f32> = (0..d * b1 * n as i64).map(|_| rng.uniform()).collect();
    x.set_f32(&xs).unwrap();
    let route = routes(&mut rng, n_expert, n_used, n, true);
    ids.set_bytes(
        &route
            .iter()
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    CpuBackend::new(threads).unwrap().compute(&graph).unwrap();
    let (want, got) = (want.get_f32().unwrap(), got.get_f32().unwrap());
    assert_eq!(want.len(), got.len());
    let mut per_expert = vec![0usize; n_expert];
    route.iter().for_each(|&e| per_expert[e as usize] += 1);
    assert!(per_expert.contains(&0) && per_expert.iter().any(|&c| c >= 8));
    let err = worst(&got, &want);
    eprintln!("{ty}, {threads} threads, per-slot input {per_slot_input}: worst {err:.2e}, rows per expert {per_expert:?}");
    // Same quantized inputs and weights; GEMM and GEMV only sum in another order (f32).
    assert!(
        err < 1e-5,
        "{ty}: grouped products differ from mul_mat_id by {err:.2e}"
    );
}

#[test]
fn q4k_grouped_products_match_mul_mat_id() {
    for threads in [1, 2] {
        check(GgmlType::Q4K, threads, false);
        check(GgmlType::Q4K, threads, true);
    }
}

/// Q2_K has a repacked layout (and grouped kernels) only where ggml was built for AVX-512.
#[test]
fn q2k_grouped_products_match_mul_mat_id() {
    for threads in [1, 2] {
        check(GgmlType::Q2K, threads, false);
        check(GgmlType::Q2K, threads, true);
    }
}

#[test]
fn mxfp4_grouped_products_match_mul_mat_id() {
    for threads in [1, 2] {
        check(GgmlType::Mxfp4, threads, false);
        check(GgmlType::Mxfp4, threads, true);
    }
}

/// Milliseconds of `mul_mat_id` and of the grouped products (step 1 and step 2 of one input, as the gate
/// projection) for 128 tokens routed to 6 of 64 experts of Flash's size (4096 x 2048), 2 threads, median of 5.
#[test]
#[ignore = "a measurement; run explicitly"]
fn grouped_products_speed() {
    let Some(rt) = RepackType::cpu() else {
        return;
    };
    let (d, m, n_expert, n_used, n) = (4096i64, 2048i64, 64usize, 6usize, 128usize);
    for ty in [GgmlType::Q4K, GgmlType::Mxfp4] {
        let mut rng = Rng(7);
        let one: Vec<f32> = (0..d * m).map(|_| rng.uniform()).collect();
        let one = quantize_rows(ty, &one, d as usize, None).unwrap();
        let bytes = one.repeat(n_expert);
        let Some(weights) = repacked_experts(rt, ty, [d, m, n_expert as i64], n_used, &bytes)
        else {
            eprintln!("{ty}: no repacked layout on this host");
            continue;
        };
        let w = weights.tensors()[0];
        let Some(kernel) = GroupedKernel::of(w, &rt) else {
            eprintln!("{ty}: no grouped kernel on this host");
            continue;
        };
        let ctx = Context::with_capacity(16, 16).unwrap();
        let x = ctx.new_tensor_3d(GgmlType::F32, d, 1, n as i64).unwrap();
        let ids = ctx
            .new_tensor_2d(GgmlType::I32, n_used as i64, n as i64)
            .unwrap();
        let rows_per_row = ctx.mul_mat_id(w, x, ids).unwrap();
        let rows = ctx.grouped_rows(kernel, w, x, ids).unwrap();
        let grouped = ctx.mul_mat_id_grouped(w, rows).unwrap();
        let mut a = ctx.new_graph(16).unwrap();
        a.expand(rows_per_row).unwrap();
        let mut b = ctx.new_graph(16).unwrap();
        b.expand(grouped).unwrap();
        ctx.alloc_tensors_host().unwrap();
        x.set_f32(&(0..d * n as i64).map(|_| rng.uniform()).collect::<Vec<_>>())
            .unwrap();
        let route = routes(&mut rng, n_expert, n_used, n, false);
        ids.set_bytes(
            &route
                .iter()
                .flat_map(|i| i.to_le_bytes())
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let backend = CpuBackend::new(2).unwrap();
        let time = |g| {
            backend.compute(g).unwrap();
            let mut ms: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    backend.compute(g).unwrap();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            ms.sort_by(f64::total_cmp);
            ms[2]
        };
        let (per_row, grouped) = (time(&a), time(&b));
        eprintln!(
            "{ty}: mul_mat_id {per_row:.1} ms, grouped {grouped:.1} ms ({:.2}x)",
            per_row / grouped
        );
    }
}
