//! One micro-batch as a graph that is kept: what fixes a graph's shape ([`GraphKey`]), the graph, and the inputs a
//! plan gives a graph, written anew for every micro-batch (the kept graphs are `crate::exec`'s). Decode repeats a
//! handful of shapes (a compressed row completes or not), so after the first tokens it builds and allocates nothing
//! and only writes inputs, as llama.cpp's graph reuse does.

use std::rc::Rc;

use crate::cache::{CompPlan, KvCache, QueryChunk, UbatchPlan};
use crate::ggml::{GgmlError, OwnedGraph, RepackType, Result, Tensor};

use super::attention::INDEXER_CHUNK_NODES;
use super::config::Config;
use super::forward::{
    forward, BatchInputs, BlockInputs, ChunkInputs, CompInputs, Ops, Rotations, Uploads,
};
use super::weights::Weights;

/// Everything that fixes the structure of a micro-batch's graph: two micro-batches with the same key differ only
/// in the values of their inputs (token ids, positions, ring rows, masks, block rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphKey {
    pub n_tokens: usize,
    /// Rows whose logits the head computes.
    pub n_out: usize,
    /// Raw-window rows attention reads.
    pub raw_n_kv: usize,
    /// Attention gathers the rows it reads (see [`crate::cache::plan::RawPlan::read_slots`]).
    pub gathered: bool,
    /// Per compressed ratio present in the model: (blocks this micro-batch completes, compressed rows read, rows
    /// each query reads when it reads only the indexer's choice: see [`CompPlan::top_k`], queries per indexer
    /// product: see [`CompPlan::indexer_step`]).
    pub csa: Option<(usize, usize, Option<usize>, usize)>,
    pub hca: Option<(usize, usize, Option<usize>, usize)>,
    /// The query chunks' shapes (first query, size, rows read per kind), folded into one number.
    pub chunks: u64,
    /// Repacked experts may use the grouped GEMM products (see [`super::forward::Ops::grouped`]).
    pub grouped: bool,
}

impl GraphKey {
    pub fn of(plan: &UbatchPlan, n_out: usize, grouped: bool) -> GraphKey {
        let comp = |p: &Option<CompPlan>| {
            p.as_ref()
                .map(|c| (c.compress.n_blocks, c.n_kv, c.top_k, c.indexer_step))
        };
        GraphKey {
            n_tokens: plan.tokens.len(),
            n_out: n_out.max(1),
            raw_n_kv: plan.raw.n_kv,
            gathered: plan.raw.read_slots.is_some(),
            csa: comp(&plan.csa),
            hca: comp(&plan.hca),
            chunks: chunk_shapes(&plan.chunks),
            grouped,
        }
    }
}

/// FNV-1a over every chunk's first query, size and rows read: equal for equal chunk shapes.
fn chunk_shapes(chunks: &[QueryChunk]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for c in chunks {
        let rows = |r: Option<usize>| r.map_or(0, |r| r as u64 + 1);
        for v in [
            c.first as u64,
            c.n as u64,
            c.raw_rows.len() as u64,
            rows(c.csa_rows),
            rows(c.hca_rows),
        ] {
            h = (h ^ v).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Positions (within the micro-batch) whose logits the graph computes: the wanted ones, or the last one when none
/// is wanted (the graph needs an output; it is cheap).
pub fn out_ids(n: usize, want: &[usize]) -> Vec<i32> {
    if want.is_empty() {
        vec![n as i32 - 1]
    } else {
        want.iter().map(|&i| i as i32).collect()
    }
}

/// Lists a micro-batch's inputs with their values, in a fixed order (new tensors when building, a kept graph's
/// tensors when reusing it). `rotation` is the indexer's Hadamard matrix, a constant of the engine.
pub fn batch_inputs<'c>(
    up: &mut Uploads<'c>,
    plan: UbatchPlan,
    want: &[usize],
    rotation: Rotations<'c>,
) -> Result<BatchInputs<'c>> {
    let n = plan.tokens.len();
    let p0 = plan.p0;
    let positions: Vec<i32> = (p0..p0 + n).map(|p| p as i32).collect();
    let n_kv = plan.raw.n_kv;
    let ring = plan.raw_ring;
    let raw_slots = plan.raw.write_slots.iter().map(|&s| s as i32).collect();
    let read = plan.raw.read_slots.as_deref();
    // Gathered layers with compressed rows read the raw rows, then their first `n_kv` compressed rows (none here
    // when each query reads the indexer's choice on its own).
    let attn_rows = |p: &CompPlan| {
        let n_comp = if p.top_k.is_some() { 0 } else { p.n_kv };
        read.map(|raw| kv_rows(raw, ring, n_comp))
    };
    let csa_rows = plan.csa.as_ref().map(attn_rows);
    let hca_rows = plan.hca.as_ref().map(attn_rows);
    let raw_read = read.filter(|_| plan.raw_layers).map(<[i32]>::to_vec);
    let raw_layers = plan.raw_layers;
    let chunks = plan
        .chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| chunk_inputs(up, i, c, ring, raw_layers))
        .collect::<Result<Vec<_>>>()?;
    let has_csa = plan.csa.is_some();
    Ok(BatchInputs {
        tokens: up.i32(format_args!("inp_tokens"), plan.tokens)?,
        pos: up.i32(format_args!("inp_pos"), positions)?,
        raw_slots: up.i32(format_args!("inp_raw_slots"), raw_slots)?,
        raw_mask: match chunks.is_empty() {
            true => Some(up.mask(format_args!("inp_raw_mask"), n_kv, plan.raw.mask)?),
            false => None,
        },
        raw_ring_mask: match plan.raw_ring_mask {
            Some(m) => Some(up.mask(format_args!("inp_raw_ring_mask"), ring, m)?),
            None => None,
        },
        raw_read: match raw_read {
            Some(rows) => Some(up.i32(format_args!("inp_raw_read"), rows)?),
            None => None,
        },
        csa: plan
            .csa
            .zip(csa_rows)
            .map(|(p, r)| comp_inputs(up, p, r, p0, n, ring, true))
            .transpose()?,
        hca: plan
            .hca
            .zip(hca_rows)
            .map(|(p, r)| comp_inputs(up, p, r, p0, n, ring, false))
            .transpose()?,
        chunks,
        out_ids: up.i32(format_args!("inp_out_ids"), out_ids(n, want))?,
        indexer_rotation: rotation.indexer.filter(|_| has_csa),
        attn_rotation: rotation.attention,
    })
}

