//! `Session`: one sequence of an [`Engine`] (its tokens, cache and logits), the graphs it keeps for reuse, and
//! how one micro-batch runs, resident or through the paged expert store.

use std::path::Path;
use std::rc::Rc;

use anyhow::{anyhow, bail, Context as _, Result};

use super::Engine;
use crate::cache::plan::{Gather, TopKReads};
use crate::cache::{CacheSizes, KvCache, UbatchPlan};
use crate::ggml::{GraphAllocator, OwnedGraph, Scheduler};
use crate::model::forward::Uploads;
use crate::model::moe::groups_rows;
use crate::model::paged::{
    build_experts_graph, build_head_graph, build_layer_graph, PagedStep, StageCall, StageDeps,
    StageKey, StageState,
};
use crate::model::step::{
    batch_inputs, build_graph, fill_inputs, out_ids, GraphCache, GraphKey, GraphParts,
};

/// Micro-batch graphs a session keeps for reuse: decode cycles through up to three shapes (a ratio-4 row, a
/// ratio-128 row, or none completes), plus the last prompt's.
const KEPT_GRAPHS: usize = 4;

/// How new sessions run: diagnostic switches that compare against the release path (both `true`), never change
/// what it computes. The CLI sets them from `FERRITE_GRAPH_REUSE=0`, `FERRITE_GROUPED_EXPERTS=0` and
/// `FERRITE_CHOSEN_ROWS=0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionOptions {
    /// See [`Session::set_graph_reuse`].
    pub graph_reuse: bool,
    /// See [`Session::set_grouped_experts`].
    pub grouped_experts: bool,
    /// See [`Session::set_chosen_rows`].
    pub chosen_rows: bool,
    /// With devices: print on stderr how the scheduler split the session's first graph (splits, which device runs
    /// which layers, compute buffers), as `--verbose` asks.
    pub log_schedule: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            graph_reuse: true,
            grouped_experts: true,
            chosen_rows: true,
            log_schedule: false,
        }
    }
}

/// A paged session's own parts: the state carried between its stage graphs, and the kept stage graphs.
struct PagedSession<'e> {
    state: Rc<StageState>,
    graphs: GraphCache<'e, StageKey>,
    /// When devices take part: the scheduler the layer and head stages run through (built anew each time; the
    /// experts stages run on the CPU, where the slots are).
    sched: Option<Scheduler<'e>>,
}

