//! Graph reuse cannot go stale: decoding with kept graphs (only their inputs rewritten) gives the same logits, bit
//! for bit, as building a fresh graph for every micro-batch, across compressed-row completions (ratio 4 and 128),
//! growing attention windows, prompts of several sizes, rewinds and restored sessions. Gathering the key rows that
//! few queries see gives the bits of reading the cache's first rows.

use std::path::Path;

use ferrite::cache::plan::{padded_kv, KV_PAD};
use ferrite::cache::CacheType;
use ferrite::engine::{Engine, EngineOptions, Logits, Session};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};

/// A context whose raw window grows past one 256-row padding step within the test (ring of 16 + 512 -> 768 rows).
const N_CTX: usize = 1024;
const N_UBATCH: usize = 512;

fn engine(path: &Path, cache_type: CacheType, fused: bool) -> Engine {
    Engine::open(
        path,
        EngineOptions {
            n_threads: 1,
            fused_ops: fused,
            cache_type,
            ..Default::default()
        },
    )
    .unwrap()
}

fn tokens(n: usize, n_vocab: u32, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 7) % n_vocab)
        .collect()
}

/// Every logits row of a session that sees a short prompt, 300 tokens one at a time, a few small prompts, a
/// rewind, and more single tokens.
fn run(s: &mut Session<'_>, toks: &[u32]) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    rows.push(s.feed(&toks[..37], Logits::All).unwrap());
    for &t in &toks[37..337] {
        rows.push(s.feed(&[t], Logits::Last).unwrap());
    }
    rows.push(s.feed(&toks[337..342], Logits::All).unwrap());
    rows.push(s.feed(&toks[342..345], Logits::Last).unwrap());
    s.rewind(300).unwrap();
    for &t in &toks[300..330] {
        rows.push(s.feed(&[t], Logits::Last).unwrap());
    }
    rows
}

fn assert_same_bits(what: &str, reused: &[Vec<f32>], fresh: &[Vec<f32>]) {
    assert_eq!(reused.len(), fresh.len(), "{what}: calls");
    for (i, (a, b)) in reused.iter().zip(fresh).enumerate() {
        assert_eq!(a.len(), b.len(), "{what}: call {i} rows");
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "{what}: call {i} differs (first values {:?} vs {:?})",
            &a[..4],
            &b[..4]
        );
    }
}

fn check(cache_type: CacheType, fused: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.gguf");
    let cfg = TinyConfig::small();
    write_tiny_model(&path, &cfg, seed).unwrap();
    let e = engine(&path, cache_type, fused);
    let toks = tokens(345, cfg.n_vocab, seed as u32);
    let what = format!("{cache_type:?} cache, fused {fused}");

    let mut fresh = e.session_sized(N_CTX, N_UBATCH).unwrap();
    fresh.set_graph_reuse(false);
    assert!(!fresh.graph_reuse());
    let want = run(&mut fresh, &toks);
    assert_eq!(fresh.graph_stats().reused, 0);

    let mut kept = e.session_sized(N_CTX, N_UBATCH).unwrap();
    assert!(kept.graph_reuse(), "reuse is the default");
    let got = run(&mut kept, &toks);
    assert_same_bits(&what, &got, &want);
    let stats = kept.graph_stats();
    // Decode cycles through a few shapes; nearly every token reuses one.
    assert!(stats.reused > 280 && stats.built < 40, "{what}: {stats:?}");

    // A session saved and restored continues with kept graphs as the original does.
    let saved = dir.path().join("session.bin");
    kept.save(&saved).unwrap();
    let mut restored = e.session_sized(N_CTX, N_UBATCH).unwrap();
    restored.load(&saved).unwrap();
    for &t in &toks[330..345] {
        let a = kept.feed(&[t], Logits::Last).unwrap();
        let b = restored.feed(&[t], Logits::Last).unwrap();
        assert_same_bits(&format!("{what}, restored"), &[b], &[a]);
    }
}

#[test]
fn reused_graphs_give_the_bits_of_fresh_graphs_f32_cache() {
    check(CacheType::F32, true, 3);
}

#[test]
fn reused_graphs_give_the_bits_of_fresh_graphs_f16_cache_primitive_ops() {
    check(CacheType::F16, false, 5);
}

