//! The paged expert store (DESIGN.md section 4, "Experts"): routed experts live in a pool of slots filled on demand
//! with large `pread`s; everything else stays in the map. A micro-batch runs as a chain of graphs, because a layer's
//! experts can only be loaded once its router has chosen them:
//!
//! * `Layer(L)`: the feed-forward output of layer L-1 (from the experts' accumulator, the shared expert and the
//!   streams, kept in [`StageState`]), layer L's attention, its feed-forward input, router, shared expert and, when
//!   layer L+1 routes by score, layer L+1's router run on this input as a guess to prefetch.
//! * `Experts(L)`: the experts of a set of (token, choice) entries whose experts are in slots, over the slot tensors
//!   with ids remapped to slots; each entry's output is written to its row of the accumulator. Hits run while the
//!   misses are read; a needed set larger than the pool runs in waves.
//! * `Head`: layer L-1's output and the head.
//!
//! Every operator is the one the resident graph runs, on the same values, so the logits are the same bit for bit
//! (tests/paged_experts.rs): an entry's expert output is one row-times-vector product whatever the grouping.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context as _, Result};
use gguf::{GgmlType, Model};

use crate::cache::{KvCache, UbatchPlan};
use crate::experts::io::{direct_room, DIRECT_ALIGN};
use crate::experts::{
    ExpertKey, ExpertReader, ExpertStats, Load, PolicyConfig, ReadJob, ReadOptions, ReadReport,
    SlotBuffers, SlotId, SlotPolicy,
};
use crate::ggml::{Context, CpuBackend, GgmlError, OwnedGraph, SlotPool, Tensor};

use super::config::Config;
use super::forward::{attention_block, embed, ffn_input, head, moe_shape, Ops, Uploads};
use super::hc::{self, HcMix};
use super::moe::{expert_outputs, route, shared_expert, sum_experts};
use super::step::{batch_inputs, GraphKey, GraphParts, CHUNK_NODES};
use super::weights::{Routing, Weights};

/// Experts per read batch when a layer's misses are read while the previous batch is computed: 24 slabs keep the
/// reader's 8 threads busy, and a decoded token's misses of a layer (at most 6 in Flash) stay one batch.
const READ_CHUNK: usize = 8;

/// How much a guess from the next layer's router is worth against a known need (the chance it is used).
const GUESS_WEIGHT: f64 = 0.5;

/// The expert cache of an engine: the slot pool, tensors over it per layer, the reader and the policy.
pub struct PagedExperts {
    pool: Arc<SlotPool>,
    /// Per layer: gate, up and down tensors `{n_in, n_out, n_slots}` over the pool.
    slot_ctx: Context<'static>,
    reader: ExpertReader,
    /// Bytes of gate, up and down in a slot (each part starts where the previous one's room ends).
    part_bytes: [u64; 3],
    /// Per layer: where each part's slab starts within its room (its offset within a page in the file, so that it
    /// can be read with `O_DIRECT`; 0 when the slabs are not whole pages).
    leads: Vec<[usize; 3]>,
    /// Per hash-routed paged layer: the experts of every token id (`n_expert_used` per token), for certain
    /// prefetches.
    hash_experts: Vec<Option<Vec<i32>>>,
    /// Per layer: whether its routed experts go through the store (else they are on a device, and the layer's graph
    /// computes them there).
    paged_layers: Vec<bool>,
    policy: Mutex<SlotPolicy>,
}

