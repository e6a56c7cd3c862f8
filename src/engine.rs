//! `Engine` (an opened model: config, weights mapped into ggml, a backend) and `Session` (one sequence: tokens,
//! cache, logits). The only API the commands use.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _, Result};
use gguf::{GgmlType, Model};

use crate::cache::plan::Gather;
use crate::cache::{cache_bytes, CacheSizes, CacheType, KvCache, UbatchPlan};
use crate::experts::{ExpertStats, StatsSnapshot};
use crate::ggml::{
    Context, CpuBackend, GraphAllocator, GroupedKernel, OwnedGraph, RepackType, RepackedStats,
    Tensor,
};
use crate::model::config::{Config, LayerKind};
use crate::model::forward::{hadamard_matrix, indexer_rotation_size, Uploads};
use crate::model::moe::groups_rows;
use crate::model::paged::{
    build_experts_graph, build_head_graph, build_layer_graph, PagedExperts, PagedStep, StageCall,
    StageDeps, StageKey, StageState,
};
use crate::model::sizes::weight_sizes;
use crate::model::step::{
    batch_inputs, build_graph, fill_inputs, out_ids, GraphCache, GraphKey, GraphParts,
};
use crate::model::weights::Weights;
use crate::placement::{experts_fit, lock_weights, place_weights, product_weights};
use crate::plan::{
    plan_memory, Budget, ExpertCacheArg, ExpertPlacement, MemoryPlan, PlanInputs, PlanReason,
    PlanRequest,
};
use crate::units::format_bytes;

/// Micro-batch graphs a session keeps for reuse: decode cycles through up to three shapes (a ratio-4 row, a
/// ratio-128 row, or none completes), plus the last prompt's.
const KEPT_GRAPHS: usize = 4;

/// Set to `0` to build a fresh graph for every micro-batch (a diagnostic: the results are the same).
const GRAPH_REUSE_ENV: &str = "FERRITE_GRAPH_REUSE";
/// `FERRITE_GROUPED_EXPERTS=0` turns the grouped expert products off for new sessions (see
/// [`Session::set_grouped_experts`]).
const GROUPED_EXPERTS_ENV: &str = "FERRITE_GROUPED_EXPERTS";

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
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            n_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            fused_ops: true,
            cache_type: CacheType::default(),
            paging: PagingOptions::default(),
            repack: true,
        }
    }
}

/// An opened DeepSeek V4 model. Immutable once open; sessions borrow it.
pub struct Engine {
    path: PathBuf,
    model: Arc<Model>,
    cfg: Config,
    weights_ctx: Context<'static>,
    weights: Weights<usize>,
    /// Constant tensors the graphs read (the indexer's Hadamard matrix), in their own buffer.
    consts_ctx: Context<'static>,
    backend: CpuBackend,
    opts: EngineOptions,
    plan: MemoryPlan,
    /// The expert cache, when the plan pages the routed experts.
    paged: Option<PagedExperts>,
    stats: Mutex<ExpertStats>,
    /// What locking memory did (`--mlock`, and the paged store's resident weights).
    notes: Vec<String>,
    /// Bytes locked in RAM at open (see [`Engine::locked_bytes`]).
    locked: u64,
    /// See [`Engine::grouped_experts`].
    grouped: Option<RepackType>,
    /// The weights copied into RAM as they are (see [`crate::placement::place_weights`]).
    copied: RepackedStats,
}

