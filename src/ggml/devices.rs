//! The backends and devices compiled into this binary's ggml (CPU always; CUDA, Vulkan, Metal, CANN by feature),
//! for `ferrite info` and the planner.

use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::error::{GgmlError, Result};
use super::types::cstr_lossy;

/// What kind of device ggml reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
    Other(u32),
}

/// One ggml device: its backend ("CPU", "CUDA", "CANN", ...), name, the name of its buffer type (what llama.cpp's
/// `-ot REGEX=BUFFER` names: "CPU", "CUDA0", "RPC0[127.0.0.1:50052]"), description, kind and memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub backend: String,
    pub name: String,
    pub buffer_type: String,
    pub description: String,
    pub kind: DeviceKind,
    pub memory_free: usize,
    pub memory_total: usize,
}

/// Names of the registered backends (`ggml_backend_reg_*`), e.g. `["CPU"]`.
pub fn backend_names() -> Vec<String> {
    // SAFETY: the registry is initialized on first use inside ggml; the count and entries are stable afterwards.
    let n = unsafe { sys::ggml_backend_reg_count() };
    (0..n)
        .map(|i| {
            // SAFETY: `i` < count, so ggml returns a registered backend with a static name.
            cstr_lossy(unsafe { sys::ggml_backend_reg_name(sys::ggml_backend_reg_get(i)) })
        })
        .collect()
}

/// Every device of every registered backend.
pub fn devices() -> Vec<DeviceInfo> {
    // SAFETY: as in `backend_names`.
    let n = unsafe { sys::ggml_backend_dev_count() };
    (0..n).filter_map(device).collect()
}

fn device(i: usize) -> Option<DeviceInfo> {
    // SAFETY: `i` < ggml_backend_dev_count(), so ggml returns a registered device (or NULL).
    let dev = unsafe { sys::ggml_backend_dev_get(i) };
    if dev.is_null() {
        return None;
    }
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: `dev` is a registered device living for the whole program; strings are owned by it; the memory
    // query writes two usize values.
    let (name, description, kind, reg, buft) = unsafe {
        sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
        (
            cstr_lossy(sys::ggml_backend_dev_name(dev)),
            cstr_lossy(sys::ggml_backend_dev_description(dev)),
            sys::ggml_backend_dev_type(dev),
            sys::ggml_backend_dev_backend_reg(dev),
            sys::ggml_backend_dev_buffer_type(dev),
        )
    };
    let buffer_type = if buft.is_null() {
        String::new()
    } else {
        // SAFETY: the device's default buffer type lives as long as the device; its name is owned by it.
        cstr_lossy(unsafe { sys::ggml_backend_buft_name(buft) })
    };
    let backend = if reg.is_null() {
        String::new()
    } else {
        // SAFETY: a registered backend with a static name.
        cstr_lossy(unsafe { sys::ggml_backend_reg_name(reg) })
    };
    let kind = match kind {
        sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
        sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
        sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
        sys::GGML_BACKEND_DEVICE_TYPE_ACCEL => DeviceKind::Accelerator,
        other => DeviceKind::Other(other),
    };
    Some(DeviceInfo {
        backend,
        name,
        buffer_type,
        description,
        kind,
        memory_free: free,
        memory_total: total,
    })
}

/// A device registered in ggml's registry (the CPU, a GPU, an RPC server's device, ...): a handle that lives for the
/// whole program (ggml never unregisters devices). Compare handles with `==`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Device(NonNull<sys::ggml_backend_device>);

// SAFETY: a registered device is an immutable descriptor owned by ggml's registry for the whole program; its
// functions (name, memory, buffer type, support queries) may be called from any thread.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

impl Device {
    /// Every registered device, in registry order (the CPU among them).
    pub fn all() -> Vec<Device> {
        // SAFETY: the registry is initialized on first use; indices below the count give registered devices.
        let n = unsafe { sys::ggml_backend_dev_count() };
        (0..n)
            // SAFETY: `i` < count.
            .filter_map(|i| NonNull::new(unsafe { sys::ggml_backend_dev_get(i) }).map(Device))
            .collect()
    }

    /// The device named `name` (`CPU`, `RPC0`, `CUDA0`, ...; ggml compares case-insensitively), if registered.
    pub fn by_name(name: &str) -> Option<Device> {
        let c = std::ffi::CString::new(name).ok()?;
        // SAFETY: a NUL-terminated name; ggml returns a registered device or NULL.
        NonNull::new(unsafe { sys::ggml_backend_dev_by_name(c.as_ptr()) }).map(Device)
    }

    /// The CPU device.
    pub fn cpu() -> Option<Device> {
        Device::all().into_iter().find(|d| d.is_cpu())
    }

    pub(super) fn as_ptr(self) -> sys::ggml_backend_dev_t {
        self.0.as_ptr()
    }

