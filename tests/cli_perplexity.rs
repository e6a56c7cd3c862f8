//! `ferrite perplexity` end to end: the printed and the JSON perplexity equal llama.cpp's method applied to
//! llama.cpp's own tokens and logits (tokenized and evaluated in-process on the same GGUF), with and without a BOS
//! added per chunk, for a micro-batch that splits the chunks and for one that does not; `-f -` reads standard input;
//! a too-short text, a missing file or model and bad flags fail with a message (exit 1, or 2 for flags) and leave
//! stdout empty.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use support::cli::{ok, run as ferrite, text};

use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use ferrite::reference::llama::{LlamaContext, LlamaModel, LlamaParams};

/// Chunk size of the comparison: past one ratio-128 compressor block, so every layer kind takes part.
const N_CTX: usize = 160;
const N_CHUNKS: usize = 3;
/// Relative tolerance on the perplexity. ln(PPL) is the mean of per-token log-softmax values, each of which moves by
/// at most twice the largest absolute logit error, so the relative PPL error is at most twice that error. The demo
/// model's logits are below 5 in magnitude, and ferrite's logits agree with llama.cpp's to about 2.5e-6 of that
/// scale on F32 tiny models (README; tests/cli_logits.rs allows 1e-4): at most ~2.5e-5 relative, under 1e-4. Today
/// both run the same ggml kernels in the same order and the perplexities agree to ~1e-15 (the test prints it). Any
/// real mistake (a wrong token, a shifted position, a missing BOS, an off-by-one in the scored range) moves a
/// perplexity near 700 by far more than 1e-4.
const REL_TOL: f64 = 1e-4;

/// Asserts a failure with `code`, nothing on stdout and every needle on stderr.
fn fails(out: &Output, code: i32, needles: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in stderr: {err}");
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// English-like text with digits, punctuation, line breaks and the texts of special tokens (scored as plain text:
/// perplexity tokenizes without special-token parsing, as llama.cpp does).
fn sample_text(n_words: usize) -> String {
    let words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog;",
        "while",
        "2024",
        "wizards",
        "hex",
        "jumbo",
        "frogs.",
        "Why",
        "is",
        "the",
        "sky",
        "blue?",
        "<think>",
        "</think>",
        "<｜User｜>",
        "naïve",
        "café",
        "(42)",
        "\n",
        "  ",
        "ok!",
    ];
    let mut s = 0x5eedu64;
    let mut out = String::new();
    for i in 0..n_words {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let w = words[((s >> 33) % words.len() as u64) as usize];
        if i > 0 {
            out.push(' ');
        }
        out.push_str(w);
    }
    out.push('\n');
    out
}

/// The demo model (`TinyConfig::demo()`, the `-m demo` seed) written to `dir`, and a copy with
/// `tokenizer.ggml.add_bos_token = true`.
fn models(dir: &Path) -> (PathBuf, PathBuf) {
    let plain = dir.join("demo.gguf");
    write_tiny_model(&plain, &TinyConfig::demo(), 1).unwrap();
    let src = gguf::GgufFile::open(&plain).unwrap();
    let mut w = gguf::Writer::from_header(src.header()).unwrap();
    w.set("tokenizer.ggml.add_bos_token", gguf::Value::Bool(true));
    let bos = dir.join("demo-bos.gguf");
    w.write_file(&bos, true, |i, _, sink| {
        sink.write_all(src.tensor_data(&src.header().tensors[i]))
    })
    .unwrap();
    (plain, bos)
}

/// llama.cpp's `llama_vocab_get_add_bos` for `path` (vocabulary-only load).
fn llama_add_bos(path: &Path) -> bool {
    use llama_cpp_sys_2 as sys;
    // Initialises the backend and silences llama.cpp's log.
    drop(LlamaModel::load_vocab_only(path).unwrap());
    let c_path = std::ffi::CString::new(path_str(path)).unwrap();
    // SAFETY: default parameters with vocab_only; the path is NUL-terminated and outlives the call; the model is
    // freed once, after its vocabulary was read.
    unsafe {
        let mut mp = sys::llama_model_default_params();
        mp.vocab_only = true;
        mp.n_gpu_layers = 0;
        let model = sys::llama_model_load_from_file(c_path.as_ptr(), mp);
        assert!(!model.is_null());
        let add = sys::llama_vocab_get_add_bos(sys::llama_model_get_vocab(model));
        sys::llama_model_free(model);
        add
    }
}

