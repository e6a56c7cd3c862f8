//! `GraphAllocator`: ggml's graph allocator (`ggml_gallocr`), which gives every not-yet-allocated tensor of a graph
//! memory in one reusable compute buffer, letting intermediates whose consumers have run share memory.
//!
//! Rules (see [`GraphAllocator::alloc`]):
//! - Tensors that already have data (weights bound to mapped regions, caches allocated in another context's
//!   buffer, views of those) are left alone.
//! - Every tensor `alloc` gives memory to must belong to the context the graph was made in; that context keeps the
//!   buffer alive, so no handle can outlive the memory it points to.
//! - Values are valid until the next `alloc` on the same allocator, which hands the same memory out again: write
//!   inputs after `alloc`, compute, then read outputs before the next `alloc`. Tensors read after compute that other
//!   nodes also consume must be marked with [`super::Tensor::set_output`] before `alloc` (final nodes are never
//!   reused). Leaf inputs always get their own memory; an input that is a graph node needs
//!   [`super::Tensor::set_input`].
//! - A tensor allocated by an earlier `alloc` cannot be put in a later graph of the same allocator (its memory is
//!   handed out again); `alloc` refuses such a graph.

use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

use super::backend::CpuBackend;
use super::context::KeepAlive;
use super::error::{GgmlError, Result};
use super::graph::Graph;
use super::tensor::Tensor;

/// An owned `ggml_gallocr`, freed (with its buffers) on drop.
struct Gallocr(NonNull<sys::ggml_gallocr>);

// SAFETY: a gallocr is plain heap state with no thread affinity. Shared owners (contexts holding a keep-alive
// handle) never call into it; only the `GraphAllocator` that made it does, through `&mut self`, and it is freed once
// by the last owner.
unsafe impl Send for Gallocr {}
// SAFETY: as above: shared handles give no access to the gallocr.
unsafe impl Sync for Gallocr {}

impl Gallocr {
    fn new(buft: sys::ggml_backend_buffer_type_t) -> Result<Gallocr> {
        // SAFETY: `buft` is a backend's default buffer type (static for the CPU backend); ggml_gallocr_new only
        // records it and its alignment (it asserts on out-of-memory only).
        let ptr = unsafe { sys::ggml_gallocr_new(buft) };
        NonNull::new(ptr).map(Gallocr).ok_or(GgmlError::Init {
            what: "graph allocator",
        })
    }

    fn as_ptr(&self) -> sys::ggml_gallocr_t {
        self.0.as_ptr()
    }

    /// Bytes of its buffer (0 before the first allocation).
    fn buffer_size(&self) -> usize {
        // SAFETY: a live gallocr made by ggml_gallocr_new, which has exactly one buffer (id 0).
        unsafe { sys::ggml_gallocr_get_buffer_size(self.as_ptr(), 0) }
    }
}

impl Drop for Gallocr {
    fn drop(&mut self) {
        // SAFETY: made by ggml_gallocr_new and freed once, when no tensor can reach its buffer any more (every
        // context whose tensors point into it holds an `Arc` of it).
        unsafe { sys::ggml_gallocr_free(self.as_ptr()) }
    }
}

/// A graph allocator on a backend's default buffer type, made once and reused for every graph: it keeps its
/// buffer and replaces it with a bigger one when a graph needs more. See the module docs for the rules.
pub struct GraphAllocator {
    buft: sys::ggml_backend_buffer_type_t,
    /// Allocates graphs; shared with the contexts whose tensors point into its buffer.
    current: Arc<Gallocr>,
    /// Only measures graphs (never allocates a buffer).
    measure: Gallocr,
    /// The buffer `current` handed out memory from, if any (to refuse tensors left over from an earlier `alloc`).
    current_buffer: Option<usize>,
}

// SAFETY: the buffer type is a static descriptor; the gallocrs are `Send` (see above).
unsafe impl Send for GraphAllocator {}

impl GraphAllocator {
    /// An allocator for graphs computed on `backend` (its default buffer type); no buffer is allocated yet.
    pub fn new(backend: &CpuBackend) -> Result<GraphAllocator> {
        // SAFETY: a live backend; returns its static default buffer type.
        let buft = unsafe { sys::ggml_backend_get_default_buffer_type(backend.as_ptr()) };
        Ok(GraphAllocator {
            buft,
            current: Arc::new(Gallocr::new(buft)?),
            measure: Gallocr::new(buft)?,
            current_buffer: None,
        })
    }

