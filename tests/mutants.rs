//! Mutation tests past the GGUF parser (issue 15, item 5). Suites, each mutant in a forked child:
//! - `model`: 10,000 seeded mutants of the demo model (1 to 4 changes each: metadata values, types and array lengths,
//!   keys removed or added, tensor types, shapes, names, removals, contents: NaN, inf, negative, huge and zero floats,
//!   `tid2eid` ids, raw bytes), each opened with `Engine::open` and run for one token of `complete` (template,
//!   tokenizer, prompt, one sampled token), with engine options varied by seed (repacked or mapped weights, fused or
//!   primitive operators, paged experts, small contexts);
//! - `sweep`: every tensor role retyped to every type its rows can be stored in, every numeric key set to each
//!   interesting value or removed (2,167 mutants, enumerated);
//! - `config`: models of other configurations with tensors shaped to match (what passes the shape checks);
//! - `session`: saved sessions truncated, flipped, from other models, through `Session::load` and on as `chat` goes;
//! - `quantize`: `ferrite quantize` of a Hugging Face checkpoint with a mutated `config.json`, safetensors header or
//!   shard index; `requantize`: model mutants through `ferrite quantize` (and `--dry-run`), then a token of the
//!   output; `imatrix`: mutated importance matrices (GGUF and legacy `.dat`) for the K- and IQ-types;
//! - `supervisor`: every way a child can fail is caught, an injected crash is reported with its seed, and the fast
//!   mutant writer writes what the mutant says.
//!
//! A child may end with exit 0 (it ran) or 1 (refused with a message); a signal (a GGML_ASSERT abort, a segfault, an
//! allocation past the address-space limit), a panic (exit 101), any other exit, a hang past the time limit or a peak
//! RSS over 2 GiB fails the test, which prints each failing mutant's seed and mutations and keeps its file (see
//! below to replay one). The runs are deterministic: mutant `i` of a suite has seed `base + i`.
//!
//! Cost: about 11 ms of CPU per model mutant (fork, mutant written over a tmpfs copy of the model, open, one token),
//! so the default run takes about 90 s on two free cores.
//!
//! This is its own test binary without libtest's harness (`harness = false`): the parent stays single-threaded, as
//! `fork` needs, and runs one child per core.
//!
//! Environment:
//! - `FERRITE_MUTANTS=N`: model mutants (default 10,000; the other random suites scale with it);
//! - `FERRITE_MUTANTS_SEED=S`: the base seed (default fixed);
//! - `FERRITE_MUTANTS_REPLAY=SUITE:SEED`: run one mutant in a child and print what it did and how it ended;
//! - `FERRITE_MUTANTS_JOBS=J`: children at a time (default: the CPU count);
//! - `FERRITE_MUTANTS_VERBOSE=1`: every mutant, its outcome, time and last line of stderr.
//!
//! Arguments (as libtest takes them): a filter selects the suites whose name contains it; `--list` lists them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use ferrite::chat::{ChatOptions, Message};
use ferrite::engine::{Engine, Logits};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use gguf::GgufFile;
use testkit::mutants::{
    self, engine_options, mutate_bytes, open_and_run, spawn, stderr_tail, wait_any, Child, Choices,
    Described, FastWriter, Limits, Mutation, Outcome, Parts, SplitMix,
};
use testkit::tiny_hf::{write_tiny_checkpoint, CheckpointOptions, Fill};

const DEFAULT_MODEL_MUTANTS: u64 = 10_000;
const DEFAULT_SEED: u64 = 0x15_0005;

/// What a child runs for mutant `seed` with its scratch path: the exit code.
type RunFn<'a> = Box<dyn Fn(u64, &Path) -> i32 + 'a>;
/// Writes mutant `seed` to a path, for a replay.
type KeepFn<'a> = Box<dyn Fn(u64, &Path) + 'a>;

/// One suite: a name, how many mutants, and what a child runs for mutant `seed` (its exit code).
struct Suite<'a> {
    name: &'static str,
    count: u64,
    /// Runs mutant `seed` in the child, with `file` as its scratch file; returns the exit code.
    run: RunFn<'a>,
    /// What mutant `seed` is, for the report (computed in the parent).
    describe: Box<dyn Fn(u64) -> String + 'a>,
    /// Writes mutant `seed` to `path` for a replay (when the suite's mutants are files).
    keep: KeepFn<'a>,
    /// Percent of the mutants that may be skipped (not writable) before the generator counts as broken.
    skips: u64,
}

struct Failure {
    suite: &'static str,
    seed: u64,
    outcome: Outcome,
    what: String,
    stderr: String,
    kept: Option<PathBuf>,
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// `FERRITE_MUTANTS_VERBOSE=1`: every mutant, its outcome and the last line of its stderr.
fn verbose() -> bool {
    std::env::var_os("FERRITE_MUTANTS_VERBOSE").is_some()
}

fn jobs() -> usize {
    env_u64("FERRITE_MUTANTS_JOBS").map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |j| j.max(1) as usize,
    )
}

