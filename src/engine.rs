//! `Engine` (an opened model: config, weights mapped into ggml, a backend) and `Session` (one sequence: tokens,
//! cache, logits, in `engine/session.rs`; how its micro-batches run is `crate::exec`'s). The only API the commands
//! use.

mod offload;
mod session;

pub use crate::exec::GraphStats;
pub use offload::{DeviceMissing, LayerPlacement, Placement};
pub use session::{Logits, Rewind, Session, SessionOptions, SessionState};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context as _, Result};
use gguf::{GgmlType, Model};

use crate::cache::{CacheSizes, CacheType};
use crate::chat::PromptFormat;
use crate::experts::device::{DeviceExperts, GpuExpertsArg};
use crate::experts::store::PagedExperts;
use crate::experts::{ExpertStats, StatsSnapshot};
use crate::ggml::{
    Context, CpuBackend, Device, DeviceBackend, DeviceInfo, GroupedKernel, RepackType,
    RepackedStats, Tensor,
};
use crate::model::config::{Config, LayerKind};
use crate::model::forward::{hadamard_matrix, indexer_rotation_size, Rotations};
use crate::model::names::key::CHAT_TEMPLATE;
use crate::model::sizes::TensorMeta;
use crate::model::weights::Weights;
use crate::placement::{experts_fit, lock_weights, place_weights, product_weights, repack_growth};
use crate::plan::{
    plan_devices, Budget, DevicePlan, ExpertCacheArg, ExpertPlacement, MemoryPlan, PlacementModel,
    PlacementRequest, PlanReason, PlanRequest,
};
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::units::format_bytes;

/// `-c` when not given, capped by the model's trained context.
pub const DEFAULT_CTX: usize = 4096;

/// `--ubatch` when not given.
pub const DEFAULT_UBATCH: usize = 512;

/// The context size a run uses: `-c` (`ctx_size`), 0 meaning the model's trained context; by default
/// [`DEFAULT_CTX`] or the trained context if smaller.
pub fn resolve_ctx(cfg: &Config, ctx_size: Option<usize>) -> usize {
    let trained = cfg.n_ctx_train;
    match ctx_size {
        None if trained > 0 => DEFAULT_CTX.min(trained),
        None => DEFAULT_CTX,
        Some(0) => trained.max(1),
        Some(n) => n,
    }
}

/// Where routed experts live and how much memory a run may take: the planner's inputs from the command line.
#[derive(Clone, Debug, Default)]
pub struct PagingOptions {
    /// `--mem SIZE`: the whole budget; `None`: what the machine has (MemAvailable and the cgroup limit).
    pub mem: Option<u64>,
    /// `--expert-cache N|SIZE`: the cache size instead of the planner's choice.
    pub expert_cache: Option<ExpertCacheArg>,
    /// `--mlock`: lock the resident weights (the whole model when resident) in RAM.
    pub mlock: bool,
    /// `--no-paging`: leave every expert in the map (the OS pages the file).
    pub no_paging: bool,
    /// `-c` as given and `--ubatch`, for the context and compute bytes the plan reserves.
    pub ctx_size: Option<usize>,
    pub n_ubatch: Option<usize>,
    /// Rows of logits (`n_vocab` floats each) the run keeps beyond the compute buffers: `ferrite logits`' token count.
    pub output_rows: usize,
}

