//! The context cache holds what DSV4.md section 4 says and no more: per token of context, one compressed row per 4
//! tokens in the ratio-4 layers (with its indexer row) and one per 128 tokens in the ratio-128 layers, each stored
//! once (6880 B per token on Flash in F16, 3655 B in Q8_0); and the memory plan reserves exactly what a session
//! allocates.

use std::path::Path;
use std::process::Command;

use ferrite::cache::{cache_bytes, CacheSizes, CacheType};
use ferrite::engine::{Engine, EngineOptions, Logits, PagingOptions};
use ferrite::model::config::{Config, LayerKind};
use ferrite::model::tiny::{write_tiny_model, TinyConfig, WeightTypes};
use gguf::GgmlType;

/// Flash's layer schedule (DSV4.md 1.3): layers 0 and 1 raw, then ratio 4 on even layers and 128 on odd ones (of
/// 43 layers: 21 ratio-4, 20 ratio-128).
fn flash_schedule(n_layer: u32) -> Vec<u32> {
    (0..n_layer)
        .map(|il| match il {
            0 | 1 => 0,
            il if il % 2 == 0 => 4,
            _ => 128,
        })
        .collect()
}

/// Flash's attention at its real widths (K = V heads of 512 with rope 64, indexer rows of 128, window 128) and its
/// layer schedule, everything else tiny.
fn flash_attention_shaped(n_layer: u32, context_length: u32) -> TinyConfig {
    TinyConfig {
        n_layer,
        n_embd: 64,
        n_head: 2,
        head_dim: 512,
        n_rot: 64,
        q_lora_rank: 32,
        o_lora_rank: 16,
        o_groups: 2,
        sliding_window: 128,
        compress_ratios: flash_schedule(n_layer),
        indexer_n_head: 4,
        indexer_head_dim: 128,
        indexer_top_k: 16,
        hash_layer_count: n_layer.min(3),
        context_length,
        types: WeightTypes::all(GgmlType::F16),
        ..TinyConfig::small()
    }
}