/// Runs `suite.count` mutants from `base`, `jobs` children at a time. Returns the failures.
fn run_suite(suite: &Suite<'_>, base: u64, dir: &Path, limits: &Limits) -> Vec<Failure> {
    let jobs = jobs();
    let start = Instant::now();
    let mut children: Vec<Child> = Vec::new();
    let mut free: Vec<usize> = (0..jobs).rev().collect();
    let mut slot_of = std::collections::HashMap::new();
    let mut failures = Vec::new();
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    let mut next = 0u64;
    while next < suite.count || !children.is_empty() {
        while next < suite.count && !free.is_empty() {
            let slot = free.pop().unwrap();
            let seed = base.wrapping_add(next);
            let file = dir.join(format!("{}-{slot}", suite.name));
            let stderr = dir.join(format!("{}-{slot}.stderr", suite.name));
            let run = &suite.run;
            let child = spawn(seed, limits, &stderr, || run(seed, &file))
                .unwrap_or_else(|e| panic!("cannot fork: {e}"));
            slot_of.insert(child.pid, slot);
            children.push(child);
            next += 1;
        }
        let (child, outcome) = wait_any(&mut children, limits);
        let slot = slot_of.remove(&child.pid).unwrap();
        let label = match &outcome {
            Outcome::Ok(c) => format!("exit {c}"),
            Outcome::Skipped => "skipped".into(),
            _ => "FAILED".into(),
        };
        *counts.entry(label).or_default() += 1;
        if verbose() {
            let err = stderr_tail(&dir.join(format!("{}-{slot}.stderr", suite.name)), 300);
            eprintln!(
                "{} {:#x}: {outcome} in {} ms: {} => {}",
                suite.name,
                child.tag,
                child.started.elapsed().as_millis(),
                (suite.describe)(child.tag),
                err.lines().last().unwrap_or("").trim()
            );
        }
        if outcome.is_failure() {
            let seed = child.tag;
            let stderr = stderr_tail(&dir.join(format!("{}-{slot}.stderr", suite.name)), 2000);
            // The first few failing mutants of a run are kept (a broken build fails thousands; model files are 12 MB).
            let kept = keep_dir().filter(|_| failures.len() < 20).map(|d| {
                let path = d.join(format!("{}-{seed:#x}", suite.name));
                (suite.keep)(seed, &path);
                path
            });
            eprintln!(
                "mutants {}: seed {seed:#x}: {outcome}: {}\n{stderr}",
                suite.name,
                (suite.describe)(seed)
            );
            failures.push(Failure {
                suite: suite.name,
                seed,
                outcome,
                what: (suite.describe)(seed),
                stderr,
                kept,
            });
        }
        free.push(slot);
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "mutants {}: {} mutants from seed {base:#x} in {secs:.1} s ({:.1} ms each with {jobs} at a time): {counts:?}",
        suite.name,
        suite.count,
        1e3 * secs / suite.count.max(1) as f64
    );
    let skipped = counts.get("skipped").copied().unwrap_or(0);
    assert!(
        skipped * 100 <= suite.count * suite.skips,
        "{skipped} of {} mutants of {} could not be written: the generator is broken",
        suite.count,
        suite.name
    );
    // A suite whose mutants are all refused (or all accepted) tests nothing past the first check.
    if suite.count >= 100 {
        for code in ["exit 0", "exit 1"] {
            assert!(
                counts.get(code).copied().unwrap_or(0) * 100 >= suite.count,
                "fewer than 1% of the {} mutants ended with {code}: {counts:?}",
                suite.name
            );
        }
    }
    failures
}

/// Where failing mutants are kept for a replay.
fn keep_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mutants");
    std::fs::create_dir_all(&d).ok()?;
    Some(d)
}

fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("ferrite-mutants")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("ferrite-mutants")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// What a child runs.

/// Exit code of a child: 0 when `f` succeeded, 1 with the message on stderr when it failed.
fn exit_code(result: Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Suites.

fn model_suite<'a>(parts: &'a Parts<'a>, fast: &'a FastWriter<'a>, count: u64) -> Suite<'a> {
    let mutant = move |seed: u64| {
        let ms = mutants::mutations(parts, &mut SplitMix(seed));
        let p = mutants::apply(parts, &ms);
        (ms, p)
    };
    Suite {
        name: "model",
        count,
        run: Box::new(move |seed, file| {
            let (_, p) = mutant(seed);
            let (slot, whole) = (
                file.with_extension("gguf"),
                file.with_extension("whole.gguf"),
            );
            if !slot.exists() && fast.prepare(&slot).is_err() {
                return mutants::SKIPPED;
            }
            match fast.write(&p, &slot, &whole) {
                Ok(path) => exit_code(open_and_run(path, seed)),
                Err(_) => mutants::SKIPPED,
            }
        }),
        describe: Box::new(move |seed| Described(&mutant(seed).0).to_string()),
        keep: Box::new(move |seed, path| {
            let _ = mutant(seed).1.write(&path.with_extension("gguf"));
        }),
        skips: 5,
    }
}

/// Every single retype of a tensor role and every interesting value of every metadata key ([`mutants::sweep`]):
/// mutant `i` is entry `i` (the seed only picks the engine options).
fn sweep_suite<'a>(
    parts: &'a Parts<'a>,
    fast: &'a FastWriter<'a>,
    list: &'a [Vec<Mutation>],
) -> Suite<'a> {
    Suite {
        name: "sweep",
        count: list.len() as u64,
        run: Box::new(move |i, file| {
            let p = mutants::apply(parts, &list[i as usize]);
            let (slot, whole) = (
                file.with_extension("gguf"),
                file.with_extension("whole.gguf"),
            );
            if !slot.exists() && fast.prepare(&slot).is_err() {
                return mutants::SKIPPED;
            }
            match fast.write(&p, &slot, &whole) {
                Ok(path) => exit_code(open_and_run(path, i)),
                Err(_) => mutants::SKIPPED,
            }
        }),
        describe: Box::new(move |i| Described(&list[i as usize]).to_string()),
        keep: Box::new(move |i, path| {
            let _ = mutants::apply(parts, &list[i as usize]).write(&path.with_extension("gguf"));
        }),
        skips: 5,
    }
}

