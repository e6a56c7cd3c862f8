//! The `-m MODEL` argument group every command that runs a model flattens in (threads, context, micro-batch,
//! memory flags, diagnostic switches), `open_engine` with the memory plan it prints at start-up, the plan and the
//! expert statistics as JSON, and the generated `-m demo` model in the user's cache folder.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result};
use clap::Args;
use ferrite::cache::CacheType;
use ferrite::engine::{
    DeviceMissing, Engine, EngineOptions, PagingOptions, PlacementOptions, SessionOptions,
};
use ferrite::experts::StatsSnapshot;
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use ferrite::plan::devices::{format_device_list, DeviceBudgetSource, DeviceId, ExpertHome};
use ferrite::plan::rules::{parse_override_tensor, placement_rules, TensorRule};
use ferrite::plan::{
    BudgetSource, DevicePlan, DeviceSelection, ExpertCacheArg, ExpertPlacement, GpuLayers,
    MemoryPlan, PlacementRequest, PlanReason,
};
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
    #[arg(
        short = 'm',
        long = "model",
        value_name = "MODEL",
        required_unless_present = "list_devices"
    )]
    pub model: Option<PathBuf>,
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
    /// How the context cache stores key rows: f16 (half the memory, llama.cpp's default), f32, q8_0 (about a
    /// quarter, as llama.cpp's `-ctk q8_0`) or q4_0 (about a seventh, as `-ctk q4_0`; less accurate).
    #[arg(long = "cache-type", visible_aliases = ["ctk", "cache-type-k"], value_name = "TYPE", default_value = "f16", value_parser = parse_cache_type)]
    pub cache_type: CacheType,
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// Not a flag: rows of logits the command keeps (`logits`' token count), for the memory plan.
    #[arg(skip)]
    pub output_rows: usize,
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
    /// kernels for (e.g. Q4_K; on Intel CPUs with AMX also Q8_0 and F16) in ggml's repacked layouts (llama.cpp's
    /// default), the other non-expert ones as they are in huge pages (faster prompts and decode, slower start).
    #[arg(long = "no-repack")]
    pub no_repack: bool,
    #[command(flatten)]
    pub devices: DeviceArgs,
}

/// Which devices hold which weights: llama.cpp's flags and syntax (DESIGN.md 1 "Memory and devices"; `-ngl`, `-ot`,
/// `-dev`, `-cmoe` and `-ncmoe` are accepted as llama.cpp spells them, see `super::llama_flags`).
#[derive(Args, Clone, Debug, Default)]
pub struct DeviceArgs {
    /// Print the devices ggml has, with their memory, and exit.
    #[arg(long = "list-devices")]
    pub list_devices: bool,
    /// Add the devices of these RPC servers (`ferrite rpc-server`, or llama.cpp's rpc-server), comma-separated
    /// HOST:PORT; they are named RPC0, RPC1, ... in this order and take part in the placement like GPUs. The
    /// protocol has no authentication: use it on trusted networks only.
    #[arg(long = "rpc", value_name = "HOST:PORT,...", value_delimiter = ',')]
    pub rpc: Vec<String>,
    /// Seconds an RPC server may take to answer before the run ends with an error (a stopped or hung server);
    /// 0: wait forever.
    #[arg(long = "rpc-timeout", value_name = "SECS", default_value_t = 300)]
    pub rpc_timeout: u64,
    /// Keep a cache of the CPU's routed experts in a device's memory: N experts, a SIZE (e.g. 12G), or auto (what
    /// the device has left after the placement). Selected experts found there are computed on the device, the
    /// others on the CPU; the experts used most are uploaded as the text goes [default: auto on a discrete GPU when
    /// some layer's routed experts are the CPU's (--cpu-moe, --n-cpu-moe), none on an RPC server's device or an
    /// integrated GPU; 0: none].
    #[arg(long = "gpu-experts", value_name = "N|SIZE|auto", value_parser = super::size_arg::parse_gpu_experts)]
    pub gpu_experts: Option<ferrite::experts::device::GpuExpertsArg>,
    /// Load ggml backend modules (libggml-cuda.so, libggml-vulkan.so, ... built with GGML_BACKEND_DL, e.g. by
    /// scripts/build-cuda.sh) from this folder; repeatable. The folder of the ferrite executable is always searched
    /// too, as llama.cpp does, and GGML_BACKEND_PATH may name one more module file.
    #[arg(long = "backend-dir", value_name = "DIR")]
    pub backend_dir: Vec<PathBuf>,
    /// Devices to offload to, comma-separated (CUDA0, Vulkan0,CPU, RPC0[HOST:PORT]), or none for the CPU only
    /// [default: every GPU and RPC device; --list-devices shows them].
    #[arg(long = "device", value_name = "LIST", value_parser = parse_device_list)]
    pub device: Option<DeviceSelection>,
    /// Layers on the devices: N (the last N, the output head counting as the last one, as in llama.cpp), all, or
    /// auto (the non-routed weights, cache and compute buffers first, then whole layers' routed experts while they
    /// fit the devices' free memory) [default: auto; written -ngl too].
    #[arg(long = "n-gpu-layers", visible_alias = "gpu-layers", value_name = "N|auto|all", value_parser = parse_gpu_layers)]
    pub n_gpu_layers: Option<GpuLayers>,
    /// Keep every layer's routed experts on the CPU (-ot's `\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU`).
    #[arg(long = "cpu-moe")]
    pub cpu_moe: bool,
    /// Keep the routed experts of the first N layers on the CPU.
    #[arg(long = "n-cpu-moe", value_name = "N")]
    pub n_cpu_moe: Option<u32>,
    /// Tensors whose name contains a match of REGEX go to the buffer type BUFFER (CPU, CUDA0, ...), e.g.
    /// `exps=CPU` or `blk\.(1[0-9])\.ffn_.*_exps=CUDA0`; comma-separated, repeatable, the first match wins;
    /// tried before --n-cpu-moe and --cpu-moe [written -ot too].
    #[arg(long = "override-tensor", value_name = "REGEX=BUFFER,...", value_parser = parse_override)]
    pub override_tensor: Vec<RuleList>,
    /// Memory budget of each offload device, in --device order: SIZE[,SIZE...] (24G, 15.5GiB) [default: what
    /// the device reports free, less 1 GiB].
    #[arg(long = "gpu-mem", value_name = "SIZE[,SIZE...]", value_parser = parse_gpu_mem)]
    pub gpu_mem: Option<SizeList>,
    /// Never upload CPU-resident weights to a device for a prompt's large products.
    #[arg(long = "no-op-offload")]
    pub no_op_offload: bool,
}

