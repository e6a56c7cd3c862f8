//! Running the `ferrite` binary in the CLI tests: with a cache folder and optional standard input, and the checks
//! they all make of its output.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `ferrite ARGS` with FERRITE_CACHE_DIR = `cache` and `stdin` (closed when `None`).
pub fn run(args: &[&str], cache: &Path, stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(args)
        .env("FERRITE_CACHE_DIR", cache)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts success; returns (stdout, stderr).
pub fn ok(out: &Output) -> (String, String) {
    let err = text(&out.stderr);
    assert!(
        out.status.success(),
        "ferrite failed ({:?}): {err}",
        out.status
    );
    (text(&out.stdout), err)
}
