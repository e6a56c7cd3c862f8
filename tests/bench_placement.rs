//! `ferrite bench --vs-llama` runs llama.cpp (the reference) where ferrite runs: with ferrite's devices, `-ngl`
//! and the routed experts ferrite keeps on the CPU as `-ot` rules, checked in llama.cpp's own load log
//! (`FERRITE_LLAMA_LOG=1`) with an RPC device on loopback standing in for a GPU; CPU-only runs give llama.cpp no
//! device at all (so no op offload either).

mod support;

use std::process::Command;

use support::rpc::RpcServer;

/// True when llama.cpp's log says it overrode `tensor`'s buffer type to the CPU.
fn overridden(log: &str, tensor: &str) -> bool {
    log.lines().any(|l| {
        l.contains(&format!("tensor {tensor} (")) && l.contains("buffer type overridden to CPU")
    })
}

/// `bench -m demo` with `placement`: the JSON's llama_placement and llama.cpp's log.
fn bench(placement: &[&str], cache: &std::path::Path) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args([
            "bench", "-m", "demo", "-p", "16", "-n", "2", "-r", "1", "-t", "1",
        ])
        .args(["--no-warmup", "--vs-llama", "--json"])
        .args(placement)
        .env("FERRITE_CACHE_DIR", cache)
        .env("FERRITE_LLAMA_LOG", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let results = json["results"].as_array().unwrap();
    assert!(
        results
            .iter()
            .all(|r| r["llama"]["median"].as_f64().is_some_and(|m| m > 0.0)),
        "llama.cpp ran every test: {results:?}"
    );
    (
        json["llama_placement"].as_str().unwrap().to_string(),
        stderr,
    )
}

#[test]
fn llama_cpp_runs_with_ferrites_placement() {
    let cache = tempfile::tempdir().unwrap();
    let server = RpcServer::start();
    let rpc = server.endpoint.clone();

    let (placement, log) = bench(&["--rpc", &rpc, "-ngl", "all", "--cpu-moe"], cache.path());
    assert!(
        placement.starts_with(
            "--device RPC0 -ngl 5 -ot ^blk\\.0\\.ffn_(up|down|gate|gate_up)_(ch)?exps=CPU"
        ),
        "{placement}"
    );
    assert_eq!(placement.matches("=CPU").count(), 4, "{placement}");
    assert!(log.contains("layer   0 assigned to device RPC0"), "{log}");
    assert!(log.contains("layer   4 assigned to device RPC0"), "{log}");
    assert!(overridden(&log, "blk.3.ffn_down_exps.weight"), "{log}");

    // -ot on single tensors: the same tensors go to the CPU for llama.cpp.
    let (placement, log) = bench(
        &[
            "--rpc",
            &rpc,
            "-ngl",
            "all",
            "-ot",
            r"blk\.1\.ffn_(gate|up)_exps=CPU",
        ],
        cache.path(),
    );
    assert_eq!(
        placement,
        r"--device RPC0 -ngl 5 -ot ^blk\.1\.ffn_gate_exps\.weight$=CPU -ot ^blk\.1\.ffn_up_exps\.weight$=CPU"
    );
    assert!(overridden(&log, "blk.1.ffn_up_exps.weight"), "{log}");
    assert!(!overridden(&log, "blk.1.ffn_down_exps.weight"), "{log}");

    // CPU only: llama.cpp gets no device, even with the RPC server's registered.
    let (placement, log) = bench(&["--rpc", &rpc, "--device", "none"], cache.path());
    assert_eq!(placement, "--device none -ngl 0");
    assert!(!log.contains("assigned to device RPC0"), "{log}");
}