/// Models of other configurations, tensors shaped to match ([`mutants::config_mutant`]).
fn config_suite<'a>(count: u64) -> Suite<'a> {
    let mutant = |seed: u64| mutants::config_mutant(&mut SplitMix(seed));
    Suite {
        name: "config",
        count,
        run: Box::new(move |seed, file| {
            let file = file.with_extension("gguf");
            let (cfg, _) = mutant(seed);
            let written =
                std::panic::catch_unwind(|| mutants::write_config_model(&file, &cfg, seed));
            match written {
                Ok(Some(())) => exit_code(open_and_run(&file, seed)),
                _ => mutants::SKIPPED,
            }
        }),
        describe: Box::new(move |seed| mutant(seed).1),
        keep: Box::new(move |seed, path| {
            let _ =
                mutants::write_config_model(&path.with_extension("gguf"), &mutant(seed).0, seed);
        }),
        skips: 30,
    }
}

/// Saved sessions of the demo model (a prompt of a few tokens), and of other models.
struct Sessions {
    demo_model: PathBuf,
    /// The demo model's session, then sessions of other models.
    files: Vec<Vec<u8>>,
}

/// Runs `f` in a child and requires it to succeed (setup steps that need an engine: the parent must not start
/// ggml's threads before forking).
fn in_child(dir: &Path, what: &str, f: impl FnOnce() -> Result<()>) {
    let limits = Limits::default();
    let stderr = dir.join("setup.stderr");
    let out = mutants::run_one(&limits, &stderr, || exit_code(f())).unwrap();
    assert_eq!(
        out,
        Outcome::Ok(0),
        "{what}: {}",
        stderr_tail(&stderr, 4000)
    );
}

fn save_session(model: &Path, tokens: &[u32], out: &Path) -> Result<()> {
    let engine = Engine::open(model, engine_options(2))?;
    let mut s = engine.session()?;
    s.feed(tokens, Logits::Last)?;
    s.save(out)
}

