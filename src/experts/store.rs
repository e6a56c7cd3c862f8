//! The paged expert store (DESIGN.md section 4, "Experts"): the routed experts of the layers the plan pages live in
//! a pool of slots filled on demand with large `pread`s, with ggml tensors over the slots per layer, the reader and
//! the slot policy. How a micro-batch runs over it is `crate::exec`'s; the stage graphs are `crate::model::paged`'s.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context as _, Result};
use gguf::Model;

use crate::experts::io::{direct_room, DIRECT_ALIGN};
use crate::experts::{
    ExpertReader, Load, PolicyConfig, ReadJob, ReadOptions, SlotBuffers, SlotPolicy,
};
use crate::ggml::{Context, SlotPool, Tensor};
use crate::model::config::Config;
use crate::model::weights::{Routing, Weights};

/// The expert cache of an engine: the slot pool, tensors over it per layer, the reader and the policy.
pub struct PagedExperts {
    pool: Arc<SlotPool>,
    /// Per layer: gate, up and down tensors `{n_in, n_out, n_slots}` over the pool.
    slot_ctx: Context<'static>,
    pub(crate) reader: ExpertReader,
    /// Bytes of gate, up and down in a slot (each part starts where the previous one's room ends).
    part_bytes: [u64; 3],
    /// Per layer: where each part's slab starts within its room (its offset within a page in the file, so that it
    /// can be read with `O_DIRECT`; 0 when the slabs are not whole pages).
    leads: Vec<[usize; 3]>,
    /// Per hash-routed paged layer: the experts of every token id (`n_expert_used` per token), for certain
    /// prefetches.
    pub(crate) hash_experts: Vec<Option<Vec<i32>>>,
    pub(crate) policy: Mutex<SlotPolicy>,
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
            policy: Mutex::new(policy),
        })
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
    pub(crate) unsafe fn jobs(&self, loads: &[Load]) -> Result<Vec<ReadJob<'_>>> {
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
