//! The stage graphs of a micro-batch through the paged expert store (DESIGN.md section 4, "Experts"). A layer's
//! experts can only be loaded once its router has chosen them, so a micro-batch runs as a chain of graphs (run by
//! `crate::exec`, over the slots of `crate::experts::store`):
//!
//! * `Layer(L)`: the feed-forward output of layer L-1 (from the experts' accumulator, the shared expert and the
//!   streams, kept in [`StageState`]), layer L's attention, its feed-forward input, router, shared expert and, when
//!   layer L+1 is paged and routes by score, layer L+1's router run on this input as a guess to prefetch. A layer
//!   whose experts are not paged (on a device) computes them here too.
//! * `Experts(L)`: the experts of a set of (token, choice) entries whose experts are in slots, over the slot tensors
//!   with ids remapped to slots; each entry's output is written to its row of the accumulator.
//! * `Head`: layer L-1's output and the head.
//!
//! Every operator is the one the resident graph runs, on the same values, so the logits are the same bit for bit
//! (tests/paged_experts.rs): an entry's expert output is one row-times-vector product whatever the grouping.

use std::rc::Rc;

use anyhow::{Context as _, Result};
use gguf::GgmlType;

use crate::cache::{KvCache, UbatchPlan};
use crate::ggml::{Context, CpuBackend, GgmlError, OwnedGraph, Tensor};

use super::config::Config;
use super::forward::{attention_block, embed, ffn_input, head, moe_shape, Ops, Uploads};
use super::hc::{self, HcMix};
use super::moe::{expert_outputs, route, shared_expert, sum_experts};
use super::step::{batch_inputs, indexer_nodes, GraphKey, GraphParts, CHUNK_NODES};
use super::weights::{Routing, Weights};

/// Tensors carried from one graph of a micro-batch to the next, for up to `n_ubatch` tokens (the first `n`
/// columns are used).
pub struct StageState {
    ctx: Context<'static>,
}

/// Order of the state tensors in their context.
const XMID: usize = 0;
const C: usize = 1;
const POST: usize = 2;
const COMB: usize = 3;
pub(crate) const SEL: usize = 4;
const WEIGHTS: usize = 5;
const SHARED: usize = 6;
const ACC: usize = 7;
pub(crate) const GUESS: usize = 8;

impl StageState {
    pub fn new(cfg: &Config, n_ubatch: usize, backend: &CpuBackend) -> Result<StageState> {
        let (d, hc, k, n) = (
            cfg.n_embd as i64,
            cfg.hc as i64,
            cfg.n_expert_used as i64,
            n_ubatch as i64,
        );
        let ctx = Context::with_capacity(9, 0)?;
        let f32 = GgmlType::F32;
        ctx.new_tensor_3d(f32, d, hc, n)?; // XMID: the streams after attention
        ctx.new_tensor_2d(f32, d, n)?; // C: the feed-forward input
        ctx.new_tensor_2d(f32, hc, n)?; // POST
        ctx.new_tensor_3d(f32, hc, hc, n)?; // COMB
        ctx.new_tensor_2d(GgmlType::I32, k, n)?; // SEL: the chosen experts
        ctx.new_tensor_3d(f32, 1, k, n)?; // WEIGHTS
        ctx.new_tensor_2d(f32, d, n)?; // SHARED: the shared expert's output
        ctx.new_tensor_2d(f32, d, k * n)?; // ACC: each entry's routed output, row t*k + j
        ctx.new_tensor_2d(GgmlType::I32, k, n)?; // GUESS: the next layer's router on this input
        ctx.alloc_tensors(backend)
            .context("cannot allocate the paged store's state")?;
        Ok(StageState { ctx })
    }

    fn get(&self, i: usize) -> Tensor<'_> {
        self.ctx.tensors()[i]
    }

    /// The values of state tensor `i` (an I32 one: the chosen or guessed experts).
    pub fn get_i32(&self, i: usize) -> crate::ggml::Result<Vec<i32>> {
        self.get(i).get_i32()
    }

    /// Writes routed outputs into the accumulator: `values` holds one row of `n_embd` floats per entry of `rows`
    /// (the row `t·k + j` each goes to), in order.
    pub fn set_acc_rows(&self, rows: &[i32], values: &[f32]) -> Result<()> {
        let acc = self.get(ACC);
        let d = acc.ne()[0] as usize;
        let n_rows = acc.ne()[1] as usize;
        if values.len() != rows.len() * d {
            anyhow::bail!(
                "{} routed outputs for {} rows of {d} values",
                values.len(),
                rows.len()
            );
        }
        let row_bytes = acc.nb()[1];
        for (&r, v) in rows.iter().zip(values.chunks_exact(d)) {
            let r = usize::try_from(r)
                .ok()
                .filter(|&r| r < n_rows)
                .ok_or_else(|| anyhow::anyhow!("row {r} is outside the accumulator's {n_rows}"))?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
            acc.set_bytes_within(r * row_bytes, &bytes)?;
        }
        Ok(())
    }
}