/// The rules of one `-ot` value.
#[derive(Clone, Debug)]
pub struct RuleList(pub Vec<TensorRule>);

/// `--gpu-mem 24G,8G`.
#[derive(Clone, Debug)]
pub struct SizeList(pub Vec<u64>);

impl DeviceArgs {
    /// Registers the devices of the backend modules and of the `--rpc` servers with ggml (before anything lists or
    /// plans devices).
    pub fn add_rpc_servers(&self) -> Result<()> {
        load_backend_modules(&self.backend_dir)?;
        for endpoint in &self.rpc {
            ferrite::ggml::rpc::add_server(endpoint.trim())?;
        }
        Ok(())
    }

    /// The placement the flags ask for.
    pub fn request(&self) -> PlacementRequest {
        let ot: Vec<TensorRule> = self
            .override_tensor
            .iter()
            .flat_map(|r| r.0.clone())
            .collect();
        PlacementRequest {
            devices: self.device.clone().unwrap_or_default(),
            gpu_layers: self.n_gpu_layers.unwrap_or_default(),
            rules: placement_rules(&ot, self.n_cpu_moe, self.cpu_moe),
            gpu_mem: self
                .gpu_mem
                .as_ref()
                .map(|g| g.0.clone())
                .unwrap_or_default(),
            op_offload: !self.no_op_offload,
        }
    }
}

/// The environment variable ggml reads for one more backend module file (llama.cpp's `ggml_backend_load_all`).
pub const BACKEND_PATH_VAR: &str = "GGML_BACKEND_PATH";

