//! Repacked weights (ggml's CPU extra buffer types: CPU_REPACK's layouts, and AMX's on Intel CPUs with it, each
//! weight in the first type that takes it, as llama.cpp's loader chooses) compute what llama.cpp computes with its
//! own repacking: with `repack` on, ferrite's logits match llama.cpp's with `use_extra_bufts` on the same quantized
//! tiny models, whole prompts (the GEMM kernels) and token by token (GEMV), and differ from the plain kernels' (so
//! the test would see repacking silently off); a whole prompt's repacked experts use the grouped GEMM products,
//! which give llama.cpp's bits where their kernels give `mul_mat_id`'s (MXFP4; Q4_K on Arm's dot product); the
//! weights really are repacked where the host has the kernels; routed experts are left to the paged store when it
//! pages them, and to the map when the plan leaves them over the budget.

mod support;

use std::path::{Path, PathBuf};

use ferrite::cache::CacheType;
use ferrite::engine::{Engine, EngineOptions, Logits, PagingOptions};
use ferrite::ggml::{Context, GroupedKernel, RepackType, WeightOp};
use ferrite::model::tiny::{write_tiny_model, TinyConfig, WeightTypes};
use ferrite::plan::ExpertCacheArg;
use ferrite::reference::llama::{LlamaContext, LlamaParams};
use gguf::GgmlType;
use support::compare::{prompt, relative_errors};

const N_CTX: usize = 512;
const N_UBATCH: usize = 512;
const PROMPT_LEN: usize = 200;
/// Tokens fed one at a time (each a decode call in both engines).
const N_SINGLE: usize = 40;

/// Q8_0 dense weights with Q4_K experts, shared experts and embedding: Q4_K has repacked kernels on AVX2 and NEON.
const Q8_Q4K: WeightTypes = WeightTypes {
    dense: GgmlType::Q8_0,
    experts: GgmlType::Q4K,
    shared: GgmlType::Q4K,
    embed: GgmlType::Q4K,
};

/// [`TinyConfig::small`] with experts of width 256 (k-quants need rows of 256) in `types`.
fn model(dir: &Path, name: &str, types: WeightTypes, seed: u64) -> (PathBuf, TinyConfig) {
    let cfg = TinyConfig {
        expert_ffn: 256,
        ..TinyConfig::small()
    }
    .with_types(types);
    let path = dir.join(format!("{name}.gguf"));
    write_tiny_model(&path, &cfg, seed).unwrap();
    (path, cfg)
}

fn open(path: &Path, repack: bool, paging: PagingOptions) -> Engine {
    let opts = EngineOptions {
        n_threads: 1,
        cache_type: CacheType::F32,
        paging: PagingOptions {
            ctx_size: Some(N_CTX),
            n_ubatch: Some(N_UBATCH),
            ..paging
        },
        repack,
        ..EngineOptions::default()
    };
    Engine::open(path, opts).unwrap()
}

/// Every position's logits, feeding `call` tokens per call (micro-batches of [`N_UBATCH`]), with a prompt's
/// repacked experts multiplied row by row as llama.cpp does (`mul_mat_id`'s GEMV).
fn ours(e: &Engine, tokens: &[u32], call: usize) -> Vec<Vec<f32>> {
    ours_grouped(e, tokens, call, false).0
}

/// [`ours`], with the grouped GEMM products on or off; also the micro-batches that used them. Attention past the
/// indexer's top-k reads every visible row under a mask, as llama.cpp does: reading only the chosen rows sums the
/// same terms in another order, whose last bits these chaotic random models amplify (1e-2 from position 35 on
/// an AVX2 host, where the decode reads 8 chosen rows; its own tests are `tests/depth_top_k.rs`).
fn ours_grouped(e: &Engine, tokens: &[u32], call: usize, grouped: bool) -> (Vec<Vec<f32>>, u64) {
    let mut s = e.session_sized(N_CTX, N_UBATCH).unwrap();
    s.set_grouped_experts(grouped);
    s.set_chosen_rows(false);
    let mut rows = Vec::new();
    for chunk in tokens.chunks(call) {
        let flat = s.feed(chunk, Logits::All).unwrap();
        rows.extend(flat.chunks(e.n_vocab()).map(<[f32]>::to_vec));
    }
    (rows, s.graph_stats().grouped)
}

