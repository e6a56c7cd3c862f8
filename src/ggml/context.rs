//! `Context`: a ggml context that holds tensor metadata (never data) and owns the backend buffers and mapped
//! regions its tensors' data live in, so a tensor can never outlive its bytes.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ptr::NonNull;

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

use super::backend::{CpuBackend, OwnedBuffer};
use super::error::{GgmlError, Result};
use super::region::Region;
use super::tensor::Tensor;
use super::types::{block_size, to_ggml, type_size};

/// A ggml context created with `no_alloc = true`: its pool holds tensor and graph metadata only; data lives in
/// backend buffers ([`Context::alloc_tensors`]) or in borrowed regions ([`Context::map_region`]) that the context
/// keeps alive. `'m` is the lifetime of borrowed regions (`'static` when there are none).
pub struct Context<'m> {
    ptr: NonNull<sys::ggml_context>,
    pub(super) buffers: RefCell<Vec<OwnedBuffer>>,
    pub(super) regions: RefCell<Vec<Region>>,
    /// Memory owned elsewhere that this context's tensors point into (a [`super::GraphAllocator`]'s buffers),
    /// kept alive until the context is dropped.
    pub(super) keep_alive: RefCell<Vec<KeepAlive>>,
    _regions: PhantomData<&'m [u8]>,
}

/// A shared owner of memory some tensors point into.
pub(super) type KeepAlive = std::sync::Arc<dyn std::any::Any + Send + Sync>;

// SAFETY: a ggml context has no thread affinity; the buffers and regions it owns are plain heap or mapped memory
// (shared owners are `Send + Sync`, borrowed regions are `&[u8]`, which is `Send`). It stays `!Sync`: operators
// mutate the pool through `&self`.
unsafe impl Send for Context<'_> {}

/// How much pool a context needs for `n_tensors` tensors and one graph of `graph_size` nodes.
pub fn context_mem_size(n_tensors: usize, graph_size: usize) -> usize {
    // SAFETY: both functions only compute sizes from their arguments.
    let (tensor, graph) = unsafe {
        (
            sys::ggml_tensor_overhead(),
            sys::ggml_graph_overhead_custom(graph_size, false),
        )
    };
    n_tensors.saturating_mul(tensor).saturating_add(graph)
}

