//! Backends and buffers: the CPU backend (threads, graph compute with a typed error) and the owned buffer handle
//! contexts keep their tensors' data in.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::error::{GgmlError, Result};
use super::graph::Graph;
use super::grouped::is_grouped_op;
use super::region::is_read_only;
use super::types::cstr_lossy;

/// A backend buffer freed on drop.
pub(super) struct OwnedBuffer(NonNull<sys::ggml_backend_buffer>);

// SAFETY: a backend buffer is a plain allocation (or a wrapper over borrowed bytes) with no thread affinity.
unsafe impl Send for OwnedBuffer {}

impl OwnedBuffer {
    /// Takes ownership of `raw` (NULL gives `None`).
    pub(super) fn new(raw: sys::ggml_backend_buffer_t) -> Option<OwnedBuffer> {
        NonNull::new(raw).map(OwnedBuffer)
    }

    pub(super) fn as_ptr(&self) -> sys::ggml_backend_buffer_t {
        self.0.as_ptr()
    }

    /// Bytes in the buffer.
    pub(super) fn size(&self) -> usize {
        // SAFETY: the buffer is alive for &self.
        unsafe { sys::ggml_backend_buffer_get_size(self.as_ptr()) }
    }
}

impl Drop for OwnedBuffer {
    fn drop(&mut self) {
        // SAFETY: the buffer was returned by a ggml allocator and is freed exactly once, after every tensor using
        // it is unreachable (its context is being dropped).
        unsafe { sys::ggml_backend_buffer_free(self.as_ptr()) }
    }
}

/// ggml's CPU backend: computes graphs with a fixed number of threads, kept in a pool between computations.
pub struct CpuBackend {
    ptr: NonNull<sys::ggml_backend>,
    n_threads: usize,
    /// The worker threads (none for one thread: the calling thread computes). Without a pool, ggml starts and
    /// joins `n_threads - 1` threads on every graph computation.
    pool: Option<ThreadPool>,
}

// SAFETY: a CPU backend instance has no thread affinity; `&self` compute is not shared across threads (`!Sync`).
// Its pool's threads only run work the owning thread hands them inside `compute`.
unsafe impl Send for CpuBackend {}

/// A ggml thread pool, freed (its threads stopped and joined) on drop.
struct ThreadPool(NonNull<sys::ggml_threadpool>);

impl ThreadPool {
    /// `n_threads` threads counting the caller (it starts `n_threads - 1`), with ggml's default hybrid polling:
    /// after a computation the workers spin a little for the next one, then sleep.
    fn new(n_threads: usize) -> Result<ThreadPool> {
        // SAFETY: pure initialisation of a parameter struct.
        let mut params = unsafe { sys::ggml_threadpool_params_default(n_threads as i32) };
        // SAFETY: valid parameters (1 <= n_threads <= i32::MAX, default priority, no CPU mask); returns NULL or a
        // pool whose threads are started and wait for work.
        let ptr = unsafe { sys::ggml_threadpool_new(&mut params) };
        NonNull::new(ptr).map(ThreadPool).ok_or(GgmlError::Init {
            what: "CPU thread pool",
        })
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // SAFETY: made by ggml_threadpool_new and freed once, after the backend stopped using it (no computation
        // runs: compute borrows the backend, and the backend detaches or frees its pool first).
        unsafe { sys::ggml_threadpool_free(self.0.as_ptr()) }
    }
}

impl CpuBackend {
    /// A CPU backend computing with `n_threads` threads (at least 1).
    pub fn new(n_threads: usize) -> Result<CpuBackend> {
        // SAFETY: ggml_backend_cpu_init initializes ggml-cpu once and returns a new backend or NULL.
        let ptr = unsafe { sys::ggml_backend_cpu_init() };
        let ptr = NonNull::new(ptr).ok_or(GgmlError::Init {
            what: "CPU backend",
        })?;
        let mut backend = CpuBackend {
            ptr,
            n_threads: 1,
            pool: None,
        };
        backend.set_n_threads(n_threads)?;
        Ok(backend)
    }

    pub(super) fn as_ptr(&self) -> sys::ggml_backend_t {
        self.ptr.as_ptr()
    }

    /// Sets the number of compute threads (clamped to 1..=i32::MAX) and starts a pool of that many.
    pub fn set_n_threads(&mut self, n_threads: usize) -> Result<()> {
        let n = n_threads.clamp(1, i32::MAX as usize);
        let pool = if n > 1 {
            Some(ThreadPool::new(n)?)
        } else {
            None
        };
        let pool_ptr = pool.as_ref().map_or(std::ptr::null_mut(), |p| p.0.as_ptr());
        // SAFETY: `self` is a CPU backend (made by ggml_backend_cpu_init), as both calls require; the pool (or NULL:
        // a pool per computation) outlives its use, as the backend holds it until it is replaced or dropped.
        unsafe {
            sys::ggml_backend_cpu_set_n_threads(self.as_ptr(), n as i32);
            sys::ggml_backend_cpu_set_threadpool(self.as_ptr(), pool_ptr);
        }
        // The previous pool (paused by ggml when it was replaced) is freed here.
        self.pool = pool;
        self.n_threads = n;
        Ok(())
    }

