//! A prompt's expert products with ggml's repacked GEMM kernels.
//!
//! ggml's `mul_mat_id` on a repacked weight (`CPU_REPACK`) runs its GEMV kernel once per (token, expert) row, so
//! a micro-batch of 512 tokens reads each routed expert's matrix about a dozen times. Its `mul_mat` on the same
//! layout multiplies four rows at a time with the GEMM kernel of that layout. This module gives `mul_mat_id` the
//! GEMM: two custom operators, built from ggml's own kernels for the layout ggml chose (`ggml_quantize_mat_*`,
//! `ggml_gemm_*`, `ggml_gemv_*`, the very functions its repacked `mul_mat` calls):
//!
//! 1. [`Context::grouped_rows`]: the rows each expert reads (`b[:, j % B1, t]` for `ids[j, t]`), sorted by expert
//!    (tokens in order, as ggml groups them) and quantized to the kernel's input type; four rows at a time in the
//!    interleaved layout of the GEMM, the remaining one to three rows one by one.
//! 2. [`Context::mul_mat_id_grouped`]: per expert, the GEMM over its groups of four rows and the GEMV over the rest,
//!    each thread over its own columns (multiples of the layout's 8), results written to `(j, t)`.
//!
//! The rows of one product are quantized once, so the gate and up products of one input share them.
//!
//! Only the layouts whose kernels are checked here are taken (see [`GroupedKernel::of`]): Q4_K and MXFP4 in the
//! 8x8 layouts (8 columns interleaved, 8-byte input groups) that ggml gives them on x86 with AVX2 or AVX-512 (the
//! kernels use AVX-512 where ggml was built for it), Q2_K in the 8x8 layout ggml has only for AVX-512, Q4_K 8x8 on
//! Arm with int8 matrix multiply, and on Arm with the dot product Q4_K in its 8x4 layout (8 columns, 4-byte input
//! groups) and MXFP4 in its 4x4 layout (4 columns, 4-byte groups). Which layout ggml chose is read from its CPU
//! features ([`super::repack_layout`], a mirror of ggml's choice) and then checked once per process: a probe
//! product with the kernels must equal ggml's own `mul_mat_id` on a weight ggml repacked
//! ([`GroupedKernel::probe`]). Other weights keep `mul_mat_id`.

use std::os::raw::{c_int, c_void};
use std::sync::OnceLock;

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

use super::backend::CpuBackend;
use super::context::Context;
use super::error::{ensure, Result};
use super::isa::{repack_layout, RepackLayout};
use super::ops::shape;
use super::quant::quantize_rows;
use super::repack::{RepackType, RepackWeight, WeightOp};
use super::tensor::Tensor;
use super::types::{block_size, row_size, to_ggml};

/// `ggml_gemm_*` / `ggml_gemv_*`: `n` inputs per row, output `s[r * bs + c]` for `nr` rows and `nc` columns,
/// `vx` the repacked weight from its first column, `vy` the quantized rows.
type MatFn = unsafe extern "C" fn(
    n: c_int,
    s: *mut f32,
    bs: usize,
    vx: *const c_void,
    vy: *const c_void,
    nr: c_int,
    nc: c_int,
);
/// `ggml_quantize_mat_*`: four rows of `k` floats (adjacent) into one interleaved group.
type QuantizeMatFn = unsafe extern "C" fn(x: *const f32, vy: *mut c_void, k: i64);

// ggml-cpu's repack kernels (ggml/src/ggml-cpu/repack.h, `extern "C"`): the functions its repacked `mul_mat`
// calls for these layouts, linked from the same static library. The GEMM and GEMV kernels share one signature
// ([`MatFn`]).
extern "C" {
    fn ggml_quantize_mat_q8_K_4x8(x: *const f32, vy: *mut c_void, k: i64);
    fn ggml_quantize_mat_q8_0_4x8(x: *const f32, vy: *mut c_void, k: i64);
    fn ggml_quantize_mat_q8_K_4x4(x: *const f32, vy: *mut c_void, k: i64);
    fn ggml_quantize_mat_q8_0_4x4(x: *const f32, vy: *mut c_void, k: i64);
}

macro_rules! mat_kernels {
    ($($name:ident),* $(,)?) => {
        extern "C" {
            $(fn $name(n: c_int, s: *mut f32, bs: usize, vx: *const c_void, vy: *const c_void, nr: c_int, nc: c_int);)*
        }
    };
}

