//! What ggml's CPU kernels were built for, as ggml reports it (`ggml_cpu_has_*`), and what follows for the choices
//! of ferrite that must add values in the order ggml's kernels do: how many rows a dot product keeps in its SIMD
//! accumulators ([`dot_lane_rows`]) and which repacked layout ggml gives a weight type ([`repack_layout`]).
//!
//! Every rule here mirrors a table in ggml's source of the pinned version (`ggml-cpu/simd-mappings.h`,
//! `ggml-cpu/vec.cpp`, `ggml-cpu/repack.cpp`); the tests check the consequences on the host they run on.

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

/// The SIMD features ggml's CPU backend was built with (a build for a newer CPU than the host's would not run at
/// all; a portable build reports what it uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    pub sse3: bool,
    pub avx: bool,
    pub avx2: bool,
    pub f16c: bool,
    pub fma: bool,
    pub avx512: bool,
    pub avx512_vnni: bool,
    pub avx512_bf16: bool,
    /// The host CPU has AVX512-FP16 (ggml does not report it; a native build then does F16 arithmetic in F16).
    pub avx512_fp16_cpu: bool,
    pub neon: bool,
    /// Arm FP16 vector arithmetic: ggml's F16 dot products then add in F16.
    pub fp16_va: bool,
    pub dotprod: bool,
    pub matmul_int8: bool,
    /// SVE vector length in bytes, when built for SVE.
    pub sve_bytes: Option<usize>,
    pub riscv_v: bool,
    pub vsx: bool,
    pub vxe: bool,
    pub wasm_simd: bool,
    /// llamafile's tinyBLAS kernels are built in (ggml uses them for F32/F16 products where they apply).
    pub llamafile: bool,
}

/// The features of this build (read once; ggml fixes them when it is compiled or its CPU variant is loaded).
pub fn cpu_features() -> CpuFeatures {
    static FEATURES: std::sync::OnceLock<CpuFeatures> = std::sync::OnceLock::new();
    *FEATURES.get_or_init(|| {
        // SAFETY: each call reads a flag ggml-cpu fixed at build time (or at first use, for SVE's length).
        let flag = |f: unsafe extern "C" fn() -> i32| unsafe { f() } != 0;
        let sve = flag(sys::ggml_cpu_has_sve);
        CpuFeatures {
            sse3: flag(sys::ggml_cpu_has_sse3),
            avx: flag(sys::ggml_cpu_has_avx),
            avx2: flag(sys::ggml_cpu_has_avx2),
            f16c: flag(sys::ggml_cpu_has_f16c),
            fma: flag(sys::ggml_cpu_has_fma),
            avx512: flag(sys::ggml_cpu_has_avx512),
            avx512_vnni: flag(sys::ggml_cpu_has_avx512_vnni),
            avx512_bf16: flag(sys::ggml_cpu_has_avx512_bf16),
            avx512_fp16_cpu: host_has_avx512_fp16(),
            neon: flag(sys::ggml_cpu_has_neon),
            fp16_va: flag(sys::ggml_cpu_has_fp16_va),
            dotprod: flag(sys::ggml_cpu_has_dotprod),
            matmul_int8: flag(sys::ggml_cpu_has_matmul_int8),
            // SAFETY: as above.
            sve_bytes: sve.then(|| unsafe { sys::ggml_cpu_get_sve_cnt() }.max(0) as usize),
            riscv_v: flag(sys::ggml_cpu_has_riscv_v),
            vsx: flag(sys::ggml_cpu_has_vsx),
            vxe: flag(sys::ggml_cpu_has_vxe),
            wasm_simd: flag(sys::ggml_cpu_has_wasm_simd),
            llamafile: flag(sys::ggml_cpu_has_llamafile),
        }
    })
}

