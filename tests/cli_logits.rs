//! `ferrite logits` end to end: the .npy equals llama.cpp's logits for any micro-batch, --tokens-file equals --tokens,
//! NumPy reads the file, `-m demo` is generated once (also under concurrent first use), and bad input gives a clear
//! message with exit code 1 (bad flags: 2) while stdout stays empty.

mod support;

use support::cli::text;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use ferrite::npy;
use ferrite::reference::llama::{LlamaContext, LlamaParams};
use gguf::{Value, Writer};
use support::compare::prompt;

/// Past two ratio-128 blocks, so every compressor completes blocks and carries a partial one.
const PROMPT_LEN: usize = 260;
const N_CTX: usize = 1024;

fn ferrite(args: &[&str], cache_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(args)
        .env("FERRITE_CACHE_DIR", cache_dir)
        .output()
        .unwrap()
}

/// Asserts success with nothing on stdout; returns stderr.
fn ok(out: &Output) -> String {
    let err = text(&out.stderr);
    assert!(out.status.success(), "ferrite failed: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    err
}

fn id_list(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Per row: max |ours - reference| over the reference's largest |logit|.
fn worst_relative_error(ours: &npy::ArrayF32, reference: &[Vec<f32>]) -> f32 {
    let n_vocab = ours.shape[1];
    assert_eq!(ours.shape, vec![reference.len(), reference[0].len()]);
    ours.data
        .chunks(n_vocab)
        .zip(reference)
        .map(|(a, b)| {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
        })
        .fold(0f32, f32::max)
}

#[test]
fn logits_match_llama_cpp_for_any_micro_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("small.gguf");
    let cfg = TinyConfig::small();
    write_tiny_model(&model, &cfg, 7).unwrap();
    let tokens = prompt(PROMPT_LEN, cfg.n_vocab as usize, 11);

    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let params = LlamaParams {
        n_ctx: N_CTX as u32,
        ..LlamaParams::default()
    };
    let reference = LlamaContext::load(&model, params)
        .unwrap()
        .logits(&ids, 512)
        .unwrap();

    let list = id_list(&tokens);
    let ctx = N_CTX.to_string();
    let mut files = Vec::new();
    for ubatch in ["512", "7"] {
        let out = dir.path().join(format!("ub{ubatch}.npy"));
        let args = [
            "logits",
            "-m",
            path_str(&model),
            "-t",
            "1",
            "-c",
            &ctx,
            "--ubatch",
            ubatch,
            "--cache-type",
            "f32",
            "--tokens",
            &list,
            "--out",
            path_str(&out),
        ];
        let err = ok(&ferrite(&args, dir.path()));
        assert!(err.contains(&format!("tokens:  {PROMPT_LEN}")), "{err}");
        assert!(err.contains("per token"), "{err}");
        assert!(err.contains("tokens/s"), "{err}");
        let ours = npy::read_f32(&out).unwrap();
        let worst = worst_relative_error(&ours, &reference);
        assert!(worst < 1e-4, "--ubatch {ubatch}: relative error {worst}");
        files.push(out);
    }

    // The same ids from a file (blank lines, surrounding whitespace) give the same bytes.
    let token_file = dir.path().join("tokens.txt");
    let lines: Vec<String> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if i % 50 == 0 {
                format!("  {t}\t\n")
            } else {
                t.to_string()
            }
        })
        .collect();
    fs::write(&token_file, format!("\n{}\n\n", lines.join("\n"))).unwrap();
    let from_file = dir.path().join("file.npy");
    let args = [
        "logits",
        "-m",
        path_str(&model),
        "-t",
        "1",
        "-c",
        &ctx,
        "--cache-type",
        "f32",
        "--tokens-file",
        path_str(&token_file),
        "--out",
        path_str(&from_file),
    ];
    ok(&ferrite(&args, dir.path()));
    assert_eq!(fs::read(&from_file).unwrap(), fs::read(&files[0]).unwrap());
}

#[test]
fn demo_model_is_generated_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = dir.path().join("demo.npy");
    let args = [
        "logits",
        "-m",
        "demo",
        "-t",
        "1",
        "--tokens",
        "1,2,3,4,5",
        "-o",
        path_str(&out),
    ];

    let first = ok(&ferrite(&args, &cache));
    assert!(first.contains("generating the demo model"), "{first}");
    assert!(cache.join("demo-v1.gguf").is_file());
    let a = npy::read_f32(&out).unwrap();
    assert_eq!(a.shape, vec![5, TinyConfig::demo().n_vocab as usize]);
    assert!(a.data.iter().all(|x| x.is_finite()));

    let second = ok(&ferrite(&args, &cache));
    assert!(!second.contains("generating"), "{second}");
    assert_eq!(
        npy::read_f32(&out).unwrap(),
        a,
        "an existing --out is replaced"
    );
    let names: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec!["demo-v1.gguf"],
        "no temporary files left behind"
    );
}