    /// Puts the pool's workers to sleep now, instead of letting them spin a while for the next computation (the
    /// next `compute` wakes them): so they take no CPU from other work between computations, e.g. another engine
    /// being measured.
    pub fn pause_threads(&self) {
        if let Some(pool) = &self.pool {
            // SAFETY: a live pool of this backend; pausing only sets a flag the workers read, and no computation
            // runs (compute borrows the backend for its duration, and backends are not shared between threads).
            unsafe { sys::ggml_threadpool_pause(pool.0.as_ptr()) }
        }
    }

    /// The number of compute threads.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// The backend's name ("CPU").
    pub fn name(&self) -> String {
        // SAFETY: a live backend; the name is a static string.
        cstr_lossy(unsafe { sys::ggml_backend_name(self.as_ptr()) })
    }

    /// Computes `graph`. Every tensor in it must have data, no computed tensor may live in a read-only mapped
    /// region, and the backend must support every node's operator and types; all are checked first, so ggml never
    /// reads unallocated memory, writes mapped weights or aborts on an unsupported type combination.
    /// A graph computed on this backend before and not changed since (no `expand`, no allocation) is not checked
    /// again.
    pub fn compute(&self, graph: &Graph<'_>) -> Result<()> {
        let me = self.as_ptr() as usize;
        if graph.verified_by() != Some(me) {
            check_graph(graph)?;
            self.check_supported(graph)?;
            graph.set_verified_by(Some(me));
        }
        // SAFETY: the graph and every tensor it reaches are alive for the borrow of `graph` (their contexts own the
        // buffers); all have data (checked); none of the written ones is read-only (checked).
        let status = unsafe { sys::ggml_backend_graph_compute(self.as_ptr(), graph.as_ptr()) };
        if status != sys::GGML_STATUS_SUCCESS {
            // SAFETY: returns a static string for any status value.
            let detail = cstr_lossy(unsafe { sys::ggml_status_to_string(status) });
            return Err(GgmlError::Compute { status, detail });
        }
        Ok(())
    }
}

impl CpuBackend {
    fn check_supported(&self, graph: &Graph<'_>) -> Result<()> {
        for t in graph
            .tensors()
            .filter(|&t| !is_view_op(t.op()) && !is_grouped_op(t))
        {
            // SAFETY: a live backend and a live tensor whose sources are alive; the call only inspects them.
            if !unsafe { sys::ggml_backend_supports_op(self.as_ptr(), t.as_ptr()) } {
                // SAFETY: returns a static string naming the tensor's op.
                let op = cstr_lossy(unsafe { sys::ggml_op_desc(t.as_ptr()) });
                return Err(GgmlError::Compute {
                    status: sys::GGML_STATUS_FAILED,
                    detail: format!(
                        "the {} backend does not support {op} for '{}' {t:?}",
                        self.name(),
                        t.label()
                    ),
                });
            }
        }
        Ok(())
    }
}

impl Drop for CpuBackend {
    fn drop(&mut self) {
        // SAFETY: created by ggml_backend_cpu_init, freed once; buffers are independent of the backend instance. The
        // pool is freed after it (field drop), when nothing can use it any more.
        unsafe { sys::ggml_backend_free(self.as_ptr()) }
    }
}

/// Ops whose result only re-describes its source's memory: they are never written by compute.
fn is_view_op(op: sys::ggml_op) -> bool {
    matches!(
        op,
        sys::GGML_OP_NONE
            | sys::GGML_OP_VIEW
            | sys::GGML_OP_RESHAPE
            | sys::GGML_OP_PERMUTE
            | sys::GGML_OP_TRANSPOSE
    )
}

