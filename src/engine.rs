//! `Engine` (an opened model: config, weights mapped into ggml, a backend) and `Session` (one sequence: tokens,
//! cache, logits). The only API the commands use.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use gguf::{GgmlType, Model};

use crate::cache::{CacheSizes, CacheType, KvCache, UbatchPlan};
use crate::ggml::{Context, CpuBackend, GraphAllocator, Tensor};
use crate::model::config::{Config, LayerKind};
use crate::model::forward::{hadamard_matrix, indexer_rotation_size};
use crate::model::step::{build_graph, fill_inputs, GraphCache, GraphKey, GraphParts};
use crate::model::weights::Weights;

/// Micro-batch graphs a session keeps for reuse: decode cycles through up to three shapes (a ratio-4 row, a
/// ratio-128 row, or none completes), plus the last prompt's.
const KEPT_GRAPHS: usize = 4;

/// Set to `0` to build a fresh graph for every micro-batch (a diagnostic: the results are the same).
const GRAPH_REUSE_ENV: &str = "FERRITE_GRAPH_REUSE";

/// How an engine runs.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub n_threads: usize,
    /// Use ggml's DeepSeek V4 operators where the backend has them (the release path); `false` computes the same
    /// maths with primitive operators (the path for backends without them, and a cross-check).
    pub fused_ops: bool,
    /// How sessions store key rows.
    pub cache_type: CacheType,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            n_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            fused_ops: true,
            cache_type: CacheType::default(),
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
}

impl Engine {
    /// Opens `path` (any shard of a split model), checks it is DeepSeek V4 with every tensor in place, and maps
    /// the weights into ggml without copying them.
    pub fn open(path: &Path, opts: EngineOptions) -> Result<Engine> {
        let model = Arc::new(Model::open(path)?);
        let cfg = Config::from_model(&model)
            .with_context(|| format!("{} is not a usable DeepSeek V4 model", path.display()))?;
        let weights_ctx = Context::with_capacity(model.tensors().len() + 1, 0)?;
        let regions = (0..model.shards().len())
            .map(|s| weights_ctx.map_shared(model.clone(), move |m: &Model| m.shards()[s].bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        // Create a ggml tensor for each weight the model uses, bound to its bytes in the map.
        let mut count = 0usize;
        let mut bind_error = None;
        let weights = Weights::bind(&model, &cfg, |name| {
            let Some(t) = model.tensor(name) else {
                return usize::MAX;
            };
            let dims: Vec<i64> = t.info.dims.iter().map(|&d| d as i64).collect();
            let result = weights_ctx.new_tensor(t.info.ty, &dims).and_then(|tensor| {
                tensor.set_name(name)?;
                let shard = &model.shards()[t.shard];
                let offset = (shard.header().data_offset + t.info.offset) as usize;
                weights_ctx.bind(tensor, regions[t.shard], offset)
            });
            if let Err(e) = result {
                bind_error.get_or_insert(e);
            }
            count += 1;
            count - 1
        })
        .with_context(|| format!("{} is not a usable DeepSeek V4 model", path.display()))?;
        if let Some(e) = bind_error {
            return Err(e).context("cannot map the weights into ggml");
        }
        let backend = CpuBackend::new(opts.n_threads.max(1))?;
        let consts_ctx =
            constants(&cfg, &backend).context("cannot allocate the model's constants")?;
        Ok(Engine {
            path: path.to_path_buf(),
            model,
            cfg,
            weights_ctx,
            weights,
            consts_ctx,
            backend,
            opts,
        })
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
        let reuse = std::env::var(GRAPH_REUSE_ENV).map_or(true, |v| v.trim() != "0");
        Ok(Session {
            engine: self,
            cache: Rc::new(cache),
            alloc,
            graphs: GraphCache::new(if reuse { KEPT_GRAPHS } else { 0 }),
            stats: GraphStats::default(),
            tokens: Vec::new(),
        })
    }
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
    stats: GraphStats,
    tokens: Vec<u32>,
}

/// How a session's micro-batches got their graphs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs built (and allocated).
    pub built: u64,
    /// Micro-batches that reused a kept graph.
    pub reused: u64,
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
        let engine = self.engine;
        let cfg = &engine.cfg;
        let fused = engine.opts.fused_ops;
        let plan = UbatchPlan::new(cfg, &self.cache.sizes, tokens, self.n_past());
        let key = GraphKey::of(&plan, want.len());
        let fresh;
        let graph = match self.graphs.get(&key) {
            Some(g) => {
                self.stats.reused += 1;
                g
            }
            None => {
                self.stats.built += 1;
                let weights = engine.weight_tensors();
                let parts = GraphParts {
                    cfg,
                    fused,
                    weights: &weights,
                    rotation: engine.indexer_rotation(),
                };
                let g = build_graph(&parts, &self.cache, &plan, want)?;
                let before = self.alloc.buffer_size();
                self.alloc.alloc(g.graph())?;
                if self.alloc.buffer_size() != before {
                    // A bigger compute buffer: kept graphs still hold the old one; let it go.
                    self.graphs.clear();
                }
                if self.graphs.capacity() > 0 {
                    self.graphs.insert(key, g);
                    self.graphs.get(&key).expect("just kept")
                } else {
                    fresh = g;
                    &fresh
                }
            }
        };
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