impl PagedExperts {
    /// A pool of `n_slots` slots for the routed experts of `model`'s layers that `paged_layers` marks (`weights`: the
    /// engine's tensors, for the hash tables). `drop_cache`: drop the OS's copy of what is read (memory is tight).
    pub fn new(
        model: &Model,
        cfg: &Config,
        weights: &Weights<Tensor<'_>>,
        paged_layers: &[bool],
        n_slots: usize,
        drop_cache: bool,
    ) -> Result<PagedExperts> {
        let opts = ReadOptions {
            drop_cache,
            ..ReadOptions::default()
        };
        let reader =
            ExpertReader::open(model, opts).context("cannot set up reads of the routed experts")?;
        let layout = reader.layout();
        // Slabs of whole pages share their tensor's offset within a page: placed at that offset in rooms that
        // start on a page boundary, every expert can be read straight into its slot (ExpertReader's O_DIRECT).
        let page = DIRECT_ALIGN as u64;
        let direct = layout
            .layers()
            .all(|l| l.parts.iter().all(|p| p.slab_bytes % page == 0));
        let part_bytes = match direct {
            true => layout.max_slab_bytes().map(direct_room),
            false => layout.max_slab_bytes().map(|b| b.next_multiple_of(64)),
        };
        let stride = part_bytes.iter().sum::<u64>();
        let pool = Arc::new(SlotPool::new(n_slots, stride as usize)?);
        let slot_ctx = Context::with_capacity(3 * cfg.n_layer + 1, 0)?;
        let mut leads = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let slabs = layout.layer(il as u32).ok_or_else(|| {
                anyhow!(
                    "layer {il} has no routed experts; the paged store needs them in every layer"
                )
            })?;
            let lead = slabs.parts.each_ref().map(|p| {
                if direct {
                    (p.file_offset % page) as usize
                } else {
                    0
                }
            });
            let mut room = 0usize;
            for (part, slab) in slabs.parts.iter().enumerate() {
                let [n_in, n_out, _] = slab.dims;
                let at = room + lead[part];
                let t = slot_ctx.pool_tensor(&pool, slab.ty, n_in as i64, n_out as i64, at)?;
                t.set_name(&format!("slots.{il}.{}", crate::experts::io::PARTS[part]))?;
                room += part_bytes[part] as usize;
            }
            leads.push(lead);
        }
        if paged_layers.len() != cfg.n_layer {
            return Err(anyhow!(
                "the expert store was asked to page {} layers' experts; the model has {} layers",
                paged_layers.len(),
                cfg.n_layer
            ));
        }
        let hash_experts = weights
            .layers
            .iter()
            .zip(paged_layers)
            .map(|(lw, &paged)| match lw.routing {
                Routing::Hash { tid2eid } if paged => tid2eid.get_i32().map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let policy = SlotPolicy::new(PolicyConfig::new(
            n_slots,
            cfg.n_layer as u32,
            cfg.n_expert as u32,
        ))?;
        Ok(PagedExperts {
            pool,
            slot_ctx,
            reader,
            part_bytes,
            leads,
            hash_experts,
            paged_layers: paged_layers.to_vec(),
            policy: Mutex::new(policy),
        })
    }

    /// Which layers' experts the stage graphs leave to the store.
    pub fn stage_paging(&self) -> StagePaging<'_> {
        StagePaging {
            paged_layers: &self.paged_layers,
        }
    }

    /// Whether layer `il`'s routed experts go through the store (else its graph computes them on their device).
    pub fn pages_layer(&self, il: usize) -> bool {
        self.paged_layers.get(il).copied().unwrap_or(false)
    }

    pub fn n_slots(&self) -> usize {
        self.pool.n_slots()
    }

    pub fn pool_bytes(&self) -> usize {
        self.pool.bytes()
    }

    /// Locks the pool in RAM.
    pub fn lock(&self) -> std::io::Result<()> {
        self.pool.lock()
    }

    /// Layer `il`'s slot tensors: gate, up, down.
    pub(crate) fn slot_tensors(&self, il: usize) -> [Tensor<'_>; 3] {
        let all = self.slot_ctx.tensors();
        [all[3 * il], all[3 * il + 1], all[3 * il + 2]]
    }

