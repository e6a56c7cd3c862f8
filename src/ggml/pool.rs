//! The expert cache's memory: a pool of equally sized, writable slots in one anonymous mapping, and tensors that
//! see the pool as a stack of experts (tensor `{n_in, n_out, n_slots}` whose matrix `s` is part of slot `s`), so
//! `mul_mat_id` runs over the slots with expert ids remapped to slot numbers.

use std::sync::Arc;

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

use super::context::Context;
use super::error::{GgmlError, Result};
use super::tensor::Tensor;
use super::types::row_size;

/// Slots of `stride` bytes each, page-aligned, zero-filled at first. Rust code writes a slot through
/// [`SlotPool::slot_mut`] only while no graph reads it; ggml reads slots through tensors made by
/// [`Context::pool_tensor`].
pub struct SlotPool {
    map: memmap2::MmapMut,
    ptr: *mut u8,
    n_slots: usize,
    stride: usize,
}

// SAFETY: the pool is plain anonymous memory with no thread affinity. Shared access only reads through ggml
// tensors or writes through `slot_mut`, whose callers guarantee that a slot is never written while anything else
// reads or writes it.
unsafe impl Send for SlotPool {}
unsafe impl Sync for SlotPool {}

impl SlotPool {
    /// A pool of `n_slots` slots of `stride` bytes (rounded up to 64 so every slot stays aligned).
    pub fn new(n_slots: usize, stride: usize) -> Result<SlotPool> {
        let stride = stride.max(1).div_ceil(64) * 64;
        let len = n_slots
            .checked_mul(stride)
            .filter(|&l| l > 0 && l <= isize::MAX as usize);
        let alloc_err = || GgmlError::Alloc {
            what: format!("an expert cache of {n_slots} slots of {stride} bytes"),
        };
        let len = len.ok_or_else(alloc_err)?;
        let mut map = memmap2::MmapMut::map_anon(len).map_err(|_| alloc_err())?;
        let ptr = map.as_mut_ptr();
        Ok(SlotPool {
            map,
            ptr,
            n_slots,
            stride,
        })
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// Bytes from one slot's start to the next's.
    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn bytes(&self) -> usize {
        self.map.len()
    }

    pub(super) fn base(&self) -> *const u8 {
        self.ptr
    }

    /// Keeps the pool in RAM (`mlock`), so the OS never swaps the cache out; fails where the limit on locked
    /// memory (`ulimit -l`) is too small.
    pub fn lock(&self) -> std::io::Result<()> {
        self.map.lock()
    }

    /// The bytes of `slot`, to read an expert into.
    ///
    /// # Safety
    /// While the returned slice lives, nothing else may read or write this slot: no other `slot_mut` of the same
    /// slot, and no graph computation that reads it through a pool tensor (one reading other slots is fine).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_mut(&self, slot: usize) -> Option<&mut [u8]> {
        if slot >= self.n_slots {
            return None;
        }
        // SAFETY: `slot * stride .. + stride` lies inside the mapping, which lives as long as `self`; exclusivity
        // is the caller's promise.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(slot * self.stride), self.stride)
        })
    }

    /// A copy of `slot`'s bytes (for checks).
    ///
    /// # Safety
    /// Nothing may write the slot meanwhile.
    pub unsafe fn slot_copy(&self, slot: usize) -> Option<Vec<u8>> {
        // SAFETY: as for slot_mut, read-only and brief; the caller promises no concurrent writer.
        unsafe { self.slot_mut(slot).map(|s| s.to_vec()) }
    }
}

impl Context<'_> {
    /// A new tensor of type `ty` and shape `{ne0, ne1, n_slots}` over `pool`: matrix `s` starts `offset` bytes into
    /// slot `s` (rows of `ne0` values back to back). The matrix must fit its slot after `offset`. The context keeps
    /// the pool alive.
    pub fn pool_tensor(
        &self,
        pool: &Arc<SlotPool>,
        ty: GgmlType,
        ne0: i64,
        ne1: i64,
        offset: usize,
    ) -> Result<Tensor<'_>> {
        let err = |detail: String| GgmlError::Bind {
            tensor: format!("expert cache view {ty} {{{ne0}, {ne1}}}"),
            detail,
        };
        let row = row_size(ty, ne0)?;
        let matrix = usize::try_from(ne1)
            .ok()
            .and_then(|n| n.checked_mul(row))
            .ok_or_else(|| err("too large".into()))?;
        if offset
            .checked_add(matrix)
            .is_none_or(|end| end > pool.stride)
        {
            return Err(err(format!(
                "bytes {offset}..+{matrix} do not fit a slot of {} bytes",
                pool.stride
            )));
        }
        let region = self.pool_region(pool)?;
        let t = self.new_tensor(ty, &[ne0, ne1, pool.n_slots as i64])?;
        t.set_strides(2, pool.stride);
        self.bind(t, region, offset)?;
        Ok(t)
    }
}

/// One tensor of a device slot pool: type, `{ne0, ne1}` of one expert's matrix, where it starts within a slot,
/// and its name.
pub struct SlotPart {
    pub ty: GgmlType,
    pub ne0: i64,
    pub ne1: i64,
    pub offset: usize,
    pub name: String,
}

