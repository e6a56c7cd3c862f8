//! The reference Python of the integration tests (PyPI `gguf`, `safetensors`, `torch`, pinned in
//! scripts/requirements.txt), for the test crates of `gguf` and `quantize` (the latter includes this file by path).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root (the parent of the crate running the tests).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The Python with the pinned reference packages: $FERRITE_PYTHON (set by scripts/test.sh) or the repo's .venv.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRITE_PYTHON") {
        // Tests run in the crate folder; a relative path is meant from the repository root.
        return repo_root().join(p);
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no reference Python: run the tests with scripts/test.sh (it creates .venv), or set FERRITE_PYTHON"
    );
    venv
}