fn engine(path: &Path, cache_type: CacheType, ctx_size: Option<usize>) -> Engine {
    Engine::open(
        path,
        EngineOptions {
            n_threads: 1,
            cache_type,
            paging: PagingOptions {
                ctx_size,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap()
}

/// DSV4.md's growth per token: ratio-4 layers `(Dh + indexer) · bytes / 4`, ratio-128 layers `Dh · bytes / 128`.
fn dsv4_per_token(cfg: &Config, value_bytes: f64) -> f64 {
    let count = |k: LayerKind| cfg.kinds.iter().filter(|&&x| x == k).count() as f64;
    let (dh, idx) = (cfg.head_dim as f64, cfg.indexer_dim as f64);
    count(LayerKind::Csa) * (dh + idx) * value_bytes / 4.0
        + count(LayerKind::Hca) * dh * value_bytes / 128.0
}

#[test]
fn flash_shaped_cache_grows_by_the_dsv4_figure_and_the_plan_is_what_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    for (n_layer, trained) in [(43u32, 1u32 << 20), (5, 8192)] {
        let path = dir.path().join(format!("flash_attn_{n_layer}.gguf"));
        write_tiny_model(&path, &flash_attention_shaped(n_layer, trained), 7).unwrap();
        for cache_type in [
            CacheType::F16,
            CacheType::F32,
            CacheType::Q8_0,
            CacheType::Q4_0,
        ] {
            // The plan of a run at the default context reserves what its session allocates.
            let e = engine(&path, cache_type, None);
            let cfg = e.config().clone();
            let what = format!("{n_layer} layers, {cache_type:?}");
            let value_bytes = cache_type.row_bytes(32) as f64 / 32.0;
            let per_token = cache_bytes(&cfg, &CacheSizes::new(&cfg, 1, 1, cache_type)).per_token;
            assert_eq!(per_token, dsv4_per_token(&cfg, value_bytes), "{what}");
            if n_layer == 43 {
                // 21 ratio-4 and 20 ratio-128 layers: DSV4.md's 6880 B per token in F16 (Q8_0: 3655 B, Q4_0: 1935 B).
                assert_eq!(per_token, 6880.0 * value_bytes / 2.0, "{what}");
            }
            let plan = e.memory_plan().inputs.clone();
            assert_eq!(plan.context_per_token, per_token, "{what}");
            let session = e.session().unwrap();
            assert_eq!(
                plan.context_bytes,
                session.cache_bytes() as u64,
                "{what}: planned vs allocated at -c {}",
                plan.n_ctx
            );
            drop(session);
            // Other sizes, micro-batches and padding steps.
            for (n_ctx, n_ubatch) in [(1, 512), (300, 64), (1025, 512), (5000, 100)] {
                let planned = cache_bytes(
                    &cfg,
                    &CacheSizes::new(&cfg, n_ctx, n_ubatch.min(n_ctx), cache_type),
                );
                let s = e.session_sized(n_ctx, n_ubatch).unwrap();
                assert_eq!(
                    planned.total,
                    s.cache_bytes() as u64,
                    "{what}: -c {n_ctx} --ubatch {n_ubatch}"
                );
            }
        }
        // `-c 0` plans the trained context like any other size (allocated here only where it is small).
        let e = engine(&path, CacheType::F16, Some(0));
        let cfg = e.config().clone();
        let plan = e.memory_plan().inputs.clone();
        assert_eq!(plan.n_ctx, trained as u64);
        let sizes = CacheSizes::new(&cfg, trained as usize, 512, CacheType::F16);
        assert_eq!(plan.context_bytes, cache_bytes(&cfg, &sizes).total);
        if n_layer == 43 {
            // DSV4.md: 6.76 GiB at 1M tokens in F16 (rows padded, the raw window and the compressor rings included).
            let gib = plan.context_bytes as f64 / (1u64 << 30) as f64;
            assert!((6.7..6.8).contains(&gib), "1M context: {gib:.3} GiB");
            // Q8_0: the rows take DSV4.md's 3.57 GiB at 1M; the raw window's ring and the compressors' F32 rings
            // add about 0.03 GiB (3.60 GiB in all; issue 18 asks for at most 3.7). A micro-batch's new compressor
            // rows live in the compute buffer, not in the cache.
            let q8 = CacheSizes::new(&cfg, trained as usize, 512, CacheType::Q8_0);
            let q8 = cache_bytes(&cfg, &q8);
            let rows = q8.per_token * (1u64 << 20) as f64 / (1u64 << 30) as f64;
            let gib = q8.total as f64 / (1u64 << 30) as f64;
            assert!(
                (3.56..3.58).contains(&rows),
                "1M context, q8_0 rows: {rows:.3} GiB"
            );
            assert!((3.5..3.7).contains(&gib), "1M context, q8_0: {gib:.3} GiB");
        } else {
            let s = e.session().unwrap();
            assert_eq!(plan.context_bytes, s.cache_bytes() as u64, "-c 0");
        }
        // `ferrite info` shows the planner's figures in F16 and Q8_0, at the default and the trained contexts.
        let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
            .args(["info", "--json", "--no-tensors"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let caches = info["model"]["caches"].as_array().unwrap();
        assert_eq!(caches.len(), 2, "{caches:?}");
        for (c, cache_type) in caches.iter().zip([CacheType::F16, CacheType::Q8_0]) {
            assert_eq!(c["cache_type"], cache_type.name());
            for (at, n_ctx) in [(0, 4096usize.min(trained as usize)), (1, trained as usize)] {
                let sizes = CacheSizes::new(&cfg, n_ctx, 512.min(n_ctx), cache_type);
                assert_eq!(c["sizes"][at]["n_ctx"], n_ctx);
                assert_eq!(
                    c["sizes"][at]["bytes"],
                    cache_bytes(&cfg, &sizes).total,
                    "info, {cache_type:?} at {n_ctx}"
                );
            }
        }
        assert_eq!(info["model"]["cache"], caches[0]);
    }
}

/// At the end of its context a micro-batch's masks cover every compressed row and the indexer scores every ratio-4
/// row for each query: the plan's compute buffers cover that too. A Flash-attention-shaped model (512-wide heads, an
/// indexer of 4 x 128) filled to 16K tokens of its 16K context, then decoding; the buffers its last micro-batches
/// allocate (about 2x what the plan reserves for a shallow context) fit the plan.
#[test]
fn compute_buffers_fit_the_plan_at_the_end_of_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let n_ctx = 16384;
    let path = dir.path().join("deep.gguf");
    write_tiny_model(&path, &flash_attention_shaped(5, n_ctx as u32), 9).unwrap();
    let e = engine(&path, CacheType::F16, Some(n_ctx));
    let planned = e.memory_plan().inputs.compute_bytes;
    let sizes = CacheSizes::new(e.config(), n_ctx, 512, CacheType::F16);
    let shallow = CacheSizes::new(e.config(), 512, 512, CacheType::F16);
    let depth = ferrite::plan::devices::depth_bytes(e.config(), &sizes);
    assert!(depth > ferrite::plan::devices::depth_bytes(e.config(), &shallow));
    let vocab = e.config().n_vocab;
    let mut s = e.session().unwrap();
    let tokens: Vec<u32> = (0..n_ctx - 8).map(|i| (i * 7 % vocab) as u32).collect();
    s.feed(&tokens, Logits::Last).unwrap();
    for t in 0..4 {
        s.feed(&[(t * 5 % vocab) as u32], Logits::Last).unwrap();
    }
    let used = s.compute_bytes() as u64;
    eprintln!(
        "compute buffer at {} tokens: {used} B, planned {planned} B ({depth} B for the depth)",
        s.n_past()
    );
    assert!(
        used > planned - depth,
        "the depth's buffers matter here: {used} B allocated, {} B planned without them",
        planned - depth
    );
    assert!(
        used <= planned,
        "{used} B allocated, the plan reserves {planned} B"
    );
}

/// The memory plan's compute buffers cover what a session's graphs allocate: a full micro-batch of a prompt with
/// every position's logits (the most a micro-batch computes), a partial one, then decode, which completes blocks
/// of both compressors.
#[test]
fn compute_buffers_fit_the_plan() {
    let mut over = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let models = [
        ("small", TinyConfig::small()),
        ("alt", TinyConfig::alt()),
        ("flash_attn_5", flash_attention_shaped(5, 8192)),
    ];
    for (name, tiny) in models {
        let path = dir.path().join(format!("{name}.gguf"));
        write_tiny_model(&path, &tiny, 7).unwrap();
        for cache_type in [CacheType::F16, CacheType::Q8_0] {
            let e = engine(&path, cache_type, None);
            if !cache_type.fits(e.config()) {
                continue;
            }
            let planned = e.memory_plan().inputs.compute_bytes;
            let vocab = e.config().n_vocab;
            let mut s = e.session().unwrap();
            let n = s.n_ubatch() + 3;
            let tokens: Vec<u32> = (0..n).map(|i| (i * 7 % vocab) as u32).collect();
            s.feed(&tokens, Logits::All).unwrap();
            for t in 0..130 {
                s.feed(&[(t * 5 % vocab) as u32], Logits::Last).unwrap();
            }
            let used = s.compute_bytes() as u64;
            eprintln!("{name} {cache_type:?}: compute buffer {used} B, planned {planned} B");
            if !(used > 0 && used <= planned) {
                over.push(format!(
                    "{name} {cache_type:?}: the graphs allocated {used} B of compute buffers, \
                     the plan reserves {planned} B"
                ));
            }
        }
    }
    assert!(over.is_empty(), "{over:#?}");
}
