//! Where each weight's bytes live: bound to the memory-mapped file, or copied into RAM (ggml's repack buffers for
//! the CPU's interleaved kernels, or a plain buffer in huge pages); and what is locked in RAM.

use std::collections::{HashMap, HashSet};

use anyhow::{Context as _, Result};
use gguf::{Model, ModelTensor};

use crate::experts::store::PagedExperts;
use crate::ggml::{Context, RegionId, RepackType, RepackWeight, RepackedStats, WeightOp};
use crate::model::sizes::expert_tensor_layer;
use crate::model::weights::Weights;
use crate::os::lock_memory;
use crate::plan::{ExpertPlacement, MemoryPlan};

/// The weights that are only ever the first operand of a matrix product, with that product: the ones a repacked
/// layout may hold (the ops that read each are in `crate::model`). Routed experts only when `experts`. Never:
/// the embedding (`get_rows`), norms, biases and other vectors, `attn_output_a` (reshaped to 3-D first), the hash
/// routing table.
pub fn product_weights(w: &Weights<usize>, n_used: usize, experts: bool) -> Vec<(usize, WeightOp)> {
    let mut v = vec![w.output, w.hc_head_fn];
    for l in &w.layers {
        v.extend([
            l.hc_attn_fn,
            l.hc_ffn_fn,
            l.q_a,
            l.q_b,
            l.kv,
            l.o_b,
            l.gate_inp,
        ]);
        v.extend([l.gate_shexp, l.up_shexp, l.down_shexp]);
        for c in l.compressor.iter().chain(l.indexer.iter().map(|i| &i.comp)) {
            v.extend([c.kv, c.gate]);
        }
        v.extend(l.indexer.iter().flat_map(|i| [i.q_b, i.proj]));
    }
    let mut out: Vec<_> = v.into_iter().map(|i| (i, WeightOp::MulMat)).collect();
    if experts {
        let op = WeightOp::MulMatId { n_used };
        for l in &w.layers {
            out.extend([l.gate_exps, l.up_exps, l.down_exps].map(|i| (i, op)));
        }
    }
    out
}

/// The bytes more than in the file that each weight of `products` takes in RAM where [`place_weights`] repacks it
/// (into the first of ggml's extra buffer types that takes its product, whose layout may be larger: AMX's), by
/// tensor name; only those that grow. What the memory planner adds to the weights that stay in RAM.
pub fn repack_growth(
    ctx: &Context<'_>,
    sources: &[&ModelTensor],
    products: &[(usize, WeightOp)],
) -> Result<HashMap<String, u64>> {
    let types = RepackType::all();
    let tensors = ctx.tensors();
    let mut growth = HashMap::new();
    for &(i, op) in products {
        let (Some(&tensor), Some(t)) = (tensors.get(i), sources.get(i)) else {
            continue;
        };
        if let Some(k) = RepackType::index_for(tensor, op)? {
            let extra = types[k].alloc_size(tensor).saturating_sub(t.info.n_bytes);
            if extra > 0 {
                growth.insert(t.info.name.clone(), extra);
            }
        }
    }
    Ok(growth)
}

/// Whether the routed experts may be copied into RAM: all resident and within the budget (a copy of experts the
/// plan pages, or leaves to the OS over budget, would not fit; the paged store reads its own from the file).
pub fn experts_fit(plan: &MemoryPlan) -> bool {
    let within = plan.budget.bytes.is_none_or(|b| plan.total_bytes() <= b);
    plan.placement == ExpertPlacement::Resident && within
}

/// What [`place_weights`] put in RAM: repacked (with the extra buffer types that took weights, in ggml's order), and
/// copied as they are.
#[derive(Clone, Debug, Default)]
pub struct Placed {
    pub repacked: RepackedStats,
    pub repack_types: Vec<String>,
    pub copied: RepackedStats,
}

