//! `ferrite bench -m MODEL [-p 512] [-n 128] [-d 0[,N...]] [-r 5] [-t N[,N...]] [--vs-llama] [--json]`: prompt
//! processing and generation speed measured as llama.cpp's `llama-bench` measures them, optionally next to llama.cpp
//! itself.
//!
//! - `ppN`: one prompt of N seeded random tokens (BOS first when the vocabulary adds one), processed from an empty
//!   cache in micro-batches of `--ubatch`; tokens/s = N / time.
//! - `tgN`: N tokens fed one at a time from an empty cache (the first BOS or random, the rest random), each
//!   computing its logits as generation does; tokens/s = N / time.
//! - `-d D` (llama-bench's `--n-depth`): each test runs after D tokens already in the cache (`pp512 @ d4096`). The
//!   D seeded random tokens (BOS first) are processed untimed before the first run, the sequence's state is kept
//!   in memory, and every later run restores it instead of processing them again (llama-bench keeps llama.cpp's
//!   state the same way); a list runs every test at each depth.
//! - A warm-up run of each test comes first and is not counted (for `tg`, one token, as llama-bench does); then
//!   `-r` timed repetitions, reported as median ± sample standard deviation (min, max and every sample in --json).
//! - Peak resident memory of ferrite's runs from `/proc/self/status` (VmHWM; Linux only). Memory-mapped weight
//!   pages count once touched, so this includes the part of the model the runs read.
//! - Bytes of weights read per generated token (an estimate for decode, from the tensor table: every non-expert
//!   weight except the embedding table, one embedding row, `n_expert_used` experts in each layer, MTP block
//!   excluded) and the bandwidth that implies at the measured generation speed.
//!
//! - Memory read bandwidth measured with each thread count (a 512 MiB read before the model opens), and the share of
//!   it the implied generation bandwidth reaches.
//! - The expert store's numbers of each test's timed repetitions (hits, misses, bytes read, I/O wait): with paged
//!   experts (`--mem`, `--expert-cache`) a line under the table gives the hit rate, MB read and I/O wait per token.
//!
//! `--vs-llama` runs the same tests on the same random tokens through llama.cpp in-process (the benchmark reference
//! in `ferrite::reference::llama`), after ferrite's and with ferrite's engine closed, and adds a ratio column
//! (ferrite / llama.cpp). llama.cpp runs with ferrite's placement ([`llama_placement`]: the same devices, `-ngl`
//! and `-ot` rules for what ferrite keeps apart from its layer, e.g. `--cpu-moe`'s experts; `llama_placement` in
//! the JSON), through the same ggml registry, so on a GPU it uses the device ferrite uses (a loaded CUDA module
//! included); its op offload stays on, as llama.cpp's default. With `--interleave` both engines are loaded at once and their repetitions alternate
//! (ferrite, llama.cpp, ferrite, ...), so a machine whose speed drifts (shared hosts, thermal limits) slows both
//! alike; the ratio is then the median of each pair's ratio, and llama.cpp's peak memory is not measured apart. The
//! table goes to stdout (or, with `--json`, one JSON object, the memory plan and the expert statistics included);
//! everything else to stderr.

mod runs;
mod table;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;
use ferrite::cache::CacheType;
use ferrite::engine::Engine;
use ferrite::experts::StatsSnapshot;
use ferrite::membw::{read_bandwidth, DEFAULT_BYTES};
use ferrite::model::sizes::{block_of, expert_tensor_layer, weight_sizes};
use ferrite::plan::devices::{DeviceId, ExpertHome, CPU};
use ferrite::plan::DevicePlan;
use ferrite::reference::llama::{LlamaModel, LlamaPlacement};
use ferrite::units::{format_bytes, format_params};
use serde_json::{json, Value as Json};

