//! `ferrite chat -m demo` driven through standard input (one user turn per line, commands too): a second turn
//! processes only its new tokens, /reset starts over, /save + /load continue a conversation exactly, Ctrl-C stops
//! an answer and keeps it; and through a pseudo-terminal (`script`), the rustyline prompt and Ctrl-D.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_ferrite");

fn chat(args: &[&str], cache: &Path, input: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(["chat", "-m", "demo", "-t", "1", "--temp", "0"])
        .args(args)
        .env("FERRITE_CACHE_DIR", cache)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "chat failed: {}", text(&out.stderr));
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// (processed, conversation) from every `last turn: P prompt tokens processed of T` line, in order.
fn turns(stderr: &str) -> Vec<(usize, usize)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("last turn: "))
        .filter(|l| *l != "none")
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(&w[1..5], ["prompt", "tokens", "processed", "of"], "{l}");
            (w[0].parse().unwrap(), w[5].parse().unwrap())
        })
        .collect()
}

#[test]
fn a_new_turn_processes_only_its_new_tokens_and_reset_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let out = chat(
        &["-n", "12"],
        dir.path(),
        "hello\n/stats\nhow are you?\n/stats\n/reset\n/stats\nhello\n/stats\n",
    );
    let err = text(&out.stderr);
    let t = turns(&err);
    assert_eq!(t.len(), 3, "{err}");
    // First turn: everything is new.
    assert_eq!(t[0].0, t[0].1, "{err}");
    // Second turn: only the end of the first answer and the new question.
    assert!(t[1].0 < t[1].1 - t[0].1, "{err}");
    assert!(t[1].1 > t[0].1 + 12);
    // After /reset, the same first turn again, processed whole.
    assert!(err.contains("conversation: 1 tokens, 0 answers"), "{err}");
    assert_eq!(t[2], t[0], "{err}");
    assert!(err.contains("2 answers"), "{err}");
    // Greedy: the turn after /reset repeats the first answer.
    let stdout = text(&out.stdout);
    let answers: Vec<&str> = stdout.split_inclusive('\n').collect();
    assert!(answers.len() >= 3, "{stdout:?}");
}

#[test]
fn save_and_load_continue_the_conversation_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("talk.session");
    let f = file.to_str().unwrap();
    let first = chat(
        &["-n", "10"],
        dir.path(),
        &format!("hello\n/save {f}\nand then?\n"),
    );
    assert!(Path::new(&format!("{f}.json")).is_file());
    let second = chat(
        &["-n", "10"],
        dir.path(),
        &format!("/load {f}\n/stats\nand then?\n/stats\n"),
    );
    let err = text(&second.stderr);
    assert!(err.contains("loaded"), "{err}");
    assert!(err.contains("2 messages"), "{err}");
    let t = turns(&err);
    assert_eq!(t.len(), 1, "{err}");
    // The loaded cache is reused: far fewer tokens processed than the conversation holds.
    assert!(t[0].0 < t[0].1 / 2, "{err}");
    // Greedy: the continued turn answers as the original process did.
    let a = text(&first.stdout);
    let b = text(&second.stdout);
    assert!(b.len() > 1 && a.ends_with(&b), "{a:?} vs {b:?}");
    assert_ne!(a, b);

    // A missing or broken file is an error message, not the end of the chat.
    let out = chat(&[], dir.path(), "/load /nonexistent/file\n/stats\n");
    let err = text(&out.stderr);
    assert!(
        err.contains("ferrite: error: cannot read the conversation"),
        "{err}"
    );
    assert!(err.contains("0 answers"), "{err}");
}

#[test]
fn multi_line_input_and_unknown_commands() {
    let dir = tempfile::tempdir().unwrap();
    let out = chat(
        &["-n", "4"],
        dir.path(),
        "first \\\nsecond\n\"\"\"\nthird\nfourth\n\"\"\"\n/bogus\n/help\n/nothink\n/stats\n/quit\nnot read\n",
    );
    let err = text(&out.stderr);
    assert!(err.contains("unknown command /bogus"), "{err}");
    assert!(err.contains("/save FILE"), "{err}");
    assert!(err.contains("thinking off"), "{err}");
    // Two user turns (the quit stops before the last line).
    assert!(err.contains("2 answers"), "{err}");
}

#[test]
fn ctrl_c_stops_the_answer_and_keeps_the_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["chat", "-m", "demo", "-t", "1", "--temp", "0", "-n", "-1"])
        .env("FERRITE_CACHE_DIR", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    stdin.flush().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = vec![0u8; 64];
    assert!(stdout.read(&mut got).unwrap() > 0);
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    stdin.write_all(b"/stats\n").unwrap();
    drop(stdin);
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(err.contains("answer stopped: interrupted"), "{err}");
    assert!(err.contains("1 answers"), "{err}");
}

/// Reads `stdout` into `seen` until `done(seen)`; fails at the end of the output.
fn read_until(
    stdout: &mut impl std::io::Read,
    seen: &mut Vec<u8>,
    what: &str,
    done: impl Fn(&str) -> bool,
) {
    let mut buf = [0u8; 256];
    while !done(&text(seen)) {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "output ended waiting for {what}: {}", text(seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

/// A real terminal through `script`: rustyline's prompt, Ctrl-C during an answer returns to the prompt with the
/// answer kept, Ctrl-D quits.
#[test]
fn terminal_session_through_a_pseudo_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` command");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cmd = format!("exec {BIN} chat -m demo -t 1 --temp 0 -n -1");
    let mut child = Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .env("FERRITE_CACHE_DIR", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A hung terminal must fail the test, not stall the suite.
    let pid = child.id().to_string();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(30));
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    });
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    read_until(&mut stdout, &mut seen, "the prompt", |s| s.contains("> "));
    stdin.write_all(b"hello\r").unwrap();
    stdin.flush().unwrap();
    let start = seen.len();
    read_until(&mut stdout, &mut seen, "an answer", |s| {
        s.len() > start + 200
    });
    stdin.write_all(b"\x03").unwrap();
    stdin.flush().unwrap();
    read_until(&mut stdout, &mut seen, "the stop and a new prompt", |s| {
        s.split_once("answer stopped: interrupted")
            .is_some_and(|(_, after)| after.contains("> "))
    });
    stdin.write_all(b"/stats\r").unwrap();
    stdin.flush().unwrap();
    // Keys typed before rustyline is back in raw mode can be lost: wait for the prompt after the stats.
    read_until(&mut stdout, &mut seen, "/stats and a new prompt", |s| {
        s.split_once("1 answers")
            .is_some_and(|(_, after)| after.contains("> "))
    });
    stdin.write_all(b"\x04").unwrap();
    stdin.flush().unwrap();
    stdout.read_to_end(&mut seen).unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", text(&seen));
    assert!(
        text(&seen).contains("/help lists the commands"),
        "{}",
        text(&seen)
    );
    assert!(
        dir.path().join("chat_history.txt").is_file(),
        "no history file"
    );
}
