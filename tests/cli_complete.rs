//! `ferrite complete -m demo` end to end: -p, -f and standard input give the same answer; stdout holds exactly the
//! answer's tokens, detokenized; --raw and --no-think change the prompt; bad flags exit 2, a missing or corrupt
//! model and an over-long prompt exit 1 with a message; Ctrl-C exits 130 with the partial answer out; a closed
//! stdout ends quietly.

mod support;

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use support::cli::{ok, run, text};

use ferrite::tokenizer::Tokenizer;

const BIN: &str = env!("CARGO_BIN_EXE_ferrite");

/// `ferrite complete -m demo -t 1 ARGS` with `stdin` (closed when `None`).
fn complete(args: &[&str], cache: &Path, stdin: Option<&[u8]>) -> Output {
    let args = [&["complete", "-m", "demo", "-t", "1"][..], args].concat();
    run(&args, cache, stdin)
}

/// Asserts a failure with `code`, nothing on stdout and `needle` on stderr.
fn fails(out: &Output, code: i32, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    assert!(err.contains(needle), "expected {needle:?} in stderr: {err}");
}

/// The ids after `label` on a `--verbose` line of stderr.
fn ids_after(stderr: &str, label: &str) -> Vec<u32> {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix(&format!("ferrite: {label}: ")))
        .unwrap_or_else(|| panic!("no {label:?} line in {stderr}"));
    let inner = line.trim().trim_start_matches('[').trim_end_matches(']');
    inner
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect()
}

fn demo_tokenizer(cache: &Path) -> Tokenizer {
    let model = gguf::Model::open(cache.join("demo-v1.gguf")).unwrap();
    Tokenizer::from_gguf(&model).unwrap()
}

#[test]
fn prompt_from_flag_file_and_stdin_gives_the_same_answer() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, "Why is the sky blue?\n").unwrap();
    let common = ["--seed", "7", "-n", "24"];
    let (a, err) = ok(&complete(
        &[&common[..], &["-p", "Why is the sky blue?"]].concat(),
        dir.path(),
        None,
    ));
    assert!(err.contains("seed 7"), "{err}");
    assert!(err.contains("tok/s"), "{err}");
    let (b, _) = ok(&complete(
        &[&common[..], &["-f", file.to_str().unwrap()]].concat(),
        dir.path(),
        None,
    ));
    let (c, _) = ok(&complete(
        &common,
        dir.path(),
        Some(b"Why is the sky blue?\n"),
    ));
    assert!(!a.is_empty());
    assert_eq!(a, b, "-p vs -f");
    assert_eq!(a, c, "-p vs stdin");
}

#[test]
fn stdout_is_exactly_the_answer_and_greedy_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["-p", "hello", "--temp", "0", "-n", "40", "--verbose"];
    let first = complete(&args, dir.path(), None);
    let (out, err) = ok(&first);
    let answer = ids_after(&err, "answer ids");
    assert_eq!(answer.len(), 40, "{err}");
    assert!(err.contains("stopped: token limit"), "{err}");
    let tok = demo_tokenizer(dir.path());
    assert_eq!(out.as_bytes(), first.stdout.as_slice());
    assert_eq!(
        out,
        tok.decode(&answer),
        "stdout must hold the answer and nothing else"
    );
    // The prompt went through the chat format, thinking on by default.
    let prompt = ids_after(&err, "prompt ids");
    assert_eq!(
        tok.decode(&prompt),
        "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜><think>"
    );
    let (again, _) = ok(&complete(&args, dir.path(), None));
    assert_eq!(out, again, "--temp 0 must repeat itself");
}

#[test]
fn raw_system_and_no_think_change_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let tok_prompt = |extra: &[&str]| {
        let args = [
            &["-p", "hello", "--temp", "0", "-n", "8", "--verbose"][..],
            extra,
        ]
        .concat();
        let (out, err) = ok(&complete(&args, dir.path(), None));
        (
            demo_tokenizer(dir.path()).decode(&ids_after(&err, "prompt ids")),
            out,
        )
    };
    let (chat, chat_out) = tok_prompt(&[]);
    let (raw, raw_out) = tok_prompt(&["--raw"]);
    assert_eq!(raw, "hello");
    assert_ne!(chat_out, raw_out, "--raw should change the answer");
    let (no_think, _) = tok_prompt(&["--no-think"]);
    assert!(no_think.ends_with("<｜Assistant｜></think>"), "{no_think}");
    let (think, _) = tok_prompt(&["--no-think", "--think"]);
    assert_eq!(think, chat);
    let (system, _) = tok_prompt(&["--system", "Be brief."]);
    assert!(
        system.starts_with("<｜begin▁of▁sentence｜>Be brief.<｜User｜>hello"),
        "{system}"
    );
}

