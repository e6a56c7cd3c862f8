//! The paged expert store against the resident one on tiny models: with a cache of a few slots (so misses,
//! evictions, prefetches and, for whole prompts, waves all happen) greedy generation of 128 tokens gives the same
//! tokens and the same logits bit for bit, for a prompt processed whole and token by token. A cache smaller than
//! one token's experts is refused with the numbers.

use std::path::Path;

use ferrite::engine::{Engine, EngineOptions, Logits, PagingOptions};
use ferrite::experts::{ExpertLayout, DIRECT_ALIGN};
use ferrite::model::tiny::{write_tiny_model, TinyConfig, WeightTypes};
use ferrite::plan::ExpertCacheArg;
use gguf::GgmlType;

const N_GEN: usize = 128;

fn open(path: &Path, expert_cache: Option<ExpertCacheArg>, fused: bool) -> Engine {
    Engine::open(
        path,
        EngineOptions {
            n_threads: 1,
            fused_ops: fused,
            paging: PagingOptions {
                expert_cache,
                ctx_size: Some(512),
                n_ubatch: Some(64),
                ..PagingOptions::default()
            },
            // The same kernels in both stores: the resident one would repack experts of types the CPU has
            // interleaved kernels for (Q8_0 on ARM), which the paged store computes from its slots as they are.
            repack: false,
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

fn prompt(n: usize, n_vocab: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 7) % n_vocab as u32)
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The logits of the prompt (every row when `whole`, else one row per token fed alone, in micro-batches of one
/// token) and of `N_GEN` greedy tokens, and the tokens.
fn generate(engine: &Engine, prompt: &[u32], whole: bool) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut s = engine
        .session_sized(512, if whole { 64 } else { 1 })
        .unwrap();
    let mut rows = Vec::new();
    if whole {
        rows.push(s.feed(prompt, Logits::All).unwrap());
    } else {
        for &t in prompt {
            rows.push(s.feed(&[t], Logits::Last).unwrap());
        }
    }
    let mut out = Vec::new();
    let mut next = argmax(
        rows.last()
            .unwrap()
            .rchunks(engine.n_vocab())
            .next()
            .unwrap(),
    );
    for _ in 0..N_GEN {
        out.push(next);
        let row = s.feed(&[next], Logits::Last).unwrap();
        next = argmax(&row);
        rows.push(row);
    }
    (rows, out)
}

fn assert_same_bits(what: &str, paged: &[Vec<f32>], resident: &[Vec<f32>]) {
    assert_eq!(paged.len(), resident.len(), "{what}: calls");
    for (i, (a, b)) in paged.iter().zip(resident).enumerate() {
        assert_eq!(a.len(), b.len(), "{what}: call {i} rows");
        if let Some(j) = (0..a.len()).find(|&j| a[j].to_bits() != b[j].to_bits()) {
            panic!(
                "{what}: call {i} differs first at value {j}: paged {} vs resident {}",
                a[j], b[j]
            );
        }
    }
}

/// Whether the file system lets `path` be opened with O_DIRECT.
fn opens_direct(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

fn check(cfg: &TinyConfig, slots: u64, fused: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_model(&path, cfg, seed).unwrap();
    let resident = open(&path, None, fused);
    assert!(
        !resident.is_paged(),
        "the tiny model fits: resident by default"
    );
    let paged = open(&path, Some(ExpertCacheArg::Slots(slots)), fused);
    assert!(paged.is_paged());
    let p = prompt(150, resident.n_vocab(), seed as u32);
    for whole in [true, false] {
        let what = format!(
            "{} experts of {}, {slots} slots, fused {fused}, prompt {}",
            cfg.n_expert_used,
            cfg.n_expert,
            if whole { "whole" } else { "token by token" }
        );
        paged.reset_expert_stats();
        let (rows_r, toks_r) = generate(&resident, &p, whole);
        let (rows_p, toks_p) = generate(&paged, &p, whole);
        assert_eq!(toks_p, toks_r, "{what}: generated tokens");
        assert_same_bits(&what, &rows_p, &rows_r);
        let st = paged.expert_stats();
        assert!(
            st.misses > 0 && st.hits > 0,
            "{what}: hits and misses both happen: {st:?}"
        );
        assert!(st.evictions > 0, "{what}: the cache evicts: {st:?}");
        assert!(
            st.prefetch_loads > 0,
            "{what}: hash and guessed experts are prefetched: {st:?}"
        );
        assert!(st.bytes_read > 0 && st.reads > 0, "{what}: {st:?}");
        // Slabs of whole pages are read with O_DIRECT straight into the slots, where the file system takes it.
        let whole_pages = ExpertLayout::from_model(&gguf::Model::open(&path).unwrap())
            .unwrap()
            .layers()
            .all(|l| {
                l.parts
                    .iter()
                    .all(|p| p.slab_bytes % DIRECT_ALIGN as u64 == 0)
            });
        let direct = whole_pages && opens_direct(&path);
        let want = if direct { st.bytes_read } else { 0 };
        assert_eq!(st.direct_bytes, want, "{what}: direct reads: {st:?}");
        if whole && slots < u64::from(cfg.n_expert) {
            assert!(
                st.waves > st.requests,
                "{what}: a whole prompt needs more experts than slots: {st:?}"
            );
        }
    }
}

#[test]
fn paged_matches_resident_bit_for_bit_small_f32() {
    let cfg = TinyConfig::small();
    check(&cfg, u64::from(cfg.n_expert_used) + 1, true, 11);
}

#[test]
fn paged_matches_resident_bit_for_bit_quantized_unfused() {
    let mut cfg = TinyConfig::alt();
    cfg.types = WeightTypes {
        experts: GgmlType::Q8_0,
        ..WeightTypes::F32
    };
    check(&cfg, u64::from(cfg.n_expert_used) + 3, false, 12);
}

/// A cache larger than a read batch (8 experts): a whole prompt's misses of a layer load in several batches, each
/// while the one before is computed.
#[test]
fn paged_matches_resident_bit_for_bit_with_misses_read_in_batches() {
    let cfg = TinyConfig::alt();
    check(&cfg, 20, true, 13);
}

#[test]
fn a_cache_smaller_than_one_tokens_experts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let cfg = TinyConfig::small();
    write_tiny_model(&path, &cfg, 3).unwrap();
    let too_few = u64::from(cfg.n_expert_used) - 1;
    let err = Engine::open(
        &path,
        EngineOptions {
            paging: PagingOptions {
                expert_cache: Some(ExpertCacheArg::Slots(too_few)),
                ..PagingOptions::default()
            },
            ..EngineOptions::default()
        },
    )
    .err()
    .expect("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("would hold {too_few} experts")),
        "{msg}"
    );
    assert!(msg.contains("hint"), "{msg}");
    let err = Engine::open(
        &path,
        EngineOptions {
            paging: PagingOptions {
                mem: Some(1 << 20),
                ..PagingOptions::default()
            },
            ..EngineOptions::default()
        },
    )
    .err()
    .expect("a 1 MiB budget is refused");
    assert!(format!("{err:#}").contains("budget"), "{err:#}");
}

/// Hash-routed layers' experts are known from the token ids, so the store reads them before the layers ask: with
/// every layer hash-routed and room for one token's experts, no request ever misses.
#[test]
fn hash_routed_experts_are_prefetched_before_they_are_needed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut cfg = TinyConfig::small();
    cfg.hash_layer_count = cfg.n_layer;
    write_tiny_model(&path, &cfg, 5).unwrap();
    let slots = u64::from(cfg.n_layer * cfg.n_expert_used);
    let paged = open(&path, Some(ExpertCacheArg::Slots(slots)), true);
    let mut s = paged.session_sized(512, 1).unwrap();
    for &t in &prompt(40, paged.n_vocab(), 5) {
        s.feed(&[t], Logits::Last).unwrap();
    }
    let st = paged.expert_stats();
    assert_eq!(st.misses, 0, "{st:?}");
    assert!(st.prefetch_loads > 0 && st.prefetch_hits > 0, "{st:?}");
    assert_eq!(
        st.hits,
        40 * slots,
        "every needed expert was in a slot: {st:?}"
    );
}
