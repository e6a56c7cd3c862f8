//! Going back in a sequence: a rewind whose position the compressor rings and the raw ring still cover rolls the
//! cache back without computing anything, and what follows gives the logits of recomputing the kept prefix, bit
//! for bit; a rewind past what the rings hold recomputes the prefix. A state kept in memory (`Session::state`, what
//! `bench -d` restores) gives the bits of the session it came from.

use std::path::Path;

use ferrite::cache::CacheType;
use ferrite::engine::{Engine, EngineOptions, Logits, Rewind, Session};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};

const N_CTX: usize = 512;
const N_UBATCH: usize = 32;

fn engine(path: &Path, cache_type: CacheType) -> Engine {
    Engine::open(
        path,
        EngineOptions {
            n_threads: 1,
            cache_type,
            ..Default::default()
        },
    )
    .unwrap()
}

fn tokens(n: usize, n_vocab: u32, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 7919) >> 9) % n_vocab)
        .collect()
}

/// The prefix as these tests process it: whole micro-batches, then one token at a time.
fn prefill(s: &mut Session<'_>, toks: &[u32], batched: usize) {
    s.feed(&toks[..batched], Logits::Last).unwrap();
    for &t in &toks[batched..] {
        s.feed(&[t], Logits::Last).unwrap();
    }
}

/// Logits of a continuation: six tokens one at a time, then a small prompt (every row).
fn continue_with(s: &mut Session<'_>, toks: &[u32]) -> Vec<Vec<f32>> {
    let mut rows: Vec<Vec<f32>> = toks[..6]
        .iter()
        .map(|&t| s.feed(&[t], Logits::Last).unwrap())
        .collect();
    rows.push(s.feed(&toks[6..20], Logits::All).unwrap());
    rows
}

#[test]
fn rewind_inside_a_compression_block_rolls_back_and_equals_recomputing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::small(); // window 16, ratios 4 and 128
    let path = dir.path().join("rewind.gguf");
    write_tiny_model(&path, &cfg, 21).unwrap();
    let text = tokens(200, cfg.n_vocab, 1);
    let other = tokens(40, cfg.n_vocab, 2);
    for cache_type in [CacheType::F32, CacheType::F16] {
        let e = engine(&path, cache_type);
        let what = format!("{cache_type:?} cache");
        // Positions 0..131 processed; going back to 129 stays inside ratio-4 block 32 (128..132) and ratio-128
        // block 1 (128..256), whose positions (and the block before, 124..128) the rings still hold.
        let mut s = e.session_sized(N_CTX, N_UBATCH).unwrap();
        prefill(&mut s, &text[..131], 128);
        assert_eq!(s.rewind(129).unwrap(), Rewind::RolledBack, "{what}");
        assert_eq!(s.tokens(), &text[..129]);
        let rolled = continue_with(&mut s, &other);
        // Recomputing: a fresh session processes the same 129 tokens with the same micro-batches.
        let mut fresh = e.session_sized(N_CTX, N_UBATCH).unwrap();
        prefill(&mut fresh, &text[..129], 128);
        let recomputed = continue_with(&mut fresh, &other);
        assert_eq!(rolled, recomputed, "{what}: rolled back vs recomputed");
        // The continuation really differs from the one rewound (the comparison can fail).
        let mut kept = e.session_sized(N_CTX, N_UBATCH).unwrap();
        prefill(&mut kept, &text[..131], 128);
        assert_ne!(continue_with(&mut kept, &other), rolled, "{what}");

        // Back to 127, in the ratio-4 block before: the ring no longer holds block 30 (120..124), so the prefix is
        // processed again; the maths is the same, the rounding of other micro-batches may differ slightly.
        let mut s = e.session_sized(N_CTX, N_UBATCH).unwrap();
        prefill(&mut s, &text[..131], 128);
        assert_eq!(s.rewind(127).unwrap(), Rewind::Recomputed, "{what}");
        assert_eq!(s.tokens(), &text[..127]);
        let again = continue_with(&mut s, &other);
        let mut fresh = e.session_sized(N_CTX, N_UBATCH).unwrap();
        fresh.feed(&text[..127], Logits::Last).unwrap();
        let want = continue_with(&mut fresh, &other);
        for (a, b) in again.iter().flatten().zip(want.iter().flatten()) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{what}: {a} vs {b}"
            );
        }
        // Nothing to forget.
        assert_eq!(s.rewind(1000).unwrap(), Rewind::Nothing);
        // Back to the start: rolled back, then the same as a new session.
        assert_eq!(s.rewind(0).unwrap(), Rewind::RolledBack, "{what}");
        let mut new = e.session_sized(N_CTX, N_UBATCH).unwrap();
        assert_eq!(
            continue_with(&mut s, &other),
            continue_with(&mut new, &other),
            "{what}"
        );
    }
}

#[test]
fn a_kept_state_restores_the_bits_of_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::small();
    let path = dir.path().join("state.gguf");
    write_tiny_model(&path, &cfg, 22).unwrap();
    let e = engine(&path, CacheType::F16);
    let text = tokens(300, cfg.n_vocab, 3);
    let mut s = e.session_sized(N_CTX, N_UBATCH).unwrap();
    s.feed(&text[..270], Logits::Last).unwrap();
    let state = s.state().unwrap();
    let want = continue_with(&mut s, &text[270..]);
    let mut other = e.session_sized(N_CTX, N_UBATCH).unwrap();
    other.feed(&text[..50], Logits::Last).unwrap();
    other.set_state(&state).unwrap();
    assert_eq!(other.tokens(), &text[..270]);
    assert_eq!(continue_with(&mut other, &text[270..]), want);
    // A state from other sizes is refused with a message.
    let mut small = e.session_sized(256, N_UBATCH).unwrap();
    let err = small.set_state(&state).unwrap_err();
    assert!(format!("{err:#}").contains("other sizes"), "{err:#}");
}
