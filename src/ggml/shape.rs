//! Layout operators: views (bounds-checked against the memory they alias), reshapes, permutes, copies, concat and
//! row gathers, as `Context` methods.
//!
//! Shapes are written in ggml order `{ne0, ne1, ne2, ne3}` (`ne0` fastest); strides `nb` are in bytes.

use gguf::GgmlType;
use llama_cpp_sys_2 as sys;

use super::context::{check_shape, Context};
use super::error::{ensure, GgmlError, Result};
use super::ops::{is_contiguous_rows, shape};
use super::tensor::Tensor;
use super::types::{row_size, to_ggml};

/// Checks that a view of `a` with extents `ne`, row strides `nb[1..]` and byte `offset` stays inside the memory of
/// `a`'s root tensor, by both ggml's rule (contiguous size) and the real extent reached with the given strides.
fn check_view(a: Tensor<'_>, ne: &[i64], nb: &[usize], offset: usize) -> Result<()> {
    let err = |detail: String| GgmlError::Op { op: "view", detail };
    let ty = a
        .ty()
        .ok_or_else(|| err(format!("unknown type {}", a.ty_id())))?;
    check_shape(ty, ne).map_err(|_| err(format!("bad view shape {ne:?} of {ty}")))?;
    let row = row_size(ty, ne[0])?;
    let root = a.view_source().unwrap_or(a);
    let limit = root.n_bytes();
    let start = a.view_offs().checked_add(offset);
    let (contiguous, reached) = if ne.contains(&0) {
        (Some(0), Some(0))
    } else {
        let contiguous = ne[1..]
            .iter()
            .try_fold(row, |acc, &n| acc.checked_mul(n as usize));
        let reached = ne[1..].iter().zip(nb).try_fold(row, |acc, (&n, &stride)| {
            stride.checked_mul(n as usize - 1)?.checked_add(acc)
        });
        (contiguous, reached)
    };
    let end = |size: Option<usize>| start.zip(size).and_then(|(s, n)| s.checked_add(n));
    match (end(contiguous), end(reached)) {
        (Some(c), Some(r)) if c <= limit && r <= limit => Ok(()),
        _ => Err(err(format!(
            "view {ne:?} strides {nb:?} at offset {offset} of {} leaves its {limit} bytes",
            shape(a)
        ))),
    }
}

impl<'m> Context<'m> {
    /// `{ne0}` elements of `a` starting `offset` bytes into it.
    pub fn view_1d<'c>(&'c self, a: Tensor<'c>, ne0: i64, offset: usize) -> Result<Tensor<'c>> {
        check_view(a, &[ne0], &[], offset)?;
        // SAFETY: the view lies inside its root's memory (checked, including ggml's own rule); room reserved.
        self.op("view_1d", 1, |ctx| unsafe {
            sys::ggml_view_1d(ctx, a.as_ptr(), ne0, offset)
        })
    }

