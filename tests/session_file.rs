//! Session files from strangers: a saved session loads and continues bit for bit; a truncated file, one with extra
//! bytes, one whose sizes lie, or one that is not a session at all is refused with a message (never a panic or an
//! allocation sized by the file), and the session is left empty and usable.

use std::fs;
use std::path::Path;

use ferrite::engine::{Engine, EngineOptions, Logits, PagingOptions};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};

const N_CTX: usize = 256;
const N_UBATCH: usize = 32;

fn engine(path: &Path) -> Engine {
    Engine::open(
        path,
        EngineOptions {
            n_threads: 1,
            paging: PagingOptions {
                ctx_size: Some(N_CTX),
                n_ubatch: Some(N_UBATCH),
                ..PagingOptions::default()
            },
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

fn tokens(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % n_vocab as u32)
        .collect()
}

/// `load` fails with every needle in its message; the session is then empty and still computes what a fresh one
/// does.
fn refused(e: &Engine, file: &Path, needles: &[&str], want_next: &[f32], first: u32) {
    let mut s = e.session().unwrap();
    s.feed(&[first], Logits::Last).unwrap();
    let err = format!("{:#}", s.load(file).unwrap_err());
    for n in needles {
        assert!(err.contains(n), "{n:?} in {err}");
    }
    assert_eq!(s.n_past(), 0, "{err}");
    assert_eq!(s.feed(&[first], Logits::Last).unwrap(), want_next);
}

#[test]
fn damaged_and_lying_session_files_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let cfg = TinyConfig::small();
    write_tiny_model(&path, &cfg, 7).unwrap();
    let e = engine(&path);
    let toks = tokens(100, cfg.n_vocab as usize);
    let first = toks[0];
    let want_first = e.session().unwrap().feed(&[first], Logits::Last).unwrap();

    let mut s = e.session().unwrap();
    s.feed(&toks[..90], Logits::Last).unwrap();
    let saved = dir.path().join("s.session");
    s.save(&saved).unwrap();
    let next = s.feed(&toks[90..], Logits::All).unwrap();
    // No temporary file is left beside it.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);

    // Intact: loads and continues bit for bit.
    let mut r = e.session().unwrap();
    r.load(&saved).unwrap();
    assert_eq!(r.tokens(), &toks[..90]);
    assert_eq!(r.feed(&toks[90..], Logits::All).unwrap(), next);

    let bytes = fs::read(&saved).unwrap();
    let bad = dir.path().join("bad.session");
    let write = |b: &[u8]| fs::write(&bad, b).unwrap();
    // Truncated anywhere: in the header, in the tokens, in a tensor, one byte short.
    for (cut, what) in [
        (4, "shorter than a session file's header"),
        (20, "ends inside its header"),
        (60, "is truncated or damaged"),
        (bytes.len() / 2, "is truncated or damaged"),
        (bytes.len() - 1, "is truncated or damaged"),
    ] {
        write(&bytes[..cut]);
        refused(
            &e,
            &bad,
            &[what, "cannot restore the session"],
            &want_first,
            first,
        );
    }
    // A byte too many.
    let mut longer = bytes.clone();
    longer.push(0);
    write(&longer);
    refused(&e, &bad, &["is truncated or damaged"], &want_first, first);
    // A token count beyond the context, and one that does not match the file's length.
    let count_at = 8 + 5 * 8;
    for (n, what) in [
        (
            u64::MAX,
            "claims 18446744073709551615 tokens, more than the context of 256 holds",
        ),
        (91, "is truncated or damaged"),
    ] {
        let mut lie = bytes.clone();
        lie[count_at..count_at + 8].copy_from_slice(&n.to_le_bytes());
        write(&lie);
        refused(&e, &bad, &[what], &want_first, first);
    }
    // A tensor length that lies while the file's length adds up: the first tensor's length field.
    let len_at = count_at + 8 + 4 * 90;
    let mut lie = bytes.clone();
    let len = u64::from_le_bytes(lie[len_at..len_at + 8].try_into().unwrap());
    lie[len_at..len_at + 8].copy_from_slice(&(len + 1).to_le_bytes());
    write(&lie);
    refused(
        &e,
        &bad,
        &[&format!(
            "cache tensor 0 holds {} bytes, expected {len}",
            len + 1
        )],
        &want_first,
        first,
    );
    // Another sizes' session, and a file that is not a session.
    let mut other = bytes.clone();
    other[8 + 2 * 8..8 + 3 * 8].copy_from_slice(&512u64.to_le_bytes());
    write(&other);
    refused(
        &e,
        &bad,
        &["another model or other sizes"],
        &want_first,
        first,
    );
    write(b"GGUF\x03\0\0\0 not a session at all");
    refused(
        &e,
        &bad,
        &["not a ferrite session file"],
        &want_first,
        first,
    );
    // A session of the earlier format (every tensor whole) is named as such.
    let mut v1 = bytes.clone();
    v1[..8].copy_from_slice(b"FERRSES1");
    write(&v1);
    refused(
        &e,
        &bad,
        &["saved by an earlier ferrite"],
        &want_first,
        first,
    );
    // The file holds the compressed rows the tokens filled, not the whole context: a shorter session's file is
    // smaller (and restores as well).
    let mut short = e.session().unwrap();
    short.feed(&toks[..12], Logits::Last).unwrap();
    let short_file = dir.path().join("short.session");
    short.save(&short_file).unwrap();
    let short_len = fs::metadata(&short_file).unwrap().len();
    assert!(
        short_len + 4 * 78 < bytes.len() as u64,
        "12 tokens: {short_len} bytes, 90 tokens: {}",
        bytes.len()
    );
    let mut r = e.session().unwrap();
    r.load(&short_file).unwrap();
    assert_eq!(
        r.feed(&toks[12..20], Logits::All).unwrap(),
        short.feed(&toks[12..20], Logits::All).unwrap()
    );
    // The intact file still loads after all that.
    let mut r = e.session().unwrap();
    r.load(&saved).unwrap();
    assert_eq!(r.n_past(), 90);
}