impl<'m> Context<'m> {
    /// A context whose pool has `mem_size` bytes for tensor and graph metadata (see [`context_mem_size`]).
    pub fn new(mem_size: usize) -> Result<Context<'m>> {
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: ggml_init allocates and owns its pool (mem_buffer is NULL); it returns NULL or a valid context.
        let ptr = unsafe { sys::ggml_init(params) };
        let ptr = NonNull::new(ptr).ok_or(GgmlError::Init {
            what: "ggml context",
        })?;
        Ok(Context {
            ptr,
            buffers: RefCell::new(Vec::new()),
            regions: RefCell::new(Vec::new()),
            keep_alive: RefCell::new(Vec::new()),
            _regions: PhantomData,
        })
    }

    /// A context sized for `n_tensors` tensors plus one graph of `graph_size` nodes.
    pub fn with_capacity(n_tensors: usize, graph_size: usize) -> Result<Context<'m>> {
        Context::new(context_mem_size(n_tensors, graph_size))
    }

    pub(super) fn as_ptr(&self) -> *mut sys::ggml_context {
        self.ptr.as_ptr()
    }

    /// Pool bytes in use and pool size.
    pub fn mem_used(&self) -> (usize, usize) {
        // SAFETY: the context is alive for &self; both calls only read its bookkeeping.
        unsafe {
            (
                sys::ggml_used_mem(self.as_ptr()),
                sys::ggml_get_mem_size(self.as_ptr()),
            )
        }
    }

    /// Fails unless the pool can take `n_tensors` more tensor objects plus `extra` bytes (ggml aborts otherwise).
    pub(super) fn reserve(&self, n_tensors: usize, extra: usize) -> Result<()> {
        let (used, size) = self.mem_used();
        // SAFETY: pure size computation.
        let per_tensor = unsafe { sys::ggml_tensor_overhead() };
        let needed = n_tensors.saturating_mul(per_tensor).saturating_add(extra);
        let available = size.saturating_sub(used);
        if needed > available {
            return Err(GgmlError::ContextFull { needed, available });
        }
        Ok(())
    }

    /// Bytes of the backend buffers this context allocated (mapped regions not included).
    pub fn allocated_bytes(&self) -> usize {
        self.buffers.borrow().iter().map(|b| b.size()).sum()
    }

    /// Wraps a tensor pointer ggml just returned from this context.
    pub(super) fn wrap<'c>(
        &'c self,
        op: &'static str,
        ptr: *mut sys::ggml_tensor,
    ) -> Result<Tensor<'c>> {
        // SAFETY: `ptr` was returned by a ggml constructor on this context (or is NULL), so it lives as long as the
        // context, which the returned handle borrows.
        unsafe { Tensor::from_raw(ptr) }.ok_or(GgmlError::Op {
            op,
            detail: "ggml returned no tensor".into(),
        })
    }

    /// Keeps `owner` alive as long as this context (once per owner).
    pub(super) fn keep(&self, owner: &KeepAlive) {
        let mut list = self.keep_alive.borrow_mut();
        if !list.iter().any(|k| std::sync::Arc::ptr_eq(k, owner)) {
            list.push(owner.clone());
        }
    }

    /// True when `t`'s metadata lives in this context's pool.
    pub fn owns(&self, t: Tensor<'_>) -> bool {
        // SAFETY: the context is alive; both calls read its pool bounds.
        let (base, size) = unsafe {
            (
                sys::ggml_get_mem_buffer(self.as_ptr()),
                sys::ggml_get_mem_size(self.as_ptr()),
            )
        };
        let (base, addr) = (base as usize, t.as_ptr() as usize);
        addr >= base && addr - base < size
    }

    /// A new tensor of `ty` with shape `ne` (ggml order, `ne[0]` fastest; 1 to 4 dims), with no data yet.
    pub fn new_tensor<'c>(&'c self, ty: GgmlType, ne: &[i64]) -> Result<Tensor<'c>> {
        check_shape(ty, ne)?;
        self.reserve(1, 0)?;
        let n_dims = ne.len() as i32;
        // SAFETY: type and shape were checked (1..=4 dims, non-negative, whole blocks, no overflow) and the pool
        // has room, so ggml_new_tensor cannot assert; it copies `n_dims` entries of `ne`.
        let ptr = unsafe { sys::ggml_new_tensor(self.as_ptr(), to_ggml(ty), n_dims, ne.as_ptr()) };
        self.wrap("new_tensor", ptr)
    }

    /// A 1-d tensor `{ne0}`.
    pub fn new_tensor_1d<'c>(&'c self, ty: GgmlType, ne0: i64) -> Result<Tensor<'c>> {
        self.new_tensor(ty, &[ne0])
    }

    /// A 2-d tensor `{ne0, ne1}`: `ne1` rows of `ne0`.
    pub fn new_tensor_2d<'c>(&'c self, ty: GgmlType, ne0: i64, ne1: i64) -> Result<Tensor<'c>> {
        self.new_tensor(ty, &[ne0, ne1])
    }

    /// A 3-d tensor `{ne0, ne1, ne2}`.
    pub fn new_tensor_3d<'c>(
        &'c self,
        ty: GgmlType,
        ne0: i64,
        ne1: i64,
        ne2: i64,
    ) -> Result<Tensor<'c>> {
        self.new_tensor(ty, &[ne0, ne1, ne2])
    }

    /// A 4-d tensor `{ne0, ne1, ne2, ne3}`.
    pub fn new_tensor_4d<'c>(&'c self, ty: GgmlType, ne: [i64; 4]) -> Result<Tensor<'c>> {
        self.new_tensor(ty, &ne)
    }

    /// Every tensor of this context, in creation order.
    pub fn tensors<'c>(&'c self) -> Vec<Tensor<'c>> {
        let mut out = Vec::new();
        // SAFETY: the context is alive; the iteration functions return tensors of this pool or NULL at the end.
        let mut cur = unsafe { sys::ggml_get_first_tensor(self.as_ptr()) };
        // SAFETY: `cur` is NULL or a tensor of this context, which the handles borrow.
        while let Some(t) = unsafe { Tensor::from_raw(cur) } {
            out.push(t);
            // SAFETY: `cur` is a tensor of this context.
            cur = unsafe { sys::ggml_get_next_tensor(self.as_ptr(), cur) };
        }
        out
    }

    /// Allocates every tensor of this context that has no data yet in one buffer of `backend`'s default type
    /// (and points views at their sources); the context owns the buffer. A no-op when nothing needs data.
    pub fn alloc_tensors(&self, backend: &CpuBackend) -> Result<()> {
        // SAFETY: the backend is alive for &backend; the call returns its static default buffer type.
        let buft = unsafe { sys::ggml_backend_get_default_buffer_type(backend.as_ptr()) };
        self.alloc_tensors_in(buft)
    }

    /// As [`Context::alloc_tensors`], in one buffer of `device`'s default type; `weights` marks the buffer as
    /// holding weights, so that a [`super::Scheduler`] runs the operators reading them on that device.
    pub fn alloc_tensors_on(&self, device: super::Device, weights: bool) -> Result<()> {
        let before = self.buffers.borrow().len();
        self.alloc_tensors_in(device.buffer_type())?;
        if weights {
            if let Some(buf) = self.buffers.borrow().get(before) {
                // SAFETY: a live buffer this context owns; the call only sets its usage flag.
                unsafe {
                    sys::ggml_backend_buffer_set_usage(
                        buf.as_ptr(),
                        sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS,
                    )
                };
            }
        }
        Ok(())
    }

    /// As [`Context::alloc_tensors`], in host memory of the CPU backend without needing a backend instance.
    pub fn alloc_tensors_host(&self) -> Result<()> {
        // SAFETY: returns ggml's static CPU buffer type.
        let buft = unsafe { sys::ggml_backend_cpu_buffer_type() };
        self.alloc_tensors_in(buft)
    }

    fn alloc_tensors_in(&self, buft: sys::ggml_backend_buffer_type_t) -> Result<()> {
        let tensors = self.tensors();
        let mut need_alloc = 0usize;
        for t in &tensors {
            if t.is_allocated() {
                continue;
            }
            match t.view_source() {
                None => need_alloc += 1,
                // ggml's allocator inits a view from its source, which must already have data or be allocated
                // by this same call (it then comes earlier in this context).
                Some(src) if src.is_allocated() || self.owns(src) => {}
                Some(src) => {
                    return Err(GgmlError::Unallocated {
                        tensor: src.label(),
                    })
                }
            }
        }
        if need_alloc > 0 {
            // SAFETY: the context was created no_alloc (asserted by ggml), every view source was checked above, and
            // the function returns NULL on failure or a buffer the caller owns.
            let buf = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(self.as_ptr(), buft) };
            let buf = OwnedBuffer::new(buf).ok_or_else(|| GgmlError::Alloc {
                what: format!("a buffer for {need_alloc} tensors"),
            })?;
            self.buffers.borrow_mut().push(buf);
        }
        // Views of tensors that already had data (or of region-bound tensors) still need their buffer set.
        for t in self.tensors() {
            t.init_view_if_needed()?;
        }
        Ok(())
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: the context was created by ggml_init and is freed once; no tensor handle outlives &self.
        // Buffers and regions are freed after this as fields; they do not point back into the pool.
        unsafe { sys::ggml_free(self.as_ptr()) }
    }
}