/// llama.cpp's logits of every position, `call` tokens per decode call, repacking or not.
fn reference(path: &Path, tokens: &[u32], call: usize, repack: bool) -> Vec<Vec<f32>> {
    let params = LlamaParams {
        n_ctx: N_CTX as u32,
        n_batch: N_UBATCH as u32,
        n_ubatch: N_UBATCH as u32,
        repack,
        ..LlamaParams::default()
    };
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    LlamaContext::load(path, params)
        .unwrap()
        .logits(&ids, call)
        .unwrap()
}

/// The worst error of any position, relative to the logit scale.
fn worst(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    relative_errors(got, want).into_iter().fold(0f32, f32::max)
}

fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    let w = worst(got, want);
    eprintln!("{what}: worst relative error {w:.2e}");
    assert!(w <= 1e-4, "{what}: differs by {w:.3e} of the logit scale");
}

fn assert_same_bits(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{what}: row {i} differs");
    }
}

/// Whether this host's ggml has a repacked layout for a `{k, m}` matrix (or `n` stacked experts) of `ty`, in any of
/// its CPU extra buffer types (CPU_REPACK; AMX on Intel CPUs with it).
fn host_repacks(ty: GgmlType, k: i64, m: i64, experts: Option<i64>) -> bool {
    let ctx = Context::with_capacity(1, 0).unwrap();
    let (t, op) = match experts {
        None => (ctx.new_tensor_2d(ty, k, m).unwrap(), WeightOp::MulMat),
        Some(n) => (
            ctx.new_tensor_3d(ty, k, m, n).unwrap(),
            WeightOp::MulMatId { n_used: 2 },
        ),
    };
    RepackType::index_for(t, op).unwrap().is_some()
}

/// The repacked-weight counts a host with the kernels must reach for `types` on [`model`]'s layout: the shared
/// experts and the output head (per layer 3, plus 1), and the routed experts (3 per layer) when resident.
fn expected(cfg: &TinyConfig, routed: bool) -> usize {
    let (d, f, e, v) = (
        cfg.n_embd as i64,
        cfg.expert_ffn as i64,
        cfg.n_expert as i64,
        cfg.n_vocab as i64,
    );
    let t = cfg.types;
    let layers = cfg.n_layer as usize;
    let shared = 3
        * layers
        * usize::from(host_repacks(t.shared, d, f, None) && host_repacks(t.shared, f, d, None));
    let head = usize::from(host_repacks(t.embed, d, v, None));
    let experts = 3
        * layers
        * usize::from(
            routed
                && host_repacks(t.experts, d, f, Some(e))
                && host_repacks(t.experts, f, d, Some(e)),
        );
    shared + head + experts
}

fn check(name: &str, types: WeightTypes, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (path, cfg) = model(dir.path(), name, types, seed);
    let tokens = prompt(PROMPT_LEN, cfg.n_vocab as usize, seed);
    let plain = open(&path, false, PagingOptions::default());
    let packed = open(&path, true, PagingOptions::default());
    check_counts(name, &cfg, &plain, &packed);
    check_logits(name, &path, &tokens, &plain, &packed);
    check_grouped(name, &path, &cfg, &tokens, &packed);
    check_routed_experts(name, &path, &cfg, &tokens, &packed);
}

/// With the grouped products on (the default), a whole prompt uses them where the host has the kernels. How their
/// logits compare with llama.cpp's (its `mul_mat_id`, GEMV row by row) follows from the kernels of this host: where
/// their probe product (grouped against `mul_mat_id` on a small repacked weight) has the same bits (MXFP4 in both
/// layouts, Q4_K in Arm's 8x4 layout), the logits must match llama.cpp's; where the GEMM sums in another order (Q4_K
/// 8x8 on x86 and on Arm with int8 matmul; checked product by product in tests/grouped_experts.rs to 1e-5), this tiny
/// random model amplifies that as it does any rounding (see "repack off vs on"), so the logits must differ, which
/// shows the kernels were used.
fn check_grouped(name: &str, path: &Path, cfg: &TinyConfig, tokens: &[u32], packed: &Engine) {
    let (logits, used) = ours_grouped(packed, tokens, PROMPT_LEN, true);
    let Some(rt) = packed.grouped_experts() else {
        assert_eq!(used, 0, "{name}: no grouped kernels, yet grouped products");
        eprintln!("{name}: the host has no grouped kernels for these experts");
        return;
    };
    assert_eq!(
        used, 1,
        "{name}: the whole prompt is one micro-batch, grouped"
    );
    let kernel = GroupedKernel::for_layout_of(cfg.types.experts, cfg.expert_ffn as i64)
        .unwrap_or_else(|| panic!("{name}: grouped products without kernels for the experts"));
    let probe = kernel.probe(&rt).unwrap();
    let want = reference(path, tokens, PROMPT_LEN, true);
    if probe == 0.0 {
        eprintln!("{name}: the grouped kernels give mul_mat_id's bits on this host");
        assert_close(&format!("{name}: grouped, whole prompt"), &logits, &want)
    } else {
        let apart = worst(&logits, &want);
        eprintln!(
            "{name}: grouped kernels {probe:.2e} from mul_mat_id on the probe, logits {apart:.2e} from llama.cpp's"
        );
        assert!(
            apart > 0.0,
            "{name}: the grouped products should round differently"
        );
    }
}

