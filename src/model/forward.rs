//! The forward pass of one micro-batch as one ggml graph: embedding, hyper-connected layers (attention, then the
//! feed-forward), and the head. One code path for prefill and decode; the per-sequence cache is read and written
//! inside the graph.

use std::cell::RefCell;
use std::rc::Rc;

use gguf::GgmlType;

use crate::cache::LayerCache;
use crate::ggml::{Context, GgmlError, RepackType, Result, RopeMode, RopeParams, Tensor};

use super::attention::{attention, AttnShape};
use super::config::{Config, LayerKind};
use super::hc::{self, HcMix, HcParams};
use super::moe::{moe, MoeShape};
use super::weights::{LayerWeights, Weights};

/// The graph builder's state: the context, numerical settings, and side effects (cache writes) to run. Clones
/// share the side effects ([`Ops::for_layer`]).
#[derive(Clone)]
pub struct Ops<'c> {
    pub ctx: &'c Context<'c>,
    /// Use ggml's DeepSeek hyper-connection operators (hc_pre/post/comb); else the same maths in primitive ops.
    pub fused: bool,
    pub eps: f32,
    pub hc_eps: f32,
    pub sinkhorn_iters: usize,
    /// Repacked routed experts of a prompt multiply with ggml's GEMM kernels (see [`crate::ggml::GroupedKernel`])
    /// when set: the buffer type they are repacked in.
    pub grouped: Option<RepackType>,
    /// Per layer, whether its device has the fused operators (see [`Ops::for_layer`]); `None`: every layer as
    /// `fused` says (the CPU-only engine).
    pub layer_fused: Option<Rc<Vec<bool>>>,
    effects: Rc<RefCell<Vec<Tensor<'c>>>>,
}

impl<'c> Ops<'c> {
    pub fn new(ctx: &'c Context<'c>, cfg: &Config, fused: bool) -> Ops<'c> {
        Ops {
            ctx,
            fused,
            eps: cfg.eps,
            hc_eps: cfg.hc_eps,
            sinkhorn_iters: cfg.sinkhorn_iters,
            grouped: None,
            layer_fused: None,
            effects: Rc::new(RefCell::new(Vec::new())),
        }
    }

    /// Sets which layers may use the fused operators (their device has them); see [`Ops::for_layer`].
    pub fn with_layer_fused(self, layer_fused: Option<Rc<Vec<bool>>>) -> Ops<'c> {
        Ops {
            layer_fused,
            ..self
        }
    }

    /// The builder for layer `il`: fused operators only where `fused` is on and the layer's device has them.
    pub fn for_layer(&self, il: usize) -> Ops<'c> {
        let mut o = self.clone();
        if let Some(v) = &self.layer_fused {
            o.fused = self.fused && v.get(il).copied().unwrap_or(true);
        }
        o
    }

    /// Lets repacked routed experts use the grouped GEMM products (see [`Ops::grouped`]).
    pub fn with_grouped(self, grouped: Option<RepackType>) -> Ops<'c> {
        Ops { grouped, ..self }
    }

    /// Records a node that must run although nothing reads it (a cache write).
    pub fn effect(&self, t: Tensor<'c>) {
        self.effects.borrow_mut().push(t);
    }

    /// The recorded cache writes.
    pub fn effects(&self) -> Vec<Tensor<'c>> {
        self.effects.borrow().clone()
    }

    /// Makes a RoPE node rotate the last `rope.n_dims` dims of each `head_dim`-wide head (DSV4.md 3.5).
    pub fn rope_tail(
        &self,
        rope_node: Tensor<'c>,
        head_dim: usize,
        rope: &RopeParams,
    ) -> Result<Tensor<'c>> {
        self.ctx.rope_set_offset(rope_node, head_dim - rope.n_dims)
    }
}

/// Index inputs of the blocks one micro-batch completes for one compress ratio.
pub struct BlockInputs<'c> {
    pub n_blocks: usize,
    /// I32: source rows each block pools.
    pub read_rows: Tensor<'c>,
    /// I32 `{n_blocks}`: RoPE position of each block (its first token).
    pub block_pos: Tensor<'c>,
    /// I32 `{n_blocks}`: the compressed-cache row each block is written to (in the indexer's rows; ratio 4 only).
    pub write_rows: Option<Tensor<'c>>,
    /// I32 `{n_blocks}`: the same rows in the layer's `kv` (after the raw ring).
    pub write_kv: Tensor<'c>,
}

