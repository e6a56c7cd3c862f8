//! The memory flags end to end on `-m demo` (8 routed experts per layer, 2 used per token): `--expert-cache` pages
//! the experts without changing a single output byte (complete, logits, perplexity), prints the plan with its slots
//! on stderr and leaves stdout clean; a cache or a `--mem` budget too small for one token is refused with the
//! numbers (exit 1); bad or conflicting flags are clap errors (exit 2); `bench --json`, `perplexity --json`,
//! `chat`'s `/stats` and `complete --verbose` report the expert store's hits, misses and bytes read.

mod support;

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use support::cli::{ok, run as ferrite, text};

/// `TinyConfig::demo()`: experts one token uses per layer.
const N_EXPERT_USED: u64 = 2;

/// A cache of one slot more than a token needs: every layer evicts, so misses are certain.
fn small_cache() -> String {
    (N_EXPERT_USED + 1).to_string()
}

/// Asserts a failure with `code`, nothing on stdout and every needle on stderr; returns stderr.
fn fails(out: &Output, code: i32, needles: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in stderr: {err}");
    }
    err
}

/// `complete` greedy on one thread (every run here uses `-t 1`: on a loaded machine, threads of a ggml
/// computation that wait for one another can make a tiny model's run take seconds instead of a fraction of one).
fn complete(extra: &[&str], cache: &Path) -> Output {
    let mut args = vec![
        "complete",
        "-m",
        "demo",
        "-t",
        "1",
        "-p",
        "Hello there",
        "-n",
        "24",
        "--temp",
        "0",
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    ferrite(&args, cache, None)
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A count field of a JSON object, which must be there.
fn count(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {key:?} in {v}"))
}

#[test]
fn a_small_expert_cache_answers_exactly_as_resident_experts_and_prints_its_plan() {
    let dir = tempfile::tempdir().unwrap();
    let slots = small_cache();
    let (resident, resident_err) = ok(&complete(&[], dir.path()));
    assert!(!resident.is_empty());
    assert!(
        !resident_err.contains("memory plan"),
        "the plan of resident experts is printed only with --verbose: {resident_err}"
    );
    let (paged, err) = ok(&complete(&["--expert-cache", &slots], dir.path()));
    assert_eq!(paged, resident, "paging changed the answer; stderr: {err}");
    let head = format!("ferrite: memory plan: routed experts paged through {slots} slots of ");
    assert!(err.lines().any(|l| l.starts_with(&head)), "{err}");
    assert!(err.contains(&format!("expert cache ({slots} x ")), "{err}");
    assert!(err.contains("  budget "), "{err}");

    // --verbose: the plan even when resident, and the expert store's numbers after the answer.
    let (verbose, err) = ok(&complete(
        &["--verbose", "--expert-cache", &slots],
        dir.path(),
    ));
    assert_eq!(verbose, resident);
    let stats: Vec<&str> = err
        .lines()
        .filter(|l| {
            l.starts_with("ferrite: prompt experts: ")
                || l.starts_with("ferrite: generation experts: ")
        })
        .collect();
    assert_eq!(stats.len(), 2, "{err}");
    assert!(
        stats
            .iter()
            .all(|l| l.contains(" misses)") && l.contains("/token")),
        "{err}"
    );
    let (_, err) = ok(&complete(&["--verbose"], dir.path()));
    assert!(
        err.contains("ferrite: memory plan: routed experts resident"),
        "{err}"
    );
    assert!(
        err.contains("ferrite: generation experts: 100.0 % hits"),
        "{err}"
    );
    // --mlock says what it locked (or why it could not).
    let (_, err) = ok(&complete(&["--mlock"], dir.path()));
    assert!(
        err.contains("ferrite: note: ") && err.contains("lock"),
        "{err}"
    );
}

#[test]
fn plans_that_cannot_fit_are_refused_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    // Fewer slots than one token uses in a layer.
    let err = fails(
        &complete(&["--expert-cache", "1"], dir.path()),
        1,
        &[
            "ferrite: error: ",
            "would hold 1 experts, fewer than the 2 one token uses per layer",
            "--expert-cache 1",
            "hint",
            "at least 2 slots",
        ],
    );
    assert!(
        !err.contains("panicked") && !err.contains("Error {"),
        "{err}"
    );
    // A budget below the resident weights.
    let err = fails(
        &complete(&["--mem", "1M"], dir.path()),
        1,
        &[
            "ferrite: error: ",
            "budget is 976.56 KiB (--mem)",
            "needs at least",
            "hint",
            "raise --mem",
        ],
    );
    let errors = err.lines().filter(|l| l.starts_with("ferrite: error: "));
    assert_eq!(errors.count(), 1, "the error is printed once: {err}");
}

#[test]
fn bad_and_conflicting_memory_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    fails(
        &complete(&["--no-paging", "--expert-cache", "4"], dir.path()),
        2,
        &["--no-paging", "--expert-cache"],
    );
    fails(
        &complete(&["--mem", "12Q"], dir.path()),
        2,
        &["'--mem <SIZE>'", "12Q"],
    );
    fails(
        &complete(&["--expert-cache", "lots"], dir.path()),
        2,
        &["--expert-cache", "slot count"],
    );
    // Every command that runs the model takes the flags.
    for cmd in ["chat", "logits", "perplexity", "bench"] {
        fails(
            &ferrite(&[cmd, "-m", "demo", "--mem", "12Q"], dir.path(), None),
            2,
            &["--mem"],
        );
    }
    // --no-paging alone and --mem with room to spare keep the experts resident: the plan is not printed.
    let (_, err) = ok(&complete(&["--no-paging", "--mem", "24G"], dir.path()));
    assert!(!err.contains("memory plan"), "{err}");
}