/// How an engine runs.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub n_threads: usize,
    /// Use ggml's DeepSeek V4 operators where the backend has them (the release path); `false` computes the same
    /// maths with primitive operators (the path for backends without them, and a cross-check).
    pub fused_ops: bool,
    /// How sessions store key rows.
    pub cache_type: CacheType,
    /// The memory plan's inputs.
    pub paging: PagingOptions,
    /// Copy the matrices the CPU has faster kernels for into RAM in ggml's repacked layout (llama.cpp's CPU_REPACK
    /// buffers: e.g. Q4_K as Q4_K_8x8 on AVX2), and the other non-expert matrices as they are, in huge pages: the
    /// release path; `false` computes every weight from the map. Routed experts are repacked only when the plan
    /// keeps them all resident within the budget, and never copied otherwise.
    pub repack: bool,
    /// How new sessions run (diagnostic switches; the library reads no environment variables).
    pub session: SessionOptions,
    /// Where the weights go besides the CPU: the devices and what the user asked for (`--device`, `-ngl`, `-ot`,
    /// ...); the planner decides.
    pub placement: PlacementOptions,
    /// An explicit placement instead of the planner's (library users and tests); the memory plan then counts
    /// every weight as the CPU's.
    pub layout: Option<Placement>,
    /// Devices treated as lacking the fused DeepSeek V4 operators whatever they report: their layers get the
    /// primitive-op form (a diagnostic; the tests check the per-device choice with it).
    pub no_fused_on: Vec<Device>,
    /// How long a reply from an RPC server may take before the run ends with an error (`--rpc-timeout`; zero: no
    /// limit). See [`crate::ggml::rpc::limit_replies`].
    pub rpc_timeout: std::time::Duration,
    /// `--gpu-experts`: a cache of the CPU's routed experts in a device's memory (`None`: the default, `auto` on a
    /// local discrete GPU or accelerator when some layer's experts are the CPU's; no cache on an RPC server's device
    /// or an integrated GPU).
    pub gpu_experts: Option<GpuExpertsArg>,
    /// With the device expert cache and no paged store: micro-batches of at least this many tokens run as one graph
    /// instead of the stage chain, so that ggml's op offload computes the CPU's experts on the device as it does for
    /// llama.cpp's prompts (`None`: the smallest batch a device of the run asks to offload products of, none when
    /// op offload is off or no device asks). Tests set it to run that path over RPC, which never asks.
    pub one_graph_from: Option<usize>,
    /// Bytes of host memory the device expert cache's uploads go through (`None`: some experts' worth of the
    /// device's page-locked memory where it has a host buffer type, as CUDA and CANN do, else none; `Some(0)`: none;
    /// `Some(n)`: `n` bytes, of ordinary RAM on a device without one: tests run that path over RPC). See
    /// `experts::device`.
    pub upload_staging: Option<usize>,
}

/// The devices a run may use and how the user asked for them to be used (`--device`, `-ngl`, `-ot`, ...).
#[derive(Clone, Debug, Default)]
pub struct PlacementOptions {
    /// ggml's devices (`crate::ggml::devices()`; tests pass fixtures). Empty: the CPU only.
    pub devices: Vec<DeviceInfo>,
    pub request: PlacementRequest,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            n_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            fused_ops: true,
            cache_type: CacheType::default(),
            paging: PagingOptions::default(),
            repack: true,
            session: SessionOptions::default(),
            placement: PlacementOptions::default(),
            layout: None,
            no_fused_on: Vec::new(),
            rpc_timeout: crate::ggml::rpc::DEFAULT_REPLY_TIMEOUT,
            gpu_experts: None,
            one_graph_from: None,
            upload_staging: None,
        }
    }
}

/// An opened DeepSeek V4 model. Immutable once open; sessions borrow it.
///
/// Thread safety: `Engine` is `Send` (checked below at compile time): a server can open it on one thread and move
/// it to the thread that runs its sessions. Its parts are owned ggml objects that ggml lets any one thread use (the
/// weights' context and buffers, the CPU backend, the paged store's slots and I/O), the file map, and counters behind
/// a `Mutex`. It is not `Sync`: sessions compute through the engine's one CPU backend (a thread pool and its
/// work buffer, not reentrant), and the weights' ggml context keeps its buffers in `RefCell`s; so all the sessions of
/// an engine run on the thread that holds it, one computation at a time. Serving requests from several threads
/// means sending them to that thread (or opening one engine per thread).
pub struct Engine {
    path: PathBuf,
    pub(crate) model: Arc<Model>,
    pub(crate) cfg: Config,
    weights_ctx: Context<'static>,
    weights: Weights<usize>,
    /// Constant tensors the graphs read (the indexer's Hadamard matrix), in their own buffer.
    consts_ctx: Context<'static>,
    /// Which of `consts_ctx`'s tensors is which rotation.
    consts: ConstIndices,
    pub(crate) backend: CpuBackend,
    pub(crate) opts: EngineOptions,
    plan: MemoryPlan,
    /// The planner's placement (what goes where and why; with [`EngineOptions::layout`] it is the CPU-only plan).
    device_plan: DevicePlan,
    /// The expert cache, when the plan pages the routed experts.
    pub(crate) paged: Option<PagedExperts>,
    /// Per layer: whether its routed experts are all on the CPU (else on a device, computed there).
    pub(crate) cpu_expert_layers: Vec<bool>,
    /// The device expert cache (`--gpu-experts`) in front of the CPU's experts.
    pub(crate) device_experts: Option<DeviceExperts>,
    /// See [`EngineOptions::one_graph_from`]: the batch from which the stage chain gives way to one graph.
    one_graph_from: Option<usize>,
    pub(crate) stats: Mutex<ExpertStats>,
    /// What locking memory did (`--mlock`, and the paged store's resident weights).
    notes: Vec<String>,
    /// Bytes locked in RAM at open (see [`Engine::locked_bytes`]).
    locked: u64,
    /// See [`Engine::grouped_experts`].
    pub(crate) grouped: Option<RepackType>,
    /// The weights copied into RAM as they are (see [`crate::placement::place_weights`]).
    copied: RepackedStats,
    /// The context size and micro-batch the plan reserved room for: [`Engine::session`]'s.
    n_ctx: usize,
    n_ubatch: usize,
    /// The devices other than the CPU that take part (in the scheduler's priority order), a backend of each, and
    /// the weights copied into each one's buffer (one context per device, in the same order).
    pub(crate) devices: Vec<DeviceBackend>,
    device_weights: Vec<Context<'static>>,
    /// For each weight (by its index in `weights_ctx`): the device context and position of its copy, if on one.
    on_device: Vec<Option<(usize, usize)>>,
    /// Where each part lives (CPU devices written as `None`).
    pub(crate) placement: Placement,
    /// Per layer: whether it uses the fused DeepSeek V4 operators (on, and its device has them).
    pub(crate) layer_fused: Vec<bool>,
    /// The vocabulary, read on first use (commands that run from token ids never need it).
    tokenizer: OnceLock<Tokenizer>,
    /// How prompts are rendered (see [`PromptFormat`]).
    prompt_format: PromptFormat,
}