mat_kernels!(
    ggml_gemm_q4_K_8x8_q8_K,
    ggml_gemv_q4_K_8x8_q8_K,
    ggml_gemm_q2_K_8x8_q8_K,
    ggml_gemv_q2_K_8x8_q8_K,
    ggml_gemm_mxfp4_8x8_q8_0,
    ggml_gemv_mxfp4_8x8_q8_0,
    ggml_gemm_q4_K_8x4_q8_K,
    ggml_gemv_q4_K_8x4_q8_K,
    ggml_gemm_mxfp4_4x4_q8_0,
    ggml_gemv_mxfp4_4x4_q8_0,
);

/// A multiple of the columns every layout taken here interleaves (8, or 4 for MXFP4 4x4): threads split columns on
/// multiples of it, so each thread's first column starts an interleaved block.
const COLS: i64 = 8;

/// ggml's kernels for one repacked layout.
#[derive(Debug)]
pub struct GroupedKernel {
    /// The weight type.
    weight: GgmlType,
    /// The input type the kernels take (Q8_K, Q8_0).
    input: GgmlType,
    quantize_mat: QuantizeMatFn,
    gemm: MatFn,
    gemv: MatFn,
    /// The probe's answer on this host (see [`GroupedKernel::probe`]), once asked.
    agrees: OnceLock<bool>,
}

static Q4_K_8X8: GroupedKernel = GroupedKernel {
    weight: GgmlType::Q4K,
    input: GgmlType::Q8K,
    quantize_mat: ggml_quantize_mat_q8_K_4x8,
    gemm: ggml_gemm_q4_K_8x8_q8_K,
    gemv: ggml_gemv_q4_K_8x8_q8_K,
    agrees: OnceLock::new(),
};

static Q2_K_8X8: GroupedKernel = GroupedKernel {
    weight: GgmlType::Q2K,
    input: GgmlType::Q8K,
    quantize_mat: ggml_quantize_mat_q8_K_4x8,
    gemm: ggml_gemm_q2_K_8x8_q8_K,
    gemv: ggml_gemv_q2_K_8x8_q8_K,
    agrees: OnceLock::new(),
};

static MXFP4_8X8: GroupedKernel = GroupedKernel {
    weight: GgmlType::Mxfp4,
    input: GgmlType::Q8_0,
    quantize_mat: ggml_quantize_mat_q8_0_4x8,
    gemm: ggml_gemm_mxfp4_8x8_q8_0,
    gemv: ggml_gemv_mxfp4_8x8_q8_0,
    agrees: OnceLock::new(),
};

static Q4_K_8X4: GroupedKernel = GroupedKernel {
    weight: GgmlType::Q4K,
    input: GgmlType::Q8K,
    quantize_mat: ggml_quantize_mat_q8_K_4x4,
    gemm: ggml_gemm_q4_K_8x4_q8_K,
    gemv: ggml_gemv_q4_K_8x4_q8_K,
    agrees: OnceLock::new(),
};

static MXFP4_4X4: GroupedKernel = GroupedKernel {
    weight: GgmlType::Mxfp4,
    input: GgmlType::Q8_0,
    quantize_mat: ggml_quantize_mat_q8_0_4x4,
    gemm: ggml_gemm_mxfp4_4x4_q8_0,
    gemv: ggml_gemv_mxfp4_4x4_q8_0,
    agrees: OnceLock::new(),
};

/// Every layout with kernels here, with its kernels.
static KERNELS: [(RepackLayout, &GroupedKernel); 5] = [
    (RepackLayout::Q4K8x8, &Q4_K_8X8),
    (RepackLayout::Q2K8x8, &Q2_K_8X8),
    (RepackLayout::Mxfp4x8x8, &MXFP4_8X8),
    (RepackLayout::Q4K8x4, &Q4_K_8X4),
    (RepackLayout::Mxfp4x4x4, &MXFP4_4X4),
];

/// Worst difference, relative to the largest value, that the probe accepts: the kernels and `mul_mat_id` read the
/// same quantized weights and inputs and only add in another order (a few 1e-7); a weight read in another layout
/// than ggml wrote gives differences of the order of the values themselves.
const PROBE_TOLERANCE: f32 = 1e-4;