fn sessions(dir: &Path, demo_model: &Path) -> Sessions {
    let other = dir.join("other.gguf");
    write_tiny_model(&other, &TinyConfig::demo(), 2).unwrap();
    let small = dir.join("small.gguf");
    write_tiny_model(&small, &TinyConfig::small(), 1).unwrap();
    let mut files = Vec::new();
    for (i, (model, tokens)) in [
        (demo_model, &[0u32, 5, 9, 100][..]),
        (demo_model, &[][..]),
        (&other, &[0, 5, 9][..]),
        (&small, &[0, 1, 2, 3, 4, 5, 6, 7][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.join(format!("base-{i}.session"));
        in_child(dir, "saving a session", || {
            save_session(model, tokens, &path)
        });
        files.push(std::fs::read(&path).unwrap());
    }
    let _ = std::fs::remove_file(&other);
    let _ = std::fs::remove_file(&small);
    Sessions {
        demo_model: demo_model.to_path_buf(),
        files,
    }
}

fn session_suite(s: &Sessions, count: u64) -> Suite<'_> {
    // Most mutants are the demo model's session mutated; some are another model's session as it is.
    let mutant = move |seed: u64| -> (Vec<u8>, String) {
        let mut c = SplitMix(seed);
        let which = match c.below(10) {
            0 => 2,
            1 => 3,
            2 => 1,
            _ => 0,
        };
        let base = &s.files[which];
        if which >= 2 && c.chance(1, 2) {
            return (
                base.clone(),
                format!("the session of model {which} as it is"),
            );
        }
        let (bytes, what) = mutate_bytes(base, &mut c);
        (bytes, format!("session {which}: {what}"))
    };
    Suite {
        name: "session",
        count,
        run: Box::new(move |seed, file| {
            let (bytes, _) = mutant(seed);
            if std::fs::write(file, bytes).is_err() {
                return mutants::SKIPPED;
            }
            exit_code((|| {
                let engine = Engine::open(&s.demo_model, engine_options(seed))?;
                let mut session = engine.session()?;
                session.load(file)?;
                // Continue as `chat` does after /load: a token, one sampled with the repetition penalty over the
                // loaded tokens, and a rewind into them (which processes the file's tokens again).
                let logits = session.feed(&[7], Logits::Last)?;
                let mut sampler = ferrite::sampler::Sampler::new(ferrite::sampler::SamplerConfig {
                    repeat_penalty: 1.3,
                    seed,
                    ..Default::default()
                });
                let next = sampler.sample(&logits, session.tokens());
                session.feed(&[next], Logits::Last)?;
                session.rewind(session.n_past() / 2)?;
                Ok(())
            })())
        }),
        describe: Box::new(move |seed| mutant(seed).1),
        keep: Box::new(move |seed, path| {
            let _ = std::fs::write(path, mutant(seed).0);
        }),
        skips: 5,
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_ferrite");

/// Replaces the child with `ferrite ARGS` (exit code and signals are then the command's own).
fn exec_ferrite(args: &[&str]) -> i32 {
    use std::os::unix::process::CommandExt as _;
    let err = std::process::Command::new(BIN).args(args).exec();
    eprintln!("cannot run {BIN}: {err}");
    99
}

/// Runs `ferrite ARGS` and returns its exit code; a signal that ended it ends this process too (so the supervisor
/// sees it as it would have seen it from the command itself).
fn run_ferrite(args: &[&str]) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    let status = match std::process::Command::new(BIN).args(args).status() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot run {BIN}: {e}");
            return 99;
        }
    };
    if let Some(sig) = status.signal() {
        // SAFETY: restores the default action of the signal and sends it to this child process.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
    status.code().unwrap_or(99)
}

/// A folder `slot` holding hard links to every file of `base` (a fresh copy of the folder, for the price of the
/// links), except `replaced`, written with `bytes`.
fn linked_copy(base: &Path, slot: &Path, replaced: &str, bytes: &[u8]) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(slot);
    std::fs::create_dir_all(slot)?;
    for entry in std::fs::read_dir(base)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str() != Some(replaced) {
            std::fs::hard_link(entry.path(), slot.join(&name))?;
        }
    }
    std::fs::write(slot.join(replaced), bytes)
}

/// A tiny Hugging Face checkpoint of the demo configuration (2 shards and an index), as `ferrite quantize` reads.
struct Checkpoint {
    dir: PathBuf,
    /// The files a mutant may change, with their bytes.
    files: Vec<(String, Vec<u8>)>,
}

fn checkpoint(dir: &Path) -> Checkpoint {
    let ckpt = dir.join("hf");
    let opts = CheckpointOptions {
        shards: 2,
        mtp: false,
        fill: Fill::Model,
    };
    write_tiny_checkpoint(&ckpt, &TinyConfig::demo(), 1, &opts).unwrap();
    let mut files = Vec::new();
    for name in [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ] {
        files.push((name.to_string(), std::fs::read(ckpt.join(name)).unwrap()));
    }
    Checkpoint { dir: ckpt, files }
}

fn quantize_suite(ck: &Checkpoint, count: u64) -> Suite<'_> {
    let mutant = move |seed: u64| -> (usize, Vec<u8>, String) {
        let mut c = SplitMix(seed);
        let which = match c.below(10) {
            0..=4 => 0,
            5..=6 => 1,
            7..=8 => 2,
            _ => 3,
        };
        let (name, base) = &ck.files[which];
        let (bytes, what) = if name.ends_with(".safetensors") {
            mutants::mutate_safetensors(base, &mut c)
        } else if c.chance(1, 6) {
            mutate_bytes(base, &mut c)
        } else {
            let mut json: serde_json::Value = serde_json::from_slice(base).unwrap();
            let what = mutants::mutate_json(&mut json, &mut c);
            (serde_json::to_vec_pretty(&json).unwrap(), what)
        };
        (which, bytes, format!("{name}: {what}"))
    };
    let recipe = |seed: u64| ["Q8_0", "Q8_0", "MXFP4", "Q4_K_M"][(seed % 4) as usize];
    Suite {
        name: "quantize",
        count,
        run: Box::new(move |seed, slot| {
            let (which, bytes, _) = mutant(seed);
            let input = slot.join("hf");
            if linked_copy(&ck.dir, &input, &ck.files[which].0, &bytes).is_err() {
                return mutants::SKIPPED;
            }
            let out = slot.join("out.gguf");
            let (input, out) = (input.to_str().unwrap(), out.to_str().unwrap());
            exec_ferrite(&[
                "quantize",
                input,
                out,
                "--type",
                recipe(seed),
                "-t",
                "1",
                "--overwrite",
            ])
        }),
        describe: Box::new(move |seed| format!("{} (recipe {})", mutant(seed).2, recipe(seed))),
        keep: Box::new(move |seed, path| {
            let (which, bytes, _) = mutant(seed);
            let _ = linked_copy(&ck.dir, path, &ck.files[which].0, &bytes);
        }),
        skips: 5,
    }
}