impl Engine {
    /// Opens `path` (any shard of a split model), checks it is DeepSeek V4 with every tensor in place, and maps
    /// the weights into ggml without copying them.
    pub fn open(path: &Path, opts: EngineOptions) -> Result<Engine> {
        let model = Arc::new(Model::open(path)?);
        let cfg = Config::from_model(&model)
            .with_context(|| format!("{} is not a usable DeepSeek V4 model", path.display()))?;
        // Planned first: whether the routed experts are repacked depends on where they live.
        let plan = memory_plan(&model, &cfg, &opts)?;
        let weights_ctx = Context::with_capacity(model.tensors().len() + 1, 0)?;
        let regions = (0..model.shards().len())
            .map(|s| weights_ctx.map_shared(model.clone(), move |m: &Model| m.shards()[s].bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        // Create a ggml tensor for each weight the model uses; `sources[i]` is the file's tensor of tensor `i`.
        let mut sources = Vec::new();
        let mut make_error = None;
        let weights = Weights::bind(&model, &cfg, |name| {
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
        if let Some(e) = make_error {
            return Err(e).context("cannot map the weights into ggml");
        }
        let products = match opts.repack {
            true => product_weights(&weights, cfg.n_expert_used, experts_fit(&plan)),
            false => Vec::new(),
        };
        let placed = place_weights(&model, &weights_ctx, &regions, &sources, &products)?;
        let backend = CpuBackend::new(opts.n_threads.max(1))?;
        let consts_ctx =
            constants(&cfg, &backend).context("cannot allocate the model's constants")?;
        let mut engine = Engine {
            path: path.to_path_buf(),
            model,
            cfg,
            weights_ctx,
            weights,
            consts_ctx,
            backend,
            opts,
            plan,
            paged: None,
            stats: Mutex::new(ExpertStats::new()),
            notes: Vec::new(),
            locked: 0,
            grouped: None,
            copied: RepackedStats::default(),
        };
        engine.grouped = RepackType::cpu().filter(|rt| {
            let w = engine.weight_tensors();
            w.layers
                .iter()
                .any(|l| GroupedKernel::of(l.gate_exps, rt).is_some())
        });
        if let ExpertPlacement::Paged { slots, .. } = engine.plan.placement {
            let paged = PagedExperts::new(
                &engine.model,
                &engine.cfg,
                &engine.weight_tensors(),
                slots as usize,
                engine.plan.reason == PlanReason::Fitted,
            )
            .context("cannot set up the expert cache")?;
            engine.paged = Some(paged);
        }
        let (repacked, copied) = (placed.repacked, placed.copied);
        if repacked.tensors > 0 {
            engine.notes.push(format!(
                "repacked {} weights ({}) into RAM for the CPU's matrix kernels",
                repacked.tensors,
                format_bytes(repacked.bytes)
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

    /// Weights held repacked in RAM for the CPU's matrix kernels (0 with `repack` off or no such kernels).
    pub fn repacked_tensors(&self) -> usize {
        RepackType::cpu().map_or(0, |rt| self.weights_ctx.repacked(rt).tensors)
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
        RepackType::cpu().map_or(0, |rt| self.weights_ctx.repacked(rt).bytes)
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

    fn weight_tensors(&self) -> Weights<Tensor<'_>> {
        let all = self.weights_ctx.tensors();
        self.weights.map(|i| all[i])
    }

    /// The indexer's Hadamard matrix, when the model has ratio-4 layers and the indexer head allows one.
    fn indexer_rotation(&self) -> Option<Tensor<'_>> {
        self.consts_ctx.tensors().first().copied()
    }

    /// A new empty sequence with room for `n_ctx` tokens, processing prompts `n_ubatch` tokens at a time.
    pub fn session(&self, n_ctx: usize, n_ubatch: usize) -> Result<Session<'_>> {
        if n_ctx == 0 || n_ubatch == 0 {
            bail!("the context size and the micro-batch size must be at least 1 (got -c {n_ctx}, --ubatch {n_ubatch})");
        }
        let sizes = CacheSizes::new(&self.cfg, n_ctx, n_ubatch.min(n_ctx), self.opts.cache_type);
        let cache = KvCache::new(&self.cfg, sizes, &self.backend)
            .context("cannot allocate the context cache")?;
        let alloc =
            GraphAllocator::new(&self.backend).context("cannot create the compute buffer")?;
        let on = |var: &str| std::env::var(var).map_or(true, |v| v.trim() != "0");
        let reuse = on(GRAPH_REUSE_ENV);
        let paged = match &self.paged {
            None => None,
            Some(_) => Some(PagedSession {
                state: Rc::new(StageState::new(
                    &self.cfg,
                    cache.sizes.n_ubatch,
                    &self.backend,
                )?),
                graphs: GraphCache::new(PAGED_GRAPHS_PER_LAYER * self.cfg.n_layer + 8),
            }),
        };
        Ok(Session {
            engine: self,
            cache: Rc::new(cache),
            alloc,
            graphs: GraphCache::new(if reuse { KEPT_GRAPHS } else { 0 }),
            paged,
            stats: GraphStats::default(),
            tokens: Vec::new(),
            gather: Gather::for_this_build(),
            grouped: on(GROUPED_EXPERTS_ENV),
        })
    }
}

/// Stage graphs a paged session keeps per layer: the layer's graph for a few shapes and its experts' graphs for
/// the entry counts decode sees.
const PAGED_GRAPHS_PER_LAYER: usize = 12;

/// Bytes of compute buffers the plan reserves: activations of a micro-batch (streams, attention, the experts'
/// intermediates, scores over the window) and the logits of every row (perplexity asks for them all). An estimate.
fn compute_bytes(cfg: &Config, n_ubatch: usize) -> u64 {
    let width = cfg.expert_width.iter().copied().max().unwrap_or(0);
    let per_token = 8 * cfg.hc * cfg.n_embd
        + 4 * cfg.n_head * cfg.head_dim
        + 3 * cfg.n_expert_used * width
        + cfg.n_head * (cfg.window + n_ubatch)
        + cfg.n_vocab;
    (n_ubatch * per_token * 4) as u64
}

/// Plans memory for `model` under the options' budget (refusing what cannot fit).
fn memory_plan(model: &Model, cfg: &Config, opts: &EngineOptions) -> Result<MemoryPlan> {
    let p = &opts.paging;
    let n_ctx = resolve_ctx(cfg, p.ctx_size);
    let n_ubatch = p.n_ubatch.unwrap_or(DEFAULT_UBATCH).clamp(1, n_ctx.max(1));
    let sizes = CacheSizes::new(cfg, n_ctx, n_ubatch, opts.cache_type);
    let (per_token, fixed) = cache_bytes(cfg, &sizes);
    let inputs = PlanInputs::from_sizes(
        &weight_sizes(model),
        cfg.n_expert_used as u64,
        n_ctx as u64,
        fixed + (per_token * n_ctx as f64) as u64,
        compute_bytes(cfg, n_ubatch),
    );
    let budget = p.mem.map_or_else(Budget::from_machine, Budget::from_flag);
    let req = PlanRequest {
        expert_cache: p.expert_cache,
        no_paging: p.no_paging,
    };
    plan_memory(&inputs, &budget, &req).map_err(|e| anyhow!("{e}"))
}

/// A paged session's own parts: the state carried between its stage graphs, and the kept stage graphs.
struct PagedSession<'e> {
    state: Rc<StageState>,
    graphs: GraphCache<'e, StageKey>,
}

/// The graph kept under `key`, built by `build` and allocated when there is none (kept graphs are dropped when the
/// compute buffer grows, as they point into the old one).
fn kept_graph<'g, 'e, K: PartialEq + Copy>(
    graphs: &'g mut GraphCache<'e, K>,
    alloc: &mut GraphAllocator,
    stats: &mut GraphStats,
    key: K,
    spare: &'g mut Option<OwnedGraph<'e>>,
    build: impl FnOnce() -> crate::ggml::Result<OwnedGraph<'e>>,
) -> Result<&'g OwnedGraph<'e>> {
    if graphs.get(&key).is_some() {
        stats.reused += 1;
    } else {
        stats.built += 1;
        let g = build()?;
        let before = alloc.buffer_size();
        alloc.alloc(g.graph())?;
        if alloc.buffer_size() != before {
            // A bigger compute buffer: kept graphs still point into the old one; let them go.
            graphs.clear();
        }
        if graphs.capacity() == 0 {
            return Ok(spare.insert(g));
        }
        graphs.insert(key, g);
    }
    graphs
        .get(&key)
        .ok_or_else(|| anyhow!("a graph was neither kept nor built"))
}

/// The constant tensors of a model's graphs: the indexer's Hadamard matrix (if any), in a buffer of `backend`.
fn constants(cfg: &Config, backend: &CpuBackend) -> Result<Context<'static>> {
    let ctx = Context::with_capacity(1, 0)?;
    let size =
        indexer_rotation_size(cfg.indexer_dim).filter(|_| cfg.kinds.contains(&LayerKind::Csa));
    if let Some(r) = size {
        let t = ctx.new_tensor_2d(GgmlType::F32, r as i64, r as i64)?;
        t.set_name("indexer_rotation")?;
        ctx.alloc_tensors(backend)?;
        t.set_f32(&hadamard_matrix(r))?;
    }
    Ok(ctx)
}

/// Which logits a call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's (generation).
    Last,
    /// Every position's, row after row (`ferrite logits`, perplexity).
    All,
}

/// One sequence being processed: its tokens and cache.
pub struct Session<'e> {
    engine: &'e Engine,
    /// Shared with the kept graphs, which read and write it.
    cache: Rc<KvCache>,
    /// The compute buffer, shared by every micro-batch's graph.
    alloc: GraphAllocator,
    /// Graphs of recent micro-batch shapes, allocated in `alloc`'s buffer, reused while the shape repeats.
    graphs: GraphCache<'e>,
    /// The paged store's state and graphs, when the engine pages experts.
    paged: Option<PagedSession<'e>>,
    stats: GraphStats,
    tokens: Vec<u32>,
    /// Attention of few queries gathers the key rows they see (see [`crate::cache::plan::RawPlan::read_slots`]).
    gather: Gather,
    /// A prompt's repacked experts multiply with ggml's GEMM kernels (see [`crate::ggml::GroupedKernel`]).
    grouped: bool,
}

/// How a session's micro-batches got their graphs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs built (and allocated).
    pub built: u64,
    /// Micro-batches that reused a kept graph.
    pub reused: u64,
    /// Micro-batches whose attention gathered the key rows it reads, whole or in chunks of queries.
    pub gathered: u64,
    pub chunked: u64,
    /// Micro-batches whose repacked experts multiplied with the grouped GEMM products.
    pub grouped: u64,
}

impl<'e> Session<'e> {
    pub fn engine(&self) -> &'e Engine {
        self.engine
    }

