//! `Graph`: a ggml compute graph built by expanding result tensors, with its capacity checked before ggml would
//! abort.

use std::cell::Cell;
use std::collections::HashSet;
use std::marker::PhantomData;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::context::{Context, KeepAlive};
use super::error::{GgmlError, Result};
use super::tensor::Tensor;

/// Default graph size (ggml's `GGML_DEFAULT_GRAPH_SIZE`).
pub const DEFAULT_GRAPH_SIZE: usize = 2048;

/// A forward graph in a context's pool; `'c` borrows every context its tensors live in.
pub struct Graph<'c> {
    ptr: NonNull<sys::ggml_cgraph>,
    size: usize,
    /// Every tensor ggml has visited (nodes and leafs), mirrored to check capacity and allocation before ggml does.
    visited: HashSet<*mut sys::ggml_tensor>,
    order: Vec<Tensor<'c>>,
    /// The context the graph was made in (where a [`super::GraphAllocator`] parks its keep-alive handle).
    home: &'c dyn Home,
    /// The backend (its address) that has checked every tensor (allocated, not read-only, supported) in
    /// [`super::CpuBackend::compute`]; cleared by anything that can change that (`expand`, allocation), so a graph
    /// computed again and again is checked once.
    verified: Cell<Option<usize>>,
    _ctx: PhantomData<&'c ()>,
}

/// What a graph needs from its home context, without naming the context's region lifetime.
pub(super) trait Home {
    fn owns_tensor(&self, t: Tensor<'_>) -> bool;
    fn keep(&self, owner: &KeepAlive);
}

impl Home for Context<'_> {
    fn owns_tensor(&self, t: Tensor<'_>) -> bool {
        self.owns(t)
    }

    fn keep(&self, owner: &KeepAlive) {
        Context::keep(self, owner)
    }
}

impl<'m> Context<'m> {
    /// A graph with room for `size` nodes and `size` leafs.
    pub fn new_graph<'c>(&'c self, size: usize) -> Result<Graph<'c>> {
        // SAFETY: pure size computation.
        let bytes = unsafe { sys::ggml_graph_overhead_custom(size, false) };
        self.reserve(0, bytes)?;
        // SAFETY: the pool has room for the graph object (checked), so ggml cannot abort; the graph lives in the
        // pool of this context, which the returned value borrows.
        let ptr = unsafe { sys::ggml_new_graph_custom(self.as_ptr(), size, false) };
        let ptr = NonNull::new(ptr).ok_or(GgmlError::Init { what: "ggml graph" })?;
        Ok(Graph {
            ptr,
            size,
            visited: HashSet::new(),
            order: Vec::new(),
            home: self,
            verified: Cell::new(None),
            _ctx: PhantomData,
        })
    }
}

impl<'c> Graph<'c> {
    pub(super) fn as_ptr(&self) -> *mut sys::ggml_cgraph {
        self.ptr.as_ptr()
    }

    /// Adds `t` and everything it depends on (`ggml_build_forward_expand`).
    pub fn expand(&mut self, t: Tensor<'c>) -> Result<()> {
        let new = self.unvisited_from(t);
        let needed = self.visited.len() + new.len();
        if needed > self.size {
            return Err(GgmlError::GraphFull {
                size: self.size,
                needed,
            });
        }
        // SAFETY: the graph and `t` (and its sources) are alive for 'c; there is room for every tensor ggml will
        // add (at most `size` nodes plus `size` leafs, and its hash set holds more than 2 * size).
        unsafe { sys::ggml_build_forward_expand(self.as_ptr(), t.as_ptr()) };
        self.verified.set(None);
        self.visited.extend(new.iter().map(|t| t.as_ptr()));
        self.order.extend(new);
        Ok(())
    }

    /// Tensors reachable from `t` through sources that the graph has not visited yet.
    fn unvisited_from(&self, t: Tensor<'c>) -> Vec<Tensor<'c>> {
        let mut seen = HashSet::new();
        let mut stack = vec![t];
        let mut out = Vec::new();
        while let Some(cur) = stack.pop() {
            if self.visited.contains(&cur.as_ptr()) || !seen.insert(cur.as_ptr()) {
                continue;
            }
            out.push(cur);
            stack.extend(sources(cur));
        }
        out
    }

    /// Number of computed nodes (`ggml_graph_n_nodes`).
    pub fn n_nodes(&self) -> usize {
        // SAFETY: a live graph.
        unsafe { sys::ggml_graph_n_nodes(self.as_ptr()) as usize }
    }

    /// The `i`-th computed node, in execution order.
    pub fn node(&self, i: usize) -> Option<Tensor<'c>> {
        if i >= self.n_nodes() {
            return None;
        }
        // SAFETY: `i` is in range, so ggml returns one of the graph's nodes, which live for 'c.
        unsafe { Tensor::from_raw(sys::ggml_graph_node(self.as_ptr(), i as i32)) }
    }

    /// How many computed nodes run each operator (by [`Tensor::op_name`]).
    pub fn op_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for t in (0..self.n_nodes()).filter_map(|i| self.node(i)) {
            *out.entry(t.op_name()).or_insert(0) += 1;
        }
        out
    }

    /// The graph's capacity.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The context the graph was made in.
    pub(super) fn home(&self) -> &'c dyn Home {
        self.home
    }

    /// The backend (its address) that checked this graph as it is now, if any.
    pub(super) fn verified_by(&self) -> Option<usize> {
        self.verified.get()
    }

    pub(super) fn set_verified_by(&self, backend: Option<usize>) {
        self.verified.set(backend);
    }

    /// Every tensor in the graph (nodes and leafs).
    pub(super) fn tensors(&self) -> impl Iterator<Item = Tensor<'c>> + '_ {
        self.order.iter().copied()
    }
}

/// The non-NULL sources of a tensor.
fn sources<'c>(t: Tensor<'c>) -> Vec<Tensor<'c>> {
    // SAFETY: `t` is alive; reading its `src` array by value.
    let src = unsafe { (*t.as_ptr()).src };
    src.iter()
        // SAFETY: a tensor's sources outlive it (results borrow their sources' contexts).
        .filter_map(|&p| unsafe { Tensor::from_raw(p) })
        .collect()
}