impl CpuFeatures {
    /// The widest SIMD level, as a short name for notes and benchmark tables ("AVX-512", "AVX2", "NEON", ...).
    pub fn simd_name(&self) -> &'static str {
        match self {
            f if f.avx512 => "AVX-512",
            f if f.avx2 => "AVX2",
            f if f.avx => "AVX",
            f if f.sse3 => "SSE3",
            f if f.sve_bytes.is_some() => "SVE",
            f if f.neon => "NEON",
            f if f.riscv_v => "RVV",
            f if f.vsx => "VSX",
            f if f.vxe => "VXE",
            f if f.wasm_simd => "WASM SIMD",
            _ => "scalar",
        }
    }

    /// See [`dot_lane_rows`].
    pub fn dot_lane_rows(&self) -> Option<usize> {
        // GGML_F32_STEP and GGML_F16_STEP (values per loop iteration, spread over the accumulators) per ISA;
        // llamafile's tinyBLAS uses one register per output (8 or 16 lanes), which these multiples cover.
        let step = match self {
            f if f.avx512 && f.avx512_fp16_cpu => 128,
            f if f.avx512 => 64,
            f if f.avx || f.avx2 || f.sse3 => 32,
            // ggml_vec_dot_f32 on SVE: 8 registers of sve_bytes / 4 floats; F16: 8 registers of sve_bytes / 2.
            f if f.sve_bytes.is_some() => 4 * f.sve_bytes.unwrap_or(0),
            f if f.neon => 32,
            f if f.vsx || f.wasm_simd => 32,
            // RISC-V V, s390x and others: lengths not mirrored here; no gathering (full reads are always exact).
            _ => return None,
        };
        (step > 0 && step <= MAX_LANE_ROWS).then_some(step.max(MIN_LANE_ROWS))
    }
}

/// Row blocks below this are not worth a gather.
const MIN_LANE_ROWS: usize = 32;
/// Beyond this a gather reads nearly as many rows as the padded full read (256).
const MAX_LANE_ROWS: usize = 128;

/// Rows that ggml's F32 and F16 dot products (`ggml_vec_dot_f32`/`_f16`, and tinyBLAS) of this build spread over
/// their SIMD accumulators before they wrap around: row `r` of a long dot product is added into the lane
/// `r % dot_lane_rows()`, in order. Reading only some aligned blocks of that many rows, in order, keeps every row in
/// its lane; the rows left out add exact zeros there, so the sums are the same bits (AVX2: 32, AVX-512: 64; with
/// AVX512-FP16: 128; NEON: 32). None where the rule is not known for the ISA: read every row then.
pub fn dot_lane_rows() -> Option<usize> {
    cpu_features().dot_lane_rows()
}

/// ggml's repacked layouts that ferrite has kernels for (see [`super::GroupedKernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepackLayout {
    /// `block_q4_Kx8`, GEMM with 8-byte input groups (`q4_K_8x8_q8_K`).
    Q4K8x8,
    /// `block_q4_Kx8`, 4-byte input groups (`q4_K_8x4_q8_K`, Arm dot product).
    Q4K8x4,
    /// `block_q2_Kx8` (`q2_K_8x8_q8_K`, AVX-512 only).
    Q2K8x8,
    /// `block_mxfp4x8` (`mxfp4_8x8_q8_0`).
    Mxfp4x8x8,
    /// `block_mxfp4x4` (`mxfp4_4x4_q8_0`, Arm dot product).
    Mxfp4x4x4,
}

/// The layout ggml repacks a `ty` matrix of `rows` rows into on this build, following
/// `ggml_repack_get_optimal_repack_type` for Q4_K, Q2_K and MXFP4 on x86 and Arm. None where ggml leaves it
/// unpacked, and for what is not mirrored here (other types, RISC-V's layouts): no grouped kernel takes those.
pub fn repack_layout(ty: GgmlType, rows: i64) -> Option<RepackLayout> {
    cpu_features().repack_layout(ty, rows)
}