impl GroupedKernel {
    /// The kernels of `experts` `{k, m, n_expert}` when it lives repacked in `repack`'s buffer in a layout this
    /// module takes: ggml's choice for the type and row count on this build ([`repack_layout`]), confirmed by the
    /// probe (once per process).
    pub fn of(experts: Tensor<'_>, repack: &RepackType) -> Option<&'static GroupedKernel> {
        if !repack.is_type_of(experts.buffer()) {
            return None;
        }
        let ne = experts.ne();
        if ne[3] != 1 {
            return None;
        }
        let kernel = Self::for_layout_of(experts.ty()?, ne[1])?;
        let agrees = *kernel
            .agrees
            .get_or_init(|| kernel.probe(repack).is_ok_and(|err| err < PROBE_TOLERANCE));
        (agrees && ne[0] % block_size(kernel.input) == 0).then_some(kernel)
    }

    /// The kernels of the layout ggml gives a `ty` matrix of `rows` rows on this build ([`repack_layout`]), where
    /// this module has them; not yet confirmed by the probe (tests ask it how the kernels compare with ggml's own
    /// product).
    pub fn for_layout_of(ty: GgmlType, rows: i64) -> Option<&'static GroupedKernel> {
        let layout = repack_layout(ty, rows)?;
        KERNELS
            .iter()
            .find(|(l, _)| *l == layout)
            .map(|&(_, kernel)| kernel)
    }

    /// The weight type the kernels read.
    pub fn weight_type(&self) -> GgmlType {
        self.weight
    }

    /// A small product on this host, with ggml's `mul_mat_id` as the reference: random `{256, 16, 4}` experts of the
    /// kernel's type that ggml repacks (in the layout it chooses), 9 tokens routed to two experts each (groups of
    /// four rows and single rows); returns the worst difference relative to the largest value.
    pub fn probe(&'static self, repack: &RepackType) -> Result<f32> {
        let (d, m, n_expert, n_used) = (256i64, 16i64, 4i64, 2usize);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut uniform = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let values: Vec<f32> = (0..d * m * n_expert).map(|_| uniform()).collect();
        let bytes = quantize_rows(self.weight, &values, d as usize, None)?;
        let weights = Context::with_capacity(1, 0)?;
        let experts = weights.new_tensor_3d(self.weight, d, m, n_expert)?;
        let op = WeightOp::MulMatId { n_used };
        let weight = RepackWeight {
            tensor: experts,
            bytes: &bytes,
            op,
        };
        weights.repack(*repack, &[weight], |_| {})?;
        let inputs: Vec<f32> = (0..d * 9).map(|_| uniform()).collect();
        // Expert 0 gets six rows (a group of four and two single rows), 1 gets five, 2 gets seven, 3 none.
        let ids = [0, 1, 0, 2, 1, 2, 0, 2, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2];
        self.disagreement(experts, &inputs, &ids)
    }

    /// The grouped products against `mul_mat_id` on `experts` (of this kernel's type) for `inputs` `{k, 1, n}` and
    /// `ids` `{2, n}`: the worst difference relative to the largest value of `mul_mat_id`'s.
    fn disagreement(
        &'static self,
        experts: Tensor<'_>,
        inputs: &[f32],
        ids: &[i32],
    ) -> Result<f32> {
        let d = experts.ne()[0];
        let n = inputs.len() as i64 / d;
        let ctx = Context::with_capacity(8, 8)?;
        let x = ctx.new_tensor_3d(GgmlType::F32, d, 1, n)?;
        let id = ctx.new_tensor_2d(GgmlType::I32, ids.len() as i64 / n, n)?;
        let want = ctx.mul_mat_id(experts, x, id)?;
        let rows = ctx.grouped_rows(self, experts, x, id)?;
        let got = ctx.mul_mat_id_grouped(experts, rows)?;
        let mut graph = ctx.new_graph(8)?;
        graph.expand(want)?;
        graph.expand(got)?;
        ctx.alloc_tensors_host()?;
        x.set_f32(inputs)?;
        id.set_i32(ids)?;
        CpuBackend::new(1)?.compute(&graph)?;
        let (want, got) = (want.get_f32()?, got.get_f32()?);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = want
            .iter()
            .zip(&got)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // NaN (a garbage read) counts as the largest difference.
        Ok(match worst / scale {
            e if e.is_nan() => f32::INFINITY,
            e => e,
        })
    }

    fn userdata(&'static self) -> *mut c_void {
        self as *const GroupedKernel as *mut c_void
    }
}

