//! The device expert cache (`--gpu-experts`): slots in a device's memory holding the routed experts of the CPU's
//! layers that the policy expects to be used most. A layer's selected experts found there are computed on the
//! device; the others on the CPU from RAM (or through the paged store). After each layer the experts it used that
//! are worth a slot more than what holds one are uploaded from the model's map ([`crate::experts::SlotPolicy::admit`]
//! decides). Experts known or guessed before their layer (hash-routed layers' from the token ids, the next layer's
//! from its router run on this layer's input) go up ahead of it when the same rule would take them after it
//! ([`crate::experts::SlotPolicy::admit_ahead`]), so the layer already finds them on the device. The stage graphs
//! that use the slots are `crate::model::paged`'s, run by `crate::exec`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _, Result};
use gguf::Model;

use crate::experts::{ExpertKey, Load, PolicyConfig, SlotId, SlotPolicy};
use crate::ggml::{Context, Device, DeviceBackend, PinnedHost, SlotPart, Tensor};
use crate::model::config::Config;
use crate::model::weights::{Routing, Weights};

/// Alignment of each part's room in a slot (a multiple of every backend's tensor alignment).
const PART_ALIGN: usize = 256;

/// `--gpu-experts`: how many slots the device cache has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuExpertsArg {
    /// What the device has left after the non-routed weights, the cache and the compute buffers.
    Auto,
    /// This many experts (0: no cache).
    Slots(u64),
    /// As many experts as fit this many bytes.
    Bytes(u64),
}

/// Where one layer's experts come from and go: the model's tensor of each part (gate, up, down), the bytes of one
/// expert in it, and the slot tensors over the device pool.
struct CachedLayer {
    sources: [usize; 3],
    expert_bytes: [usize; 3],
    tensors: [usize; 3],
}

/// The device instance the cache's uploads are queued on (on CUDA its own stream, so copies run beside the
/// scheduler's computations), the slots whose copies may still be running, and the host memory they go through.
struct Uploads {
    backend: DeviceBackend,
    in_flight: BTreeSet<SlotId>,
    staging: Option<Staging>,
}

impl Uploads {
    /// Waits for every queued copy; none is in flight after.
    fn finish(&mut self) {
        self.backend.synchronize();
        self.in_flight.clear();
    }
}

/// Experts' worth of room in the default staging memory (see [`Staging`]).
pub const STAGING_EXPERTS: usize = 8;

/// `--gpu-experts` uploads' staging: an expert's bytes are copied from the map into host memory of the device's own
/// host buffer type (page-locked on CUDA and CANN), and from there to the device by DMA while this thread goes on
/// (from the map's pageable pages CUDA would stage them itself, synchronously). Taken in turn as a ring.
struct Staging {
    memory: StagingMemory,
    ring: StagingRing,
}

enum StagingMemory {
    Pinned(PinnedHost),
    /// Ordinary RAM, for devices without a host buffer type when asked for (tests run the path over RPC).
    Plain(Vec<u8>),
}

/// The staging memory [`DeviceExperts::new`] asks for: `len` bytes of the device's host buffer type, or of ordinary
/// RAM when `asked` (a size was given) and the device has none. By default, page-locked memory the system refuses
/// means no staging (uploads read the map's pages, as without a host buffer type).
fn staging_memory(device: Device, len: usize, asked: bool) -> Result<Option<StagingMemory>> {
    if len == 0 {
        return Ok(None);
    }
    let pinned = match device.pinned_host(len) {
        Err(_) if !asked => return Ok(None),
        r => r.with_context(|| {
            format!(
                "cannot allocate {} of host memory to stage uploads to {}",
                crate::units::format_bytes(len as u64),
                device.name()
            )
        })?,
    };
    Ok(match pinned {
        Some(p) => Some(StagingMemory::Pinned(p)),
        None if asked => Some(StagingMemory::Plain(vec![0; len])),
        None => None,
    })
}

impl StagingMemory {
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            StagingMemory::Pinned(p) => p.bytes_mut(),
            StagingMemory::Plain(v) => v,
        }
    }
}

/// Offsets of the staging ring: each upload takes the next bytes; one that would pass the end starts the ring over
/// once every copy reading it is done, so bytes are never rewritten while a copy may read them.
#[derive(Debug)]
pub(crate) struct StagingRing {
    len: usize,
    cursor: usize,
    /// Times the ring started over (and waited for the copies in flight).
    pub(crate) waits: u64,
}

/// Alignment of each upload's bytes in the staging memory.
const STAGING_ALIGN: usize = 64;

impl StagingRing {
    pub(crate) fn new(len: usize) -> StagingRing {
        StagingRing {
            len,
            cursor: 0,
            waits: 0,
        }
    }

