//! The feed-forward (DSV4.md 3.10): routed experts chosen by sqrt(softplus) scores plus a selection bias, or by
//! the token id in hash layers; weights normalised and scaled; SwiGLU with clamps; plus the shared expert.

use crate::ggml::{GroupedKernel, Result, Tensor};

use super::forward::Ops;
use super::weights::{LayerWeights, Routing};

/// Routing settings of the model.
pub struct MoeShape {
    pub n_expert_used: usize,
    pub weights_norm: bool,
    pub weights_scale: f32,
    pub clamp_exp: f32,
    pub clamp_shexp: f32,
}

/// Rows per expert, on average over a micro-batch, from which repacked experts multiply with ggml's GEMM kernels
/// (grouped rows): with fewer, most experts get fewer than the four rows one GEMM call takes, and `mul_mat_id`'s
/// GEMV per row is as fast.
const GROUPED_MIN_ROWS: i64 = 4;

/// Whether a micro-batch of `n` tokens, each routed to `n_used` of `n_expert` experts, multiplies repacked experts
/// with the grouped GEMM products.
pub fn groups_rows(n: usize, n_used: usize, n_expert: usize) -> bool {
    (n * n_used) as i64 >= GROUPED_MIN_ROWS * n_expert as i64
}

/// Weights below this sum are clamped before normalising (the smallest normal F16, as llama.cpp does).
const MIN_WEIGHT_SUM: f32 = 6.103_515_6e-5;

/// SwiGLU, clamped when `limit` is set (`silu(min(g, L)) · clamp(u, -L, L)`).
fn swiglu<'c>(o: &Ops<'c>, gate: Tensor<'c>, up: Tensor<'c>, limit: f32) -> Result<Tensor<'c>> {
    if limit > 1e-6 {
        o.ctx.swiglu_clamp(gate, up, limit)
    } else {
        o.ctx.swiglu_split(gate, up)
    }
}

/// `c {D, n}` -> routed + shared expert output `{D, n}`; `tokens` I32 `{n}` are the ids hash layers route by.
pub fn moe<'c>(
    o: &Ops<'c>,
    w: &LayerWeights<Tensor<'c>>,
    c: Tensor<'c>,
    tokens: Tensor<'c>,
    s: &MoeShape,
) -> Result<Tensor<'c>> {
    let (selected, weights) = route(o, w, c, tokens, s)?;
    let experts = [w.gate_exps, w.up_exps, w.down_exps];
    let e = expert_outputs(o, experts, c, selected, weights, s)?;
    let routed = sum_experts(o, e)?;
    o.ctx.add(routed, shared_expert(o, w, c, s)?)
}

/// The router: the experts each token uses, I32 `{k, n}`, and their weights `{1, k, n}` (normalised and scaled).
pub fn route<'c>(
    o: &Ops<'c>,
    w: &LayerWeights<Tensor<'c>>,
    c: Tensor<'c>,
    tokens: Tensor<'c>,
    s: &MoeShape,
) -> Result<(Tensor<'c>, Tensor<'c>)> {
    let ctx = o.ctx;
    let n = c.ne()[1];
    let k = s.n_expert_used as i64;
    let probs = ctx.sqrt(ctx.softplus(ctx.mul_mat(w.gate_inp, c)?)?)?; // {E, n}
    let selected = match &w.routing {
        Routing::Hash { tid2eid } => ctx.get_rows(*tid2eid, tokens)?, // I32 {k, n}
        Routing::Score { bias } => ctx.argsort_top_k(ctx.add(probs, *bias)?, s.n_expert_used)?,
    };
    let n_expert = probs.ne()[0];
    let mut weights = ctx.get_rows(ctx.reshape_3d(probs, [1, n_expert, n])?, selected)?; // {1, k, n}
    if s.weights_norm {
        let flat = ctx.reshape_2d(weights, [k, n])?;
        let sum = ctx.clamp(ctx.sum_rows(flat)?, MIN_WEIGHT_SUM, f32::INFINITY)?;
        weights = ctx.reshape_3d(ctx.div(flat, sum)?, [1, k, n])?;
    }
    if s.weights_scale != 0.0 && s.weights_scale != 1.0 {
        weights = ctx.scale(weights, s.weights_scale)?;
    }
    Ok((selected, weights))
}

/// The routed experts' outputs, each times its weight, `{D, k, n}`: `experts` are the stacked gate, up and down
/// matrices (`{D, F, m}`, `{D, F, m}`, `{F, D, m}`) and `ids` I32 `{k, n}` index their third dimension (the model's
/// experts, or the slots of the expert cache).
pub fn expert_outputs<'c>(
    o: &Ops<'c>,
    experts: [Tensor<'c>; 3],
    c: Tensor<'c>,
    ids: Tensor<'c>,
    weights: Tensor<'c>,
    s: &MoeShape,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let [gate_exps, up_exps, down_exps] = experts;
    let [d, n, _, _] = c.ne();
    let x = ctx.reshape_3d(c, [d, 1, n])?;
    let grouped = |w: Tensor<'c>| {
        o.grouped
            .as_ref()
            .filter(|_| groups_rows(n as usize, ids.ne()[0] as usize, w.ne()[2] as usize))
            .and_then(|r| GroupedKernel::of(w, r))
    };
    let (up, gate) = match (grouped(up_exps), grouped(gate_exps)) {
        // One quantization of the input serves both products.
        (Some(ku), Some(kg)) if std::ptr::eq(ku, kg) => {
            let x = ctx.grouped_rows(ku, up_exps, x, ids)?;
            let up = ctx.mul_mat_id_grouped(up_exps, x)?;
            (up, ctx.mul_mat_id_grouped(gate_exps, x)?)
        }
        _ => (
            ctx.mul_mat_id(up_exps, x, ids)?, // {F, k, n}
            ctx.mul_mat_id(gate_exps, x, ids)?,
        ),
    };
    let act = swiglu(o, gate, up, s.clamp_exp)?;
    let down = match grouped(down_exps) {
        Some(kd) => {
            let act = ctx.grouped_rows(kd, down_exps, act, ids)?;
            ctx.mul_mat_id_grouped(down_exps, act)?
        }
        None => ctx.mul_mat_id(down_exps, act, ids)?,
    };
    ctx.mul(down, weights) // {D, k, n}
}

/// `Σ_j experts[:, j, :]` `{D, n}`, added in expert-slot order.
pub fn sum_experts<'c>(o: &Ops<'c>, experts: Tensor<'c>) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let [d, k, n, _] = experts.ne();
    let mut routed = ctx.view_2d(experts, [d, n], experts.nb()[2], 0)?;
    for i in 1..k as usize {
        let e = ctx.view_2d(experts, [d, n], experts.nb()[2], i * experts.nb()[1])?;
        routed = ctx.add(routed, e)?;
    }
    if k == 1 {
        routed = ctx.cont(routed)?;
    }
    Ok(routed)
}

/// The shared expert `{D, n}`.
pub fn shared_expert<'c>(
    o: &Ops<'c>,
    w: &LayerWeights<Tensor<'c>>,
    c: Tensor<'c>,
    s: &MoeShape,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let up = ctx.mul_mat(w.up_shexp, c)?;
    let gate = ctx.mul_mat(w.gate_shexp, c)?;
    ctx.mul_mat(w.down_shexp, swiglu(o, gate, up, s.clamp_shexp)?)
}