#[test]
fn bad_input_gives_a_message_and_an_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        &["-p", "x", "--bogus"][..],
        &["-p", "x", "-n", "-5"],
        &["-p", "x", "--temp", "hot"],
        &["-p", "x", "-f", "file.txt"],
        &["-p", "x", "--raw", "--system", "s"],
    ] {
        let out = complete(bad, dir.path(), None);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty());
    }

    // No prompt anywhere: standard input closed or empty.
    fails(&complete(&[], dir.path(), None), 1, "no prompt");
    fails(&complete(&[], dir.path(), Some(b"")), 1, "no prompt");
    fails(
        &complete(&["-f", "/nonexistent/prompt.txt"], dir.path(), None),
        1,
        "cannot read the prompt file",
    );

    // Over-long prompt: both numbers in the message.
    let long = "word ".repeat(50);
    let out = complete(&["-p", &long, "-c", "16"], dir.path(), None);
    fails(&out, 1, "but the context holds 16");
    assert!(
        text(&out.stderr).contains("hint: raise -c"),
        "{}",
        text(&out.stderr)
    );

    // Missing and corrupt model files (not `-m demo`).
    let run_model = |model: &Path| {
        Command::new(BIN)
            .args(["complete", "-m", model.to_str().unwrap(), "-p", "x"])
            .env("FERRITE_CACHE_DIR", dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    fails(
        &run_model(&dir.path().join("missing.gguf")),
        1,
        "does not exist",
    );
    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00garbage that is not a model").unwrap();
    fails(&run_model(&corrupt), 1, "ferrite: error:");
}

/// Spawns `complete` with a long greedy answer, waits for its first output, sends SIGINT; returns (stdout, status).
#[test]
fn ctrl_c_stops_the_answer_with_exit_code_130() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "complete",
            "-m",
            "demo",
            "-t",
            "1",
            "-p",
            "hello",
            "--temp",
            "0",
            "-n",
            "-1",
            "--verbose",
        ])
        .env("FERRITE_CACHE_DIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = vec![0u8; 64];
    let n = stdout.read(&mut got).unwrap();
    assert!(n > 0, "no output before the interrupt");
    got.truncate(n);
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    stdout.read_to_end(&mut got).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr: {err}");
    assert!(err.contains("stopped: interrupted"), "{err}");
    // What was generated is out, and only that.
    let answer = ids_after(&err, "answer ids");
    assert!(
        !answer.is_empty() && answer.len() < 451,
        "{} tokens",
        answer.len()
    );
    assert_eq!(text(&got), demo_tokenizer(dir.path()).decode(&answer));
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "complete", "-m", "demo", "-t", "1", "-p", "hello", "--temp", "0", "-n", "-1",
        ])
        .env("FERRITE_CACHE_DIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    assert!(stdout.read(&mut first).unwrap() > 0);
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(!err.contains("error"), "{err}");
}

/// A copy of the demo model with `tokenizer.chat_template` set to `template`.
fn demo_with_template(cache: &Path, dir: &Path, template: &str) -> std::path::PathBuf {
    let src = gguf::GgufFile::open(cache.join("demo-v1.gguf")).unwrap();
    let mut w = gguf::Writer::from_header(src.header()).unwrap();
    w.set(
        "tokenizer.chat_template",
        gguf::Value::String(template.into()),
    );
    let out = dir.join("templated.gguf");
    w.write_file(&out, true, |i, _, sink| {
        sink.write_all(src.tensor_data(&src.header().tensors[i]))
    })
    .unwrap();
    out
}