impl Context<'_> {
    /// A pool of `n_slots` slots of `stride` bytes in one buffer of `device`'s memory, and tensors over it as
    /// [`Context::pool_tensor`] makes over host memory: each `{ne0, ne1, n_slots}`, matrix `s` at
    /// `s * stride + offset`. The context owns the buffer.
    pub fn device_slot_tensors(
        &self,
        device: super::Device,
        n_slots: usize,
        stride: usize,
        parts: &[SlotPart],
    ) -> Result<Vec<Tensor<'_>>> {
        let buft = device.buffer_type();
        let mut tensors = Vec::with_capacity(parts.len());
        let mut need = n_slots
            .checked_mul(stride)
            .ok_or_else(|| GgmlError::Alloc {
                what: format!("{n_slots} expert slots of {stride} bytes"),
            })?;
        for p in parts {
            let row = row_size(p.ty, p.ne0)?;
            usize::try_from(p.ne1)
                .ok()
                .and_then(|n| n.checked_mul(row))
                .filter(|&m| p.offset.checked_add(m).is_some_and(|end| end <= stride))
                .ok_or_else(|| GgmlError::Bind {
                    tensor: p.name.clone(),
                    detail: format!(
                        "{} {{{}, {}}} from byte {} does not fit a slot of {stride} bytes",
                        p.ty, p.ne0, p.ne1, p.offset
                    ),
                })?;
            let t = self.new_tensor(p.ty, &[p.ne0, p.ne1, n_slots as i64])?;
            t.set_strides(2, stride);
            t.set_name(&p.name)?;
            // SAFETY: a live buffer type and a tensor of this context; the call computes a size.
            let size = unsafe { sys::ggml_backend_buft_get_alloc_size(buft, t.as_ptr()) };
            need = need.max(p.offset + size);
            tensors.push(t);
        }
        // SAFETY: a live buffer type; returns NULL on failure or a buffer the caller owns.
        let buf = unsafe { sys::ggml_backend_buft_alloc_buffer(buft, need) };
        let buf = super::backend::OwnedBuffer::new(buf).ok_or_else(|| GgmlError::Alloc {
            what: format!(
                "an expert cache of {n_slots} slots of {stride} bytes on {}",
                device.name()
            ),
        })?;
        // SAFETY: a live buffer.
        let base = unsafe { sys::ggml_backend_buffer_get_base(buf.as_ptr()) } as usize;
        for (t, p) in tensors.iter().zip(parts) {
            // SAFETY: the tensor has no data yet and its bytes (offset + alloc size) lie within the buffer, sized
            // above for them.
            let status = unsafe {
                sys::ggml_backend_tensor_alloc(
                    buf.as_ptr(),
                    t.as_ptr(),
                    (base + p.offset) as *mut std::ffi::c_void,
                )
            };
            if status != sys::GGML_STATUS_SUCCESS {
                return Err(GgmlError::Bind {
                    tensor: p.name.clone(),
                    detail: format!("ggml could not place it in the pool (status {status})"),
                });
            }
        }
        self.buffers.borrow_mut().push(buf);
        Ok(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::CpuBackend;

    #[test]
    fn slots_are_aligned_and_writable_and_matmul_reads_the_slot_it_is_given() {
        let pool = Arc::new(SlotPool::new(3, 100).unwrap());
        assert_eq!(pool.stride(), 128);
        assert_eq!(pool.bytes(), 384);
        // SAFETY (test): nothing reads the pool yet.
        unsafe {
            assert!(pool.slot_mut(3).is_none());
            for s in 0..3 {
                let slot = pool.slot_mut(s).unwrap();
                // A 2x2 F32 matrix [[s+1, 0], [0, s+1]] at byte 16 of the slot.
                let v = (s + 1) as f32;
                for (i, x) in [v, 0.0, 0.0, v].iter().enumerate() {
                    slot[16 + 4 * i..20 + 4 * i].copy_from_slice(&x.to_le_bytes());
                }
            }
        }
        let weights = Context::with_capacity(4, 0).unwrap();
        let w = weights.pool_tensor(&pool, GgmlType::F32, 2, 2, 16).unwrap();
        assert_eq!(w.ne(), [2, 2, 3, 1]);
        assert_eq!(w.nb()[2], 128);
        assert!(
            weights
                .pool_tensor(&pool, GgmlType::F32, 2, 16, 100)
                .is_err(),
            "past the slot"
        );

        let ctx = Context::with_capacity(8, 16).unwrap();
        let x = ctx.new_tensor_3d(GgmlType::F32, 2, 1, 2).unwrap();
        let ids = ctx.new_tensor_2d(GgmlType::I32, 1, 2).unwrap();
        let y = ctx.mul_mat_id(w, x, ids).unwrap();
        let mut g = ctx.new_graph(16).unwrap();
        g.expand(y).unwrap();
        let backend = CpuBackend::new(1).unwrap();
        ctx.alloc_tensors(&backend).unwrap();
        x.set_f32(&[1.0, 2.0, 1.0, 2.0]).unwrap();
        ids.set_i32(&[2, 0]).unwrap();
        backend.compute(&g).unwrap();
        assert_eq!(y.get_f32().unwrap(), vec![3.0, 6.0, 1.0, 2.0]);
    }
}
