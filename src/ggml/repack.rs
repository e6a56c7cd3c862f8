//! Repacked weights: ggml's CPU "extra" buffer types, which store a quantized matrix in a private layout for their
//! own kernels: `CPU_REPACK` interleaves (e.g. Q4_K as Q4_K_8x8, MXFP4 as 8x8) for its AVX2 / AVX-512 / NEON GEMM
//! kernels, `AMX` (a native build on an Intel CPU with AMX: Sapphire Rapids and later) tiles Q4_0/Q4_1/Q8_0/
//! Q4_K/Q5_K/Q6_K/IQ4_XS for the AMX units and keeps F16 for its AVX-512 kernels. Here: the test of which weights a
//! type takes (the one llama.cpp's loader uses), the choice among the types (llama.cpp's: the first, in ggml's
//! order, that takes the weight's product) and a buffer of one, owned by a context, that weights are copied into
//! (ggml converts them on the way in).
//!
//! A repacked tensor's bytes are in ggml's private layout: only the matrix products the test approved may read it
//! (the CPU backend's `supports_op` refuses any other node, and `compute` checks that first), and its buffer has no
//! `get_tensor`, so its data cannot be read back.

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

use super::backend::OwnedBuffer;
use super::context::Context;
use super::error::{GgmlError, Result};
use super::log::capture;
use super::tensor::Tensor;
use super::types::{block_size, cstr_lossy};

/// The name of ggml's repacking buffer type among the CPU's extra buffer types.
const REPACK_NAME: &str = "CPU_REPACK";
/// The name of ggml's AMX buffer type among them.
const AMX_NAME: &str = "AMX";

/// Rows of the activation in the test product: a prompt micro-batch, as in llama.cpp's loader.
const TEST_ROWS: i64 = 512;

/// The matrix product a weight is the first operand of: what the repacked kernels must support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightOp {
    /// `mul_mat(w, x)` with a 2-D matrix `w {k, m}`.
    MulMat,
    /// `mul_mat_id(w, x, ids)` with stacked experts `w {k, m, n_expert}`, `n_used` of them per token.
    MulMatId { n_used: usize },
}

/// A weight to repack: its tensor (of the context, with no data yet), its bytes in ggml's plain layout (e.g. a slice
/// of a GGUF map) and the product that reads it.
#[derive(Clone, Copy, Debug)]
pub struct RepackWeight<'t, 'b> {
    pub tensor: Tensor<'t>,
    pub bytes: &'b [u8],
    pub op: WeightOp,
}

/// How many weights a context holds repacked, and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepackedStats {
    pub tensors: usize,
    /// Their bytes in ggml's plain layout (as in the file).
    pub bytes: u64,
    /// The bytes their buffers hold for them (a layout may be larger than the plain one: AMX's).
    pub ram_bytes: u64,
}

/// One of ggml's CPU extra buffer types (`CPU_REPACK`, `AMX`, ...) and the CPU device that computes from it.
#[derive(Clone, Copy, Debug)]
pub struct RepackType {
    buft: sys::ggml_backend_buffer_type_t,
    dev: sys::ggml_backend_dev_t,
}

// SAFETY: both pointers name objects of ggml's CPU backend registry, created once and never freed or changed for the
// life of the process; ggml's own threads use them from any thread. Copying the pointers between threads is sound.
unsafe impl Send for RepackType {}
// SAFETY: as for `Send`: shared references only read the pointers, and the objects they name are immutable.
unsafe impl Sync for RepackType {}