/// `ferrite quantize` of model mutants (a GGUF input): the planner, `--dry-run` and the conversion see the same
/// hostile metadata and tensors as `Engine::open`.
fn requantize_suite<'a>(parts: &'a Parts<'a>, fast: &'a FastWriter<'a>, count: u64) -> Suite<'a> {
    let mutant = move |seed: u64| {
        let ms = mutants::mutations(parts, &mut SplitMix(seed));
        let p = mutants::apply(parts, &ms);
        (ms, p)
    };
    let recipe = |seed: u64| ["Q8_0", "Q4_K_M", "MXFP4", "F16", "Q8_0"][(seed % 5) as usize];
    let dry = |seed: u64| seed % 7 == 3;
    Suite {
        name: "requantize",
        count,
        run: Box::new(move |seed, file| {
            let (_, p) = mutant(seed);
            let (slot, whole) = (
                file.with_extension("gguf"),
                file.with_extension("whole.gguf"),
            );
            if !slot.exists() && fast.prepare(&slot).is_err() {
                return mutants::SKIPPED;
            }
            let Ok(input) = fast.write(&p, &slot, &whole) else {
                return mutants::SKIPPED;
            };
            let out = file.with_extension("out.gguf");
            let (input, out) = (input.to_str().unwrap(), out.to_str().unwrap());
            let mut args = vec![
                "quantize",
                input,
                out,
                "--type",
                recipe(seed),
                "-t",
                "1",
                "--overwrite",
            ];
            if dry(seed) {
                args.push("--dry-run");
            }
            // What quantize writes is then run for a token (its types and the mutant's values together).
            match run_ferrite(&args) {
                0 if !dry(seed) => exit_code(open_and_run(Path::new(out), seed)),
                code => code,
            }
        }),
        describe: Box::new(move |seed| {
            let dry = if dry(seed) { ", --dry-run" } else { "" };
            format!(
                "{} (recipe {}{dry})",
                Described(&mutant(seed).0),
                recipe(seed)
            )
        }),
        keep: Box::new(move |seed, path| {
            let _ = mutant(seed).1.write(&path.with_extension("gguf"));
        }),
        skips: 5,
    }
}

/// Importance matrices of the demo model in llama.cpp's two formats: GGUF (`NAME.in_sum2`, `NAME.counts`) and the
/// legacy `.dat`.
struct Imatrix {
    gguf: PathBuf,
    dat: Vec<u8>,
}

fn imatrix(dir: &Path, demo: &Path) -> Imatrix {
    let model = gguf::Model::open(demo).unwrap();
    let mut w = gguf::Writer::new();
    w.set("general.type", gguf::Value::String("imatrix".into()));
    w.set(
        "imatrix.datasets",
        gguf::Value::string_array(["calibration.txt"]),
    );
    w.set("imatrix.chunk_count", gguf::Value::U32(4));
    w.set("imatrix.chunk_size", gguf::Value::U32(512));
    let mut data: Vec<Vec<u8>> = Vec::new();
    let mut dat = Vec::new();
    let mut n_entries = 0i32;
    let mut entries = Vec::new();
    for t in model.tensors() {
        let dims = &t.info.dims;
        if dims.len() < 2 || t.info.ty != gguf::GgmlType::F32 {
            continue;
        }
        let (n, n_mat) = (dims[0] as usize, dims.get(2).copied().unwrap_or(1) as usize);
        let sum2: Vec<f32> = (0..n * n_mat)
            .map(|i| 0.5 + ((i * 7919) % 97) as f32)
            .collect();
        w.add_tensor(
            &format!("{}.in_sum2", t.info.name),
            &[n as u64, n_mat as u64],
            gguf::GgmlType::F32,
        )
        .unwrap();
        w.add_tensor(
            &format!("{}.counts", t.info.name),
            &[1, n_mat as u64],
            gguf::GgmlType::F32,
        )
        .unwrap();
        data.push(sum2.iter().flat_map(|v| v.to_le_bytes()).collect());
        data.push(
            [4.0f32]
                .repeat(n_mat)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        );
        // Legacy: name, ncall, nval, values (mean * ncall).
        n_entries += 1;
        let name = t.info.name.as_bytes();
        entries.extend_from_slice(&(name.len() as i32).to_le_bytes());
        entries.extend_from_slice(name);
        entries.extend_from_slice(&4i32.to_le_bytes());
        entries.extend_from_slice(&(sum2.len() as i32).to_le_bytes());
        entries.extend(sum2.iter().flat_map(|v| v.to_le_bytes()));
    }
    dat.extend_from_slice(&n_entries.to_le_bytes());
    dat.extend_from_slice(&entries);
    dat.extend_from_slice(&4i32.to_le_bytes());
    let dataset = b"calibration.txt";
    dat.extend_from_slice(&(dataset.len() as i32).to_le_bytes());
    dat.extend_from_slice(dataset);
    let path = dir.join("imatrix.gguf");
    w.write_file(&path, true, |i, _, out| out.write_all(&data[i]))
        .unwrap();
    Imatrix { gguf: path, dat }
}

