//! The backends and devices compiled into this binary's ggml (CPU always; CUDA, Vulkan, Metal, CANN by feature),
//! for `ferrite info` and the planner.

use llama_cpp_sys_2 as sys;

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

#[cfg(test)]
mod tests {
    use super::*;

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
