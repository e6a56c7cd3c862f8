//! What the quantize crate's integration tests share: the reference Python and scratch folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

#[path = "../../../gguf/tests/support/reference_python.rs"]
mod reference_python;

pub use reference_python::python;

/// A fresh, empty folder `group/name` under the target's temporary folder.
pub fn scratch(group: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(group)
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