/// Inputs of the compressed layers of one ratio (shared by all layers of that ratio).
pub struct CompInputs<'c> {
    pub ratio: usize,
    /// Each query attends to the `k` rows the indexer chose for it, gathered (`attn_rows` then holds only the raw
    /// rows); see [`crate::cache::CompPlan::top_k`].
    pub top_k: Option<usize>,
    /// I32 `{n}`: the APE row of each new token (`position % ratio`).
    pub ape_pos: Tensor<'c>,
    /// I32 `{min(n, ring)}`: the ring rows of the newest positions (the last rows of the micro-batch).
    pub ring_slots: Tensor<'c>,
    /// I32: the `kv` rows attention gathers (the gathered raw rows, then the first compressed rows), when gathered.
    pub attn_rows: Option<Tensor<'c>>,
    pub blocks: Option<BlockInputs<'c>>,
    /// F32 `{n_kv, n}`: visibility of the first `n_kv` compressed rows (padded past the rows that exist).
    pub mask: Tensor<'c>,
    /// Queries the indexer scores per product ([`crate::cache::CompPlan::indexer_step`]).
    pub indexer_step: usize,
}

/// Inputs of one chunk of queries that attends on its own (see `crate::cache::UbatchPlan::chunks`).
pub struct ChunkInputs<'c> {
    /// The chunk's first query within the micro-batch, and its size.
    pub first: usize,
    pub n: usize,
    /// I32 `{n}`: the rows of the micro-batch's attention output it fills.
    pub out_rows: Tensor<'c>,
    /// F32 `{rows, n}`: visibility of the raw rows it reads.
    pub raw_mask: Tensor<'c>,
    /// I32: the raw ring rows it reads (raw-window-only layers), and for each compressed ratio the `kv` rows (the
    /// raw rows, then its first compressed rows).
    pub raw_rows: Option<Tensor<'c>>,
    pub csa_rows: Option<Tensor<'c>>,
    pub hca_rows: Option<Tensor<'c>>,
}

/// Inputs of one micro-batch.
pub struct BatchInputs<'c> {
    /// I32 `{n}`.
    pub tokens: Tensor<'c>,
    /// I32 `{n}`: absolute positions.
    pub pos: Tensor<'c>,
    /// I32 `{n}`: raw-window ring rows of the new keys.
    pub raw_slots: Tensor<'c>,
    /// F32 `{n_kv, n}`: visibility of the first `n_kv` raw ring rows (of the gathered rows, when gathered); None
    /// when the queries attend in chunks, each with its own mask.
    pub raw_mask: Option<Tensor<'c>>,
    /// F32 `{ring, n}`: visibility of every raw ring row, for layers with compressed rows, when `raw_mask` does not
    /// cover the whole ring.
    pub raw_ring_mask: Option<Tensor<'c>>,
    /// I32 `{n_kv}`: the ring rows the raw-window-only layers gather, when gathered (see `raw_mask`).
    pub raw_read: Option<Tensor<'c>>,
    pub csa: Option<CompInputs<'c>>,
    pub hca: Option<CompInputs<'c>>,
    /// Query chunks attending on their own (empty: the micro-batch attends at once).
    pub chunks: Vec<ChunkInputs<'c>>,
    /// I32 `{n_out}`: positions (within the micro-batch) whose logits are wanted.
    pub out_ids: Tensor<'c>,
    /// F32 `{r, r}`: the Walsh-Hadamard matrix indexer queries and keys are rotated by (see [`indexer_rotation_size`]).
    pub indexer_rotation: Option<Tensor<'c>>,
    /// F32 `{r, r}`: with a quantized cache, the Hadamard matrix attention queries, keys (raw and compressed, before
    /// they are stored) and outputs are rotated by, as llama.cpp does (its `attn_rot_k`; see [`Rotations`]).
    pub attn_rotation: Option<Tensor<'c>>,
}

/// The engine's constant rotation matrices a graph reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rotations<'c> {
    /// The indexer's (see [`indexer_rotation_size`]).
    pub indexer: Option<Tensor<'c>>,
    /// Attention's, with a quantized cache: spreading each head's outliers over a block of its values before the
    /// keys are quantized (the size as [`indexer_rotation_size`] of the head).
    pub attention: Option<Tensor<'c>>,
}

