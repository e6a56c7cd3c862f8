//! Zero-copy weights: borrowed or shared byte regions (a GGUF file's memory map) wrapped as read-only CPU backend
//! buffers, and tensors bound to offsets inside them after bounds and alignment checks.

use std::any::Any;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use llama_cpp_sys_2 as sys;

use super::backend::OwnedBuffer;
use super::context::Context;
use super::error::{GgmlError, Result};
use super::pool::SlotPool;
use super::tensor::Tensor;

/// ggml's `TENSOR_ALIGNMENT`: `ggml_backend_cpu_buffer_from_ptr` asserts the region start is aligned to it.
pub const REGION_ALIGNMENT: usize = 32;

/// Alignment required of a bound tensor's first byte: enough for every element type ggml reads (f64/i64), and the
/// GGUF minimum (`general.alignment` is a multiple of 8).
pub const BIND_ALIGNMENT: usize = 8;

/// A region registered with a [`Context`]: index into its region list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionId(usize);

/// Buffers over borrowed or shared bytes: Rust sees those bytes as immutable, so nothing may write them.
static READ_ONLY: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

fn with_read_only<T>(f: impl FnOnce(&mut HashSet<usize>) -> T) -> T {
    let mut guard = READ_ONLY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    f(guard.get_or_insert_with(HashSet::new))
}

/// True when `buf` wraps a borrowed, read-only region.
pub(super) fn is_read_only(buf: sys::ggml_backend_buffer_t) -> bool {
    !buf.is_null() && with_read_only(|set| set.contains(&(buf as usize)))
}

/// A mapped region: the CPU buffer over it, its bounds, and the owner that keeps shared bytes alive.
pub(super) struct Region {
    buffer: OwnedBuffer,
    base: usize,
    len: usize,
    _owner: Option<Arc<dyn Any + Send + Sync>>,
}

impl Drop for Region {
    fn drop(&mut self) {
        with_read_only(|set| set.remove(&(self.buffer.as_ptr() as usize)));
        // `buffer` is freed after this; a from_ptr buffer does not free the bytes it wraps.
    }
}

impl<'m> Context<'m> {
    /// Wraps `bytes` (e.g. a whole memory-mapped GGUF file) as a read-only CPU buffer; tensors bound into it with
    /// [`Context::bind`] point straight at these bytes. The start must be aligned to [`REGION_ALIGNMENT`] (a
    /// mapping's start is page-aligned).
    pub fn map_region(&self, bytes: &'m [u8]) -> Result<RegionId> {
        self.add_region(bytes.as_ptr(), bytes.len(), None, true)
    }

