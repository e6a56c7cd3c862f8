//! Saving a session streams the cache to the file, and loading reads the file into the cache in place: the process's peak memory grows by far less than one
//! cache (it grew by two caches and more when the whole file was read into buffers first). Linux only (the peak is
//! read from /proc/self/status and reset through /proc/self/clear_refs); alone in its test binary, so no other
//! test's allocations move the peak.

use ferrite::engine::{Engine, EngineOptions, Logits, PagingOptions};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};

/// A `/proc/self/status` field in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find_map(|l| l.strip_prefix(field))?;
    let kb: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

#[test]
fn a_session_loads_in_place() {
    if std::fs::write("/proc/self/clear_refs", "5").is_err() || status_bytes("VmHWM:").is_none() {
        eprintln!("skipped: no resettable peak memory (/proc/self/clear_refs, VmHWM)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let cfg = TinyConfig::small();
    write_tiny_model(&path, &cfg, 3).unwrap();
    let n_ctx = 400_000;
    let e = Engine::open(
        &path,
        EngineOptions {
            n_threads: 1,
            paging: PagingOptions {
                ctx_size: Some(n_ctx),
                n_ubatch: Some(16),
                ..PagingOptions::default()
            },
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let file = dir.path().join("s.session");
    {
        let mut s = e.session().unwrap();
        s.feed(&[1, 2, 3, 4, 5], Logits::Last).unwrap();
        // Saving streams too.
        let cache = s.cache_bytes() as u64;
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let before = status_bytes("VmRSS:").unwrap();
        s.save(&file).unwrap();
        let grew = status_bytes("VmHWM:").unwrap().saturating_sub(before);
        assert!(
            grew < cache / 4,
            "saving a session of a {cache}-byte cache raised the peak by {grew} bytes"
        );
    }
    let mut r = e.session().unwrap();
    let cache = r.cache_bytes() as u64;
    assert!(
        cache > 64 << 20,
        "a cache of {cache} bytes is too small to measure"
    );
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_bytes("VmRSS:").unwrap();
    r.load(&file).unwrap();
    let peak = status_bytes("VmHWM:").unwrap();
    assert_eq!(r.n_past(), 5);
    let grew = peak.saturating_sub(before);
    assert!(
        grew < cache / 2,
        "loading a session of a {cache}-byte cache raised the peak by {grew} bytes"
    );
}
