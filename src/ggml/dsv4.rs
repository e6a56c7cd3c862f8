//! Operators DeepSeek V4 needs beyond the basics: RoPE (with the rotated-dims offset), clamped SwiGLU, fill, the
//! lightning indexer and the hyper-connection ops, as `Context` methods that mirror the pinned ggml's assertions.
//!
//! Shapes are written in ggml order `{ne0, ne1, ne2, ne3}` (`ne0` fastest).

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

use super::context::Context;
use super::error::{ensure, Result};
use super::ops::shape;
use super::tensor::Tensor;

/// Which dims RoPE pairs up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// GPT-J style: adjacent pairs `(x0, x1), (x2, x3), ...` (`GGML_ROPE_TYPE_NORMAL`).
    Normal,
    /// GPT-NeoX style: halves `(x0, x_{n/2}), ...` (`GGML_ROPE_TYPE_NEOX`).
    Neox,
}

impl RopeMode {
    fn ggml(self) -> i32 {
        match self {
            RopeMode::Normal => 0,
            RopeMode::Neox => 2,
        }
    }
}

/// RoPE settings (`ggml_rope_ext`'s scalar arguments), YaRN included.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeParams {
    /// Rotated dims per head (even, at most the head size).
    pub n_dims: usize,
    pub mode: RopeMode,
    /// Original training context (YaRN); 0 when unused.
    pub n_ctx_orig: i32,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

impl RopeParams {
    /// Plain RoPE over `n_dims` dims with base `freq_base` (no scaling, ggml's default YaRN betas).
    pub fn new(n_dims: usize, mode: RopeMode, freq_base: f32) -> RopeParams {
        RopeParams {
            n_dims,
            mode,
            n_ctx_orig: 0,
            freq_base,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
        }
    }
}

fn is_f32(t: Tensor<'_>) -> bool {
    t.ty() == Some(GgmlType::F32)
}

