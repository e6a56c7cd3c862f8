//! Past the parser: the fuzzer's bytes choose mutations of the demo model (metadata values and types, array
//! lengths, tensor types, shapes, names and contents; `testkit::mutants`), and the mutant is opened with
//! `Engine::open` and run for one token of `complete`. Refusing a mutant with an error is fine; a panic, an abort
//! (a GGML_ASSERT), a crash, a hang (`-timeout`) or memory past `-rss_limit_mb` is a finding.
//!
//! The same generator, seeded instead of fuzzer-driven, runs 10,000 mutants in the test suite
//! (`cargo test --release --test mutants`), each in a forked child.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use gguf::GgufFile;
use libfuzzer_sys::fuzz_target;
use testkit::mutants::{apply, mutations, open_and_run, ByteChoices, FastWriter, Parts};

struct Base {
    parts: Parts<'static>,
    fast: FastWriter<'static>,
    slot: PathBuf,
    whole: PathBuf,
}

/// The demo model and this process's mutant files, on a tmpfs when there is one.
fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let root = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = root.join(format!("ferrite-fuzz-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let demo = dir.join("demo.gguf");
        write_tiny_model(&demo, &TinyConfig::demo(), 1).unwrap();
        let file: &'static GgufFile = Box::leak(Box::new(GgufFile::open(&demo).unwrap()));
        let parts = Parts::of(file);
        let fast = FastWriter::new(&parts).unwrap();
        let slot = dir.join("mutant.gguf");
        fast.prepare(&slot).unwrap();
        Base {
            parts,
            fast,
            slot,
            whole: dir.join("mutant-whole.gguf"),
        }
    })
}

fuzz_target!(|bytes: &[u8]| {
    let b = base();
    let seed = bytes.iter().fold(0u64, |h, &x| h.rotate_left(5) ^ x as u64);
    let ms = mutations(&b.parts, &mut ByteChoices::new(bytes));
    let mutant = apply(&b.parts, &ms);
    let Ok(path) = b.fast.write(&mutant, &b.slot, &b.whole) else {
        return;
    };
    // An error is a refusal (exit 1 in the CLI): fine.
    let _ = open_and_run(path, seed);
});