impl Engine {
    /// Opens `path` (any shard of a split model), checks it is DeepSeek V4 with every tensor in place, and maps
    /// the weights into ggml without copying them.
    pub fn open(path: &Path, opts: EngineOptions) -> Result<Engine> {
        let model = Arc::new(Model::open(path)?);
        // The weights are bound once, with the configuration: a ggml tensor for each weight the model uses;
        // `sources[i]` is the file's tensor of tensor `i`.
        let weights_ctx = Context::with_capacity(model.tensors().len() + 1, 0)?;
        let mut sources = Vec::new();
        let mut make_error = None;
        let (cfg, weights) = Config::bound(&model, |name| {
            let Some(t) = model.tensor(name) else {
                return usize::MAX;
            };
            let dims: Vec<i64> = t.info.dims.iter().map(|&d| d as i64).collect();
            let result = weights_ctx
                .new_tensor(t.info.ty, &dims)
                .and_then(|tensor| tensor.set_name(name));
            if let Err(e) = result {
                make_error.get_or_insert(e);
            }
            sources.push(t);
            sources.len() - 1
        })
        .with_context(|| format!("{} is not a usable DeepSeek V4 model", path.display()))?;
        // Planned first: whether the routed experts are repacked depends on where they live. The non-routed weights
        // kept in RAM are counted at the size of their repacked layouts.
        let (n_ctx, n_ubatch) = planned_sizes(&cfg, &opts.paging);
        let growth = match opts.repack {
            true => repack_growth(
                &weights_ctx,
                &sources,
                &product_weights(&weights, cfg.n_expert_used, false),
            )?,
            false => HashMap::new(),
        };
        let device_plan = device_plan(&model, &cfg, &opts, n_ctx, n_ubatch, &growth)?;
        let plan = device_plan.cpu.clone();
        let prompt_format = PromptFormat::new(model.metadata().str(CHAT_TEMPLATE).ok());
        let regions = (0..model.shards().len())
            .map(|s| weights_ctx.map_shared(model.clone(), move |m: &Model| m.shards()[s].bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(e) = make_error {
            return Err(e).context("cannot map the weights into ggml");
        }
        let placement = match &opts.layout {
            Some(layout) => layout.clone(),
            None => Placement::of_plan(&device_plan)?,
        };
        placement.check(cfg.n_layer)?;
        let placement = placement.normalized();
        let device_list = placement.devices(cfg.n_layer);
        // Where each weight goes: a device's buffer, or the CPU (map, repacked or copied into RAM as without devices).
        let dest: Vec<Option<Device>> = sources
            .iter()
            .map(|t| placement.tensor_device(&t.info.name))
            .collect();
        let products = match opts.repack {
            true => product_weights(&weights, cfg.n_expert_used, experts_fit(&plan))
                .into_iter()
                .filter(|&(i, _)| dest.get(i).is_some_and(|d| d.is_none()))
                .collect(),
            false => Vec::new(),
        };
        let placed = place_weights(&model, &weights_ctx, &regions, &sources, &products)?;
        let backend = CpuBackend::new(opts.n_threads.max(1))?;
        let (consts_ctx, consts) = constants(&cfg, opts.cache_type, &backend)
            .context("cannot allocate the model's constants")?;
        let (device_weights, on_device) = copy_to_devices(&model, &sources, &dest, &device_list)?;
        // The connections to RPC servers are open now (the weights went through them): limit how long a reply
        // may take, so a server that stops answering ends the run instead of hanging it.
        crate::ggml::rpc::limit_replies(opts.rpc_timeout);
        let devices = device_list
            .iter()
            .map(|d| d.backend())
            .collect::<Result<Vec<_>, _>>()?;
        let fused_on = |d: Option<Device>| match d {
            None => true,
            Some(d) => !opts.no_fused_on.contains(&d) && d.supports_dsv4_ops(),
        };
        let layer_fused = (0..cfg.n_layer)
            .map(|il| opts.fused_ops && fused_on(placement.layer(il).main))
            .collect();
        let mut engine = Engine {
            path: path.to_path_buf(),
            model,
            cfg,
            weights_ctx,
            weights,
            consts_ctx,
            consts,
            backend,
            opts,
            plan,
            device_plan,
            paged: None,
            cpu_expert_layers: Vec::new(),
            device_experts: None,
            one_graph_from: None,
            stats: Mutex::new(ExpertStats::new()),
            notes: Vec::new(),
            locked: 0,
            grouped: None,
            copied: RepackedStats::default(),
            n_ctx,
            n_ubatch,
            devices,
            device_weights,
            on_device,
            placement,
            layer_fused,
            tokenizer: OnceLock::new(),
            prompt_format,
        };
        engine.grouped = RepackType::cpu().filter(|rt| {
            let w = engine.weight_tensors();
            w.layers
                .iter()
                .any(|l| GroupedKernel::of(l.gate_exps, rt).is_some())
        });
        // Layers whose routed experts are all on the CPU: the expert store pages them (when the plan pages), the
        // device expert cache holds some of them; layers with experts on a device compute them there.
        let on_cpu = |i: usize| dest.get(i).is_some_and(|d| d.is_none());
        engine.cpu_expert_layers = engine
            .weights
            .layers
            .iter()
            .map(|l| {
                [l.gate_exps, l.up_exps, l.down_exps]
                    .into_iter()
                    .all(on_cpu)
            })
            .collect();
        let any_cpu = engine.cpu_expert_layers.iter().any(|&p| p);
        if let ExpertPlacement::Paged { slots, .. } = engine.plan.placement {
            // Routed experts all on devices: nothing to page.
            if any_cpu {
                let paged = PagedExperts::new(
                    &engine.model,
                    &engine.cfg,
                    &engine.weight_tensors(),
                    &engine.cpu_expert_layers,
                    slots as usize,
                    engine.plan.reason == PlanReason::Fitted,
                )
                .context("cannot set up the expert cache")?;
                engine.paged = Some(paged);
            }
        }
        // With resident CPU experts, prompts from this many tokens run as one graph (op offload).
        let one_graph_from = match engine.opts.one_graph_from {
            Some(n) => Some(n),
            None if engine.opts.placement.request.op_offload => engine
                .devices
                .iter()
                .filter_map(|d| d.device().smallest_offloaded_batch())
                .min(),
            None => None,
        }
        .filter(|_| engine.paged.is_none());
        if any_cpu && engine.opts.gpu_experts != Some(GpuExpertsArg::Slots(0)) {
            engine.device_experts =
                engine.device_expert_cache(engine.opts.gpu_experts, one_graph_from.is_some())?;
        }
        if engine.device_experts.is_some() {
            engine.one_graph_from = one_graph_from;
        }
        let (repacked, copied) = (placed.repacked, placed.copied);
        if repacked.tensors > 0 {
            engine.notes.push(format!(
                "repacked {} weights ({}) into RAM for the CPU's matrix kernels ({})",
                repacked.tensors,
                format_bytes(repacked.bytes),
                placed.repack_types.join(", ")
            ));
        }
        if copied.tensors > 0 {
            engine.notes.push(format!(
                "copied {} weights ({}) into RAM in huge pages",
                copied.tensors,
                format_bytes(copied.bytes)
            ));
        }
        engine.copied = copied;
        engine.lock_memory();
        Ok(engine)
    }

    /// Sets up the device expert cache `--gpu-experts` asks for, on the device of the first layer whose experts the
    /// CPU holds (else the first device): `None` when `auto` finds no room.
    ///
    /// `offloads`: prompts run as one graph whose products of the CPU's experts the device computes, the weights of
    /// a layer's experts copied into its compute buffer for them; `auto` leaves room for the largest such layer.
    fn device_expert_cache(
        &mut self,
        arg: Option<GpuExpertsArg>,
        offloads: bool,
    ) -> Result<Option<DeviceExperts>> {
        let cpu_layers = &self.cpu_expert_layers;
        let first = cpu_layers.iter().position(|&c| c).unwrap_or(0);
        let device = self
            .placement
            .layer(first)
            .main
            .or_else(|| self.devices.first().map(|d| d.device()));
        let (device, arg, default) = match (device, arg) {
            (Some(device), Some(arg)) => (device, arg, false),
            // The default: a local GPU's spare memory caches experts. Not an RPC server's (behind the network, where
            // an upload costs more than the CPU computing the expert), nor an integrated GPU's (the host's RAM).
            (Some(device), None) if !device.is_rpc() && device.has_own_memory() => {
                (device, GpuExpertsArg::Auto, true)
            }
            (_, None) => return Ok(None),
            (None, Some(_)) => bail!("--gpu-experts needs a device to cache experts on, and none takes part (hint: --list-devices shows them; --device, -ngl and --rpc choose them)"),
        };
        let weights = self.weight_tensors();
        let stride = DeviceExperts::slot_bytes(&self.model, &weights, cpu_layers)? as u64;
        let n_cpu = cpu_layers.iter().filter(|&&c| c).count() as u64 * self.cfg.n_expert as u64;
        // What the placement left on the device (`None`: a device the plan does not know, e.g. an explicit layout).
        let planned = self
            .device_plan
            .devices
            .iter()
            .find(|d| d.name == device.name());
        let room = planned.map(|d| {
            d.budget
                .as_ref()
                .map_or(0, |b| b.bytes.saturating_sub(d.bytes.total()))
        });
        let offload_room = match offloads {
            false => 0,
            true => weights
                .layers
                .iter()
                .zip(cpu_layers)
                .filter(|(_, &cpu)| cpu)
                .map(|(l, _)| [l.gate_exps, l.up_exps, l.down_exps].map(|t| t.n_bytes() as u64))
                .map(|parts| parts.iter().sum::<u64>())
                .max()
                .unwrap_or(0),
        };
        let wanted = match arg {
            GpuExpertsArg::Slots(n) => n,
            GpuExpertsArg::Bytes(b) => b / stride.max(1),
            GpuExpertsArg::Auto => room.unwrap_or(0).saturating_sub(offload_room) / stride.max(1),
        };
        let n_slots = wanted.min(n_cpu);
        if let Some(room) = room.filter(|&room| n_slots * stride > room) {
            bail!(
                "--gpu-experts: {n_slots} experts take {} on {}, which has {} left after the placement (hint: --gpu-experts {} or auto, or fewer layers on it with -ngl)",
                format_bytes(n_slots * stride),
                device.name(),
                format_bytes(room),
                room / stride.max(1)
            );
        }
        if n_slots == 0 {
            if arg == GpuExpertsArg::Auto {
                self.notes.push(format!(
                    "device expert cache: no room left on {} for an expert ({})",
                    device.name(),
                    format_bytes(stride)
                ));
                return Ok(None);
            }
            bail!(
                "--gpu-experts holds no expert: one takes {} on {} (hint: give a count, a larger size, or auto)",
                format_bytes(stride),
                device.name()
            );
        }
        let cache = DeviceExperts::new(
            &self.model,
            &self.cfg,
            &weights,
            cpu_layers,
            device,
            n_slots as usize,
            self.opts.upload_staging,
        )?;
        self.notes.push(format!(
            "device expert cache: {n_slots} of the CPU's {n_cpu} routed experts ({}) on {}{}",
            format_bytes(cache.bytes() as u64),
            device.name(),
            match default {
                true => " (the default, auto; --gpu-experts 0 turns it off)",
                false => "",
            }
        ));
        if arg == GpuExpertsArg::Auto && offload_room > 0 {
            self.notes.push(format!(
                "device expert cache: auto left {} on {} for a prompt's expert products (op offload copies a layer's experts there)",
                format_bytes(offload_room),
                device.name()
            ));
        }
        Ok(Some(cache))
    }

    /// Whether a micro-batch of `n_tokens` runs as one graph although the engine runs stage chains (see
    /// [`EngineOptions::one_graph_from`]).
    pub(crate) fn one_graph_for(&self, n_tokens: usize) -> bool {
        self.one_graph_from.is_some_and(|n| n_tokens >= n)
    }

    /// Whether micro-batches run as the chain of stage graphs (the paged store or the device expert cache takes
    /// part) rather than one graph.
    pub(crate) fn staged(&self) -> bool {
        self.paged.is_some() || self.device_experts.is_some()
    }

    /// The device expert cache, when `--gpu-experts` set one up.
    pub fn device_experts(&self) -> Option<&DeviceExperts> {
        self.device_experts.as_ref()
    }

    /// Weights held repacked in RAM for the CPU's matrix kernels, in any of ggml's extra buffer types (0 with
    /// `repack` off or no such kernels).
    pub fn repacked_tensors(&self) -> usize {
        self.weights_ctx.repacked_all().tensors
    }

    /// The buffer type of the repacked weights when routed experts are among them in a layout the grouped products
    /// take: a prompt's expert products then use ggml's GEMM kernels (see [`crate::ggml::GroupedKernel`]).
    pub fn grouped_experts(&self) -> Option<RepackType> {
        self.grouped
    }

    /// Puts the compute threads to sleep until the next computation, so they take no CPU meanwhile (see
    /// [`CpuBackend::pause_threads`]).
    pub fn pause_threads(&self) {
        self.backend.pause_threads();
    }

    /// Weights copied into RAM as they are (products without a repacked layout, with `repack` on).
    pub fn copied_tensors(&self) -> usize {
        self.copied.tensors
    }

    /// Bytes of the weights held repacked in RAM.
    pub fn repacked_bytes(&self) -> u64 {
        self.weights_ctx.repacked_all().bytes
    }

    /// The bytes the repacked weights take in their buffers: more than [`Engine::repacked_bytes`] where a layout is
    /// larger than the file's (AMX's); the memory plan counts them so.
    pub fn repacked_ram_bytes(&self) -> u64 {
        self.weights_ctx.repacked_all().ram_bytes
    }

    /// Locks what must stay in RAM: with `--mlock` the whole model (resident) or the non-routed weights and the
    /// cache (paged); the paged store always tries the latter. Failures are notes, not errors (as in llama.cpp).
    fn lock_memory(&mut self) {
        let mlock = self.opts.paging.mlock;
        let Some((locked, failed)) =
            lock_weights(&self.model, &self.weights_ctx, self.paged.as_ref(), mlock)
        else {
            return;
        };
        self.locked = locked;
        match failed {
            None => self.notes.push(format!("locked {} in RAM", format_bytes(locked))),
            Some(e) => self.notes.push(format!(
                "could not lock memory in RAM ({e}; {} locked): the OS may page weights out under pressure (hint: raise `ulimit -l`)",
                format_bytes(locked)
            )),
        }
    }

    /// The memory plan: budget, what each part takes, where the routed experts live.
    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// The device placement: which device holds each part of the model, and why.
    pub fn device_plan(&self) -> &DevicePlan {
        &self.device_plan
    }

    /// True when routed experts go through the expert cache.
    pub fn is_paged(&self) -> bool {
        self.paged.is_some()
    }

    /// Notes about locked memory, for `--verbose` and the start-up table.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Bytes locked in RAM at open: with `--mlock`, the model (weights repacked into RAM there instead of their
    /// pages in the map); when paged, the non-routed weights and the expert cache. 0 when nothing was locked.
    pub fn locked_bytes(&self) -> u64 {
        self.locked
    }

    /// The expert store's counters since the engine opened (or the last reset).
    pub fn expert_stats(&self) -> StatsSnapshot {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot()
    }

    pub fn reset_expert_stats(&self) {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).reset();
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    pub fn n_vocab(&self) -> usize {
        self.cfg.n_vocab
    }

    /// The weights' tensors: each weight's copy on its device, else the CPU's.
    pub(crate) fn weight_tensors(&self) -> Weights<Tensor<'_>> {
        let all = self.weights_ctx.tensors();
        if self.device_weights.is_empty() {
            return self.weights.map(|i| all[i]);
        }
        let dev: Vec<Vec<Tensor<'_>>> = self.device_weights.iter().map(|c| c.tensors()).collect();
        self.weights
            .map(|i| match self.on_device.get(i).copied().flatten() {
                Some((k, j)) => dev[k][j],
                None => all[i],
            })
    }

    /// A scheduler over the engine's devices and its CPU backend for graphs of up to `graph_size` nodes.
    pub(crate) fn scheduler(&self, graph_size: usize) -> Result<crate::ggml::Scheduler<'_>> {
        let devices: Vec<&DeviceBackend> = self.devices.iter().collect();
        Ok(crate::ggml::Scheduler::new(
            &devices,
            &self.backend,
            graph_size,
            self.opts.placement.request.op_offload,
        )?)
    }

