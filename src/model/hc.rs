//! Hyper-connections (DSV4.md 3.2, 3.3, 3.11): four residual streams mixed by `pre`, `post` and a Sinkhorn-normalised
//! `comb` matrix; each sub-block reads `Σ pre_h·X_h` and writes `X' = post ⊗ out + combᵀ·X`.

use crate::ggml::{Context, Result, Tensor};

use super::forward::Ops;

/// The mixing weights of one sub-block for a micro-batch of `n` tokens.
pub struct HcMix<'c> {
    /// `{hc, n}`: how much each stream gets of the sub-block's output.
    pub post: Tensor<'c>,
    /// `{hc (dst), hc (src), n}`: the doubly-stochastic residual mixing.
    pub comb: Tensor<'c>,
}

/// The sub-block parameters: `fn {hc·D, (2+hc)·hc}`, `base {(2+hc)·hc}`, `scale {3}`.
pub struct HcParams<'c> {
    pub func: Tensor<'c>,
    pub base: Tensor<'c>,
    pub scale: Tensor<'c>,
}

/// `x {D, hc, n}` -> the mixing logits `{(2+hc)·hc, n}` from the unweighted RMS of all hc·D values.
fn mixes<'c>(ctx: &'c Context, x: Tensor<'c>, func: Tensor<'c>, eps: f32) -> Result<Tensor<'c>> {
    let [d, hc, n, _] = x.ne();
    let flat = ctx.reshape_2d(x, [d * hc, n])?;
    let norm = ctx.rms_norm(flat, eps)?;
    ctx.mul_mat(func, norm)
}

/// `sigmoid(m·scale + base)` over `hc` rows of `mixes` starting at row `first`, with `scale` element `s`.
fn gate<'c>(
    ctx: &'c Context,
    mixes: Tensor<'c>,
    p: &HcParams<'c>,
    first: usize,
    s: usize,
    hc: i64,
) -> Result<Tensor<'c>> {
    let f32_size = 4;
    let n = mixes.ne()[1];
    let m = ctx.view_2d(mixes, [hc, n], mixes.nb()[1], first * f32_size)?;
    let scale = ctx.view_1d(p.scale, 1, s * f32_size)?;
    let base = ctx.view_1d(p.base, hc, first * f32_size)?;
    let z = ctx.add(ctx.mul(m, scale)?, base)?;
    ctx.sigmoid(z)
}

/// The sub-block input `Σ_h pre_h·X_h` `{D, n}` and its mixing weights (DSV4.md 3.2).
pub fn pre<'c>(o: &Ops<'c>, x: Tensor<'c>, p: &HcParams<'c>) -> Result<(Tensor<'c>, HcMix<'c>)> {
    let ctx = o.ctx;
    let hc = x.ne()[1];
    let m = mixes(ctx, x, p.func, o.eps)?;
    let pre = ctx.scale_bias(gate(ctx, m, p, 0, 0, hc)?, 1.0, o.hc_eps)?;
    let post = ctx.scale(gate(ctx, m, p, hc as usize, 1, hc)?, 2.0)?;
    let comb = if o.fused {
        ctx.dsv4_hc_comb(m, p.scale, p.base, o.hc_eps, o.sinkhorn_iters as u32)?
    } else {
        sinkhorn(o, m, p, hc)?
    };
    Ok((weighted_sum(o, x, pre)?, HcMix { post, comb }))
}

/// `Σ_h w_h·X_h`: `x {D, hc, n}`, `w {hc, n}` -> `{D, n}`.
fn weighted_sum<'c>(o: &Ops<'c>, x: Tensor<'c>, w: Tensor<'c>) -> Result<Tensor<'c>> {
    if o.fused {
        return o.ctx.dsv4_hc_pre(x, w);
    }
    weighted_sum_primitive(o.ctx, x, w)
}

fn weighted_sum_primitive<'c>(
    ctx: &'c Context,
    x: Tensor<'c>,
    w: Tensor<'c>,
) -> Result<Tensor<'c>> {
    let [d, hc, n, _] = x.ne();
    let mut acc: Option<Tensor<'c>> = None;
    for h in 0..hc as usize {
        let xh = ctx.view_2d(x, [d, n], x.nb()[2], h * x.nb()[1])?;
        let wh = ctx.view_2d(w, [1, n], w.nb()[1], h * w.nb()[0])?;
        let term = ctx.mul(xh, wh)?;
        acc = Some(match acc {
            Some(a) => ctx.add(a, term)?,
            None => term,
        });
    }
    Ok(acc.expect("hc >= 1"))
}