fn imatrix_suite<'a>(
    im: &'a Imatrix,
    parts: &'a Parts<'a>,
    demo: &'a Path,
    count: u64,
) -> Suite<'a> {
    // (bytes, extension, what)
    let mutant = move |seed: u64| -> (Vec<u8>, &'static str, String) {
        let mut c = SplitMix(seed);
        match c.below(4) {
            0 | 1 => {
                let ms = mutants::mutations(parts, &mut c);
                let p = mutants::apply(parts, &ms);
                let tmp =
                    tempfile::NamedTempFile::new_in(Path::new(&im.gguf).parent().unwrap()).unwrap();
                let bytes = match p.write(tmp.path()) {
                    Ok(()) => std::fs::read(tmp.path()).unwrap(),
                    Err(_) => Vec::new(),
                };
                (bytes, "gguf", format!("gguf: {}", Described(&ms)))
            }
            2 => {
                let base = std::fs::read(&im.gguf).unwrap();
                let (b, what) = mutate_bytes(&base, &mut c);
                (b, "gguf", format!("gguf bytes: {what}"))
            }
            _ => {
                let (b, what) = mutate_bytes(&im.dat, &mut c);
                (b, "dat", format!("dat bytes: {what}"))
            }
        }
    };
    // The K-quants weigh their rounding with the matrix; IQ2_XXS (which wants one) starts with seconds of grid
    // set-up, so only one mutant in 32 uses it here (longer runs reach more).
    let recipe = |seed: u64| match seed % 32 {
        0 => "IQ2_XXS",
        s if s % 2 == 0 => "Q4_K_M",
        _ => "Q2_K",
    };
    Suite {
        name: "imatrix",
        count,
        run: Box::new(move |seed, slot| {
            let (bytes, ext, _) = mutant(seed);
            if bytes.is_empty() {
                return mutants::SKIPPED;
            }
            let file = slot.with_extension(ext);
            if std::fs::write(&file, bytes).is_err() {
                return mutants::SKIPPED;
            }
            let out = slot.with_extension("out.gguf");
            exec_ferrite(&[
                "quantize",
                demo.to_str().unwrap(),
                out.to_str().unwrap(),
                "--type",
                recipe(seed),
                "--imatrix",
                file.to_str().unwrap(),
                "-t",
                "1",
                "--overwrite",
            ])
        }),
        describe: Box::new(move |seed| format!("{} (recipe {})", mutant(seed).2, recipe(seed))),
        keep: Box::new(move |seed, path| {
            let (bytes, ext, _) = mutant(seed);
            let _ = std::fs::write(path.with_extension(ext), bytes);
        }),
        skips: 5,
    }
}

/// Children that end badly in every way the supervisor must catch, and one that ends well: proves the suites can
/// fail (a test that cannot fail is a defect).
fn supervisor_check(dir: &Path) {
    let limits = Limits::default();
    let stderr = dir.join("supervisor.stderr");
    let run = |f: &dyn Fn() -> i32| mutants::run_one(&limits, &stderr, f).unwrap();
    let short = Limits {
        time: std::time::Duration::from_secs(1),
        ..limits
    };
    assert_eq!(run(&|| 0), Outcome::Ok(0));
    assert_eq!(run(&|| 1), Outcome::Ok(1));
    assert_eq!(run(&|| panic!("a panic")), Outcome::Exit(101));
    assert_eq!(run(&|| 134), Outcome::Exit(134));
    assert_eq!(
        run(&|| std::process::abort()),
        Outcome::Signal(libc::SIGABRT)
    );
    assert_eq!(
        run(&|| {
            // SAFETY: deliberately crashes the child (Rust's own SIGSEGV handler, for stack overflows, reset first).
            unsafe {
                libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                libc::raise(libc::SIGSEGV);
            }
            0
        }),
        Outcome::Signal(libc::SIGSEGV)
    );
    let hang = mutants::run_one(&short, &stderr, || loop {
        std::thread::sleep(std::time::Duration::from_millis(10))
    });
    assert_eq!(hang.unwrap(), Outcome::Hang);
    // 2.5 GiB touched: under the address-space limit, over the RSS limit.
    let big = run(&|| {
        let v = vec![1u8; 5 << 29];
        std::hint::black_box(&v);
        0
    });
    assert!(matches!(big, Outcome::Memory(_)), "{big:?}");
    // An allocation past the address-space limit: an abort, not the machine's memory.
    let huge = run(&|| {
        let v = vec![1u8; 8 << 30];
        std::hint::black_box(&v);
        0
    });
    assert_eq!(huge, Outcome::Signal(libc::SIGABRT));
    assert!(Outcome::Signal(libc::SIGABRT).is_failure() && !Outcome::Ok(1).is_failure());
    eprintln!("mutants supervisor: every way a child can fail is caught");
}