/// The `kv` rows a layer with compressed rows gathers: the raw ring rows `raw`, then its first `n_comp` compressed
/// rows (which follow the `raw_ring` rows of the ring in `kv`).
fn kv_rows(raw: &[i32], raw_ring: usize, n_comp: usize) -> Vec<i32> {
    let comp = (0..n_comp).map(|j| (raw_ring + j) as i32);
    raw.iter().copied().chain(comp).collect()
}

/// The inputs of query chunk `i`: the rows each kind of layer reads, and the raw mask.
fn chunk_inputs<'c>(
    up: &mut Uploads<'c>,
    i: usize,
    c: QueryChunk,
    raw_ring: usize,
    raw_layers: bool,
) -> Result<ChunkInputs<'c>> {
    let rows = |n_comp: Option<usize>| n_comp.map(|m| kv_rows(&c.raw_rows, raw_ring, m));
    let (csa, hca) = (rows(c.csa_rows), rows(c.hca_rows));
    let n_raw = c.raw_rows.len();
    Ok(ChunkInputs {
        first: c.first,
        n: c.n,
        out_rows: up.i32(
            format_args!("inp_chunk{i}_out"),
            (c.first..c.first + c.n).map(|r| r as i32).collect(),
        )?,
        raw_mask: up.mask(format_args!("inp_chunk{i}_mask"), n_raw, c.raw_mask)?,
        raw_rows: match raw_layers {
            true => Some(up.i32(format_args!("inp_chunk{i}_raw"), c.raw_rows)?),
            false => None,
        },
        csa_rows: match csa {
            Some(r) => Some(up.i32(format_args!("inp_chunk{i}_r4"), r)?),
            None => None,
        },
        hca_rows: match hca {
            Some(r) => Some(up.i32(format_args!("inp_chunk{i}_r128"), r)?),
            None => None,
        },
    })
}

#[allow(clippy::too_many_arguments)]
fn comp_inputs<'c>(
    up: &mut Uploads<'c>,
    p: CompPlan,
    attn_rows: Option<Vec<i32>>,
    p0: usize,
    n: usize,
    raw_ring: usize,
    indexer: bool,
) -> Result<CompInputs<'c>> {
    let c = p.compress;
    let r = c.ratio;
    let blocks = if c.n_blocks == 0 {
        None
    } else {
        let rows = c.first_block..c.first_block + c.n_blocks;
        let write: Vec<i32> = rows.clone().map(|j| j as i32).collect();
        let write_kv: Vec<i32> = rows.map(|j| (raw_ring + j) as i32).collect();
        Some(BlockInputs {
            n_blocks: c.n_blocks,
            read_rows: up.i32(format_args!("inp_r{r}_read"), c.read_rows)?,
            block_pos: up.i32(format_args!("inp_r{r}_block_pos"), c.block_pos)?,
            write_rows: match indexer {
                true => Some(up.i32(format_args!("inp_r{r}_write"), write)?),
                false => None,
            },
            write_kv: up.i32(format_args!("inp_r{r}_write_kv"), write_kv)?,
        })
    };
    let mask = up.mask(format_args!("inp_r{r}_mask"), p.n_kv, p.mask)?;
    Ok(CompInputs {
        ratio: r,
        top_k: p.top_k,
        ape_pos: up.i32(
            format_args!("inp_r{r}_ape"),
            (p0..p0 + n).map(|t| (t % r) as i32).collect(),
        )?,
        ring_slots: up.i32(format_args!("inp_r{r}_ring_slots"), c.ring_slots)?,
        attn_rows: match attn_rows {
            Some(rows) => Some(up.i32(format_args!("inp_r{r}_attn_rows"), rows)?),
            None => None,
        },
        blocks,
        mask,
        indexer_step: p.indexer_step,
    })
}