    /// The offset of the next `n` bytes and whether the copies in flight must finish before they are written;
    /// `None` when `n` is more than the ring holds.
    pub(crate) fn reserve(&mut self, n: usize) -> Option<(usize, bool)> {
        if n > self.len {
            return None;
        }
        let wait = self.cursor + n > self.len;
        if wait {
            self.cursor = 0;
            self.waits += 1;
        }
        let at = self.cursor;
        self.cursor = (at + n).next_multiple_of(STAGING_ALIGN).min(self.len);
        Some((at, wait))
    }
}

/// A device's cache of routed experts.
pub struct DeviceExperts {
    device: Device,
    ctx: Context<'static>,
    uploads: Mutex<Uploads>,
    model: Arc<Model>,
    /// Per layer: its cached parts, `None` for layers whose experts the cache does not hold.
    layers: Vec<Option<CachedLayer>>,
    stride: usize,
    n_slots: usize,
    /// Per layer, for the cached hash-routed layers: the experts of each token id (`tid2eid`, `k` per token).
    hash_experts: Vec<Option<Vec<i32>>>,
    pub(crate) policy: Mutex<SlotPolicy>,
}

impl DeviceExperts {
    /// The bytes one slot takes for the routed experts of the layers `cached` marks: each part's room is the
    /// largest of those layers' (aligned).
    pub fn slot_bytes(
        model: &Model,
        weights: &Weights<Tensor<'_>>,
        cached: &[bool],
    ) -> Result<usize> {
        Ok(cached_parts(model, weights, cached)?.1.iter().sum())
    }

