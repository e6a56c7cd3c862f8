//! Prefill and decode speed of ferrite next to llama.cpp on the same tiny GGUF, same threads, same micro-batch.
//! A measurement, not a check: `cargo test --release --test speed_tiny -- --ignored --nocapture`.
//! (`ferrite bench` will replace this with the real-size measurement.)

mod support;

use std::time::Instant;

use ferrite::cache::CacheType;
use ferrite::engine::{Engine, EngineOptions, Logits};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use ferrite::reference::llama::{LlamaContext, LlamaParams};

const PREFILL: usize = 512;
const DECODE: usize = 128;
const THREADS: usize = 2;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "a measurement; run explicitly"]
fn tiny_model_speed_next_to_llama() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.gguf");
    let cfg = TinyConfig::small();
    write_tiny_model(&path, &cfg, 1).unwrap();
    let tokens: Vec<u32> = (0..(PREFILL + DECODE) as u32)
        .map(|i| (i * 37) % cfg.n_vocab)
        .collect();
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let n_ctx = 1024;
    let reps = 5;

    let opts = EngineOptions {
        n_threads: THREADS,
        fused_ops: true,
        cache_type: CacheType::F16,
        ..Default::default()
    };
    let e = Engine::open(&path, opts).unwrap();
    let (mut ours_pp, mut ours_tg) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let mut s = e.session_sized(n_ctx, PREFILL).unwrap();
        let t = Instant::now();
        s.feed(&tokens[..PREFILL], Logits::Last).unwrap();
        ours_pp.push(PREFILL as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for &tok in &tokens[PREFILL..] {
            s.feed(&[tok], Logits::Last).unwrap();
        }
        ours_tg.push(DECODE as f64 / t.elapsed().as_secs_f64());
    }

    let params = LlamaParams {
        n_ctx: n_ctx as u32,
        n_threads: THREADS as i32,
        cache_f16: true,
        ..LlamaParams::default()
    };
    let mut r = LlamaContext::load(&path, params).unwrap();
    let (mut ref_pp, mut ref_tg) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        r.clear();
        let t = Instant::now();
        r.logits(&ids[..PREFILL], PREFILL).unwrap();
        ref_pp.push(PREFILL as f64 / t.elapsed().as_secs_f64());
        r.clear();
        r.logits(&ids[..PREFILL], PREFILL).unwrap();
        let t = Instant::now();
        r.decode_one_by_one(&ids[PREFILL..], PREFILL).unwrap();
        ref_tg.push(DECODE as f64 / t.elapsed().as_secs_f64());
    }
    let (opp, otg, rpp, rtg) = (
        median(ours_pp),
        median(ours_tg),
        median(ref_pp),
        median(ref_tg),
    );
    println!("tiny model (TinyConfig::small, F32 weights, F16 cache), {THREADS} threads, median of {reps}:");
    println!(
        "  prefill {PREFILL}: ferrite {opp:8.1} tok/s   llama.cpp {rpp:8.1} tok/s   ratio {:.2}",
        opp / rpp
    );
    println!(
        "  decode  {DECODE}: ferrite {otg:8.1} tok/s   llama.cpp {rtg:8.1} tok/s   ratio {:.2}",
        otg / rtg
    );
}
