//! What the quantize crate's integration tests share: the reference Python and scratch folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The Python with the pinned reference packages: $FERRITE_PYTHON (set by scripts/test.sh) or the repo's .venv.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRITE_PYTHON") {
        return repo_root().join(p);
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no reference Python: run the tests with scripts/test.sh (it creates .venv), or set FERRITE_PYTHON"
    );
    venv
}

/// A fresh, empty folder `group/name` under the target's temporary folder.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(group)
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