/// Nothing repacked with `repack` off; with it on, at least what the host has kernels for, and a note says so.
fn check_counts(name: &str, cfg: &TinyConfig, plain: &Engine, packed: &Engine) {
    assert_eq!(plain.repacked_tensors(), 0, "{name}: repack off");
    assert_eq!(
        plain.copied_tensors(),
        0,
        "{name}: repack off copies nothing"
    );
    assert!(!plain.notes().iter().any(|n| n.contains("repacked")));
    // Every matrix product's weight that is not repacked (nor a routed expert) is copied into RAM as it is.
    let products = 3 * cfg.n_layer as usize + 1; // at least the shared experts and the output head
    let in_ram = packed.repacked_tensors() + packed.copied_tensors();
    eprintln!(
        "{name}: {} repacked, {} copied into RAM",
        packed.repacked_tensors(),
        packed.copied_tensors()
    );
    assert!(in_ram >= products, "{name}: {in_ram} weights in RAM");
    assert!(
        packed.copied_tensors() > 0,
        "{name}: the attention matrices at least are copied"
    );
    let want = expected(cfg, true);
    let n = packed.repacked_tensors();
    let bytes = packed.repacked_bytes();
    eprintln!("{name}: {n} weights repacked ({bytes} bytes), at least {want} expected");
    assert!(
        n >= want,
        "{name}: {n} weights repacked, expected at least {want}"
    );
    if n > 0 {
        assert!(bytes > 0);
        let notes = packed.notes();
        assert!(notes.iter().any(|n| n.contains("repacked")), "{notes:?}");
    }
    // The memory plan counts the repacked weights at the size of their buffers (AMX's layouts are larger than the
    // file's; CPU_REPACK's are not), and nothing else changes.
    let ram = packed.repacked_ram_bytes();
    eprintln!("{name}: the repacked weights take {ram} bytes in their buffers");
    assert!(ram >= bytes, "{name}: {ram} bytes for {bytes}");
    let resident = |e: &Engine| e.memory_plan().inputs.resident_bytes;
    assert_eq!(
        resident(packed) - resident(plain),
        ram - bytes,
        "{name}: planned resident bytes with and without repacking"
    );
}

/// On matches llama.cpp repacking, off matches llama.cpp's plain kernels, whole prompt (GEMM) and token by token
/// (GEMV); the two differ, so repacking silently off would be seen.
fn check_logits(name: &str, path: &Path, tokens: &[u32], plain: &Engine, packed: &Engine) {
    let repacked_ref = reference(path, tokens, PROMPT_LEN, true);
    let on = ours(packed, tokens, PROMPT_LEN);
    assert_close(
        &format!("{name}: repacked, whole prompt"),
        &on,
        &repacked_ref,
    );
    let off = ours(plain, tokens, PROMPT_LEN);
    let plain_ref = reference(path, tokens, PROMPT_LEN, false);
    assert_close(&format!("{name}: plain, whole prompt"), &off, &plain_ref);
    if packed.repacked_tensors() > 0 {
        // The kernels round differently and the tiny random model amplifies it.
        let apart = worst(&off, &repacked_ref);
        eprintln!("{name}: repack off vs on differs by {apart:.2e}");
        assert!(
            apart > 1e-3,
            "{name}: the comparison cannot tell repacking off from on"
        );
    }
    let short = &tokens[..N_SINGLE];
    let want = reference(path, short, 1, true);
    assert_close(
        &format!("{name}: repacked, token by token"),
        &ours(packed, short, 1),
        &want,
    );
}