use super::model_arg::{
    device_plan_json, open_engine, parse_cache_type, plan_json, stats_json, MemoryArgs, ModelArgs,
    PlanReport,
};
use super::Hinted;
use runs::{measure_ferrite, measure_interleaved, measure_llama, DepthStates, FerriteRuns, Tokens};
use table::{expert_line, table};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// GGUF model file (any shard of a split model), or `demo` for the tiny model ferrite generates.
    #[arg(
        short = 'm',
        long = "model",
        value_name = "MODEL",
        required_unless_present = "list_devices"
    )]
    pub model: Option<PathBuf>,
    /// Prompt tokens of the prompt-processing test; 0 = skip it.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_name = "N",
        default_value_t = 512
    )]
    pub n_prompt: usize,
    /// Tokens of the generation test; 0 = skip it.
    #[arg(short = 'n', long = "n-gen", value_name = "N", default_value_t = 128)]
    pub n_gen: usize,
    /// Tokens already in the cache when each test starts (llama-bench's depth); a comma-separated list runs every
    /// test at each.
    #[arg(short = 'd', long = "n-depth", value_name = "N[,N...]", default_value = "0", value_parser = parse_depths)]
    pub n_depth: DepthList,
    /// Timed repetitions of each test.
    #[arg(short = 'r', long = "repetitions", value_name = "N", default_value_t = 5, value_parser = parse_positive)]
    pub repetitions: usize,
    /// CPU threads; a comma-separated list runs every test with each [default: all available cores].
    #[arg(short = 't', long = "threads", value_name = "N[,N...]", value_parser = parse_threads)]
    pub threads: Option<ThreadList>,
    /// Tokens per micro-batch (one graph computation) while processing the prompt.
    #[arg(long = "ubatch", visible_alias = "ubatch-size", value_name = "N", default_value_t = 512, value_parser = parse_positive)]
    pub ubatch: usize,
    /// How the context cache stores key rows: f16 (llama.cpp's default), f32, q8_0 or q4_0; llama.cpp's K/V cache
    /// follows (with flash attention for q8_0 and q4_0, which llama.cpp requires).
    #[arg(long = "cache-type", visible_aliases = ["ctk", "cache-type-k"], value_name = "TYPE", default_value = "f16", value_parser = parse_cache_type)]
    pub cache_type: CacheType,
    /// Diagnostic: ferrite computes with primitive ggml operators instead of the DeepSeek V4 ones.
    #[arg(long)]
    pub no_fused_ops: bool,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Run the same tests through llama.cpp (in-process, the reference) and add a ratio column.
    #[arg(long)]
    pub vs_llama: bool,
    /// With --vs-llama: let llama.cpp repack weights for its interleaved CPU kernels (llama-bench's default; off so
    /// both engines run the same ggml kernels).
    #[arg(long, requires = "vs_llama")]
    pub llama_repack: bool,
    /// With --vs-llama: load both engines at once and alternate their repetitions, so both see the same machine
    /// (needs memory for both models; the ratio is the median of the pairs' ratios).
    #[arg(long, requires = "vs_llama")]
    pub interleave: bool,
    /// Skip the warm-up runs.
    #[arg(long)]
    pub no_warmup: bool,
    /// Seed of the random tokens.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object with every number on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `-t 1,2,4`
#[derive(Clone, Debug)]
pub struct ThreadList(pub Vec<usize>);

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// `-d 0,4096`
#[derive(Clone, Debug)]
pub struct DepthList(pub Vec<usize>);