impl<'m> Context<'m> {
    /// Rotates the first `p.n_dims` dims of each head: `a {head_dim, n_head, n_tokens, 1}`, `pos` I32 `{n_tokens}`,
    /// optional `freq_factors` F32 `{>= n_dims/2}` -> `a`'s shape. See [`Context::rope_set_offset`] to rotate other
    /// dims.
    pub fn rope_ext<'c>(
        &'c self,
        a: Tensor<'c>,
        pos: Tensor<'c>,
        freq_factors: Option<Tensor<'c>>,
        p: &RopeParams,
    ) -> Result<Tensor<'c>> {
        self.rope_impl("rope_ext", a, pos, freq_factors, p, sys::ggml_rope_ext)
    }

    /// The inverse rotation of [`Context::rope_ext`] with the same arguments (`ggml_rope_ext_back`, the gradient
    /// of RoPE): `rope_ext_back(rope_ext(x))` gives back `x` (with the same [`Context::rope_set_offset`] on both).
    pub fn rope_ext_back<'c>(
        &'c self,
        a: Tensor<'c>,
        pos: Tensor<'c>,
        freq_factors: Option<Tensor<'c>>,
        p: &RopeParams,
    ) -> Result<Tensor<'c>> {
        self.rope_impl(
            "rope_ext_back",
            a,
            pos,
            freq_factors,
            p,
            sys::ggml_rope_ext_back,
        )
    }

    #[allow(clippy::type_complexity)]
    fn rope_impl<'c>(
        &'c self,
        name: &'static str,
        a: Tensor<'c>,
        pos: Tensor<'c>,
        freq_factors: Option<Tensor<'c>>,
        p: &RopeParams,
        f: unsafe extern "C" fn(
            *mut sys::ggml_context,
            *mut sys::ggml_tensor,
            *mut sys::ggml_tensor,
            *mut sys::ggml_tensor,
            i32,
            i32,
            i32,
            f32,
            f32,
            f32,
            f32,
            f32,
            f32,
        ) -> *mut sys::ggml_tensor,
    ) -> Result<Tensor<'c>> {
        let (na, np) = (a.ne(), pos.ne());
        let pos_ok = pos.ty() == Some(GgmlType::I32)
            && np[1] == 1
            && np[2] == 1
            && np[3] == 1
            && np[0] == na[2];
        ensure(pos_ok, name, || {
            format!("pos {} must be I32 {{{}}}", shape(pos), na[2])
        })?;
        // The CPU kernel asserts F32/F16 elements with a packed first dim, and copies the unrotated dims in pairs.
        let elem_ok = matches!(a.ty(), Some(GgmlType::F32 | GgmlType::F16))
            && a.nb()[0] == a.ty().map_or(0, |t| t.type_size() as usize)
            && na[0] % 2 == 0;
        ensure(elem_ok, name, || {
            format!(
                "a {} must be F32/F16 with packed, even-length heads",
                shape(a)
            )
        })?;
        let dims_ok = p.n_dims > 0
            && p.n_dims % 2 == 0
            && p.n_dims as i64 <= na[0]
            && p.n_dims <= i32::MAX as usize;
        ensure(dims_ok, name, || {
            format!("n_dims = {} for heads of a {}", p.n_dims, shape(a))
        })?;
        if let Some(c) = freq_factors {
            let ok = is_f32(c) && c.ne()[0] >= (p.n_dims / 2) as i64;
            ensure(ok, name, || {
                format!(
                    "freq_factors {} must be F32 {{>= {}}}",
                    shape(c),
                    p.n_dims / 2
                )
            })?;
        }
        let c_ptr = freq_factors.map_or(std::ptr::null_mut(), |c| c.as_ptr());
        let n_dims = p.n_dims as i32;
        // SAFETY: `f` is ggml_rope_ext or ggml_rope_ext_back (the latter calls the former); every ggml_rope_impl
        // assertion was checked (mode is normal or neox, pos is an I32 vector of n_tokens, freq factors F32 and long
        // enough or NULL); room reserved.
        self.op(name, 1, |ctx| unsafe {
            f(
                ctx,
                a.as_ptr(),
                pos.as_ptr(),
                c_ptr,
                n_dims,
                p.mode.ggml(),
                p.n_ctx_orig,
                p.freq_base,
                p.freq_scale,
                p.ext_factor,
                p.attn_factor,
                p.beta_fast,
                p.beta_slow,
            )
        })
    }

    /// Makes a RoPE result rotate dims `n_offs .. n_offs + n_dims` instead of `0 .. n_dims` (DeepSeek V4 keeps the
    /// rotated part at the end of each head). Modifies and returns `rope`.
    pub fn rope_set_offset<'c>(&self, rope: Tensor<'c>, n_offs: usize) -> Result<Tensor<'c>> {
        let is_rope = matches!(rope.op(), sys::GGML_OP_ROPE | sys::GGML_OP_ROPE_BACK);
        ensure(is_rope, "rope_set_offset", || {
            format!("{} is not a RoPE result", shape(rope))
        })?;
        let n_dims = rope.op_params()[1].max(0) as usize;
        // The CPU kernel asserts an even offset and offset + n_dims <= ne0.
        let fits = n_offs % 2 == 0
            && n_offs
                .checked_add(n_dims)
                .is_some_and(|end| end as i64 <= rope.ne()[0]);
        ensure(fits, "rope_set_offset", || {
            format!(
                "offset {n_offs} (must be even) + {n_dims} rotated dims exceed heads of {}",
                shape(rope)
            )
        })?;
        // SAFETY: a RoPE node made by rope_ext / rope_ext_back (never vision mode) and a non-negative, even offset
        // that fits the head.
        unsafe { sys::ggml_rope_set_offset(rope.as_ptr(), n_offs as i32) };
        Ok(rope)
    }

    /// `silu(min(a, limit)) * clamp(b, -limit, limit)` with `a`, `b` of one shape and type (DeepSeek V4's clamped
    /// SwiGLU).
    pub fn swiglu_clamp<'c>(
        &'c self,
        a: Tensor<'c>,
        b: Tensor<'c>,
        limit: f32,
    ) -> Result<Tensor<'c>> {
        self.check_glu("swiglu_clamp", a, b)?;
        // SAFETY: ggml_glu_impl's assertions hold (checked); room reserved.
        self.op("swiglu_clamp", 1, |ctx| unsafe {
            sys::ggml_swiglu_clamp(ctx, a.as_ptr(), b.as_ptr(), limit)
        })
    }

    /// A tensor of `a`'s shape (F32 or F16, contiguous) filled with `c`.
    pub fn fill<'c>(&'c self, a: Tensor<'c>, c: f32) -> Result<Tensor<'c>> {
        let ok = matches!(a.ty(), Some(GgmlType::F32 | GgmlType::F16)) && a.is_contiguous();
        ensure(ok, "fill", || {
            format!("a {} must be contiguous F32 or F16", shape(a))
        })?;
        // SAFETY: type and contiguity checked; room reserved.
        self.op("fill", 1, |ctx| unsafe {
            sys::ggml_fill(ctx, a.as_ptr(), c)
        })
    }

    /// DSA lightning indexer scores: `q` F32 `{d, n_head, n_batch, s}`, `k` `{d, 1, n_kv, s}`, `weights` F32
    /// `{n_head, n_batch, 1, s}` (pre-scaled), `mask` F16 `{n_kv, n_batch, 1, m}` with `s % m == 0` ->
    /// F32 `{n_kv, n_batch, 1, s}`. The model scores with products instead (`model::attention`, faster on the CPU;
    /// CUDA has no kernel for this operator); its tests compare them with this one.
    pub fn lightning_indexer<'c>(
        &'c self,
        q: Tensor<'c>,
        k: Tensor<'c>,
        weights: Tensor<'c>,
        mask: Tensor<'c>,
    ) -> Result<Tensor<'c>> {
        let (nq, nk, nw, nm) = (q.ne(), k.ne(), weights.ne(), mask.ne());
        let types = is_f32(q) && is_f32(weights) && mask.ty() == Some(GgmlType::F16);
        let shapes = nq[0] == nk[0]
            && nm[0] == nk[2]
            && nq[1] == nw[0]
            && nk[1] == 1
            && nm[1] == nq[2]
            && nq[2] == nw[1]
            && nw[2] == 1
            && nm[2] == 1
            && nq[3] == nk[3]
            && nk[3] == nw[3]
            && nm[3] > 0
            && nw[3] % nm[3] == 0;
        ensure(types && shapes, "lightning_indexer", || {
            format!(
                "q {}, k {}, weights {}, mask {}",
                shape(q),
                shape(k),
                shape(weights),
                shape(mask)
            )
        })?;
        // SAFETY: every ggml_lightning_indexer assertion was checked; room reserved.
        self.op("lightning_indexer", 1, |ctx| unsafe {
            sys::ggml_lightning_indexer(
                ctx,
                q.as_ptr(),
                k.as_ptr(),
                weights.as_ptr(),
                mask.as_ptr(),
            )
        })
    }

    /// Hyper-connection combination matrices: `mixes` F32 `{(2 + hc) * hc, n_tokens}` (hc = 4), `scale` F32
    /// `{>= 3}`, `base` F32 `{(2 + hc) * hc}` -> F32 `{hc, hc, n_tokens}` (Sinkhorn-normalized, `n_iter` rounds).
    pub fn dsv4_hc_comb<'c>(
        &'c self,
        mixes: Tensor<'c>,
        scale: Tensor<'c>,
        base: Tensor<'c>,
        eps: f32,
        n_iter: u32,
    ) -> Result<Tensor<'c>> {
        let (nm, ns, nb) = (mixes.ne(), scale.ne(), base.ne());
        const HC: i64 = 4; // the only width the pinned ggml accepts
        let ok = is_f32(mixes)
            && is_f32(scale)
            && is_f32(base)
            && n_iter > 0
            && n_iter <= i32::MAX as u32
            && nm[0] == (2 + HC) * HC
            && nm[2] == 1
            && nm[3] == 1
            && ns[0] >= 3
            && ns[1..] == [1, 1, 1]
            && nb[0] == nm[0]
            && nb[1..] == [1, 1, 1];
        ensure(ok, "dsv4_hc_comb", || {
            format!(
                "mixes {}, scale {}, base {}, n_iter {n_iter} (hc must be 4)",
                shape(mixes),
                shape(scale),
                shape(base)
            )
        })?;
        // SAFETY: every ggml_dsv4_hc_comb assertion was checked; room reserved.
        self.op("dsv4_hc_comb", 1, |ctx| unsafe {
            sys::ggml_dsv4_hc_comb(
                ctx,
                mixes.as_ptr(),
                scale.as_ptr(),
                base.as_ptr(),
                eps,
                n_iter as i32,
            )
        })
    }

    /// Hyper-connection input mix: `x` F32 `{n_embd, hc, n_tokens}`, `weights` F32 `{hc, n_tokens}` ->
    /// F32 `{n_embd, n_tokens}` with `out[i, t] = sum_h x[i, h, t] * weights[h, t]`.
    pub fn dsv4_hc_pre<'c>(&'c self, x: Tensor<'c>, weights: Tensor<'c>) -> Result<Tensor<'c>> {
        let (nx, nw) = (x.ne(), weights.ne());
        let ok =
            is_f32(x) && is_f32(weights) && nx[1] > 0 && nx[3] == 1 && nw == [nx[1], nx[2], 1, 1];
        ensure(ok, "dsv4_hc_pre", || {
            format!("x {}, weights {}", shape(x), shape(weights))
        })?;
        // SAFETY: every ggml_dsv4_hc_pre assertion was checked; room reserved.
        self.op("dsv4_hc_pre", 1, |ctx| unsafe {
            sys::ggml_dsv4_hc_pre(ctx, x.as_ptr(), weights.as_ptr())
        })
    }

    /// Hyper-connection output: `x` F32 `{n_embd, n_tokens}`, `residual` F32 `{n_embd, hc, n_tokens}`, `post` F32
    /// `{hc, n_tokens}`, `comb` F32 `{hc, hc, n_tokens}` (None = identity) -> F32 `{n_embd, hc, n_tokens}` with
    /// `out[i, d, t] = x[i, t] * post[d, t] + sum_s residual[i, s, t] * comb[d, s, t]`.
    pub fn dsv4_hc_post<'c>(
        &'c self,
        x: Tensor<'c>,
        residual: Tensor<'c>,
        post: Tensor<'c>,
        comb: Option<Tensor<'c>>,
    ) -> Result<Tensor<'c>> {
        let (nx, nr, np) = (x.ne(), residual.ne(), post.ne());
        let (n_embd, n_tokens, hc) = (nx[0], nx[1], nr[1]);
        let mut ok = is_f32(x)
            && is_f32(residual)
            && is_f32(post)
            && hc > 0
            && nx[2..] == [1, 1]
            && nr == [n_embd, hc, n_tokens, 1]
            && np == [hc, n_tokens, 1, 1];
        if let Some(c) = comb {
            ok &= is_f32(c) && c.ne() == [hc, hc, n_tokens, 1];
        }
        ensure(ok, "dsv4_hc_post", || {
            let comb = comb.map_or_else(|| "none".into(), shape);
            format!(
                "x {}, residual {}, post {}, comb {comb}",
                shape(x),
                shape(residual),
                shape(post)
            )
        })?;
        let comb_ptr = comb.map_or(std::ptr::null_mut(), |c| c.as_ptr());
        // SAFETY: every ggml_dsv4_hc_post assertion was checked; comb may be NULL; room reserved.
        self.op("dsv4_hc_post", 1, |ctx| unsafe {
            sys::ggml_dsv4_hc_post(ctx, x.as_ptr(), residual.as_ptr(), post.as_ptr(), comb_ptr)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::testutil::run_f32;

    #[test]
    fn hyper_connection_pre_and_post() {
        let (n_embd, hc, n_tok) = (3i64, 4i64, 2i64);
        let ctx = Context::with_capacity(16, 0).unwrap();
        let x = ctx.new_tensor_3d(GgmlType::F32, n_embd, hc, n_tok).unwrap();
        let w = ctx.new_tensor_2d(GgmlType::F32, hc, n_tok).unwrap();
        let pre = ctx.dsv4_hc_pre(x, w).unwrap();
        let f = ctx.new_tensor_2d(GgmlType::F32, n_embd, n_tok).unwrap();
        let post = ctx.dsv4_hc_post(f, x, w, None).unwrap();
        assert!(ctx.dsv4_hc_pre(w, x).is_err());
        let xs: Vec<f32> = (0..n_embd * hc * n_tok).map(|i| i as f32).collect();
        let ws: Vec<f32> = (0..hc * n_tok).map(|i| 0.5 + i as f32).collect();
        let fs: Vec<f32> = (0..n_embd * n_tok).map(|i| -(i as f32)).collect();
        let out = run_f32(&ctx, &[pre, post], || {
            x.set_f32(&xs).unwrap();
            w.set_f32(&ws).unwrap();
            f.set_f32(&fs).unwrap();
        });
        let (e, h, t) = (n_embd as usize, hc as usize, n_tok as usize);
        for tok in 0..t {
            for i in 0..e {
                let want: f32 = (0..h)
                    .map(|k| xs[i + e * (k + h * tok)] * ws[k + h * tok])
                    .sum();
                assert!((out[0][i + e * tok] - want).abs() < 1e-4);
                for d in 0..h {
                    let want = fs[i + e * tok] * ws[d + h * tok] + xs[i + e * (d + h * tok)];
                    assert!((out[1][i + e * (d + h * tok)] - want).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn rope_with_offset_rotates_only_the_chosen_dims() {
        let (head, n_rot, offs) = (8i64, 4usize, 4usize);
        let ctx = Context::with_capacity(16, 0).unwrap();
        let a = ctx.new_tensor_3d(GgmlType::F32, head, 1, 2).unwrap();
        let pos = ctx.new_tensor_1d(GgmlType::I32, 2).unwrap();
        let p = RopeParams::new(n_rot, RopeMode::Normal, 10000.0);
        let r = ctx.rope_ext(a, pos, None, &p).unwrap();
        assert!(ctx.rope_set_offset(r, 5).is_err(), "4 + 5 > 8");
        assert!(ctx.rope_set_offset(a, 0).is_err(), "not a rope");
        let r = ctx.rope_set_offset(r, offs).unwrap();
        assert!(ctx
            .rope_ext(a, pos, None, &RopeParams::new(10, RopeMode::Normal, 1e4))
            .is_err());
        let xs: Vec<f32> = (0..16).map(|i| 1.0 + i as f32).collect();
        let out = run_f32(&ctx, &[r], || {
            a.set_f32(&xs).unwrap();
            pos.set_i32(&[0, 1]).unwrap();
        });
        // Token 0 (position 0) is unchanged; token 1 keeps dims 0..4 and rotates (x4, x5) by 1 radian.
        assert_eq!(out[0][..8], xs[..8]);
        assert_eq!(out[0][8..12], xs[8..12]);
        let (c, s) = (1f32.cos(), 1f32.sin());
        let (x0, x1) = (xs[12], xs[13]);
        assert!(
            (out[0][12] - (x0 * c - x1 * s)).abs() < 1e-4,
            "{:?}",
            out[0]
        );
        assert!((out[0][13] - (x0 * s + x1 * c)).abs() < 1e-4);
    }

    #[test]
    fn rope_back_undoes_yarn_rope_with_offset() {
        let (head, n_head, n_tok, n_rot, offs) = (16i64, 2i64, 3i64, 8usize, 6usize);
        let ctx = Context::with_capacity(16, 0).unwrap();
        let a = ctx
            .new_tensor_3d(GgmlType::F32, head, n_head, n_tok)
            .unwrap();
        let pos = ctx.new_tensor_1d(GgmlType::I32, n_tok).unwrap();
        let freq_scale = 1.0f32 / 16.0;
        let p = RopeParams {
            n_dims: n_rot,
            mode: RopeMode::Normal,
            n_ctx_orig: 256,
            freq_base: 10000.0,
            freq_scale,
            ext_factor: 1.0,
            attn_factor: 1.0 / (1.0 + 0.1 * (1.0 / freq_scale).ln()),
            beta_fast: 32.0,
            beta_slow: 1.0,
        };
        let fwd = ctx
            .rope_set_offset(ctx.rope_ext(a, pos, None, &p).unwrap(), offs)
            .unwrap();
        let back = ctx.rope_ext_back(fwd, pos, None, &p).unwrap();
        assert!(ctx.rope_set_offset(back, 7).is_err(), "odd offset");
        let back = ctx.rope_set_offset(back, offs).unwrap();
        let bad_pos = ctx.new_tensor_1d(GgmlType::I32, 2).unwrap();
        assert!(ctx.rope_ext_back(a, bad_pos, None, &p).is_err());
        let xs: Vec<f32> = (0..head * n_head * n_tok)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let out = run_f32(&ctx, &[fwd, back], || {
            a.set_f32(&xs).unwrap();
            pos.set_i32(&[0, 7, 300]).unwrap();
        });
        // The forward pass changed the rotated dims of later tokens; the backward pass restores every value.
        assert!((0..xs.len()).any(|i| (out[0][i] - xs[i]).abs() > 1e-2));
        for (i, (&got, &want)) in out[1].iter().zip(&xs).enumerate() {
            assert!((got - want).abs() < 1e-5, "{i}: {got} vs {want}");
        }
        // Dims outside offs..offs + n_rot are copied unchanged by the forward pass.
        for t in 0..(n_head * n_tok) as usize {
            for d in (0..offs).chain(offs + n_rot..head as usize) {
                assert_eq!(out[0][t * head as usize + d], xs[t * head as usize + d]);
            }
        }
    }

    #[test]
    fn clamped_swiglu_and_fill() {
        let ctx = Context::with_capacity(8, 64).unwrap();
        let a = ctx.new_tensor_1d(GgmlType::F32, 3).unwrap();
        let b = ctx.new_tensor_1d(GgmlType::F32, 3).unwrap();
        let y = ctx.swiglu_clamp(a, b, 2.0).unwrap();
        let z = ctx.fill(a, 7.5).unwrap();
        let out = run_f32(&ctx, &[y, z], || {
            a.set_f32(&[1.0, 10.0, -1.0]).unwrap();
            b.set_f32(&[3.0, 1.0, -5.0]).unwrap();
        });
        let silu = |v: f32| v / (1.0 + (-v).exp());
        let want = [silu(1.0) * 2.0, silu(2.0) * 1.0, silu(-1.0) * -2.0];
        for (g, w) in out[0].iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{:?} vs {want:?}", out[0]);
        }
        assert_eq!(out[1], [7.5; 3]);
    }
}