/// Routed experts are not repacked over the budget (`--no-paging` with a `--mem` that holds everything but them:
/// they stay in the map) nor when paged (the paged store reads them from the file into slots); the rest is, and the
/// paged engine's logits are the resident one's with the same weights repacked, bit for bit.
fn check_routed_experts(
    name: &str,
    path: &Path,
    cfg: &TinyConfig,
    tokens: &[u32],
    packed: &Engine,
) {
    let plan = &packed.memory_plan().inputs;
    let over = PagingOptions {
        mem: Some(plan.fixed_bytes() + plan.routed_bytes() / 2),
        no_paging: true,
        ..PagingOptions::default()
    };
    let mapped = open(path, true, over);
    assert!(!mapped.is_paged());
    let (all, non_routed) = (expected(cfg, true), expected(cfg, false));
    let m = mapped.repacked_tensors();
    assert!(m >= non_routed, "{name}: over budget, {m} repacked");
    let routed = packed.repacked_tensors() - m;
    assert_eq!(
        routed,
        all - non_routed,
        "{name}: over budget, no routed expert is repacked"
    );

    let paging = PagingOptions {
        expert_cache: Some(ExpertCacheArg::Slots(u64::from(cfg.n_expert_used) + 2)),
        ..PagingOptions::default()
    };
    let paged = open(path, true, paging);
    assert!(paged.is_paged());
    assert_eq!(paged.repacked_tensors(), m, "{name}: paged");
    let want = ours(&mapped, tokens, PROMPT_LEN);
    assert_same_bits(
        &format!("{name}: paged vs resident"),
        &ours(&paged, tokens, PROMPT_LEN),
        &want,
    );
}

#[test]
fn q4k_weights_repacked_match_llama_cpp() {
    check("q8-q4k", Q8_Q4K, 3);
}

#[test]
fn mxfp4_experts_repacked_match_llama_cpp() {
    let types = WeightTypes {
        dense: GgmlType::F16,
        experts: GgmlType::Mxfp4,
        shared: GgmlType::Q8_0,
        embed: GgmlType::Q8_0,
    };
    check("f16-mxfp4", types, 4);
}

/// F32 weights have no repacked layout: nothing is copied, the engine runs from the map as before.
#[test]
fn f32_weights_are_not_repacked() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = model(dir.path(), "f32", WeightTypes::F32, 5);
    assert_eq!(
        open(&path, true, PagingOptions::default()).repacked_tensors(),
        0
    );
}

/// `--mlock` on a model whose weights are repacked locks the repacked copies and the map's pages of the other
/// weights, not the whole file as well (the repacked weights' pages in the map are no longer read).
#[test]
fn mlock_locks_repacked_weights_once() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = model(dir.path(), "mlock", Q8_Q4K, 6);
    let mlock = PagingOptions {
        mlock: true,
        ..PagingOptions::default()
    };
    let e = open(&path, true, mlock.clone());
    if RepackType::all().is_empty() || e.repacked_tensors() == 0 {
        eprintln!("note: no repacked kernels on this CPU; nothing to check");
        return;
    }
    if e.notes().iter().any(|n| n.contains("could not lock")) {
        eprintln!(
            "note: mlock is not allowed here ({:?}); nothing to check",
            e.notes()
        );
        return;
    }
    let model = gguf::Model::open(&path).unwrap();
    let tensor_bytes: u64 = model.tensors().iter().map(|t| t.info.n_bytes).sum();
    let locked = e.locked_bytes();
    let file = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "locked {locked} bytes: {tensor_bytes} bytes of tensors ({} repacked) in a file of {file}",
        e.repacked_bytes()
    );
    // Every tensor's bytes once: at least the tensors' bytes (the repacked layouts are no smaller: CPU_REPACK pads
    // each weight by at most its alignment, AMX's tiles add a few percent), and less than the file and the repacked
    // weights' bytes, which locking the whole map as well as the repacked copies would give at least.
    assert!(
        locked >= tensor_bytes && locked < file + e.repacked_bytes(),
        "locked {locked} bytes for {tensor_bytes} bytes of tensors ({} repacked) in a file of {file}",
        e.repacked_bytes()
    );
    // Without repacking the whole file is locked.
    let plain = open(&path, false, mlock);
    assert_eq!(plain.locked_bytes(), file);
}
