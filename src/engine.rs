//! `Engine` (an opened model: config, weights mapped into ggml, a backend) and `Session` (one sequence: tokens,
//! cache, logits). The only API the commands use.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use gguf::Model;

use crate::cache::{CacheSizes, CacheType, CompPlan, KvCache, UbatchPlan};
use crate::ggml::{Context, CpuBackend, GraphAllocator, Tensor};
use crate::model::config::Config;
use crate::model::forward::{
    forward, hadamard_matrix, indexer_rotation_size, BatchInputs, BlockInputs, CompInputs, Ops,
    Uploads,
};
use crate::model::weights::Weights;

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
        Ok(Engine {
            path: path.to_path_buf(),
            model,
            cfg,
            weights_ctx,
            weights,
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
        Ok(Session {
            engine: self,
            cache,
            alloc,
            tokens: Vec::new(),
        })
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
pub struct Session<'e> {
    engine: &'e Engine,
    cache: KvCache,
    /// The compute buffer, reused by every micro-batch's graph.
    alloc: GraphAllocator,
    tokens: Vec<u32>,
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
        let mut out = Vec::new();
        let chunks: Vec<&[u32]> = tokens.chunks(self.cache.sizes.n_ubatch).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let want = match which {
                Logits::All => (0..chunk.len()).collect(),
                Logits::Last if last => vec![chunk.len() - 1],
                Logits::Last => Vec::new(),
            };
            let logits = self.run_ubatch(chunk, &want)?;
            out.extend_from_slice(&logits);
        }
        Ok(out)
    }

    /// Runs one micro-batch; returns the logits of the positions in `want` (indices within the micro-batch).
    fn run_ubatch(&mut self, tokens: &[u32], want: &[usize]) -> Result<Vec<f32>> {
        let engine = self.engine;
        let cfg = &engine.cfg;
        let plan = UbatchPlan::new(cfg, &self.cache.sizes, tokens, self.n_past());
        let n_nodes = 400 * (cfg.n_layer + 1)
            + 64 * cfg.sinkhorn_iters * cfg.n_layer * usize::from(!engine.opts.fused_ops);
        let ctx = Context::with_capacity(n_nodes, n_nodes)?;
        let logits = {
            let ctx: &Context = &ctx;
            let mut up = Uploads::default();
            let inp = batch_inputs(ctx, &mut up, &plan, want, cfg, engine.opts.fused_ops)?;
            let o = Ops::new(ctx, cfg, engine.opts.fused_ops);
            let weights = engine.weight_tensors();
            let cache = self.cache.layers();
            // Head only when logits are wanted; the layers still run (they fill the cache).
            let logits = forward(&o, cfg, &weights, &cache, &inp)?;
            let mut graph = ctx.new_graph(n_nodes)?;
            graph.expand(logits)?;
            for e in o.effects() {
                graph.expand(e)?;
            }
            self.alloc.alloc(&graph)?;
            up.upload()?;
            engine.backend.compute(&graph)?;
            if want.is_empty() {
                Vec::new()
            } else {
                logits.get_f32()?
            }
        };
        self.tokens.extend_from_slice(tokens);
        Ok(logits)
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

fn batch_inputs<'c>(
    ctx: &'c Context<'c>,
    up: &mut Uploads<'c>,
    plan: &UbatchPlan,
    want: &[usize],
    cfg: &Config,
    fused: bool,
) -> Result<BatchInputs<'c>> {
    let n = plan.tokens.len();
    let positions: Vec<i32> = (plan.p0..plan.p0 + n).map(|p| p as i32).collect();
    let ring = plan.raw.mask.len() / n;
    // With no logits wanted, still compute one (cheap) row: the graph needs an output.
    let out_ids: Vec<i32> = if want.is_empty() {
        vec![n as i32 - 1]
    } else {
        want.iter().map(|&i| i as i32).collect()
    };
    Ok(BatchInputs {
        tokens: up.i32(ctx, "inp_tokens", plan.tokens.clone())?,
        pos: up.i32(ctx, "inp_pos", positions)?,
        raw_slots: up.i32(
            ctx,
            "inp_raw_slots",
            plan.raw.write_slots.iter().map(|&s| s as i32).collect(),
        )?,
        raw_mask: up.mask(ctx, "inp_raw_mask", ring, plan.raw.mask.clone(), false)?,
        csa: plan
            .csa
            .as_ref()
            .map(|p| comp_inputs(ctx, up, p, plan.p0, n, fused))
            .transpose()?,
        hca: plan
            .hca
            .as_ref()
            .map(|p| comp_inputs(ctx, up, p, plan.p0, n, false))
            .transpose()?,
        out_ids: up.i32(ctx, "inp_out_ids", out_ids)?,
        indexer_rotation: match indexer_rotation_size(cfg.indexer_dim) {
            Some(r) if plan.csa.is_some() => {
                Some(up.mask(ctx, "inp_indexer_rot", r, hadamard_matrix(r), false)?)
            }
            _ => None,
        },
    })
}

fn comp_inputs<'c>(
    ctx: &'c Context<'c>,
    up: &mut Uploads<'c>,
    p: &CompPlan,
    p0: usize,
    n: usize,
    half_mask: bool,
) -> Result<CompInputs<'c>> {
    let c = &p.compress;
    let r = c.ratio;
    let blocks = if c.n_blocks == 0 {
        None
    } else {
        let write: Vec<i32> = (c.first_block..c.first_block + c.n_blocks)
            .map(|j| j as i32)
            .collect();
        Some(BlockInputs {
            n_blocks: c.n_blocks,
            read_rows: up.i32(ctx, &format!("inp_r{r}_read"), c.read_rows.clone())?,
            block_pos: up.i32(ctx, &format!("inp_r{r}_block_pos"), c.block_pos.clone())?,
            write_rows: up.i32(ctx, &format!("inp_r{r}_write"), write)?,
        })
    };
    let mask = up.mask(
        ctx,
        &format!("inp_r{r}_mask"),
        p.n_kv,
        p.mask.clone(),
        false,
    )?;
    let mask_f16 = if half_mask {
        Some(up.mask(
            ctx,
            &format!("inp_r{r}_mask16"),
            p.n_kv,
            p.mask.clone(),
            true,
        )?)
    } else {
        None
    };
    Ok(CompInputs {
        ratio: r,
        ape_pos: up.i32(
            ctx,
            &format!("inp_r{r}_ape"),
            (p0..p0 + n).map(|t| (t % r) as i32).collect(),
        )?,
        persist_rows: up.i32(ctx, &format!("inp_r{r}_persist"), c.persist_rows.clone())?,
        blocks,
        mask,
        mask_f16,
    })
}