/// Size of the Hadamard rotation of indexer queries and keys, as llama.cpp picks it: 64, doubled while it still
/// divides the indexer head; None when the head is not a multiple of 64.
pub fn indexer_rotation_size(indexer_dim: usize) -> Option<usize> {
    if indexer_dim == 0 || indexer_dim % 64 != 0 {
        return None;
    }
    let mut n = 64;
    while indexer_dim % (2 * n) == 0 {
        n *= 2;
    }
    Some(n)
}

/// The orthonormal Sylvester-Hadamard matrix of size `n` (a power of two), row-major.
pub fn hadamard_matrix(n: usize) -> Vec<f32> {
    let mut h = vec![0f32; n * n];
    h[0] = 1.0 / (n as f32).sqrt();
    let mut s = 1;
    while s < n {
        for i in 0..s {
            for j in 0..s {
                let v = h[i * n + j];
                h[i * n + j + s] = v;
                h[(i + s) * n + j] = v;
                h[(i + s) * n + j + s] = -v;
            }
        }
        s *= 2;
    }
    h
}

impl<'c> BatchInputs<'c> {
    pub fn compressed(&self, kind: LayerKind) -> Option<&CompInputs<'c>> {
        match kind {
            LayerKind::Csa => self.csa.as_ref(),
            LayerKind::Hca => self.hca.as_ref(),
            LayerKind::Raw => None,
        }
    }
}

/// RoPE settings of `layer` for rotating `cfg.n_rot` dims.
pub fn rope_params(cfg: &Config, layer: usize) -> RopeParams {
    let r = cfg.rope(layer);
    RopeParams {
        n_dims: cfg.n_rot,
        mode: RopeMode::Normal,
        n_ctx_orig: r.n_ctx_orig,
        freq_base: r.freq_base,
        freq_scale: r.freq_scale,
        ext_factor: r.ext_factor,
        attn_factor: r.attn_factor,
        beta_fast: r.beta_fast,
        beta_slow: r.beta_slow,
    }
}

/// Builds the micro-batch's graph up to the logits `{n_vocab, n_out}`; cache writes are in `o.effects()`.
pub fn forward<'c>(
    o: &Ops<'c>,
    cfg: &Config,
    w: &Weights<Tensor<'c>>,
    cache: &[LayerCache<Tensor<'c>>],
    inp: &BatchInputs<'c>,
) -> Result<Tensor<'c>> {
    let mut x = embed(o, cfg, w, inp.tokens)?;
    x.set_name("inp_embd")?;
    for (il, lw) in w.layers.iter().enumerate() {
        let o = &o.for_layer(il);
        let x_mid = attention_block(o, cfg, lw, &cache[il], x, inp, il)?;
        x_mid.set_name(&format!("ffn_inp-{il}"))?;
        let (c, mix) = ffn_input(o, lw, x_mid)?;
        c.set_name(&format!("ffn_norm-{il}"))?;
        let f = moe(o, lw, c, inp.tokens, &moe_shape(cfg, il))?;
        f.set_name(&format!("ffn_out-{il}"))?;
        x = hc::post(o, f, x_mid, &mix)?;
        x.set_name(&format!("l_out-{il}"))?;
    }
    let logits = head(o, cfg, w, x, inp.out_ids)?;
    logits.set_name("result_output")?;
    Ok(logits)
}

/// The token embeddings copied into the hc streams: `{D, hc, n}`.
pub fn embed<'c>(
    o: &Ops<'c>,
    cfg: &Config,
    w: &Weights<Tensor<'c>>,
    tokens: Tensor<'c>,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let n = tokens.ne()[0];
    let e = ctx.reshape_3d(
        ctx.get_rows(w.token_embd, tokens)?,
        [cfg.n_embd as i64, 1, n],
    )?;
    let mut x = e;
    for _ in 1..cfg.hc {
        x = ctx.concat(x, e, 1)?;
    }
    Ok(x)
}