/// Checks a shape ggml would assert on: 1 to 4 dims, non-negative, whole blocks, element and byte counts in range.
pub(super) fn check_shape(ty: GgmlType, ne: &[i64]) -> Result<()> {
    let bad = |detail: String| {
        Err(GgmlError::Op {
            op: "new_tensor",
            detail,
        })
    };
    if ne.is_empty() || ne.len() > 4 {
        return bad(format!("{} dims, expected 1 to 4", ne.len()));
    }
    if ne.iter().any(|&n| n < 0) {
        return bad(format!("negative extent in {ne:?}"));
    }
    let blck = block_size(ty);
    if blck <= 0 || ne[0] % blck != 0 {
        return bad(format!(
            "ne0 = {} is not a whole number of {ty} blocks of {blck}",
            ne[0]
        ));
    }
    let elements = ne.iter().try_fold(1i64, |acc, &n| acc.checked_mul(n));
    let bytes = ne[1..]
        .iter()
        .try_fold((ne[0] / blck) as u128 * type_size(ty) as u128, |acc, &n| {
            acc.checked_mul(n as u128)
        });
    match (elements, bytes) {
        (Some(_), Some(b)) if b <= isize::MAX as u128 => Ok(()),
        _ => bad(format!("shape {ne:?} of {ty} overflows")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_checked_not_aborted() {
        let ctx = Context::with_capacity(2, 0).unwrap();
        ctx.new_tensor_1d(GgmlType::F32, 4).unwrap();
        ctx.new_tensor_1d(GgmlType::F32, 4).unwrap();
        assert!(matches!(
            ctx.new_tensor_1d(GgmlType::F32, 4),
            Err(GgmlError::ContextFull { .. })
        ));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let ctx = Context::with_capacity(8, 0).unwrap();
        assert!(ctx.new_tensor(GgmlType::F32, &[]).is_err());
        assert!(ctx.new_tensor(GgmlType::F32, &[1, 1, 1, 1, 1]).is_err());
        assert!(ctx.new_tensor_2d(GgmlType::F32, 4, -1).is_err());
        assert!(ctx.new_tensor_1d(GgmlType::Q8_0, 33).is_err());
        assert!(ctx
            .new_tensor_4d(GgmlType::F32, [1 << 40, 1 << 40, 1, 1])
            .is_err());
        let t = ctx.new_tensor_3d(GgmlType::Q4K, 512, 3, 2).unwrap();
        assert_eq!(t.ne(), [512, 3, 2, 1]);
        assert_eq!(t.n_dims(), 3);
        assert_eq!(t.n_bytes(), 2 * 144 * 3 * 2);
        assert_eq!(t.ty(), Some(GgmlType::Q4K));
        assert!(ctx.owns(t));
        let other = Context::with_capacity(1, 0).unwrap();
        assert!(!other.owns(t));
    }
}
