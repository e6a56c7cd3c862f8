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

/// `chat -m MODEL` started with piped standard input, output and error, and `env`.
fn spawn_chat(
    model: &str,
    args: &[&str],
    cache: &Path,
    env: &[(&str, &str)],
) -> std::process::Child {
    Command::new(BIN)
        .args(["chat", "-m", model, "-t", "1", "--temp", "0"])
        .args(args)
        .env("FERRITE_CACHE_DIR", cache)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads lines of `err` into `seen` until one starts with `prefix`; fails at the end of the output.
fn stderr_until(err: &mut impl std::io::BufRead, seen: &mut String, prefix: &str) {
    loop {
        let mut line = String::new();
        let n = err.read_line(&mut line).unwrap();
        assert!(n > 0, "stderr ended waiting for {prefix:?}: {seen}");
        seen.push_str(&line);
        if line.starts_with(prefix) {
            return;
        }
    }
}

#[test]
fn a_turn_over_the_context_is_dropped_and_the_next_one_answers() {
    let dir = tempfile::tempdir().unwrap();
    let long = "word ".repeat(60);
    let out = {
        let mut child = spawn_chat("demo", &["-c", "64", "-n", "8"], dir.path(), &[]);
        let input = format!("hi\n{long}\nhello\n/stats\n");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let err = text(&out.stderr);
    // The failed turn is reported, with its hint; the piped chat answers every other line, then exits with 1.
    assert!(
        err.contains(
            "ferrite: error: the conversation would have 199 tokens but the context holds 64 \
             (hint: /reset, a shorter message, or restart with a larger -c); \
             this turn was dropped, the conversation before it is kept\n"
        ),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.ends_with(
            "ferrite: error: 1 of 3 turns failed (see the errors above); the others were answered\n"
        ),
        "{err}"
    );
    // Two answers, the second on top of the first's cache (only its new tokens processed).
    assert!(err.contains("2 answers"), "{err}");
    let t = turns(&err);
    assert_eq!(t.len(), 1, "{err}");
    assert!(t[0].0 < t[0].1, "{err}");
    // One line of standard output per turn, the dropped one empty.
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.split_terminator('\n').collect();
    assert_eq!(lines.len(), 3, "{stdout:?}");
    assert!(
        !lines[0].is_empty() && lines[1].is_empty() && !lines[2].is_empty(),
        "{stdout:?}"
    );
}

/// An I/O error of the expert store inside a turn (the model file truncated under a paged chat) drops that turn;
/// once the file is back, the chat answers again.
#[test]
fn an_expert_store_read_error_drops_the_turn_and_keeps_the_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.gguf");
    // The demo model, generated by a first run.
    chat(&["-n", "1"], dir.path(), "/quit\n");
    std::fs::copy(dir.path().join("demo-v1.gguf"), &model).unwrap();
    let good = std::fs::read(&model).unwrap();
    // Cut the file inside the last layer's routed experts: their reads end early. (What follows them, the shared
    // experts, is copied into RAM at start-up, so the map is never read past the cut.)
    let cut = {
        let m = gguf::Model::open(&model).unwrap();
        let t = m.tensor("blk.3.ffn_down_exps.weight").unwrap();
        let start = m.tensor_data(t).as_ptr() as usize - m.shards()[0].bytes().as_ptr() as usize;
        (start + 1000) as u64
    };
    // Three slots for two experts a token: every turn reads experts.
    let mut child = spawn_chat(
        model.to_str().unwrap(),
        &["--expert-cache", "3", "-c", "256", "-n", "6"],
        dir.path(),
        &[],
    );
    let mut stdin = child.stdin.take().unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    stdin.write_all(b"hello\n/stats\n").unwrap();
    stdin.flush().unwrap();
    stderr_until(&mut err, &mut seen, "context: ");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(cut)
        .unwrap();
    stdin.write_all(b"how are you?\n/stats\n").unwrap();
    stdin.flush().unwrap();
    stderr_until(&mut err, &mut seen, "context: ");
    // The file back as it was (same inode: the engine's open file sees it).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .write_all(&good)
        .unwrap();
    stdin.write_all(b"and then?\n/stats\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    seen.push_str(&rest);
    let status = child.wait().unwrap();
    assert!(
        seen.contains("ferrite: error: cannot read routed experts into the expert cache")
            && seen.contains("but the file ends first (was it truncated or replaced after opening?); this turn was dropped, the conversation before it is kept"),
        "{seen}"
    );
    // The second /stats: still one answer; the third: two, the last with generated tokens.
    let stats: Vec<&str> = seen
        .lines()
        .filter(|l| l.starts_with("context: "))
        .collect();
    assert_eq!(stats.len(), 3, "{seen}");
    assert!(
        stats[1].contains("1 answers") && stats[2].contains("2 answers"),
        "{seen}"
    );
    assert!(seen.contains("generation 6 tokens"), "{seen}");
    assert_eq!(status.code(), Some(1), "{seen}");
    assert!(seen.ends_with("ferrite: error: 1 of 3 turns failed (see the errors above); the others were answered\n"), "{seen}");
}

#[test]
fn save_never_replaces_what_is_not_a_session_unless_told_and_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let notes = work.join("notes.txt");
    std::fs::write(&notes, "precious").unwrap();
    let other = work.join("other");
    std::fs::write(work.join("other.json"), "{\"mine\": true}").unwrap();
    let s = work.join("s");
    let (n, o, sp) = (
        notes.to_str().unwrap(),
        other.to_str().unwrap(),
        s.to_str().unwrap(),
    );
    let out = chat(
        &["-n", "4"],
        dir.path(),
        &format!("hi\n/save {n}\n/save {o}\n/save {sp}\n/save {sp}\n/stats\n"),
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "ferrite: error: {n} exists and is not a ferrite session (hint: choose another name, or /save! {n} to replace it)\n"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "ferrite: error: {o}.json exists and is not a saved ferrite chat (hint: choose another name, or /save! {o} to replace it)\n"
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "precious");
    assert_eq!(
        std::fs::read_to_string(work.join("other.json")).unwrap(),
        "{\"mine\": true}"
    );
    assert!(!other.exists());
    // A session is replaced by the next /save without asking.
    assert_eq!(
        err.matches(&format!("saved the session to {sp} ")).count(),
        2,
        "{err}"
    );
    // /save! replaces, and what it wrote loads.
    let out = chat(
        &[],
        dir.path(),
        &format!("/load {sp}\n/save! {n}\n/load {n}\n/stats\n"),
    );
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "saved the session to {n} and the conversation to {n}.json"
        )),
        "{err}"
    );
    assert!(err.contains(&format!("loaded {n}: 2 messages")), "{err}");
    assert!(!err.contains("warning"), "{err}");
    // Nothing else is left in the folder: every write went through a temporary file renamed into place.
    let mut names: Vec<String> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["notes.txt", "notes.txt.json", "other.json", "s", "s.json"]
    );
}