/// Builds a stage graph anew, allocates it through the scheduler (made or grown as needed), lets `fill` write its
/// inputs, computes it and returns what `read` takes from it. Nothing is kept: the scheduler hands its memory out
/// again for the next graph.
fn run_scheduled<'e, T>(
    engine: &'e Engine,
    sched: &mut Option<Scheduler<'e>>,
    stats: &mut GraphStats,
    build: impl FnOnce() -> crate::ggml::Result<OwnedGraph<'e>>,
    fill: impl FnOnce(&OwnedGraph<'e>) -> Result<()>,
    read: impl FnOnce(&OwnedGraph<'e>) -> Result<T>,
) -> Result<T> {
    stats.built += 1;
    let g = build()?;
    let size = g.graph().size();
    if !sched.as_ref().is_some_and(|s| s.fits(size)) {
        *sched = Some(engine.scheduler(size)?);
    }
    let sched = sched.as_mut().expect("made above");
    sched.alloc(g.graph())?;
    fill(&g)?;
    sched.compute(g.graph())?;
    read(&g)
}

/// What every resident micro-batch does last: appends the computed logits (when positions were wanted) to `out`
/// and records `tokens` as processed in `held`.
fn finish_ubatch(
    held: &mut Vec<u32>,
    tokens: &[u32],
    logits: crate::ggml::Tensor<'_>,
    want: &[usize],
    out: &mut Vec<f32>,
) -> Result<()> {
    if !want.is_empty() {
        let start = out.len();
        out.resize(start + logits.n_elements() as usize, 0.0);
        logits.read_f32(&mut out[start..])?;
    }
    held.extend_from_slice(tokens);
    Ok(())
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

/// A session's runner when devices take part: the graphs of recent micro-batch shapes, each with the scheduler
/// (ggml's, over the engine's devices and the CPU) that allocated it. A scheduler hands its compute buffers out
/// again for each graph it allocates, so each kept graph has its own; up to [`KEPT_GRAPHS`] are kept, as on the
/// CPU-only path, and the least recently used one's scheduler is taken for a new shape.
struct SchedRun<'e> {
    /// Least recently used first. In each tuple the graph is dropped before the scheduler whose buffers it uses.
    kept: Vec<(GraphKey, OwnedGraph<'e>, Scheduler<'e>)>,
    /// Whether the schedule was printed (see [`SessionOptions::log_schedule`]).
    logged: bool,
}

/// Stage graphs a paged session keeps per layer: the layer's graph for a few shapes and its experts' graphs for
/// the entry counts decode sees.
const PAGED_GRAPHS_PER_LAYER: usize = 12;

/// What `--verbose` prints about a scheduled graph: its splits, which device runs the nodes of each layer (runs of
/// layers on one device joined), and the compute buffers.
fn schedule_report(sched: &Scheduler<'_>, g: &OwnedGraph<'_>) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let nodes = sched.assignments(g.graph());
    // Nodes per device between layer outputs (named `l_out-N`, as llama.cpp's cb() names them): group k holds layer
    // k's nodes (the embedding's with layer 0), the group after the last layer the head's.
    let mut per_layer: BTreeMap<usize, BTreeMap<String, usize>> = BTreeMap::new();
    let mut current = 0usize;
    for (name, _, dev) in &nodes {
        let dev = dev.map_or_else(|| "?".to_string(), |d| d.name());
        *per_layer
            .entry(current)
            .or_default()
            .entry(dev)
            .or_insert(0) += 1;
        if name.starts_with("l_out-") {
            current += 1;
        }
    }
    let n_layers = current;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ferrite: scheduler: {} nodes in {} splits",
        nodes.len(),
        sched.n_splits()
    );
    for (layer, devs) in &per_layer {
        let what = match *layer {
            0 => "embedding and layer 0".to_string(),
            il if il == n_layers => "head".to_string(),
            il => format!("layer {il}"),
        };
        let devs: Vec<String> = devs.iter().map(|(d, n)| format!("{d} {n}")).collect();
        let _ = writeln!(s, "ferrite: scheduler:   {what}: {}", devs.join(", "));
    }
    for (backend, bytes) in sched.buffer_sizes() {
        let _ = writeln!(
            s,
            "ferrite: scheduler: compute buffer on {backend}: {}",
            crate::units::format_bytes(bytes as u64)
        );
    }
    s
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
///
/// Thread safety: neither `Send` nor `Sync`. It borrows its [`Engine`] (not `Sync`, so `&Engine` cannot cross
/// threads), and shares its cache and the paged store's stage state with the graphs it keeps through `Rc`. A session
/// lives on the thread that holds its engine; many sessions of one engine may live there, each used by one caller at
/// a time (every method that computes takes `&mut self`).
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
    /// How gathered ratio-4 attention reads its compressed rows past the indexer's top-k.
    top_k_reads: TopKReads,
    /// A prompt's repacked experts multiply with ggml's GEMM kernels (see [`crate::ggml::GroupedKernel`]).
    grouped: bool,
    /// The scheduler, when devices other than the CPU take part (else every graph runs on the CPU backend as is).
    sched: Option<SchedRun<'e>>,
    log_schedule: bool,
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
    /// Gathered micro-batches whose ratio-4 layers read only the rows the indexer chose for each query (see
    /// [`crate::cache::CompPlan::top_k`]).
    pub chosen: u64,
    /// Micro-batches whose repacked experts multiplied with the grouped GEMM products.
    pub grouped: u64,
}

/// What [`Session::rewind`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rewind {
    /// The session held no more than the tokens to keep.
    Nothing,
    /// The cache was rolled back as it is (no computation).
    RolledBack,
    /// The kept prefix was processed again from an empty cache.
    Recomputed,
}

