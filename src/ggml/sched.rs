//! `Scheduler`: ggml's backend scheduler (`ggml_backend_sched`) over several devices and the CPU. It splits a graph
//! into runs of nodes per device (each node goes where its weights or the cache it writes live, the rest follows its
//! neighbours), gives every intermediate memory in a compute buffer of its device, and copies the tensors a split
//! reads from another device before running it.
//!
//! Rules: a graph is allocated once ([`Scheduler::alloc`]) and may then be computed again and again with new input
//! values, until the next `alloc` (of any graph) or [`Scheduler::reset`], which hand its memory out again.

use std::marker::PhantomData;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::backend::CpuBackend;
use super::devices::{Device, DeviceBackend};
use super::error::{GgmlError, Result};
use super::graph::Graph;
use super::region::is_read_only;
use super::types::cstr_lossy;

/// A `ggml_backend_sched` over some device backends and the CPU backend (always last: ggml runs there whatever no
/// device takes). `'b` borrows the backends.
pub struct Scheduler<'b> {
    ptr: NonNull<sys::ggml_backend_sched>,
    /// The most nodes plus leafs a graph may have (the size the scheduler was made for).
    capacity: usize,
    /// The CPU backend (the last one), where custom operators are pinned.
    cpu: sys::ggml_backend_t,
    _backends: PhantomData<&'b ()>,
}

// SAFETY: the scheduler is heap state with no thread affinity, used through `&mut self` by one thread.
unsafe impl Send for Scheduler<'_> {}

impl<'b> Scheduler<'b> {
    /// A scheduler over `devices` (in priority order) and `cpu`, for graphs of up to `graph_size` nodes and as many
    /// leafs. Every device's default buffer type holds its compute buffer. `op_offload`: a device that asks for it
    /// (ggml's `offload_op`, e.g. CUDA for products of 32 rows or more) may compute a product whose weight is in
    /// the CPU's RAM, the weight copied over for it (llama.cpp's default; `--no-op-offload` turns it off); else an
    /// op with a weight runs where the weight is.
    pub fn new(
        devices: &[&'b DeviceBackend],
        cpu: &'b CpuBackend,
        graph_size: usize,
        op_offload: bool,
    ) -> Result<Scheduler<'b>> {
        let mut backends: Vec<sys::ggml_backend_t> = devices.iter().map(|d| d.as_ptr()).collect();
        backends.push(cpu.as_ptr());
        let capacity = 2 * graph_size.max(1);
        // SAFETY: every backend is alive for 'b, the CPU one last (as ggml asserts); NULL bufts selects each
        // backend's default buffer type; the scheduler copies the arrays.
        let ptr = unsafe {
            sys::ggml_backend_sched_new(
                backends.as_mut_ptr(),
                std::ptr::null_mut(),
                backends.len() as i32,
                capacity,
                false,
                op_offload,
            )
        };
        let ptr = NonNull::new(ptr).ok_or(GgmlError::Init {
            what: "backend scheduler",
        })?;
        Ok(Scheduler {
            ptr,
            capacity,
            cpu: cpu.as_ptr(),
            _backends: PhantomData,
        })
    }

    fn as_ptr(&self) -> sys::ggml_backend_sched_t {
        self.ptr.as_ptr()
    }

    /// True when graphs of `graph_size` nodes fit this scheduler.
    pub fn fits(&self, graph_size: usize) -> bool {
        2 * graph_size <= self.capacity
    }

    /// Forgets the current graph's assignment and allocation.
    pub fn reset(&mut self) {
        // SAFETY: a live scheduler.
        unsafe { sys::ggml_backend_sched_reset(self.as_ptr()) }
    }