fn check_graph(graph: &Graph<'_>) -> Result<()> {
    for t in graph.tensors() {
        if !t.is_allocated() {
            return Err(GgmlError::Unallocated { tensor: t.label() });
        }
        if !is_view_op(t.op()) && is_read_only(t.buffer()) {
            return Err(GgmlError::ReadOnly { tensor: t.label() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use gguf::GgmlType;

    use super::*;
    use crate::ggml::Context;

    #[test]
    fn compute_refuses_unallocated_tensors() {
        let ctx = Context::with_capacity(4, 8).unwrap();
        let a = ctx.new_tensor_1d(GgmlType::F32, 4).unwrap();
        let b = ctx.scale(a, 2.0).unwrap();
        let mut g = ctx.new_graph(8).unwrap();
        g.expand(b).unwrap();
        let backend = CpuBackend::new(1).unwrap();
        assert!(matches!(
            backend.compute(&g),
            Err(GgmlError::Unallocated { .. })
        ));
        assert!(matches!(
            a.set_f32(&[1.0; 4]),
            Err(GgmlError::Unallocated { .. })
        ));
    }

    #[test]
    fn graph_capacity_is_checked() {
        let ctx = Context::with_capacity(4, 2).unwrap();
        let a = ctx.new_tensor_1d(GgmlType::F32, 4).unwrap();
        let b = ctx.scale(a, 2.0).unwrap();
        let c = ctx.scale(b, 2.0).unwrap();
        let mut g = ctx.new_graph(2).unwrap();
        g.expand(b).unwrap();
        assert!(matches!(
            g.expand(c),
            Err(GgmlError::GraphFull { size: 2, needed: 3 })
        ));
        assert_eq!(g.n_nodes(), 1);
        assert!(g.node(0).unwrap().same_as(b));
        assert!(g.node(1).is_none());
    }

    #[test]
    fn data_transfers_check_length_and_type() {
        let ctx = Context::with_capacity(2, 0).unwrap();
        let a = ctx.new_tensor_2d(GgmlType::F32, 3, 2).unwrap();
        let i = ctx.new_tensor_1d(GgmlType::I32, 2).unwrap();
        ctx.alloc_tensors_host().unwrap();
        assert!(ctx.allocated_bytes() >= 32);
        assert!(matches!(a.set_f32(&[0.0; 5]), Err(GgmlError::Data { .. })));
        assert!(matches!(a.set_i32(&[0; 6]), Err(GgmlError::Data { .. })));
        assert!(matches!(i.get_f32(), Err(GgmlError::Data { .. })));
        a.set_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!(a.get_f32().unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(a.get_bytes().unwrap().len(), 24);
        a.set_name("blk.0.x").unwrap();
        assert_eq!(a.name(), "blk.0.x");
        assert!(a.set_name(&"x".repeat(64)).is_err());
        assert!(a.set_name("a\0b").is_err());
    }

    /// Weights bound into a real file mapping are used in place: the tensor's data pointer is the map's address,
    /// a product reads them, and a graph that would write them is refused.
    #[test]
    fn mapped_weights_are_used_without_a_copy_and_never_written() {
        let (k, m) = (8usize, 2usize);
        let w: Vec<f32> = (0..k * m).map(|i| i as f32).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0u8; 64]).unwrap(); // the tensor sits 64 bytes in, as after a GGUF header
        file.write_all(&w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
            .unwrap();
        // SAFETY (test): the temporary file is private to this test and not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();

        let weights = Context::with_capacity(1, 0).unwrap();
        let region = weights.map_region(&map).unwrap();
        let wt = weights
            .new_tensor_2d(GgmlType::F32, k as i64, m as i64)
            .unwrap();
        weights.bind(wt, region, 64).unwrap();
        assert_eq!(
            wt.data_ptr(),
            map[64..].as_ptr(),
            "bound tensor must point into the map"
        );

        let ctx = Context::with_capacity(8, 16).unwrap();
        let x = ctx.new_tensor_1d(GgmlType::F32, k as i64).unwrap();
        let y = ctx.mul_mat(wt, x).unwrap();
        let mut g = ctx.new_graph(16).unwrap();
        g.expand(y).unwrap();
        ctx.alloc_tensors_host().unwrap();
        x.set_f32(&[1.0; 8]).unwrap();
        let backend = CpuBackend::new(1).unwrap();
        backend.compute(&g).unwrap();
        assert_eq!(y.get_f32().unwrap(), [28.0, 92.0]);
        assert_eq!(wt.data_ptr(), map[64..].as_ptr());

        // A view of mapped weights is fine to read; a copy into them is refused before ggml runs.
        let row1 = ctx.view_1d(wt, k as i64, k * 4).unwrap();
        let doubled = ctx.scale(row1, 2.0).unwrap();
        let into_weights = ctx.cpy(doubled, row1).unwrap();
        let mut g2 = ctx.new_graph(16).unwrap();
        g2.expand(doubled).unwrap();
        ctx.alloc_tensors_host().unwrap();
        backend.compute(&g2).unwrap();
        assert_eq!(doubled.get_f32().unwrap()[0], 16.0);
        g2.expand(into_weights).unwrap();
        assert!(matches!(
            backend.compute(&g2),
            Err(GgmlError::ReadOnly { .. })
        ));
        assert_eq!(
            map[64 + 32..64 + 36],
            8f32.to_le_bytes(),
            "the map is unchanged"
        );
    }
}