#[test]
fn bench_json_has_the_plan_and_the_expert_stats() {
    let dir = tempfile::tempdir().unwrap();
    let slots = small_cache();
    let args = [
        "bench", "-m", "demo", "-p", "16", "-n", "8", "-r", "1", "-t", "1",
    ];
    let mut paged_args = args.to_vec();
    paged_args.extend(["--expert-cache", &slots, "--json"]);
    let (stdout, _) = ok(&ferrite(&paged_args, dir.path(), None));
    let report = json(&stdout);
    let plan = &report["memory_plan"];
    assert_eq!(plan["placement"], "paged", "{plan}");
    assert_eq!(plan["reason"], "expert_cache", "{plan}");
    assert_eq!(count(plan, "slots"), N_EXPERT_USED + 1);
    let slot_bytes = count(plan, "slot_bytes");
    assert_eq!(
        count(plan, "expert_bytes"),
        slot_bytes * (N_EXPERT_USED + 1)
    );
    assert!(count(plan, "total_bytes") > count(plan, "resident_bytes"));
    let total = &report["expert_stats"];
    assert!(count(total, "misses") > 0, "{total}");
    assert!(count(total, "bytes_read") >= count(total, "misses") * slot_bytes / 2);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        let stats = &r["ferrite_expert_stats"];
        assert!(count(stats, "misses") > 0, "{r}");
        assert_eq!(count(stats, "tokens"), count(r, "n_tokens"), "{r}");
        assert!(stats["per_token"]["bytes_read"].as_f64().unwrap() > 0.0);
    }

    // The table gets one expert-cache line under it when paged, none when resident.
    let mut table_args = args.to_vec();
    table_args.extend(["--expert-cache", &slots]);
    let (stdout, _) = ok(&ferrite(&table_args, dir.path(), None));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    let last = lines[4];
    assert!(
        last.starts_with(&format!("expert cache ({slots} slots): pp16 (1 threads) "))
            && last.contains("% hits")
            && last.contains("MB read/token")
            && last.contains("ms/token"),
        "{stdout}"
    );
    let mut resident_args = args.to_vec();
    resident_args.push("--json");
    let (stdout, _) = ok(&ferrite(&resident_args, dir.path(), None));
    let report = json(&stdout);
    assert_eq!(report["memory_plan"]["placement"], "resident");
    assert_eq!(count(&report["expert_stats"], "misses"), 0);
    assert!(count(&report["expert_stats"], "hits") > 0);
}