/// Layer `il`'s attention sub-block: `x {D, hc, n}` -> the streams after it.
pub fn attention_block<'c>(
    o: &Ops<'c>,
    cfg: &Config,
    lw: &LayerWeights<Tensor<'c>>,
    cache: &LayerCache<Tensor<'c>>,
    x: Tensor<'c>,
    inp: &BatchInputs<'c>,
    il: usize,
) -> Result<Tensor<'c>> {
    let attn_shape = AttnShape {
        n_head: cfg.n_head,
        head_dim: cfg.head_dim,
        o_groups: cfg.o_groups,
        o_lora: cfg.o_lora,
        indexer_heads: cfg.indexer_heads,
        indexer_dim: cfg.indexer_dim,
        indexer_top_k: cfg.indexer_top_k,
    };
    let rope = rope_params(cfg, il);
    let attn_hc = HcParams {
        func: lw.hc_attn_fn,
        base: lw.hc_attn_base,
        scale: lw.hc_attn_scale,
    };
    let (y, mix) = hc::pre(o, x, &attn_hc)?;
    let c = o.ctx.mul(o.ctx.rms_norm(y, o.eps)?, lw.attn_norm)?;
    c.set_name(&format!("attn_norm-{il}"))?;
    let a = attention(o, lw, cache, c, inp, &attn_shape, &rope)?;
    a.set_name(&format!("attn_out-{il}"))?;
    hc::post(o, a, x, &mix)
}

/// The feed-forward's input `{D, n}` (mixed from the streams and normalised) and the mix its output goes back with.
pub fn ffn_input<'c>(
    o: &Ops<'c>,
    lw: &LayerWeights<Tensor<'c>>,
    x: Tensor<'c>,
) -> Result<(Tensor<'c>, HcMix<'c>)> {
    let ffn_hc = HcParams {
        func: lw.hc_ffn_fn,
        base: lw.hc_ffn_base,
        scale: lw.hc_ffn_scale,
    };
    let (y, mix) = hc::pre(o, x, &ffn_hc)?;
    Ok((o.ctx.mul(o.ctx.rms_norm(y, o.eps)?, lw.ffn_norm)?, mix))
}

/// Routing settings of layer `il`.
pub fn moe_shape(cfg: &Config, il: usize) -> MoeShape {
    MoeShape {
        n_expert_used: cfg.n_expert_used,
        weights_norm: cfg.expert_weights_norm,
        weights_scale: cfg.expert_weights_scale,
        clamp_exp: cfg.clamp_exp[il],
        clamp_shexp: cfg.clamp_shexp[il],
    }
}

/// The head over the positions in `out_ids` (I32 `{n_out}`): `x {D, hc, n}` -> logits `{n_vocab, n_out}`.
pub fn head<'c>(
    o: &Ops<'c>,
    cfg: &Config,
    w: &Weights<Tensor<'c>>,
    x: Tensor<'c>,
    out_ids: Tensor<'c>,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let d = cfg.n_embd as i64;
    let n = x.ne()[2];
    let hc_dim = d * cfg.hc as i64;
    let n_out = out_ids.ne()[0];
    let flat = ctx.get_rows(ctx.reshape_2d(x, [hc_dim, n])?, out_ids)?;
    let x = ctx.reshape_3d(flat, [d, cfg.hc as i64, n_out])?;
    let head = HcParams {
        func: w.hc_head_fn,
        base: w.hc_head_base,
        scale: w.hc_head_scale,
    };
    let y = hc::head(o, x, &head)?;
    let y = ctx.mul(ctx.rms_norm(y, o.eps)?, w.output_norm)?;
    ctx.mul_mat(w.output, y)
}

/// A host value to upload into an input tensor once the graph is allocated.
pub enum HostData {
    I32(Vec<i32>),
    F32(Vec<f32>),
}

impl HostData {
    fn len(&self) -> usize {
        match self {
            HostData::I32(v) => v.len(),
            HostData::F32(v) => v.len(),
        }
    }

    fn ty(&self) -> GgmlType {
        match self {
            HostData::I32(_) => GgmlType::I32,
            HostData::F32(_) => GgmlType::F32,
        }
    }
}

/// Where the input tensors come from while the inputs of a micro-batch are listed: new tensors of a graph being
/// built, or the inputs of a kept graph of the same shape, taken in the same order.
enum Source<'c> {
    New(&'c Context<'c>),
    Kept {
        tensors: &'c [Tensor<'c>],
        next: usize,
    },
}

