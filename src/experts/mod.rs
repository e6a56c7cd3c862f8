//! Where routed experts live when they do not all fit in memory: the slot cache policy (which (layer, expert)
//! sits in which slot, what to read, what to evict, waves for needed sets larger than the pool), positioned
//! reads of expert slabs from the model's files into slots, and the counters both stores report.
//!
//! How the paged store uses these parts, per layer of a micro-batch (DESIGN.md section 4, "Experts"):
//! 1. At each new token or micro-batch: [`SlotPolicy::begin_step`], then [`SlotPolicy::prefetch`] the
//!    hash-routed layers' experts (known from the token ids, weight 1).
//! 2. Attention and the router of layer L give the union of the micro-batch's experts; [`SlotPolicy::request`]
//!    returns waves of hits and misses with their slots.
//! 3. For each wave in order: read its misses with [`ExpertReader::read`] (jobs of [`SlotBuffers`] cut from the slot
//!    tensors; a background thread may read while the hits are computed), compute the wave's experts over the slot tensors with expert
//!    ids remapped to slots, accumulate. A wave's slots may be reused by the next wave only after it is computed.
//! 4. Optionally run layer L+1's router on layer L's input and prefetch its guesses (weight below 1).
//! 5. Record plans, reads and waits in [`ExpertStats`]; print [`StatsSnapshot`] in `bench` and `/stats`.
//!
//! The number of slots comes from the planner (`crate::plan`), which refuses pools smaller than one token's
//! experts per layer.

pub mod device;
pub mod io;
pub mod policy;
pub mod stats;
pub mod store;

pub use io::{
    direct_room, ExpertIoError, ExpertLayout, ExpertReader, LayerSlabs, ReadJob, ReadOptions,
    ReadReport, SlabRange, SlabTensor, SlotBuffers, DIRECT_ALIGN,
};
pub use policy::{
    ExpertKey, Hit, Load, PolicyConfig, PolicyError, PrefetchPlan, RequestPlan, SlotId, SlotPolicy,
    Wave, DEFAULT_HALF_LIFE_STEPS,
};
pub use stats::{ExpertStats, PerToken, StatsSnapshot};
