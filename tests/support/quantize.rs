//! What the quantizer tests share: running `ferrite quantize`, and logits of a file through ferrite and llama.cpp
//! (F32 cache, 512-token context, one thread) with the same-model rule of tests/parity_llama.rs.

use std::path::Path;
use std::process::{Command, Output};

use ferrite::cache::CacheType;
use ferrite::engine::{Engine, EngineOptions, Logits};

use super::compare::relative_errors;
use ferrite::reference::llama::{argmax, LlamaContext, LlamaParams};

/// `ferrite quantize ARGS -t THREADS`.
pub fn quantize(args: &[&str], threads: usize) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .arg("quantize")
        .args(args)
        .args(["-t", &threads.to_string()])
        .output()
        .unwrap()
}

/// `ferrite quantize INPUT OUTPUT --type RECIPE EXTRA...`, which must succeed; returns its stderr.
pub fn quantize_ok(
    input: &Path,
    output: &Path,
    recipe: &str,
    extra: &[&str],
    threads: usize,
) -> String {
    let mut args = vec![
        input.to_str().unwrap(),
        output.to_str().unwrap(),
        "--type",
        recipe,
    ];
    args.extend_from_slice(extra);
    let out = quantize(&args, threads);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "quantize {recipe} failed: {stderr}");
    stderr
}

/// ferrite's logits of every position for `tokens` fed whole.
pub fn ferrite_logits(path: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let options = EngineOptions {
        n_threads: 1,
        fused_ops: true,
        cache_type: CacheType::F32,
        // As the reference: ggml's plain kernels (`LlamaParams::repack` is off).
        repack: false,
        ..Default::default()
    };
    let e = Engine::open(path, options).unwrap();
    let mut s = e.session_sized(512, 512).unwrap();
    let flat = s.feed(tokens, Logits::All).unwrap();
    flat.chunks(e.n_vocab()).map(<[f32]>::to_vec).collect()
}

/// llama.cpp's logits of every position for `tokens`, in one call.
pub fn llama_logits(path: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let params = LlamaParams {
        n_ctx: 512,
        ..LlamaParams::default()
    };
    let mut r = LlamaContext::load(path, params).unwrap();
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    r.logits(&ids, 512).unwrap()
}

/// The same file in two engines: 99 % of positions within 1e-4 of the logit scale and 99 % of argmaxes equal (the
/// rule of tests/parity_llama.rs for quantized weights: routing and the indexer can turn a rounding-level difference
/// into a different choice at a few positions).
pub fn assert_same_model(what: &str, ours: &[Vec<f32>], reference: &[Vec<f32>]) {
    let errs = relative_errors(ours, reference);
    let within = errs.iter().filter(|&&e| e <= 1e-4).count() as f64 / errs.len() as f64;
    let argmax_same = ours
        .iter()
        .zip(reference)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count() as f64
        / ours.len() as f64;
    let worst = errs.iter().fold(0f32, |m, &e| m.max(e));
    eprintln!(
        "{what}: worst {worst:.2e}, {:.1} % within 1e-4, argmax {:.1} %",
        within * 100.0,
        argmax_same * 100.0
    );
    assert!(
        within >= 0.99,
        "{what}: only {:.1} % of positions within 1e-4",
        within * 100.0
    );
    assert!(
        argmax_same >= 0.99,
        "{what}: argmax agrees at {:.1} %",
        argmax_same * 100.0
    );
}