    /// `{ne0, ne1}` view of `a` with row stride `nb1` bytes, starting `offset` bytes in.
    pub fn view_2d<'c>(
        &'c self,
        a: Tensor<'c>,
        ne: [i64; 2],
        nb1: usize,
        offset: usize,
    ) -> Result<Tensor<'c>> {
        check_view(a, &ne, &[nb1], offset)?;
        // SAFETY: as in view_1d.
        self.op("view_2d", 1, |ctx| unsafe {
            sys::ggml_view_2d(ctx, a.as_ptr(), ne[0], ne[1], nb1, offset)
        })
    }

    /// `{ne0, ne1, ne2}` view of `a` with strides `nb = [nb1, nb2]` bytes, starting `offset` bytes in.
    pub fn view_3d<'c>(
        &'c self,
        a: Tensor<'c>,
        ne: [i64; 3],
        nb: [usize; 2],
        offset: usize,
    ) -> Result<Tensor<'c>> {
        check_view(a, &ne, &nb, offset)?;
        // SAFETY: as in view_1d.
        self.op("view_3d", 1, |ctx| unsafe {
            sys::ggml_view_3d(ctx, a.as_ptr(), ne[0], ne[1], ne[2], nb[0], nb[1], offset)
        })
    }

    /// `{ne0, ne1, ne2, ne3}` view of `a` with strides `nb = [nb1, nb2, nb3]` bytes, starting `offset` bytes in.
    pub fn view_4d<'c>(
        &'c self,
        a: Tensor<'c>,
        ne: [i64; 4],
        nb: [usize; 3],
        offset: usize,
    ) -> Result<Tensor<'c>> {
        check_view(a, &ne, &nb, offset)?;
        // SAFETY: as in view_1d.
        self.op("view_4d", 1, |ctx| unsafe {
            sys::ggml_view_4d(
                ctx,
                a.as_ptr(),
                ne[0],
                ne[1],
                ne[2],
                ne[3],
                nb[0],
                nb[1],
                nb[2],
                offset,
            )
        })
    }

    fn check_reshape(&self, a: Tensor<'_>, ne: &[i64]) -> Result<()> {
        ensure(a.is_contiguous(), "reshape", || {
            format!("a {} is not contiguous; cont() it first", shape(a))
        })?;
        let ty = a.ty().unwrap_or(GgmlType::F32);
        check_shape(ty, ne)?;
        let n: i64 = ne.iter().product();
        ensure(n == a.n_elements(), "reshape", || {
            format!("{} has {} elements, not {ne:?}", shape(a), a.n_elements())
        })
    }

    /// `a` (contiguous) seen as `{ne0}`.
    pub fn reshape_1d<'c>(&'c self, a: Tensor<'c>, ne0: i64) -> Result<Tensor<'c>> {
        self.check_reshape(a, &[ne0])?;
        // SAFETY: contiguous input, same element count, whole blocks (checked); room reserved.
        self.op("reshape_1d", 1, |ctx| unsafe {
            sys::ggml_reshape_1d(ctx, a.as_ptr(), ne0)
        })
    }

    /// `a` (contiguous) seen as `{ne0, ne1}`.
    pub fn reshape_2d<'c>(&'c self, a: Tensor<'c>, ne: [i64; 2]) -> Result<Tensor<'c>> {
        self.check_reshape(a, &ne)?;
        // SAFETY: as in reshape_1d.
        self.op("reshape_2d", 1, |ctx| unsafe {
            sys::ggml_reshape_2d(ctx, a.as_ptr(), ne[0], ne[1])
        })
    }

    /// `a` (contiguous) seen as `{ne0, ne1, ne2}`.
    pub fn reshape_3d<'c>(&'c self, a: Tensor<'c>, ne: [i64; 3]) -> Result<Tensor<'c>> {
        self.check_reshape(a, &ne)?;
        // SAFETY: as in reshape_1d.
        self.op("reshape_3d", 1, |ctx| unsafe {
            sys::ggml_reshape_3d(ctx, a.as_ptr(), ne[0], ne[1], ne[2])
        })
    }

    /// `a` (contiguous) seen as `{ne0, ne1, ne2, ne3}`.
    pub fn reshape_4d<'c>(&'c self, a: Tensor<'c>, ne: [i64; 4]) -> Result<Tensor<'c>> {
        self.check_reshape(a, &ne)?;
        // SAFETY: as in reshape_1d.
        self.op("reshape_4d", 1, |ctx| unsafe {
            sys::ggml_reshape_4d(ctx, a.as_ptr(), ne[0], ne[1], ne[2], ne[3])
        })
    }

    /// A view with dims moved: dim `i` of `a` becomes dim `axes[i]` of the result (ggml's convention), e.g.
    /// `permute(x {d, h, t}, [0, 2, 1, 3])` is `{d, t, h}`.
    pub fn permute<'c>(&'c self, a: Tensor<'c>, axes: [usize; 4]) -> Result<Tensor<'c>> {
        let distinct = (0..4).all(|i| axes[i] < 4 && (0..i).all(|j| axes[j] != axes[i]));
        ensure(distinct, "permute", || {
            format!("axes {axes:?} are not a permutation of 0..4")
        })?;
        let [x, y, z, w] = axes.map(|v| v as i32);
        // SAFETY: the axes are a permutation of 0..4 (checked); room reserved.
        self.op("permute", 1, |ctx| unsafe {
            sys::ggml_permute(ctx, a.as_ptr(), x, y, z, w)
        })
    }

    /// A view with dims 0 and 1 swapped: `{n, m, ...}` -> `{m, n, ...}`.
    pub fn transpose<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: ggml_transpose asserts nothing; room reserved.
        self.op("transpose", 1, |ctx| unsafe {
            sys::ggml_transpose(ctx, a.as_ptr())
        })
    }

    /// A contiguous copy of `a` (same shape).
    pub fn cont<'c>(&'c self, a: Tensor<'c>) -> Result<Tensor<'c>> {
        // SAFETY: ggml_cont asserts nothing; room reserved.
        self.op("cont", 1, |ctx| unsafe { sys::ggml_cont(ctx, a.as_ptr()) })
    }

    /// `a` converted to `ty` (same shape; contiguous).
    pub fn cast<'c>(&'c self, a: Tensor<'c>, ty: GgmlType) -> Result<Tensor<'c>> {
        check_shape(ty, &a.ne())?;
        // SAFETY: the shape suits `ty` (checked); room reserved.
        self.op("cast", 1, |ctx| unsafe {
            sys::ggml_cast(ctx, a.as_ptr(), to_ggml(ty))
        })
    }

    /// Copies `a` into `dst` (same element count, converting the type); the result is a view of `dst` that must
    /// be in the graph for the copy to happen.
    pub fn cpy<'c>(&'c self, a: Tensor<'c>, dst: Tensor<'c>) -> Result<Tensor<'c>> {
        ensure(a.n_elements() == dst.n_elements(), "cpy", || {
            format!(
                "a {} and dst {} differ in element count",
                shape(a),
                shape(dst)
            )
        })?;
        // SAFETY: equal element counts (checked); room reserved.
        self.op("cpy", 1, |ctx| unsafe {
            sys::ggml_cpy(ctx, a.as_ptr(), dst.as_ptr())
        })
    }

    /// `a` and `b` joined along `dim` (same type; other extents equal).
    pub fn concat<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>, dim: usize) -> Result<Tensor<'c>> {
        let (na, nb) = (a.ne(), b.ne());
        let fits = dim < 4 && a.ty_id() == b.ty_id() && (0..4).all(|d| d == dim || na[d] == nb[d]);
        ensure(fits, "concat", || {
            format!(
                "cannot join a {} and b {} along dim {dim}",
                shape(a),
                shape(b)
            )
        })?;
        ensure(na[dim].checked_add(nb[dim]).is_some(), "concat", || {
            "extent overflows".into()
        })?;
        // SAFETY: dim < 4, same type, other extents equal (checked); room reserved.
        self.op("concat", 1, |ctx| unsafe {
            sys::ggml_concat(ctx, a.as_ptr(), b.as_ptr(), dim as i32)
        })
    }

    /// A contiguous copy of `a` seen as `{ne0, ne1}` (same element count; `a` may be non-contiguous).
    pub fn cont_2d<'c>(&'c self, a: Tensor<'c>, ne0: i64, ne1: i64) -> Result<Tensor<'c>> {
        let ty = a.ty().unwrap_or(GgmlType::F32);
        check_shape(ty, &[ne0, ne1])?;
        ensure(
            ne0.checked_mul(ne1) == Some(a.n_elements()),
            "cont_2d",
            || {
                format!(
                    "{} has {} elements, not {{{ne0}, {ne1}}}",
                    shape(a),
                    a.n_elements()
                )
            },
        )?;
        // SAFETY: the element count matches (ggml_cont_4d's assertion) and the shape is valid for the type, so
        // ggml_new_tensor_4d cannot assert; room reserved.
        self.op("cont_2d", 1, |ctx| unsafe {
            sys::ggml_cont_2d(ctx, a.as_ptr(), ne0, ne1)
        })
    }

    /// `a` tiled to shape `ne` (each `ne[i]` a multiple of `a.ne[i]`), as `ggml_repeat_4d`.
    pub fn repeat_4d<'c>(&'c self, a: Tensor<'c>, ne: [i64; 4]) -> Result<Tensor<'c>> {
        let ty = a.ty().unwrap_or(GgmlType::F32);
        check_shape(ty, &ne)?;
        let na = a.ne();
        let empty = na.contains(&0);
        let fits = empty || (0..4).all(|i| ne[i] % na[i] == 0);
        ensure(fits, "repeat_4d", || {
            format!("a {} does not tile {ne:?}", shape(a))
        })?;
        // SAFETY: ggml_repeat_4d's can_repeat assertion holds (checked, no division by zero since empty `a` is
        // handled first) and the shape is valid; room reserved.
        self.op("repeat_4d", 1, |ctx| unsafe {
            sys::ggml_repeat_4d(ctx, a.as_ptr(), ne[0], ne[1], ne[2], ne[3])
        })
    }

    /// Writes the 2-D `b` into `a` in place (`ggml_set_2d_inplace`): row `i` of `b` to `a`'s bytes from
    /// `offset + i·nb1`. `a` and `b` contiguous, both F32 or both I32. Returns a view of `a` (the SET node): it must be
    /// in the graph for the write to happen, and readers must use it (or a later write's view) to run after it.
    pub fn set_2d<'c>(
        &'c self,
        a: Tensor<'c>,
        b: Tensor<'c>,
        nb1: usize,
        offset: usize,
    ) -> Result<Tensor<'c>> {
        let why = || {
            format!(
                "b {} into a {} rows {nb1} B apart from byte {offset}",
                shape(b),
                shape(a)
            )
        };
        let types = a.ty_id() == b.ty_id() && matches!(a.ty(), Some(GgmlType::F32 | GgmlType::I32));
        ensure(types, "set_2d", || {
            format!("a and b must both be F32 or I32: {}", why())
        })?;
        let [n0, n1, n2, n3] = b.ne();
        let es = 4usize;
        let rows_fit = n2 == 1
            && n3 == 1
            && (n1 <= 1 || (n0 as usize).checked_mul(es).is_some_and(|r| r <= nb1));
        // ggml stores nb1 and offset as int32 and asserts offset < 2^30.
        let params =
            nb1 % es == 0 && offset % es == 0 && nb1 <= i32::MAX as usize && offset < 1 << 30;
        let end = (n1.max(1) as usize - 1)
            .checked_mul(nb1)
            .and_then(|e| e.checked_add((n0 as usize).checked_mul(es)?))
            .and_then(|e| e.checked_add(offset));
        let inside = end.is_some_and(|e| e <= a.n_bytes()) && b.n_elements() <= a.n_elements();
        ensure(
            rows_fit && params && inside && a.is_contiguous() && b.is_contiguous(),
            "set_2d",
            || format!("b does not fit: {}", why()),
        )?;
        // SAFETY: ggml_set_impl's assertions (element counts, offset < 2^30) and the compute-time bound of the
        // last element written hold (checked); room reserved for the view it returns.
        self.op("set_2d", 1, |ctx| unsafe {
            sys::ggml_set_2d_inplace(ctx, a.as_ptr(), b.as_ptr(), nb1, offset)
        })
    }

    /// Scatters the rows of `src` into `dst` (`ggml_set_rows`): `dst {n, R, d2, d3}` (any type the backend can
    /// convert F32 to, e.g. F32, F16, Q8_0), `src` F32/F16 `{n, k, d2, d3}`, `rows` I32/I64 `{k, r2, r3}` with
    /// `d2 % r2 == 0`, `d3 % r3 == 0`: `dst[:, rows[i, j2 % r2, j3 % r3], j2, j3] = src[:, i, j2, j3]`.
    ///
    /// Returns a view of `dst` (the SET_ROWS node): it must be in the graph for the write to happen, and later
    /// readers of the new rows must use it (not `dst`) so they run after the write. `dst` may live in another
    /// context's buffer (a cache); it must not be in a read-only mapped region (compute refuses that). Row ids
    /// are checked by ggml at compute time (out-of-range ids abort there).
    pub fn set_rows<'c>(
        &'c self,
        dst: Tensor<'c>,
        src: Tensor<'c>,
        rows: Tensor<'c>,
    ) -> Result<Tensor<'c>> {
        let (a, b, c) = (dst.ne(), src.ne(), rows.ne());
        let why = || {
            format!(
                "dst {}, src {}, rows {}",
                shape(dst),
                shape(src),
                shape(rows)
            )
        };
        let shapes = a[0] == b[0]
            && a[2] == b[2]
            && a[3] == b[3]
            && b[1] == c[0]
            && c[1] > 0
            && c[2] > 0
            && b[2] % c[1] == 0
            && b[3] % c[2] == 0
            && c[3] == 1;
        ensure(shapes, "set_rows", || {
            format!("shapes do not match: {}", why())
        })?;
        let types = matches!(src.ty(), Some(GgmlType::F32 | GgmlType::F16))
            && matches!(rows.ty(), Some(GgmlType::I32 | GgmlType::I64));
        ensure(types, "set_rows", || {
            format!("src must be F32/F16 and rows I32/I64: {}", why())
        })?;
        ensure(
            is_contiguous_rows(dst) && is_contiguous_rows(src),
            "set_rows",
            || format!("rows of dst and src must be contiguous: {}", why()),
        )?;
        // SAFETY: every ggml_set_rows assertion was checked (including the view of `dst` it makes, which spans
        // exactly `dst`); room reserved for the result.
        self.op("set_rows", 1, |ctx| unsafe {
            sys::ggml_set_rows(ctx, dst.as_ptr(), src.as_ptr(), rows.as_ptr())
        })
    }

    /// Rows of `a {n, rows, a2, a3}` picked by `ids` I32 `{k, a2, a3}` -> F32 (I32 if `a` is I32) `{n, k, a2, a3}`.
    /// Ids are checked by ggml at compute time (out-of-range ids abort there).
    pub fn get_rows<'c>(&'c self, a: Tensor<'c>, ids: Tensor<'c>) -> Result<Tensor<'c>> {
        let (na, ni) = (a.ne(), ids.ne());
        let fits =
            ids.ty() == Some(GgmlType::I32) && na[2] == ni[1] && na[3] == ni[2] && ni[3] == 1;
        ensure(fits, "get_rows", || {
            format!("ids {} do not index rows of a {}", shape(ids), shape(a))
        })?;
        // SAFETY: every ggml_get_rows assertion was checked; room reserved.
        self.op("get_rows", 1, |ctx| unsafe {
            sys::ggml_get_rows(ctx, a.as_ptr(), ids.as_ptr())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::testutil::run_f32;

    #[test]
    fn views_outside_their_source_are_refused() {
        let ctx = Context::with_capacity(16, 0).unwrap();
        let a = ctx.new_tensor_2d(GgmlType::F32, 4, 3).unwrap(); // 48 bytes
        assert!(ctx.view_1d(a, 12, 0).is_ok());
        assert!(ctx.view_1d(a, 12, 4).is_err(), "one element past the end");
        assert!(
            ctx.view_2d(a, [4, 3], 20, 0).is_err(),
            "strides reach past the end"
        );
        assert!(ctx.view_2d(a, [2, 3], 16, 8).is_ok());
        assert!(
            ctx.view_2d(a, [2, 3], 16, usize::MAX - 4).is_err(),
            "offset overflow"
        );
        // A view of a view is checked against the root's memory.
        let tail = ctx.view_1d(a, 4, 32).unwrap();
        assert!(ctx.view_1d(tail, 4, 4).is_err());
        let q = ctx.new_tensor_1d(GgmlType::Q8_0, 64).unwrap();
        assert!(ctx.view_1d(q, 16, 0).is_err(), "partial block");
        assert!(ctx.view_1d(q, 32, 34).is_ok());
    }

    #[test]
    fn reshape_permute_concat_and_get_rows_check_shapes() {
        let ctx = Context::with_capacity(16, 0).unwrap();
        let a = ctx.new_tensor_3d(GgmlType::F32, 4, 3, 2).unwrap();
        assert!(ctx.reshape_2d(a, [6, 4]).is_ok());
        assert!(ctx.reshape_2d(a, [5, 4]).is_err());
        let t = ctx.transpose(a).unwrap();
        assert!(ctx.reshape_1d(t, 24).is_err(), "not contiguous");
        assert!(ctx.permute(a, [0, 0, 1, 2]).is_err());
        assert!(ctx.permute(a, [0, 1, 2, 4]).is_err());
        assert_eq!(ctx.permute(a, [1, 2, 0, 3]).unwrap().ne(), [2, 4, 3, 1]);
        let b = ctx.new_tensor_3d(GgmlType::F32, 4, 5, 2).unwrap();
        assert_eq!(ctx.concat(a, b, 1).unwrap().ne(), [4, 8, 2, 1]);
        assert!(ctx.concat(a, b, 0).is_err());
        let ids = ctx.new_tensor_1d(GgmlType::F32, 2).unwrap();
        assert!(ctx.get_rows(a, ids).is_err(), "ids must be I32");
        assert!(ctx.cpy(a, b).is_err());
    }

    #[test]
    fn cont_2d_repeat_4d_and_set_rows() {
        let ctx = Context::with_capacity(32, 0).unwrap();
        let a = ctx.new_tensor_2d(GgmlType::F32, 3, 2).unwrap(); // rows [0 1 2], [3 4 5]
        let flat = ctx.cont_2d(ctx.transpose(a).unwrap(), 6, 1).unwrap();
        assert!(ctx.cont_2d(a, 4, 2).is_err());
        let b = ctx.new_tensor_2d(GgmlType::F32, 1, 2).unwrap();
        let rep = ctx.repeat_4d(b, [3, 2, 2, 1]).unwrap();
        assert!(ctx.repeat_4d(b, [3, 3, 1, 1]).is_err());
        let dst = ctx.new_tensor_2d(GgmlType::F32, 3, 4).unwrap();
        let rows = ctx.new_tensor_1d(GgmlType::I32, 2).unwrap();
        let set = ctx.set_rows(dst, a, rows).unwrap();
        assert_eq!(set.ne(), dst.ne());
        assert!(set.view_source().is_some_and(|v| v.same_as(dst)));
        let f_rows = ctx.new_tensor_1d(GgmlType::F32, 2).unwrap();
        assert!(
            ctx.set_rows(dst, a, f_rows).is_err(),
            "rows must be I32/I64"
        );
        let three = ctx.new_tensor_1d(GgmlType::I32, 3).unwrap();
        assert!(ctx.set_rows(dst, a, three).is_err(), "one id per src row");
        let wide = ctx.new_tensor_2d(GgmlType::F32, 4, 4).unwrap();
        assert!(ctx.set_rows(wide, a, rows).is_err(), "row length differs");
        let q = ctx.new_tensor_2d(GgmlType::Q8_0, 32, 2).unwrap();
        assert!(ctx
            .set_rows(dst, ctx.cont(ctx.transpose(dst).unwrap()).unwrap(), q)
            .is_err());
        let out = run_f32(&ctx, &[flat, rep, set], || {
            a.set_f32(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
            b.set_f32(&[7.0, 8.0]).unwrap();
            dst.set_f32(&[-1.0; 12]).unwrap();
            rows.set_i32(&[3, 1]).unwrap();
        });
        assert_eq!(out[0], [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(
            out[1],
            [7.0, 7.0, 7.0, 8.0, 8.0, 8.0, 7.0, 7.0, 7.0, 8.0, 8.0, 8.0]
        );
        assert_eq!(
            out[2],
            [-1.0, -1.0, -1.0, 3.0, 4.0, 5.0, -1.0, -1.0, -1.0, 0.0, 1.0, 2.0]
        );
    }

    #[test]
    fn permute_cont_and_view_values() {
        let ctx = Context::with_capacity(16, 0).unwrap();
        let a = ctx.new_tensor_2d(GgmlType::F32, 3, 2).unwrap(); // rows [0 1 2], [3 4 5]
        let t = ctx.cont(ctx.transpose(a).unwrap()).unwrap(); // {2, 3}: [0 3], [1 4], [2 5]
        let col = ctx.cont(ctx.view_2d(a, [1, 2], 12, 8).unwrap()).unwrap(); // last column: 2, 5
        let cat = ctx.concat(a, a, 1).unwrap();
        let out = run_f32(&ctx, &[t, col, cat], || {
            a.set_f32(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap()
        });
        assert_eq!(out[0], [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert_eq!(out[1], [2.0, 5.0]);
        assert_eq!(
            out[2],
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        );
    }
}