/// A session's tokens and cache contents, held in memory (see [`Session::state`]).
#[derive(Clone)]
pub struct SessionState {
    fingerprint: crate::session_file::Fingerprint,
    tokens: Vec<u32>,
    cache: Vec<Vec<u8>>,
}

impl<'e> Session<'e> {
    /// A new empty sequence of `engine` with room for `n_ctx` tokens, processing prompts `n_ubatch` tokens at a time.
    pub(super) fn new(engine: &'e Engine, n_ctx: usize, n_ubatch: usize) -> Result<Session<'e>> {
        if n_ctx == 0 || n_ubatch == 0 {
            bail!("the context size and the micro-batch size must be at least 1 (got -c {n_ctx}, --ubatch {n_ubatch})");
        }
        let cfg = &engine.cfg;
        let cache_type = engine.opts.cache_type;
        if !cache_type.fits(cfg) {
            bail!(
                "a {} cache stores rows in blocks of {} values, but this model's key rows have {} values and its indexer rows {} (use --cache-type f16)",
                cache_type.name(),
                cache_type.ggml().block_size(),
                cfg.head_dim,
                cfg.indexer_dim
            );
        }
        let sizes = CacheSizes::new(cfg, n_ctx, n_ubatch.min(n_ctx), cache_type);
        let cache_devices: Vec<_> = (0..cfg.n_layer)
            .map(|il| engine.placement.layer(il).main)
            .collect();
        let cache = KvCache::new(cfg, sizes, &engine.backend, &cache_devices)
            .context("cannot allocate the context cache")?;
        let alloc =
            GraphAllocator::new(&engine.backend).context("cannot create the compute buffer")?;
        let opts = engine.opts.session;
        let paged = match &engine.paged {
            None => None,
            Some(_) => Some(PagedSession {
                state: Rc::new(StageState::new(cfg, cache.sizes.n_ubatch, &engine.backend)?),
                graphs: GraphCache::new(PAGED_GRAPHS_PER_LAYER * cfg.n_layer + 8),
                sched: None,
            }),
        };
        let sched = match engine.devices.is_empty() {
            true => None,
            false => Some(SchedRun {
                kept: Vec::new(),
                logged: false,
            }),
        };
        Ok(Session {
            engine,
            sched,
            log_schedule: opts.log_schedule,
            cache: Rc::new(cache),
            alloc,
            graphs: GraphCache::new(if opts.graph_reuse { KEPT_GRAPHS } else { 0 }),
            paged,
            stats: GraphStats::default(),
            tokens: Vec::new(),
            gather: Gather::for_this_build(),
            top_k_reads: match opts.chosen_rows {
                true => TopKReads::Chosen,
                false => TopKReads::Masked,
            },
            grouped: opts.grouped_experts,
        })
    }

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

    /// Tokens per micro-batch (one graph computation) of a prompt.
    pub fn n_ubatch(&self) -> usize {
        self.cache.sizes.n_ubatch
    }

    /// Bytes of this sequence's cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Keeps the graphs of recent micro-batch shapes and reuses them (the default), or builds a new graph for
    /// every micro-batch (`false`: a diagnostic; the logits are the same bit for bit). New sessions start as
    /// [`SessionOptions::graph_reuse`] says.
    pub fn set_graph_reuse(&mut self, on: bool) {
        self.graphs.set_capacity(if on { KEPT_GRAPHS } else { 0 });
    }

    /// Lets attention of few queries gather the key rows they can see (the default, on the ISAs whose dot-product
    /// lanes ferrite knows: see [`crate::ggml::dot_lane_rows`]), or makes every micro-batch read the first rows of
    /// the cache as llama.cpp does (`false`: a diagnostic). The logits are the same bit for bit, except where a
    /// ratio-4 layer's queries see more compressed rows than the indexer keeps: gathered, each query then reads only
    /// its chosen rows (see [`Session::set_chosen_rows`]), which sums the same terms in another order.
    pub fn set_gathered_reads(&mut self, on: bool) {
        self.gather = match on {
            true => Gather::for_this_build(),
            false => Gather::Off,
        };
    }

    /// Lets a prompt's repacked routed experts multiply with ggml's GEMM kernels, four rows at a time (the
    /// default), or makes every micro-batch use `mul_mat_id`, one row at a time, as llama.cpp does (`false`: a
    /// diagnostic; the kernels round differently, so logits differ in the last bits). New sessions start as
    /// [`SessionOptions::grouped_experts`] says.
    pub fn set_grouped_experts(&mut self, on: bool) {
        self.grouped = on;
    }

    /// Lets gathered attention of a ratio-4 layer read only the rows the indexer chose for each query once its
    /// queries see more rows than the indexer keeps (the default; [`crate::cache::CompPlan::top_k`]), or read every
    /// visible row with the others masked, as llama.cpp does (`false`: a diagnostic; the same terms summed in another
    /// order, so logits differ in the last bits). New sessions start as [`SessionOptions::chosen_rows`] says.
    pub fn set_chosen_rows(&mut self, on: bool) {
        self.top_k_reads = match on {
            true => TopKReads::Chosen,
            false => TopKReads::Masked,
        };
    }

    /// The plan of the next micro-batch, `tokens`.
    fn plan(&mut self, tokens: &[u32]) -> UbatchPlan {
        let cfg = &self.engine.cfg;
        let (gather, reads) = (self.gather, self.top_k_reads);
        let plan = UbatchPlan::new(cfg, &self.cache.sizes, tokens, self.n_past(), gather, reads);
        if plan.raw.read_slots.is_some() {
            self.stats.gathered += 1;
        }
        if !plan.chunks.is_empty() {
            self.stats.chunked += 1;
        }
        if plan.csa.as_ref().is_some_and(|c| c.top_k.is_some()) {
            self.stats.chosen += 1;
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

    /// What every resident micro-batch does first: counts the step in the expert statistics (every token uses
    /// `n_expert_used` resident experts per layer), plans the micro-batch, and picks the grouped expert products
    /// (only experts repacked in the CPU's layout, so on the CPU, take them) and the graph's key.
    fn prepare_ubatch(
        &mut self,
        tokens: &[u32],
        n_want: usize,
    ) -> (UbatchPlan, Option<crate::ggml::RepackType>, GraphKey) {
        let engine = self.engine;
        let cfg = &engine.cfg;
        {
            let mut stats = engine.stats.lock().unwrap_or_else(|p| p.into_inner());
            stats.record_step(tokens.len() as u64);
            for _ in 0..cfg.n_layer {
                stats.record_resident((tokens.len() * cfg.n_expert_used) as u64);
            }
        }
        let plan = self.plan(tokens);
        let grouped = engine.grouped.filter(|_| self.grouped);
        if grouped.is_some() && groups_rows(tokens.len(), cfg.n_expert_used, cfg.n_expert) {
            self.stats.grouped += 1;
        }
        let key = GraphKey::of(&plan, n_want, grouped.is_some());
        (plan, grouped, key)
    }

    /// Runs one micro-batch; appends the logits of the positions in `want` (indices within the micro-batch) to
    /// `out`.
    fn run_ubatch(&mut self, tokens: &[u32], want: &[usize], out: &mut Vec<f32>) -> Result<()> {
        if self.paged.is_some() {
            return self.run_ubatch_paged(tokens, want, out);
        }
        if self.sched.is_some() {
            return self.run_ubatch_sched(tokens, want, out);
        }
        let engine = self.engine;
        let cfg = &engine.cfg;
        let fused = engine.opts.fused_ops;
        let (plan, grouped, key) = self.prepare_ubatch(tokens, want.len());
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
                    rotation: engine.rotations(),
                    layer_fused: None,
                };
                build_graph(&parts, &self.cache, &plan, want)
            },
        )?;
        // Inputs the graph does not reach have no memory: with the fused indexer, a micro-batch whose queries read
        // only the indexer's choice (`CompPlan::top_k`) leaves the F32 mask of the compressed rows unused.
        let logits = fill_inputs(graph, plan, want, fused, engine.rotations(), true)?;
        engine.backend.compute(graph.graph())?;
        finish_ubatch(&mut self.tokens, tokens, logits, want, out)
    }