#[test]
fn concurrent_first_uses_of_demo_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let children: Vec<_> = (0..4)
        .map(|i| {
            let out = dir.path().join(format!("{i}.npy"));
            let child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
                .args([
                    "logits",
                    "-m",
                    "demo",
                    "-t",
                    "1",
                    "--tokens",
                    "7,8,9",
                    "-o",
                    path_str(&out),
                ])
                .env("FERRITE_CACHE_DIR", &cache)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (out, child)
        })
        .collect();
    let mut arrays = Vec::new();
    for (out, child) in children {
        ok(&child.wait_with_output().unwrap());
        arrays.push(npy::read_f32(&out).unwrap());
    }
    assert!(arrays.windows(2).all(|w| w[0] == w[1]));
    let names: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["demo-v1.gguf"]);
}

/// The Python with the pinned reference packages: $FERRITE_PYTHON (set by scripts/test.sh) or the repo's .venv.
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(p) = std::env::var_os("FERRITE_PYTHON") {
        return root.join(p);
    }
    let venv = root.join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no reference Python: run the tests with scripts/test.sh (it creates .venv), or set FERRITE_PYTHON"
    );
    venv
}

#[test]
fn numpy_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.npy");
    ok(&ferrite(
        &[
            "logits",
            "-m",
            "demo",
            "-t",
            "1",
            "--tokens",
            "3,1,4,1,5,9",
            "-o",
            path_str(&out),
        ],
        dir.path(),
    ));
    let ours = npy::read_f32(&out).unwrap();
    let script = "import sys, numpy as np\n\
                  a = np.load(sys.argv[1])\n\
                  print(a.dtype, a.shape, a.flags['C_CONTIGUOUS'], repr(float(a.astype(np.float64).sum())))";
    let py = Command::new(python())
        .args(["-c", script, path_str(&out)])
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", text(&py.stderr));
    let sum: f64 = ours.data.iter().map(|&x| x as f64).sum();
    let printed = text(&py.stdout);
    let fields: Vec<&str> = printed.trim().splitn(4, ' ').collect();
    assert_eq!(fields[..3], ["float32", "(6,", "512)"], "{printed}");
    let (contiguous, py_sum) = fields[3].split_once(' ').unwrap();
    assert_eq!(contiguous, "True");
    assert!(
        (py_sum.parse::<f64>().unwrap() - sum).abs() <= 1e-6 * sum.abs().max(1.0),
        "{printed} vs {sum}"
    );
}

/// Runs a failing command: exit code 1, nothing on stdout, one `ferrite: error:` line containing every `expected`.
fn fails(args: &[&str], cache: &Path, expected: &[&str]) -> String {
    let out = ferrite(args, cache);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(
        out.stdout.is_empty(),
        "{args:?}: stdout {}",
        text(&out.stdout)
    );
    assert!(err.starts_with("ferrite: error: "), "{args:?}: {err}");
    for e in expected {
        assert!(err.contains(e), "{args:?}: expected {e:?} in: {err}");
    }
    err
}