impl CpuFeatures {
    /// See [`repack_layout`].
    pub fn repack_layout(&self, ty: GgmlType, rows: i64) -> Option<RepackLayout> {
        let arm_i8mm = self.neon && self.matmul_int8;
        let arm_dot = self.neon && self.dotprod;
        match ty {
            GgmlType::Q4K if self.avx2 && rows % 8 == 0 => Some(RepackLayout::Q4K8x8),
            GgmlType::Q4K if arm_i8mm && rows % 8 == 0 => Some(RepackLayout::Q4K8x8),
            GgmlType::Q4K if arm_dot && rows % 8 == 0 => Some(RepackLayout::Q4K8x4),
            GgmlType::Mxfp4 if self.avx2 && rows % 8 == 0 => Some(RepackLayout::Mxfp4x8x8),
            GgmlType::Mxfp4 if arm_dot && rows % 4 == 0 => Some(RepackLayout::Mxfp4x4x4),
            GgmlType::Q2K if self.avx512 && rows % 8 == 0 => Some(RepackLayout::Q2K8x8),
            _ => None,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn host_has_avx512_fp16() -> bool {
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is asked for only where the maximum leaf reaches it. (The
    // intrinsics are safe functions in newer Rust, unsafe in the 1.85 this crate supports.)
    #[allow(unused_unsafe)]
    unsafe {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        __cpuid(0).eax >= 7 && (__cpuid_count(7, 0).edx >> 23) & 1 == 1
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn host_has_avx512_fp16() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x86(avx512: bool, fp16: bool) -> CpuFeatures {
        CpuFeatures {
            sse3: true,
            avx: true,
            avx2: true,
            f16c: true,
            fma: true,
            avx512,
            avx512_fp16_cpu: fp16,
            ..CpuFeatures::default()
        }
    }

    #[test]
    fn lane_rows_follow_ggmls_simd_steps() {
        assert_eq!(x86(false, false).dot_lane_rows(), Some(32));
        assert_eq!(x86(true, false).dot_lane_rows(), Some(64));
        assert_eq!(x86(true, true).dot_lane_rows(), Some(128));
        let neon = CpuFeatures {
            neon: true,
            fp16_va: true,
            ..CpuFeatures::default()
        };
        assert_eq!(neon.dot_lane_rows(), Some(32));
        let sve = |bytes| CpuFeatures {
            neon: true,
            sve_bytes: Some(bytes),
            ..CpuFeatures::default()
        };
        assert_eq!(sve(32).dot_lane_rows(), Some(128));
        assert_eq!(sve(64).dot_lane_rows(), None);
        let rvv = CpuFeatures {
            riscv_v: true,
            ..CpuFeatures::default()
        };
        assert_eq!(rvv.dot_lane_rows(), None);
        assert_eq!(CpuFeatures::default().dot_lane_rows(), None);
    }

    #[test]
    fn repack_layouts_follow_ggmls_choice() {
        let avx2 = x86(false, false);
        assert_eq!(
            avx2.repack_layout(GgmlType::Q4K, 16),
            Some(RepackLayout::Q4K8x8)
        );
        assert_eq!(avx2.repack_layout(GgmlType::Q4K, 12), None);
        assert_eq!(
            avx2.repack_layout(GgmlType::Mxfp4, 8),
            Some(RepackLayout::Mxfp4x8x8)
        );
        let dot = CpuFeatures {
            neon: true,
            dotprod: true,
            ..CpuFeatures::default()
        };
        assert_eq!(
            dot.repack_layout(GgmlType::Q4K, 8),
            Some(RepackLayout::Q4K8x4)
        );
        assert_eq!(
            dot.repack_layout(GgmlType::Mxfp4, 4),
            Some(RepackLayout::Mxfp4x4x4)
        );
        let i8mm = CpuFeatures {
            matmul_int8: true,
            ..dot
        };
        assert_eq!(
            i8mm.repack_layout(GgmlType::Q4K, 8),
            Some(RepackLayout::Q4K8x8)
        );
        assert_eq!(CpuFeatures::default().repack_layout(GgmlType::Q4K, 8), None);
    }

    /// The host's own features are consistent with the target it was compiled for.
    #[test]
    fn the_hosts_features_are_read() {
        let f = cpu_features();
        #[cfg(target_arch = "x86_64")]
        assert!(f.sse3 || f.avx2 || f.avx512, "{f:?}");
        #[cfg(target_arch = "aarch64")]
        assert!(f.neon, "{f:?}");
        assert!(!f.simd_name().is_empty());
    }
}