/// How many of `run`'s single-token steps read their raw window gathered with `block`-row blocks: those whose
/// window's aligned blocks are at most half the padded full read (256-row steps of the 768-row ring). With 32- or
/// 64-row blocks that is all 330; with 128 (AVX512-FP16) a window straddling row 128 while 256 rows are read is
/// read whole (its two blocks are the full read).
fn single_token_gathers(window: usize, block: usize) -> u64 {
    let ring = (window + N_UBATCH).next_multiple_of(KV_PAD);
    let pays = |p: usize| {
        let first = (p + 1).saturating_sub(window);
        let rows = (p / block - first / block + 1) * block;
        2 * rows <= padded_kv(p + 1, ring)
    };
    (37..337).chain(300..330).filter(|&p| pays(p)).count() as u64
}

/// Decode gathers the key rows its queries see (whole aligned blocks of the raw ring, compressed rows padded
/// finely); reading the padded first rows of the cache instead, as llama.cpp does, gives the same bits. Bit identity
/// on every ISA: both reads run the same ggml products in the cache's type, and the blocks are the rows this build's
/// dot products keep in their SIMD lanes (32 with AVX2, 64 with AVX-512, 128 with AVX512-FP16: smaller blocks
/// differ in the last bits there). Where ferrite does not know that number for the ISA, nothing is gathered. (Past
/// the indexer's top-k, the release path reads only each query's chosen ratio-4 rows, which is not bit for bit:
/// tests/depth_top_k.rs.)
#[test]
fn gathered_reads_give_the_bits_of_full_reads() {
    let lanes = ferrite::ggml::dot_lane_rows();
    eprintln!(
        "ggml CPU build: {}, dot-product lane rows {lanes:?}",
        ferrite::ggml::cpu_features().simd_name()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.gguf");
    let cfg = TinyConfig::small();
    write_tiny_model(&path, &cfg, 9).unwrap();
    for (cache_type, fused) in [(CacheType::F16, true), (CacheType::F32, false)] {
        let e = engine(&path, cache_type, fused);
        let toks = tokens(345, cfg.n_vocab, 9);
        let what = format!("{cache_type:?} cache, fused {fused}, gathered");
        let mut full = e.session_sized(N_CTX, N_UBATCH).unwrap();
        full.set_gathered_reads(false);
        let want = run(&mut full, &toks);
        assert_eq!(full.graph_stats().gathered, 0);
        let mut gathered = e.session_sized(N_CTX, N_UBATCH).unwrap();
        // Past the indexer's top-k, reading only each query's chosen rows sums in another order (see
        // tests/depth_top_k.rs): the bits are those of the masked read of every row.
        gathered.set_chosen_rows(false);
        let got = run(&mut gathered, &toks);
        assert_same_bits(&what, &got, &want);
        // Every single-token micro-batch gathered where that pays (none where the lanes are not known).
        let stats = gathered.graph_stats();
        match lanes {
            Some(block) => {
                let want = single_token_gathers(cfg.sliding_window as usize, block);
                assert!(
                    want >= 300,
                    "{what}: only {want} steps would gather with {block}-row blocks"
                );
                assert!(
                    stats.gathered >= want,
                    "{what}: {want} single-token steps gather: {stats:?}"
                );
            }
            None => assert_eq!(stats.gathered, 0, "{what}: {stats:?}"),
        }

        // A prompt attends in chunks of queries, each over the rows it sees: the same bits again. 130 tokens end
        // in two queries past two whole chunks (ggml's tinyBLAS on Arm takes F32 products of 4 or more columns
        // only: a chunk of fewer would run another kernel than the full read's product).
        for n in [300, 130] {
            let prompt = tokens(n, cfg.n_vocab, 10);
            let mut full = e.session_sized(N_CTX, N_UBATCH).unwrap();
            full.set_gathered_reads(false);
            let want = full.feed(&prompt, Logits::All).unwrap();
            let mut chunked = e.session_sized(N_CTX, N_UBATCH).unwrap();
            let got = chunked.feed(&prompt, Logits::All).unwrap();
            let chunks = u64::from(lanes.is_some());
            assert_eq!(chunked.graph_stats().chunked, chunks, "{what}");
            assert_same_bits(&format!("{what}, prompt of {n} in chunks"), &[got], &[want]);
        }
    }
}