    /// Assigns every node of `graph` to a backend, splits it, and gives the intermediates memory (growing the
    /// compute buffers when needed). Resets first. Inputs get their values after this (their memory is fresh).
    ///
    /// Custom operators (ferrite's grouped expert products, whose code runs in this process) are pinned to the
    /// CPU: ggml's CPU device does not claim them when a source is in a repacked buffer, and left alone the
    /// scheduler would hand them to another device, copying repacked weights it cannot read.
    pub fn alloc(&mut self, graph: &Graph<'_>) -> Result<()> {
        if graph.size() * 2 > self.capacity {
            return Err(GgmlError::GraphFull {
                size: self.capacity / 2,
                needed: graph.size(),
            });
        }
        graph.set_verified_by(None);
        self.reset();
        for t in (0..graph.n_nodes()).filter_map(|i| graph.node(i)) {
            if is_custom_op(t.op()) {
                // SAFETY: a live scheduler, a node of the graph about to be allocated, and its CPU backend.
                unsafe {
                    sys::ggml_backend_sched_set_tensor_backend(self.as_ptr(), t.as_ptr(), self.cpu)
                };
            }
        }
        // SAFETY: a live scheduler and graph whose tensors are alive (borrowed by `graph`); the graph fits the
        // scheduler's hash set (checked above). ggml returns false when a buffer cannot be allocated.
        let ok = unsafe { sys::ggml_backend_sched_alloc_graph(self.as_ptr(), graph.as_ptr()) };
        if !ok {
            return Err(GgmlError::Alloc {
                what: "the compute buffers of the scheduler's devices".into(),
            });
        }
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

    /// Computes `graph`, allocated by the last [`Scheduler::alloc`], and waits for every device to finish.
    pub fn compute(&mut self, graph: &Graph<'_>) -> Result<()> {
        // SAFETY: the graph was allocated by this scheduler (its tensors have data), is alive, and was not changed
        // since (`expand` would need a new alloc).
        status_result(unsafe {
            sys::ggml_backend_sched_graph_compute(self.as_ptr(), graph.as_ptr())
        })
    }

    /// Starts computing `graph`, allocated by the last [`Scheduler::alloc`], and returns once every split is on its
    /// way: the CPU's splits have run, a device's last split may still be running (ggml's CUDA and RPC backends queue
    /// their work). Nothing may read the graph's outputs, or alloc or compute another graph on this scheduler, before
    /// [`Scheduler::synchronize`].
    pub fn compute_async(&mut self, graph: &Graph<'_>) -> Result<()> {
        // SAFETY: as in `compute`; the caller synchronizes before the graph's memory is read or handed out again.
        status_result(unsafe {
            sys::ggml_backend_sched_graph_compute_async(self.as_ptr(), graph.as_ptr())
        })
    }

    /// Waits until every backend of the scheduler has finished what [`Scheduler::compute_async`] started.
    pub fn synchronize(&mut self) {
        // SAFETY: a live scheduler.
        unsafe { sys::ggml_backend_sched_synchronize(self.as_ptr()) }
    }

    /// Splits of the last allocated graph (runs of nodes on one backend).
    pub fn n_splits(&self) -> usize {
        // SAFETY: a live scheduler.
        unsafe { sys::ggml_backend_sched_get_n_splits(self.as_ptr()) as usize }
    }

    /// Bytes of the compute buffer the scheduler holds on each backend, by backend name.
    pub fn buffer_sizes(&self) -> Vec<(String, usize)> {
        // SAFETY: a live scheduler; indices below the count give its backends.
        let n = unsafe { sys::ggml_backend_sched_get_n_backends(self.as_ptr()) };
        (0..n)
            .map(|i| {
                // SAFETY: as above; the name is static.
                unsafe {
                    let b = sys::ggml_backend_sched_get_backend(self.as_ptr(), i);
                    (
                        cstr_lossy(sys::ggml_backend_name(b)),
                        sys::ggml_backend_sched_get_buffer_size(self.as_ptr(), b),
                    )
                }
            })
            .collect()
    }

    /// For each computed node of `graph` (allocated by the last `alloc`), in order: its name, its operator and the
    /// device the scheduler runs it on (None where the scheduler did not assign one, e.g. views).
    pub fn assignments(&self, graph: &Graph<'_>) -> Vec<(String, String, Option<Device>)> {
        (0..graph.n_nodes())
            .filter_map(|i| graph.node(i))
            .map(|t| {
                // SAFETY: a live scheduler and a node of the graph it allocated; returns NULL or one of its backends.
                let b = unsafe {
                    sys::ggml_backend_sched_get_tensor_backend(self.as_ptr(), t.as_ptr())
                };
                let dev = match b.is_null() {
                    true => None,
                    // SAFETY: a live backend; its device is registered.
                    false => unsafe { Device::from_raw(sys::ggml_backend_get_device(b)) },
                };
                (t.name(), t.op_name(), dev)
            })
            .collect()
    }
}

impl Drop for Scheduler<'_> {
    fn drop(&mut self) {
        // SAFETY: made by ggml_backend_sched_new and freed once; its compute buffers go with it (graphs pointing into
        // them are dropped or never computed again: they borrow nothing from the scheduler, but the session drops
        // them before it).
        unsafe { sys::ggml_backend_sched_free(self.as_ptr()) }
    }
}

/// A computation's status as a result.
fn status_result(status: sys::ggml_status) -> Result<()> {
    if status == sys::GGML_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: returns a static string for any status value.
    let detail = cstr_lossy(unsafe { sys::ggml_status_to_string(status) });
    Err(GgmlError::Compute { status, detail })
}

/// Operators whose code is a callback of this process (CPU only).
fn is_custom_op(op: sys::ggml_op) -> bool {
    matches!(
        op,
        sys::GGML_OP_CUSTOM
            | sys::GGML_OP_MAP_CUSTOM1
            | sys::GGML_OP_MAP_CUSTOM2
            | sys::GGML_OP_MAP_CUSTOM3
    )
}

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
