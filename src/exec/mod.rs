//! Execution: how a session's micro-batches run over an engine's weights. `crate::model` builds the graphs (pure
//! builders); this module keeps them for reuse, allocates and computes them, on the CPU backend or through ggml's
//! scheduler when devices take part, and drives the paged expert store's chain of stage graphs.
//!
//! * [`graphs`]: the kept graphs ([`GraphCache`]), with their schedulers under the scheduler, and `--verbose`'s
//!   schedule report.
//! * `resident`: one graph per micro-batch, on the CPU or through the scheduler.
//! * `paged`: per layer a stage graph up to the router, the experts over the store's slots (read on demand), the
//!   head.

pub mod graphs;
mod paged;
mod resident;

use std::rc::Rc;

use anyhow::{Context as _, Result};

pub use graphs::{GraphCache, GraphStats};

use crate::cache::KvCache;
use crate::engine::Engine;
use crate::ggml::{GraphAllocator, OwnedGraph, Scheduler, Tensor};
use crate::model::step::GraphKey;
use graphs::SchedGraphs;
use paged::PagedRun;

/// Micro-batch graphs a session keeps for reuse: decode cycles through up to three shapes (a ratio-4 row, a
/// ratio-128 row, or none completes), plus the last prompt's.
pub const KEPT_GRAPHS: usize = 4;

/// What runs a session's micro-batches: its compute buffer and kept graphs (with their schedulers when devices
/// take part), and the paged store's stage state when the engine pages experts.
pub(crate) struct Runner<'e> {
    engine: &'e Engine,
    /// The compute buffer, shared by every CPU-only graph.
    alloc: GraphAllocator,
    /// Graphs of recent micro-batch shapes, allocated in `alloc`'s buffer, reused while the shape repeats.
    graphs: GraphCache<'e>,
    /// With devices: the graphs of recent shapes, each with the scheduler that allocated it.
    sched: Option<SchedGraphs<'e, GraphKey>>,
    /// Print the first scheduled graph's schedule (`--verbose`), and whether it was.
    log_schedule: bool,
    logged: bool,
    /// The paged store's state and stage graphs, when the engine pages experts.
    paged: Option<PagedRun<'e>>,
    /// Per layer, whether it is built with the fused operators (the engine's, shared by every scheduled build).
    layer_fused: Rc<Vec<bool>>,
    pub stats: GraphStats,
}

impl<'e> Runner<'e> {
    /// A runner for sessions of `engine` with micro-batches of up to `n_ubatch` tokens, keeping `kept` graphs.
    pub fn new(
        engine: &'e Engine,
        n_ubatch: usize,
        kept: usize,
        log_schedule: bool,
    ) -> Result<Runner<'e>> {
        let alloc =
            GraphAllocator::new(&engine.backend).context("cannot create the compute buffer")?;
        let paged = match engine.staged() {
            false => None,
            true => Some(PagedRun::new(engine, n_ubatch)?),
        };
        let sched = match engine.devices.is_empty() {
            true => None,
            false => Some(GraphCache::new(kept)),
        };
        Ok(Runner {
            engine,
            alloc,
            graphs: GraphCache::new(kept),
            sched,
            log_schedule,
            logged: false,
            paged,
            layer_fused: Rc::new(engine.layer_fused.clone()),
            stats: GraphStats::default(),
        })
    }

    /// How many graphs are kept for reuse (0: every micro-batch builds its own).
    pub fn kept(&self) -> usize {
        self.graphs.capacity()
    }

    pub fn set_kept(&mut self, kept: usize) {
        self.graphs.set_capacity(kept);
        if let Some(s) = &mut self.sched {
            s.set_capacity(kept);
        }
    }

    /// Bytes of the compute buffers the micro-batches so far needed: the CPU graphs' buffer and, with devices, the
    /// buffers of the last scheduled graph's scheduler.
    pub fn compute_bytes(&self) -> usize {
        let sched = self.last_scheduled().map_or(0, |(_, s)| {
            s.buffer_sizes().iter().map(|(_, b)| b).sum::<usize>()
        });
        self.alloc.buffer_size() + sched
    }

    /// The last scheduled graph and its scheduler (`None` on the CPU-only path, or before the first micro-batch).
    pub fn last_scheduled(&self) -> Option<(&OwnedGraph<'e>, &Scheduler<'e>)> {
        self.sched.as_ref()?.last_used()
    }

    /// Runs one micro-batch planned as `plan` over `cache`; appends the logits of the positions in `want` (indices
    /// within the micro-batch) to `out`. `grouped`: the session lets repacked experts use the grouped products.
    pub fn run(
        &mut self,
        cache: &Rc<KvCache>,
        plan: crate::cache::UbatchPlan,
        want: &[usize],
        grouped: bool,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if self.paged.is_some() && !self.engine.one_graph_for(plan.tokens.len()) {
            return self.run_paged(cache, plan, want, out);
        }
        self.run_resident(cache, plan, want, grouped, out)
    }
}

/// Appends the computed `logits` to `out` when positions were wanted.
fn append_logits(logits: Tensor<'_>, want: &[usize], out: &mut Vec<f32>) -> Result<()> {
    if !want.is_empty() {
        let start = out.len();
        out.resize(start + logits.n_elements() as usize, 0.0);
        logits.read_f32(&mut out[start..])?;
    }
    Ok(())
}