/// The rows of an expert product, grouped by expert and quantized for `kernel` (what [`Context::grouped_rows`]
/// returns).
#[derive(Clone, Copy)]
pub struct GroupedRows<'c> {
    rows: Tensor<'c>,
    kernel: &'static GroupedKernel,
    ids: Tensor<'c>,
    n_inputs: i64,
    n_expert: i64,
}

impl<'m> Context<'m> {
    /// Step 1: `b {k, B1, n_tokens}` (F32, rows contiguous) for `ids` I32 `{n_used, n_tokens}` (`B1` is 1 or
    /// `n_used`), quantized and grouped for `kernel`; the product with any expert tensor of that kernel follows.
    pub fn grouped_rows<'c>(
        &'c self,
        kernel: &'static GroupedKernel,
        experts: Tensor<'c>,
        b: Tensor<'c>,
        ids: Tensor<'c>,
    ) -> Result<GroupedRows<'c>> {
        let (bn, i) = (b.ne(), ids.ne());
        let why = || {
            format!(
                "experts {}, b {}, ids {}",
                shape(experts),
                shape(b),
                shape(ids)
            )
        };
        ensure(
            b.ty() == Some(GgmlType::F32) && b.nb()[0] == 4,
            "grouped_rows",
            || format!("b must be F32 with adjacent elements: {}", why()),
        )?;
        ensure(ids.ty() == Some(GgmlType::I32), "grouped_rows", || {
            format!("ids must be I32: {}", why())
        })?;
        ensure(
            bn[3] == 1 && i[2] == 1 && i[3] == 1 && i[1] == bn[2] && bn[1] > 0 && i[0] % bn[1] == 0,
            "grouped_rows",
            || format!("shapes do not match: {}", why()),
        )?;
        ensure(
            bn[0] % block_size(kernel.input) == 0,
            "grouped_rows",
            || format!("rows of {} do not fill {} blocks", bn[0], kernel.input),
        )?;
        let bytes = i[0] * i[1] * row_size(kernel.input, bn[0])? as i64;
        ensure(
            experts.ty() == Some(kernel.weight) && experts.ne()[0] == bn[0],
            "grouped_rows",
            || {
                format!(
                    "the experts are not of the kernel's type {}: {}",
                    kernel.weight,
                    why()
                )
            },
        )?;
        // The experts are a source for their count (ids beyond it are computed as zeros), not read here.
        let mut args = [b.as_ptr(), ids.as_ptr(), experts.as_ptr()];
        // SAFETY: live sources; the callback reads them as checked above and writes `bytes` bytes of dst.
        let rows = self.op("grouped_rows", 1, |ctx| unsafe {
            sys::ggml_custom_4d(
                ctx,
                to_ggml(GgmlType::I8),
                bytes,
                1,
                1,
                1,
                args.as_mut_ptr(),
                args.len() as c_int,
                Some(quantize_rows_callback),
                -1,
                kernel.userdata(),
            )
        })?;
        Ok(GroupedRows {
            rows,
            kernel,
            ids,
            n_inputs: bn[0],
            n_expert: experts.ne()[2],
        })
    }

    /// Step 2: `experts {k, m, n_expert}` (repacked, of `rows`' kernel) times the rows each token routes to it:
    /// F32 `{m, n_used, n_tokens}`, as `mul_mat_id(experts, b, ids)`.
    pub fn mul_mat_id_grouped<'c>(
        &'c self,
        experts: Tensor<'c>,
        rows: GroupedRows<'c>,
    ) -> Result<Tensor<'c>> {
        let (a, i) = (experts.ne(), rows.ids.ne());
        ensure(
            experts.ty() == Some(rows.kernel.weight) && a[0] == rows.n_inputs && a[3] == 1,
            "mul_mat_id_grouped",
            || {
                format!(
                    "experts {} do not take the rows ({} {} inputs for {} experts)",
                    shape(experts),
                    rows.n_inputs,
                    rows.kernel.input,
                    rows.n_expert
                )
            },
        )?;
        let mut args = [rows.rows.as_ptr(), rows.ids.as_ptr(), experts.as_ptr()];
        // SAFETY: live sources of the shapes checked here and in `grouped_rows`; the callback writes dst only.
        self.op("mul_mat_id_grouped", 1, |ctx| unsafe {
            sys::ggml_custom_4d(
                ctx,
                to_ggml(GgmlType::F32),
                a[1],
                i[0],
                i[1],
                1,
                args.as_mut_ptr(),
                args.len() as c_int,
                Some(product_callback),
                -1,
                rows.kernel.userdata(),
            )
        })
    }
}