#[test]
fn ctrl_c_during_a_save_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("talk.session");
    let f = file.to_str().unwrap();
    // The test hook holds the save open long enough for two Ctrl-C to land inside it.
    let mut child = spawn_chat(
        "demo",
        &["-n", "4"],
        dir.path(),
        &[("FERRITE_DEBUG_SAVE_PAUSE_MS", "1500")],
    );
    let mut stdin = child.stdin.take().unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    stdin
        .write_all(format!("hello\n/save {f}\n").as_bytes())
        .unwrap();
    stdin.flush().unwrap();
    stderr_until(&mut err, &mut seen, "ferrite: saving the session to");
    for _ in 0..2 {
        let killed = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    stdin.write_all(b"/stats\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    seen.push_str(&rest);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}: {seen}");
    assert_eq!(
        seen.matches("ferrite: saving, please wait").count(),
        2,
        "{seen}"
    );
    assert!(
        seen.contains(&format!("saved the session to {f}")),
        "{seen}"
    );
    assert!(seen.contains("1 answers"), "{seen}");
    // What it wrote loads.
    let out = chat(&[], dir.path(), &format!("/load {f}\n"));
    let err = text(&out.stderr);
    assert!(
        err.contains("2 messages") && !err.contains("warning"),
        "{err}"
    );
}