    /// # Safety
    /// `ptr` must be NULL or a registered device.
    pub(super) unsafe fn from_raw(ptr: sys::ggml_backend_dev_t) -> Option<Device> {
        NonNull::new(ptr).map(Device)
    }

    /// ggml's name of the device (`CPU`, `RPC0`, ...).
    pub fn name(self) -> String {
        // SAFETY: a registered device; the name is owned by it.
        cstr_lossy(unsafe { sys::ggml_backend_dev_name(self.as_ptr()) })
    }

    /// The device's description (for an RPC device: its server's `HOST:PORT`).
    pub fn description(self) -> String {
        // SAFETY: as in `name`.
        cstr_lossy(unsafe { sys::ggml_backend_dev_description(self.as_ptr()) })
    }

    /// True for the CPU device (computes in host memory with ferrite's CPU backend).
    pub fn is_cpu(self) -> bool {
        // SAFETY: a registered device.
        unsafe { sys::ggml_backend_dev_type(self.as_ptr()) == sys::GGML_BACKEND_DEVICE_TYPE_CPU }
    }

    /// True for a device of ggml's RPC backend (one served by `ferrite rpc-server` or llama.cpp's `rpc-server`).
    pub fn is_rpc(self) -> bool {
        // SAFETY: a registered device; its backend registration (if any) has a static name.
        let reg = unsafe { sys::ggml_backend_dev_backend_reg(self.as_ptr()) };
        // SAFETY: a registered backend with a static name.
        !reg.is_null() && cstr_lossy(unsafe { sys::ggml_backend_reg_name(reg) }).starts_with("RPC")
    }

    /// True for a discrete GPU or an accelerator (memory of its own, apart from the host's RAM), not an integrated
    /// GPU sharing the RAM.
    pub fn has_own_memory(self) -> bool {
        // SAFETY: a registered device.
        let t = unsafe { sys::ggml_backend_dev_type(self.as_ptr()) };
        t == sys::GGML_BACKEND_DEVICE_TYPE_GPU || t == sys::GGML_BACKEND_DEVICE_TYPE_ACCEL
    }

    /// Free and total bytes of the device's memory, as it reports them.
    pub fn memory(self) -> (usize, usize) {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: a registered device; the call writes two usize values.
        unsafe { sys::ggml_backend_dev_memory(self.as_ptr(), &mut free, &mut total) };
        (free, total)
    }

    /// The device's default buffer type (where its tensors live).
    pub(super) fn buffer_type(self) -> sys::ggml_backend_buffer_type_t {
        // SAFETY: a registered device; the buffer type lives as long as the device.
        unsafe { sys::ggml_backend_dev_buffer_type(self.as_ptr()) }
    }

    /// True when the device computes `t`'s operator with `t`'s types and shapes (`ggml_backend_dev_supports_op`).
    pub fn supports_op(self, t: super::Tensor<'_>) -> bool {
        // SAFETY: a registered device and a live tensor; the call only inspects them.
        unsafe { sys::ggml_backend_dev_supports_op(self.as_ptr(), t.as_ptr()) }
    }

    /// The fewest tokens from which the device asks to compute a routed-expert product whose weights are in the
    /// CPU's memory (ggml's `offload_op`: CUDA and CANN from 32), probed at powers of two up to 512; `None` when it
    /// never asks (the CPU, RPC devices).
    pub fn smallest_offloaded_batch(self) -> Option<usize> {
        let ctx = super::Context::with_capacity(40, 0).ok()?;
        (0..=9).map(|p| 1usize << p).find(|&n| {
            let node = (|| -> Result<super::Tensor<'_>> {
                let experts = ctx.new_tensor_3d(gguf::GgmlType::F32, 64, 64, 8)?;
                let b = ctx.new_tensor_3d(gguf::GgmlType::F32, 64, 2, n as i64)?;
                let ids = ctx.new_tensor_2d(gguf::GgmlType::I32, 2, n as i64)?;
                ctx.mul_mat_id(experts, b, ids)
            })();
            // SAFETY: a registered device and a live tensor; the call only inspects its shape and operator.
            node.is_ok_and(|t| unsafe {
                sys::ggml_backend_dev_offload_op(self.as_ptr(), t.as_ptr())
            })
        })
    }

    /// True when the device has every DeepSeek V4 operator ferrite's fused form uses (`ggml_dsv4_hc_comb`,
    /// `_pre`, `_post`), asked with small probe nodes of each; layers on a device without them are built with the
    /// primitive-op form. (The lightning indexer is products on every device: see `model::attention`.)
    pub fn supports_dsv4_ops(self) -> bool {
        probe_dsv4(&|t| self.supports_op(t)).unwrap_or(false)
    }

    /// A new backend instance of this device (the CPU has its own type, [`super::CpuBackend`]).
    pub fn backend(self) -> Result<DeviceBackend> {
        // SAFETY: a registered device; NULL params; returns a new backend or NULL.
        let ptr = unsafe { sys::ggml_backend_dev_init(self.as_ptr(), std::ptr::null()) };
        let ptr = NonNull::new(ptr).ok_or_else(|| GgmlError::Op {
            op: "device backend",
            detail: format!("ggml could not start a backend on device {}", self.name()),
        })?;
        Ok(DeviceBackend { ptr, device: self })
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({})", self.name())
    }
}