/// Loads ggml backend modules, once per process: those beside the executable (a module there that fails to load is
/// a warning), then every folder of `dirs` and the file `GGML_BACKEND_PATH` names (asked for explicitly: a failure
/// is an error, and so is a folder without any module). One line on stderr per module loaded.
pub fn load_backend_modules(dirs: &[PathBuf]) -> Result<()> {
    use ferrite::ggml::modules;
    static DONE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return Ok(());
    }
    let report = |b: &modules::LoadedBackend| {
        let names: Vec<String> = b.devices.iter().map(|d| d.name()).collect();
        eprintln!(
            "ferrite: loaded ggml backend {} from {} ({} device{}{}{})",
            b.name,
            b.path.display(),
            names.len(),
            if names.len() == 1 { "" } else { "s" },
            if names.is_empty() { "" } else { ": " },
            names.join(", ")
        );
    };
    if let Some(exe_dir) = modules::executable_dir() {
        // Beside the executable: only what is there; a broken module is worth a warning, not a refusal.
        if let Ok(found) = modules::load_dir(&exe_dir) {
            found.loaded.iter().for_each(report);
            for e in &found.failed {
                eprintln!("ferrite: warning: {e}");
            }
        }
    }
    for dir in dirs {
        let found = modules::load_dir(dir)?;
        if let Some(e) = found.failed.into_iter().next() {
            return Err(e.into());
        }
        for (file, why) in &found.skipped {
            eprintln!("ferrite: note: not loading {}: {why}", file.display());
        }
        if found.loaded.is_empty() && found.skipped.is_empty() {
            return Err(Hinted::new(
                format!(
                    "--backend-dir {}: no ggml backend module (libggml-NAME.so) in that folder",
                    dir.display()
                ),
                "build one with scripts/build-cuda.sh (it writes libggml-cuda.so and libggml-base.so.0 into one folder) and pass that folder",
            )
            .into());
        }
        found.loaded.iter().for_each(report);
    }
    if let Some(file) = std::env::var_os(BACKEND_PATH_VAR).filter(|v| !v.is_empty()) {
        let b = modules::load_file(Path::new(&file))
            .with_context(|| format!("{BACKEND_PATH_VAR} names a module that cannot be loaded"))?;
        report(&b);
    }
    *done = true;
    Ok(())
}

/// `--list-devices`: ggml's devices as llama.cpp lists them, on stdout.
pub fn list_devices(args: &DeviceArgs) -> Result<()> {
    use std::io::Write as _;
    args.add_rpc_servers()?;
    let mut out = std::io::stdout().lock();
    out.write_all(format_device_list(&ferrite::ggml::devices()).as_bytes())?;
    Ok(())
}

fn parse_device_list(s: &str) -> Result<DeviceSelection, String> {
    if s == "none" {
        return Ok(DeviceSelection::None);
    }
    let names: Vec<String> = s.split(',').map(str::to_string).collect();
    if names.iter().any(|n| n.is_empty()) {
        return Err(format!(
            "{s:?} has an empty device name; give names separated by ',' (e.g. CUDA0,CUDA1), or none"
        ));
    }
    Ok(DeviceSelection::Names(names))
}

fn parse_gpu_layers(s: &str) -> Result<GpuLayers, String> {
    match s {
        "auto" => Ok(GpuLayers::Auto),
        "all" => Ok(GpuLayers::All),
        n => n.parse().map(GpuLayers::Count).map_err(|_| {
            format!("{n:?} is not a layer count; use a number of layers, auto or all")
        }),
    }
}

fn parse_override(s: &str) -> Result<RuleList, String> {
    parse_override_tensor(s)
        .map(RuleList)
        .map_err(|e| e.to_string())
}

fn parse_gpu_mem(s: &str) -> Result<SizeList, String> {
    s.split(',')
        .map(parse_size)
        .collect::<Result<Vec<_>, _>>()
        .map(SizeList)
        .map_err(|e| format!("{e}; --gpu-mem takes a size per device, comma-separated (24G,8G)"))
}