    /// Runs one micro-batch through the scheduler over the engine's devices and the CPU: the same graph as
    /// [`Session::run_ubatch`] builds, with each layer's nodes on the device of its weights and cache, and the
    /// primitive-op form for layers whose device lacks the fused operators.
    fn run_ubatch_sched(
        &mut self,
        tokens: &[u32],
        want: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let engine = self.engine;
        let cfg = &engine.cfg;
        let fused = engine.opts.fused_ops;
        let (plan, grouped, key) = self.prepare_ubatch(tokens, want.len());
        let capacity = self.graphs.capacity();
        let run = self.sched.as_mut().expect("a scheduled session");
        let found = match capacity > 0 {
            true => run.kept.iter().position(|(k, _, _)| *k == key),
            false => None,
        };
        if let Some(i) = found {
            self.stats.reused += 1;
            let entry = run.kept.remove(i);
            run.kept.push(entry);
        } else {
            self.stats.built += 1;
            let weights = engine.weight_tensors();
            let parts = GraphParts {
                cfg,
                fused,
                grouped,
                weights: &weights,
                rotation: engine.rotations(),
                layer_fused: Some(Rc::new(engine.layer_fused.clone())),
            };
            let g = build_graph(&parts, &self.cache, &plan, want)?;
            let size = g.graph().size();
            // The least recently used graph's scheduler when as many graphs as kept are there, else a new one.
            let old = match run.kept.len() >= capacity.max(1) {
                true => Some(run.kept.remove(0).2),
                false => None,
            };
            let mut sched = match old {
                Some(s) if s.fits(size) => s,
                _ => engine.scheduler(size)?,
            };
            sched.alloc(g.graph())?;
            if self.log_schedule && !run.logged {
                run.logged = true;
                eprint!("{}", schedule_report(&sched, &g));
            }
            run.kept.push((key, g, sched));
        }
        let (_, g, sched) = run.kept.last_mut().expect("a graph was just kept");
        let logits = fill_inputs(g, plan, want, fused, engine.rotations(), true)?;
        sched.compute(g.graph())?;
        finish_ubatch(&mut self.tokens, tokens, logits, want, out)
    }