impl Device {
    /// `len` bytes of the device's host buffer type, when it has one: page-locked RAM on CUDA and CANN, which their
    /// copies to the device read by DMA while the host goes on (from ordinary RAM they first copy through a staging
    /// buffer of their own, holding the calling thread). `None` where the device has no such type (the CPU, RPC).
    pub fn pinned_host(self, len: usize) -> Result<Option<PinnedHost>> {
        // SAFETY: a registered device; returns a buffer type or NULL.
        let buft = unsafe { sys::ggml_backend_dev_host_buffer_type(self.as_ptr()) };
        if buft.is_null() || len == 0 {
            return Ok(None);
        }
        let what = || format!("{len} bytes of host memory for {}", self.name());
        // SAFETY: a live buffer type; returns a new buffer of at least `len` bytes or NULL.
        let raw = unsafe { sys::ggml_backend_buft_alloc_buffer(buft, len) };
        let buf = super::backend::OwnedBuffer::new(raw)
            .ok_or_else(|| GgmlError::Alloc { what: what() })?;
        // SAFETY: a live buffer; its base is the start of its memory (host memory for a host buffer type).
        let base = unsafe { sys::ggml_backend_buffer_get_base(buf.as_ptr()) }.cast::<u8>();
        match NonNull::new(base) {
            Some(base) if buf.size() >= len => Ok(Some(PinnedHost {
                _buf: buf,
                base,
                len,
            })),
            _ => Err(GgmlError::Alloc { what: what() }),
        }
    }
}

/// Host memory from a device's host buffer type ([`Device::pinned_host`]), freed on drop.
pub struct PinnedHost {
    _buf: super::backend::OwnedBuffer,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: plain host memory owned by this value; `&mut self` guards every access to it.
unsafe impl Send for PinnedHost {}

impl PinnedHost {
    /// The whole memory.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes from `base` belong to the buffer this value owns; `&mut self` makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.len) }
    }
}

/// Builds one small node of each fused DeepSeek V4 operator and asks `supports` about each.
pub(crate) fn probe_dsv4(supports: &dyn Fn(super::Tensor<'_>) -> bool) -> Result<bool> {
    use gguf::GgmlType::F32;
    let ctx = super::Context::with_capacity(24, 0)?;
    let hc = 4i64;
    let mixes = ctx.new_tensor_2d(F32, (2 + hc) * hc, 1)?;
    let scale = ctx.new_tensor_1d(F32, 3)?;
    let base = ctx.new_tensor_1d(F32, (2 + hc) * hc)?;
    let comb = ctx.dsv4_hc_comb(mixes, scale, base, 1e-6, 2)?;
    let x = ctx.new_tensor_3d(F32, 8, hc, 1)?;
    let w = ctx.new_tensor_2d(F32, hc, 1)?;
    let pre = ctx.dsv4_hc_pre(x, w)?;
    let out = ctx.new_tensor_2d(F32, 8, 1)?;
    let post = ctx.dsv4_hc_post(out, x, w, Some(comb))?;
    let ok = [comb, pre, post].into_iter().all(supports);
    Ok(ok)
}

/// A backend instance of a non-CPU device (a GPU, an RPC server's device), freed on drop. Graphs run on it only
/// through a [`super::Scheduler`].
pub struct DeviceBackend {
    ptr: NonNull<sys::ggml_backend>,
    device: Device,
}

// SAFETY: a backend instance has no thread affinity; it is used by one thread at a time (`!Sync`).
unsafe impl Send for DeviceBackend {}

impl DeviceBackend {
    pub(super) fn as_ptr(&self) -> sys::ggml_backend_t {
        self.ptr.as_ptr()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Waits until everything queued on this instance (copies, computations) is done.
    pub fn synchronize(&self) {
        // SAFETY: a live backend.
        unsafe { sys::ggml_backend_synchronize(self.as_ptr()) }
    }
}

impl Drop for DeviceBackend {
    fn drop(&mut self) {
        // SAFETY: made by ggml_backend_dev_init and freed once; buffers are independent of the instance.
        unsafe { sys::ggml_backend_free(self.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_never_asks_to_take_products_over() {
        assert_eq!(Device::cpu().unwrap().smallest_offloaded_batch(), None);
    }

    #[test]
    fn the_cpu_is_always_there() {
        assert!(
            backend_names().iter().any(|n| n == "CPU"),
            "{:?}",
            backend_names()
        );
        let devs = devices();
        println!("{devs:#?}");
        assert!(devs
            .iter()
            .any(|d| d.kind == DeviceKind::Cpu && d.backend == "CPU" && d.buffer_type == "CPU"));
    }
}