/// What llama-perplexity computes, from llama.cpp's tokens and logits.
struct Reference {
    n_tokens: usize,
    running: Vec<f64>,
    ppl: f64,
    error: f64,
    count: usize,
}

/// llama.cpp's perplexity method over `text` (one trailing `\n` dropped as its `-f` does), every chunk evaluated
/// from an empty cache `ubatch` tokens per decode, f64 log-softmax.
fn reference(
    model: &Path,
    text: &str,
    n_ctx: usize,
    max_chunks: usize,
    ubatch: usize,
) -> Reference {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let add_bos = llama_add_bos(model);
    let mut llama = LlamaContext::load(
        model,
        LlamaParams {
            n_ctx: n_ctx as u32,
            n_batch: ubatch as u32,
            n_ubatch: ubatch as u32,
            cache_f16: true,
            ..LlamaParams::default()
        },
    )
    .unwrap();
    let (bos, _) = llama.model().bos_eos();
    let mut tokens = Vec::new();
    if add_bos {
        tokens.push(bos);
    }
    tokens.extend(llama.model().tokenize(text, false).unwrap());
    let n_chunks = (tokens.len() / n_ctx).min(max_chunks);
    assert!(n_chunks > 0);
    let first = n_ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut running = Vec::new();
    for c in 0..n_chunks {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if add_bos {
            chunk[0] = bos;
        }
        let rows = llama.logits(&chunk, ubatch).unwrap();
        for i in first..n_ctx - 1 {
            let row = &rows[i];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            let v = sum.ln() - (row[chunk[i + 1] as usize] as f64 - max);
            nll += v;
            nll2 += v * v;
            count += 1;
        }
        running.push((nll / count as f64).exp());
    }
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    Reference {
        n_tokens: tokens.len(),
        running,
        ppl,
        error: (var / (count as f64 - 1.0)).sqrt() * ppl,
        count,
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// `[1]858.6602,[2]875.4741,` and `Final estimate: PPL = X +/- Y` from the text output.
fn parse_text(stdout: &str) -> (Vec<f64>, f64, f64) {
    let mut lines = stdout.lines();
    let progress = lines.next().expect("a progress line");
    let running: Vec<f64> = progress
        .split(',')
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, item)| {
            let value = item
                .strip_prefix(&format!("[{}]", i + 1))
                .unwrap_or_else(|| panic!("bad progress item {item:?} in {stdout}"));
            value.parse().unwrap()
        })
        .collect();
    let last = lines.next().expect("a final line");
    let rest = last
        .strip_prefix("Final estimate: PPL = ")
        .unwrap_or_else(|| panic!("bad final line {last:?}"));
    let (ppl, err) = rest.split_once(" +/- ").unwrap();
    assert!(lines.next().is_none(), "extra output: {stdout}");
    (running, ppl.parse().unwrap(), err.parse().unwrap())
}

