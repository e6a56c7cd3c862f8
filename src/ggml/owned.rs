//! `OwnedGraph`: a graph kept together with the context it was built in and with what else it reads, so that it can
//! be allocated once and computed again and again (decode builds one graph per shape, then only writes its inputs).

use std::any::Any;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::rc::Rc;

use super::context::Context;
use super::error::GgmlError;
use super::graph::Graph;
use super::tensor::Tensor;

/// Proof, inside [`OwnedGraph::build`], that the outside tensors of lifetime `'w` (weights) outlive the graph being
/// built (`'w: 'c`), so they can be combined with its tensors.
pub struct BuildScope<'c, 'w: 'c>(PhantomData<&'c &'w ()>);

/// A graph, handles to some of its tensors (its inputs and outputs), the context they live in, and a shared owner
/// of other tensors it reads (the cache). Tensors from outside that live for `'w` (weights) may be used too.
///
/// Handles are lent out for a borrow of the `OwnedGraph` only, so none outlives the context.
pub struct OwnedGraph<'w> {
    // Dropped in declaration order: the handles, then the context and the owner they point into.
    graph: Graph<'w>,
    tensors: Vec<Tensor<'w>>,
    ctx: OwnedContext,
    _dep: Rc<dyn Any>,
}

/// A boxed context freed on drop; held as a raw pointer because handles borrowing it live next to it.
struct OwnedContext(NonNull<Context<'static>>);

impl Drop for OwnedContext {
    fn drop(&mut self) {
        // SAFETY: the pointer came from Box::leak in OwnedGraph::build and is freed once; the handles pointing into
        // the context (the graph and tensors of the OwnedGraph) were dropped before this field.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

impl<'w> OwnedGraph<'w> {
    /// Makes a context with room for `n_tensors` tensors and a graph of `graph_size` nodes, and lets `build` create
    /// the graph in it from the context, the tensors `dep` owns, and tensors living for `'w`. `build` returns the
    /// graph and the tensors the caller will need afterwards (by position, see [`OwnedGraph::tensors`]).
    ///
    /// Name `'w` at the call (`OwnedGraph::<'w>::build`) when `build` uses outside tensors, and keep `'static` out
    /// of the closure's parameter types (wrap `D` if need be): otherwise the compiler loses the scope's `'w: 'c`.
    pub fn build<D, E, F>(
        n_tensors: usize,
        graph_size: usize,
        dep: Rc<D>,
        build: F,
    ) -> Result<OwnedGraph<'w>, E>
    where
        D: Any,
        E: From<GgmlError>,
        F: for<'c> FnOnce(
            &'c Context<'c>,
            &'c D,
            BuildScope<'c, 'w>,
        ) -> Result<(Graph<'c>, Vec<Tensor<'c>>), E>,
    {
        let ctx = Box::new(Context::with_capacity(n_tensors, graph_size)?);
        let ctx = OwnedContext(NonNull::from(Box::leak(ctx)));
        // SAFETY: the context is heap-allocated and freed only when the returned value drops its `ctx` field, after
        // the handles built here; `build` is generic over the lifetime it gets, so it cannot keep a handle anywhere
        // else, and the handles it returns are lent out only for borrows of the OwnedGraph.
        let ctx_ref: &'w Context<'w> = unsafe { &*ctx.0.as_ptr() };
        // SAFETY: as above: the OwnedGraph keeps `dep` (and so its target) alive until after the handles are gone.
        let dep_ref: &'w D = unsafe { &*Rc::as_ptr(&dep) };
        let (graph, tensors) = build(ctx_ref, dep_ref, BuildScope(PhantomData))?;
        Ok(OwnedGraph {
            graph,
            tensors,
            ctx,
            _dep: dep,
        })
    }

    /// The graph, to allocate and compute.
    pub fn graph(&self) -> &Graph<'_> {
        &self.graph
    }

    /// The tensors `build` returned, in its order.
    pub fn tensors(&self) -> &[Tensor<'_>] {
        &self.tensors
    }

    /// The context the graph was built in.
    pub fn context(&self) -> &Context<'static> {
        // SAFETY: the context lives as long as `self` (see build).
        unsafe { self.ctx.0.as_ref() }
    }
}

#[cfg(test)]
mod tests {
    use gguf::GgmlType;

    use super::*;
    use crate::ggml::{CpuBackend, GraphAllocator};

    /// A "cache": a context whose tensors graphs read and write.
    struct Cache(Context<'static>);

    /// `cache[0] += x * w`, with `x` the kept graph's one input.
    fn accumulate<'w>(w: Tensor<'w>, cache: Rc<Cache>) -> OwnedGraph<'w> {
        // The outside lifetime is named (`OwnedGraph::<'w>`): left to inference, it cannot be tied to the scope.
        OwnedGraph::<'w>::build(8, 16, cache, |ctx, cache: &Cache, _| {
            let c = cache.0.tensors()[0];
            let x = ctx.new_tensor_1d(GgmlType::F32, 4)?;
            let y = ctx.add(ctx.mul(x, w)?, c)?;
            let write = ctx.cpy(y, c)?;
            let mut graph = ctx.new_graph(16)?;
            graph.expand(write)?;
            Ok::<_, GgmlError>((graph, vec![x]))
        })
        .unwrap()
    }

    /// A graph built once, allocated once and computed many times with new inputs gives what a fresh graph would,
    /// reading a tensor of an outside context (the "weights") and one owned through `dep` (the "cache").
    #[test]
    fn a_kept_graph_computes_again_with_new_inputs() {
        let backend = CpuBackend::new(2).unwrap();
        let weights = Context::with_capacity(1, 0).unwrap();
        let w = weights.new_tensor_1d(GgmlType::F32, 4).unwrap();
        weights.alloc_tensors(&backend).unwrap();
        w.set_f32(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        let cache = Rc::new(Cache(Context::with_capacity(1, 0).unwrap()));
        let c = cache.0.new_tensor_1d(GgmlType::F32, 4).unwrap();
        cache.0.alloc_tensors(&backend).unwrap();
        c.set_f32(&[0.0; 4]).unwrap();

        let mut alloc = GraphAllocator::new(&backend).unwrap();
        let g = accumulate(w, cache.clone());
        alloc.alloc(g.graph()).unwrap();
        let mut want = [0.0f32; 4];
        for step in 1..4 {
            let x: Vec<f32> = (0..4).map(|i| (i * step) as f32).collect();
            g.tensors()[0].set_f32(&x).unwrap();
            backend.compute(g.graph()).unwrap();
            for i in 0..4 {
                want[i] += x[i] * (i + 1) as f32;
            }
            assert_eq!(c.get_f32().unwrap(), want, "step {step}");
        }
        drop(cache);
        // The kept graph still owns the "cache" context.
        backend.compute(g.graph()).unwrap();
        assert!(g.context().mem_used().0 > 0);
    }
}
