//! `scripts/device-check.sh` as far as a machine without a GPU can run it: the dry run (carried files checked,
//! every command printed with its timeout, exit 1 naming what is missing), the logit comparison with python3 and
//! with awk (a position 3e-4 of its scale away fails, ubatch-level rounding passes), and a rehearsal of the parity
//! steps and the summary with an RPC device on loopback standing in for the GPU (DEVICE_CHECK_REHEARSAL): the
//! script's commands, placements, comparisons and JSON are the ones the GPU machine runs.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::rpc::RpcServer;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/device-check.sh")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A dist/ folder as scripts/device-pack.sh makes it, with this build's binary (the GPU machine's is stripped and
/// portable; the script only runs it).
fn fake_dist(dir: &Path) -> PathBuf {
    let dist = dir.join("dist");
    std::fs::create_dir_all(&dist).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_ferrite"), dist.join("ferrite")).unwrap();
    let flash = dist.join("flash_model");
    std::fs::write(&flash, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&flash, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(dist.join("ggml-src.tar.gz"), b"carried").unwrap();
    std::fs::write(
        dist.join("PACK-INFO"),
        "commit: test\nisa: test\nneeds: \nllama-cpp-sys-2: test\n",
    )
    .unwrap();
    dist
}

fn check(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("bash");
    c.arg(script()).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn the_dry_run_checks_the_carried_files_and_prints_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let dist = fake_dist(dir.path());
    let out_dir = dir.path().join("out");
    let work = dir.path().join("work");
    let env = [
        ("FERRITE_DIST", dist.to_str().unwrap()),
        ("DEVICE_CHECK_WORK", work.to_str().unwrap()),
    ];
    let out = check(&["--dry-run", out_dir.to_str().unwrap()], &env);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("every carried file is there"), "{stderr}");
    for expected in [
        "[  20s] nvidia-smi",
        "scripts/build-cuda.sh",
        "FERRITE_NO_PIP=1",
        "complete --list-devices --backend-dir",
        "--device none",
        "--device CUDA0 -ngl all --cpu-moe --expert-cache 7 --gpu-experts 0",
        "--device CUDA0 -ngl all --cpu-moe --gpu-experts 8",
        "--cpu-moe --expert-cache 7 --gpu-experts 8",
        "-ot blk",
        "--ubatch 1",
        "--temp 0",
        "flash4-sparse.gguf --layers 4 --experts Q4_K",
        "--vs-llama --json",
        "--gpu-experts 256",
        "-n 32 -d 16384 -r 2 --vs-llama",
        "-ngl all --cache-type q8_0",
        "-ngl all --cache-type f16",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}");
    }
    assert!(
        stdout.lines().filter(|l| l.starts_with('[')).count() >= 25,
        "{stdout}"
    );
    assert!(!out_dir.exists(), "a dry run writes nothing");

    std::fs::remove_file(dist.join("flash_model")).unwrap();
    let out = check(&["--dry-run"], &env);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("MISSING") && stderr.contains("flash_model"),
        "{stderr}"
    );
}

#[test]
fn the_logit_comparison_fails_past_1e4_of_the_scale_with_python_and_with_awk() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, n_vocab) = (7usize, 33usize);
    let reference: Vec<f32> = (0..rows * n_vocab)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.173)
        .collect();
    let write = |name: &str, data: &[f32]| {
        let p = dir.path().join(name);
        ferrite::npy::write_f32(&p, &[rows, n_vocab], data).unwrap();
        p
    };
    let scale_of_row5 = reference[5 * n_vocab..6 * n_vocab]
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()));
    let mut far = reference.clone();
    far[5 * n_vocab + 3] += 3e-4 * scale_of_row5;
    let mut near = reference.clone();
    near[2 * n_vocab + 9] += 5e-5 * scale_of_row5;
    let (r, f, n) = (
        write("ref.npy", &reference),
        write("far.npy", &far),
        write("near.npy", &near),
    );
    let mut compares = vec!["awk"];
    if Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        compares.push("python3");
    }
    for with in compares {
        let env = [("DEVICE_CHECK_COMPARE", with)];
        let arg = |p: &Path| p.to_str().unwrap().to_string();
        let out = check(&["--compare", &arg(&r), &arg(&f)], &env);
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{with}: {stdout} {}",
            text(&out.stderr)
        );
        let fields: Vec<&str> = stdout.split_whitespace().collect();
        let err: f64 = fields[0].parse().unwrap();
        assert!((err - 3e-4).abs() < 1e-6, "{with}: {stdout}");
        assert_eq!(&fields[1..], ["5", "7"], "{with}: worst position and rows");
        let out = check(&["--compare", &arg(&r), &arg(&n)], &env);
        assert_eq!(out.status.code(), Some(0), "{with}: {}", text(&out.stdout));
        let out = check(&["--compare", &arg(&r), "/nonexistent.npy"], &env);
        assert_eq!(out.status.code(), Some(2), "{with}");
    }
}

#[test]
fn a_rehearsal_on_an_rpc_device_passes_and_writes_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let dist = fake_dist(dir.path());
    let server = RpcServer::start();
    let out_dir = dir.path().join("out");
    let work = dir.path().join("work");
    let rpc = format!("--rpc {}", server.endpoint);
    let out = check(
        &[out_dir.to_str().unwrap()],
        &[
            ("FERRITE_DIST", dist.to_str().unwrap()),
            ("DEVICE_CHECK_WORK", work.to_str().unwrap()),
            ("DEVICE_CHECK_REHEARSAL", "1"),
            ("DEVICE_CHECK_DEVICE", "RPC0"),
            ("DEVICE_CHECK_DEVICE_ARGS", &rpc),
            (
                "DEVICE_CHECK_PLACEMENTS",
                "gpu_all split cpu_moe ot gpu_cache",
            ),
            ("DEVICE_CHECK_COMPARE", "awk"),
        ],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["status"], "pass", "{summary:#}");
    assert_eq!(summary["module"]["device_listed"], true);
    let logits = summary["parity"]["logits"].as_array().unwrap();
    assert_eq!(logits.len(), 10, "5 placements, whole and token by token");
    for row in logits {
        assert_eq!(row["pass"], "yes", "{row}");
        let err: f64 = row["max_rel_err"].as_str().unwrap().parse().unwrap();
        assert!(err <= 1e-4, "{row}");
    }
    let greedy = summary["parity"]["greedy_128"].as_array().unwrap();
    assert_eq!(greedy.len(), 5);
    assert!(greedy.iter().all(|g| g["identical"] == "yes"), "{greedy:?}");
    let bench = summary["bench"]["results"].as_array().unwrap();
    assert!(
        bench.iter().all(|b| b["target"] == "skipped: rehearsal"),
        "{bench:?}"
    );
    // Each run really used the device: its offload line is in the step's stderr.
    let err = std::fs::read_to_string(out_dir.join("steps/logits-ot-whole.err")).unwrap();
    assert!(err.contains("ferrite: offload: RPC0"), "{err}");
    let err = std::fs::read_to_string(out_dir.join("steps/logits-gpu_cache-tokens.err")).unwrap();
    assert!(err.contains("a cache of 8 routed experts"), "{err}");
    let md = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    assert!(md.starts_with("# ferrite device check: pass"), "{md}");
}