    /// Read jobs for `loads` into their slots.
    ///
    /// # Safety
    /// No computation may read these slots, and no other job may write them, until the jobs are done.
    unsafe fn jobs(&self, loads: &[Load]) -> Result<Vec<ReadJob<'_>>> {
        loads
            .iter()
            .map(|l| {
                // SAFETY: the caller's promise; the slots of `loads` are distinct (the policy hands a slot to one
                // load at a time).
                let buf = unsafe { self.pool.slot_mut(l.slot as usize) }
                    .ok_or_else(|| anyhow!("slot {} is outside the expert cache", l.slot))?;
                let dest = SlotBuffers::packed(buf, self.part_bytes)
                    .ok_or_else(|| anyhow!("slot {} is smaller than an expert", l.slot))?;
                let lead = self
                    .leads
                    .get(l.key.layer as usize)
                    .ok_or_else(|| anyhow!("layer {} has no slot tensors", l.key.layer))?;
                let dest = dest.at(*lead);
                Ok(ReadJob { key: l.key, dest })
            })
            .collect()
    }
}

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
const SEL: usize = 4;
const WEIGHTS: usize = 5;
const SHARED: usize = 6;
const ACC: usize = 7;
const GUESS: usize = 8;

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
    let size = stage_graph_size(parts.cfg) + CHUNK_NODES * plan.chunks.len();
    let (cfg, fused, w) = (parts.cfg, parts.fused, parts.weights);
    OwnedGraph::<'e>::build(
        size,
        size,
        Rc::new(deps),
        |ctx, deps: &StageDeps, _scope| {
            let st = &*deps.state;
            let mut up = Uploads::new_tensors(ctx);
            let inp = batch_inputs(&mut up, plan.clone(), &[], fused, parts.rotation)?;
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
        let e = ctx.reshape_2d(e, [cfg.n_embd as i64, m])?;
        let mut graph = ctx.new_graph(64)?;
        graph.expand(ctx.set_rows(st.get(ACC), e, row)?)?;
        Ok::<_, GgmlError>((graph, vec![token, row, slot]))
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

/// The entries of `sel` (`k` per token) whose expert is in `slots`.
fn entries_in(sel: &[i32], k: usize, slots: &BTreeMap<u32, SlotId>) -> Entries {
    let mut e = Entries {
        token: Vec::new(),
        row: Vec::new(),
        slot: Vec::new(),
    };
    for (i, &x) in sel.iter().enumerate() {
        if let Some(&s) = slots.get(&(x as u32)) {
            e.token.push((i / k) as i32);
            e.row.push(i as i32);
            e.slot.push(s as i32);
        }
    }
    e
}

/// Reads loads on a background thread; `join` waits for them and records the wait.
struct Pending<'s> {
    handle: std::thread::ScopedJoinHandle<'s, Result<ReadReport, crate::experts::ExpertIoError>>,
    loads: Vec<Load>,
}

/// The host side of one micro-batch through the paged store: plans every layer's experts, reads misses and
/// prefetches into slots, and asks the session to compute the stage graphs in order.
pub struct PagedStep<'a> {
    pub experts: &'a PagedExperts,
    pub stats: &'a Mutex<ExpertStats>,
    pub cfg: &'a Config,
    pub tokens: &'a [u32],
}

/// How a stage is computed: the session's graph cache and allocator behind a callback.
pub enum StageCall<'x> {
    /// Layer `il`'s graph over the batch inputs.
    Layer(usize),
    /// Layer `il`'s experts for the entries.
    Experts(usize, &'x Entries),
}