    /// A cache of `n_slots` experts on `device` for the layers `cached` marks (`weights`: the engine's tensors, by
    /// which the model's expert tensors are found). `staging`: bytes of host memory uploads go through (see
    /// [`Staging`]); `None`: [`STAGING_EXPERTS`] experts' worth where the device has a host buffer type, else none;
    /// `Some(0)`: none; `Some(n)`: `n` bytes, of ordinary RAM where the device has no host buffer type.
    pub fn new(
        model: &Arc<Model>,
        cfg: &Config,
        weights: &Weights<Tensor<'_>>,
        cached: &[bool],
        device: Device,
        n_slots: usize,
        staging: Option<usize>,
    ) -> Result<DeviceExperts> {
        if n_slots == 0 {
            bail!("the device expert cache needs at least one slot");
        }
        let (found, room) = cached_parts(model, weights, cached)?;
        let offsets = [0, room[0], room[0] + room[1]];
        let stride: usize = room.iter().sum();
        let mut specs = Vec::new();
        for (il, layer) in found.iter().enumerate() {
            let Some(layer) = layer else { continue };
            for (p, &(_, _, t)) in layer.iter().enumerate() {
                let ne = t.ne();
                specs.push(SlotPart {
                    ty: t.ty().ok_or_else(|| {
                        anyhow!("layer {il}'s experts have a type ggml cannot name")
                    })?,
                    ne0: ne[0],
                    ne1: ne[1],
                    offset: offsets[p],
                    name: format!("device_slots.{il}.{}", crate::experts::io::PARTS[p]),
                });
            }
        }
        let ctx = Context::with_capacity(specs.len() + 1, 0)?;
        ctx.device_slot_tensors(device, n_slots, stride, &specs)
            .with_context(|| {
                format!(
                    "cannot allocate a cache of {n_slots} experts ({}) on {}",
                    crate::units::format_bytes((n_slots * stride) as u64),
                    device.name()
                )
            })?;
        let mut next = 0;
        let layers = found
            .into_iter()
            .map(|layer| {
                layer.map(|l| {
                    let tensors = [next, next + 1, next + 2];
                    next += 3;
                    CachedLayer {
                        sources: l.map(|(i, _, _)| i),
                        expert_bytes: l.map(|(_, b, _)| b),
                        tensors,
                    }
                })
            })
            .collect();
        let policy = SlotPolicy::new(PolicyConfig::new(
            n_slots,
            cfg.n_layer as u32,
            cfg.n_expert as u32,
        ))?;
        let hash_experts = weights
            .layers
            .iter()
            .enumerate()
            .map(|(il, lw)| match lw.routing {
                Routing::Hash { tid2eid } if cached.get(il).copied().unwrap_or(false) => tid2eid
                    .get_i32()
                    .map(Some)
                    .with_context(|| format!("cannot read layer {il}'s expert table (tid2eid)")),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let backend = device
            .backend()
            .with_context(|| format!("cannot open a queue for uploads to {}", device.name()))?;
        let len = staging.unwrap_or(STAGING_EXPERTS * stride);
        let staging = staging_memory(device, len, staging.is_some())?.map(|memory| Staging {
            memory,
            ring: StagingRing::new(len),
        });
        Ok(DeviceExperts {
            device,
            ctx,
            uploads: Mutex::new(Uploads {
                backend,
                in_flight: BTreeSet::new(),
                staging,
            }),
            model: model.clone(),
            layers,
            stride,
            n_slots,
            hash_experts,
            policy: Mutex::new(policy),
        })
    }

    /// The experts hash-routed layer `il` will use for `tokens` (`k` per token), known before any layer runs (none
    /// when the cache does not hold the layer or it routes by score). A token id outside the table names nothing
    /// (the model's graph rejects it).
    pub(crate) fn certain_keys(&self, il: usize, tokens: &[i32], k: usize) -> Vec<ExpertKey> {
        let Some(Some(table)) = self.hash_experts.get(il) else {
            return Vec::new();
        };
        let mut keys = Vec::with_capacity(tokens.len() * k);
        for &t in tokens {
            let row = usize::try_from(t)
                .ok()
                .and_then(|t| table.get(t * k..(t + 1) * k));
            if let Some(row) = row {
                keys.extend(row.iter().map(|&e| ExpertKey::new(il as u32, e as u32)));
            }
        }
        keys
    }

    /// Whether layer `il` routes by token id (its experts come from [`Self::certain_keys`], not guesses).
    pub(crate) fn hash_routed(&self, il: usize) -> bool {
        self.hash_experts.get(il).is_some_and(|t| t.is_some())
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// Bytes of the device memory the cache takes.
    pub fn bytes(&self) -> usize {
        self.n_slots * self.stride
    }

    /// Times the uploads' staging memory started over (waiting for the copies in flight); `None` without staging.
    pub fn staging_waits(&self) -> Option<u64> {
        self.lock_uploads().staging.as_ref().map(|s| s.ring.waits)
    }

    /// Whether the cache holds layer `il`'s experts.
    pub fn caches_layer(&self, il: usize) -> bool {
        self.layers.get(il).is_some_and(|l| l.is_some())
    }

    /// Layer `il`'s slot tensors on the device: gate, up, down (`None` for a layer the cache does not hold).
    pub(crate) fn slot_tensors(&self, il: usize) -> Option<[Tensor<'_>; 3]> {
        let l = self.layers.get(il)?.as_ref()?;
        let all = self.ctx.tensors();
        Some(l.tensors.map(|i| all[i]))
    }

    /// Queues the copy of the expert `load` names from the model's map into its slot and returns the bytes it
    /// copies; the copy may still run after this returns. Nothing may compute with the slot's old contents when it
    /// is called (the caller has waited for the computations of its layer), and nothing reads its new contents
    /// before [`Self::wait_for_uploads`] names it.
    pub(crate) fn upload(&self, load: &Load) -> Result<u64> {
        let il = load.key.layer as usize;
        let e = load.key.expert as usize;
        let layer = self
            .layers
            .get(il)
            .and_then(|l| l.as_ref())
            .ok_or_else(|| anyhow!("the device expert cache does not hold layer {il}"))?;
        let tensors = self.slot_tensors(il).expect("a cached layer");
        let mut parts: [&[u8]; 3] = [&[]; 3];
        for (p, part) in parts.iter_mut().enumerate() {
            let src = &self.model.tensors()[layer.sources[p]];
            let data = self.model.tensor_data(src);
            let n = layer.expert_bytes[p];
            *part = data.get(e * n..(e + 1) * n).ok_or_else(|| {
                anyhow!(
                    "expert {e} is outside {} ({} bytes)",
                    src.info.name,
                    data.len()
                )
            })?;
        }
        let mut uploads = self.lock_uploads();
        // Through the staging memory when there is some: the expert's parts one after another in the ring.
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let reserved = uploads
            .staging
            .as_mut()
            .and_then(|st| st.ring.reserve(total));
        if let Some((_, true)) = reserved {
            // The ring starts over: the copies that read its bytes must be done.
            uploads.finish();
        }
        uploads.in_flight.insert(load.slot);
        let Uploads {
            backend, staging, ..
        } = &mut *uploads;
        let mut staged = staging.as_mut().zip(reserved.map(|(at, _)| at));
        let mut copied = 0u64;
        for (tensor, bytes) in tensors.into_iter().zip(parts) {
            let n = bytes.len();
            let data: &[u8] = match staged.as_mut() {
                Some((st, at)) => {
                    let room = &mut st.memory.bytes_mut()[*at..*at + n];
                    room.copy_from_slice(bytes);
                    *at += n;
                    room
                }
                None => bytes,
            };
            // SAFETY: `data` is in the model's map, which `self.model` keeps alive, unchanged, until the queue is
            // waited for (at the latest by `Drop`), or in the staging memory, whose ring writes these bytes again
            // only after waiting for the queue (and which `Drop` outlives the queue with); the slot is in
            // `in_flight`, so reads of it wait for the copy.
            unsafe {
                tensor.set_bytes_within_async(backend, load.slot as usize * self.stride, data)
            }
            .with_context(|| {
                format!(
                    "cannot upload expert {e} of layer {il} to {}",
                    self.device.name()
                )
            })?;
            copied += n as u64;
        }
        Ok(copied)
    }

    /// Waits for the uploads still running when any of `slots` is among their slots (a computation is about to
    /// read them).
    pub(crate) fn wait_for_uploads(&self, slots: &[i32]) {
        let mut uploads = self.lock_uploads();
        let pending = slots
            .iter()
            .any(|&s| SlotId::try_from(s).is_ok_and(|s| uploads.in_flight.contains(&s)));
        if pending {
            uploads.finish();
        }
    }

    fn lock_uploads(&self) -> std::sync::MutexGuard<'_, Uploads> {
        // A poisoned lock holds a backend and a set that are whole: every change is made under it in one step.
        self.uploads.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for DeviceExperts {
    fn drop(&mut self) {
        // Copies still running read the model's map, which goes with `self.model`, or the staging memory.
        self.lock_uploads().finish();
    }
}

/// One cached layer's parts (gate, up, down): the model's tensor index, the bytes of one expert, the engine's tensor.
type LayerParts<'t> = [(usize, usize, Tensor<'t>); 3];

/// Per layer, the parts of the layers `cached` marks (`None` for the others), and each part's room in a slot: the
/// largest of those layers' experts, aligned.
#[allow(clippy::type_complexity)]
fn cached_parts<'t>(
    model: &Model,
    weights: &Weights<Tensor<'t>>,
    cached: &[bool],
) -> Result<(Vec<Option<LayerParts<'t>>>, [usize; 3])> {
    let mut room = [0usize; 3];
    let mut found = Vec::with_capacity(weights.layers.len());
    for (il, lw) in weights.layers.iter().enumerate() {
        if !cached.get(il).copied().unwrap_or(false) {
            found.push(None);
            continue;
        }
        let parts = [lw.gate_exps, lw.up_exps, lw.down_exps];
        let mut layer = [(0usize, 0usize, parts[0]); 3];
        for (p, t) in parts.into_iter().enumerate() {
            let (index, bytes) = source(model, t)?;
            room[p] = room[p].max(bytes.next_multiple_of(PART_ALIGN));
            layer[p] = (index, bytes, t);
        }
        found.push(Some(layer));
    }
    Ok((found, room))
}

/// The model's tensor behind the engine's weight `t` (by name): its index and the bytes of one expert (its
/// matrices are the outermost dimension).
fn source(model: &Model, t: Tensor<'_>) -> Result<(usize, usize)> {
    let name = t.name();
    let index = model
        .tensors()
        .iter()
        .position(|m| m.info.name == name)
        .ok_or_else(|| anyhow!("the model has no tensor {name}"))?;
    let info = &model.tensors()[index].info;
    let n_expert = info.dims.get(2).copied().unwrap_or(0) as usize;
    if n_expert == 0 || info.n_bytes as usize % n_expert != 0 {
        bail!(
            "{name} is not a stack of experts ({:?}, {} bytes)",
            info.dims,
            info.n_bytes
        );
    }
    Ok((index, info.n_bytes as usize / n_expert))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staging_ring_rewrites_bytes_only_after_a_wait() {
        let mut ring = StagingRing::new(1000);
        // (bytes asked, offset given, wait first)
        let steps = [
            (300, 0, false),
            (300, 320, false), // offsets aligned to 64 bytes
            (300, 640, false),
            (300, 0, true), // 960 + 300 > 1000: start over
            (1000, 0, true),
            (1, 0, true),
            (999, 0, true),
        ];
        // Since the last wait, the bytes handed out never overlap.
        let mut live: Vec<(usize, usize)> = Vec::new();
        for (i, &(n, at, wait)) in steps.iter().enumerate() {
            let got = ring.reserve(n).unwrap();
            assert_eq!(got, (at, wait), "step {i}");
            if wait {
                live.clear();
            }
            assert!(
                live.iter().all(|&(a, b)| at + n <= a || b <= at),
                "step {i}: {at}..{} over {live:?}",
                at + n
            );
            live.push((at, at + n));
        }
        assert_eq!(ring.waits, 4);
        assert_eq!(ring.reserve(1001), None);
    }
}