#[test]
/// One prompt-format policy for `complete` and `chat` (README, "Usage"): a model template that renders differently
/// from DeepSeek V4's format is set aside with a note, and both commands use the built-in format. (Until the
/// generation API moved into the library, `complete` used such a template and `chat` ignored it.)
fn a_chat_template_that_differs_is_set_aside_by_complete_and_chat() {
    let dir = tempfile::tempdir().unwrap();
    // Generate the demo model in this cache first.
    ok(&complete(
        &["-p", "hi", "-n", "1", "--temp", "0"],
        dir.path(),
        None,
    ));
    let template =
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}\
                    {% if add_generation_prompt %}<｜Assistant｜>{% endif %}";
    let model = demo_with_template(dir.path(), dir.path(), template);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "complete",
            "-m",
            model.to_str().unwrap(),
            "-t",
            "1",
            "-n",
            "1",
            "--temp",
            "0",
            "--verbose",
            "-p",
            "hi",
        ];
        args.extend_from_slice(extra);
        Command::new(BIN)
            .args(&args)
            .env("FERRITE_CACHE_DIR", dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let (_, err) = ok(&run(&[]));
    assert!(
        err.contains("prompt text: \"<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\""),
        "{err}"
    );
    assert!(
        err.contains("chat template renders differently")
            && err.contains("using DeepSeek V4's format"),
        "{err}"
    );
    let chat = support::cli::run(
        &["chat", "-m", model.to_str().unwrap(), "-t", "1", "-n", "1"],
        dir.path(),
        Some(b"hi\n"),
    );
    let (_, err) = ok(&chat);
    assert!(err.contains("chat template renders differently"), "{err}");
    // --raw bypasses any chat format.
    let (_, err) = ok(&run(&["--raw"]));
    assert!(err.contains("prompt text: \"hi\""), "{err}");
}

/// `--prompt-cache FILE`: the first run writes the session after its prompt, later runs start from the prefix they
/// share with it and answer with the tokens of a cold run (greedy); a file from other sizes or a corrupt one is
/// ignored with a note; `--prompt-cache-ro` leaves the file as it was.
#[test]
fn prompt_cache_reuse_gives_the_tokens_of_a_cold_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("prompt.cache");
    let f = file.to_str().unwrap();
    let answer = |prompt: &str, extra: &[&str]| -> (Vec<u32>, String) {
        let args = [
            &["--temp", "0", "-n", "24", "--verbose", "-p", prompt][..],
            extra,
        ]
        .concat();
        let (_, err) = ok(&complete(&args, d, None));
        (ids_after(&err, "answer ids"), err)
    };
    let first = "Tell me about the sea.";
    let longer = "Tell me about the sea and the sky above it.";
    let other = "Something else entirely, please.";
    let cold: Vec<Vec<u32>> = [first, longer, other]
        .iter()
        .map(|p| answer(p, &[]).0)
        .collect();
    assert!(cold[0].len() > 3 && cold[0] != cold[2], "{cold:?}");

    let (ids, err) = answer(first, &["--prompt-cache", f]);
    assert_eq!(ids, cold[0]);
    assert!(err.contains("does not exist yet"), "{err}");
    assert!(file.exists());
    // The same prompt: everything but its last token comes from the file.
    let (ids, err) = answer(first, &["--prompt-cache", f]);
    assert_eq!(ids, cold[0]);
    assert!(err.contains("reused from"), "{err}");
    assert!(err.contains("prompt: 1 tokens"), "{err}");
    // A longer prompt with the same beginning, then an unrelated one.
    for (prompt, want) in [(longer, &cold[1]), (other, &cold[2]), (first, &cold[0])] {
        let (ids, err) = answer(prompt, &["--prompt-cache", f]);
        assert_eq!(&ids, want, "{prompt}: {err}");
    }
    // Read-only: the file stays as it is.
    let before = std::fs::read(&file).unwrap();
    let (ids, _) = answer(longer, &["--prompt-cache", f, "--prompt-cache-ro"]);
    assert_eq!(ids, cold[1]);
    assert_eq!(std::fs::read(&file).unwrap(), before);
    // Another context size: ignored with a note, the answer of a cold run with that size.
    let (want, _) = answer(first, &["-c", "1024"]);
    let (ids, err) = answer(first, &["-c", "1024", "--prompt-cache", f]);
    assert_eq!(ids, want);
    assert!(err.contains("another model or other sizes"), "{err}");
    // A corrupt file: ignored with a note.
    std::fs::write(&file, b"not a session at all").unwrap();
    let (ids, err) = answer(first, &["--prompt-cache", f]);
    assert_eq!(ids, cold[0]);
    assert!(err.contains("not a ferrite session file"), "{err}");
    // -ro needs the file.
    let out = complete(&["-p", "x", "--prompt-cache-ro"], d, None);
    assert_eq!(out.status.code(), Some(2));
}