impl RepackType {
    /// The CPU backend's extra buffer types in ggml's order, found the way llama.cpp finds them (the CPU registry's
    /// `ggml_backend_dev_get_extra_bufts`): `AMX` first where ggml was built for it and the OS lets the process use
    /// the tiles, then `CPU_REPACK` (absent with `GGML_CPU_REPACK=OFF`). Read once: ggml's list is fixed for the
    /// life of the process.
    pub fn all() -> &'static [RepackType] {
        static TYPES: std::sync::OnceLock<Vec<RepackType>> = std::sync::OnceLock::new();
        TYPES.get_or_init(extra_types)
    }

    /// The CPU backend's `CPU_REPACK` buffer type (the interleaved layouts the grouped expert products read);
    /// `None` when ggml was built without it.
    pub fn cpu() -> Option<RepackType> {
        RepackType::named(REPACK_NAME)
    }

    /// The CPU backend's `AMX` buffer type; `None` where ggml was not built for AMX or the OS refuses the tiles.
    pub fn amx() -> Option<RepackType> {
        RepackType::named(AMX_NAME)
    }

    fn named(name: &str) -> Option<RepackType> {
        RepackType::all().iter().copied().find(|t| t.name() == name)
    }

    /// Which buffer type llama.cpp's loader gives `weight` with repacking on: the index in [`RepackType::all`] of
    /// the first type that computes `op` from it; `None` when none does (the weight stays in a plain buffer).
    pub fn index_for(weight: Tensor<'_>, op: WeightOp) -> Result<Option<usize>> {
        for (i, ty) in RepackType::all().iter().enumerate() {
            if ty.supports(weight, op)? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Whether `buf` is a buffer of one of ggml's CPU extra types, whose layouts cannot be read back.
    pub(super) fn holds(buf: sys::ggml_backend_buffer_t) -> bool {
        RepackType::all().iter().any(|t| t.is_type_of(buf))
    }

    /// The buffer type's name (`CPU_REPACK`, `AMX`).
    pub fn name(&self) -> String {
        // SAFETY: a static buffer type; its name is a static string.
        cstr_lossy(unsafe { sys::ggml_backend_buft_name(self.buft) })
    }

    /// Whether the CPU computes `op` with `weight` stored in this buffer type: llama.cpp's `weight_buft_supported`
    /// (the product of a same-shaped weight with a micro-batch, its weight in an empty buffer of this type, asked of
    /// the CPU device), plus the size limit of ggml's repack routines (an `int` count of blocks). False for types
    /// and shapes the host's kernels have no layout for (e.g. Q8_0 on x86, rows not a multiple of 8).
    pub fn supports(&self, weight: Tensor<'_>, op: WeightOp) -> Result<bool> {
        let Some(ty) = weight.ty() else {
            return Ok(false);
        };
        let ne = weight.ne();
        let blocks = weight.n_elements() / block_size(ty).max(1);
        if blocks > i32::MAX as i64 {
            return Ok(false);
        }
        let ctx = Context::with_capacity(4, 0)?;
        let w = ctx.new_tensor(ty, &ne)?;
        let product = match op {
            WeightOp::MulMat => {
                let x = ctx.new_tensor_4d(GgmlType::F32, [ne[0], TEST_ROWS, ne[2], ne[3]])?;
                ctx.mul_mat(w, x)?
            }
            WeightOp::MulMatId { n_used } => {
                let n_used = n_used.max(1) as i64;
                let x = ctx.new_tensor_3d(GgmlType::F32, ne[0], n_used, TEST_ROWS)?;
                let ids = ctx.new_tensor_2d(GgmlType::I32, n_used, TEST_ROWS)?;
                ctx.mul_mat_id(w, x, ids)?
            }
        };
        // SAFETY: a static buffer type; size 0 gives a dummy buffer that only records the type (no memory).
        let dummy = OwnedBuffer::new(unsafe { sys::ggml_backend_buft_alloc_buffer(self.buft, 0) })
            .ok_or_else(|| GgmlError::Alloc {
                what: format!("an empty {} buffer", self.name()),
            })?;
        let w_raw = w.as_ptr();
        // SAFETY: `w` is a tensor of `ctx` with no buffer and no data; pointing it at the dummy buffer only lets
        // supports_op read the buffer type (it reads no data), and it is detached again before either is freed.
        let supported = unsafe {
            (*w_raw).buffer = dummy.as_ptr();
            let ok = sys::ggml_backend_dev_supports_op(self.dev, product.as_ptr());
            (*w_raw).buffer = std::ptr::null_mut();
            ok
        };
        Ok(supported)
    }

    /// Bytes `weight` takes in a buffer of this type: its layout may be larger than ggml's plain one (AMX keeps a
    /// 4-byte sum per Q8_0 block of 32, +12 %, and 4 bytes per K-quant block, +3 %; CPU_REPACK's layouts are the
    /// plain size).
    pub fn alloc_size(&self, weight: Tensor<'_>) -> u64 {
        // SAFETY: a static buffer type and a live tensor of a context; the call reads the tensor's type and shape.
        unsafe { sys::ggml_backend_buft_get_alloc_size(self.buft, weight.as_ptr()) as u64 }
    }

    pub(super) fn is_type_of(&self, buf: sys::ggml_backend_buffer_t) -> bool {
        // SAFETY: a live buffer (callers pass a tensor's buffer); the call reads its type field.
        !buf.is_null() && unsafe { sys::ggml_backend_buffer_get_type(buf) } == self.buft
    }
}

/// The CPU device's extra buffer types, in the order ggml lists them; empty when the registry has no CPU device or
/// no such list.
fn extra_types() -> Vec<RepackType> {
    // SAFETY: returns ggml's static CPU registry (initialised on first use).
    let reg = unsafe { sys::ggml_backend_cpu_reg() };
    // SAFETY: a live registry; the count is a plain read.
    if reg.is_null() || unsafe { sys::ggml_backend_reg_dev_count(reg) } == 0 {
        return Vec::new();
    }
    // SAFETY: index 0 < the device count checked above; the device is static.
    let dev = unsafe { sys::ggml_backend_reg_dev_get(reg, 0) };
    let name = c"ggml_backend_dev_get_extra_bufts";
    // SAFETY: a live registry and a NUL-terminated name; returns NULL or the function registered under it.
    let proc = unsafe { sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr()) };
    if dev.is_null() || proc.is_null() {
        return Vec::new();
    }
    // SAFETY: the CPU registry returns, under this name, a function of exactly this signature
    // (`ggml_backend_dev_get_extra_bufts_t`); a non-null data pointer from it is a valid function pointer.
    let get_extra: unsafe extern "C" fn(
        sys::ggml_backend_dev_t,
    ) -> *mut sys::ggml_backend_buffer_type_t = unsafe { std::mem::transmute(proc) };
    let mut types = Vec::new();
    // SAFETY: `dev` is the CPU device; the result is a static, NULL-terminated array (or NULL).
    let mut cur = unsafe { get_extra(dev) };
    // SAFETY: walks the array up to its NULL terminator; each entry is a static buffer type.
    while !cur.is_null() && !unsafe { *cur }.is_null() {
        types.push(RepackType {
            buft: unsafe { *cur },
            dev,
        });
        cur = unsafe { cur.add(1) };
    }
    types
}