impl PagedStep<'_> {
    /// Runs every layer (not the head): `compute` computes a stage graph with its inputs; `read_i32(i, len)` reads
    /// the first `len` values of I32 state tensor `i` (the chosen or guessed experts).
    pub fn run(
        &self,
        compute: &mut dyn FnMut(StageCall<'_>) -> Result<()>,
        read_i32: &dyn Fn(usize, usize) -> Result<Vec<i32>>,
    ) -> Result<()> {
        let k = self.cfg.n_expert_used;
        let n = self.tokens.len();
        let px = self.experts;
        let mut policy = px.policy.lock().unwrap_or_else(|p| p.into_inner());
        self.stats_mut().record_step(n as u64);
        policy.begin_step();
        std::thread::scope(|scope| -> Result<()> {
            // Hash-routed layers: their experts are known from the token ids; read them while attention runs.
            let mut certain = Vec::new();
            for (il, table) in px.hash_experts.iter().enumerate() {
                if let Some(table) = table {
                    for &t in self.tokens {
                        let row = &table[t as usize * k..(t as usize + 1) * k];
                        certain.extend(row.iter().map(|&e| ExpertKey::new(il as u32, e as u32)));
                    }
                }
            }
            let mut pending = None;
            if !certain.is_empty() {
                let plan = policy.prefetch(&certain, 1.0)?;
                self.stats_mut().record_prefetch(&plan);
                pending = self.spawn(scope, plan.loads)?;
            }
            for il in 0..self.cfg.n_layer {
                compute(StageCall::Layer(il))?;
                self.join(pending.take(), &mut policy)?;
                if !px.pages_layer(il) {
                    // Computed by the layer's graph on the device that holds its experts.
                    self.stats_mut().record_resident((n * k) as u64);
                    continue;
                }
                let sel = read_i32(SEL, k * n)?;
                let keys: Vec<ExpertKey> = sel
                    .iter()
                    .map(|&e| ExpertKey::new(il as u32, e as u32))
                    .collect();
                let plan = policy.request(&keys)?;
                self.stats_mut().record_request(&plan);
                for wave in &plan.waves {
                    let hits: BTreeMap<u32, SlotId> =
                        wave.hits.iter().map(|h| (h.key.expert, h.slot)).collect();
                    // Misses load in chunks, each while the one before (the hits first) is computed: a wave's
                    // slots are all different, so reading one chunk never touches what another computes.
                    let chunks: Vec<&[Load]> = wave.misses.chunks(READ_CHUNK).collect();
                    let mut reading = match chunks.first() {
                        Some(c) => self.spawn(scope, c.to_vec())?,
                        None => None,
                    };
                    if !hits.is_empty() {
                        compute(StageCall::Experts(il, &entries_in(&sel, k, &hits)))?;
                    }
                    for (i, chunk) in chunks.iter().enumerate() {
                        self.join(reading.take(), &mut policy)?;
                        if let Some(next) = chunks.get(i + 1) {
                            reading = self.spawn(scope, next.to_vec())?;
                        }
                        let slots = chunk.iter().map(|m| (m.key.expert, m.slot)).collect();
                        compute(StageCall::Experts(il, &entries_in(&sel, k, &slots)))?;
                    }
                }
                // Guess the next layer's experts and read them while its attention runs.
                if plan.waves.len() == 1
                    && px.pages_layer(il + 1)
                    && px.hash_experts[il + 1].is_none()
                {
                    let guess = read_i32(GUESS, k * n)?;
                    let keys: Vec<ExpertKey> = guess
                        .iter()
                        .map(|&e| ExpertKey::new(il as u32 + 1, e as u32))
                        .collect();
                    let plan = policy.prefetch(&keys, GUESS_WEIGHT)?;
                    self.stats_mut().record_prefetch(&plan);
                    pending = self.spawn(scope, plan.loads)?;
                }
            }
            self.join(pending.take(), &mut policy)
        })
    }

    fn stats_mut(&self) -> std::sync::MutexGuard<'_, ExpertStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts reading `loads` on a thread of `scope` (nothing when there are none).
    fn spawn<'s, 'env>(
        &'env self,
        scope: &'s std::thread::Scope<'s, 'env>,
        loads: Vec<Load>,
    ) -> Result<Option<Pending<'s>>> {
        if loads.is_empty() {
            return Ok(None);
        }
        let px = self.experts;
        // SAFETY: the slots of `loads` were just handed out for loading; no graph reads them until this read is
        // joined (stages only read slots of hits and of joined loads), and no other read targets them.
        let jobs = unsafe { px.jobs(&loads)? };
        let reader = &px.reader;
        let handle = scope.spawn(move || reader.read(jobs));
        Ok(Some(Pending { handle, loads }))
    }

    /// Waits for a background read; on failure forgets what its slots were to hold.
    fn join(&self, pending: Option<Pending<'_>>, policy: &mut SlotPolicy) -> Result<()> {
        let Some(p) = pending else {
            return Ok(());
        };
        let start = Instant::now();
        let result = p.handle.join();
        let result = match result {
            Ok(r) => r.map_err(anyhow::Error::from),
            Err(_) => Err(anyhow!("a thread reading experts stopped unexpectedly")),
        };
        let mut stats = self.stats_mut();
        stats.record_io_wait(start.elapsed());
        match result {
            Ok(report) => {
                stats.record_read(&report);
                Ok(())
            }
            Err(e) => {
                for l in &p.loads {
                    policy.invalidate(l.slot)?;
                }
                Err(e).context("cannot read routed experts into the expert cache")
            }
        }
    }
}
