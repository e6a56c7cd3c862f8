//! The tiny-model generator against llama.cpp: every preset (and quantized variants) loads and gives finite logits,
//! llama.cpp's logits do not depend on how the prompt is fed, files are reproducible, and the demo vocabulary
//! tokenizes and detokenizes.

mod support;

use std::path::{Path, PathBuf};

use ferrite::model::tiny::{write_tiny_model, DemoVocab, TinyConfig, WeightTypes};
use ferrite::reference::llama::{LlamaContext, LlamaParams};
use gguf::GgmlType;
use support::compare::prompt;

/// Long enough for a ratio-128 row, an indexer that must choose, and a sliding raw window (DSV4.md section 7).
const PROMPT_LEN: usize = 211;
const SEED: u64 = 0x5eed;

fn params() -> LlamaParams {
    LlamaParams {
        n_ctx: 512,
        n_batch: 256,
        n_ubatch: 256,
        n_threads: 1,
        ..LlamaParams::default()
    }
}

fn write(dir: &Path, name: &str, cfg: &TinyConfig, seed: u64) -> PathBuf {
    let path = dir.join(name);
    let t = std::time::Instant::now();
    let m = write_tiny_model(&path, cfg, seed).unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!(
        "{name}: {} tensors, {} bytes, written in {:?}",
        m.n_tensors,
        m.file_bytes,
        t.elapsed()
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), m.file_bytes);
    path
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// What feeding the prompt whole, token by token and in chunks of 7 must give.
#[derive(Clone, Copy, PartialEq)]
enum Feeding {
    /// F32 weights: the same logits up to rounding (max |diff| <= 1e-4 of the largest logit).
    Exact,
    /// Quantized or 16-bit weights: llama.cpp quantizes activations (Q8_0/Q8_K/F16), so rounding noise of 1e-6
    /// flips an activation's rounding now and then, and routing / indexer top-k turn that into jumps that
    /// persist through the caches. Only a loose agreement holds (measured: argmax agrees on 88-100 % of
    /// positions, median per-position max |diff| 1e-3..8e-2 with logits of rms 1).
    Loose,
}

/// Per-position max |a - b|.
fn per_position(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<f32> {
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(std::slice::from_ref(x), std::slice::from_ref(y)))
        .collect()
}

fn compare_feeding(
    name: &str,
    whole: &[Vec<f32>],
    other: &[Vec<f32>],
    label: &str,
    feeding: Feeding,
    peak: f32,
) -> String {
    use ferrite::reference::llama::argmax;
    let per = per_position(whole, other);
    let max = per.iter().fold(0.0f32, |m, &d| m.max(d));
    let mut sorted = per.clone();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[sorted.len() / 2];
    let agree = whole
        .iter()
        .zip(other)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let first = per.iter().position(|&d| d > 1e-3);
    let report = format!(
        "{label}: max {max:.2e}, median {median:.2e}, argmax agrees {agree}/{}, first > 1e-3 at {first:?}",
        per.len()
    );
    match feeding {
        Feeding::Exact => assert!(max <= 1e-4 * peak.max(1.0), "{name}: {report}"),
        Feeding::Loose => {
            assert!(median <= 0.1 * peak.max(1.0), "{name}: {report}");
            assert!(agree * 10 >= per.len() * 8, "{name}: {report}");
        }
    }
    report
}

/// Writes and loads a model in llama.cpp, checks shape and finiteness of the whole-prompt logits, and compares
/// them with token-by-token and chunk-7 feeding.
fn check_model(name: &str, cfg: &TinyConfig, feeding: Feeding) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &format!("{name}.gguf"), cfg, SEED);
    let t = std::time::Instant::now();
    let mut llama = LlamaContext::load(&path, params()).unwrap();
    assert_eq!(llama.n_vocab(), cfg.n_vocab as usize);
    let tokens: Vec<i32> = prompt(PROMPT_LEN, cfg.n_vocab as usize, SEED ^ 1)
        .into_iter()
        .map(|t| t as i32)
        .collect();
    let whole = llama.logits(&tokens, PROMPT_LEN).unwrap();
    assert_eq!(whole.len(), PROMPT_LEN);
    assert!(whole.iter().all(|row| row.len() == cfg.n_vocab as usize));
    assert!(
        whole.iter().flatten().all(|x| x.is_finite()),
        "{name}: non-finite logits"
    );
    let n = whole.len() * whole[0].len();
    let rms = (whole.iter().flatten().map(|x| x * x).sum::<f32>() / n as f32).sqrt();
    let peak = whole.iter().flatten().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(rms > 0.05, "{name}: logits are nearly zero (rms {rms})");
    // Different positions must give different distributions (the model is not degenerate).
    assert!(max_abs_diff(&whole[..1], &whole[PROMPT_LEN - 1..]) > 1e-2);
    let one = llama.logits(&tokens, 1).unwrap();
    let seven = llama.logits(&tokens, 7).unwrap();
    eprintln!(
        "{name}: logit rms {rms:.3}, max |logit| {peak:.3}\n  {}\n  {}\n  ({:?} in llama.cpp)",
        compare_feeding(name, &whole, &one, "token by token", feeding, peak),
        compare_feeding(name, &whole, &seven, "chunks of 7", feeding, peak),
        t.elapsed()
    );
}