#[test]
fn logits_and_perplexity_are_unchanged_by_paging() {
    let dir = tempfile::tempdir().unwrap();
    let slots = small_cache();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (a, b) = (out("resident.npy"), out("paged.npy"));
    let tokens = "1,5,9,200,17,42,300,7,7,99,12,480";
    ok(&ferrite(
        &[
            "logits", "-m", "demo", "-t", "1", "--tokens", tokens, "-o", &a,
        ],
        dir.path(),
        None,
    ));
    let (_, err) = ok(&ferrite(
        &[
            "logits",
            "-m",
            "demo",
            "-t",
            "1",
            "--tokens",
            tokens,
            "-o",
            &b,
            "--expert-cache",
            &slots,
        ],
        dir.path(),
        None,
    ));
    assert!(err.contains("memory plan: routed experts paged"), "{err}");
    assert!(err.lines().any(|l| l.starts_with("experts: ")), "{err}");
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "{err}"
    );

    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog.",
    ];
    let text: Vec<&str> = (0..120)
        .map(|i| words[(i * 7 + i / 9) % words.len()])
        .collect();
    let file = out("text.txt");
    std::fs::write(&file, text.join(" ")).unwrap();
    let ppl = |extra: &[&str]| {
        let mut args = vec![
            "perplexity",
            "-m",
            "demo",
            "-t",
            "1",
            "-f",
            &file,
            "-c",
            "48",
            "--chunks",
            "2",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&ok(&ferrite(&args, dir.path(), None)).0)
    };
    let resident = ppl(&[]);
    let paged = ppl(&["--expert-cache", &slots]);
    assert_eq!(resident["ppl"], paged["ppl"]);
    assert_eq!(resident["memory_plan"]["placement"], "resident");
    assert_eq!(resident["memory_plan"]["n_ctx"], 48);
    assert_eq!(count(&resident["expert_stats"], "misses"), 0);
    assert_eq!(paged["memory_plan"]["placement"], "paged");
    assert!(count(&paged["expert_stats"], "misses") > 0, "{paged}");
}

#[test]
fn chat_stats_show_the_expert_cache() {
    let dir = tempfile::tempdir().unwrap();
    let slots = small_cache();
    let out = ferrite(
        &[
            "chat",
            "-m",
            "demo",
            "-t",
            "1",
            "-n",
            "6",
            "--temp",
            "0",
            "--expert-cache",
            &slots,
        ],
        dir.path(),
        Some(b"hello\n/stats\nand then?\n/stats\n"),
    );
    let (_, err) = ok(&out);
    // A piped chat prints the plan only when it is notable: paged here.
    assert!(
        err.contains(&format!("paged through {slots} slots")),
        "{err}"
    );
    assert!(
        err.contains(&format!("experts paged through {slots} slots")),
        "{err}"
    );
    let turn: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("last turn experts: "))
        .collect();
    let all: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("all turns experts: "))
        .collect();
    assert_eq!((turn.len(), all.len()), (2, 2), "{err}");
    let misses = |l: &str| -> u64 {
        let (_, rest) = l.split_once(" hits, ").unwrap();
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!(misses(turn[0]) > 0, "{err}");
    // The second /stats: the whole chat has more misses than its last turn alone.
    assert!(misses(all[1]) > misses(turn[1]), "{err}");
    assert_eq!(misses(all[1]), misses(turn[0]) + misses(turn[1]), "{err}");
}

