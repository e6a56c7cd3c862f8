//! One micro-batch as one graph: on the CPU backend in the runner's compute buffer, or through ggml's scheduler
//! over the engine's devices and the CPU (each layer's nodes on the device of its weights and cache).

use std::rc::Rc;

use anyhow::Result;

use super::graphs::{kept_graph, kept_scheduled, schedule_report};
use super::{append_logits, Runner};
use crate::cache::{KvCache, UbatchPlan};
use crate::model::moe::groups_rows;
use crate::model::step::{build_graph, fill_inputs, GraphKey, GraphParts};

impl Runner<'_> {
    /// Runs a micro-batch whose routed experts are all resident (in the map, in RAM or on devices).
    pub(super) fn run_resident(
        &mut self,
        cache: &Rc<KvCache>,
        plan: UbatchPlan,
        want: &[usize],
        grouped: bool,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let engine = self.engine;
        let cfg = &engine.cfg;
        let fused = engine.opts.fused_ops;
        let n = plan.tokens.len();
        {
            // Every token uses `n_expert_used` resident experts per layer.
            let mut stats = engine.stats.lock().unwrap_or_else(|p| p.into_inner());
            stats.record_step(n as u64);
            for _ in 0..cfg.n_layer {
                stats.record_resident((n * cfg.n_expert_used) as u64);
            }
        }
        // Only experts repacked in the CPU's layout (so on the CPU) take the grouped products.
        let grouped = engine.grouped.filter(|_| grouped);
        if grouped.is_some() && groups_rows(n, cfg.n_expert_used, cfg.n_expert) {
            self.stats.grouped += 1;
        }
        let key = GraphKey::of(&plan, want.len(), grouped.is_some());
        let scheduled = self.sched.is_some();
        let layer_fused = scheduled.then(|| self.layer_fused.clone());
        let build = || {
            let weights = engine.weight_tensors();
            let parts = GraphParts {
                cfg,
                fused,
                grouped,
                weights: &weights,
                rotation: engine.rotations(),
                layer_fused,
            };
            build_graph(&parts, cache, &plan, want)
        };
        let Some(sched_graphs) = self.sched.as_mut() else {
            let mut spare = None;
            let graph = kept_graph(
                &mut self.graphs,
                &mut self.alloc,
                &mut self.stats,
                key,
                &mut spare,
                build,
            )?;
            // Inputs the graph does not reach have no memory; they are skipped.
            let logits = fill_inputs(graph, plan, want, engine.rotations(), true)?;
            engine.backend.compute(graph.graph())?;
            return append_logits(logits, want, out);
        };
        let log = self.log_schedule && !self.logged;
        let mut printed = false;
        let (g, sched) = kept_scheduled(
            sched_graphs,
            &mut self.stats,
            key,
            build,
            |size| engine.scheduler(size),
            |sched, g| {
                if log {
                    printed = true;
                    eprint!("{}", schedule_report(sched, g));
                }
            },
        )?;
        let logits = fill_inputs(g, plan, want, engine.rotations(), true)?;
        sched.compute(g.graph())?;
        self.logged |= printed;
        append_logits(logits, want, out)
    }
}