/// A suite run reports a crash the way ferrite crashed before issue 15's fixes: a child standing in for the product
/// aborts on the mutants that write expert ids past the expert count into a `tid2eid` table (ferrite then wrote out
/// of bounds in `mul_mat_id`), and the run must name exactly those seeds.
fn injected_check(parts: &Parts<'_>, base: u64, dir: &Path, limits: &Limits) {
    let crashes = |seed: u64| {
        mutants::mutations(parts, &mut SplitMix(seed))
            .iter()
            .any(|m| {
                matches!(m, mutants::Mutation::SetInts(t, _, n, v)
                if t.ends_with("tid2eid.weight") && *n > 0 && !(0..8).contains(v))
            })
    };
    let count = 600;
    let expected: Vec<u64> = (0..count)
        .map(|i| base + i)
        .filter(|&s| crashes(s))
        .collect();
    assert!(!expected.is_empty(), "no tid2eid mutant among {count}");
    let suite = Suite {
        name: "injected",
        count,
        run: Box::new(move |seed, _| match crashes(seed) {
            true => std::process::abort(),
            false => (seed % 2) as i32,
        }),
        describe: Box::new(|seed| {
            Described(&mutants::mutations(parts, &mut SplitMix(seed))).to_string()
        }),
        keep: Box::new(|_, _| {}),
        skips: 0,
    };
    eprintln!(
        "mutants injected: {count} stand-in runs, {} of them crash on purpose (reported below):",
        expected.len()
    );
    let failures = run_suite(&suite, base, dir, limits);
    let mut found: Vec<u64> = failures.iter().map(|f| f.seed).collect();
    found.sort_unstable();
    assert_eq!(
        found, expected,
        "the injected crashes were not all reported"
    );
    assert!(failures
        .iter()
        .all(|f| f.outcome == Outcome::Signal(libc::SIGABRT)));
    eprintln!(
        "mutants injected: the {} injected crashes were reported",
        expected.len()
    );
}

/// The fast writer writes what each mutant says: for the first 300 model mutants, the file it leaves (in one slot
/// file reused from mutant to mutant, or whole) reads back as the mutant's metadata and tensors.
fn writer_check(parts: &Parts<'_>, fast: &FastWriter<'_>, base: u64, dir: &Path) {
    let (slot, whole) = (dir.join("check.gguf"), dir.join("check-whole.gguf"));
    fast.prepare(&slot).unwrap();
    let mut in_place = 0;
    for i in 0..300 {
        let ms = mutants::mutations(parts, &mut SplitMix(base + i));
        let p = mutants::apply(parts, &ms);
        let Ok(path) = fast.write(&p, &slot, &whole) else {
            continue;
        };
        in_place += usize::from(path == slot);
        let f = GgufFile::open(path).unwrap();
        let what = Described(&ms);
        let meta: Vec<_> = f
            .metadata()
            .iter()
            .filter(|(k, _)| *k != mutants::PAD_KEY)
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let mut expected = p.metadata.clone();
        expected.retain(|(k, _)| k != mutants::PAD_KEY);
        // Compared as printed: NaN values equal themselves there.
        assert_eq!(format!("{meta:?}"), format!("{expected:?}"), "{what}");
        assert_eq!(f.header().tensors.len(), p.tensors.len(), "{what}");
        for (t, e) in f.header().tensors.iter().zip(&p.tensors) {
            assert_eq!((&t.name, t.ty, &t.dims), (&e.name, e.ty, &e.dims), "{what}");
            assert!(
                f.tensor_data(t) == &e.data[..],
                "{what}: data of {}",
                t.name
            );
        }
    }
    assert!(
        in_place > 150,
        "only {in_place} of 300 mutants written in place"
    );
    eprintln!("mutants writer: 300 mutants read back as generated ({in_place} written in place)");
}

/// Where a child's time goes, for the unmutated model (`--profile`, in this process).
fn profile(parts: &Parts<'_>, dir: &Path) {
    let file = dir.join("profile.gguf");
    for round in 0..5 {
        let t = Instant::now();
        parts.write(&file).unwrap();
        let write = t.elapsed();
        let t = Instant::now();
        let engine = Engine::open(&file, engine_options(3)).unwrap();
        let open = t.elapsed();
        let t = Instant::now();
        let tok = engine.tokenizer().unwrap();
        let text =
            engine
                .prompt_format()
                .render(&[Message::user("hi")], &ChatOptions::default(), true);
        let prompt = tok.encode(&text, true);
        let tokenize = t.elapsed();
        let t = Instant::now();
        let mut session = engine.session().unwrap();
        let sess = t.elapsed();
        let t = Instant::now();
        session.feed(&prompt, Logits::Last).unwrap();
        session.feed(&[5], Logits::Last).unwrap();
        let feed = t.elapsed();
        eprintln!("round {round}: write {write:?} open {open:?} tokenizer+template {tokenize:?} session {sess:?} feed {} tokens {feed:?}", prompt.len() + 1);
    }
}

