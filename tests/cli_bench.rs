//! `ferrite bench -m demo` end to end: a well-formed llama-bench-style table on stdout (and nothing else there),
//! `--json` with every number (speeds, repetitions, peak RSS, weight bytes per token, implied bandwidth), a thread
//! list, `--vs-llama` measuring llama.cpp in-process too (values only checked finite and positive: speeds are not
//! reproducible), and bad flags exiting 2, other bad input 1.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use support::cli::{ok, text};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ferrite");

fn bench(args: &[&str], cache: &Path) -> Output {
    Command::new(BIN)
        .arg("bench")
        .args(args)
        .env("FERRITE_CACHE_DIR", cache)
        .output()
        .unwrap()
}

fn positive(v: &Value) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
    assert!(x.is_finite() && x > 0.0, "{x} is not finite and positive");
    x
}

/// The cells of a `| a | b |` line.
fn cells(line: &str) -> Vec<String> {
    assert!(
        line.starts_with("| ") && line.ends_with(" |"),
        "not a table line: {line:?}"
    );
    line[2..line.len() - 2]
        .split(" | ")
        .map(|c| c.trim().to_string())
        .collect()
}

/// Checks the table's shape; returns its rows (without header and separator) and the header.
fn table(stdout: &str, n_rows: usize) -> (Vec<String>, Vec<Vec<String>>) {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        2 + n_rows,
        "stdout is the table only: {stdout}"
    );
    let header = cells(lines[0]);
    let sep = cells(lines[1]);
    assert_eq!(sep.len(), header.len());
    assert!(
        sep.iter()
            .all(|c| !c.is_empty() && c.chars().all(|ch| ch == '-' || ch == ':')),
        "{}",
        lines[1]
    );
    // Columns line up: every line has the same width.
    let width = lines[0].chars().count();
    assert!(lines.iter().all(|l| l.chars().count() == width), "{stdout}");
    let rows: Vec<Vec<String>> = lines[2..].iter().map(|l| cells(l)).collect();
    for r in &rows {
        assert_eq!(r.len(), header.len(), "{stdout}");
    }
    (header, rows)
}

/// `123.45 ± 6.78` -> (123.45, 6.78), both finite, the first positive.
fn speed(cell: &str) -> (f64, f64) {
    let (m, s) = cell.split_once(" ± ").unwrap_or_else(|| panic!("{cell:?}"));
    let (m, s): (f64, f64) = (m.parse().unwrap(), s.parse().unwrap());
    assert!(
        m.is_finite() && m > 0.0 && s.is_finite() && s >= 0.0,
        "{cell}"
    );
    (m, s)
}

/// Weight bytes a decoded token reads, from the tensor table: every tensor but the routed experts and the
/// embedding table, one embedding row, and `used / n_expert` of each routed-expert tensor.
fn expected_bytes_per_token(model: &Path) -> u64 {
    let m = gguf::Model::open(model).unwrap();
    let md = m.metadata();
    let used = md.uint("deepseek4.expert_used_count").unwrap();
    let mut total = 0;
    for t in m.tensors() {
        let i = &t.info;
        if i.name.ends_with("_exps.weight") {
            total += i.n_bytes / i.dims[2] * used;
        } else if i.name == "token_embd.weight" {
            total += i.n_bytes / i.dims[1];
        } else {
            total += i.n_bytes;
        }
    }
    total
}

#[test]
fn table_on_stdout_and_numbers_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = ok(&bench(
        &["-m", "demo", "-p", "32", "-n", "8", "-r", "2", "-t", "1"],
        dir.path(),
    ));
    let (header, rows) = table(&out, 2);
    assert_eq!(
        header,
        [
            "model",
            "size",
            "params",
            "backend",
            "threads",
            "test",
            "t/s (median ± sd)"
        ]
    );
    assert_eq!(rows[0][5], "pp32");
    assert_eq!(rows[1][5], "tg8");
    for r in &rows {
        assert_eq!(r[3], "CPU");
        assert_eq!(r[4], "1");
        assert!(r[1].ends_with("MiB") || r[1].ends_with("GiB"), "{r:?}");
        speed(&r[6]);
    }
    for needle in [
        "peak RSS",
        "weights read per generated token",
        "GB/s",
        "after a warm-up",
    ] {
        assert!(err.contains(needle), "expected {needle:?} in stderr: {err}");
    }
}