/// One buffer of `buft` (or several behind one handle, `name` in errors) holding `weights`, each placed by ggml,
/// marked as holding weights, in transparent huge pages where the OS has them (advised before anything touches it).
/// On an error no weight keeps a buffer.
fn alloc_weights(
    buft: sys::ggml_backend_buffer_type_t,
    name: &str,
    weights: &[RepackWeight<'_, '_>],
) -> Result<OwnedBuffer> {
    let mut raw: Vec<*mut sys::ggml_tensor> = weights.iter().map(|w| w.tensor.as_ptr()).collect();
    let bytes: usize = weights.iter().map(|w| w.tensor.n_bytes()).sum();
    let alloc_err = || GgmlError::Alloc {
        what: format!(
            "a {name} buffer of {bytes} bytes for {} weights",
            weights.len()
        ),
    };
    let n = i32::try_from(raw.len()).map_err(|_| alloc_err())?;
    // SAFETY: every tensor belongs to one live context and has no data and no view source (checked by the caller);
    // the call plans the buffer, places each tensor in it (for a repack buffer, ggml's init_tensor records the
    // chosen layout in `extra`) and returns the buffer, which the caller owns, or NULL with nothing placed.
    let buf = unsafe { sys::ggml_backend_buft_alloc_buffer_n(buft, raw.as_mut_ptr(), n) };
    let buf = OwnedBuffer::new(buf).ok_or_else(alloc_err)?;
    // SAFETY: a live buffer; marks it as holding weights for schedulers.
    unsafe {
        sys::ggml_backend_buffer_set_usage(buf.as_ptr(), sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
    };
    // SAFETY: a live buffer; its base and size delimit the memory ggml allocated for it.
    let base = unsafe { sys::ggml_backend_buffer_get_base(buf.as_ptr()) };
    // Transparent huge pages while the buffer fills (a hint; a no-op off Linux).
    crate::os::advise_huge_pages(base.cast(), buf.size());
    Ok(buf)
}

/// One buffer of `ty` holding `weights`, each placed with the repacked layout ggml chose for it (see
/// [`alloc_weights`]). On an error no weight keeps a buffer.
fn alloc_buffer(ty: RepackType, weights: &[RepackWeight<'_, '_>]) -> Result<OwnedBuffer> {
    let buf = alloc_weights(ty.buft, &ty.name(), weights)?;
    // SAFETY: every tensor was just placed; `extra` is a plain field of it.
    let no_layout = |w: &&RepackWeight<'_, '_>| unsafe { (*w.tensor.as_ptr()).extra }.is_null();
    if let Some(w) = weights.iter().find(no_layout) {
        for w in weights {
            let t = w.tensor.as_ptr();
            // SAFETY: tensors of a live context that nothing has used yet: taking their data back before the
            // buffer is freed (on return) leaves no pointer into it.
            unsafe {
                (*t).buffer = std::ptr::null_mut();
                (*t).data = std::ptr::null_mut();
                (*t).extra = std::ptr::null_mut();
            }
        }
        return Err(GgmlError::Op {
            op: "repack",
            detail: format!(
                "ggml chose no repacked layout for '{}' {:?}",
                w.tensor.label(),
                w.tensor
            ),
        });
    }
    Ok(buf)
}

impl Context<'_> {
    /// Allocates `weights` (tensors of this context with no data, not views) in one buffer of `ty` that this
    /// context owns, and copies each one's bytes in, which repacks them; `copied(i)` runs after weight `i` is in
    /// (e.g. to drop its source pages from memory). Every weight is checked first ([`RepackType::supports`] for its
    /// product, its byte count), so ggml never aborts on one; on an error no weight is allocated. Returns the bytes
    /// of the buffer.
    pub fn repack(
        &self,
        ty: RepackType,
        weights: &[RepackWeight<'_, '_>],
        mut copied: impl FnMut(usize),
    ) -> Result<usize> {
        if weights.is_empty() {
            return Ok(0);
        }
        for w in weights {
            self.check_repackable(ty, w)?;
        }
        let buf = alloc_buffer(ty, weights)?;
        // ggml logs a debug line per repacked tensor; captured (and dropped) so it does not reach the terminal.
        let (size, _debug) = capture(|| self.fill_weights(buf, weights, &mut copied));
        Ok(size)
    }

    /// Keeps `buf` (where every one of `weights` was placed, with a layout ggml chose for a repack buffer) and
    /// writes each weight's bytes in, calling `copied(i)` after weight `i`; returns the buffer's size.
    fn fill_weights(
        &self,
        buf: OwnedBuffer,
        weights: &[RepackWeight<'_, '_>],
        copied: &mut impl FnMut(usize),
    ) -> usize {
        let size = buf.size();
        self.buffers.borrow_mut().push(buf);
        for (i, w) in weights.iter().enumerate() {
            // The source's pages mapped in one call before it is read (a hint; a no-op off Linux).
            crate::os::populate_read(w.bytes);
            // SAFETY: the tensor is allocated in a live buffer of this context (with a layout chosen, for a repack
            // buffer); the whole tensor is written from offset 0 with exactly its byte count (checked by the
            // callers), as the repack set_tensor asserts; `bytes` is readable for the call. ggml writes only the
            // tensor's own bytes.
            unsafe {
                sys::ggml_backend_tensor_set(
                    w.tensor.as_ptr(),
                    w.bytes.as_ptr().cast(),
                    0,
                    w.bytes.len(),
                )
            };
            copied(i);
        }
        size
    }

    /// Allocates `weights` (tensors of this context with no data, not views) in one plain host buffer that this
    /// context owns, in transparent huge pages where the OS has them, and copies each one's bytes in unchanged (the
    /// kernels read them as from the map, with fewer TLB misses and hardware prefetch across 2 MiB instead of
    /// 4 KiB pages); `copied(i)` runs after weight `i` is in. Every weight is checked first; on an error none is
    /// allocated. Returns the bytes of the buffer.
    pub fn copy_into_ram(
        &self,
        weights: &[RepackWeight<'_, '_>],
        mut copied: impl FnMut(usize),
    ) -> Result<usize> {
        if weights.is_empty() {
            return Ok(0);
        }
        for w in weights {
            self.check_unplaced("copy into RAM", w)?;
        }
        // SAFETY: returns ggml's static CPU buffer type.
        let buft = unsafe { sys::ggml_backend_cpu_buffer_type() };
        let buf = alloc_weights(buft, "host", weights)?;
        Ok(self.fill_weights(buf, weights, &mut copied))
    }

    /// Whether `t` (a tensor of this context) lives in a buffer this context owns: repacked or copied into RAM,
    /// not bound to a mapped file.
    pub fn is_in_ram(&self, t: Tensor<'_>) -> bool {
        let buffer = t.buffer();
        t.view_source().is_none()
            && !buffer.is_null()
            && self.buffers.borrow().iter().any(|b| b.as_ptr() == buffer)
    }

    /// Locks every buffer this context owns in RAM (`mlock`: its repacked and copied weights); returns the bytes
    /// locked.
    pub fn lock_owned(&self) -> std::io::Result<u64> {
        let mut locked = 0u64;
        for buf in self.buffers.borrow().iter() {
            // SAFETY: the buffer is alive while the context borrows it; get_base returns its start, `size` bytes
            // long. The slice is only handed to mlock, which reads nothing through it.
            let bytes = unsafe {
                let base = sys::ggml_backend_buffer_get_base(buf.as_ptr()) as *const u8;
                std::slice::from_raw_parts(base, buf.size())
            };
            crate::os::lock_memory(bytes)?;
            locked += bytes.len() as u64;
        }
        Ok(locked)
    }

    /// A weight may be given bytes: a tensor of this context, with no data, not a view, `w.bytes` its size.
    fn check_unplaced(&self, op: &'static str, w: &RepackWeight<'_, '_>) -> Result<()> {
        let t = w.tensor;
        if !self.owns(t) {
            return Err(GgmlError::ForeignTensor {
                op,
                tensor: t.label(),
            });
        }
        if t.is_allocated() || t.view_source().is_some() {
            return Err(GgmlError::Op {
                op,
                detail: format!("'{}' already has data or is a view", t.label()),
            });
        }
        if w.bytes.len() != t.n_bytes() {
            return Err(GgmlError::Data {
                tensor: t.label(),
                detail: format!(
                    "holds {} bytes, the slice to copy has {}",
                    t.n_bytes(),
                    w.bytes.len()
                ),
            });
        }
        Ok(())
    }

    fn check_repackable(&self, ty: RepackType, w: &RepackWeight<'_, '_>) -> Result<()> {
        let t = w.tensor;
        self.check_unplaced("repack", w)?;
        if !ty.supports(t, w.op)? {
            return Err(GgmlError::Op {
                op: "repack",
                detail: format!(
                    "{} has no layout for '{}' {t:?} in {:?}; hint: check RepackType::supports first",
                    ty.name(),
                    t.label(),
                    w.op
                ),
            });
        }
        Ok(())
    }

    /// The weights of this context that live repacked in a buffer of `ty`, and their bytes.
    pub fn repacked(&self, ty: RepackType) -> RepackedStats {
        self.repacked_where(|buf| ty.is_type_of(buf))
    }

    /// The weights of this context that live repacked in a buffer of any of ggml's CPU extra types
    /// ([`RepackType::all`]), and their bytes.
    pub fn repacked_all(&self) -> RepackedStats {
        self.repacked_where(RepackType::holds)
    }

    /// The tensors of this context (not views) whose buffer passes `is_repack_buffer`, and their bytes.
    fn repacked_where(
        &self,
        is_repack_buffer: impl Fn(sys::ggml_backend_buffer_t) -> bool,
    ) -> RepackedStats {
        let mut stats = RepackedStats::default();
        for t in self.tensors() {
            if t.view_source().is_none() && is_repack_buffer(t.buffer()) {
                stats.tensors += 1;
                stats.bytes += t.n_bytes() as u64;
                // SAFETY: a live tensor of this context and its buffer; the call reads the buffer's type and the
                // tensor's type and shape.
                stats.ram_bytes +=
                    unsafe { sys::ggml_backend_buffer_get_alloc_size(t.buffer(), t.as_ptr()) }
                        as u64;
            }
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::{quantize_rows, CpuBackend};

    /// A `{k, m}` matrix of `ty` with smooth pseudo-random values, quantized.
    fn matrix(ty: GgmlType, k: usize, m: usize) -> Vec<u8> {
        let v: Vec<f32> = (0..k * m)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
            .collect();
        quantize_rows(ty, &v, k, None).unwrap()
    }

    /// `w x` for `x` of `n` columns, with `w` repacked into a buffer of `repack` or plainly allocated; also how
    /// many weights the context holds repacked.
    fn product(
        ty: GgmlType,
        bytes: &[u8],
        k: usize,
        m: usize,
        n: usize,
        repack: Option<RepackType>,
    ) -> (Vec<f32>, usize) {
        let weights = Context::with_capacity(1, 0).unwrap();
        let w = weights.new_tensor_2d(ty, k as i64, m as i64).unwrap();
        w.set_name("w").unwrap();
        if let Some(rt) = repack {
            let item = RepackWeight {
                tensor: w,
                bytes,
                op: WeightOp::MulMat,
            };
            let mut seen = Vec::new();
            weights.repack(rt, &[item], |i| seen.push(i)).unwrap();
            assert_eq!(seen, [0]);
        } else {
            weights.alloc_tensors_host().unwrap();
            w.set_bytes(bytes).unwrap();
        }
        let ctx = Context::with_capacity(4, 8).unwrap();
        let x = ctx
            .new_tensor_2d(GgmlType::F32, k as i64, n as i64)
            .unwrap();
        let y = ctx.mul_mat(w, x).unwrap();
        let mut g = ctx.new_graph(8).unwrap();
        g.expand(y).unwrap();
        ctx.alloc_tensors_host().unwrap();
        let xs: Vec<f32> = (0..k * n)
            .map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0)
            .collect();
        x.set_f32(&xs).unwrap();
        CpuBackend::new(2).unwrap().compute(&g).unwrap();
        (y.get_f32().unwrap(), weights.repacked_all().tensors)
    }

    #[test]
    fn the_repack_type_is_found_and_refuses_what_it_cannot_hold() {
        let rt = RepackType::cpu().expect("ggml is built with CPU_REPACK");
        assert_eq!(rt.name(), REPACK_NAME);
        let names: Vec<String> = RepackType::all().iter().map(|t| t.name()).collect();
        eprintln!("the CPU's extra buffer types: {names:?}");
        assert_eq!(names.iter().filter(|n| *n == REPACK_NAME).count(), 1);
        let ctx = Context::with_capacity(4, 0).unwrap();
        let f32_w = ctx.new_tensor_2d(GgmlType::F32, 256, 64).unwrap();
        assert!(
            !rt.supports(f32_w, WeightOp::MulMat).unwrap(),
            "F32 has no repacked layout"
        );
        assert!(
            RepackType::index_for(f32_w, WeightOp::MulMat)
                .unwrap()
                .is_none(),
            "no extra type takes F32"
        );
        let odd_rows = ctx.new_tensor_2d(GgmlType::Q4K, 256, 12).unwrap();
        assert!(
            !rt.supports(odd_rows, WeightOp::MulMat).unwrap(),
            "rows not a multiple of 8"
        );
        let experts = ctx.new_tensor_3d(GgmlType::Q4K, 256, 64, 4).unwrap();
        assert!(
            !rt.supports(experts, WeightOp::MulMat).unwrap(),
            "a 3-D plain product"
        );
        // Refused up front with a typed error, nothing allocated.
        let bytes = vec![0u8; f32_w.n_bytes()];
        let item = RepackWeight {
            tensor: f32_w,
            bytes: &bytes,
            op: WeightOp::MulMat,
        };
        assert!(matches!(
            ctx.repack(rt, &[item], |_| {}),
            Err(GgmlError::Op { .. })
        ));
        let short = RepackWeight {
            bytes: &bytes[1..],
            ..item
        };
        assert!(matches!(
            ctx.repack(rt, &[short], |_| {}),
            Err(GgmlError::Data { .. })
        ));
        assert!(!f32_w.is_allocated());
        assert_eq!(ctx.repacked(rt), RepackedStats::default());
    }

    /// Every extra buffer type of this host (CPU_REPACK with AVX2 / AVX-512 / NEON; AMX on Intel CPUs with it)
    /// gives the plain product up to rounding for the weight types it takes: Q4_K and Q8_0 (F16: AMX's AVX-512
    /// kernels), one column (decode) and several (a prompt), in the shapes llama.cpp's loader would give it.
    #[test]
    fn every_extra_type_gives_the_plain_product() {
        let (k, m) = (512, 32);
        let mut checked = 0;
        for ty in [GgmlType::Q4K, GgmlType::Q8_0, GgmlType::F16] {
            let probe = Context::with_capacity(1, 0).unwrap();
            let t = probe.new_tensor_2d(ty, k as i64, m as i64).unwrap();
            let bytes = matrix(ty, k, m);
            let columns = [1, 5, 16];
            let plain = columns.map(|n| product(ty, &bytes, k, m, n, None));
            for &rt in RepackType::all() {
                if !rt.supports(t, WeightOp::MulMat).unwrap() {
                    eprintln!("{}: no {ty} kernel on this host", rt.name());
                    continue;
                }
                for (n, (plain, none)) in columns.into_iter().zip(&plain) {
                    let (packed, one) = product(ty, &bytes, k, m, n, Some(rt));
                    assert_eq!((*none, one), (0, 1));
                    let scale = plain.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let worst = plain
                        .iter()
                        .zip(&packed)
                        .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                    // ggml's plain F16 product rounds x to F16 (2^-11 of each value at most); AMX's F16 kernels
                    // read x in F32. The quantized types round x to Q8_0 / Q8_K on both paths.
                    let bound = if ty == GgmlType::F16 { 2e-3 } else { 1e-4 };
                    assert!(
                        worst <= bound * scale.max(1.0),
                        "{} {ty}, n {n}: differs by {worst} (scale {scale})",
                        rt.name()
                    );
                }
                checked += 1;
            }
        }
        eprintln!("{checked} (type, weight type) pairs checked");
        if RepackType::cpu().is_some() && crate::ggml::cpu_features().avx2 {
            assert!(checked > 0, "CPU_REPACK takes Q4_K with AVX2");
        }
    }

    /// An operator other than the approved product never reads the interleaved bytes: compute refuses it.
    #[test]
    fn other_operators_on_a_repacked_weight_are_refused() {
        let rt = RepackType::cpu().unwrap();
        let weights = Context::with_capacity(1, 0).unwrap();
        let w = weights.new_tensor_2d(GgmlType::Q4K, 256, 16).unwrap();
        if !rt.supports(w, WeightOp::MulMat).unwrap() {
            eprintln!("no repacked Q4_K kernel on this host: skipped");
            return;
        }
        let bytes = matrix(GgmlType::Q4K, 256, 16);
        let item = RepackWeight {
            tensor: w,
            bytes: &bytes,
            op: WeightOp::MulMat,
        };
        weights.repack(rt, &[item], |_| {}).unwrap();
        assert_eq!(weights.repacked(rt).tensors, 1);
        assert_eq!(weights.repacked(rt).bytes, bytes.len() as u64);
        let ctx = Context::with_capacity(4, 8).unwrap();
        let rows = ctx.new_tensor_1d(GgmlType::I32, 2).unwrap();
        let got = ctx.get_rows(w, rows).unwrap();
        let mut g = ctx.new_graph(8).unwrap();
        g.expand(got).unwrap();
        ctx.alloc_tensors_host().unwrap();
        rows.set_i32(&[0, 3]).unwrap();
        let err = CpuBackend::new(1).unwrap().compute(&g).unwrap_err();
        assert!(matches!(err, GgmlError::Compute { .. }), "{err}");
    }
}