pub fn parse_cache_type(s: &str) -> Result<CacheType, String> {
    CacheType::parse(s)
        .ok_or_else(|| format!("{s:?} is not a cache type; use f16, f32, q8_0 or q4_0"))
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
        self.model.as_ref().is_some_and(|m| m.as_os_str() == DEMO)
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
        let Some(path) = &self.model else {
            return Err(Hinted::new("no model given", "pass -m MODEL (or -m demo)").into());
        };
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
/// every micro-batch, `FERRITE_GROUPED_EXPERTS=0` multiplies a prompt's experts with `mul_mat_id`,
/// `FERRITE_CHOSEN_ROWS=0` makes decode at depth read every visible ratio-4 row under a mask (see
/// [`SessionOptions`]).
fn session_options_from_env() -> SessionOptions {
    let on = |var: &str| std::env::var(var).map_or(true, |v| v.trim() != "0");
    SessionOptions {
        graph_reuse: on("FERRITE_GRAPH_REUSE"),
        grouped_experts: on("FERRITE_GROUPED_EXPERTS"),
        chosen_rows: on("FERRITE_CHOSEN_ROWS"),
        ..SessionOptions::default()
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
    let memory = &args.memory;
    memory.devices.add_rpc_servers()?;
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
            output_rows: args.output_rows,
        },
        repack: !memory.no_repack,
        session: SessionOptions {
            log_schedule: report == PlanReport::Always,
            ..session_options_from_env()
        },
        placement: PlacementOptions {
            devices: ferrite::ggml::devices(),
            request: memory.devices.request(),
        },
        rpc_timeout: std::time::Duration::from_secs(memory.devices.rpc_timeout),
        gpu_experts: memory.devices.gpu_experts,
        ..EngineOptions::default()
    };
    let engine = match Engine::open(&path, opts) {
        Ok(engine) => engine,
        Err(e) => return Err(offload_refusal(e)),
    };
    for warning in &engine.device_plan().warnings {
        eprintln!("ferrite: warning: {warning}");
    }
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
    let devices = engine.device_plan();
    if !devices.is_cpu_only() && report != PlanReport::Never {
        // The device table ends with the CPU's memory plan.
        eprint!("ferrite: {devices}");
    } else if show_plan {
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

/// A placement on a device this build does not have: its table on stderr, then the refusal with a hint.
fn offload_refusal(e: anyhow::Error) -> anyhow::Error {
    match e.downcast_ref::<DeviceMissing>() {
        Some(refused) => {
            eprint!("ferrite: {}", refused.plan);
            Hinted::new(
                refused.to_string(),
                "pass --device none (or -ngl 0 without -ot rules naming a device) to compute on the CPU; RPC devices exist once their servers are added with --rpc HOST:PORT",
            )
            .into()
        }
        None => e,
    }
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
    if let Some(cache) = engine.device_experts() {
        eprintln!(
            "ferrite: offload: {} ({}): a cache of {} routed experts of the CPU's layers, {} (--gpu-experts{})",
            cache.device().name(),
            cache.device().description(),
            cache.n_slots(),
            ferrite::units::format_bytes(cache.bytes() as u64),
            match engine.options().gpu_experts {
                None => " auto, the default; --gpu-experts 0 turns it off",
                Some(_) => "",
            }
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
        BudgetSource::Physical => json!({ "kind": "physical" }),
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
        "context_bytes_per_token": i.context_per_token,
        "compute_bytes": i.compute_bytes,
        "total_bytes": plan.total_bytes(),
        "budget": {
            "bytes": budget.bytes, "limit": budget.limit, "margin": budget.margin, "source": source,
            "text": budget.to_string(),
        },
        "warnings": plan.warnings,
    })
}

/// The device placement as JSON: each device's bytes and budget, the head's and each layer's devices (the
/// experts' as a device name, `cpu_resident` or `cpu_paged`), the tensors rules moved, `-ngl`'s count.
pub fn device_plan_json(plan: &DevicePlan) -> Json {
    let name = |d: DeviceId| plan.device(d).name.clone();
    let devices: Vec<Json> = plan
        .devices
        .iter()
        .map(|d| {
            let budget = d.budget.map(|b| {
                let source = match b.source {
                    DeviceBudgetSource::Reported => "reported",
                    DeviceBudgetSource::Flag => "gpu_mem",
                };
                json!({ "bytes": b.bytes, "free": b.free, "total": b.total, "margin": b.margin, "source": source })
            });
            json!({
                "name": d.name, "backend": d.backend, "buffer_type": d.buffer_type,
                "weights_bytes": d.bytes.weights, "cache_bytes": d.bytes.cache, "compute_bytes": d.bytes.compute,
                "budget": budget,
            })
        })
        .collect();
    let layers: Vec<Json> = plan
        .layers
        .iter()
        .map(|l| {
            let experts = match l.experts.at {
                ExpertHome::Device(d) => name(d),
                ExpertHome::CpuResident => "cpu_resident".into(),
                ExpertHome::CpuPaged => "cpu_paged".into(),
            };
            json!({ "layer": l.layer, "main": name(l.main.at), "experts": experts })
        })
        .collect();
    let overrides: Vec<Json> = plan
        .overrides
        .iter()
        .map(|o| json!({ "tensor": o.name, "device": name(o.device), "bytes": o.bytes, "rule": o.rule }))
        .collect();
    json!({
        "devices": devices,
        "embedding": name(plan.embedding.at),
        "output": name(plan.output.at),
        "layers": layers,
        "overrides": overrides,
        "n_gpu_layers": plan.n_gpu_layers,
        "op_offload": plan.op_offload,
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