#[test]
fn json_has_every_number() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = ok(&bench(
        &[
            "-m", "demo", "-p", "32", "-n", "8", "-r", "2", "-t", "1", "--json",
        ],
        dir.path(),
    ));
    let v: Value = serde_json::from_str(out.trim()).expect("stdout is one JSON object");
    let size = positive(&v["model"]["size_bytes"]);
    positive(&v["model"]["params"]);
    assert_eq!(v["model"]["n_expert_used"], 2);
    assert_eq!(v["backend"], "CPU");
    assert_eq!(v["repetitions"], 2);
    assert_eq!(v["n_prompt"], 32);
    assert_eq!(v["n_gen"], 8);
    let per_token = positive(&v["bytes_per_token"]);
    assert!(per_token < size);
    assert_eq!(
        v["bytes_per_token"],
        expected_bytes_per_token(&dir.path().join("demo-v1.gguf"))
    );
    if cfg!(target_os = "linux") {
        positive(&v["rss_peak_bytes"]);
    }
    assert!(v["llama_rss_peak_bytes"].is_null());
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, (test, n)) in results.iter().zip([("pp32", 32), ("tg8", 8)]) {
        assert_eq!(r["test"], test);
        assert_eq!(r["n_tokens"], n);
        assert_eq!(r["threads"], 1);
        let f = &r["ferrite"];
        let median = positive(&f["median"]);
        assert!(positive(&f["min"]) <= median && median <= positive(&f["max"]));
        assert!(f["stddev"].as_f64().unwrap() >= 0.0);
        assert_eq!(f["samples"].as_array().unwrap().len(), 2);
        assert_eq!(f["seconds"].as_array().unwrap().len(), 2);
        for (tps, s) in f["samples"]
            .as_array()
            .unwrap()
            .iter()
            .zip(f["seconds"].as_array().unwrap())
        {
            let expect = n as f64 / positive(s);
            assert!((positive(tps) - expect).abs() <= 1e-9 * expect);
        }
        assert!(r["llama"].is_null() && r["ratio"].is_null());
    }
    assert!(results[0]["bandwidth_bytes_per_second"].is_null());
    let bw = positive(&results[1]["bandwidth_bytes_per_second"]["ferrite"]);
    let tg = positive(&results[1]["ferrite"]["median"]);
    assert!((bw - per_token * tg).abs() <= 1e-9 * bw);
}

#[test]
fn thread_list_runs_every_test_per_count() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = ok(&bench(
        &[
            "-m",
            "demo",
            "-p",
            "8",
            "-n",
            "2",
            "-r",
            "1",
            "-t",
            "1,1",
            "--json",
            "--no-warmup",
        ],
        dir.path(),
    ));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let tests: Vec<(u64, String)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["threads"].as_u64().unwrap(),
                r["test"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        tests,
        [(1, "pp8"), (1, "tg2"), (1, "pp8"), (1, "tg2")].map(|(t, s)| (t, s.to_string()))
    );
    assert_eq!(v["warmup"], false);
    // -n 0 skips generation.
    let (out, _) = ok(&bench(
        &["-m", "demo", "-p", "8", "-n", "0", "-r", "1", "-t", "1"],
        dir.path(),
    ));
    let (_, rows) = table(&out, 1);
    assert_eq!(rows[0][5], "pp8");
}

#[test]
fn vs_llama_measures_llama_cpp_too() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "-m",
        "demo",
        "-p",
        "32",
        "-n",
        "8",
        "-r",
        "2",
        "-t",
        "1",
        "--vs-llama",
    ];
    let (out, err) = ok(&bench(&args, dir.path()));
    let (header, rows) = table(&out, 2);
    assert_eq!(
        &header[6..],
        ["t/s (median ± sd)", "llama.cpp t/s", "ferrite / llama.cpp"]
    );
    for r in &rows {
        speed(&r[6]);
        speed(&r[7]);
        let ratio: f64 = r[8].parse().unwrap();
        assert!(ratio.is_finite() && ratio > 0.0);
    }
    assert!(err.contains("llama.cpp: pp32"), "{err}");

    let (out, _) = ok(&bench(&[&args[..], &["--json"]].concat(), dir.path()));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    if cfg!(target_os = "linux") {
        positive(&v["llama_rss_peak_bytes"]);
    }
    for r in v["results"].as_array().unwrap() {
        let ours = positive(&r["ferrite"]["median"]);
        let theirs = positive(&r["llama"]["median"]);
        let ratio = positive(&r["ratio"]);
        assert!((ratio - ours / theirs).abs() <= 1e-9 * ratio);
        assert_eq!(r["llama"]["samples"].as_array().unwrap().len(), 2);
    }
    positive(&v["results"][1]["bandwidth_bytes_per_second"]["llama"]);
}

