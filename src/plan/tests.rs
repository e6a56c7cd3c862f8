use super::budget::*;
use super::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[test]
fn meminfo() {
    let s = "MemTotal:       32768000 kB\nMemFree:         1000 kB\nMemAvailable:   24025232 kB\nBuffers: 1 kB\n";
    assert_eq!(parse_mem_available(s), Some(24025232 * 1024));
    assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    assert_eq!(parse_mem_available("MemAvailable: lots kB\n"), None);
    assert_eq!(parse_mem_available("MemAvailable: 1 MB\n"), None);
    assert_eq!(
        parse_mem_available("MemAvailable: 18446744073709551615 kB\n"),
        None
    );
}

#[test]
fn cgroup_values() {
    assert_eq!(parse_cgroup_v2_max("max\n"), None);
    assert_eq!(parse_cgroup_v2_max("17179869184\n"), Some(16 << 30));
    assert_eq!(parse_cgroup_v2_max("garbage"), None);
    assert_eq!(parse_cgroup_v1_limit("9223372036854771712\n"), None);
    assert_eq!(parse_cgroup_v1_limit("4294967296\n"), Some(4 << 30));
    assert_eq!(parse_cgroup_v1_limit("-1"), None);
}

#[test]
fn proc_cgroup_and_mountinfo() {
    let cg = "9:name=systemd:/\n4:cpu,memory:/process_api/ad81\n1:cpu:/\n0::/user.slice/session-2.scope\n";
    assert_eq!(
        parse_proc_cgroup(cg),
        ProcCgroup {
            v2: Some("/user.slice/session-2.scope".into()),
            v1_memory: Some("/process_api/ad81".into()),
        }
    );
    assert_eq!(parse_proc_cgroup("garbage\n\n"), ProcCgroup::default());
    let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
              35 31 0:32 /docker/abc /sys/fs/cgroup/mem\\040ory rw,relatime - cgroup cgroup rw,memory\n\
              41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
    let m = parse_mountinfo(mi);
    assert_eq!(m.v2.point, Path::new("/sys/fs/cgroup/unified"));
    assert_eq!(
        (m.v1_memory.root.as_str(), m.v1_memory.point.as_path()),
        ("/docker/abc", Path::new("/sys/fs/cgroup/mem ory"))
    );
    let d = parse_mountinfo("");
    assert_eq!(d.v2.point, Path::new("/sys/fs/cgroup"));
    assert_eq!(d.v1_memory.point, Path::new("/sys/fs/cgroup/memory"));
}

fn fixture(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
    let map: HashMap<PathBuf, String> = files
        .iter()
        .map(|(p, s)| (PathBuf::from(p), s.to_string()))
        .collect();
    move |p: &Path| map.get(p).cloned()
}

#[test]
fn machine_budget_is_the_smaller_of_mem_available_and_the_cgroup_limits() {
    // cgroup v2: the leaf says max, its parent 8 GiB; 24 GiB available.
    let v2 = fixture(&[
        ("/proc/meminfo", "MemAvailable: 25165824 kB\n"),
        ("/proc/self/cgroup", "0::/a/b\n"),
        (
            "/proc/self/mountinfo",
            "1 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        ),
        ("/sys/fs/cgroup/a/b/memory.max", "max\n"),
        ("/sys/fs/cgroup/a/memory.max", "8589934592\n"),
    ]);
    let sys = SystemMemory::read_with(&v2);
    assert_eq!(sys.mem_available, Some(24 << 30));
    let cg = sys.cgroup.clone().unwrap();
    assert_eq!(
        (cg.bytes, cg.version, cg.file.as_path()),
        (8 << 30, 2, Path::new("/sys/fs/cgroup/a/memory.max"))
    );
    let b = Budget::from_system(&sys);
    assert_eq!(b.limit, Some(8 << 30));
    assert_eq!(b.margin, 512 << 20);
    assert_eq!(b.bytes, Some((8 << 30) - (512 << 20)));
    assert_eq!(
        b.to_string(),
        "7.50 GiB (cgroup v2 limit /sys/fs/cgroup/a/memory.max 8.00 GiB minus 512.00 MiB margin)"
    );

    // cgroup v1 without a limit (the huge value): MemAvailable decides.
    let v1 = fixture(&[
        ("/proc/meminfo", "MemAvailable: 4194304 kB\n"),
        ("/proc/self/cgroup", "4:memory:/process_api/x\n0::/\n"),
        (
            "/sys/fs/cgroup/memory/process_api/x/memory.limit_in_bytes",
            "9223372036854771712\n",
        ),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        ),
    ]);
    let sys = SystemMemory::read_with(&v1);
    assert_eq!(sys.cgroup, None);
    let b = Budget::from_system(&sys);
    assert_eq!(
        (b.limit, b.source.clone()),
        (Some(4 << 30), BudgetSource::MemAvailable)
    );
    assert_eq!(b.margin, (4u64 << 30) / 10);

    // cgroup v1 with a limit under MemAvailable, and a v2 limit too: the smallest wins.
    let both = fixture(&[
        ("/proc/meminfo", "MemAvailable: 4194304 kB\n"),
        ("/proc/self/cgroup", "4:memory:/job\n0::/\n"),
        (
            "/sys/fs/cgroup/memory/job/memory.limit_in_bytes",
            "2147483648\n",
        ),
        ("/sys/fs/cgroup/memory.max", "3221225472\n"),
    ]);
    let b = Budget::from_system(&SystemMemory::read_with(&both));
    assert_eq!(b.limit, Some(2 << 30));
    assert!(matches!(b.source, BudgetSource::Cgroup { version: 1, .. }));

    // Nothing readable: no limit.
    let none = SystemMemory::read_with(&fixture(&[]));
    assert_eq!(none, SystemMemory::default());
    let b = Budget::from_system(&none);
    assert_eq!((b.bytes, b.source.clone()), (None, BudgetSource::Unknown));
    // --mem is taken whole.
    let b = Budget::from_flag(24_000_000_000);
    assert_eq!((b.bytes, b.margin), (Some(24_000_000_000), 0));
    assert_eq!(b.to_string(), "22.35 GiB (--mem)");
}