fn check_against(
    model: &Path,
    text_file: &Path,
    cache: &Path,
    ubatch: usize,
    expect_bos: bool,
) -> serde_json::Value {
    let text = std::fs::read_to_string(text_file).unwrap();
    let r = reference(model, &text, N_CTX, N_CHUNKS, ubatch);
    let c = N_CTX.to_string();
    let ub = ubatch.to_string();
    let chunks = N_CHUNKS.to_string();
    let base = [
        "perplexity",
        "-m",
        path_str(model),
        "-f",
        path_str(text_file),
        "-c",
        &c,
        "--ubatch",
        &ub,
        "--chunks",
        &chunks,
        "-t",
        "1",
    ];

    let (out, err) = ok(&ferrite(&base, cache, None));
    let (running, ppl, error) = parse_text(&out);
    assert_eq!(running.len(), N_CHUNKS, "{out}");
    for (i, (ours, theirs)) in running.iter().zip(&r.running).enumerate() {
        // Printed with 4 decimals: rounding adds at most 5e-5 absolute.
        assert!(
            (ours - theirs).abs() <= REL_TOL * theirs + 5e-5,
            "--ubatch {ubatch}: chunk {}: ferrite {ours} vs llama.cpp method {theirs}",
            i + 1
        );
    }
    assert!(
        rel(ppl, r.ppl) <= REL_TOL + 1e-7,
        "--ubatch {ubatch}: PPL {ppl} vs {}",
        r.ppl
    );
    assert!(
        rel(error, r.error) <= 1e-3,
        "--ubatch {ubatch}: error {error} vs {}",
        r.error
    );
    assert!(err.contains("tokens scored"), "{err}");

    let (json_out, json_err) = ok(&ferrite(&[&base[..], &["--json"]].concat(), cache, None));
    assert!(
        json_err.contains("[1]"),
        "progress goes to stderr with --json: {json_err}"
    );
    let v: serde_json::Value = serde_json::from_str(json_out.trim()).unwrap();
    assert_eq!(
        v["n_tokens"], r.n_tokens,
        "ferrite and llama.cpp tokenize the text alike"
    );
    assert_eq!(v["n_scored"], r.count);
    assert_eq!(v["n_chunks"], N_CHUNKS);
    assert_eq!(v["n_ctx"], N_CTX);
    assert_eq!(v["add_bos"], expect_bos);
    let json_ppl = v["ppl"].as_f64().unwrap();
    let rel_err = rel(json_ppl, r.ppl);
    eprintln!(
        "--ubatch {ubatch}, BOS {expect_bos}: ferrite {json_ppl} vs llama.cpp {} (relative {rel_err:.2e})",
        r.ppl
    );
    assert!(
        rel_err <= REL_TOL,
        "--ubatch {ubatch}: JSON PPL {json_ppl} vs {}",
        r.ppl
    );
    assert!(rel(v["ppl_error"].as_f64().unwrap(), r.error) <= 1e-3);
    for (ours, theirs) in v["running_ppl"].as_array().unwrap().iter().zip(&r.running) {
        assert!(rel(ours.as_f64().unwrap(), *theirs) <= REL_TOL);
    }
    v
}

#[test]
fn perplexity_matches_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, bos) = models(dir.path());
    assert!(!llama_add_bos(&plain), "the demo vocabulary adds no BOS");
    assert!(llama_add_bos(&bos));
    let file = dir.path().join("text.txt");
    std::fs::write(&file, sample_text(900)).unwrap();

    // 64 splits each chunk into micro-batches (one before the scored half, one across its start); 160 is one.
    let a = check_against(&plain, &file, dir.path(), 64, false);
    let b = check_against(&plain, &file, dir.path(), N_CTX, false);
    assert!(rel(a["ppl"].as_f64().unwrap(), b["ppl"].as_f64().unwrap()) <= REL_TOL);
    let c = check_against(&bos, &file, dir.path(), 64, true);
    assert_eq!(c["n_tokens"], a["n_tokens"].as_u64().unwrap() + 1);
    assert_ne!(c["ppl"], a["ppl"], "a BOS per chunk changes what is scored");
}

