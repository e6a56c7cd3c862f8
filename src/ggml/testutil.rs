//! Test helper: compute a few outputs of a context on the CPU backend.

use super::{Context, CpuBackend, Tensor};

/// Allocates `ctx` in host memory, lets `fill` set the inputs, computes `outputs`, returns them as f32.
pub(super) fn run_f32<'c>(
    ctx: &'c Context<'_>,
    outputs: &[Tensor<'c>],
    fill: impl FnOnce(),
) -> Vec<Vec<f32>> {
    let mut graph = ctx.new_graph(64).unwrap();
    for &t in outputs {
        graph.expand(t).unwrap();
    }
    ctx.alloc_tensors_host().unwrap();
    fill();
    CpuBackend::new(2).unwrap().compute(&graph).unwrap();
    outputs.iter().map(|t| t.get_f32().unwrap()).collect()
}
