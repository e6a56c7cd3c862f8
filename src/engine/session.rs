//! `Session`: one sequence of an [`Engine`] (its tokens, cache and logits). How its micro-batches run (kept graphs,
//! the scheduler, the paged store) is [`crate::exec`]'s.

use std::path::Path;
use std::rc::Rc;

use anyhow::{bail, Context as _, Result};

use super::Engine;
use crate::cache::plan::{Gather, TopKReads};
use crate::cache::{CacheSizes, KvCache, UbatchPlan};
use crate::exec::{GraphStats, Runner, KEPT_GRAPHS};

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
    /// Bytes one product of the lightning indexer may take ([`crate::cache::INDEXER_PRODUCT_BYTES`]); less scores
    /// a micro-batch's queries in more chunks, with the same results.
    pub indexer_bytes: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            graph_reuse: true,
            grouped_experts: true,
            chosen_rows: true,
            log_schedule: false,
            indexer_bytes: crate::cache::INDEXER_PRODUCT_BYTES,
        }
    }
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
    /// Runs the micro-batches: the compute buffer, kept graphs, scheduler and paged stages.
    runner: Runner<'e>,
    tokens: Vec<u32>,
    /// Attention of few queries gathers the key rows they see (see [`crate::cache::plan::RawPlan::read_slots`]).
    gather: Gather,
    /// How gathered ratio-4 attention reads its compressed rows past the indexer's top-k.
    top_k_reads: TopKReads,
    indexer_bytes: usize,
    /// A prompt's repacked experts multiply with ggml's GEMM kernels (see [`crate::ggml::GroupedKernel`]).
    grouped: bool,
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
        let opts = engine.opts.session;
        let kept = if opts.graph_reuse { KEPT_GRAPHS } else { 0 };
        let runner = Runner::new(engine, cache.sizes.n_ubatch, kept, opts.log_schedule)?;
        Ok(Session {
            engine,
            cache: Rc::new(cache),
            runner,
            tokens: Vec::new(),
            gather: Gather::for_this_build(),
            top_k_reads: match opts.chosen_rows {
                true => TopKReads::Chosen,
                false => TopKReads::Masked,
            },
            grouped: opts.grouped_experts,
            indexer_bytes: opts.indexer_bytes,
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

    /// Bytes of the compute buffers this session's micro-batches needed so far (what the memory plan reserves for
    /// them: [`crate::plan::devices::compute_bytes`]).
    pub fn compute_bytes(&self) -> usize {
        self.runner.compute_bytes()
    }

    /// Keeps the graphs of recent micro-batch shapes and reuses them (the default), or builds a new graph for
    /// every micro-batch (`false`: a diagnostic; the logits are the same bit for bit). New sessions start as
    /// [`SessionOptions::graph_reuse`] says.
    pub fn set_graph_reuse(&mut self, on: bool) {
        self.runner.set_kept(if on { KEPT_GRAPHS } else { 0 });
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

    /// Lets a prompt's repacked routed experts multiply with ggml's GEMM kernels, four rows at a time (the
    /// default), or makes every micro-batch use `mul_mat_id`, one row at a time, as llama.cpp does (`false`: a
    /// diagnostic; the kernels round differently, so logits differ in the last bits). New sessions start as
    /// [`SessionOptions::grouped_experts`] says.
    pub fn set_grouped_experts(&mut self, on: bool) {
        self.grouped = on;
    }

    /// The plan of the next micro-batch, `tokens`.
    fn plan(&mut self, tokens: &[u32]) -> UbatchPlan {
        let cfg = &self.engine.cfg;
        let (gather, reads, bytes) = (self.gather, self.top_k_reads, self.indexer_bytes);
        let plan = UbatchPlan::new(
            cfg,
            &self.cache.sizes,
            tokens,
            self.n_past(),
            gather,
            reads,
            bytes,
        );
        if plan.raw.read_slots.is_some() {
            self.runner.stats.gathered += 1;
        }
        if !plan.chunks.is_empty() {
            self.runner.stats.chunked += 1;
        }
        if plan.csa.as_ref().is_some_and(|c| c.top_k.is_some()) {
            self.runner.stats.chosen += 1;
        }
        plan
    }

    /// Whether graphs are kept and reused.
    pub fn graph_reuse(&self) -> bool {
        self.runner.kept() > 0
    }

    /// Graphs built and reused so far.
    pub fn graph_stats(&self) -> GraphStats {
        self.runner.stats
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
        let plan = self.plan(tokens);
        let grouped = self.grouped;
        self.runner.run(&self.cache, plan, want, grouped, out)?;
        self.tokens.extend_from_slice(tokens);
        Ok(())
    }

    /// How many nodes of each operator the graph of the last micro-batch computed through the scheduler has (`None`
    /// on the CPU-only path, or before the first micro-batch). Used by tests to see which form each device got.
    pub fn scheduled_op_counts(&self) -> Option<std::collections::BTreeMap<String, usize>> {
        let (g, _) = self.runner.last_scheduled()?;
        Some(g.graph().op_counts())
    }

    /// For each node of the last scheduled graph: its name, operator and the device that runs it (None: the CPU or
    /// unassigned). `None` on the CPU-only path or before the first micro-batch.
    pub fn scheduled_nodes(&self) -> Option<Vec<(String, String, Option<String>)>> {
        let (g, sched) = self.runner.last_scheduled()?;
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
        let (_, sched) = self.runner.last_scheduled()?;
        Some(sched.n_splits())
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