/// Gives each of `ctx`'s tensors its bytes: those of `products` one of the CPU's extra buffer types takes (the first
/// in ggml's order, as llama.cpp chooses: AMX where the host has it, then CPU_REPACK's interleaved layouts) are
/// copied into a buffer of that type, the other non-routed ones of `products` into a plain buffer in huge pages
/// (decode streams them: about 10 % faster than from the map's 4 KiB pages on the Flash-width model), and the map
/// pages read for both are dropped from memory; the rest (the routed experts without a repacked layout, the
/// embedding, vectors) are bound to the map.
pub fn place_weights(
    model: &Model,
    ctx: &Context<'_>,
    regions: &[RegionId],
    sources: &[&ModelTensor],
    products: &[(usize, WeightOp)],
) -> Result<Placed> {
    let types = RepackType::all();
    let mut ops = vec![None; sources.len()];
    for &(i, op) in products {
        if let Some(slot) = ops.get_mut(i) {
            *slot = Some(op);
        }
    }
    // The weights each type takes, in the order of `types`.
    let mut repack: Vec<Vec<RepackWeight<'_, '_>>> = vec![Vec::new(); types.len()];
    let mut copy = Vec::new();
    for ((tensor, t), op) in ctx.tensors().into_iter().zip(sources).zip(ops) {
        if let Some(op) = op {
            let bytes = model.tensor_data(t);
            if let Some(k) = RepackType::index_for(tensor, op)? {
                repack[k].push(RepackWeight { tensor, bytes, op });
                continue;
            }
            // The routed experts are the bulk of the file, read a few at a time: they stay in the map.
            if expert_tensor_layer(&t.info.name).is_none() {
                copy.push(RepackWeight { tensor, bytes, op });
                continue;
            }
        }
        let shard = &model.shards()[t.shard];
        let offset = (shard.header().data_offset + t.info.offset) as usize;
        ctx.bind(tensor, regions[t.shard], offset)
            .context("cannot map the weights into ggml")?;
    }
    let mut placed = Placed::default();
    for (&ty, weights) in types.iter().zip(&repack) {
        if weights.is_empty() {
            continue;
        }
        ctx.repack(ty, weights, |i| model.release(weights[i].bytes))
            .with_context(|| {
                format!(
                    "cannot repack the weights into ggml's {} buffers for the CPU's matrix kernels (hint: \
                     --no-repack)",
                    ty.name()
                )
            })?;
        placed.repack_types.push(ty.name());
    }
    placed.repacked = ctx.repacked_all();
    ctx.copy_into_ram(&copy, |i| model.release(copy[i].bytes))
        .context("cannot copy the weights into RAM (hint: --no-repack)")?;
    for w in &copy {
        placed.copied.tensors += 1;
        placed.copied.bytes += w.bytes.len() as u64;
    }
    Ok(placed)
}

/// Locks in RAM what a run computes from: with `mlock` (resident), the weights (repacked or copied ones in their
/// buffers, the others' pages in the map; the whole file when none is in RAM); when `paged`, the non-routed
/// weights, the weight buffers and the expert cache. Returns the bytes locked and the first failure; None when there is
/// nothing to lock (resident without `mlock`).
pub fn lock_weights(
    model: &Model,
    weights_ctx: &Context<'_>,
    paged: Option<&PagedExperts>,
    mlock: bool,
) -> Option<(u64, Option<std::io::Error>)> {
    if paged.is_none() && !mlock {
        return None;
    }
    let mut locked = 0u64;
    let mut failed = None;
    // Weights repacked or copied into RAM are locked there: their pages in the map are no longer read.
    let in_ram: HashSet<String> = weights_ctx
        .tensors()
        .into_iter()
        .filter(|&t| weights_ctx.is_in_ram(t))
        .map(|t| t.name())
        .collect();
    if !in_ram.is_empty() {
        match weights_ctx.lock_owned() {
            Ok(bytes) => locked += bytes,
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    let mut lock = |bytes: &[u8]| match lock_memory(bytes) {
        Ok(()) => locked += bytes.len() as u64,
        Err(e) => {
            failed.get_or_insert(e);
        }
    };
    // The mapped bytes of the weights computed from the map (paged: the non-routed ones).
    let mut lock_mapped = |routed: bool| {
        for t in model.tensors() {
            let name = &t.info.name;
            if !in_ram.contains(name) && (routed || expert_tensor_layer(name).is_none()) {
                lock(model.tensor_data(t));
            }
        }
    };
    match paged {
        None if in_ram.is_empty() => model.shards().iter().for_each(|s| lock(s.bytes())),
        None => lock_mapped(true),
        Some(paged) => {
            lock_mapped(false);
            match paged.lock() {
                Ok(()) => locked += paged.pool_bytes() as u64,
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
    }
    Some((locked, failed))
}
