//! Arithmetic operators (matrix products, element-wise maths, norms, activations, reductions, sorting) as `Context`
//! methods; each checks what ggml would assert on and returns an error instead of aborting.
//!
//! Shapes are written in ggml order `{ne0, ne1, ne2, ne3}` (`ne0` fastest).

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

use super::context::Context;
use super::error::{ensure, Result};
use super::tensor::Tensor;

/// Row order for [`Context::argsort`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortOrder {
    Ascending,
    Descending,
}

/// `ggml_is_transposed`: the first dim is not the one with the smallest stride.
pub(super) fn is_transposed(t: Tensor<'_>) -> bool {
    t.nb()[0] > t.nb()[1]
}

/// `ggml_can_repeat(small, big)`: `small` broadcasts over `big` in every dim.
pub(super) fn can_repeat(small: Tensor<'_>, big: Tensor<'_>) -> bool {
    let (s, b) = (small.ne(), big.ne());
    if s.contains(&0) {
        return b.contains(&0);
    }
    (0..4).all(|i| b[i] % s[i] == 0)
}

/// `ggml_is_contiguous_rows`: each row's elements are adjacent.
pub(super) fn is_contiguous_rows(t: Tensor<'_>) -> bool {
    // SAFETY: reads shape, strides and the type table of a live tensor.
    unsafe { sys::ggml_is_contiguous_rows(t.as_ptr()) }
}

/// `ggml_is_contiguous_1`: contiguous except possibly between rows.
pub(super) fn is_contiguous_1(t: Tensor<'_>) -> bool {
    // SAFETY: as above.
    unsafe { sys::ggml_is_contiguous_1(t.as_ptr()) }
}

/// `ggml_is_padded_1d` (static in ggml.c): whole rows are adjacent beyond dim 1.
fn is_padded_1d(t: Tensor<'_>) -> bool {
    let (ne, nb) = (t.ne(), t.nb());
    let elem = t.ty().map_or(0, |ty| ty.type_size() as usize);
    nb[0] == elem && nb[2] == nb[1] * ne[1] as usize && nb[3] == nb[2] * ne[2] as usize
}

/// Sinks fit a softmax of `a`: F32, contiguous, `ne0 == a.ne[2]` (one per head).
fn sinks_fit(a: Tensor<'_>, sinks: Tensor<'_>) -> bool {
    sinks.ty() == Some(GgmlType::F32) && sinks.is_contiguous() && sinks.ne()[0] == a.ne()[2]
}

pub(super) fn shape(t: Tensor<'_>) -> String {
    format!(
        "{:?} {}",
        t.ne(),
        t.ty()
            .map_or_else(|| format!("type {}", t.ty_id()), |ty| ty.to_string())
    )
}