/// Reads a machine's files from `tests/fixtures/cgroup/NAME`, a folder laid out as its root file system
/// (`proc/meminfo`, `proc/self/cgroup`, `proc/self/mountinfo`, the cgroup limit files under `sys/fs/cgroup`).
fn fixture_machine(name: &str) -> impl Fn(&Path) -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cgroup")
        .join(name);
    assert!(root.is_dir(), "missing fixture {}", root.display());
    move |p: &Path| std::fs::read_to_string(root.join(p.strip_prefix("/").ok()?)).ok()
}

#[test]
fn the_budget_is_the_cgroup_limit_of_fixture_files_minus_the_margin() {
    // cgroup v2 (a `systemd-run -p MemoryMax=8G` scope; its parent says max): 8 GiB, under 26.6 GiB available.
    let sys = SystemMemory::read_with(&fixture_machine("v2"));
    assert_eq!(sys.mem_available, Some(27_934_516 * 1024));
    let file = PathBuf::from("/sys/fs/cgroup/system.slice/ferrite-bench.scope/memory.max");
    let b = Budget::from_system(&sys);
    let limit = 8u64 << 30;
    assert_eq!(
        b.source,
        BudgetSource::Cgroup {
            version: 2,
            file: file.clone()
        }
    );
    assert_eq!((b.limit, b.margin), (Some(limit), safety_margin(limit)));
    assert_eq!(b.bytes, Some(limit - (512 << 20)));
    // The plan sizes the cache to it and its table says where the budget came from.
    let plan = plan_memory(&flash_like(), &b, &PlanRequest::default()).unwrap();
    assert_eq!(
        plan.slots(),
        Some(320),
        "7.5 GiB - 5 GiB fixed = 320 slots of 8 MiB"
    );
    let table = plan.to_string();
    assert!(
        table.lines().any(|l| l
            == "  budget                                7.50 GiB  (cgroup v2 limit \
                /sys/fs/cgroup/system.slice/ferrite-bench.scope/memory.max 8.00 GiB minus 512.00 MiB margin)"),
        "{table}"
    );

    // cgroup v1 as DESIGN.md 6 simulates a small machine (a hybrid host, the shell moved into
    // /sys/fs/cgroup/memory/ferrite-4g): 4 GiB under 22.9 GiB available; the root's "no limit" is skipped.
    let b = Budget::from_system(&SystemMemory::read_with(&fixture_machine("v1")));
    let limit = 4u64 << 30;
    assert_eq!(
        b.source,
        BudgetSource::Cgroup {
            version: 1,
            file: PathBuf::from("/sys/fs/cgroup/memory/ferrite-4g/memory.limit_in_bytes")
        }
    );
    assert_eq!((b.limit, b.margin), (Some(limit), limit / 10));
    assert_eq!(b.bytes, Some(limit - safety_margin(limit)));
    assert!(b.to_string().starts_with(
        "3.60 GiB (cgroup v1 limit /sys/fs/cgroup/memory/ferrite-4g/memory.limit_in_bytes 4.00 GiB minus"
    ), "{b}");

    // A Docker container on a v1 host (`docker run -m 2g`): the memory hierarchy's own folder is mounted at
    // /sys/fs/cgroup/memory, so the limit is that folder's.
    let b = Budget::from_system(&SystemMemory::read_with(&fixture_machine("v1-docker")));
    let limit = 2u64 << 30;
    assert_eq!(
        b.source,
        BudgetSource::Cgroup {
            version: 1,
            file: PathBuf::from("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        }
    );
    assert_eq!(b.bytes, Some(limit - safety_margin(limit)));
}

#[test]
fn the_real_machine_can_be_read() {
    // Whatever it says, reading it must not fail or panic.
    let b = Budget::from_machine();
    println!("machine budget: {b}");
    if let Some(bytes) = b.bytes {
        assert!(bytes <= b.limit.unwrap_or(u64::MAX));
    }
}

/// A Flash-like model: 4 GiB resident, 10 layers x 256 experts of 8 MiB (20 GiB routed), 6 used.
fn flash_like() -> PlanInputs {
    PlanInputs {
        resident_bytes: 4 << 30,
        experts: (0..10)
            .map(|layer| LayerExperts {
                layer,
                n_expert: 256,
                bytes_per_expert: 8 << 20,
            })
            .collect(),
        n_expert_used: 6,
        n_ctx: 4096,
        context_bytes: 512 << 20,
        context_per_token: 0.0,
        compute_bytes: 512 << 20,
        output_bytes: 0,
    }
}

#[test]
fn resident_when_everything_fits() {
    let i = flash_like();
    assert_eq!(i.routed_bytes(), 20 << 30);
    let p = plan_memory(&i, &Budget::from_flag(26 << 30), &PlanRequest::default()).unwrap();
    assert_eq!(
        (p.placement, p.reason),
        (ExpertPlacement::Resident, PlanReason::Fits)
    );
    assert_eq!(p.total_bytes(), 25 << 30);
    assert!(p.warnings.is_empty());
    let table = p.to_string();
    assert!(
        table.starts_with("memory plan: routed experts resident (they fit the budget)\n"),
        "{table}"
    );
    assert!(
        table.contains("routed experts (resident)") && table.contains("20.00 GiB"),
        "{table}"
    );
    let unknown = Budget::from_system(&SystemMemory::default());
    let p = plan_memory(&i, &unknown, &PlanRequest::default()).unwrap();
    assert_eq!(
        (p.placement, p.reason),
        (ExpertPlacement::Resident, PlanReason::NoBudget)
    );
}

#[test]
fn paged_fits_the_cache_to_what_is_left() {
    let i = flash_like();
    // 10 GiB - 5 GiB fixed = 5 GiB = 640 slots of 8 MiB.
    let p = plan_memory(&i, &Budget::from_flag(10 << 30), &PlanRequest::default()).unwrap();
    assert_eq!(
        p.placement,
        ExpertPlacement::Paged {
            slots: 640,
            slot_bytes: 8 << 20
        }
    );
    assert_eq!(p.reason, PlanReason::Fitted);
    assert_eq!(p.total_bytes(), 10 << 30);
    let table = p.to_string();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "memory plan: routed experts paged through 640 slots of 8.00 MiB (sized to the budget)"
    );
    assert_eq!(lines[1], "  non-routed weights (resident)         4.00 GiB");
    assert_eq!(lines[2], "  context (-c 4096)                   512.00 MiB");
    assert_eq!(
        lines[4],
        "  expert cache (640 x 8.00 MiB)         5.00 GiB  25.0 % of 20.00 GiB routed"
    );
    assert_eq!(lines[5], "  total                                10.00 GiB");
    assert_eq!(
        lines[6],
        "  budget                               10.00 GiB  (--mem)"
    );
    assert_eq!(lines.len(), 7);
    // Layers of different expert sizes: slots are sized for the largest.
    let mut mixed = i.clone();
    mixed.experts[3].bytes_per_expert = 10 << 20;
    assert_eq!(mixed.slot_bytes(), 10 << 20);
}

#[test]
fn a_budget_below_one_tokens_experts_is_refused_with_the_numbers() {
    let i = flash_like();
    // 5 GiB fixed + 6 x 8 MiB = 5.05 GiB needed.
    let err = plan_memory(
        &i,
        &Budget::from_flag((5 << 30) + (40 << 20)),
        &PlanRequest::default(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("the expert cache would hold 5 experts, fewer than the 6 one token uses per layer (slots of 8.00 MiB)"), "{msg}");
    for part in [
        "non-routed weights 4.00 GiB",
        "context 512.00 MiB (-c 4096)",
        "compute 512.00 MiB",
        "6 expert slots 48.00 MiB",
        "8.00 MiB more",
        "hint: raise --mem",
    ] {
        assert!(msg.contains(part), "{part:?} in {msg}");
    }
    // Even less than the fixed part.
    let err = plan_memory(&i, &Budget::from_flag(1 << 30), &PlanRequest::default()).unwrap_err();
    assert!(matches!(err, PlanError::TooSmall(r) if r.slots == 0));
    // Exactly enough works.
    let p = plan_memory(
        &i,
        &Budget::from_flag((5 << 30) + (48 << 20)),
        &PlanRequest::default(),
    )
    .unwrap();
    assert_eq!(p.slots(), Some(6));
}

#[test]
fn overrides() {
    let i = flash_like();
    let budget = Budget::from_flag(10 << 30);
    let req = |c| PlanRequest {
        expert_cache: Some(c),
        no_paging: false,
    };
    let p = plan_memory(&i, &budget, &req(ExpertCacheArg::Slots(64))).unwrap();
    assert_eq!(
        p.placement,
        ExpertPlacement::Paged {
            slots: 64,
            slot_bytes: 8 << 20
        }
    );
    assert!(p.to_string().contains("(--expert-cache 64)"));
    // A size is rounded down to whole slots.
    let p = plan_memory(&i, &budget, &req(ExpertCacheArg::Bytes(100 << 20))).unwrap();
    assert_eq!(p.slots(), Some(12));
    // Paged even where everything would fit.
    let p = plan_memory(
        &i,
        &Budget::from_flag(1 << 40),
        &req(ExpertCacheArg::Slots(100)),
    )
    .unwrap();
    assert_eq!(p.slots(), Some(100));
    // Over the budget: refused, with the numbers and the slots that would fit (10 GiB - 5 GiB fixed = 640).
    let err = plan_memory(&i, &budget, &req(ExpertCacheArg::Slots(1000))).unwrap_err();
    assert!(matches!(&err, PlanError::OverBudget(p) if p.0.slots() == Some(1000)));
    assert_eq!(
        err.to_string(),
        "the run needs 12.81 GiB = non-routed weights 4.00 GiB + context 512.00 MiB (-c 4096) + compute 512.00 MiB \
         + expert cache 7.81 GiB, but the budget is 10.00 GiB (--mem): 2.81 GiB more \
         (hint: give --expert-cache 640 or fewer slots, lower -c, raise --mem)"
    );
    assert_eq!(
        plan_memory(&i, &budget, &req(ExpertCacheArg::Slots(640)))
            .unwrap()
            .slots(),
        Some(640)
    );
    // More slots than experts: capped.
    let p = plan_memory(
        &i,
        &Budget::from_flag(1 << 40),
        &req(ExpertCacheArg::Slots(5000)),
    )
    .unwrap();
    assert_eq!(p.slots(), Some(2560));
    assert_eq!(p.warnings.len(), 1);
    // Fewer than one token's experts: refused, with a hint.
    let err = plan_memory(&i, &budget, &req(ExpertCacheArg::Slots(4)))
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with(
            "--expert-cache 4 (hint: give at least 6 slots, or a size of at least 48.00 MiB)"
        ),
        "{err}"
    );
    let err = plan_memory(&i, &budget, &req(ExpertCacheArg::Bytes(20 << 20)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("would hold 2 experts") && err.ends_with("(hint: give at least 48.00 MiB)"),
        "{err}"
    );
    // Auto is the planner's choice.
    assert_eq!(
        plan_memory(&i, &budget, &req(ExpertCacheArg::Auto))
            .unwrap()
            .slots(),
        Some(640)
    );
    // --no-paging keeps experts resident whatever the budget, and says it is over.
    let p = plan_memory(
        &i,
        &budget,
        &PlanRequest {
            expert_cache: None,
            no_paging: true,
        },
    )
    .unwrap();
    assert_eq!(
        (p.placement, p.reason),
        (ExpertPlacement::Resident, PlanReason::NoPaging)
    );
    assert_eq!(p.warnings.len(), 1);
    assert!(p.warnings[0].contains("by 15.00 GiB: the OS will page"));
    // ... but not what it must allocate: the weights, context and compute over the budget are refused.
    let big_context = PlanInputs {
        n_ctx: 1 << 20,
        context_bytes: 8 << 30,
        ..i.clone()
    };
    let no_paging = PlanRequest {
        expert_cache: None,
        no_paging: true,
    };
    let err = plan_memory(&big_context, &budget, &no_paging).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the run needs 12.50 GiB = non-routed weights 4.00 GiB + context 8.00 GiB (-c 1048576) + compute 512.00 MiB, \
         but the budget is 10.00 GiB (--mem): 2.50 GiB more (hint: lower -c, raise --mem, use a smaller quantization)"
    );
    // No routed experts: resident, the override ignored.
    let dense = PlanInputs {
        experts: Vec::new(),
        ..i
    };
    let p = plan_memory(&dense, &budget, &req(ExpertCacheArg::Slots(64))).unwrap();
    assert_eq!(
        (p.placement, p.reason),
        (ExpertPlacement::Resident, PlanReason::NoExperts)
    );
    assert_eq!(
        p.warnings,
        ["--expert-cache is ignored: the model has no routed experts"]
    );
    // Nothing to page: over the budget is refused.
    let err =
        plan_memory(&dense, &Budget::from_flag(4 << 30), &PlanRequest::default()).unwrap_err();
    assert!(
        err.to_string().starts_with("the run needs 5.00 GiB = ")
            && err.to_string().contains("1.00 GiB more"),
        "{err}"
    );
}

#[test]
fn the_logits_output_is_planned() {
    // 4 GiB + 512 MiB + 512 MiB + 1 GiB of logits: 6 GiB fixed.
    let i = PlanInputs {
        output_bytes: 1 << 30,
        ..flash_like()
    };
    assert_eq!(i.fixed_bytes(), 6 << 30);
    // The cache gets what the output leaves: 10 - 6 = 4 GiB = 512 slots.
    let p = plan_memory(&i, &Budget::from_flag(10 << 30), &PlanRequest::default()).unwrap();
    assert_eq!(p.slots(), Some(512));
    let table = p.to_string();
    assert!(
        table.contains("\n  logits output                         1.00 GiB\n"),
        "{table}"
    );
    // Without output, no such row.
    let p = plan_memory(
        &flash_like(),
        &Budget::from_flag(10 << 30),
        &PlanRequest::default(),
    )
    .unwrap();
    assert!(!p.to_string().contains("logits output"));
    // Too much output with --no-paging: refused, naming it.
    let no_paging = PlanRequest {
        expert_cache: None,
        no_paging: true,
    };
    let err = plan_memory(&i, &Budget::from_flag(5 << 30), &no_paging)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("+ logits output 1.00 GiB, but the budget is 5.00 GiB (--mem): 1.00 GiB more (hint: ask for the logits of fewer tokens per run,"),
        "{err}"
    );
    // Paged: the automatic refusal names it too.
    let err = plan_memory(&i, &Budget::from_flag(5 << 30), &PlanRequest::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("compute 512.00 MiB + logits output 1.00 GiB + 6 expert slots"),
        "{err}"
    );
}