    /// Bytes of the current compute buffer (0 before the first `alloc`).
    pub fn buffer_size(&self) -> usize {
        self.current.buffer_size()
    }

    /// Gives memory to every tensor `graph` reaches that has none yet (intermediates share memory once their
    /// consumers have run), and points views at their sources. Tensors with data are left alone.
    ///
    /// Fails, before ggml runs, when a tensor that needs memory belongs to a context other than the graph's, or
    /// when the graph reaches a tensor allocated by an earlier `alloc` of this allocator. Values of tensors allocated
    /// by earlier calls are overwritten from now on (read outputs before calling this again).
    pub fn alloc(&mut self, graph: &Graph<'_>) -> Result<()> {
        // Tensors get data from here on: the backend checks the graph again before its next computation.
        graph.set_verified_by(None);
        let home = graph.home();
        let mut fresh: Vec<Tensor<'_>> = Vec::new();
        for t in graph.tensors() {
            let root = t.view_source().unwrap_or(t);
            if let Some(buf) = self.current_buffer {
                if root.buffer() as usize == buf {
                    return Err(GgmlError::Op {
                        op: "graph_alloc",
                        detail: format!(
                            "tensor '{}' was allocated by an earlier GraphAllocator::alloc whose memory is handed \
                             out again; create it anew for this graph",
                            root.label()
                        ),
                    });
                }
            }
            if root.is_allocated() || !root.buffer().is_null() {
                continue;
            }
            if !home.owns_tensor(root) {
                return Err(GgmlError::ForeignTensor {
                    op: "graph_alloc",
                    tensor: root.label(),
                });
            }
            if t.view_source().is_none() {
                fresh.push(t);
            }
        }

        let mut needed = 0usize;
        // SAFETY: both the measuring gallocr and the graph are alive; with no_alloc the call only plans offsets in
        // the gallocr's own tables (it neither allocates a buffer nor touches the graph's tensors) and writes one
        // size (the gallocr has one buffer). It aborts only on out-of-memory or an allocator bookkeeping overflow
        // (more than 256 free blocks), which graphs of this crate do not reach.
        unsafe {
            sys::ggml_gallocr_reserve_n_size(
                self.measure.as_ptr(),
                graph.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                &mut needed,
            )
        };
        if needed > self.current.buffer_size() {
            // Growing in place would free the buffer that earlier graphs' tensors may still point into; a fresh
            // gallocr allocates a new one, and the old one lives on while a context holds it.
            self.current = Arc::new(Gallocr::new(self.buft)?);
            self.current_buffer = None;
        }

        // SAFETY: the graph and every tensor it reaches are alive (borrowed by `graph`). The buffer is big enough for
        // the plan (measured above with the same algorithm), so ggml never frees a buffer another tensor points into;
        // it allocates one if `current` has none. Tensors with data are left alone; the rest are set to addresses
        // inside the buffer, which the graph's context keeps alive (below).
        let ok = unsafe { sys::ggml_gallocr_alloc_graph(self.current.as_ptr(), graph.as_ptr()) };
        if !ok {
            return Err(GgmlError::Alloc {
                what: format!("a compute buffer of {needed} bytes"),
            });
        }
        if !fresh.is_empty() {
            let keep: KeepAlive = self.current.clone();
            home.keep(&keep);
        }
        for t in &fresh {
            if !t.is_allocated() {
                return Err(GgmlError::Unallocated { tensor: t.label() });
            }
            self.current_buffer = Some(t.buffer() as usize);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use gguf::GgmlType;

    use super::*;
    use crate::ggml::Context;

    /// A chain of `n` element-wise steps on a `len`-vector: `x -> x*2 + 1 -> ... `, each step a new tensor.
    fn chain<'c>(ctx: &'c Context<'_>, x: Tensor<'c>, n: usize) -> Vec<Tensor<'c>> {
        let mut out = vec![];
        let mut cur = x;
        for _ in 0..n {
            cur = ctx.scale_bias(cur, 2.0, 1.0).unwrap();
            let s = ctx.sqrt(cur).unwrap();
            cur = ctx.mul(s, s).unwrap();
            out.push(cur);
        }
        out
    }

