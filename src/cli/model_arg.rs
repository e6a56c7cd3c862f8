//! The `-m MODEL` argument group every command that runs a model flattens in (threads, context, micro-batch,
//! memory flags, diagnostic switches), `open_engine` with the memory plan it prints at start-up, the plan and the
//! expert statistics as JSON, and the generated `-m demo` model in the user's cache folder.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result};
use clap::Args;
use ferrite::cache::CacheType;
use ferrite::engine::{Engine, EngineOptions, PagingOptions, Placement, SessionOptions};
use ferrite::experts::StatsSnapshot;
use ferrite::ggml::Device;
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use ferrite::plan::{BudgetSource, ExpertCacheArg, ExpertPlacement, MemoryPlan, PlanReason};
use serde_json::{json, Value as Json};

use super::size_arg::{parse_expert_cache, parse_size};
use super::Hinted;

/// The word that selects the generated demo model instead of a file.
pub const DEMO: &str = "demo";
/// The demo model's file in the cache folder; bump the version when `TinyConfig::demo()` or the seed changes.
const DEMO_FILE: &str = "demo-v1.gguf";
const DEMO_SEED: u64 = 1;

/// Which model to run and how.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file (any shard of a split model), or `demo` for a tiny model ferrite generates (use ./demo for a file named demo).
    #[arg(short = 'm', long = "model", value_name = "MODEL")]
    pub model: PathBuf,
    /// CPU threads [default: all available cores].
    #[arg(short = 't', long = "threads", value_name = "N", value_parser = parse_positive)]
    pub threads: Option<usize>,
    /// Context size in tokens; 0 = the model's trained context [default: min(4096, the model's)].
    #[arg(short = 'c', long = "ctx-size", value_name = "N")]
    pub ctx_size: Option<usize>,
    /// Tokens per micro-batch (one graph computation) while processing a prompt.
    #[arg(long = "ubatch", visible_alias = "ubatch-size", value_name = "N", default_value_t = 512, value_parser = parse_positive)]
    pub ubatch: usize,
    /// Diagnostic: compute with primitive ggml operators instead of the DeepSeek V4 ones (same maths, slower).
    #[arg(long)]
    pub no_fused_ops: bool,
    /// How the context cache stores key rows: f16 (half the memory, llama.cpp's default) or f32.
    #[arg(long = "cache-type", visible_alias = "ctk", value_name = "TYPE", default_value = "f16", value_parser = parse_cache_type)]
    pub cache_type: CacheType,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub devices: DeviceArgs,
}

/// Which devices take part: other machines' through ggml's RPC backend, and where the model runs.
#[derive(Args, Clone, Debug, Default)]
pub struct DeviceArgs {
    /// Add the devices of these RPC servers (`ferrite rpc-server`, or llama.cpp's rpc-server), comma-separated
    /// HOST:PORT; they are named RPC0, RPC1, ... in this order. The protocol has no authentication: use it on
    /// trusted networks only.
    #[arg(long = "rpc", value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub rpc: Vec<String>,
    /// Run the whole model (weights, cache, computation) on this device (e.g. RPC0; CPU is the default). The
    /// placement planner's flags will place parts of it.
    #[arg(long = "device", value_name = "NAME")]
    pub device: Option<String>,
}

impl DeviceArgs {
    /// Registers the RPC servers' devices and resolves `--device` into a placement (the CPU's by default).
    pub fn placement(&self) -> Result<Placement> {
        for endpoint in &self.rpc {
            ferrite::ggml::rpc::add_server(endpoint.trim())?;
        }
        let Some(name) = &self.device else {
            return Ok(Placement::default());
        };
        match Device::by_name(name) {
            Some(d) if d.is_cpu() => Ok(Placement::default()),
            Some(d) => Ok(Placement::all_on(d)),
            None => {
                let names: Vec<String> = Device::all()
                    .iter()
                    .map(|d| format!("{} ({})", d.name(), d.description()))
                    .collect();
                Err(Hinted::new(
                    format!(
                        "there is no device named {name}; devices: {}",
                        names.join(", ")
                    ),
                    "RPC devices exist once their servers are added with --rpc HOST:PORT",
                )
                .into())
            }
        }
    }
}

/// Where the weights live and how much memory a run may take (DESIGN.md 1, "Memory and devices"); `bench`
/// flattens it in too.
#[derive(Args, Clone, Debug, Default)]
pub struct MemoryArgs {
    /// Memory budget for everything (resident weights, expert cache, context, compute): 512M, 24G, 1.5GiB
    /// [default: what the machine and its cgroup allow, less a margin].
    #[arg(long = "mem", value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<u64>,
    /// Expert cache: N slots (a plain number, at least the experts one token uses per layer) or SIZE bytes of slots
    /// (with a unit: 512M, 2GiB); pages the routed experts even when they would fit [default: sized to --mem].
    #[arg(long = "expert-cache", value_name = "N|SIZE", value_parser = parse_expert_cache, conflicts_with = "no_paging")]
    pub expert_cache: Option<ExpertCacheArg>,
    /// Lock the resident weights (the whole model when nothing is paged) in RAM.
    #[arg(long)]
    pub mlock: bool,
    /// Keep every routed expert in the memory-mapped file whatever the budget (the OS pages it in, slowly).
    #[arg(long = "no-paging")]
    pub no_paging: bool,
    /// Compute every weight from the mapped file instead of copying the matrices into RAM: those the CPU has faster
    /// kernels for (e.g. Q4_K) in ggml's repacked layout (llama.cpp's default), the other non-expert ones as they
    /// are in huge pages (faster prompts and decode, slower start).
    #[arg(long = "no-repack")]
    pub no_repack: bool,
}