/// `-d 0,300` (llama-bench's depth): every test runs at each depth, named as llama-bench names it
/// (`pp16 @ d300`), on both engines; the runs check that the cache holds the depth's tokens when the timed part
/// starts (restored from the state kept after the first run), and the JSON gives each result's depth.
#[test]
fn depth_runs_every_test_after_n_tokens_in_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "-m",
        "demo",
        "-p",
        "16",
        "-n",
        "4",
        "-d",
        "0,300",
        "-r",
        "2",
        "-t",
        "1",
        "--vs-llama",
    ];
    let (out, err) = ok(&bench(&args, dir.path()));
    let (_, rows) = table(&out, 4);
    let names: Vec<&str> = rows.iter().map(|r| r[5].as_str()).collect();
    assert_eq!(names, ["pp16", "tg4", "pp16 @ d300", "tg4 @ d300"]);
    for r in &rows {
        speed(&r[6]);
        speed(&r[7]);
    }
    assert!(err.contains("llama.cpp: tg4 @ d300"), "{err}");
    assert!(!err.contains("could not restore"), "{err}");
    // Each engine processes the depth's tokens once; both tests at the depth restore that state.
    for engine in ["ferrite", "llama.cpp"] {
        let line = format!("{engine}: the depth's 300 tokens processed in");
        assert_eq!(err.matches(&line).count(), 1, "{engine}: {err}");
    }

    let json = [
        "-m", "demo", "-p", "16", "-n", "4", "-d", "300", "-r", "1", "-t", "1", "--json",
    ];
    let (out, _) = ok(&bench(&json, dir.path()));
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["n_depth"], serde_json::json!([300]));
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, test) in results.iter().zip(["pp16 @ d300", "tg4 @ d300"]) {
        assert_eq!(r["test"], test);
        assert_eq!(r["n_depth"], 300);
        positive(&r["ferrite"]["median"]);
    }
    // The plan reserves the longest test's context: the depth and the prompt (300 + 16).
    assert_eq!(v["memory_plan"]["n_ctx"], 316);

    // Interleaved (ferrite's warm-ups run first, alone): still once per engine.
    let interleaved = [
        "-m",
        "demo",
        "-p",
        "16",
        "-n",
        "4",
        "-d",
        "300",
        "-r",
        "1",
        "-t",
        "1",
        "--vs-llama",
        "--interleave",
    ];
    let (_, err) = ok(&bench(&interleaved, dir.path()));
    for engine in ["ferrite", "llama.cpp"] {
        let line = format!("{engine}: the depth's 300 tokens processed in");
        assert_eq!(err.matches(&line).count(), 1, "{engine}: {err}");
    }
    assert!(!err.contains("could not restore"), "{err}");
}

/// `--interleave`: both engines' repetitions alternate; the ratio is the median of the pairs' ratios (one pair per
/// repetition, so with three it is the middle one), llama.cpp's peak memory is not measured apart, and the flag
/// needs `--vs-llama`.
#[test]
fn interleave_pairs_the_repetitions() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "-m",
        "demo",
        "-p",
        "32",
        "-n",
        "8",
        "-r",
        "3",
        "-t",
        "1",
        "--vs-llama",
        "--interleave",
        "--json",
    ];
    let (out, err) = ok(&bench(&args, dir.path()));
    assert!(
        err.contains("ferrite: pp32") && err.contains("llama.cpp: tg8"),
        "{err}"
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["interleaved"], Value::Bool(true));
    assert!(v["llama_rss_peak_bytes"].is_null());
    for r in v["results"].as_array().unwrap() {
        let samples = |who: &str| -> Vec<f64> {
            r[who]["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(positive)
                .collect()
        };
        let (ours, theirs) = (samples("ferrite"), samples("llama"));
        assert_eq!((ours.len(), theirs.len()), (3, 3));
        let mut pairs: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| a / b).collect();
        pairs.sort_by(f64::total_cmp);
        let ratio = positive(&r["ratio"]);
        assert!(
            (ratio - pairs[1]).abs() <= 1e-9 * ratio,
            "{ratio} vs pairs {pairs:?}"
        );
    }

    let out = bench(&["-m", "demo", "--interleave"], dir.path());
    assert_eq!(out.status.code(), Some(2), "--interleave needs --vs-llama");
}

#[test]
fn bad_flags_exit_2_and_bad_input_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for bad in [
        &["-p", "8"][..],
        &["-m", "demo", "-r", "0"],
        &["-m", "demo", "-t", "0"],
        &["-m", "demo", "-t", "1,x"],
        &["-m", "demo", "-t", ""],
        &["-m", "demo", "-p", "-1"],
        &["-m", "demo", "-n", "many"],
        &["-m", "demo", "--ubatch", "0"],
        &["-m", "demo", "--cache-type", "q8"],
        &["-m", "demo", "-d", "x"],
        &["-m", "demo", "-d", "1,,2"],
        &["-m", "demo", "-d", "-5"],
        &["-m", "demo", "--llama-repack"],
        &["-m", "demo", "--bogus"],
    ] {
        let out = bench(bad, d);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty());
    }
    let out = bench(&["-m", "demo", "-p", "0", "-n", "0"], d);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(text(&out.stderr).contains("nothing to measure"));
    let out = bench(&["-m", d.join("none.gguf").to_str().unwrap(), "-t", "1"], d);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(text(&out.stderr).contains("does not exist"));
}