#[test]
fn physical_memory_is_the_budget_when_nothing_else_is_readable() {
    let sys = SystemMemory {
        physical: Some(8 << 30),
        ..SystemMemory::default()
    };
    let b = Budget::from_system(&sys);
    assert_eq!(b.source, BudgetSource::Physical);
    assert_eq!(b.limit, Some(8 << 30));
    assert_eq!(b.bytes, Some((8 << 30) - safety_margin(8 << 30)));
    assert!(
        b.to_string().contains("(physical memory 8.00 GiB minus"),
        "{b}"
    );
    // MemAvailable, when there, wins.
    let sys = SystemMemory {
        mem_available: Some(4 << 30),
        physical: Some(8 << 30),
        ..SystemMemory::default()
    };
    assert_eq!(Budget::from_system(&sys).source, BudgetSource::MemAvailable);
    // A plan over physical memory is refused rather than left to the OOM killer.
    let i = PlanInputs {
        n_ctx: 1 << 20,
        context_bytes: 64 << 30,
        ..flash_like()
    };
    let no_paging = PlanRequest {
        expert_cache: None,
        no_paging: true,
    };
    let err = plan_memory(
        &i,
        &Budget::from_system(&SystemMemory {
            physical: Some(8 << 30),
            ..SystemMemory::default()
        }),
        &no_paging,
    )
    .unwrap_err();
    assert!(matches!(err, PlanError::OverBudget(_)), "{err}");
    // The machine's own reading has a physical size on every platform ferrite builds for.
    assert!(SystemMemory::read().physical.is_some_and(|b| b > 0));
}