    /// Where each part lives (CPU devices written as `None`).
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The devices other than the CPU that take part, in the scheduler's order (empty: the CPU-only path).
    pub fn devices(&self) -> Vec<Device> {
        self.devices.iter().map(|b| b.device()).collect()
    }

    /// Per layer, whether it is built with the fused DeepSeek V4 operators.
    pub fn layer_fused(&self) -> &[bool] {
        &self.layer_fused
    }

    /// Bytes of weights copied into each device's buffers.
    pub fn device_weight_bytes(&self) -> Vec<(Device, usize)> {
        self.devices
            .iter()
            .zip(&self.device_weights)
            .map(|(b, c)| (b.device(), c.allocated_bytes()))
            .collect()
    }

    /// The Hadamard matrices graphs rotate by: the indexer's, when the model has ratio-4 layers and the indexer
    /// head allows one; attention's, with a quantized cache.
    pub(crate) fn rotations(&self) -> Rotations<'_> {
        let all = self.consts_ctx.tensors();
        Rotations {
            indexer: self.consts.indexer.map(|i| all[i]),
            attention: self.consts.attention.map(|i| all[i]),
        }
    }

    /// The model's vocabulary, read from the GGUF on first use; an error when it has none or one ferrite cannot
    /// read.
    pub fn tokenizer(&self) -> Result<&Tokenizer, TokenizerError> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(t);
        }
        let t = Tokenizer::from_gguf(&self.model)?;
        Ok(self.tokenizer.get_or_init(|| t))
    }

    /// The prompt format every command renders conversations with (see [`PromptFormat`]).
    pub fn prompt_format(&self) -> &PromptFormat {
        &self.prompt_format
    }

    /// The context size the engine was planned for (`-c`, resolved by [`resolve_ctx`]): [`Engine::session`]'s.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The micro-batch the engine was planned for (`--ubatch`, at most the context): [`Engine::session`]'s.
    pub fn n_ubatch(&self) -> usize {
        self.n_ubatch
    }

    /// A new empty sequence with the context size and micro-batch the memory plan reserved room for.
    pub fn session(&self) -> Result<Session<'_>> {
        Session::new(self, self.n_ctx, self.n_ubatch)
    }

    /// A new empty sequence with room for `n_ctx` tokens, processing prompts `n_ubatch` tokens at a time (sizes the
    /// memory plan did not reserve: perplexity's chunks, benchmarks and tests).
    pub fn session_sized(&self, n_ctx: usize, n_ubatch: usize) -> Result<Session<'_>> {
        Session::new(self, n_ctx, n_ubatch)
    }
}