    /// Tokens processed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn n_past(&self) -> usize {
        self.tokens.len()
    }

    pub fn n_ctx(&self) -> usize {
        self.cache.sizes.n_ctx
    }

    /// Bytes of this sequence's cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Keeps the graphs of recent micro-batch shapes and reuses them (the default), or builds a new graph for
    /// every micro-batch (`false`: a diagnostic; the logits are the same bit for bit). `FERRITE_GRAPH_REUSE=0` in the
    /// environment turns reuse off for new sessions.
    pub fn set_graph_reuse(&mut self, on: bool) {
        self.graphs.set_capacity(if on { KEPT_GRAPHS } else { 0 });
    }

    /// Lets attention of few queries gather the key rows they can see (the default, on the ISAs whose dot-product
    /// lanes ferrite knows: see [`crate::ggml::dot_lane_rows`]), or makes every micro-batch read the first rows of
    /// the cache as llama.cpp does (`false`: a diagnostic; the logits are the same bit for bit).
    pub fn set_gathered_reads(&mut self, on: bool) {
        self.gather = match on {
            true => Gather::for_this_build(),
            false => Gather::Off,
        };
    }

    /// Lets a prompt's repacked routed experts multiply with ggml's GEMM kernels, four rows at a time (the
    /// default), or makes every micro-batch use `mul_mat_id`, one row at a time, as llama.cpp does (`false`: a
    /// diagnostic; the kernels round differently, so logits differ in the last bits). `FERRITE_GROUPED_EXPERTS=0`
    /// in the environment turns them off for new sessions.
    pub fn set_grouped_experts(&mut self, on: bool) {
        self.grouped = on;
    }

    /// The plan of the next micro-batch, `tokens`.
    fn plan(&mut self, tokens: &[u32]) -> UbatchPlan {
        let cfg = &self.engine.cfg;
        let plan = UbatchPlan::new(cfg, &self.cache.sizes, tokens, self.n_past(), self.gather);
        if plan.raw.read_slots.is_some() {
            self.stats.gathered += 1;
        }
        if !plan.chunks.is_empty() {
            self.stats.chunked += 1;
        }
        plan
    }

    /// Whether graphs are kept and reused.
    pub fn graph_reuse(&self) -> bool {
        self.graphs.capacity() > 0
    }

    /// Graphs built and reused so far.
    pub fn graph_stats(&self) -> GraphStats {
        self.stats
    }

    /// Processes `tokens` after the ones already seen, in micro-batches, and returns logits (`n_vocab` per row).
    pub fn feed(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        let n_vocab = self.engine.cfg.n_vocab;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            bail!("token id {bad} is out of range: the model's vocabulary has {n_vocab} tokens (0..{})", n_vocab - 1);
        }
        let room = self.n_ctx() - self.n_past();
        if tokens.len() > room {
            bail!(
                "{} tokens do not fit the context: {} of {} are used, {room} remain (raise -c)",
                tokens.len(),
                self.n_past(),
                self.n_ctx()
            );
        }
        let rows = match which {
            Logits::All => tokens.len(),
            Logits::Last => usize::from(!tokens.is_empty()),
        };
        let mut out = Vec::with_capacity(rows * n_vocab);
        let n_chunks = tokens.len().div_ceil(self.cache.sizes.n_ubatch);
        let mut want = Vec::new();
        for (i, chunk) in tokens.chunks(self.cache.sizes.n_ubatch).enumerate() {
            want.clear();
            match which {
                Logits::All => want.extend(0..chunk.len()),
                Logits::Last if i + 1 == n_chunks => want.push(chunk.len() - 1),
                Logits::Last => {}
            }
            self.run_ubatch(chunk, &want, &mut out)?;
        }
        Ok(out)
    }

    /// Runs one micro-batch; appends the logits of the positions in `want` (indices within the micro-batch) to
    /// `out`.
    fn run_ubatch(&mut self, tokens: &[u32], want: &[usize], out: &mut Vec<f32>) -> Result<()> {
        if self.paged.is_some() {
            return self.run_ubatch_paged(tokens, want, out);
        }
        let engine = self.engine;
        {
            let mut stats = engine.stats.lock().unwrap_or_else(|p| p.into_inner());
            stats.record_step(tokens.len() as u64);
            for _ in 0..engine.cfg.n_layer {
                stats.record_resident((tokens.len() * engine.cfg.n_expert_used) as u64);
            }
        }
        let cfg = &engine.cfg;
        let fused = engine.opts.fused_ops;
        let plan = self.plan(tokens);
        let grouped = engine.grouped.filter(|_| self.grouped);
        if grouped.is_some() && groups_rows(tokens.len(), cfg.n_expert_used, cfg.n_expert) {
            self.stats.grouped += 1;
        }
        let key = GraphKey::of(&plan, want.len(), grouped.is_some());
        let mut spare = None;
        let graph = kept_graph(
            &mut self.graphs,
            &mut self.alloc,
            &mut self.stats,
            key,
            &mut spare,
            || {
                let weights = engine.weight_tensors();
                let parts = GraphParts {
                    cfg,
                    fused,
                    grouped,
                    weights: &weights,
                    rotation: engine.indexer_rotation(),
                };
                build_graph(&parts, &self.cache, &plan, want)
            },
        )?;
        let logits = fill_inputs(graph, plan, want, fused, engine.indexer_rotation())?;
        engine.backend.compute(graph.graph())?;
        if !want.is_empty() {
            let start = out.len();
            out.resize(start + logits.n_elements() as usize, 0.0);
            logits.read_f32(&mut out[start..])?;
        }
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// Runs one micro-batch through the paged store: a graph per layer up to its router, the experts over the slots
    /// (read on demand), and the head (see `crate::model::paged`).
    fn run_ubatch_paged(
        &mut self,
        tokens: &[u32],
        want: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let engine = self.engine;
        let cfg = &engine.cfg;
        let fused = engine.opts.fused_ops;
        let px = engine.paged.as_ref().expect("a paged engine");
        let plan = self.plan(tokens);
        // Paged experts live in the slots, not repacked: the grouped products never apply.
        let key = GraphKey::of(&plan, want.len(), false);
        let weights = engine.weight_tensors();
        let rotation = engine.indexer_rotation();
        let parts = GraphParts {
            cfg,
            fused,
            grouped: None,
            weights: &weights,
            rotation,
        };
        let Session {
            cache,
            alloc,
            paged,
            stats,
            ..
        } = self;
        let ps = paged.as_mut().expect("a paged session");
        let state = ps.state.clone();
        let graphs = &mut ps.graphs;
        let backend = &engine.backend;
        let mut compute = |call: StageCall<'_>| -> Result<()> {
            match call {
                StageCall::Layer(il) => {
                    let sk = StageKey::Layer { key, layer: il };
                    let mut spare = None;
                    let g = kept_graph(graphs, alloc, stats, sk, &mut spare, || {
                        let deps = StageDeps {
                            cache: cache.clone(),
                            state: state.clone(),
                        };
                        build_layer_graph(&parts, deps, &plan, il)
                    })?;
                    let mut up = Uploads::kept(g.tensors());
                    batch_inputs(&mut up, plan.clone(), &[], fused, rotation)?;
                    up.upload_used()?;
                    backend.compute(g.graph())?;
                }
                StageCall::Experts(il, e) => {
                    let sk = StageKey::Experts {
                        layer: il,
                        entries: e.row.len(),
                    };
                    let mut spare = None;
                    let g = kept_graph(graphs, alloc, stats, sk, &mut spare, || {
                        let slots = px.slot_tensors(il);
                        build_experts_graph(cfg, fused, slots, state.clone(), il, e.row.len())
                    })?;
                    let t = g.tensors();
                    t[0].set_i32(&e.token)?;
                    t[1].set_i32(&e.row)?;
                    t[2].set_i32(&e.slot)?;
                    backend.compute(g.graph())?;
                }
            }
            Ok(())
        };
        let step = PagedStep {
            experts: px,
            stats: &engine.stats,
            cfg,
            tokens,
        };
        let read_i32 = |i: usize, len: usize| -> Result<Vec<i32>> {
            let mut v = state.get_i32(i)?;
            v.truncate(len);
            Ok(v)
        };
        step.run(&mut compute, &read_i32)?;

        let n_out = want.len().max(1);
        let sk = StageKey::Head {
            n_tokens: tokens.len(),
            n_out,
        };
        let mut spare = None;
        let g = kept_graph(graphs, alloc, stats, sk, &mut spare, || {
            build_head_graph(cfg, fused, &weights, state.clone(), tokens.len(), n_out)
        })?;
        let t = g.tensors();
        t[1].set_i32(&out_ids(tokens.len(), want))?;
        backend.compute(g.graph())?;
        if !want.is_empty() {
            let start = out.len();
            out.resize(start + t[0].n_elements() as usize, 0.0);
            t[0].read_f32(&mut out[start..])?;
        }
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// Forgets everything after the first `n` tokens. The compressor rings cannot be rolled back, so the prefix
    /// is processed again (correct for any `n`; costs a prefill of `n` tokens).
    pub fn rewind(&mut self, n: usize) -> Result<()> {
        if n >= self.n_past() {
            return Ok(());
        }
        let keep = self.tokens[..n].to_vec();
        self.reset()?;
        if !keep.is_empty() {
            self.feed(&keep, Logits::Last)?;
        }
        Ok(())
    }

    /// Back to an empty sequence.
    pub fn reset(&mut self) -> Result<()> {
        self.cache.clear()?;
        self.tokens.clear();
        Ok(())
    }

    /// Saves the sequence (tokens and cache) to `path`, through a temporary file renamed into place.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::session_file::save(path, self.fingerprint(), &self.cache, &self.tokens)
    }

    /// Restores a sequence saved by [`Session::save`] from the same model with the same sizes.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        self.tokens = crate::session_file::load(path, self.fingerprint(), &self.cache)?;
        Ok(())
    }

    /// What a saved session must match: the model file and the cache sizes.
    fn fingerprint(&self) -> crate::session_file::Fingerprint {
        let m = &self.engine.model;
        crate::session_file::Fingerprint {
            model_bytes: m.file_bytes(),
            n_tensors: m.tensors().len() as u64,
            n_ctx: self.cache.sizes.n_ctx as u64,
            n_ubatch: self.cache.sizes.n_ubatch as u64,
            cache_tensors: self.cache.n_tensors() as u64,
        }
    }
}