fn parse_cache_type(s: &str) -> Result<CacheType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f16" => Ok(CacheType::F16),
        "f32" => Ok(CacheType::F32),
        other => Err(format!("{other:?} is not a cache type; use f16 or f32")),
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

impl ModelArgs {
    pub fn is_demo(&self) -> bool {
        self.model.as_os_str() == DEMO
    }

    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// The context size `engine` was planned for: `-c`, 0 meaning the model's trained context, by default at most
    /// 4096. Warns on stderr when it exceeds the trained context.
    pub fn n_ctx(&self, engine: &Engine) -> usize {
        let trained = engine.config().n_ctx_train;
        let n_ctx = engine.n_ctx();
        if trained > 0 && n_ctx > trained {
            eprintln!(
                "ferrite: warning: -c {n_ctx} is beyond the {trained} tokens the model was trained on; quality may suffer"
            );
        }
        n_ctx
    }

    /// The model file: the path given (checked to exist), or the demo model, generated on first use.
    pub fn resolve_path(&self) -> Result<PathBuf> {
        if self.is_demo() {
            return demo_model();
        }
        let path = &self.model;
        if !path.exists() {
            return Err(Hinted::new(
                format!("model file {} does not exist", path.display()),
                "check the path, or pass `-m demo` to run a tiny model ferrite generates itself",
            )
            .into());
        }
        if path.is_dir() {
            return Err(Hinted::new(
                format!("{} is a folder, not a GGUF model file", path.display()),
                "pass the .gguf file (for a split model, any of its shards); to convert a Hugging Face checkpoint use `ferrite quantize`",
            )
            .into());
        }
        Ok(path.clone())
    }
}

/// The diagnostic switches of new sessions from the environment: `FERRITE_GRAPH_REUSE=0` builds a fresh graph for
/// every micro-batch, `FERRITE_GROUPED_EXPERTS=0` multiplies a prompt's experts with `mul_mat_id` (see
/// [`SessionOptions`]).
fn session_options_from_env() -> SessionOptions {
    let on = |var: &str| std::env::var(var).map_or(true, |v| v.trim() != "0");
    SessionOptions {
        graph_reuse: on("FERRITE_GRAPH_REUSE"),
        grouped_experts: on("FERRITE_GROUPED_EXPERTS"),
        log_schedule: false,
    }
}

/// When `open_engine` prints the memory plan on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanReport {
    /// When the routed experts are paged or the plan has warnings (and the lock notes with `--mlock`).
    WhenNotable,
    /// Always (`complete --verbose`, interactive `chat`).
    Always,
    /// Never (`bench` reopening the same model with another thread count).
    Never,
}

/// Opens the model of `args` (generating the demo model if asked for), planned under the memory flags, and prints
/// the model's warnings and, as `report` says, the memory plan and what locking memory did on stderr. A plan that
/// cannot fit is an error with the numbers and a hint.
pub fn open_engine(args: &ModelArgs, report: PlanReport) -> Result<Engine> {
    let path = args.resolve_path()?;
    let placement = args.devices.placement()?;
    let memory = &args.memory;
    let opts = EngineOptions {
        n_threads: args.threads(),
        fused_ops: !args.no_fused_ops,
        cache_type: args.cache_type,
        paging: PagingOptions {
            mem: memory.mem,
            expert_cache: memory.expert_cache,
            mlock: memory.mlock,
            no_paging: memory.no_paging,
            ctx_size: args.ctx_size,
            n_ubatch: Some(args.ubatch),
        },
        repack: !memory.no_repack,
        session: SessionOptions {
            log_schedule: report == PlanReport::Always,
            ..session_options_from_env()
        },
        placement,
        ..EngineOptions::default()
    };
    let engine = Engine::open(&path, opts)?;
    for warning in &engine.config().warnings {
        eprintln!("ferrite: warning: {}: {warning}", path.display());
    }
    let plan = engine.memory_plan();
    let notable = engine.is_paged() || !plan.warnings.is_empty();
    let show_plan = match report {
        PlanReport::Always => true,
        PlanReport::WhenNotable => notable,
        PlanReport::Never => false,
    };
    if show_plan {
        eprint!("ferrite: {plan}");
    }
    if report != PlanReport::Never {
        offload_note(&engine);
    }
    if show_plan || (memory.mlock && report != PlanReport::Never) {
        for note in engine.notes() {
            eprintln!("ferrite: note: {note}");
        }
    }
    Ok(engine)
}