/// Input tensors paired with their data.
pub struct Uploads<'c> {
    source: Source<'c>,
    items: Vec<(Tensor<'c>, HostData)>,
}

impl<'c> Uploads<'c> {
    /// Inputs made as new tensors of `ctx` (a graph being built).
    pub fn new_tensors(ctx: &'c Context<'c>) -> Uploads<'c> {
        Uploads {
            source: Source::New(ctx),
            items: Vec::new(),
        }
    }

    /// Inputs of a kept graph: `tensors` as [`Uploads::tensors`] listed them when it was built.
    pub fn kept(tensors: &'c [Tensor<'c>]) -> Uploads<'c> {
        Uploads {
            source: Source::Kept { tensors, next: 0 },
            items: Vec::with_capacity(tensors.len()),
        }
    }

    /// The next input: a new `{ne0, len / ne0}` tensor, or the kept graph's next one, which must have the same
    /// type and size (a kept graph is only used for micro-batches of its shape; anything else is an error).
    fn input(
        &mut self,
        name: std::fmt::Arguments<'_>,
        ne0: usize,
        data: HostData,
    ) -> Result<Tensor<'c>> {
        let ty = data.ty();
        let len = data.len();
        let t = match &mut self.source {
            Source::New(ctx) => {
                let t = if ne0 == len {
                    ctx.new_tensor_1d(ty, len as i64)?
                } else {
                    ctx.new_tensor_2d(ty, ne0 as i64, (len / ne0.max(1)) as i64)?
                };
                t.set_name(&name.to_string())?;
                // Flagged as an input (as llama.cpp's are): a scheduler keeps it in host memory and copies it to the
                // devices that read it, so views of it (a query chunk's rows of a mask) have a backend too.
                t.set_input();
                t
            }
            Source::Kept { tensors, next } => {
                let t = tensors.get(*next).copied();
                *next += 1;
                match t {
                    Some(t) if t.ty() == Some(ty) && t.n_elements() == len as i64 && t.ne()[0] == ne0 as i64 => t,
                    _ => {
                        return Err(GgmlError::Op {
                            op: "graph reuse",
                            detail: format!(
                                "input {name} ({ty}, {len} values in rows of {ne0}) does not match the kept graph's {:?}",
                                t
                            ),
                        })
                    }
                }
            }
        };
        self.items.push((t, data));
        Ok(t)
    }

    /// A new I32 `{len}` input holding `data`.
    pub fn i32(&mut self, name: std::fmt::Arguments<'_>, data: Vec<i32>) -> Result<Tensor<'c>> {
        let len = data.len();
        self.input(name, len, HostData::I32(data))
    }

    /// A new F32 `{ne0, len / ne0}` mask input holding `data`.
    pub fn mask(
        &mut self,
        name: std::fmt::Arguments<'_>,
        ne0: usize,
        data: Vec<f32>,
    ) -> Result<Tensor<'c>> {
        self.input(name, ne0, HostData::F32(data))
    }

    /// The input tensors, in the order they were listed.
    pub fn tensors(&self) -> impl Iterator<Item = Tensor<'c>> + '_ {
        self.items.iter().map(|(t, _)| *t)
    }

    /// Writes the data of the inputs the graph uses (those the allocator gave memory); a stage graph of the paged
    /// store lists every batch input but uses those of its layer only.
    pub fn upload_used(&self) -> Result<()> {
        self.check_complete()?;
        self.write(true)
    }

    /// Writes every input's data (after allocation). For a kept graph, fails unless every one of its inputs was
    /// listed.
    pub fn upload(&self) -> Result<()> {
        self.check_complete()?;
        self.write(false)
    }

    /// For a kept graph: fails unless every one of its inputs was listed.
    fn check_complete(&self) -> Result<()> {
        if let Source::Kept { tensors, next } = &self.source {
            if *next != tensors.len() {
                return Err(GgmlError::Op {
                    op: "graph reuse",
                    detail: format!("{next} inputs listed, the kept graph has {}", tensors.len()),
                });
            }
        }
        Ok(())
    }

    fn write(&self, used_only: bool) -> Result<()> {
        for (t, data) in &self.items {
            if used_only && !t.is_allocated() {
                continue;
            }
            match data {
                HostData::I32(v) => t.set_i32(v)?,
                HostData::F32(v) => t.set_f32(v)?,
            }
        }
        Ok(())
    }
}