    /// As [`Context::map_region`] for bytes owned by a shared `owner` (e.g. `Arc<memmap2::Mmap>` or an opened
    /// model): the context keeps `owner` alive, so it needs no borrow. `bytes` picks the region out of the owner.
    pub fn map_shared<O: Send + Sync + 'static>(
        &self,
        owner: Arc<O>,
        bytes: impl FnOnce(&O) -> &[u8],
    ) -> Result<RegionId> {
        let slice = bytes(&owner);
        let (ptr, len) = (slice.as_ptr(), slice.len());
        // The slice borrows `*owner`, which sits behind the Arc (it never moves) and is only ever shared from now
        // on, so the bytes stay valid and unchanged while the context holds the Arc.
        self.add_region(ptr, len, Some(owner), true)
    }

    /// The writable region over `pool`'s slots (made on first use; the context keeps the pool alive).
    pub(super) fn pool_region(&self, pool: &Arc<SlotPool>) -> Result<RegionId> {
        let base = pool.base() as usize;
        if let Some(i) = self.regions.borrow().iter().position(|r| r.base == base) {
            return Ok(RegionId(i));
        }
        let owner: Arc<dyn Any + Send + Sync> = pool.clone();
        self.add_region(pool.base(), pool.bytes(), Some(owner), false)
    }

    fn add_region(
        &self,
        ptr: *const u8,
        len: usize,
        owner: Option<Arc<dyn Any + Send + Sync>>,
        read_only: bool,
    ) -> Result<RegionId> {
        if (ptr as usize) % REGION_ALIGNMENT != 0 {
            return Err(GgmlError::Bind {
                tensor: "<region>".into(),
                detail: format!("region start {ptr:p} is not aligned to {REGION_ALIGNMENT} bytes"),
            });
        }
        // SAFETY: `ptr..ptr+len` is readable for as long as the context lives ('m borrow or owner kept below); the
        // start is aligned as ggml asserts. Borrowed and shared bytes are registered read-only before any tensor can
        // use them, and graph compute and data writes refuse read-only buffers, so ggml never writes them; a slot
        // pool (the one writable kind) is written by ggml only through set_bytes, never by a computation (its
        // tensors are weights, never graph nodes).
        let raw = unsafe { sys::ggml_backend_cpu_buffer_from_ptr(ptr as *mut _, len) };
        let buffer = OwnedBuffer::new(raw).ok_or_else(|| GgmlError::Alloc {
            what: format!("a CPU buffer over a region of {len} bytes"),
        })?;
        // SAFETY: a valid buffer; marks it as holding weights for schedulers.
        unsafe {
            sys::ggml_backend_buffer_set_usage(
                buffer.as_ptr(),
                sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS,
            )
        };
        if read_only {
            with_read_only(|set| set.insert(buffer.as_ptr() as usize));
        }
        let mut regions = self.regions.borrow_mut();
        regions.push(Region {
            buffer,
            base: ptr as usize,
            len,
            _owner: owner,
        });
        Ok(RegionId(regions.len() - 1))
    }

    /// Binds `tensor` (of this context, with no data yet, not a view) to `offset` bytes into `region`: its data
    /// pointer becomes the region's address plus `offset`; nothing is copied. Checks that the tensor's bytes lie
    /// inside the region and that the address is aligned to [`BIND_ALIGNMENT`].
    pub fn bind(&self, tensor: Tensor<'_>, region: RegionId, offset: usize) -> Result<()> {
        let bind_err = |detail: String| GgmlError::Bind {
            tensor: tensor.label(),
            detail,
        };
        if !self.owns(tensor) {
            return Err(GgmlError::ForeignTensor {
                op: "bind",
                tensor: tensor.label(),
            });
        }
        if tensor.is_allocated() || tensor.view_source().is_some() {
            return Err(bind_err("it already has data or is a view".into()));
        }
        let regions = self.regions.borrow();
        let r = regions
            .get(region.0)
            .ok_or_else(|| bind_err(format!("unknown region {}", region.0)))?;
        // SAFETY: a live buffer and a tensor of this context; the call reads the tensor's shape and type.
        let size =
            unsafe { sys::ggml_backend_buffer_get_alloc_size(r.buffer.as_ptr(), tensor.as_ptr()) };
        let end = offset
            .checked_add(size)
            .filter(|&end| end <= r.len)
            .ok_or_else(|| {
                bind_err(format!(
                    "bytes {offset}..{offset}+{size} exceed the region of {} bytes",
                    r.len
                ))
            })?;
        let addr = r.base + offset;
        if addr % BIND_ALIGNMENT != 0 {
            return Err(bind_err(format!(
                "offset {offset} is not aligned to {BIND_ALIGNMENT} bytes"
            )));
        }
        debug_assert!(end <= r.len);
        // SAFETY: the tensor has no buffer, no data and no view source; `addr..addr+size` lies inside the buffer
        // (checked above), which is what ggml asserts. The context owns both tensor and buffer.
        let status = unsafe {
            sys::ggml_backend_tensor_alloc(r.buffer.as_ptr(), tensor.as_ptr(), addr as *mut _)
        };
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(bind_err(format!(
                "ggml_backend_tensor_alloc returned status {status}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf::GgmlType;

    fn aligned(len: usize) -> Vec<u64> {
        // u64 storage is 8-aligned; the tests below pick a 32-aligned start inside it.
        vec![0u64; len / 8 + 8]
    }

    fn start32(v: &[u64]) -> usize {
        let addr = v.as_ptr() as usize;
        (REGION_ALIGNMENT - addr % REGION_ALIGNMENT) % REGION_ALIGNMENT
    }

    #[test]
    fn bind_checks_bounds_alignment_and_ownership() {
        let storage = aligned(1024);
        // SAFETY (test): reinterpreting initialized u64 storage as bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(storage.as_ptr() as *const u8, storage.len() * 8) };
        let bytes = &bytes[start32(&storage)..][..1024];
        let ctx = Context::with_capacity(8, 0).unwrap();
        assert!(ctx.map_region(&bytes[1..]).is_err(), "misaligned start");
        let r = ctx.map_region(bytes).unwrap();
        let t = ctx.new_tensor_1d(GgmlType::F32, 64).unwrap();
        assert!(ctx.bind(t, r, 1024 - 255).is_err(), "past the end");
        assert!(ctx.bind(t, r, usize::MAX - 8).is_err(), "overflow");
        assert!(ctx.bind(t, r, 4).is_err(), "misaligned");
        ctx.bind(t, r, 1024 - 256).unwrap();
        assert_eq!(t.data_ptr(), bytes[1024 - 256..].as_ptr());
        assert!(ctx.bind(t, r, 0).is_err(), "bound twice");
        assert!(matches!(
            t.set_f32(&[0.0; 64]),
            Err(GgmlError::ReadOnly { .. })
        ));
        assert_eq!(t.get_f32().unwrap(), vec![0.0; 64]);
        let other = Context::with_capacity(1, 0).unwrap();
        let foreign = other.new_tensor_1d(GgmlType::F32, 4).unwrap();
        assert!(matches!(
            ctx.bind(foreign, r, 0),
            Err(GgmlError::ForeignTensor { .. })
        ));
    }

    #[test]
    fn shared_owner_is_kept_alive() {
        let owner = Arc::new(aligned(256));
        let start = start32(&owner);
        let ctx = Context::with_capacity(2, 0).unwrap();
        let r = ctx
            .map_shared(owner.clone(), move |v: &Vec<u64>| {
                // SAFETY (test): reinterpreting initialized u64 storage as bytes, borrowed from `v`.
                let b = unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 8) };
                &b[start..][..256]
            })
            .unwrap();
        assert_eq!(Arc::strong_count(&owner), 2);
        let t = ctx.new_tensor_1d(GgmlType::I32, 8).unwrap();
        ctx.bind(t, r, 32).unwrap();
        assert_eq!(t.get_i32().unwrap(), vec![0; 8]);
        drop(ctx);
        assert_eq!(Arc::strong_count(&owner), 1);
    }
}
