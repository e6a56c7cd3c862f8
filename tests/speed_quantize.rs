//! Quantizer throughput and peak memory next to llama.cpp's own (`llama_model_quantize`, what llama-quantize runs)
//! on the same GGUF -> GGUF job. A measurement, not a test: it asserts nothing about speed.
//!
//!     cargo test --release --test speed_quantize -- --ignored --nocapture
//!
//! FERRITE_QSPEED_THREADS (default 2) threads each; the input is a ~2.4 GB F32 tiny-architecture model (hidden 1024,
//! 32 experts of width 1024, 6 layers) quantized to Q4_K_M, written to FERRITE_QSPEED_DIR (default: a temp folder).
//! Each quantizer runs in its own process and reports its own peak RSS (VmHWM).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ferrite::model::tiny::{write_tiny_model, TinyConfig};

const BIN: &str = env!("CARGO_BIN_EXE_ferrite");

fn threads() -> usize {
    std::env::var("FERRITE_QSPEED_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

fn vm_hwm() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Runs llama.cpp's quantizer in this process when started as the child of [`quantizer_speed_vs_llama_cpp`].
#[test]
#[ignore = "child process of quantizer_speed_vs_llama_cpp"]
fn llama_quantize_child() {
    let (Ok(input), Ok(output)) = (
        std::env::var("FERRITE_QSPEED_IN"),
        std::env::var("FERRITE_QSPEED_OUT"),
    ) else {
        return;
    };
    let start = Instant::now();
    ferrite::reference::llama::llama_quantize(
        Path::new(&input),
        Path::new(&output),
        15,
        threads() as i32,
        false,
        &[],
    )
    .unwrap();
    println!(
        "LLAMA secs={} rss={}",
        start.elapsed().as_secs_f64(),
        vm_hwm()
    );
}

#[test]
#[ignore = "measurement: run with --ignored --nocapture"]
fn quantizer_speed_vs_llama_cpp() {
    let keep = std::env::var_os("FERRITE_QSPEED_DIR").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("qspeed-f32.gguf");
    if !input.exists() {
        let cfg = TinyConfig {
            n_embd: 1024,
            expert_ffn: 1024,
            n_expert: 32,
            ..TinyConfig::small()
        };
        write_tiny_model(&input, &cfg, 1).unwrap();
    }
    let in_bytes = std::fs::metadata(&input).unwrap().len();
    // Warm the page cache for both (each reads the same file).
    let _ = std::fs::read(&input).map(|b| b.len());

    let ours = dir.join("qspeed-ferrite.gguf");
    let start = Instant::now();
    let out = Command::new(BIN)
        .args([
            "quantize",
            input.to_str().unwrap(),
            ours.to_str().unwrap(),
            "--type",
            "Q4_K_M",
            "--overwrite",
        ])
        .args(["-t", &threads().to_string()])
        .output()
        .unwrap();
    let ours_secs = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rss_line = stderr
        .lines()
        .find(|l| l.contains("peak RSS"))
        .unwrap_or("")
        .to_string();

    let theirs = dir.join("qspeed-llama.gguf");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "llama_quantize_child",
            "--nocapture",
        ])
        .env("FERRITE_QSPEED_IN", &input)
        .env("FERRITE_QSPEED_OUT", &theirs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("LLAMA "))
        .expect("child report");
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (llama_secs, llama_rss) = (field("secs="), field("rss="));
    let gb = in_bytes as f64 / 1e9;
    println!("input {:.2} GB F32 -> Q4_K_M, {} threads", gb, threads());
    println!(
        "ferrite: {ours_secs:.2} s = {:.3} GB/s of input; {rss_line}",
        gb / ours_secs
    );
    println!(
        "llama.cpp llama_model_quantize: {llama_secs:.2} s = {:.3} GB/s of input; peak RSS {:.0} MiB",
        gb / llama_secs,
        llama_rss / 1048576.0
    );
    println!(
        "throughput ratio ferrite / llama.cpp = {:.2}",
        llama_secs / ours_secs
    );
}