/// ggml's `struct ggml_custom_op_params` (ggml-impl.h, not in the public headers): what `ggml_custom_4d` stores
/// at the start of a custom node's `op_params`.
#[repr(C)]
struct CustomOpParams {
    fun: sys::ggml_custom_op_t,
    n_tasks: c_int,
    userdata: *mut c_void,
}

// The mirror must match ggml's struct or `is_grouped_op` reads garbage. The struct lives in ggml-impl.h, which
// bindgen does not see, so its C layout (as of llama-cpp-sys-2 0.1.161: function pointer, int, pointer) is written
// out here; the build fails if the mirror stops matching that layout, if bindgen's `ggml_custom_op_t` changes size,
// or if a tensor's `op_params` no longer has room for it. On a ggml upgrade, compare ggml-impl.h with this.
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    let ptr = size_of::<*mut c_void>();
    assert!(size_of::<sys::ggml_custom_op_t>() == ptr);
    assert!(offset_of!(CustomOpParams, fun) == 0);
    assert!(offset_of!(CustomOpParams, n_tasks) == ptr);
    assert!(
        offset_of!(CustomOpParams, userdata) == (ptr + size_of::<c_int>()).next_multiple_of(ptr)
    );
    assert!(size_of::<CustomOpParams>() == offset_of!(CustomOpParams, userdata) + ptr);
    assert!(align_of::<CustomOpParams>() == align_of::<*mut c_void>());
    #[cfg(target_pointer_width = "64")]
    assert!(size_of::<CustomOpParams>() == 24);
    let tensor = std::mem::MaybeUninit::<sys::ggml_tensor>::uninit();
    // SAFETY: only the field's address is taken (no read, no reference), to learn its type's size.
    let op_params = unsafe { &raw const (*tensor.as_ptr()).op_params };
    const fn pointee_size<T>(_: *const T) -> usize {
        size_of::<T>()
    }
    assert!(size_of::<CustomOpParams>() <= pointee_size(op_params));
};

/// Whether `t` is one of this module's operators (the backend's support check does not know them: they read
/// repacked weights, which ggml's check only allows to its own matrix products).
pub(super) fn is_grouped_op(t: Tensor<'_>) -> bool {
    if t.op() != sys::GGML_OP_CUSTOM {
        return false;
    }
    // SAFETY: a custom op's params begin with the `ggml_custom_op_params` ggml_custom_4d wrote there.
    let fun = unsafe {
        let params = (*t.as_ptr()).op_params.as_ptr() as *const CustomOpParams;
        std::ptr::read_unaligned(params).fun
    };
    let ours: [sys::ggml_custom_op_t; 2] = [Some(quantize_rows_callback), Some(product_callback)];
    ours.iter()
        .any(|f| f.map(|f| f as usize) == fun.map(|f| f as usize))
}

/// The rows `(j, t)` (slot, token) of an expert product grouped by expert: expert `e`'s are
/// `rows[start[e]..start[e + 1]]`, tokens in order (as ggml's `mul_mat_id` groups them); `invalid` are rows whose
/// id names no expert (a corrupt hash table: ggml would abort), computed as zeros.
struct Groups {
    start: Vec<usize>,
    rows: Vec<(u32, u32)>,
    invalid: Vec<(u32, u32)>,
}

impl Groups {
    /// # Safety
    /// `ids` is a live I32 tensor `{k, n}`.
    unsafe fn of(ids: &sys::ggml_tensor, n_expert: usize) -> Groups {
        let (k, n) = (ids.ne[0] as usize, ids.ne[1] as usize);
        let id = |j: usize, t: usize| -> Option<usize> {
            // SAFETY: j < k and t < n index the tensor through its strides.
            let e = unsafe {
                *((ids.data as *const u8).add(t * ids.nb[1] + j * ids.nb[0]) as *const i32)
            };
            usize::try_from(e).ok().filter(|&e| e < n_expert)
        };
        let mut next = vec![0usize; n_expert + 1];
        let mut invalid = Vec::new();
        for t in 0..n {
            for j in 0..k {
                match id(j, t) {
                    Some(e) => next[e + 1] += 1,
                    None => invalid.push((j as u32, t as u32)),
                }
            }
        }
        for e in 0..n_expert {
            next[e + 1] += next[e];
        }
        let start = next.clone();
        let mut rows = vec![(0u32, 0u32); start[n_expert]];
        for t in 0..n {
            for j in 0..k {
                if let Some(e) = id(j, t) {
                    rows[next[e]] = (j as u32, t as u32);
                    next[e] += 1;
                }
            }
        }
        Groups {
            start,
            rows,
            invalid,
        }
    }