impl<'m> Context<'m> {
    /// Reserves pool room for `n_tensors` results, then wraps what `build` returns.
    pub(super) fn op<'c>(
        &'c self,
        name: &'static str,
        n_tensors: usize,
        build: impl FnOnce(*mut sys::ggml_context) -> *mut sys::ggml_tensor,
    ) -> Result<Tensor<'c>> {
        self.reserve(n_tensors, 0)?;
        let ptr = build(self.as_ptr());
        self.wrap(name, ptr)
    }

    /// Matrix product: `a {k, m, A2, A3}` (weights, any type) x `b {k, n, B2, B3}` -> F32 `{m, n, B2, B3}`,
    /// where `B2 % A2 == 0` and `B3 % A3 == 0` (a broadcasts). Row `j` of the result is `a * b[:, j]`.
    pub fn mul_mat<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        let (na, nb) = (a.ne(), b.ne());
        ensure(
            na[0] == nb[0] && na[2] > 0 && na[3] > 0 && nb[2] % na[2] == 0 && nb[3] % na[3] == 0,
            "mul_mat",
            || format!("cannot multiply a {} by b {}", shape(a), shape(b)),
        )?;
        ensure(!is_transposed(a), "mul_mat", || {
            format!("a {} is transposed", shape(a))
        })?;
        // SAFETY: ggml_can_mul_mat and !transposed hold (checked); room reserved by `op`.
        self.op("mul_mat", 1, |ctx| unsafe {
            sys::ggml_mul_mat(ctx, a.as_ptr(), b.as_ptr())
        })
    }

    /// Expert matrix product: `experts {k, m, n_expert}` x `b {k, B1, n_tokens}` with `ids` I32
    /// `{n_used, n_tokens}` -> F32 `{m, n_used, n_tokens}`; `B1` is 1 (shared input) or `n_used`.
    pub fn mul_mat_id<'c>(
        &'c self,
        experts: Tensor<'c>,
        b: Tensor<'c>,
        ids: Tensor<'c>,
    ) -> Result<Tensor<'c>> {
        let (a, bn, i) = (experts.ne(), b.ne(), ids.ne());
        let why = || {
            format!(
                "experts {}, b {}, ids {}",
                shape(experts),
                shape(b),
                shape(ids)
            )
        };
        ensure(!is_transposed(experts), "mul_mat_id", || {
            format!("experts are transposed: {}", why())
        })?;
        ensure(ids.ty() == Some(GgmlType::I32), "mul_mat_id", || {
            format!("ids must be I32: {}", why())
        })?;
        ensure(
            a[3] == 1 && bn[3] == 1 && i[2] == 1 && i[3] == 1,
            "mul_mat_id",
            || format!("experts and b must be 3-d, ids 2-d: {}", why()),
        )?;
        ensure(
            i[1] == bn[2] && a[0] == bn[0] && bn[1] > 0 && i[0] % bn[1] == 0,
            "mul_mat_id",
            || format!("shapes do not match: {}", why()),
        )?;
        // SAFETY: every ggml_mul_mat_id assertion was checked; room reserved.
        self.op("mul_mat_id", 1, |ctx| unsafe {
            sys::ggml_mul_mat_id(ctx, experts.as_ptr(), b.as_ptr(), ids.as_ptr())
        })
    }

    fn binary<'c>(
        &'c self,
        name: &'static str,
        a: Tensor<'c>,
        b: Tensor<'c>,
        f: unsafe extern "C" fn(
            *mut sys::ggml_context,
            *mut sys::ggml_tensor,
            *mut sys::ggml_tensor,
        ) -> *mut sys::ggml_tensor,
    ) -> Result<Tensor<'c>> {
        ensure(can_repeat(b, a), name, || {
            format!("b {} does not broadcast over a {}", shape(b), shape(a))
        })?;
        // SAFETY: `f` is one of ggml's element-wise binary ops, whose only assertion (b repeats over a) holds.
        self.op(name, 1, |ctx| unsafe { f(ctx, a.as_ptr(), b.as_ptr()) })
    }

    /// `a + b`, `b` broadcast over `a`; result has `a`'s shape and type.
    pub fn add<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        self.binary("add", a, b, sys::ggml_add)
    }

    /// `a - b`, `b` broadcast over `a`.
    pub fn sub<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        self.binary("sub", a, b, sys::ggml_sub)
    }

    /// `a * b` element-wise, `b` broadcast over `a`.
    pub fn mul<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        self.binary("mul", a, b, sys::ggml_mul)
    }

    /// `a / b` element-wise, `b` broadcast over `a`.
    pub fn div<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        self.binary("div", a, b, sys::ggml_div)
    }

    /// `a * s`.
    pub fn scale<'c>(&'c self, a: Tensor<'c>, s: f32) -> Result<Tensor<'c>> {
        ensure(is_padded_1d(a), "scale", || {
            format!("a {} must have adjacent rows", shape(a))
        })?;
        // SAFETY: ggml_is_padded_1d holds (checked); room reserved.
        self.op("scale", 1, |ctx| unsafe {
            sys::ggml_scale(ctx, a.as_ptr(), s)
        })
    }

    /// `a * s + b`.
    pub fn scale_bias<'c>(&'c self, a: Tensor<'c>, s: f32, b: f32) -> Result<Tensor<'c>> {
        ensure(is_padded_1d(a), "scale_bias", || {
            format!("a {} must have adjacent rows", shape(a))
        })?;
        // SAFETY: ggml_is_padded_1d holds (checked); room reserved.
        self.op("scale_bias", 1, |ctx| unsafe {
            sys::ggml_scale_bias(ctx, a.as_ptr(), s, b)
        })
    }

    /// `min(max(a, min), max)` element-wise (infinite bounds allowed, e.g. `-inf..limit`).
    pub fn clamp<'c>(&'c self, a: Tensor<'c>, min: f32, max: f32) -> Result<Tensor<'c>> {
        ensure(!min.is_nan() && !max.is_nan(), "clamp", || {
            format!("bounds {min}..{max} must not be NaN")
        })?;
        // SAFETY: ggml_clamp asserts nothing; room reserved.
        self.op("clamp", 1, |ctx| unsafe {
            sys::ggml_clamp(ctx, a.as_ptr(), min, max)
        })
    }

    /// Each row divided by its root mean square: `x / sqrt(mean(x^2) + eps)` over `ne0`.
    pub fn rms_norm<'c>(&'c self, a: Tensor<'c>, eps: f32) -> Result<Tensor<'c>> {
        // SAFETY: ggml_rms_norm asserts nothing on its input; room reserved.
        self.op("rms_norm", 1, |ctx| unsafe {
            sys::ggml_rms_norm(ctx, a.as_ptr(), eps)
        })
    }

    fn unary<'c>(
        &'c self,
        name: &'static str,
        a: Tensor<'c>,
        f: unsafe extern "C" fn(
            *mut sys::ggml_context,
            *mut sys::ggml_tensor,
        ) -> *mut sys::ggml_tensor,
    ) -> Result<Tensor<'c>> {
        ensure(is_contiguous_rows(a), name, || {
            format!("rows of a {} must be contiguous", shape(a))
        })?;
        // SAFETY: `f` is a ggml unary op whose only assertion (contiguous rows) holds; room reserved.
        self.op(name, 1, |ctx| unsafe { f(ctx, a.as_ptr()) })
    }

    /// `x * sigmoid(x)`.
    pub fn silu<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        self.unary("silu", a, sys::ggml_silu)
    }

    /// `max(x, 0)`.
    pub fn relu<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        self.unary("relu", a, sys::ggml_relu)
    }

    /// `1 / (1 + exp(-x))`.
    pub fn sigmoid<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        self.unary("sigmoid", a, sys::ggml_sigmoid)
    }

    /// `log(1 + exp(x))`.
    pub fn softplus<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        self.unary("softplus", a, sys::ggml_softplus)
    }

    /// `sqrt(x)`.
    pub fn sqrt<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: ggml_sqrt asserts nothing; room reserved.
        self.op("sqrt", 1, |ctx| unsafe { sys::ggml_sqrt(ctx, a.as_ptr()) })
    }

    /// `silu(a) * b` for two halves given separately: `a`, `b` `{n, ...}` of one shape and type -> `{n, ...}`.
    pub fn swiglu_split<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        self.check_glu("swiglu_split", a, b)?;
        // SAFETY: ggml_glu_impl's assertions hold (checked); room reserved.
        self.op("swiglu_split", 1, |ctx| unsafe {
            sys::ggml_swiglu_split(ctx, a.as_ptr(), b.as_ptr())
        })
    }

    pub(super) fn check_glu(&self, name: &'static str, a: Tensor<'_>, b: Tensor<'_>) -> Result<()> {
        ensure(
            is_contiguous_1(a) && is_contiguous_1(b) && a.ne() == b.ne() && a.ty_id() == b.ty_id(),
            name,
            || {
                format!(
                    "a {} and b {} must be contiguous with one shape and type",
                    shape(a),
                    shape(b)
                )
            },
        )
    }

    /// Sum of each row: `{n, r1, r2, r3}` -> `{1, r1, r2, r3}`.
    pub fn sum_rows<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: ggml_sum_rows asserts nothing; room reserved.
        self.op("sum_rows", 1, |ctx| unsafe {
            sys::ggml_sum_rows(ctx, a.as_ptr())
        })
    }

    /// `softmax(a * scale + mask)` over `ne0` of each row (`max_bias` > 0 adds ALiBi slopes and needs a mask).
    /// `a {n, rows, a2, a3}` contiguous; `mask` F16/F32 `{n, >= rows, m2, m3}` with `a2 % m2 == 0`, `a3 % m3 == 0`.
    pub fn soft_max_ext<'c>(
        &'c self,
        a: Tensor<'c>,
        mask: Option<Tensor<'c>>,
        scale: f32,
        max_bias: f32,
    ) -> Result<Tensor<'c>> {
        ensure(a.is_contiguous(), "soft_max_ext", || {
            format!("a {} is not contiguous", shape(a))
        })?;
        if let Some(m) = mask {
            let (ma, mm) = (a.ne(), m.ne());
            let ok_ty = matches!(m.ty(), Some(GgmlType::F16 | GgmlType::F32));
            ensure(
                ok_ty
                    && m.is_contiguous()
                    && mm[0] == ma[0]
                    && mm[1] >= ma[1]
                    && mm[2] > 0
                    && mm[3] > 0
                    && ma[2] % mm[2] == 0
                    && ma[3] % mm[3] == 0,
                "soft_max_ext",
                || format!("mask {} does not fit a {}", shape(m), shape(a)),
            )?;
        }
        ensure(max_bias <= 0.0 || mask.is_some(), "soft_max_ext", || {
            "max_bias > 0 needs a mask".into()
        })?;
        let mask_ptr = mask.map_or(std::ptr::null_mut(), |m| m.as_ptr());
        // SAFETY: every ggml_soft_max_impl assertion was checked; the mask may be NULL; room reserved.
        self.op("soft_max_ext", 1, |ctx| unsafe {
            sys::ggml_soft_max_ext(ctx, a.as_ptr(), mask_ptr, scale, max_bias)
        })
    }

    /// Adds attention sinks to a softmax node made by [`Context::soft_max_ext`] of this context: row `i` of head
    /// `h` becomes `exp(l_i - m) / (sum_j exp(l_j - m) + exp(sinks[h] - m))` with `m = max(max_j l_j, sinks[h])`.
    /// `sinks` F32 contiguous `{n_head}` with `n_head == kq.ne[2]`.
    ///
    /// The node keeps a pointer to `sinks`, so for safety `sinks` (and everything it is computed from) must live in
    /// this same context; to use weights of another context (e.g. the model's), use [`Context::soft_max_ext_sinks`],
    /// which builds the node and attaches the sinks in one step.
    pub fn soft_max_add_sinks(&self, kq: Tensor<'_>, sinks: Tensor<'_>) -> Result<()> {
        ensure(self.owns(kq), "soft_max_add_sinks", || {
            format!("kq {} does not belong to this context", shape(kq))
        })?;
        ensure(self.owns_all_reachable(sinks), "soft_max_add_sinks", || {
            format!(
                    "sinks {} (or a tensor it depends on) belong to another context; use soft_max_ext_sinks",
                    shape(sinks)
                )
        })?;
        self.check_sinks(kq, sinks)?;
        // SAFETY: kq is a SOFT_MAX node without sinks, sinks is F32 with one value per head (checked, as ggml asserts);
        // sinks and its sources live in this context, which also holds kq, so the new pointer cannot dangle.
        unsafe { sys::ggml_soft_max_add_sinks(kq.as_ptr(), sinks.as_ptr()) };
        Ok(())
    }

    /// [`Context::soft_max_ext`] with attention sinks ([`Context::soft_max_add_sinks`]): `sinks` F32 contiguous
    /// `{n_head}` with `n_head == a.ne[2]`; it may live in any context (it is an input of the result like `a`).
    pub fn soft_max_ext_sinks<'c>(
        &'c self,
        a: Tensor<'c>,
        mask: Option<Tensor<'c>>,
        scale: f32,
        max_bias: f32,
        sinks: Tensor<'c>,
    ) -> Result<Tensor<'c>> {
        ensure(sinks_fit(a, sinks), "soft_max_ext_sinks", || {
            format!(
                "sinks {} must be F32 contiguous {{{}}}",
                shape(sinks),
                a.ne()[2]
            )
        })?;
        let kq = self.soft_max_ext(a, mask, scale, max_bias)?;
        self.check_sinks(kq, sinks)?;
        // SAFETY: a fresh SOFT_MAX node without sinks and F32 sinks with one value per head (checked); the result's
        // lifetime 'c is bounded by the sinks' context, like any operator input.
        unsafe { sys::ggml_soft_max_add_sinks(kq.as_ptr(), sinks.as_ptr()) };
        Ok(kq)
    }

    fn check_sinks(&self, kq: Tensor<'_>, sinks: Tensor<'_>) -> Result<()> {
        // SAFETY: kq is alive; reading its src array by value.
        let src = unsafe { (*kq.as_ptr()).src };
        ensure(
            kq.op() == sys::GGML_OP_SOFT_MAX && src[2].is_null() && !src[0].is_null(),
            "soft_max_add_sinks",
            || format!("{} is not a softmax node without sinks", shape(kq)),
        )?;
        ensure(sinks_fit(kq, sinks), "soft_max_add_sinks", || {
            format!(
                "sinks {} must be F32 contiguous {{{}}}",
                shape(sinks),
                kq.ne()[2]
            )
        })
    }

    /// True when `t` and every tensor it depends on (sources and view sources) live in this context.
    pub(super) fn owns_all_reachable(&self, t: Tensor<'_>) -> bool {
        let mut stack = vec![t.as_ptr()];
        let mut seen = std::collections::HashSet::new();
        while let Some(p) = stack.pop() {
            if p.is_null() || !seen.insert(p) {
                continue;
            }
            // SAFETY: `p` is `t` or a source / view source of a live tensor, which outlives it.
            let (raw, cur) = unsafe { (std::ptr::read(p), Tensor::from_raw(p)) };
            if !cur.is_some_and(|c| self.owns(c)) {
                return false;
            }
            stack.extend(raw.src);
            stack.push(raw.view_src);
        }
        true
    }

    /// Makes a matrix product accumulate in F32 (`ggml_mul_mat_set_prec(GGML_PREC_F32)`); `t` must be a
    /// [`Context::mul_mat`] result. Modifies and returns `t`.
    pub fn set_prec_f32<'c>(&self, t: Tensor<'c>) -> Result<Tensor<'c>> {
        ensure(t.op() == sys::GGML_OP_MUL_MAT, "set_prec_f32", || {
            format!("{} is not a mul_mat result", shape(t))
        })?;
        // SAFETY: a MUL_MAT node (ggml's only assertion); only its op params change.
        unsafe { sys::ggml_mul_mat_set_prec(t.as_ptr(), sys::GGML_PREC_F32) };
        Ok(t)
    }

    /// Rotates every `n`-wide chunk of `x` by the orthonormal Walsh-Hadamard matrix `rot` (F32 `{n, n}`, `n` a power
    /// of two dividing `x`'s element count), as llama.cpp's `llama_mul_mat_hadamard`: a matrix product marked so the
    /// CPU backend runs a fast Walsh-Hadamard transform. Returns `x`'s shape.
    pub fn mul_mat_hadamard<'c>(&'c self, rot: Tensor<'c>, x: Tensor<'c>) -> Result<Tensor<'c>> {
        let n = rot.ne()[0];
        let ok = rot.ty() == Some(GgmlType::F32)
            && rot.ne() == [n, n, 1, 1]
            && n > 0
            && (n & (n - 1)) == 0
            && x.n_elements() % n == 0;
        ensure(ok, "mul_mat_hadamard", || {
            format!("rot {} and x {}", shape(rot), shape(x))
        })?;
        let ne = x.ne();
        let flat = if x.is_contiguous() {
            self.reshape_2d(x, [n, x.n_elements() / n])?
        } else {
            self.cont_2d(x, n, x.n_elements() / n)?
        };
        let product = self.mul_mat(rot, flat)?;
        // SAFETY: a MUL_MAT node made just above; only its op params change.
        unsafe { sys::ggml_mul_mat_set_hint(product.as_ptr(), sys::GGML_HINT_SRC0_IS_HADAMARD) };
        self.reshape_4d(product, ne)
    }

    /// Indices (I32) that sort each row: `{n, ...}` -> `{n, ...}`.
    pub fn argsort<'c>(&'c self, a: Tensor<'c>, order: SortOrder) -> Result<Tensor<'c>> {
        ensure(a.ne()[0] <= i32::MAX as i64, "argsort", || {
            format!("rows of a {} are too long", shape(a))
        })?;
        let order = match order {
            SortOrder::Ascending => sys::GGML_SORT_ORDER_ASC,
            SortOrder::Descending => sys::GGML_SORT_ORDER_DESC,
        };
        // SAFETY: the row length fits i32 (checked); room reserved.
        self.op("argsort", 1, |ctx| unsafe {
            sys::ggml_argsort(ctx, a.as_ptr(), order)
        })
    }

    fn check_k(&self, name: &'static str, a: Tensor<'_>, k: usize) -> Result<i32> {
        let k32 = i32::try_from(k).unwrap_or(i32::MAX);
        ensure(k >= 1 && (k as i64) <= a.ne()[0], name, || {
            format!("k = {k} for rows of a {}", shape(a))
        })?;
        Ok(k32)
    }

    /// Indices (I32) of the `k` largest values of each row, in no particular order (`ggml_top_k`):
    /// `{n, r1, r2, r3}` -> `{k, r1, r2, r3}`.
    pub fn top_k<'c>(&'c self, a: Tensor<'c>, k: usize) -> Result<Tensor<'c>> {
        let k = self.check_k("top_k", a, k)?;
        // SAFETY: 1 <= k <= ne0 (checked); room reserved.
        self.op("top_k", 1, |ctx| unsafe {
            sys::ggml_top_k(ctx, a.as_ptr(), k)
        })
    }

    /// Indices (I32) of the `k` largest values of each row, largest first (`argsort` descending + view).
    pub fn argsort_top_k<'c>(&'c self, a: Tensor<'c>, k: usize) -> Result<Tensor<'c>> {
        let k = self.check_k("argsort_top_k", a, k)?;
        ensure(a.ne()[0] <= i32::MAX as i64, "argsort_top_k", || {
            format!("rows of a {} are too long", shape(a))
        })?;
        // SAFETY: 1 <= k <= ne0 and ne0 fits i32 (checked); room reserved for the sort and its view.
        self.op("argsort_top_k", 2, |ctx| unsafe {
            sys::ggml_argsort_top_k(ctx, a.as_ptr(), k)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::testutil::run_f32;

    #[test]
    fn elementwise_norm_softmax_and_sorting() {
        let ctx = Context::with_capacity(32, 0).unwrap();
        let a = ctx.new_tensor_2d(GgmlType::F32, 4, 2).unwrap();
        let b = ctx.new_tensor_1d(GgmlType::F32, 4).unwrap();
        let sum = ctx.add(a, b).unwrap();
        let prod = ctx.mul(a, b).unwrap();
        let norm = ctx.rms_norm(a, 0.0).unwrap();
        let soft = ctx.soft_max_ext(a, None, 1.0, 0.0).unwrap();
        let rows = ctx.sum_rows(a).unwrap();
        let sig = ctx.sigmoid(b).unwrap();
        let top = ctx.argsort_top_k(a, 2).unwrap();
        let top_f = ctx.new_tensor_2d(GgmlType::F32, 2, 2).unwrap();
        let top_as_f32 = ctx.cpy(top, top_f).unwrap();
        let out = run_f32(
            &ctx,
            &[sum, prod, norm, soft, rows, sig, top_as_f32],
            || {
                a.set_f32(&[1.0, 2.0, 3.0, 4.0, -1.0, 5.0, 0.0, 2.0])
                    .unwrap();
                b.set_f32(&[0.0, 1.0, 2.0, 3.0]).unwrap();
            },
        );
        assert_eq!(out[0], [1.0, 3.0, 5.0, 7.0, -1.0, 6.0, 2.0, 5.0]);
        assert_eq!(out[1], [0.0, 2.0, 6.0, 12.0, -0.0, 5.0, 0.0, 6.0]);
        let rms = (30.0f32 / 4.0).sqrt();
        assert!((out[2][3] - 4.0 / rms).abs() < 1e-5);
        let e: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|v| v.exp()).collect();
        assert!((out[3][3] - e[3] / e.iter().sum::<f32>()).abs() < 1e-6);
        assert_eq!(out[4], [10.0, 6.0]);
        assert!((out[5][0] - 0.5).abs() < 1e-6);
        assert_eq!(out[6], [3.0, 2.0, 1.0, 3.0]);
    }

    #[test]
    fn scale_bias_clamp_relu_and_f32_precision() {
        let ctx = Context::with_capacity(16, 0).unwrap();
        let a = ctx.new_tensor_1d(GgmlType::F32, 4).unwrap();
        let sb = ctx.scale_bias(a, 2.0, -1.0).unwrap();
        let cl = ctx.clamp(a, f32::NEG_INFINITY, 1.5).unwrap();
        let cl2 = ctx.clamp(a, -0.5, f32::INFINITY).unwrap();
        let re = ctx.relu(a).unwrap();
        assert!(ctx.clamp(a, f32::NAN, 1.0).is_err());
        assert!(ctx.set_prec_f32(a).is_err(), "not a mul_mat");
        let w = ctx.new_tensor_2d(GgmlType::F32, 4, 2).unwrap();
        let mm = ctx.set_prec_f32(ctx.mul_mat(w, a).unwrap()).unwrap();
        let out = run_f32(&ctx, &[sb, cl, cl2, re, mm], || {
            a.set_f32(&[-2.0, -0.25, 1.0, 3.0]).unwrap();
            w.set_f32(&[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0])
                .unwrap();
        });
        assert_eq!(out[0], [-5.0, -1.5, 1.0, 5.0]);
        assert_eq!(out[1], [-2.0, -0.25, 1.0, 1.5]);
        assert_eq!(out[2], [-0.5, -0.25, 1.0, 3.0]);
        assert_eq!(out[3], [0.0, 0.0, 1.0, 3.0]);
        assert_eq!(out[4], [1.75, 6.0]);
    }

    #[test]
    fn softmax_with_sinks() {
        let (n, rows, heads) = (3i64, 2i64, 2i64);
        let ctx = Context::with_capacity(16, 0).unwrap();
        let a = ctx.new_tensor_3d(GgmlType::F32, n, rows, heads).unwrap();
        let sinks = ctx.new_tensor_1d(GgmlType::F32, heads).unwrap();
        let s1 = ctx.soft_max_ext(a, None, 1.0, 0.0).unwrap();
        ctx.soft_max_add_sinks(s1, sinks).unwrap();
        assert!(
            ctx.soft_max_add_sinks(s1, sinks).is_err(),
            "sinks already set"
        );
        let s2 = ctx.soft_max_ext_sinks(a, None, 1.0, 0.0, sinks).unwrap();
        assert!(ctx.soft_max_add_sinks(a, sinks).is_err(), "not a softmax");
        let bad = ctx.new_tensor_1d(GgmlType::F32, 3).unwrap();
        let s3 = ctx.soft_max_ext(a, None, 1.0, 0.0).unwrap();
        assert!(
            ctx.soft_max_add_sinks(s3, bad).is_err(),
            "one sink per head"
        );
        let other = Context::with_capacity(2, 0).unwrap();
        let foreign = other.new_tensor_1d(GgmlType::F32, heads).unwrap();
        assert!(
            ctx.soft_max_add_sinks(s3, foreign).is_err(),
            "sinks of another context"
        );
        let s4 = ctx.soft_max_ext_sinks(a, None, 1.0, 0.0, foreign).unwrap();
        assert_eq!(s4.ne(), a.ne());
        let ls: Vec<f32> = [
            0.5, -1.0, 2.0, 3.0, 3.0, 0.0, -2.0, 1.0, 0.25, 4.0, 4.5, -3.0,
        ]
        .to_vec();
        let ss = [1.0f32, 5.0];
        let out = run_f32(&ctx, &[s1, s2, s3], || {
            a.set_f32(&ls).unwrap();
            sinks.set_f32(&ss).unwrap();
            bad.set_f32(&[0.0; 3]).unwrap();
        });
        for h in 0..heads as usize {
            for r in 0..rows as usize {
                let row = &ls[(h * rows as usize + r) * 3..][..3];
                let m = row.iter().copied().fold(ss[h], f32::max);
                let denom: f32 = row.iter().map(|l| (l - m).exp()).sum::<f32>() + (ss[h] - m).exp();
                for (i, l) in row.iter().enumerate() {
                    let k = (h * rows as usize + r) * 3 + i;
                    let want = (l - m).exp() / denom;
                    assert!((out[0][k] - want).abs() < 1e-6, "{} vs {want}", out[0][k]);
                    assert!((out[1][k] - want).abs() < 1e-6);
                }
                let plain: f32 = (0..3)
                    .map(|i| out[2][(h * rows as usize + r) * 3 + i])
                    .sum();
                assert!((plain - 1.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn operator_preconditions_are_errors() {
        let ctx = Context::with_capacity(16, 0).unwrap();
        let a = ctx.new_tensor_2d(GgmlType::F32, 4, 3).unwrap();
        let b = ctx.new_tensor_2d(GgmlType::F32, 5, 3).unwrap();
        assert!(ctx.mul_mat(a, b).is_err());
        assert!(ctx.add(a, b).is_err());
        assert!(ctx.top_k(a, 0).is_err());
        assert!(ctx.top_k(a, 5).is_err());
        assert!(
            ctx.soft_max_ext(a, None, 1.0, 1.0).is_err(),
            "ALiBi needs a mask"
        );
        let mask = ctx.new_tensor_2d(GgmlType::F32, 4, 2).unwrap();
        assert!(
            ctx.soft_max_ext(a, Some(mask), 1.0, 0.0).is_err(),
            "mask has too few rows"
        );
        let experts = ctx.new_tensor_3d(GgmlType::F32, 4, 6, 8).unwrap();
        let x = ctx.new_tensor_3d(GgmlType::F32, 4, 1, 3).unwrap();
        let ids = ctx.new_tensor_2d(GgmlType::I32, 2, 3).unwrap();
        assert_eq!(ctx.mul_mat_id(experts, x, ids).unwrap().ne(), [6, 2, 3, 1]);
        let bad_ids = ctx.new_tensor_2d(GgmlType::I32, 2, 4).unwrap();
        assert!(ctx.mul_mat_id(experts, x, bad_ids).is_err());
    }
}