    #[test]
    fn graphs_reuse_the_buffer_and_intermediates_share_memory() {
        let backend = CpuBackend::new(2).unwrap();
        let mut galloc = GraphAllocator::new(&backend).unwrap();
        assert_eq!(galloc.buffer_size(), 0);
        let len = 1024i64;
        let steps = 16;
        let mut sizes = vec![];
        for round in 0..2 {
            let ctx = Context::with_capacity(4 * steps + 8, 256).unwrap();
            let x = ctx.new_tensor_1d(GgmlType::F32, len).unwrap();
            let nodes = chain(&ctx, x, steps);
            let mid = nodes[steps / 2];
            mid.set_output();
            let out = *nodes.last().unwrap();
            let mut g = ctx.new_graph(256).unwrap();
            g.expand(out).unwrap();
            galloc.alloc(&g).unwrap();
            assert_eq!(ctx.allocated_bytes(), 0, "no per-context buffer");
            let xs: Vec<f32> = (0..len)
                .map(|i| (i % 7) as f32 * 0.01 + round as f32)
                .collect();
            x.set_f32(&xs).unwrap();
            backend.compute(&g).unwrap();
            let f = |v: f32, n: usize| (0..n).fold(v, |acc, _| acc * 2.0 + 1.0);
            let got = out.get_f32().unwrap();
            let got_mid = mid.get_f32().unwrap();
            for i in [0usize, 5, 1023] {
                let want = f(xs[i], steps);
                assert!(
                    (got[i] - want).abs() <= want.abs() * 1e-5,
                    "{} vs {want}",
                    got[i]
                );
                let want_mid = f(xs[i], steps / 2 + 1);
                assert!((got_mid[i] - want_mid).abs() <= want_mid.abs() * 1e-5);
            }
            // 3 * steps intermediates of len floats each, plus the input.
            let sum = (3 * steps + 1) * len as usize * 4;
            assert!(
                galloc.buffer_size() < sum / 4,
                "buffer {} vs {sum} bytes of tensors",
                galloc.buffer_size()
            );
            sizes.push(galloc.buffer_size());
        }
        assert_eq!(sizes[0], sizes[1], "the same graph reuses the buffer");
    }