/// What a micro-batch graph is built from: the model and the engine's constants (lifetime `'e`).
pub struct GraphParts<'a, 'e> {
    pub cfg: &'a Config,
    pub fused: bool,
    /// The buffer type of repacked routed experts that may use the grouped GEMM products (must match the key).
    pub grouped: Option<RepackType>,
    pub weights: &'a Weights<Tensor<'e>>,
    /// The indexer's Hadamard matrix (an engine constant), when the model has one.
    pub rotation: Rotations<'e>,
    /// Per layer, whether its device has the fused operators (see [`super::forward::Ops::for_layer`]); `None`: all
    /// as `fused` says.
    pub layer_fused: Option<Rc<Vec<bool>>>,
}

/// Graph nodes (and context tensors) a micro-batch graph may need.
pub fn graph_size(cfg: &Config, fused: bool, n_chunks: usize) -> usize {
    400 * (cfg.n_layer + 1)
        + 64 * cfg.sinkhorn_iters * cfg.n_layer * usize::from(!fused)
        + CHUNK_NODES * n_chunks * cfg.n_layer
}

/// Graph nodes (and context tensors) the indexer's query chunks add to one ratio-4 layer of a micro-batch shaped like
/// `plan` (see [`CompPlan::indexer_step`]).
pub fn indexer_nodes(plan: &UbatchPlan) -> usize {
    let n = plan.tokens.len();
    plan.csa.as_ref().map_or(0, |c| {
        INDEXER_CHUNK_NODES * n.div_ceil(c.indexer_step.max(1))
    })
}

/// Graph nodes (and context tensors) one query chunk adds to a layer's attention, with room to spare (reading each
/// query's chosen rows takes about 35).
pub const CHUNK_NODES: usize = 48;

/// Builds the graph of micro-batches shaped like `plan` (with `want` logits rows) over `cache`. Its
/// [`OwnedGraph::tensors`] are the logits `{n_vocab, n_out}`, then the inputs in [`batch_inputs`] order.
pub fn build_graph<'e>(
    parts: &GraphParts<'_, 'e>,
    cache: &Rc<KvCache>,
    plan: &UbatchPlan,
    want: &[usize],
) -> Result<OwnedGraph<'e>> {
    let size = graph_size(parts.cfg, parts.fused, plan.chunks.len())
        + indexer_nodes(plan) * parts.cfg.n_layer;
    let (cfg, fused, weights, rotation) = (parts.cfg, parts.fused, parts.weights, parts.rotation);
    let grouped = parts.grouped;
    let layer_fused = parts.layer_fused.clone();
    OwnedGraph::<'e>::build(size, size, cache.clone(), |ctx, cache: &KvCache, _scope| {
        let mut up = Uploads::new_tensors(ctx);
        let inp = batch_inputs(&mut up, plan.clone(), want, rotation)?;
        let o = Ops::new(ctx, cfg, fused)
            .with_grouped(grouped)
            .with_layer_fused(layer_fused.clone());
        let logits = forward(&o, cfg, weights, &cache.layers(), &inp)?;
        let mut graph = ctx.new_graph(size)?;
        graph.expand(logits)?;
        for e in o.effects() {
            graph.expand(e)?;
        }
        let mut tensors = vec![logits];
        tensors.extend(up.tensors());
        Ok::<_, GgmlError>((graph, tensors))
    })
}

/// Writes the inputs of `plan` into `graph` (built by [`build_graph`] for the same [`GraphKey`]); returns the
/// logits tensor. With `used_only`, inputs the graph does not reach (left without memory) are skipped: a graph
/// whose layers do not all use the fused operators may leave their F16 mask unused.
pub fn fill_inputs<'g>(
    graph: &'g OwnedGraph<'_>,
    plan: UbatchPlan,
    want: &[usize],
    rotation: Rotations<'g>,
    used_only: bool,
) -> Result<Tensor<'g>> {
    let tensors = graph.tensors();
    let Some((&logits, inputs)) = tensors.split_first() else {
        return Err(GgmlError::Op {
            op: "graph reuse",
            detail: "the kept graph has no logits".into(),
        });
    };
    let mut up = Uploads::kept(inputs);
    batch_inputs(&mut up, plan, want, rotation)?;
    match used_only {
        true => up.upload_used()?,
        false => up.upload()?,
    }
    Ok(logits)
}