#[test]
fn small_loads_and_feeding_does_not_change_logits() {
    check_model("small", &TinyConfig::small(), Feeding::Exact);
}

#[test]
fn alt_loads_and_feeding_does_not_change_logits() {
    check_model("alt", &TinyConfig::alt(), Feeding::Exact);
}

#[test]
fn demo_loads_and_feeding_does_not_change_logits() {
    check_model("demo", &TinyConfig::demo(), Feeding::Exact);
}

#[test]
fn small_q8_0_dense_q4_k_experts_loads() {
    // k-quants need rows of 256: widen the experts (the down projection's rows are expert_ffn long).
    let types = WeightTypes {
        dense: GgmlType::Q8_0,
        experts: GgmlType::Q4K,
        shared: GgmlType::Q8_0,
        embed: GgmlType::Q8_0,
    };
    let cfg = TinyConfig {
        expert_ffn: 256,
        ..TinyConfig::small()
    }
    .with_types(types);
    check_model("small-q8_0-q4_k", &cfg, Feeding::Loose);
}

#[test]
fn small_f16_dense_mxfp4_experts_loads() {
    let types = WeightTypes {
        dense: GgmlType::F16,
        experts: GgmlType::Mxfp4,
        shared: GgmlType::Bf16,
        embed: GgmlType::F16,
    };
    check_model(
        "small-f16-mxfp4",
        &TinyConfig::small().with_types(types),
        Feeding::Loose,
    );
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let types = WeightTypes {
        experts: GgmlType::Q4_0,
        ..WeightTypes::F32
    };
    let cfg = TinyConfig::small().with_types(types);
    let read = |name: &str, seed| std::fs::read(write(dir.path(), name, &cfg, seed)).unwrap();
    let (a, b, c) = (read("a.gguf", 7), read("b.gguf", 7), read("c.gguf", 8));
    assert!(a == b, "same seed, different files");
    assert_eq!(a.len(), c.len());
    assert!(a != c, "different seeds, same file");
}

#[test]
fn bad_configurations_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let no_csa = TinyConfig {
        compress_ratios: vec![0, 128, 0, 128, 0, 0],
        ..TinyConfig::small()
    };
    assert!(write_tiny_model(&path, &no_csa, 1).is_err());
    // k-quant rows must be whole blocks of 256; small's experts are 64 wide.
    let k_quant = TinyConfig::small().with_types(WeightTypes {
        experts: GgmlType::Q4K,
        ..WeightTypes::F32
    });
    let err = write_tiny_model(&path, &k_quant, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("ffn_down_exps"), "{err}");
    assert!(!path.exists());
}

#[test]
fn demo_vocabulary_round_trips_through_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::demo();
    let path = write(dir.path(), "demo.gguf", &cfg, SEED);
    let mut llama = LlamaContext::load(&path, params()).unwrap();
    let vocab = DemoVocab::new(cfg.n_vocab);
    assert_eq!(llama.n_vocab(), vocab.tokens.len());
    assert_eq!(
        llama.model().bos_eos(),
        (vocab.bos as i32, vocab.eos as i32)
    );

    let text = "Hello world, the quick brown fox is in the garden.\n  Ünïcödé: 日本語 — 🦀 12345 <think>hmm</think>";
    let ids = llama.model().tokenize(text, false).unwrap();
    assert_eq!(
        llama.model().detokenize(&ids, false).unwrap(),
        text.as_bytes(),
        "round trip of {ids:?}"
    );
    let id_of = |t: &str| vocab.tokens.iter().position(|x| x == t).unwrap() as i32;
    assert!(ids.contains(&id_of("Ġthe")), "merges are applied: {ids:?}");
    assert!(
        ids.contains(&id_of("ing")) || ids.contains(&id_of("in")),
        "{ids:?}"
    );
    // USER_DEFINED tokens are matched in plain text.
    assert!(
        ids.contains(&(vocab.think as i32)) && ids.contains(&(vocab.think_end as i32)),
        "{ids:?}"
    );
    eprintln!("demo: {} bytes -> {} tokens", text.len(), ids.len());

    // CONTROL tokens only with parse_special, and rendered only with special = true.
    let chat = "<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜></think>Hello<｜end▁of▁sentence｜>";
    let ids = llama.model().tokenize(chat, true).unwrap();
    for id in [
        vocab.bos,
        vocab.user,
        vocab.assistant,
        vocab.think_end,
        vocab.eos,
    ] {
        assert!(ids.contains(&(id as i32)), "{id} missing from {ids:?}");
    }
    assert_eq!(
        llama.model().detokenize(&ids, true).unwrap(),
        chat.as_bytes()
    );
    assert_eq!(
        llama.model().detokenize(&ids, false).unwrap(),
        b"You are terse.Hi</think>Hello"
    );
    let plain = llama.model().tokenize(chat, false).unwrap();
    assert!(!plain.contains(&(vocab.user as i32)));

    // Text in, text out: greedy generation gives valid ids whose pieces can be printed.
    let out = llama
        .greedy(&llama.model().tokenize("The cat", false).unwrap(), 8)
        .unwrap();
    assert_eq!(out.len(), 8);
    assert!(out
        .iter()
        .all(|&t| t >= 0 && (t as usize) < vocab.tokens.len()));
    let _ = llama.model().detokenize(&out, true).unwrap();
}
