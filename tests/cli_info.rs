//! `ferrite info` end to end: text and JSON on a DeepSeek V4 layout, split models, and bad input.

use std::path::Path;
use std::process::{Command, Output};

use gguf::{Array, GgmlType, Value, Writer};
use serde_json::Value as Json;

fn ferrite(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A 4-layer deepseek4 file with the tensors that matter for sizes (data all zero): layers 0..3 with
/// ratios [0, 4, 128, 0], 8 experts of width 64 on hidden 256, Q4_K experts and F16/F32 for the rest.
fn deepseek4_writer() -> Writer {
    let mut w = Writer::new();
    w.set("general.architecture", Value::String("deepseek4".into()));
    w.set("deepseek4.block_count", Value::U32(4));
    w.set("deepseek4.embedding_length", Value::U32(256));
    w.set("deepseek4.expert_count", Value::U32(8));
    w.set("deepseek4.expert_used_count", Value::U32(2));
    w.set("deepseek4.expert_shared_count", Value::U32(1));
    w.set("deepseek4.expert_feed_forward_length", Value::U32(64));
    w.set("deepseek4.hash_layer_count", Value::U32(2));
    w.set(
        "deepseek4.attention.compress_ratios",
        Value::Array(Array::I32(vec![0, 4, 128, 0, 0])),
    );
    w.set(
        "tokenizer.ggml.tokens",
        Value::string_array((0..300).map(|i| format!("t{i}"))),
    );
    w.add_tensor("token_embd.weight", &[256, 1000], GgmlType::F16)
        .unwrap();
    w.add_tensor("output.weight", &[256, 1000], GgmlType::F16)
        .unwrap();
    for l in 0..4 {
        w.add_tensor(&format!("blk.{l}.attn_norm.weight"), &[256], GgmlType::F32)
            .unwrap();
        w.add_tensor(
            &format!("blk.{l}.ffn_gate_exps.weight"),
            &[256, 64, 8],
            GgmlType::Q4K,
        )
        .unwrap();
        w.add_tensor(
            &format!("blk.{l}.ffn_up_exps.weight"),
            &[256, 64, 8],
            GgmlType::Q4K,
        )
        .unwrap();
        w.add_tensor(
            &format!("blk.{l}.ffn_down_exps.weight"),
            &[64, 256, 8],
            GgmlType::Q8_0,
        )
        .unwrap();
    }
    w
}

fn write(w: &Writer, path: &Path) {
    w.write_file(path, false, |_, t, out| {
        out.write_all(&vec![0u8; t.n_bytes as usize])
    })
    .unwrap();
}

// Expected sizes of the file above.
const EMBD: u64 = 256 * 1000 * 2;
const NORMS: u64 = 4 * 256 * 4;
const GATE: u64 = 64 * 8 * 144; // one Q4_K block per row of 256
const DOWN: u64 = 256 * 8 * 2 * 34; // two Q8_0 blocks per row of 64
const PER_EXPERT: u64 = (2 * GATE + DOWN) / 8;

#[test]
fn deepseek4_summary_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ds4.gguf");
    write(&deepseek4_writer(), &path);
    let out = ferrite(&["info", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in [
        "model (deepseek4):",
        "4 layers: 2 raw-window, 1 ratio-4 with indexer, 1 ratio-128",
        "schedule:    raw csa hca raw",
        "8 routed per layer, 2 used per token, width 64, 1 shared; hash routing in the first 2 layers",
        "[string x 300: \"t0\", \"t1\",",
        "blk.3.ffn_down_exps.weight",
        "q4_K",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("t299"), "long arrays must be summarised");

    let out = ferrite(&["info", "--json", path.to_str().unwrap()]);
    assert!(out.status.success());
    let j: Json = serde_json::from_slice(&out.stdout).unwrap();
    let m = &j["model"];
    let routed = 4 * (2 * GATE + DOWN);
    assert_eq!(m["bytes_routed"], routed);
    assert_eq!(m["bytes_other"], 2 * EMBD + NORMS);
    assert_eq!(m["params_routed"], 4 * 3 * 256 * 64 * 8);
    assert_eq!(m["expert_layers"][2]["bytes_per_expert"], PER_EXPERT);
    assert_eq!(
        m["layer_kinds"],
        serde_json::json!(["raw", "csa", "hca", "raw"])
    );
    // Active bytes: everything but the embedding table, one embedding row, 2 experts in each of 4 layers.
    assert_eq!(
        m["active_bytes_per_token"],
        EMBD + NORMS + 512 + 4 * 2 * PER_EXPERT
    );
    assert_eq!(j["tensors"].as_array().unwrap().len(), 2 + 4 * 4);
    assert_eq!(j["metadata"][9]["value"]["len"], 300);
}

#[test]
fn split_model_shows_shards() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("m");
    for s in 0..2u16 {
        let mut w = Writer::new();
        w.set("split.no", Value::U16(s));
        w.set("split.count", Value::U16(2));
        w.add_tensor(&format!("t{s}"), &[32], GgmlType::F32)
            .unwrap();
        write(&w, &gguf::split_path(&prefix, u64::from(s) + 1, 2));
    }
    let second = gguf::split_path(&prefix, 2, 2);
    let out = ferrite(&["info", second.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("shards:    2"), "{stdout}");
    assert!(stdout.contains("m-00001-of-00002.gguf"), "{stdout}");
}

#[test]
fn bad_files_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write(&deepseek4_writer(), &good);
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let out = ferrite(&["info", truncated.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("truncated.gguf") && err.contains("past its end"),
        "{err}"
    );
    assert!(err.contains("hint: the file is incomplete"), "{err}");
    assert!(out.stdout.is_empty());

    let not_gguf = dir.path().join("model.safetensors");
    std::fs::write(&not_gguf, b"{\"__metadata__\":{}}").unwrap();
    let out = ferrite(&["info", not_gguf.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("not a GGUF file") && err.contains("ferrite quantize"),
        "{err}"
    );

    let out = ferrite(&["info", dir.path().join("missing.gguf").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("No such file"));

    let out = ferrite(&["info", "--no-such-flag", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let out = ferrite(&["info"]);
    assert_eq!(out.status.code(), Some(2));
}