    /// Each expert's first row (an index into the grouped rows) and its rows.
    fn experts(&self) -> impl Iterator<Item = (usize, usize, &[(u32, u32)])> {
        self.start
            .windows(2)
            .enumerate()
            .map(|(e, w)| (e, w[0], &self.rows[w[0]..w[1]]))
    }
}

/// What both steps read first: the kernel, the rows grouped by expert (`src[1]` the ids, `src[2]` the experts), the
/// length of a row and the bytes of a quantized one; `None` for a length `grouped_rows` would have refused.
///
/// # Safety
/// `dst` is a node of this module with its sources allocated; `userdata` a static [`GroupedKernel`].
unsafe fn callback_setup(
    dst: *mut sys::ggml_tensor,
    userdata: *mut c_void,
) -> Option<(&'static GroupedKernel, Groups, usize, usize)> {
    let kernel = &*(userdata as *const GroupedKernel);
    let (ids, w) = (&*(*dst).src[1], &*(*dst).src[2]);
    let d = w.ne[0] as usize;
    let row_bytes = row_size(kernel.input, d as i64).ok()?;
    Some((kernel, Groups::of(ids, w.ne[2] as usize), d, row_bytes))
}

/// Step 1, on thread `ith` of `nth`: quantizes its share of the groups of four rows and of the single rows.
///
/// # Safety
/// Called by ggml's CPU backend for a node built by [`Context::grouped_rows`] (sources and sizes as checked there,
/// `userdata` a static [`GroupedKernel`]), every tensor allocated; threads write disjoint rows of `dst`.
unsafe extern "C" fn quantize_rows_callback(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    let b = &*(*dst).src[0];
    let kb = b.ne[1] as usize;
    let Some((kernel, groups, d, row_bytes)) = callback_setup(dst, userdata) else {
        return;
    };
    let from_float = (*sys::ggml_get_type_traits_cpu(to_ggml(kernel.input))).from_float;
    let Some(from_float) = from_float else {
        return; // ggml-cpu converts F32 to every input type of its kernels; `of` takes no other
    };
    let src = |(j, t): (u32, u32)| {
        (b.data as *const u8).add((j as usize % kb) * b.nb[1] + t as usize * b.nb[2]) as *const f32
    };
    let out = (*dst).data as *mut u8;
    let mut four = vec![0f32; 4 * d];
    let mut item = 0usize;
    for (_, first, rows) in groups.experts() {
        let quads = rows.len() / 4;
        for (q, part) in rows.chunks(4).enumerate() {
            let mine = item % nth as usize == ith as usize;
            item += 1;
            if !mine {
                continue;
            }
            let at = out.add((first + 4 * q) * row_bytes);
            if q < quads {
                for (r, &row) in part.iter().enumerate() {
                    std::ptr::copy_nonoverlapping(src(row), four.as_mut_ptr().add(r * d), d);
                }
                (kernel.quantize_mat)(four.as_ptr(), at as *mut c_void, d as i64);
            } else {
                for (r, &row) in part.iter().enumerate() {
                    from_float(src(row), at.add(r * row_bytes) as *mut c_void, d as i64);
                }
            }
        }
    }
}