/// What the documentation of [`Engine`] claims, checked at compile time.
fn _assert_send<T: Send>() {}
fn _engine_is_send() {
    _assert_send::<Engine>();
}

/// The largest `-c` (and so `--ubatch`) a run may ask for: 2^32 - 1 tokens, thousands of times any trained context;
/// sizes computed from it stay far from overflowing.
pub const MAX_CTX: usize = u32::MAX as usize;

/// The context size and micro-batch of a run: `-c` resolved by [`resolve_ctx`], `--ubatch` (by default
/// [`DEFAULT_UBATCH`]) at most the context.
fn planned_sizes(cfg: &Config, p: &PagingOptions) -> (usize, usize) {
    let n_ctx = resolve_ctx(cfg, p.ctx_size);
    let n_ubatch = p.n_ubatch.unwrap_or(DEFAULT_UBATCH).clamp(1, n_ctx.max(1));
    (n_ctx, n_ubatch)
}

/// Plans where `model` goes over the options' devices, and the CPU's memory under the options' budget (refusing
/// what cannot fit). With nothing offloaded, the CPU's plan is the memory plan of the whole model.
fn device_plan(
    model: &Model,
    cfg: &Config,
    opts: &EngineOptions,
    n_ctx: usize,
    n_ubatch: usize,
    repack_growth: &HashMap<String, u64>,
) -> Result<DevicePlan> {
    let p = &opts.paging;
    if n_ctx > MAX_CTX {
        bail!("-c {n_ctx} is more than ferrite supports ({MAX_CTX} tokens; the model was trained on {}) (hint: use -c {} or less)", cfg.n_ctx_train, cfg.n_ctx_train.max(1));
    }
    let sizes = CacheSizes::new(cfg, n_ctx, n_ubatch, opts.cache_type);
    let tensors = model.tensors().iter().map(|t| TensorMeta {
        name: &t.info.name,
        dims: &t.info.dims,
        n_bytes: t.info.n_bytes,
    });
    let mut placement = PlacementModel::new(tensors, cfg, &sizes)
        .with_cpu_extra(|name| repack_growth.get(name).copied().unwrap_or(0));
    placement.output_bytes = (p.output_rows as u64)
        .saturating_mul(cfg.n_vocab as u64)
        .saturating_mul(4);
    let budget = p.mem.map_or_else(Budget::from_machine, Budget::from_flag);
    let req = PlanRequest {
        expert_cache: p.expert_cache,
        no_paging: p.no_paging,
    };
    let pl = &opts.placement;
    plan_devices(&placement, &pl.devices, &pl.request, &budget, &req).map_err(|e| anyhow!("{e}"))
}