// ---------------------------------------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let suites = [
        "supervisor",
        "model",
        "sweep",
        "config",
        "session",
        "quantize",
        "requantize",
        "imatrix",
    ];
    if args.iter().any(|a| a == "--list") {
        for s in suites {
            println!("{s}: test");
        }
        return;
    }
    // libtest's flags that take a value (`--test-threads 2`): the value is not a filter.
    let with_value = [
        "--test-threads",
        "--color",
        "--format",
        "--logfile",
        "--skip",
        "-Z",
    ];
    let filter = args
        .iter()
        .enumerate()
        .find(|(i, a)| {
            !a.starts_with('-') && (*i == 0 || !with_value.contains(&args[i - 1].as_str()))
        })
        .map(|(_, a)| a.clone());
    let selected = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let n_model = env_u64("FERRITE_MUTANTS").unwrap_or(DEFAULT_MODEL_MUTANTS);
    let base = env_u64("FERRITE_MUTANTS_SEED").unwrap_or(DEFAULT_SEED);
    let limits = Limits::default();

    let dir = scratch_dir();
    let demo = dir.path().join("demo.gguf");
    write_tiny_model(&demo, &TinyConfig::demo(), 1).unwrap();
    let file = GgufFile::open(&demo).unwrap();
    let parts = Parts::of(&file);
    let fast = FastWriter::new(&parts).unwrap();
    let sessions_of = || sessions(dir.path(), &demo);

    if let Ok(replay) = std::env::var("FERRITE_MUTANTS_REPLAY") {
        let (suite, seed) = replay
            .split_once(':')
            .expect("FERRITE_MUTANTS_REPLAY=SUITE:SEED");
        let seed = match seed.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).unwrap(),
            None => seed.parse().unwrap(),
        };
        let (sessions, ck, im, im_file, im_parts, list);
        let s = match suite {
            "sweep" => {
                list = mutants::sweep(&parts);
                sweep_suite(&parts, &fast, &list)
            }
            "model" => model_suite(&parts, &fast, 1),
            "session" => {
                sessions = sessions_of();
                session_suite(&sessions, 1)
            }
            "config" => config_suite(1),
            "requantize" => requantize_suite(&parts, &fast, 1),
            "quantize" => {
                ck = checkpoint(dir.path());
                quantize_suite(&ck, 1)
            }
            "imatrix" => {
                im = imatrix(dir.path(), &demo);
                im_file = GgufFile::open(&im.gguf).unwrap();
                im_parts = Parts::of(&im_file);
                imatrix_suite(&im, &im_parts, &demo, 1)
            }
            other => panic!("no suite {other}"),
        };
        let stderr = dir.path().join("replay.stderr");
        let file = dir.path().join("replay");
        let out = mutants::run_one(&limits, &stderr, || (s.run)(seed, &file)).unwrap();
        println!("{suite} {seed:#x}: {}", (s.describe)(seed));
        println!("{out}\n{}", stderr_tail(&stderr, 8000));
        let code = i32::from(out.is_failure());
        drop(s);
        // The scratch folder (on a tmpfs) is removed before exiting.
        let _ = dir.close();
        std::process::exit(code);
    }

    if args.iter().any(|a| a == "--profile") {
        profile(&parts, dir.path());
        return;
    }
    let mut failures = Vec::new();
    if selected("supervisor") {
        supervisor_check(dir.path());
        injected_check(&parts, base, dir.path(), &limits);
        writer_check(&parts, &fast, base, dir.path());
    }
    if selected("model") {
        failures.extend(run_suite(
            &model_suite(&parts, &fast, n_model),
            base,
            dir.path(),
            &limits,
        ));
    }
    if selected("sweep") {
        let list = mutants::sweep(&parts);
        failures.extend(run_suite(
            &sweep_suite(&parts, &fast, &list),
            0,
            dir.path(),
            &limits,
        ));
    }
    if selected("config") {
        let s = config_suite((n_model / 100).max(1));
        failures.extend(run_suite(&s, base, dir.path(), &limits));
    }
    if selected("session") {
        let sessions = sessions_of();
        let s = session_suite(&sessions, (n_model / 30).max(1));
        failures.extend(run_suite(&s, base, dir.path(), &limits));
    }
    if selected("quantize") {
        let ck = checkpoint(dir.path());
        let s = quantize_suite(&ck, (n_model / 30).max(1));
        failures.extend(run_suite(&s, base, dir.path(), &limits));
    }
    if selected("requantize") {
        let s = requantize_suite(&parts, &fast, (n_model / 100).max(1));
        failures.extend(run_suite(&s, base, dir.path(), &limits));
    }
    if selected("imatrix") {
        let im = imatrix(dir.path(), &demo);
        let file = GgufFile::open(&im.gguf).unwrap();
        let parts = Parts::of(&file);
        let s = imatrix_suite(&im, &parts, &demo, (n_model / 150).max(1));
        failures.extend(run_suite(&s, base, dir.path(), &limits));
    }
    if failures.is_empty() {
        eprintln!("mutants: no failures");
        return;
    }
    eprintln!("\n{} failing mutants:", failures.len());
    for f in &failures {
        eprintln!(
            "- {} seed {:#x}: {}\n  {}\n  replay: FERRITE_MUTANTS_REPLAY={}:{:#x} cargo test --release --test mutants{}\n  {}",
            f.suite,
            f.seed,
            f.outcome,
            f.what,
            f.suite,
            f.seed,
            f.kept
                .as_ref()
                .map_or(String::new(), |p| format!(" (file kept: {})", p.display())),
            f.stderr.lines().last().unwrap_or("")
        );
    }
    drop(parts);
    drop(file);
    let _ = dir.close();
    std::process::exit(1);
}