/// The one line of stderr a refused run prints.
fn refusal(out: &Output) -> String {
    let err = fails(out, 1, &["ferrite: error: "]);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("ferrite: generating the demo model"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

#[test]
fn runs_whose_allocations_exceed_the_budget_are_refused_before_they_start() {
    let dir = tempfile::tempdir().unwrap();
    // --no-paging: the routed experts may stay in the map, but a context of 100000 tokens cannot.
    assert_eq!(
        refusal(&complete(
            &["--no-paging", "--mem", "20M", "-c", "100000"],
            dir.path()
        )),
        "ferrite: error: the run needs 249.07 MiB = non-routed weights 5.65 MiB + context 10.34 MiB (-c 100000) \
         + compute 233.07 MiB, but the budget is 19.07 MiB (--mem): 229.99 MiB more \
         (hint: lower -c, raise --mem, use a smaller quantization)"
    );
    // --expert-cache N over the budget.
    assert_eq!(
        refusal(&complete(
            &["--expert-cache", "6", "--mem", "20M", "-c", "1000"],
            dir.path()
        )),
        "ferrite: error: the run needs 48.55 MiB = non-routed weights 5.65 MiB + context 1.06 MiB (-c 1000) \
         + compute 40.71 MiB + expert cache 1.12 MiB, but the budget is 19.07 MiB (--mem): 29.47 MiB more \
         (hint: lower -c, raise --mem)"
    );
    // ... with a hint of the slots that fit when some do.
    let err = refusal(&complete(
        &[
            "--expert-cache",
            "8",
            "--mem",
            "13M",
            "-c",
            "64",
            "--ubatch",
            "64",
        ],
        dir.path(),
    ));
    assert!(err.contains("(hint: give --expert-cache"), "{err}");
    // The same sizes run when the budget holds them.
    ok(&complete(
        &["--expert-cache", "6", "--mem", "60M", "-c", "1000"],
        dir.path(),
    ));
    // The machine's own budget (no --mem): a context of 365 GiB (and the masks of a micro-batch over every row of
    // it) is refused with the numbers, not left to the OOM killer.
    for flags in [&["--no-paging"][..], &["--expert-cache", "4"]] {
        let mut args = flags.to_vec();
        args.extend(["-c", "4000000000"]);
        let err = refusal(&complete(&args, dir.path()));
        assert!(
            err.starts_with("ferrite: error: the run needs 2.67 TiB = non-routed weights 5.65 MiB + context 365.08 GiB (-c 4000000000) + compute 2.31 TiB")
                && err.contains("but the budget is ")
                && err.contains("more (hint: lower -c, raise --mem"),
            "{err}"
        );
    }
    // A context no machine holds: refused before any size is computed from it.
    assert_eq!(
        refusal(&complete(&["-c", "10000000000000"], dir.path())),
        "ferrite: error: -c 10000000000000 is more than ferrite supports (4294967295 tokens; the model was trained \
         on 4096) (hint: use -c 4096 or less)"
    );
}

#[test]
fn the_logits_output_is_in_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("l.npy");
    let logits = |n: usize, extra: &[&str]| {
        let tokens = vec!["5"; n].join(",");
        let mut args = vec![
            "logits",
            "-m",
            "demo",
            "-t",
            "1",
            "-c",
            "4000",
            "--tokens",
            &tokens,
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ferrite(&args, dir.path(), None)
    };
    // 3000 x 512 floats (5.86 MiB) do not fit beside the rest of the run.
    assert_eq!(
        refusal(&logits(3000, &["--no-paging", "--mem", "84M"])),
        "ferrite: error: the run needs 82.25 MiB = non-routed weights 5.65 MiB + context 1.34 MiB (-c 4000) \
         + compute 69.40 MiB + logits output 5.86 MiB, but the budget is 80.11 MiB (--mem): 2.14 MiB more \
         (hint: ask for the logits of fewer tokens per run, lower -c, raise --mem, use a smaller quantization)"
    );
    // Paged, the cache gets what the output leaves: none here.
    let err = refusal(&logits(3000, &["--mem", "84M"]));
    assert!(
        err.contains("+ logits output 5.86 MiB + 2 expert slots 384.00 KiB, 2.52 MiB more"),
        "{err}"
    );
    assert!(!out.exists());
    // Three tokens fit, and the plan shows the output's row.
    let (_, err) = ok(&logits(3, &["--mem", "84M"]));
    assert!(
        err.contains("\n  logits output                         6.00 KiB\n"),
        "{err}"
    );
    assert!(out.is_file());
}