/// Positions of the rotation matrices in the constants' context.
#[derive(Clone, Copy, Debug, Default)]
struct ConstIndices {
    indexer: Option<usize>,
    attention: Option<usize>,
}

/// The constant tensors of a model's graphs, in a buffer of `backend`: the indexer's Hadamard matrix (if any), and
/// with a quantized cache attention's (when the head is a multiple of 64, as llama.cpp's `attn_rot_k`).
fn constants(
    cfg: &Config,
    cache_type: CacheType,
    backend: &CpuBackend,
) -> Result<(Context<'static>, ConstIndices)> {
    let ctx = Context::with_capacity(2, 0)?;
    let indexer =
        indexer_rotation_size(cfg.indexer_dim).filter(|_| cfg.kinds.contains(&LayerKind::Csa));
    let attention = indexer_rotation_size(cfg.head_dim).filter(|_| cache_type.is_quantized());
    let mut idx = ConstIndices::default();
    let mut made = Vec::new();
    for (size, name, slot) in [
        (indexer, "indexer_rotation", &mut idx.indexer),
        (attention, "attn_rotation", &mut idx.attention),
    ] {
        if let Some(r) = size {
            let t = ctx.new_tensor_2d(GgmlType::F32, r as i64, r as i64)?;
            t.set_name(name)?;
            *slot = Some(made.len());
            made.push(r);
        }
    }
    if !made.is_empty() {
        ctx.alloc_tensors(backend)?;
        for (t, r) in ctx.tensors().into_iter().zip(made) {
            t.set_f32(&hadamard_matrix(r))?;
        }
    }
    Ok((ctx, idx))
}

