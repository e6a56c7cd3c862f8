//! Mutation tests past the GGUF parser (issue 15, item 5): mutants of the demo model (metadata values and types,
//! array lengths, tensor types, shapes, names and contents: NaN, inf, negative, huge and zero floats, `tid2eid` ids)
//! each opened with `Engine::open` and run for one token of `complete` (template, tokenizer, prompt, one sampled
//! token) in a forked child; the same for saved sessions (`Session::load`, then a token), `quantize`'s Hugging Face
//! inputs (`config.json` values, safetensors headers) and imatrix files.
//!
//! A child may end with exit 0 (it ran) or 1 (refused with a message); a signal (a GGML_ASSERT abort, a segfault, an
//! allocation past the address-space limit), a panic (exit 101), any other exit, a hang past the time limit or a peak
//! RSS over 2 GiB fails the test, which prints each failing mutant's seed and mutations and keeps its file (see
//! below to replay one). The runs are deterministic: mutant `i` of a suite has seed `base + i`.
//!
//! This is its own test binary without libtest's harness (`harness = false`): the parent stays single-threaded, as
//! `fork` needs, and runs two children at a time (one per core).
//!
//! Environment:
//! - `FERRITE_MUTANTS=N`: model mutants (default 10,000; the other suites scale with it);
//! - `FERRITE_MUTANTS_SEED=S`: the base seed (default fixed);
//! - `FERRITE_MUTANTS_REPLAY=SUITE:SEED`: run one mutant in a child and print what it did and how it ended;
//! - `FERRITE_MUTANTS_JOBS=J`: children at a time (default: the CPU count).
//!
//! Arguments (as libtest takes them): a filter selects the suites whose name contains it (`model`, `session`,
//! `quantize`, `imatrix`, `supervisor`); `--list` lists them.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use ferrite::chat::{ChatOptions, Message};
use ferrite::engine::{Engine, EngineOptions, Logits};
use ferrite::generate::{generate, GenerateOptions};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use ferrite::sampler::{Sampler, SamplerConfig};
use gguf::GgufFile;
use testkit::mutants::{
    self, mutate_bytes, spawn, stderr_tail, wait_any, Child, Choices, Described, FastWriter,
    Limits, Outcome, Parts, SplitMix,
};

const DEFAULT_MODEL_MUTANTS: u64 = 10_000;
const DEFAULT_SEED: u64 = 0x15_0005;

/// One suite: a name, how many mutants, and what a child runs for mutant `seed` (its exit code).
struct Suite<'a> {
    name: &'static str,
    count: u64,
    /// Runs mutant `seed` in the child, with `file` as its scratch file; returns the exit code.
    run: Box<dyn Fn(u64, &Path) -> i32 + 'a>,
    /// What mutant `seed` is, for the report (computed in the parent).
    describe: Box<dyn Fn(u64) -> String + 'a>,
    /// Writes mutant `seed` to `path` for a replay (when the suite's mutants are files).
    keep: Box<dyn Fn(u64, &Path) + 'a>,
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
                "{} {:#x}: {outcome}: {} => {}",
                suite.name,
                child.tag,
                (suite.describe)(child.tag),
                err.lines().last().unwrap_or("").trim()
            );
        }
        if outcome.is_failure() {
            let seed = child.tag;
            let stderr = stderr_tail(&dir.join(format!("{}-{slot}.stderr", suite.name)), 2000);
            let kept = keep_dir().map(|d| {
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
        skipped * 10 <= suite.count,
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

fn engine_options(seed: u64) -> EngineOptions {
    // Most mutants run as `complete` does (repacked weights, fused operators); some from the map, some unfused.
    EngineOptions {
        n_threads: 1,
        repack: seed % 4 != 0,
        fused_ops: seed % 8 != 1,
        ..Default::default()
    }
}

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

/// One token of `ferrite complete -p hi` on the opened engine: the prompt rendered with the model's template,
/// tokenized, processed, one token sampled and fed.
fn one_token(engine: &Engine, seed: u64) -> Result<()> {
    let tokenizer = engine.tokenizer()?;
    let text = engine
        .prompt_format()
        .render(&[Message::user("hi")], &ChatOptions::default(), true);
    let prompt = tokenizer.encode(&text, true);
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    if prompt.len() >= engine.n_ctx() {
        bail!("the prompt does not fit the context");
    }
    let mut session = engine.session()?;
    // Greedy, or `complete`'s default sampling (temperature 1, every token), which NaN logits reach differently.
    let mut sampler = Sampler::new(match seed % 2 {
        0 => SamplerConfig::greedy(),
        _ => SamplerConfig {
            seed,
            ..SamplerConfig::default()
        },
    });
    let opts = GenerateOptions {
        max_tokens: Some(1),
        interrupt: None,
    };
    generate(&mut session, &mut sampler, &prompt, &opts, |_| {
        ControlFlow::Continue(())
    })?;
    Ok(())
}

fn open_and_run(path: &Path, seed: u64) -> Result<()> {
    let engine = Engine::open(path, engine_options(seed))?;
    one_token(&engine, seed)
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
                session.feed(&[7], Logits::Last)?;
                Ok(())
            })())
        }),
        describe: Box::new(move |seed| mutant(seed).1),
        keep: Box::new(move |seed, path| {
            let _ = std::fs::write(path, mutant(seed).0);
        }),
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
    let suites = ["supervisor", "model", "session"];
    if args.iter().any(|a| a == "--list") {
        for s in suites {
            println!("{s}: test");
        }
        return;
    }
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
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
        let sessions;
        let s = match suite {
            "model" => model_suite(&parts, &fast, 1),
            "session" => {
                sessions = sessions_of();
                session_suite(&sessions, 1)
            }
            other => panic!("no suite {other}"),
        };
        let stderr = dir.path().join("replay.stderr");
        let file = dir.path().join("replay");
        let out = mutants::run_one(&limits, &stderr, || (s.run)(seed, &file)).unwrap();
        println!("{suite} {seed:#x}: {}", (s.describe)(seed));
        println!("{out}\n{}", stderr_tail(&stderr, 8000));
        std::process::exit(i32::from(out.is_failure()));
    }

    if args.iter().any(|a| a == "--profile") {
        profile(&parts, dir.path());
        return;
    }
    let mut failures = Vec::new();
    if selected("supervisor") {
        supervisor_check(dir.path());
    }
    if selected("model") {
        failures.extend(run_suite(
            &model_suite(&parts, &fast, n_model),
            base,
            dir.path(),
            &limits,
        ));
    }
    if selected("session") {
        let sessions = sessions_of();
        let s = session_suite(&sessions, (n_model / 10).max(1));
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
    std::process::exit(1);
}