/// Where an experts stage graph puts its weighted outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertsOut {
    /// Into the accumulator's rows (the graph's last node writes the state, on the state's backend).
    Acc,
    /// Into a graph output `{n_embd, entries}` (the last tensor of the graph's list) on the device that computes
    /// them; the caller moves them into the accumulator ([`StageState::set_acc_rows`]). A device graph then ends
    /// on its device, so the CPU can work while it runs.
    Own,
}

/// What a kept stage graph is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StageKey {
    /// Layer L-1's output (when L > 0) and layer L up to its router.
    Layer { key: GraphKey, layer: usize },
    /// `entries` experts of layer `layer`.
    Experts { layer: usize, entries: usize },
    /// The last layer's output and the head.
    Head { n_tokens: usize, n_out: usize },
}

/// What the stage graphs share: the cache and the state.
pub struct StageDeps {
    pub cache: Rc<KvCache>,
    pub state: Rc<StageState>,
}

/// Dimensions of each state tensor (the last one counts tokens; ggml's own count drops trailing 1s, so a
/// micro-batch of one token cannot tell).
const RANK: [usize; 9] = [3, 2, 2, 3, 2, 3, 2, 2, 2];

/// The first `n` token columns of state tensor `i`.
fn cols<'c>(
    ctx: &'c Context<'c>,
    st: &'c StageState,
    i: usize,
    n: i64,
) -> crate::ggml::Result<Tensor<'c>> {
    let t = st.get(i);
    let ne = t.ne();
    let nb = t.nb();
    match RANK[i] {
        3 => ctx.view_3d(t, [ne[0], ne[1], n], [nb[1], nb[2]], 0),
        _ => ctx.view_2d(t, [ne[0], n], nb[1], 0),
    }
}

/// Layer `il - 1`'s feed-forward output put back into the streams: `{D, hc, n}`.
fn ffn_output<'c>(
    o: &Ops<'c>,
    cfg: &Config,
    st: &'c StageState,
    n: i64,
) -> crate::ggml::Result<Tensor<'c>> {
    let ctx = o.ctx;
    let k = cfg.n_expert_used as i64;
    let acc = st.get(ACC);
    let acc = ctx.view_3d(
        acc,
        [cfg.n_embd as i64, k, n],
        [acc.nb()[1], k as usize * acc.nb()[1]],
        0,
    )?;
    let f = ctx.add(sum_experts(o, acc)?, cols(ctx, st, SHARED, n)?)?;
    let mix = HcMix {
        post: cols(ctx, st, POST, n)?,
        comb: cols(ctx, st, COMB, n)?,
    };
    hc::post(o, f, cols(ctx, st, XMID, n)?, &mix)
}

/// Nodes and tensors a stage graph may need.
fn stage_graph_size(cfg: &Config) -> usize {
    1000 + 64 * cfg.sinkhorn_iters
}

/// Which layers' routed experts the stage graphs leave to the expert store (the others' graphs compute them from
/// the layer's own expert tensors, on their device).
#[derive(Clone, Copy)]
pub struct StagePaging<'a> {
    pub paged_layers: &'a [bool],
}

impl StagePaging<'_> {
    fn pages(&self, il: usize) -> bool {
        self.paged_layers.get(il).copied().unwrap_or(false)
    }
}

/// Builds the graph of `Layer { layer: il }` for micro-batches shaped like `plan`: its tensors are the batch inputs
/// in [`batch_inputs`] order. When `paging` leaves layer `il`'s experts out of the store, the graph computes every
/// entry's routed output into the accumulator itself; the next layer's router runs as a guess only when that layer
/// is paged.
pub fn build_layer_graph<'e>(
    parts: &GraphParts<'_, 'e>,
    deps: StageDeps,
    plan: &UbatchPlan,
    il: usize,
    paging: StagePaging<'_>,
) -> crate::ggml::Result<OwnedGraph<'e>> {
    let size = stage_graph_size(parts.cfg) + CHUNK_NODES * plan.chunks.len() + indexer_nodes(plan);
    let (cfg, fused, w) = (parts.cfg, parts.fused, parts.weights);
    OwnedGraph::<'e>::build(
        size,
        size,
        Rc::new(deps),
        |ctx, deps: &StageDeps, _scope| {
            let st = &*deps.state;
            let mut up = Uploads::new_tensors(ctx);
            let inp = batch_inputs(&mut up, plan.clone(), &[], parts.rotation)?;
            let o = Ops::new(ctx, cfg, fused)
                .with_layer_fused(parts.layer_fused.clone())
                .for_layer(il);
            let n = plan.tokens.len() as i64;
            let x = match il {
                0 => embed(&o, cfg, w, inp.tokens)?,
                _ => ffn_output(&o, cfg, st, n)?,
            };
            let cache = deps.cache.layers();
            let lw = &w.layers[il];
            let x_mid = attention_block(&o, cfg, lw, &cache[il], x, &inp, il)?;
            let (c, mix) = ffn_input(&o, lw, x_mid)?;
            let shape = moe_shape(cfg, il);
            let (selected, weights) = route(&o, lw, c, inp.tokens, &shape)?;
            let shared = shared_expert(&o, lw, c, &shape)?;
            let mut out_views = Vec::new();
            let mut out = vec![
                (x_mid, XMID),
                (c, C),
                (mix.post, POST),
                (mix.comb, COMB),
                (selected, SEL),
                (weights, WEIGHTS),
                (shared, SHARED),
            ];
            if !paging.pages(il) {
                // Every entry's routed output, row t·k + j of the accumulator, as the experts stages write it.
                let experts = [lw.gate_exps, lw.up_exps, lw.down_exps];
                let e = expert_outputs(&o, experts, c, selected, weights, &shape)?; // {D, k, n}
                let rows = cfg.n_expert_used as i64 * n;
                let e = ctx.reshape_2d(e, [cfg.n_embd as i64, rows])?;
                let acc = st.get(ACC);
                out_views.push((e, ctx.view_2d(acc, [acc.ne()[0], rows], acc.nb()[1], 0)?));
            }
            if let Some(next) = w.layers.get(il + 1).filter(|_| paging.pages(il + 1)) {
                if let Routing::Score { .. } = next.routing {
                    let (guess, _) = route(&o, next, c, inp.tokens, &moe_shape(cfg, il + 1))?;
                    out.push((guess, GUESS));
                }
            }
            let mut graph = ctx.new_graph(size)?;
            for (t, i) in out {
                graph.expand(ctx.cpy(t, cols(ctx, st, i, n)?)?)?;
            }
            for (t, dst) in out_views {
                graph.expand(ctx.cpy(t, dst)?)?;
            }
            for e in o.effects() {
                graph.expand(e)?;
            }
            Ok::<_, GgmlError>((graph, up.tensors().collect()))
        },
    )
}