    /// How many nodes of each operator the graph of the last micro-batch computed through the scheduler has (`None`
    /// on the CPU-only path, or before the first micro-batch). Used by tests to see which form each device got.
    pub fn scheduled_op_counts(&self) -> Option<std::collections::BTreeMap<String, usize>> {
        let (_, g, _) = self.sched.as_ref()?.kept.last()?;
        Some(g.graph().op_counts())
    }

    /// For each node of the last scheduled graph: its name, operator and the device that runs it (None: the CPU or
    /// unassigned). `None` on the CPU-only path or before the first micro-batch.
    pub fn scheduled_nodes(&self) -> Option<Vec<(String, String, Option<String>)>> {
        let (_, g, sched) = self.sched.as_ref()?.kept.last()?;
        Some(
            sched
                .assignments(g.graph())
                .into_iter()
                .map(|(name, op, dev)| (name, op, dev.map(|d| d.name())))
                .collect(),
        )
    }

    /// Splits of the last scheduled graph (`None` on the CPU-only path).
    pub fn scheduled_splits(&self) -> Option<usize> {
        let (_, _, sched) = self.sched.as_ref()?.kept.last()?;
        Some(sched.n_splits())
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
        let rotation = engine.rotations();
        let parts = GraphParts {
            cfg,
            fused,
            grouped: None,
            weights: &weights,
            rotation,
            layer_fused: Some(Rc::new(engine.layer_fused.clone())),
        };
        let scheduled = !engine.devices.is_empty();
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
        let sched = &mut ps.sched;
        let backend = &engine.backend;
        let mut compute = |call: StageCall<'_>| -> Result<()> {
            match call {
                StageCall::Layer(il) if scheduled => {
                    let deps = StageDeps {
                        cache: cache.clone(),
                        state: state.clone(),
                    };
                    let fill = |g: &OwnedGraph<'_>| -> Result<()> {
                        let mut up = Uploads::kept(g.tensors());
                        batch_inputs(&mut up, plan.clone(), &[], fused, rotation)?;
                        up.upload_used()?;
                        Ok(())
                    };
                    let build = || build_layer_graph(&parts, deps, &plan, il);
                    run_scheduled(engine, sched, stats, build, fill, |_| Ok(()))?;
                }
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
        let build = || build_head_graph(cfg, fused, &weights, state.clone(), tokens.len(), n_out);
        let fill = |g: &OwnedGraph<'_>| -> Result<()> {
            g.tensors()[1].set_i32(&out_ids(tokens.len(), want))?;
            Ok(())
        };
        let mut read = |g: &OwnedGraph<'_>| -> Result<()> {
            let t = g.tensors();
            if !want.is_empty() {
                let start = out.len();
                out.resize(start + t[0].n_elements() as usize, 0.0);
                t[0].read_f32(&mut out[start..])?;
            }
            Ok(())
        };
        if scheduled {
            run_scheduled(engine, sched, stats, build, fill, read)?;
        } else {
            let mut spare = None;
            let g = kept_graph(graphs, alloc, stats, sk, &mut spare, build)?;
            fill(g)?;
            backend.compute(g.graph())?;
            read(g)?;
        }
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// Forgets everything after the first `n` tokens. Where the cache still holds all that position `n` needs
    /// (see [`crate::cache::can_roll_back`]: `n` in the compression blocks the rings still hold, and within the raw
    /// ring), the state is rolled back as it is: rows of later positions stay masked until they are written again.
    /// Otherwise the prefix is processed again (correct for any `n`; costs a prefill of `n` tokens).
    pub fn rewind(&mut self, n: usize) -> Result<Rewind> {
        if n >= self.n_past() {
            return Ok(Rewind::Nothing);
        }
        if crate::cache::can_roll_back(&self.engine.cfg, &self.cache.sizes, n, self.n_past()) {
            self.tokens.truncate(n);
            return Ok(Rewind::RolledBack);
        }
        let keep = self.tokens[..n].to_vec();
        self.reset()?;
        if !keep.is_empty() {
            self.feed(&keep, Logits::Last)?;
        }
        Ok(Rewind::Recomputed)
    }

    /// Back to an empty sequence.
    pub fn reset(&mut self) -> Result<()> {
        self.cache.clear()?;
        self.tokens.clear();
        Ok(())
    }

    /// Saves the sequence (tokens and cache) to `path` atomically: a temporary file beside it, synced and renamed
    /// into place.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::session_file::save(path, self.fingerprint(), &self.cache, &self.tokens)
    }

    /// Restores a sequence saved by [`Session::save`] from the same model with the same sizes, read into the cache
    /// in place. On failure the session is empty (as after [`Session::reset`]): a file can fail half-way.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        match crate::session_file::load(path, self.fingerprint(), &self.cache) {
            Ok(tokens) => {
                self.tokens = tokens;
                Ok(())
            }
            Err(e) => {
                self.reset()?;
                Err(e)
            }
        }
    }

    /// The sequence (tokens and cache) in memory: [`Session::save`] without the file.
    pub fn state(&self) -> Result<SessionState> {
        Ok(SessionState {
            fingerprint: self.fingerprint(),
            tokens: self.tokens.clone(),
            cache: self.cache.snapshot()?,
        })
    }

    /// Restores what [`Session::state`] returned from a session of the same engine with the same sizes.
    pub fn set_state(&mut self, state: &SessionState) -> Result<()> {
        if state.fingerprint != self.fingerprint() {
            bail!(
                "the state comes from a session of another model or other sizes ({:?}, this one {:?})",
                state.fingerprint,
                self.fingerprint()
            );
        }
        self.cache.restore(&state.cache)?;
        self.tokens.clone_from(&state.tokens);
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