/// Copies the weights placed on devices into one buffer per device (in `devices` order): new tensors of the same
/// type, shape and name, their bytes read from the map. Returns the contexts and, per weight, where its copy is.
#[allow(clippy::type_complexity)]
fn copy_to_devices(
    model: &Model,
    sources: &[&gguf::ModelTensor],
    dest: &[Option<Device>],
    devices: &[Device],
) -> Result<(Vec<Context<'static>>, Vec<Option<(usize, usize)>>)> {
    let mut on_device = vec![None; sources.len()];
    let mut contexts = Vec::with_capacity(devices.len());
    for (k, &device) in devices.iter().enumerate() {
        let mine: Vec<usize> = (0..sources.len())
            .filter(|&i| dest[i] == Some(device))
            .collect();
        let ctx = Context::with_capacity(mine.len() + 1, 0)?;
        for (j, &i) in mine.iter().enumerate() {
            let t = sources[i];
            let dims: Vec<i64> = t.info.dims.iter().map(|&d| d as i64).collect();
            let tensor = ctx.new_tensor(t.info.ty, &dims)?;
            tensor.set_name(&t.info.name)?;
            on_device[i] = Some((k, j));
        }
        ctx.alloc_tensors_on(device, true).with_context(|| {
            format!(
                "cannot allocate {} weights on device {} ({})",
                mine.len(),
                device.name(),
                device.description()
            )
        })?;
        for (tensor, &i) in ctx.tensors().into_iter().zip(&mine) {
            tensor
                .set_bytes(model.tensor_data(sources[i]))
                .with_context(|| {
                    format!(
                        "cannot copy {} to device {}",
                        sources[i].info.name,
                        device.name()
                    )
                })?;
        }
        contexts.push(ctx);
    }
    Ok((contexts, on_device))
}