/// Builds the graph of `entries` expert entries of layer `il` over the slots. Inputs, in order: the token of each
/// entry (I32 `{entries}`), its row in the accumulator (`t·k + j`), and its slot (I32 `{1, entries}`).
pub fn build_experts_graph<'e>(
    cfg: &Config,
    fused: bool,
    slots: [Tensor<'e>; 3],
    state: Rc<StageState>,
    il: usize,
    entries: usize,
    out: ExpertsOut,
) -> crate::ggml::Result<OwnedGraph<'e>> {
    let m = entries as i64;
    OwnedGraph::<'e>::build(64, 64, state, |ctx, st: &StageState, _scope| {
        let o = Ops::new(ctx, cfg, fused);
        let token = ctx.new_tensor_1d(GgmlType::I32, m)?;
        let row = ctx.new_tensor_1d(GgmlType::I32, m)?;
        let slot = ctx.new_tensor_2d(GgmlType::I32, 1, m)?;
        let c = ctx.get_rows(st.get(C), token)?; // {D, m}
        let w_all = st.get(WEIGHTS);
        let w_rows = ctx.reshape_2d(w_all, [1, w_all.n_elements()])?;
        let weights = ctx.reshape_3d(ctx.get_rows(w_rows, row)?, [1, 1, m])?;
        let e = expert_outputs(&o, slots, c, slot, weights, &moe_shape(cfg, il))?; // {D, 1, m}
        let mut graph = ctx.new_graph(64)?;
        match out {
            ExpertsOut::Acc => {
                let e = ctx.reshape_2d(e, [cfg.n_embd as i64, m])?;
                graph.expand(ctx.set_rows(st.get(ACC), e, row)?)?;
                Ok::<_, GgmlError>((graph, vec![token, row, slot]))
            }
            ExpertsOut::Own => {
                // The product's own node when it is one (not a view of another): read as it is.
                let e = match e.is_contiguous() && !e.is_view() {
                    true => e,
                    false => ctx.cont(e)?,
                };
                e.set_output();
                graph.expand(e)?;
                Ok((graph, vec![token, row, slot, e]))
            }
        }
    })
}

/// Builds the head graph: the last layer's output and the logits of the rows `out_ids` names. Tensors: the logits,
/// then the `out_ids` input.
pub fn build_head_graph<'e>(
    cfg: &Config,
    fused: bool,
    weights: &Weights<Tensor<'e>>,
    state: Rc<StageState>,
    n_tokens: usize,
    n_out: usize,
) -> crate::ggml::Result<OwnedGraph<'e>> {
    let size = stage_graph_size(cfg);
    OwnedGraph::<'e>::build(size, size, state, |ctx, st: &StageState, _scope| {
        let o = Ops::new(ctx, cfg, fused);
        let out_ids = ctx.new_tensor_1d(GgmlType::I32, n_out as i64)?;
        let x = ffn_output(&o, cfg, st, n_tokens as i64)?;
        let logits = head(&o, cfg, weights, x, out_ids)?;
        let mut graph = ctx.new_graph(size)?;
        graph.expand(logits)?;
        Ok::<_, GgmlError>((graph, vec![logits, out_ids]))
    })
}

/// Entries (token, choice) of a layer whose experts are in slots: the token, the row `t·k + j` of the choice, the
/// slot of its expert.
pub struct Entries {
    pub token: Vec<i32>,
    pub row: Vec<i32>,
    pub slot: Vec<i32>,
}
