//! Build checks for the `cann` feature: ggml's CANN backend must really be built by llama-cpp-sys-2 (which only
//! happens when GGML_CANN=ON is in the environment), and the Ascend runtime it calls must be linked.
//!
//! Why this is needed: a cargo feature cannot set environment variables for a dependency's build script, and
//! llama-cpp-sys-2 has no `cann` feature. Its build script forwards every `GGML_*` (and `CMAKE_*`) environment
//! variable to CMake and then links every static library CMake installed (`out/lib*/lib*.a`), so with GGML_CANN=ON
//! `libggml-cann.a` is linked automatically; but the Ascend libraries ggml-cann itself links (`ascendcl`,
//! `nnopbase`, `opapi`, `acl_op_compiler` from `$ASCEND_TOOLKIT_HOME/lib64`) are not, because a static archive
//! does not carry its dependencies.

use std::env;
use std::path::{Path, PathBuf};

/// The shared libraries ggml/src/ggml-cann/CMakeLists.txt links (`CANN_LIBRARIES`).
const ASCEND_LIBS: [&str; 4] = ["ascendcl", "nnopbase", "opapi", "acl_op_compiler"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=GGML_CANN");
    println!("cargo:rerun-if-env-changed=ASCEND_TOOLKIT_HOME");
    if env::var_os("CARGO_FEATURE_CANN").is_none() {
        return;
    }
    if let Err(message) = check_and_link_cann() {
        eprintln!("error: ferrite feature `cann`: {message}");
        std::process::exit(1);
    }
}

fn check_and_link_cann() -> Result<(), String> {
    let on = env::var("GGML_CANN")
        .map(|v| matches!(v.to_ascii_uppercase().as_str(), "ON" | "1" | "TRUE" | "YES"))
        .unwrap_or(false);
    if !on {
        return Err("GGML_CANN=ON must be set in the environment, because llama-cpp-sys-2 builds ggml's CANN \
                    backend only then. Run: source $ASCEND_TOOLKIT_HOME/set_env.sh; GGML_CANN=ON cargo build \
                    --release --features cann (if ggml was already built without it, first run \
                    `cargo clean -p llama-cpp-sys-2`)"
            .into());
    }
    let home = env::var("ASCEND_TOOLKIT_HOME").map_err(|_| {
        "ASCEND_TOOLKIT_HOME is not set; source the CANN toolkit's set_env.sh first".to_string()
    })?;
    let lib64 = Path::new(&home).join("lib64");
    if !lib64.is_dir() {
        return Err(format!(
            "{} does not exist; is ASCEND_TOOLKIT_HOME right?",
            lib64.display()
        ));
    }
    check_cann_archive_built()?;
    println!("cargo:rustc-link-search=native={}", lib64.display());
    // Passed as link arguments (placed after every crate's objects) rather than `rustc-link-lib`, so the linker's
    // --as-needed sees ggml-cann's references to these libraries before it sees the libraries.
    let libs: Vec<String> = ASCEND_LIBS.iter().map(|l| format!("-l{l}")).collect();
    println!(
        "cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,{},--pop-state",
        libs.join(",")
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib64.display());
    Ok(())
}

/// llama-cpp-sys-2 (`links = "llama"`) tells us where its CMake install put ggml's package config; the static
/// libraries sit next to it. A build cached from before GGML_CANN=ON has no `libggml-cann.a` there, and its build
/// script does not rerun when GGML_CANN first appears (it only watches GGML_* variables that were set).
fn check_cann_archive_built() -> Result<(), String> {
    let Some(cmake_dir) = env::var_os("DEP_LLAMA_GGML_CMAKE_DIR").map(PathBuf::from) else {
        println!("cargo:warning=cannot locate llama-cpp-sys-2's output to check that ggml-cann was built");
        return Ok(());
    };
    let lib_dir = cmake_dir.parent().unwrap_or(&cmake_dir);
    if lib_dir.join("libggml-cann.a").is_file() || lib_dir.join("libggml-cann.so").is_file() {
        return Ok(());
    }
    Err(format!(
        "llama-cpp-sys-2 built ggml without the CANN backend (no libggml-cann in {}); its cached build ignores \
         a GGML_CANN set later: run `cargo clean -p llama-cpp-sys-2`, then GGML_CANN=ON cargo build --release \
         --features cann",
        lib_dir.display()
    ))
}