/// One line per device other than the CPU: which layers it runs, the weight bytes copied there, and whether its
/// layers use the fused DeepSeek V4 operators.
fn offload_note(engine: &Engine) {
    let n_layer = engine.config().n_layer;
    let p = engine.placement();
    for (device, bytes) in engine.device_weight_bytes() {
        let layers: Vec<usize> = (0..n_layer)
            .filter(|&il| p.layer(il).main == Some(device))
            .collect();
        let experts = (0..n_layer)
            .filter(|&il| p.layer(il).experts == Some(device))
            .count();
        let fused = layers.iter().all(|&il| engine.layer_fused()[il]);
        let span = match (layers.first(), layers.last()) {
            (Some(a), Some(b)) if b - a + 1 == layers.len() => format!("layers {a}-{b}"),
            (Some(_), Some(_)) => format!("layers {layers:?}"),
            _ => "no layer".to_string(),
        };
        eprintln!(
            "ferrite: offload: {} ({}): {span} ({} with their routed experts){}{}, {} of weights{}",
            device.name(),
            device.description(),
            experts,
            if p.input == Some(device) {
                ", the embedding"
            } else {
                ""
            },
            if p.output == Some(device) {
                ", the head"
            } else {
                ""
            },
            ferrite::units::format_bytes(bytes as u64),
            if layers.is_empty() || fused {
                ""
            } else {
                "; primitive ops (the device lacks the fused ones)"
            },
        );
    }
}

/// The memory plan as JSON: where the experts live, the slots, every part's bytes, the budget and its source.
pub fn plan_json(plan: &MemoryPlan) -> Json {
    let (placement, slots, slot_bytes) = match plan.placement {
        ExpertPlacement::Resident => ("resident", None, None),
        ExpertPlacement::Paged { slots, slot_bytes } => ("paged", Some(slots), Some(slot_bytes)),
    };
    let reason = match plan.reason {
        PlanReason::Fits => "fits",
        PlanReason::NoBudget => "no_budget",
        PlanReason::NoExperts => "no_experts",
        PlanReason::NoPaging => "no_paging",
        PlanReason::Fitted => "fitted",
        PlanReason::Override(_) => "expert_cache",
    };
    let budget = &plan.budget;
    let source = match &budget.source {
        BudgetSource::Flag => json!({ "kind": "mem" }),
        BudgetSource::MemAvailable => json!({ "kind": "mem_available" }),
        BudgetSource::Cgroup { version, file } => {
            json!({ "kind": "cgroup", "version": version, "file": file })
        }
        BudgetSource::Unknown => json!({ "kind": "unknown" }),
    };
    let i = &plan.inputs;
    json!({
        "placement": placement,
        "reason": reason,
        "slots": slots,
        "slot_bytes": slot_bytes,
        "expert_bytes": plan.expert_bytes(),
        "routed_bytes": i.routed_bytes(),
        "resident_bytes": i.resident_bytes,
        "n_ctx": i.n_ctx,
        "context_bytes": i.context_bytes,
        "compute_bytes": i.compute_bytes,
        "total_bytes": plan.total_bytes(),
        "budget": {
            "bytes": budget.bytes, "limit": budget.limit, "margin": budget.margin, "source": source,
            "text": budget.to_string(),
        },
        "warnings": plan.warnings,
    })
}

/// The expert store's counters as a JSON value (the object of [`StatsSnapshot::to_json`]).
pub fn stats_json(stats: &StatsSnapshot) -> Result<Json> {
    serde_json::from_str(&stats.to_json())
        .context("internal error: the expert statistics are not valid JSON")
}

/// ferrite's cache folder: $FERRITE_CACHE_DIR, else $XDG_CACHE_HOME/ferrite, else ~/.cache/ferrite.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("FERRITE_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // The XDG spec says to ignore relative paths.
    if let Some(xdg) = var("XDG_CACHE_HOME").map(PathBuf::from) {
        if xdg.is_absolute() {
            return Ok(xdg.join("ferrite"));
        }
    }
    match var("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("ferrite")),
        None => Err(Hinted::new(
            "cannot find a cache folder for the demo model: neither FERRITE_CACHE_DIR, XDG_CACHE_HOME nor HOME is set",
            "set FERRITE_CACHE_DIR to a writable folder",
        )
        .into()),
    }
}

/// The demo model's path, generating the file first if it is not there yet.
pub fn demo_model() -> Result<PathBuf> {
    let dir = cache_dir()?;
    let path = dir.join(DEMO_FILE);
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
    eprintln!(
        "ferrite: generating the demo model (once) into {}",
        path.display()
    );
    generate_demo(&path)?;
    Ok(path)
}

/// Writes the demo model under a name unique to this process and call, then renames it into place. Concurrent
/// first uses each write their own file and rename identical bytes over each other: readers only ever see a
/// complete file.
fn generate_demo(path: &Path) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{DEMO_FILE}.gen-{}-{n}", std::process::id()));
    let result = write_tiny_model(&tmp, &TinyConfig::demo(), DEMO_SEED)
        .map_err(anyhow::Error::from)
        .and_then(|_| fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write the demo model to {}", path.display()))
}