fn parse_depths(s: &str) -> Result<DepthList, String> {
    let list = s
        .split(',')
        .map(|d| d.trim().parse::<usize>().map_err(|e| format!("{d:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DepthList(list))
}

fn parse_threads(s: &str) -> Result<ThreadList, String> {
    let list = s
        .split(',')
        .map(parse_positive)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ThreadList(list))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Prompt,
    Generation,
}

#[derive(Clone, Copy, Debug)]
struct Test {
    kind: Kind,
    n: usize,
    /// Tokens in the cache before the test's (`-d`).
    depth: usize,
    /// The context of the test's session: at a depth, the same for every test of that depth (the depth plus the
    /// longest test), so they share the state after the depth's tokens (see [`runs::DepthStates`]).
    ctx: usize,
}

impl Test {
    /// llama-bench's name: `pp512`, `tg128 @ d4096`.
    fn name(&self) -> String {
        let test = match self.kind {
            Kind::Prompt => format!("pp{}", self.n),
            Kind::Generation => format!("tg{}", self.n),
        };
        match self.depth {
            0 => test,
            d => format!("{test} @ d{d}"),
        }
    }

    /// The context the test's session needs.
    fn n_ctx(&self) -> usize {
        self.ctx
    }
}

/// Speeds of the timed repetitions.
#[derive(Clone, Debug)]
struct Stats {
    seconds: Vec<f64>,
    tps: Vec<f64>,
    median: f64,
    mean: f64,
    stddev: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn new(n_tokens: usize, seconds: Vec<f64>) -> Stats {
        let tps: Vec<f64> = seconds
            .iter()
            .map(|&s| n_tokens as f64 / s.max(1e-12))
            .collect();
        let mut sorted = tps.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = median_of_sorted(&sorted);
        let mean = tps.iter().sum::<f64>() / n as f64;
        // Sample standard deviation, as llama-bench reports; 0 for one repetition.
        let stddev = if n > 1 {
            (tps.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Stats {
            median,
            mean,
            stddev,
            min: sorted[0],
            max: sorted[n - 1],
            seconds,
            tps,
        }
    }

    fn cell(&self) -> String {
        format!("{:.2} ± {:.2}", self.median, self.stddev)
    }

    fn json(&self) -> Json {
        json!({
            "median": self.median, "mean": self.mean, "stddev": self.stddev, "min": self.min, "max": self.max,
            "samples": self.tps, "seconds": self.seconds,
        })
    }
}

/// The median of sorted values (at least one).
fn median_of_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One test at one thread count, for both engines.
struct Row {
    threads: usize,
    test: Test,
    ferrite: Stats,
    /// The expert store's counters over ferrite's timed repetitions.
    experts: StatsSnapshot,
    llama: Option<Stats>,
    /// The two engines' repetitions alternated (`--interleave`): the ratio pairs them.
    paired: bool,
}

impl Row {
    /// ferrite / llama.cpp: the median of the repetitions' ratios when they alternated (pairs), else the ratio of
    /// the medians.
    fn ratio(&self) -> Option<f64> {
        let l = self.llama.as_ref()?;
        if !self.paired {
            return Some(self.ferrite.median / l.median);
        }
        let mut r: Vec<f64> = self
            .ferrite
            .tps
            .iter()
            .zip(&l.tps)
            .map(|(a, b)| a / b)
            .collect();
        r.sort_by(f64::total_cmp);
        Some(median_of_sorted(&r))
    }
}

/// Prints a row's speed (the engine measured last: llama.cpp's once it has one, both when paired) to stderr.
fn report_row(row: &Row, paged: bool) {
    let (t, name) = (row.threads, row.test.name());
    if row.llama.is_none() || row.paired {
        eprintln!(
            "ferrite: {name} with {t} threads: {} t/s",
            row.ferrite.cell()
        );
        if paged {
            eprintln!("ferrite: {name} with {t} threads: {}", row.experts);
        }
    }
    if let Some(l) = &row.llama {
        eprintln!("llama.cpp: {name} with {t} threads: {} t/s", l.cell());
    }
}

/// ferrite's placement as llama.cpp's model parameters, so the reference runs where ferrite runs: the devices
/// ferrite offloads to, its `-ngl` count (the output head counting as one layer, as in llama.cpp), and `-ot` rules
/// for what ferrite placed apart from its layer: single tensors (`-ot` rules on them) and each layer's routed
/// experts (`--cpu-moe`, `--n-cpu-moe`, `-ot ...exps=...`). With no device: the CPU only, no op offload. How layers
/// are spread over several devices stays llama.cpp's own choice (its `--split-mode layer`).
pub fn llama_placement(plan: &DevicePlan) -> LlamaPlacement {
    if plan.is_cpu_only() {
        return LlamaPlacement::default();
    }
    let name = |d: DeviceId| plan.device(d).name.clone();
    let mut overrides: Vec<(String, String)> = plan
        .overrides
        .iter()
        .map(|o| (format!("^{}$", regex::escape(&o.name)), name(o.device)))
        .collect();
    for l in &plan.layers {
        let experts = format!(r"^blk\.{}\.ffn_(up|down|gate|gate_up)_(ch)?exps", l.layer);
        match l.experts.at {
            ExpertHome::Device(d) if d != l.main.at => overrides.push((experts, name(d))),
            ExpertHome::CpuResident | ExpertHome::CpuPaged if l.main.at != CPU => {
                overrides.push((experts, "CPU".into()))
            }
            _ => {}
        }
    }
    LlamaPlacement {
        devices: plan.offload_devices().map(|d| d.name.clone()).collect(),
        n_gpu_layers: plan.n_gpu_layers as i32,
        overrides,
    }
}

/// llama.cpp's model (the reference) on the same file, placed as ferrite's, checked to see the same vocabulary.
fn load_reference(
    args: &BenchArgs,
    model_args: &ModelArgs,
    facts: &ModelFacts,
    tokens: &Tokens,
    placement: &LlamaPlacement,
) -> Result<LlamaModel> {
    let path = model_args.resolve_path()?;
    ferrite::reference::llama::show_log(std::env::var("FERRITE_LLAMA_LOG").as_deref() == Ok("1"));
    if !placement.devices.is_empty() {
        eprintln!("ferrite: llama.cpp runs with ferrite's placement: {placement}");
    }
    let model = LlamaModel::load_placed(&path, args.llama_repack, placement)
        .context("--vs-llama: llama.cpp (the reference) cannot run this model")?;
    if model.keeps_output_a_plain() {
        eprintln!(
            "ferrite: note: llama.cpp keeps attn_output_a out of its AMX buffers, as ferrite does (where AMX takes \
             them, this llama.cpp aborts building its graph: AMX refuses that product's permuted input); other \
             weights are repacked as llama.cpp chooses"
        );
    }
    if model.n_vocab() != facts.n_vocab {
        anyhow::bail!(
            "--vs-llama: llama.cpp sees {} tokens in the vocabulary, ferrite {}",
            model.n_vocab(),
            facts.n_vocab
        );
    }
    if model.bos().map(|b| b as u32) != tokens.bos {
        eprintln!("ferrite: note: llama.cpp and ferrite disagree on adding BOS; both get ferrite's tokens");
    }
    Ok(model)
}

/// What the table and the JSON say about the model.
struct ModelFacts {
    path: PathBuf,
    name: String,
    bytes: u64,
    params: u64,
    n_vocab: usize,
    n_layer: usize,
    n_expert: usize,
    n_expert_used: usize,
    bytes_per_token: u64,
    /// The devices the run uses, as llama-bench's backend column: `CPU`, or e.g. `RPC0,CPU`.
    backend: String,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.n_prompt == 0 && args.n_gen == 0 {
        return Err(Hinted::new(
            "nothing to measure: -p 0 and -n 0 skip both tests",
            "give -p N for prompt processing and/or -n N for generation (llama-bench's defaults: -p 512 -n 128)",
        )
        .into());
    }
    let threads: Vec<usize> = match &args.threads {
        Some(list) => list.0.clone(),
        None => vec![std::thread::available_parallelism().map_or(1, |n| n.get())],
    };
    // Memory read bandwidth per thread count, measured before any model is open: generation is held against it.
    let membw: Vec<(usize, f64)> = match args.n_gen {
        0 => Vec::new(),
        _ => threads
            .iter()
            .map(|&t| (t, read_bandwidth(t, DEFAULT_BYTES, 3)))
            .collect(),
    };
    let membw_of = |t: usize| membw.iter().find(|m| m.0 == t).map(|m| m.1);
    let mut tests = Vec::new();
    for &depth in &args.n_depth.0 {
        let ctx = |n: usize| match depth {
            0 => n,
            d => d + args.n_prompt.max(args.n_gen),
        };
        if args.n_prompt > 0 {
            tests.push(Test {
                kind: Kind::Prompt,
                n: args.n_prompt,
                depth,
                ctx: ctx(args.n_prompt),
            });
        }
        if args.n_gen > 0 {
            tests.push(Test {
                kind: Kind::Generation,
                n: args.n_gen,
                depth,
                ctx: ctx(args.n_gen),
            });
        }
    }
    let longest = tests.iter().map(Test::n_ctx).max().unwrap_or(1);
    // The plan reserves a context as long as the longest test (each test's session holds just its tokens).
    let model_args = |t: usize| ModelArgs {
        model: args.model.clone(),
        threads: Some(t),
        ctx_size: Some(longest),
        ubatch: args.ubatch,
        no_fused_ops: args.no_fused_ops,
        cache_type: args.cache_type,
        memory: args.memory.clone(),
        output_rows: 0,
    };

    let mut engine = open_engine(&model_args(threads[0]), PlanReport::WhenNotable)?;
    let facts = model_facts(&engine);
    let plan = engine.memory_plan().clone();
    let device_plan = engine.device_plan().clone();
    let store = engine.is_paged();
    let device_cache = engine
        .device_experts()
        .map(|c| (c.n_slots(), c.bytes(), c.device().name()));
    let paged = store || device_cache.is_some();
    let cfg = engine.config();
    if cfg.n_ctx_train > 0 && longest > cfg.n_ctx_train {
        eprintln!(
            "ferrite: warning: {longest} tokens is beyond the {} the model was trained on (the speed is still measured)",
            cfg.n_ctx_train
        );
    }
    let tokens = Tokens::new(&engine, args);
    eprintln!(
        "ferrite: bench {} ({}, {} params): {}; threads {}; micro-batch {}; {} repetitions{}",
        facts.name,
        format_bytes(facts.bytes),
        format_params(facts.params),
        tests.iter().map(Test::name).collect::<Vec<_>>().join(", "),
        threads
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.ubatch,
        args.repetitions,
        if args.no_warmup {
            ", no warm-up"
        } else {
            " after a warm-up"
        }
    );

    let hwm_reset = reset_peak_rss();
    let mut rows = Vec::new();
    // The expert counters of every ferrite run, warm-ups included, over the engines of each thread count.
    let mut expert_totals = StatsSnapshot::default();
    let reference_placement = llama_placement(&device_plan);
    let load_llama = || {
        load_reference(
            args,
            &model_args(threads[0]),
            &facts,
            &tokens,
            &reference_placement,
        )
    };
    // With --interleave, ferrite's warm-ups come first, alone: its peak memory is read before llama.cpp loads.
    let mut interleaved = None;
    // Each depth's tokens are processed once per engine; later runs at that depth restore the state.
    let mut states = DepthStates::default();
    if args.interleave {
        if !args.no_warmup {
            for &test in &tests {
                let mut runs = FerriteRuns::new(&engine, test, &tokens, args, &states)?;
                runs.warm_up()?;
                runs.keep_state(&mut states);
            }
        }
        interleaved = Some((peak_rss(), load_llama()?));
    }
    for (i, &t) in threads.iter().enumerate() {
        if i > 0 && t != engine.options().n_threads {
            expert_totals = expert_totals.plus(&engine.expert_stats());
            drop(engine);
            engine = open_engine(&model_args(t), PlanReport::Never)?;
        }
        for &test in &tests {
            let (ours, theirs, experts) = match &interleaved {
                Some((_, model)) => {
                    let (ours, theirs, experts) =
                        measure_interleaved(&engine, model, test, &tokens, args, &mut states)?;
                    (ours, Some(theirs), experts)
                }
                None => {
                    let (ours, experts) =
                        measure_ferrite(&engine, test, &tokens, args, &mut states)?;
                    (ours, None, experts)
                }
            };
            let row = Row {
                threads: t,
                test,
                ferrite: Stats::new(test.n, ours),
                experts,
                llama: theirs.map(|s| Stats::new(test.n, s)),
                paired: interleaved.is_some(),
            };
            report_row(&row, paged);
            rows.push(row);
        }
    }
    expert_totals = expert_totals.plus(&engine.expert_stats());
    drop(engine);
    let (rss, llama_rss) = match interleaved {
        // llama.cpp's peak memory is not measured apart when both engines were loaded.
        Some((rss, _model)) => (rss, None),
        // Otherwise ferrite's peak memory is read before llama.cpp loads anything.
        None => {
            let rss = peak_rss();
            let mut llama_rss = None;
            if args.vs_llama {
                let llama_reset = reset_peak_rss();
                let model = load_llama()?;
                for row in &mut rows {
                    let seconds =
                        measure_llama(&model, row.threads, row.test, &tokens, args, &mut states)?;
                    row.llama = Some(Stats::new(row.test.n, seconds));
                    report_row(row, false);
                }
                drop(model);
                llama_rss = peak_rss().map(|b| (b, llama_reset && hwm_reset));
            }
            (rss, llama_rss)
        }
    };

    let bandwidth = |stats: &Stats| facts.bytes_per_token as f64 * stats.median;
    if args.json {
        let results = rows
            .iter()
            .map(|r| {
                let tg = r.test.kind == Kind::Generation;
                Ok(json!({
                    "threads": r.threads,
                    "test": r.test.name(),
                    "kind": if tg { "tg" } else { "pp" },
                    "n_tokens": r.test.n,
                    "n_depth": r.test.depth,
                    "ferrite": r.ferrite.json(),
                    "ferrite_expert_stats": stats_json(&r.experts)?,
                    "llama": r.llama.as_ref().map(Stats::json),
                    "ratio": r.ratio(),
                    "bandwidth_bytes_per_second": tg.then(|| json!({
                        "ferrite": bandwidth(&r.ferrite),
                        "llama": r.llama.as_ref().map(bandwidth),
                        "measured_memory": membw_of(r.threads),
                    })),
                }))
            })
            .collect::<Result<Vec<Json>>>()?;
        let report = json!({
            "model": {
                "path": facts.path, "name": facts.name, "size_bytes": facts.bytes, "params": facts.params,
                "n_vocab": facts.n_vocab, "n_layer": facts.n_layer, "n_expert": facts.n_expert,
                "n_expert_used": facts.n_expert_used,
            },
            "backend": facts.backend,
            "cpu_simd": ferrite::ggml::cpu_features().simd_name(),
            "n_prompt": args.n_prompt,
            "n_gen": args.n_gen,
            "n_depth": args.n_depth.0,
            "repetitions": args.repetitions,
            "warmup": !args.no_warmup,
            "n_ubatch": args.ubatch,
            "cache_type": args.cache_type.name(),
            "fused_ops": !args.no_fused_ops,
            "llama_repack": args.llama_repack,
            "interleaved": args.interleave,
            "seed": args.seed,
            "bytes_per_token": facts.bytes_per_token,
            "bytes_per_token_note": "estimate for decode: non-expert weights without the embedding table, one embedding row, n_expert_used experts per layer",
            "memory_plan": plan_json(&plan),
            "device_plan": device_plan_json(&device_plan),
            "llama_placement": args.vs_llama.then(|| reference_placement.to_string()),
            "expert_stats": stats_json(&expert_totals)?,
            "expert_stats_note": "ferrite's runs, warm-ups included; ferrite_expert_stats of a result: its timed repetitions",
            "rss_peak_bytes": rss,
            "llama_rss_peak_bytes": llama_rss.map(|(b, _)| b),
            "llama_rss_peak_is_process_wide": llama_rss.map(|(_, reset)| !reset),
            "results": results,
        });
        println!("{report}");
    } else {
        print!("{}", table(&facts, &rows, args.vs_llama));
        if let Some(slots) = plan.slots().filter(|_| store) {
            println!("{}", expert_line(slots, &rows));
        }
        if let Some(cache) = &device_cache {
            println!("{}", table::device_line(cache, &rows));
        }
    }

    match rss {
        Some(b) => eprintln!(
            "ferrite: peak RSS {} (VmHWM{}; touched pages of the memory-mapped weights count)",
            format_bytes(b),
            if hwm_reset {
                " of ferrite's runs"
            } else {
                ", whole process"
            }
        ),
        None => eprintln!("ferrite: peak RSS not available (needs Linux /proc)"),
    }
    if let Some((b, reset)) = llama_rss {
        eprintln!(
            "llama.cpp: peak RSS {} (VmHWM{})",
            format_bytes(b),
            if reset {
                " of llama.cpp's runs"
            } else {
                ", whole process"
            }
        );
    }
    eprintln!(
        "ferrite: weights read per generated token: {} (estimate for decode: non-expert weights, one embedding row, \
         {} of {} experts per layer)",
        format_bytes(facts.bytes_per_token),
        facts.n_expert_used,
        facts.n_expert
    );
    for r in rows.iter().filter(|r| r.test.kind == Kind::Generation) {
        let llama = r
            .llama
            .as_ref()
            .map(|l| format!(", llama.cpp {:.2} GB/s", bandwidth(l) / 1e9))
            .unwrap_or_default();
        let share = membw_of(r.threads)
            .map(|m| {
                format!(
                    " ({:.0} % of the {:.2} GB/s memory read bandwidth measured with {} threads)",
                    bandwidth(&r.ferrite) / m * 100.0,
                    m / 1e9,
                    r.threads
                )
            })
            .unwrap_or_default();
        eprintln!(
            "ferrite: implied weight bandwidth at {} with {} threads: {:.2} GB/s{share}{llama}",
            r.test.name(),
            r.threads,
            bandwidth(&r.ferrite) / 1e9
        );
    }
    Ok(())
}

fn model_facts(engine: &Engine) -> ModelFacts {
    let model = engine.model();
    let cfg = engine.config();
    let sizes = weight_sizes(model);
    let used = cfg.n_expert_used as u64;
    // active_bytes_per_token counts every layer; the MTP block (layer n_layer, when present) is not run in decode.
    let mut mtp = 0u64;
    for t in model.tensors() {
        let name = &t.info.name;
        let layer = block_of(name).map(|(l, _)| l);
        if layer.is_some_and(|l| l >= cfg.n_layer as u64) && expert_tensor_layer(name).is_none() {
            mtp += t.info.n_bytes;
        }
    }
    let mtp_experts: u64 = sizes
        .layers
        .iter()
        .filter(|l| l.layer as usize >= cfg.n_layer)
        .map(|l| used.min(l.n_expert) * l.bytes_per_expert)
        .sum();
    let bytes_per_token = sizes
        .active_bytes_per_token(used, cfg.n_vocab as u64)
        .saturating_sub(mtp + mtp_experts);
    let name = model
        .metadata()
        .str("general.name")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| {
            engine
                .path()
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        });
    ModelFacts {
        path: engine.path().to_path_buf(),
        name,
        bytes: sizes.bytes_total,
        params: sizes.params_total,
        n_vocab: cfg.n_vocab,
        n_layer: cfg.n_layer,
        n_expert: cfg.n_expert,
        n_expert_used: cfg.n_expert_used,
        bytes_per_token,
        backend: engine
            .devices()
            .iter()
            .map(|d| d.name())
            .chain(["CPU".to_string()])
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// llama-bench's markdown table, with llama.cpp's speed and the ratio when measured.
/// Resets the kernel's peak-RSS counter of this process (Linux 4.0+); false when it cannot.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// VmHWM of this process in bytes (Linux), `None` elsewhere.
pub(crate) fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