    #[test]
    fn a_bigger_graph_grows_while_earlier_contexts_keep_their_memory() {
        let backend = CpuBackend::new(1).unwrap();
        let mut galloc = GraphAllocator::new(&backend).unwrap();
        let small = Context::with_capacity(8, 16).unwrap();
        let a = small.new_tensor_1d(GgmlType::F32, 4).unwrap();
        let b = small.scale(a, 3.0).unwrap();
        let mut g1 = small.new_graph(16).unwrap();
        g1.expand(b).unwrap();
        galloc.alloc(&g1).unwrap();
        a.set_f32(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        backend.compute(&g1).unwrap();
        let first = galloc.buffer_size();

        // A second graph reaching a tensor of the first allocation is refused (its memory is reused).
        let reuse = Context::with_capacity(8, 16).unwrap();
        let c = reuse.scale(b, 2.0).unwrap();
        let mut g2 = reuse.new_graph(16).unwrap();
        g2.expand(c).unwrap();
        assert!(galloc.alloc(&g2).is_err());

        // A tensor of another context that needs memory is refused.
        let other = Context::with_capacity(2, 0).unwrap();
        let o = other.new_tensor_1d(GgmlType::F32, 4).unwrap();
        let host = Context::with_capacity(4, 16).unwrap();
        let d = host.scale(o, 2.0).unwrap();
        let mut g3 = host.new_graph(16).unwrap();
        g3.expand(d).unwrap();
        assert!(matches!(
            galloc.alloc(&g3),
            Err(GgmlError::ForeignTensor { .. })
        ));

        // A much bigger graph gets a new, bigger buffer; the first graph's values stay readable.
        let big = Context::with_capacity(8, 16).unwrap();
        let x = big.new_tensor_1d(GgmlType::F32, 1 << 16).unwrap();
        let y = big.scale(x, 0.5).unwrap();
        let mut g4 = big.new_graph(16).unwrap();
        g4.expand(y).unwrap();
        galloc.alloc(&g4).unwrap();
        assert!(galloc.buffer_size() > first);
        x.set_f32(&vec![4.0; 1 << 16]).unwrap();
        backend.compute(&g4).unwrap();
        assert_eq!(y.get_f32().unwrap()[100], 2.0);
        assert_eq!(b.get_f32().unwrap(), [3.0, 6.0, 9.0, 12.0]);
        drop(galloc);
        assert_eq!(
            b.get_f32().unwrap(),
            [3.0, 6.0, 9.0, 12.0],
            "the context keeps the buffer alive"
        );
    }

    #[test]
    fn set_rows_into_a_cache_of_another_context() {
        let backend = CpuBackend::new(1).unwrap();
        let mut galloc = GraphAllocator::new(&backend).unwrap();
        let cache_ctx = Context::with_capacity(1, 0).unwrap();
        let cache = cache_ctx.new_tensor_2d(GgmlType::F16, 4, 6).unwrap();
        cache_ctx.alloc_tensors(&backend).unwrap();
        cache.set_bytes(&[0u8; 4 * 6 * 2]).unwrap();
        for step in 0..2 {
            let ctx = Context::with_capacity(8, 32).unwrap();
            let src = ctx.new_tensor_2d(GgmlType::F32, 4, 2).unwrap();
            let rows = ctx.new_tensor_1d(GgmlType::I64, 2).unwrap();
            let written = ctx.set_rows(cache, src, rows).unwrap();
            let as_f32 = ctx.new_tensor_2d(GgmlType::F32, 4, 6).unwrap();
            let out = ctx.cpy(written, as_f32).unwrap();
            let mut g = ctx.new_graph(32).unwrap();
            g.expand(out).unwrap();
            galloc.alloc(&g).unwrap();
            assert!(
                written.data_ptr() == cache.data_ptr(),
                "a view of the cache"
            );
            let base = step as f32 * 10.0;
            src.set_f32(&(0..8).map(|i| base + i as f32).collect::<Vec<_>>())
                .unwrap();
            let ids: [i64; 2] = [step * 2 + 1, step * 2];
            rows.set_bytes(
                &ids.iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
            .unwrap();
            backend.compute(&g).unwrap();
            let got = out.get_f32().unwrap();
            let r = |k: usize| &got[4 * k..4 * k + 4];
            assert_eq!(
                r(step as usize * 2 + 1),
                [base, base + 1.0, base + 2.0, base + 3.0]
            );
            assert_eq!(
                r(step as usize * 2),
                [base + 4.0, base + 5.0, base + 6.0, base + 7.0]
            );
        }
        assert_eq!(
            cache.get_bytes().unwrap()[4 * 2 * 4..]
                .iter()
                .filter(|&&b| b != 0)
                .count(),
            0
        );

        // Writing rows into read-only mapped weights is refused at compute.
        let storage = vec![0u64; 64];
        // SAFETY (test): viewing a live u64 vector as its bytes.
        let bytes: &[u8] =
            unsafe { std::slice::from_raw_parts(storage.as_ptr().cast(), storage.len() * 8) };
        let start = (32 - bytes.as_ptr() as usize % 32) % 32;
        let weights = Context::with_capacity(1, 0).unwrap();
        let region = weights.map_region(&bytes[start..start + 256]).unwrap();
        let w = weights.new_tensor_2d(GgmlType::F32, 4, 2).unwrap();
        weights.bind(w, region, 0).unwrap();
        let ctx = Context::with_capacity(4, 16).unwrap();
        let src = ctx.new_tensor_2d(GgmlType::F32, 4, 1).unwrap();
        let rows = ctx.new_tensor_1d(GgmlType::I32, 1).unwrap();
        let written = ctx.set_rows(w, src, rows).unwrap();
        let mut g = ctx.new_graph(16).unwrap();
        g.expand(written).unwrap();
        galloc.alloc(&g).unwrap();
        src.set_f32(&[1.0; 4]).unwrap();
        rows.set_i32(&[0]).unwrap();
        assert!(matches!(
            backend.compute(&g),
            Err(GgmlError::ReadOnly { .. })
        ));
        assert_eq!(w.get_f32().unwrap(), [0.0; 8]);
    }
}