#[test]
fn stdin_and_demo_model() {
    let dir = tempfile::tempdir().unwrap();
    let text = sample_text(400);
    let file = dir.path().join("t.txt");
    std::fs::write(&file, &text).unwrap();
    let args = ["perplexity", "-m", "demo", "-c", "96", "-t", "1", "--json"];
    let (from_file, _) = ok(&ferrite(
        &[&args[..], &["-f", path_str(&file)]].concat(),
        dir.path(),
        None,
    ));
    let (from_stdin, _) = ok(&ferrite(
        &[&args[..], &["-f", "-"]].concat(),
        dir.path(),
        Some(text.as_bytes()),
    ));
    let a: serde_json::Value = serde_json::from_str(&from_file).unwrap();
    let b: serde_json::Value = serde_json::from_str(&from_stdin).unwrap();
    assert_eq!(a["ppl"], b["ppl"]);
    assert_eq!(a["n_tokens"], b["n_tokens"]);
    let ppl = a["ppl"].as_f64().unwrap();
    // A random model over 512 tokens: finite and of the order of the vocabulary.
    assert!(ppl.is_finite() && ppl > 1.0, "{a}");
    // -b caps the micro-batch; the chunks are all the text holds.
    assert_eq!(a["n_ubatch"], 96);
    let n_tokens = a["n_tokens"].as_u64().unwrap();
    assert_eq!(a["n_chunks"], n_tokens / 96);
    let (capped, _) = ok(&ferrite(
        &[
            &args[..],
            &["-f", path_str(&file), "-b", "32", "--chunks", "1"],
        ]
        .concat(),
        dir.path(),
        None,
    ));
    let c: serde_json::Value = serde_json::from_str(&capped).unwrap();
    assert_eq!(c["n_ubatch"], 32);
    assert_eq!(c["n_chunks"], 1);
    assert_eq!(c["n_scored"], 96 - 1 - 48);
}

#[test]
fn bad_input_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let short = d.join("short.txt");
    std::fs::write(&short, "Hello there.\n").unwrap();
    let run = |extra: &[&str], stdin: Option<&[u8]>| {
        ferrite(&[&["perplexity", "-t", "1"][..], extra].concat(), d, stdin)
    };

    let out = run(&["-m", "demo", "-f", path_str(&short)], None);
    fails(&out, 1, &["too short", "needs at least 512", "has "]);
    let err = text(&out.stderr);
    assert!(err.contains("hint:"), "{err}");
    let tiny = d.join("tiny.txt");
    std::fs::write(&tiny, "Hi").unwrap();
    fails(
        &run(&["-m", "demo", "-f", path_str(&tiny), "-c", "8"], None),
        1,
        &["needs at least 8"],
    );
    fails(
        &run(&["-m", "demo", "-f", path_str(&d.join("nope.txt"))], None),
        1,
        &["cannot read the text file", "nope.txt", "hint:"],
    );
    fails(
        &run(&["-m", "demo", "-f", path_str(d)], None),
        1,
        &["is a folder"],
    );
    fails(
        &run(&["-m", "demo", "-f", "-"], Some(b"")),
        1,
        &["standard input is empty"],
    );
    fails(
        &run(&["-m", "demo", "-f", "-"], Some(b"abc\xff\xfe")),
        1,
        &["not UTF-8"],
    );
    fails(
        &run(&["-m", "demo", "-f", path_str(&short), "-c", "2"], None),
        1,
        &["leaves no token to score"],
    );
    fails(
        &run(
            &[
                "-m",
                path_str(&d.join("missing.gguf")),
                "-f",
                path_str(&short),
            ],
            None,
        ),
        1,
        &["missing.gguf does not exist"],
    );

    let no_vocab = d.join("no-vocab.gguf");
    write_tiny_model(&no_vocab, &TinyConfig::small(), 3).unwrap();
    fails(
        &run(&["-m", path_str(&no_vocab), "-f", path_str(&short)], None),
        1,
        &["has no vocabulary", "hint:"],
    );

    // Bad flags: clap's usage errors, exit 2.
    for bad in [
        &["-m", "demo"][..],
        &["-f", path_str(&short)],
        &["-m", "demo", "-f", path_str(&short), "--chunks", "0"],
        &["-m", "demo", "-f", path_str(&short), "-c", "many"],
        &["-m", "demo", "-f", path_str(&short), "-b", "0"],
        &["-m", "demo", "-f", path_str(&short), "--bogus"],
    ] {
        let out = run(bad, None);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty());
    }
}