#[test]
fn bad_inputs_exit_1_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.npy");
    fs::write(&out, "keep").unwrap();
    let o = path_str(&out);
    // Generate the demo model once, so every case below opens a real model.
    let warm = d.join("warm.npy");
    ok(&ferrite(
        &[
            "logits",
            "-m",
            "demo",
            "-t",
            "1",
            "--tokens",
            "0",
            "-o",
            path_str(&warm),
        ],
        d,
    ));

    fails(
        &["logits", "-m", "demo", "--tokens", "1,2,512", "-o", o],
        d,
        &[
            "token id 512 (item 3 of --tokens) is out of range",
            "vocabulary has 512 tokens (ids 0 to 511)",
        ],
    );
    fails(
        &["logits", "-m", "demo", "--tokens", "1,2,x7", "-o", o],
        d,
        &["item 3 of --tokens: \"x7\" is not a token id"],
    );
    fails(
        &["logits", "-m", "demo", "--tokens", "1,-2", "-o", o],
        d,
        &["item 2 of --tokens: \"-2\" is not a token id"],
    );
    fails(
        &["logits", "-m", "demo", "--tokens", "1,,2", "-o", o],
        d,
        &["item 2 of --tokens: \"\" is not a token id"],
    );
    fails(
        &["logits", "-m", "demo", "--tokens", " ", "-o", o],
        d,
        &["--tokens is empty"],
    );
    let bad_file = d.join("bad.txt");
    fs::write(&bad_file, "1\n\n  2 \nthree\n").unwrap();
    fails(
        &[
            "logits",
            "-m",
            "demo",
            "--tokens-file",
            path_str(&bad_file),
            "-o",
            o,
        ],
        d,
        &["bad.txt line 4: \"three\" is not a token id"],
    );
    let far_file = d.join("far.txt");
    fs::write(&far_file, "1\n\n  999 \n").unwrap();
    fails(
        &[
            "logits",
            "-m",
            "demo",
            "--tokens-file",
            path_str(&far_file),
            "-o",
            o,
        ],
        d,
        &["token id 999 (", "far.txt line 3) is out of range"],
    );
    let empty_file = d.join("empty.txt");
    fs::write(&empty_file, "\n  \n").unwrap();
    fails(
        &[
            "logits",
            "-m",
            "demo",
            "--tokens-file",
            path_str(&empty_file),
            "-o",
            o,
        ],
        d,
        &["has no token ids"],
    );
    fails(
        &[
            "logits",
            "-m",
            "demo",
            "--tokens-file",
            path_str(&d.join("nope.txt")),
            "-o",
            o,
        ],
        d,
        &["cannot read the token file", "nope.txt"],
    );
    fails(
        &[
            "logits",
            "-m",
            "demo",
            "-c",
            "4",
            "--tokens",
            "1,2,3,4,5",
            "-o",
            o,
        ],
        d,
        &["the prompt has 5 tokens but the context holds 4 (-c 4): raise -c to at least 5"],
    );

    let missing = d.join("missing.gguf");
    let err = fails(
        &["logits", "-m", path_str(&missing), "--tokens", "1", "-o", o],
        d,
        &["model file", "missing.gguf does not exist"],
    );
    assert!(err.contains("\nhint: ") && err.contains("-m demo"), "{err}");

    let corrupt = d.join("corrupt.gguf");
    let demo_bytes = fs::read(d.join("demo-v1.gguf")).unwrap();
    fs::write(&corrupt, &demo_bytes[..demo_bytes.len() / 2]).unwrap();
    let err = fails(
        &["logits", "-m", path_str(&corrupt), "--tokens", "1", "-o", o],
        d,
        &["corrupt.gguf", "past its end"],
    );
    assert!(err.contains("\nhint: "), "{err}");
    let garbage = d.join("garbage.gguf");
    fs::write(&garbage, "this is not a model file at all").unwrap();
    fails(
        &["logits", "-m", path_str(&garbage), "--tokens", "1", "-o", o],
        d,
        &["garbage.gguf", "not a GGUF file"],
    );

    let llama = d.join("llama.gguf");
    let mut w = Writer::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.write_file(&llama, false, |_, _, _| Ok(())).unwrap();
    fails(
        &["logits", "-m", path_str(&llama), "--tokens", "1", "-o", o],
        d,
        &[
            "llama.gguf is not a usable DeepSeek V4 model",
            "architecture is \"llama\"",
            "deepseek4",
        ],
    );

    fails(
        &[
            "logits",
            "-m",
            "demo",
            "--tokens",
            "1",
            "-o",
            path_str(&d.join("no/such/dir/x.npy")),
        ],
        d,
        &["the folder", "does not exist"],
    );
    assert_eq!(
        fs::read_to_string(&out).unwrap(),
        "keep",
        "a failed run leaves --out alone"
    );
}

#[test]
fn bad_flags_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[&[&str]] = &[
        &["logits", "-m", "demo", "--tokens", "1"],
        &["logits", "-m", "demo", "-o", "x.npy"],
        &["logits", "--tokens", "1", "-o", "x.npy"],
        &[
            "logits",
            "-m",
            "demo",
            "--tokens",
            "1",
            "--tokens-file",
            "t.txt",
            "-o",
            "x.npy",
        ],
        &[
            "logits", "-m", "demo", "--tokens", "1", "-o", "x.npy", "--ubatch", "0",
        ],
        &[
            "logits", "-m", "demo", "--tokens", "1", "-o", "x.npy", "-t", "0",
        ],
        &[
            "logits", "-m", "demo", "--tokens", "1", "-o", "x.npy", "-c", "many",
        ],
        &[
            "logits",
            "-m",
            "demo",
            "--tokens",
            "1",
            "-o",
            "x.npy",
            "--frobnicate",
        ],
    ];
    for args in cases {
        let out = ferrite(args, d);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!text(&out.stderr).is_empty(), "{args:?}");
    }
    assert!(!d.join("demo-v1.gguf").exists(), "usage errors do no work");
}