/// Step 2, on thread `ith` of `nth`: every expert's product over this thread's columns.
///
/// # Safety
/// Called by ggml's CPU backend for a node built by [`Context::mul_mat_id_grouped`] after its step 1 node (ggml
/// computes nodes in order, with a barrier between), every tensor allocated; threads write disjoint columns.
unsafe extern "C" fn product_callback(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    let (quantized, w) = (&*(*dst).src[0], &*(*dst).src[2]);
    let m = w.ne[1];
    // Columns of this thread, on multiples of the interleave (as ggml's repacked mul_mat splits them).
    let align = |c: i64| (c + COLS - 1) / COLS * COLS;
    let c0 = align(ith as i64 * m / nth as i64).min(m);
    let c1 = align((ith as i64 + 1) * m / nth as i64).min(m);
    if c0 >= c1 {
        return;
    }
    let nc = (c1 - c0) as usize;
    let Some((kernel, groups, d, row_bytes)) = callback_setup(dst, userdata) else {
        return;
    };
    let out = (*dst).data as *mut u8;
    let out_row = |(j, t): (u32, u32)| {
        (out.add(j as usize * (*dst).nb[1] + t as usize * (*dst).nb[2]) as *mut f32)
            .add(c0 as usize)
    };
    for &row in &groups.invalid {
        std::ptr::write_bytes(out_row(row), 0, nc);
    }
    let quantized = quantized.data as *const u8;
    let mut tile: Vec<f32> = Vec::new();
    for (e, first, rows) in groups.experts().filter(|g| !g.2.is_empty()) {
        let weight =
            (w.data as *const u8).add(e * w.nb[2] + c0 as usize * w.nb[1]) as *const c_void;
        let full = rows.len() / 4 * 4;
        if full > 0 {
            tile.resize(full * nc, 0.0);
            (kernel.gemm)(
                d as c_int,
                tile.as_mut_ptr(),
                nc,
                weight,
                quantized.add(first * row_bytes) as *const c_void,
                full as c_int,
                nc as c_int,
            );
            for (r, &row) in rows[..full].iter().enumerate() {
                std::ptr::copy_nonoverlapping(tile.as_ptr().add(r * nc), out_row(row), nc);
            }
        }
        for (r, &row) in rows.iter().enumerate().skip(full) {
            (kernel.gemv)(
                d as c_int,
                out_row(row),
                nc,
                weight,
                quantized.add((first + r) * row_bytes) as *const c_void,
                1,
                nc as c_int,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this host, a type ggml repacks into a layout of this module gets its kernels, and the probe agrees with
    /// ggml's own product; a type it does not (e.g. Q4_K on a CPU without AVX2 or int8 matmul) gets none.
    #[test]
    fn kernels_are_taken_where_ggml_chose_their_layout_and_agree() {
        let Some(rt) = RepackType::cpu() else {
            return; // built without CPU_REPACK: nothing is repacked
        };
        for &(ours, kernel) in &KERNELS {
            let ty = kernel.weight;
            let layout = repack_layout(ty, 16);
            eprintln!("{ty}: ggml's layout on this build {layout:?}");
            if layout != Some(ours) {
                continue;
            }
            let err = kernel.probe(&rt).unwrap();
            assert!(err < PROBE_TOLERANCE, "{ty}: probe differs by {err:.2e}");
            let weights = Context::with_capacity(1, 0).unwrap();
            let w = weights.new_tensor_3d(ty, 256, 16, 4).unwrap();
            let bytes = vec![0u8; row_size(ty, 256).unwrap() * 64];
            let op = WeightOp::MulMatId { n_used: 2 };
            let weight = RepackWeight {
                tensor: w,
                bytes: &bytes,
                op,
            };
            weights.repack(rt, &[weight], |_| {}).unwrap();
            assert!(std::ptr::eq(GroupedKernel::of(w, &rt).unwrap(), kernel));
        }
    }

    /// The probe can fail: the same kernels over experts in ggml's plain layout (not repacked) read the blocks in
    /// the wrong order, far beyond the tolerance.
    #[test]
    fn the_probe_sees_a_layout_the_kernels_do_not_read() {
        for &(_, kernel) in &KERNELS {
            let ty = kernel.weight;
            let (d, m, n) = (256usize, 16usize, 4usize);
            let values: Vec<f32> = (0..d * m * 4)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let bytes = quantize_rows(ty, &values, d, None).unwrap();
            let weights = Context::with_capacity(1, 0).unwrap();
            let w = weights.new_tensor_3d(ty, d as i64, m as i64, 4).unwrap();
            weights.alloc_tensors_host().unwrap();
            w.set_bytes(&bytes).unwrap();
            let inputs: Vec<f32> = (0..d * n)
                .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let ids = [0, 1, 0, 1, 0, 1, 0, 1];
            let err = kernel.disagreement(w, &inputs, &ids).unwrap();
            assert!(
                err > 100.0 * PROBE_TOLERANCE,
                "{ty}: plain layout differs by only {err:.2e}"
            );
        }
    }
}