/// Sinkhorn with primitive ops: softmax over dst, +eps, a column step, then (row, column) steps (DSV4.md 3.2 step 6).
fn sinkhorn<'c>(o: &Ops<'c>, m: Tensor<'c>, p: &HcParams<'c>, hc: i64) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let n = m.ne()[1];
    let first = 2 * hc as usize;
    let f32_size = 4;
    let logits = ctx.view_2d(m, [hc * hc, n], m.nb()[1], first * f32_size)?;
    let scale = ctx.view_1d(p.scale, 1, 2 * f32_size)?;
    let base = ctx.view_1d(p.base, hc * hc, first * f32_size)?;
    let c = ctx.add(ctx.mul(logits, scale)?, base)?;
    let c = ctx.reshape_3d(c, [hc, hc, n])?;
    let eps = ctx.fill(ctx.new_tensor_1d(gguf::GgmlType::F32, 1)?, o.hc_eps)?;
    let mut c = ctx.add(ctx.soft_max_ext(c, None, 1.0, 0.0)?, eps)?;
    let norm_cols = |c: Tensor<'c>| -> Result<Tensor<'c>> {
        let by_src = ctx.cont(ctx.permute(c, [1, 0, 2, 3])?)?;
        let sums = ctx.add(ctx.sum_rows(by_src)?, eps)?;
        ctx.div(c, ctx.permute(sums, [1, 0, 2, 3])?)
    };
    let norm_rows = |c: Tensor<'c>| -> Result<Tensor<'c>> {
        let sums = ctx.add(ctx.sum_rows(c)?, eps)?;
        ctx.div(c, sums)
    };
    c = norm_cols(c)?;
    for _ in 1..o.sinkhorn_iters {
        c = norm_cols(norm_rows(c)?)?;
    }
    Ok(c)
}

/// `X'_dst = post_dst·out + Σ_src comb[dst, src]·X_src`: `out {D, n}`, `residual {D, hc, n}` -> `{D, hc, n}`.
pub fn post<'c>(
    o: &Ops<'c>,
    out: Tensor<'c>,
    residual: Tensor<'c>,
    mix: &HcMix<'c>,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    if o.fused {
        return ctx.dsv4_hc_post(out, residual, mix.post, Some(mix.comb));
    }
    let [d, hc, n, _] = residual.ne();
    let mut streams: Option<Tensor<'c>> = None;
    for dst in 0..hc as usize {
        let post_dst = ctx.view_2d(mix.post, [1, n], mix.post.nb()[1], dst * mix.post.nb()[0])?;
        let mut cur = ctx.mul(out, post_dst)?;
        for src in 0..hc as usize {
            let x_src = ctx.view_2d(residual, [d, n], residual.nb()[2], src * residual.nb()[1])?;
            let offset = dst * mix.comb.nb()[0] + src * mix.comb.nb()[1];
            let w = ctx.view_2d(mix.comb, [1, n], mix.comb.nb()[2], offset)?;
            cur = ctx.add(cur, ctx.mul(x_src, w)?)?;
        }
        let cur = ctx.reshape_3d(cur, [d, 1, n])?;
        streams = Some(match streams {
            Some(s) => ctx.concat(s, cur, 1)?,
            None => cur,
        });
    }
    Ok(streams.expect("hc >= 1"))
}

/// The head's collapse of the streams (DSV4.md 3.11): `pre` with one scale, no post or comb. `x {D, hc, n}` -> `{D, n}`.
pub fn head<'c>(o: &Ops<'c>, x: Tensor<'c>, p: &HcParams<'c>) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let m = mixes(ctx, x, p.func, o.eps)?;
    let z = ctx.add(ctx.mul(m, p.scale)?, p.base)?;
    let pre = ctx.scale_bias(ctx.sigmoid(z)?, 1.0, o.hc_eps)?;
    // llama.cpp collapses the head with primitive ops on every backend; so do we, to stay close to it.
    weighted_sum_primitive(ctx, x, pre)
}
