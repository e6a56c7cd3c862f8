//! Attention (DSV4.md 3.4-3.9): q through a LoRA with two norms, one K=V head, RoPE on the last dims, a raw
//! sliding window plus compressed rows (ratio 4 chosen by the lightning indexer, ratio 128 all visible) in one
//! softmax with a per-head sink, de-rotation of the output, and the grouped low-rank output projection.

use gguf::GgmlType;

use crate::cache::LayerCache;
use crate::ggml::{Context, Result, RopeParams, Tensor};

use super::compressor::{compress, RowSpec};
use super::config::LayerKind;
use super::forward::{BatchInputs, CompInputs, Ops};
use super::weights::{Indexer, LayerWeights};

/// Shapes of the attention of one layer.
pub struct AttnShape {
    pub n_head: usize,
    pub head_dim: usize,
    pub o_groups: usize,
    pub o_lora: usize,
    pub indexer_heads: usize,
    pub indexer_dim: usize,
    pub indexer_top_k: usize,
}

/// `c {D, n}` (the normalised sub-block input) -> attention output `{D, n}`.
pub fn attention<'c>(
    o: &Ops<'c>,
    w: &LayerWeights<Tensor<'c>>,
    cache: &LayerCache<Tensor<'c>>,
    c: Tensor<'c>,
    inp: &BatchInputs<'c>,
    s: &AttnShape,
    rope: &RopeParams,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let n = c.ne()[1];
    let (h, dh) = (s.n_head as i64, s.head_dim as i64);

    let qr = ctx.mul(ctx.rms_norm(ctx.mul_mat(w.q_a, c)?, o.eps)?, w.q_a_norm)?;
    let q = ctx.reshape_3d(ctx.mul_mat(w.q_b, qr)?, [dh, h, n])?;
    let q = ctx.rms_norm(q, o.eps)?;
    let q = o.rope_tail(ctx.rope_ext(q, inp.pos, None, rope)?, s.head_dim, rope)?;
    // With a quantized cache, queries and keys are rotated (scores unchanged in exact arithmetic) so each key's
    // outliers spread over its block before it is quantized; the output is rotated back (llama.cpp's attn_rot_k).
    let rotate = |x: Tensor<'c>| match inp.attn_rotation {
        Some(rot) => ctx.mul_mat_hadamard(rot, x),
        None => Ok(x),
    };
    let q = rotate(q)?;

    let kv = ctx.mul(ctx.rms_norm(ctx.mul_mat(w.kv, c)?, o.eps)?, w.kv_norm)?;
    let kv = ctx.reshape_3d(kv, [dh, 1, n])?;
    let kv = o.rope_tail(ctx.rope_ext(kv, inp.pos, None, rope)?, s.head_dim, rope)?;
    let kv = ctx.reshape_2d(rotate(kv)?, [dh, n])?;
    // New keys go to their raw ring rows of `kv`.
    let mut keys = KeyRows::new(o, cache);
    keys.write(kv, inp.raw_slots)?;

    let comp = match w.kind {
        LayerKind::Raw => None,
        kind => Some(compressed_rows(
            o, w, cache, &mut keys, kind, c, qr, inp, s, rope,
        )?),
    };
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let heads = QueryHeads::of(n, &keys);
    let out = match comp {
        Some(CompRead::Chosen(top)) if inp.chunks.is_empty() => {
            // Gathered: the raw rows this micro-batch's queries see, then each query's chosen rows.
            let rows = inp.compressed(w.kind).and_then(|c| c.attn_rows);
            let (Some(rows), Some(raw_mask)) = (rows, inp.raw_mask) else {
                return Err(missing("the gathered raw rows"));
            };
            let raw = keys.gather(rows)?;
            let chosen = keys.gather_chosen(top)?;
            attend_chosen(o, q, raw, raw_mask, chosen, w.sinks, scale, heads)?
        }
        comp if !inp.chunks.is_empty() => {
            attend_chunks(o, &keys, q, w.kind, comp, inp, w.sinks, scale)?
        }
        comp => {
            let comp_mask = match comp {
                Some(CompRead::Mask(m)) => Some(m),
                _ => None,
            };
            // The first n_kv ring rows (the mask's width): the rows that may hold keys, padded.
            let Some(full_mask) = inp.raw_mask else {
                return Err(missing("the raw mask"));
            };
            let n_raw = full_mask.ne()[0];
            let (split, mask) = match comp_mask {
                None => (None, full_mask),
                Some(comp_mask) => {
                    let raw_mask = inp.raw_ring_mask.unwrap_or(full_mask);
                    let split = (raw_mask.ne()[0], comp_mask.ne()[0]);
                    (Some(split), ctx.concat(raw_mask, comp_mask, 0)?)
                }
            };
            let gather = match w.kind {
                LayerKind::Raw => inp.raw_read,
                kind => inp.compressed(kind).and_then(|c| c.attn_rows),
            };
            let (k, v) = match (gather, split) {
                (Some(rows), _) => keys.gather(rows)?,
                (None, None) => keys.read(n_raw)?,
                (None, Some((raw, comp))) => keys.read_with_compressed(raw, comp)?,
            };
            attend(o, q, k, v, mask, w.sinks, scale, heads)?
        }
    };
    let out = rotate(ctx.reshape_3d(out, [dh, h, n])?)?;
    let out = o.rope_tail(
        ctx.rope_ext_back(out, inp.pos, None, rope)?,
        s.head_dim,
        rope,
    )?;
    grouped_output(o, w, out, s)
}

/// How attention reads a layer's compressed rows.
#[derive(Clone, Copy)]
enum CompRead<'c> {
    /// The first rows, under this mask `{n_rows, n}` (ratio 4: 0 at the rows the lightning indexer chose).
    Mask(Tensor<'c>),
    /// I32 `{k, n}`: each query's `k` chosen rows (indices into the compressed rows), all visible
    /// (see [`crate::cache::CompPlan::top_k`]).
    Chosen(Tensor<'c>),
}

/// The compressed rows of a ratio-4 or ratio-128 layer: stores this micro-batch's new rows (`keys`) and returns
/// how attention reads them (ratio 4: the lightning indexer's choice).
#[allow(clippy::too_many_arguments)]
fn compressed_rows<'c>(
    o: &Ops<'c>,
    w: &LayerWeights<Tensor<'c>>,
    cache: &LayerCache<Tensor<'c>>,
    keys: &mut KeyRows<'_, 'c>,
    kind: LayerKind,
    c: Tensor<'c>,
    qr: Tensor<'c>,
    inp: &BatchInputs<'c>,
    s: &AttnShape,
    rope: &RopeParams,
) -> Result<CompRead<'c>> {
    let ctx = o.ctx;
    let comp_inp = inp.compressed(kind);
    let (comp_w, comp_cache) = (w.compressor.as_ref(), cache.comp.as_ref());
    let (Some(comp_w), Some(comp_cache), Some(comp_inp)) = (comp_w, comp_cache, comp_inp) else {
        return Err(missing("its compressor"));
    };
    let spec = RowSpec {
        width: s.head_dim,
        rope,
        rotation: inp.attn_rotation,
    };
    let rows = compress(o, c, comp_w, comp_cache, comp_inp, &spec)?;
    if let (Some(rows), Some(b)) = (rows, &comp_inp.blocks) {
        keys.write(rows, b.write_kv)?;
    }
    let mask = match (kind, &w.indexer, &cache.indexer) {
        (LayerKind::Csa, Some(idx_w), Some(idx_cache)) => {
            let spec = RowSpec {
                width: s.indexer_dim,
                rope,
                rotation: inp.indexer_rotation,
            };
            let new = compress(o, c, &idx_w.comp, idx_cache, comp_inp, &spec)?;
            let write = comp_inp.blocks.as_ref().and_then(|b| b.write_rows);
            let idx_rows = match (new, write) {
                (Some(new), Some(write)) => ctx.set_rows(idx_cache.rows, new, write)?,
                (None, _) => idx_cache.rows,
                (Some(_), None) => return Err(missing("the indexer's row inputs")),
            };
            let top = indexer_top_k(o, idx_w, idx_rows, qr, c, comp_inp, s, rope, inp)?;
            match comp_inp.top_k {
                Some(_) => CompRead::Chosen(top),
                None => CompRead::Mask(top_k_mask(o, top, comp_inp.mask)?),
            }
        }
        _ => CompRead::Mask(comp_inp.mask),
    };
    Ok(mask)
}

fn missing(what: &str) -> crate::ggml::GgmlError {
    crate::ggml::GgmlError::Op {
        op: "attention",
        detail: format!("a layer without {what}"),
    }
}

/// A layer's key rows as this micro-batch leaves them: `kv {Dh, rows}` after the writes so far (readers must use
/// this node, not the cache tensor, to run after the writes). Keys are stored once, as rows; the values attention
/// multiplies by are the rows it reads, transposed (`{n, Dh}`, contiguous: ggml's products need rows).
struct KeyRows<'o, 'c> {
    o: &'o Ops<'c>,
    kv: Tensor<'c>,
    /// Rows of the raw ring (the first rows; compressed rows follow).
    raw_ring: usize,
}

impl<'o, 'c> KeyRows<'o, 'c> {
    fn new(o: &'o Ops<'c>, cache: &LayerCache<Tensor<'c>>) -> Self {
        KeyRows {
            o,
            kv: cache.kv,
            raw_ring: cache.raw_k.ne()[1] as usize,
        }
    }

    /// Stores keys `new {Dh, k}` (F32) at rows `rows` I32 `{k}` of `kv`.
    fn write(&mut self, new: Tensor<'c>, rows: Tensor<'c>) -> Result<()> {
        self.kv = self.o.ctx.set_rows(self.kv, new, rows)?;
        // The rows must be written even where this graph does not read them.
        self.o.effect(self.kv);
        Ok(())
    }

    /// `n` key rows from row `first`, `{Dh, 1, n}`.
    fn view(&self, first: usize, n: i64) -> Result<Tensor<'c>> {
        let [dh, ..] = self.kv.ne();
        let row = self.kv.nb()[1];
        self.o
            .ctx
            .view_3d(self.kv, [dh, 1, n], [row, row], first * row)
    }

    /// Keys `k {Dh, 1, n}` (in the cache's type) and, as attention multiplies them, their values `{n, Dh}`: the
    /// same values transposed into a contiguous copy of the same type (exact); for a quantized cache, dequantized to
    /// F32 (blocks cannot be transposed), which is how llama.cpp's flash attention reads quantized values.
    fn with_values(&self, k: Tensor<'c>) -> Result<(Tensor<'c>, Tensor<'c>)> {
        let ctx = self.o.ctx;
        let [dh, _, n, _] = k.ne();
        let rows = ctx.reshape_2d(k, [dh, n])?; // views of `kv` and joined copies are contiguous
        let rows = match self.quantized() {
            true => ctx.cast(rows, GgmlType::F32)?,
            false => rows,
        };
        let v = ctx.cont(ctx.transpose(rows)?)?;
        Ok((k, v))
    }

    fn quantized(&self) -> bool {
        self.kv.ty().is_some_and(|t| t.block_size() > 1)
    }

    /// The first `n` key rows and their values (see [`KeyRows::with_values`]).
    fn read(&self, n: i64) -> Result<(Tensor<'c>, Tensor<'c>)> {
        self.with_values(self.view(0, n)?)
    }

    /// The key rows `rows` (I32 `{m}`) as `{Dh, 1, m}` and their values `{m, Dh}` (a transposed copy), both in the
    /// cache's type: attention then runs the same ggml products as
    /// over views of the cache, which convert queries and scores to that type as they do there (ggml's `get_rows`
    /// gives F32; converting the rows back to F16 is exact). Caches are F16 or F32 today; a quantized cache would
    /// need its own rule here, since converting its rows back requantizes them.
    fn gather(&self, rows: Tensor<'c>) -> Result<(Tensor<'c>, Tensor<'c>)> {
        let ctx = self.o.ctx;
        let [dh, ..] = self.kv.ne();
        let m = rows.ne()[0];
        let rows_f32 = ctx.get_rows(self.kv, rows)?; // F32 {Dh, m}
                                                     // Back in the cache's type: exact for F16, and for Q8_0 the same blocks again (its dequantized values
                                                     // quantize to the same scale and integers).
        let k = match self.kv.ty() {
            Some(GgmlType::F32) | None => rows_f32,
            Some(ty) => ctx.cast(rows_f32, ty)?,
        };
        let values = match self.quantized() {
            true => rows_f32,
            false => k,
        };
        let v = ctx.cont(ctx.transpose(values)?)?;
        Ok((ctx.reshape_3d(k, [dh, 1, m])?, v))
    }

    /// Each query's chosen compressed rows, `top` I32 `{k, n}` (indices into the compressed rows, which follow the
    /// raw ring in `kv`): keys `{Dh, k, n}` and values `{k, Dh, n}`, in the types [`KeyRows::gather`] gives.
    fn gather_chosen(&self, top: Tensor<'c>) -> Result<(Tensor<'c>, Tensor<'c>)> {
        let ctx = self.o.ctx;
        let [dh, total, ..] = self.kv.ne();
        let [k, n, ..] = top.ne();
        let row = self.kv.nb()[1];
        let ring = self.raw_ring;
        let comp = ctx.view_2d(self.kv, [dh, total - ring as i64], row, ring * row)?;
        let rows_f32 = ctx.get_rows(comp, ctx.reshape_1d(top, k * n)?)?; // F32 {Dh, k·n}
        let rows_f32 = ctx.reshape_3d(rows_f32, [dh, k, n])?;
        let keys = match self.kv.ty() {
            Some(GgmlType::F32) | None => rows_f32,
            Some(ty) => ctx.cast(rows_f32, ty)?,
        };
        let values = match self.quantized() {
            true => rows_f32,
            false => keys,
        };
        Ok((keys, ctx.cont(ctx.transpose(values)?)?))
    }

    /// The first `n_raw` raw ring rows followed by the first `n_comp` compressed rows: a view when `n_raw` is the
    /// whole ring, else a joined copy.
    fn read_with_compressed(&self, n_raw: i64, n_comp: i64) -> Result<(Tensor<'c>, Tensor<'c>)> {
        let ring = self.raw_ring;
        if n_raw as usize == ring {
            return self.read(n_raw + n_comp);
        }
        let ctx = self.o.ctx;
        let (raw, comp) = (self.view(0, n_raw)?, self.view(ring, n_comp)?);
        let Some(ty) = self.kv.ty().filter(|_| self.quantized()) else {
            return self.with_values(ctx.concat(raw, comp, 2)?);
        };
        // Blocks cannot be joined by ggml: join the values, then quantize them back (the same blocks again).
        let values = ctx.concat(
            ctx.cast(raw, GgmlType::F32)?,
            ctx.cast(comp, GgmlType::F32)?,
            2,
        )?;
        let [dh, _, n, _] = values.ne();
        let v = ctx.cont(ctx.transpose(ctx.reshape_2d(values, [dh, n])?)?)?;
        Ok((ctx.cast(values, ty)?, v))
    }
}

/// How attention multiplies the query heads by the shared K=V head.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum QueryHeads {
    /// Each head as its own product (`{Dh, n, H}` against the keys), as llama.cpp does. For one query these are H
    /// one-column products, which ggml computes one dot product at a time (its GEMM takes two or more columns),
    /// each head reading every key again; the sums come out in llama.cpp's order.
    Apart,
    /// One query's heads as the columns of one product (`{Dh, H}` against the keys, then the values against the
    /// `{rows, H}` probabilities): ggml's GEMM reads each key once for all heads, and sums the same products in
    /// another order. Decode at 4K depth with a q8_0 cache on a 2-core AVX2 host, runs alternating with `Apart`:
    /// 17.0 -> 17.5 and 17.6 -> 18.6 t/s (`ggml_vec_dot_f32` 11 % of the samples before, 1 % after).
    Together,
}

impl QueryHeads {
    /// `Together` for one query over a quantized cache, else `Apart`. A quantized cache's values are dequantized to
    /// F32 and summed in another order than llama.cpp's flash attention anyway (see [`KeyRows::with_values`]), so
    /// its parity with llama.cpp is measured against the cache type's own loss (`tests/parity_llama.rs`), never bit
    /// for bit; F16 and F32 caches keep llama.cpp's order, which F16-weight models (activations rounded to F16
    /// before each product) need to stay within 1e-4 of it token by token.
    fn of(n: i64, keys: &KeyRows<'_, '_>) -> Self {
        match n == 1 && keys.quantized() {
            true => QueryHeads::Together,
            false => QueryHeads::Apart,
        }
    }
}

/// Scaled dot-product attention over one shared K=V head: `q {Dh, H, n}`, `k {Dh, 1, n_kv}`, its transpose
/// `v {n_kv, Dh}`, `mask {n_kv, n}`, `sinks {H}` -> `{Dh·H, n}`.
#[allow(clippy::too_many_arguments)]
fn attend<'c>(
    o: &Ops<'c>,
    q: Tensor<'c>,
    k: Tensor<'c>,
    v: Tensor<'c>,
    mask: Tensor<'c>,
    sinks: Tensor<'c>,
    scale: f32,
    heads: QueryHeads,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let [dh, h, n, _] = q.ne();
    if heads == QueryHeads::Together {
        let kq = one_query_scores(ctx, q, k)?;
        let p = ctx.soft_max_ext_sinks(kq, Some(mask), scale, 0.0, sinks)?; // {n_kv, 1, H}
        let out = one_query_values(ctx, v, p, p.ne()[0])?; // {Dh, H}
        return ctx.reshape_2d(out, [dh * h, n]);
    }
    let q = ctx.permute(q, [0, 2, 1, 3])?; // {Dh, n, H}
    let k = ctx.permute(k, [0, 2, 1, 3])?; // {Dh, n_kv, 1}
    let kq = ctx.soft_max_ext_sinks(ctx.mul_mat(k, q)?, Some(mask), scale, 0.0, sinks)?; // {n_kv, n, H}
    let out = ctx.mul_mat(v, kq)?; // {Dh, n, H}
    let out = ctx.cont(ctx.permute(out, [0, 2, 1, 3])?)?; // {Dh, H, n}
    ctx.reshape_2d(out, [dh * h, n])
}

/// One query's scores (`q {Dh, H, 1}`) against the shared K head `k {Dh, 1, n_kv}`, `{n_kv, 1, H}`, as one
/// product whose columns are the heads ([`QueryHeads::Together`]).
fn one_query_scores<'c>(ctx: &'c Context<'c>, q: Tensor<'c>, k: Tensor<'c>) -> Result<Tensor<'c>> {
    let [dh, h, ..] = q.ne();
    let q = ctx.reshape_2d(contiguous(ctx, q)?, [dh, h])?;
    let kq = ctx.mul_mat(ctx.permute(k, [0, 2, 1, 3])?, q)?; // {n_kv, H}
    ctx.reshape_3d(kq, [kq.ne()[0], 1, h])
}

/// The values `v {rows, Dh}` weighted by one query's probabilities, the first `rows` of `p {_, 1, H}` (a softmax
/// over these rows and maybe others): `{Dh, H}`, as one product over the heads ([`QueryHeads::Together`]).
fn one_query_values<'c>(
    ctx: &'c Context<'c>,
    v: Tensor<'c>,
    p: Tensor<'c>,
    rows: i64,
) -> Result<Tensor<'c>> {
    let h = p.ne()[2];
    let p = ctx.view_2d(p, [rows, h], p.nb()[2], 0)?;
    ctx.mul_mat(v, contiguous(ctx, p)?)
}

/// Attention where every query reads the raw rows `raw` (keys `{Dh, 1, m}` and values `{m, Dh}`, as
/// [`KeyRows::gather`] gives them, under `raw_mask {m, n}`) and its own chosen compressed rows `chosen` (keys
/// `{Dh, k, n}` and values `{k, Dh, n}`, all visible): one softmax over the `m + k` rows with the sink, as [`attend`]
/// over every row with the other compressed rows masked, summed in another order. `q {Dh, H, n}` -> `{Dh·H, n}`.
#[allow(clippy::too_many_arguments)]
fn attend_chosen<'c>(
    o: &Ops<'c>,
    q: Tensor<'c>,
    raw: (Tensor<'c>, Tensor<'c>),
    raw_mask: Tensor<'c>,
    chosen: (Tensor<'c>, Tensor<'c>),
    sinks: Tensor<'c>,
    scale: f32,
    heads: QueryHeads,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let [dh, h, n, _] = q.ne();
    let ((k_raw, v_raw), (k_top, v_top)) = (raw, chosen);
    let m = k_raw.ne()[2];
    let k = k_top.ne()[1];
    let kq_raw = match heads {
        QueryHeads::Together => one_query_scores(ctx, q, k_raw)?, // {m, 1, H}
        QueryHeads::Apart => {
            let qp = ctx.permute(q, [0, 2, 1, 3])?; // {Dh, n, H}
            ctx.mul_mat(ctx.permute(k_raw, [0, 2, 1, 3])?, qp)? // {m, n, H}
        }
    };
    let kq_top = ctx.mul_mat(k_top, q)?; // {k, H, n}: each query with its own rows
    let kq_top = ctx.permute(kq_top, [0, 2, 1, 3])?; // {k, n, H}
    let kq = ctx.concat(kq_raw, kq_top, 0)?; // {m + k, n, H}
    let zeros = ctx.fill(ctx.new_tensor_2d(GgmlType::F32, k, n)?, 0.0)?;
    let mask = ctx.concat(raw_mask, zeros, 0)?; // {m + k, n}
    let p = ctx.soft_max_ext_sinks(kq, Some(mask), scale, 0.0, sinks)?; // {m + k, n, H}
    let [_, p1, p2, _] = p.nb();
    let p_top = ctx.view_3d(p, [k, n, h], [p1, p2], m as usize * p.nb()[0])?;
    let p_top = ctx.permute(p_top, [0, 2, 1, 3])?; // {k, H, n}
    let out = match heads {
        QueryHeads::Together => {
            // Contiguous probabilities make both products ggml GEMMs over the heads.
            let out_top = ctx.mul_mat(v_top, ctx.cont(p_top)?)?; // {Dh, H, 1}
            ctx.add(out_top, one_query_values(ctx, v_raw, p, m)?)?
        }
        QueryHeads::Apart => {
            let p_raw = ctx.view_3d(p, [m, n, h], [p1, p2], 0)?;
            let out_raw = ctx.mul_mat(v_raw, p_raw)?; // {Dh, n, H}
            let out_raw = ctx.cont(ctx.permute(out_raw, [0, 2, 1, 3])?)?; // {Dh, H, n}
            ctx.add(ctx.mul_mat(v_top, p_top)?, out_raw)?
        }
    };
    ctx.reshape_2d(out, [dh * h, n])
}

/// Attention chunk by chunk over the micro-batch's query chunks (`inp.chunks`), each over the key rows it gathers:
/// `q {Dh, H, n}` -> `{Dh·H, n}`, as [`attend`] over all rows gives. `comp`: how the layer reads its compressed
/// rows (None for raw-window layers): under a mask `{n_kv, n}`, of which a chunk reads its first rows, or each
/// query its chosen rows (see [`attend_chosen`]).
#[allow(clippy::too_many_arguments)]
fn attend_chunks<'c>(
    o: &Ops<'c>,
    keys: &KeyRows<'_, 'c>,
    q: Tensor<'c>,
    kind: LayerKind,
    comp: Option<CompRead<'c>>,
    inp: &BatchInputs<'c>,
    sinks: Tensor<'c>,
    scale: f32,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let [dh, h, n, _] = q.ne();
    let mut out = ctx.new_tensor_2d(GgmlType::F32, dh * h, n)?;
    // Chunks are a prompt's: each head its own product, as llama.cpp (see [`QueryHeads::of`]).
    let heads = QueryHeads::Apart;
    for c in &inp.chunks {
        let rows = match kind {
            LayerKind::Raw => c.raw_rows,
            LayerKind::Csa => c.csa_rows,
            LayerKind::Hca => c.hca_rows,
        };
        let rows = rows.ok_or_else(|| missing("the key rows of a query chunk"))?;
        let (k, v) = keys.gather(rows)?;
        let nc = c.n as i64;
        let [_, q1, q2, _] = q.nb();
        let qc = ctx.view_3d(q, [dh, h, nc], [q1, q2], c.first * q2)?;
        let oc = match comp {
            None => attend(o, qc, k, v, c.raw_mask, sinks, scale, heads)?,
            Some(CompRead::Mask(m)) => {
                let n_comp = rows.ne()[0] - c.raw_mask.ne()[0];
                let row = m.nb()[1];
                let part = ctx.view_2d(m, [n_comp, nc], row, c.first * row)?;
                let mask = ctx.concat(c.raw_mask, part, 0)?;
                attend(o, qc, k, v, mask, sinks, scale, heads)?
            }
            Some(CompRead::Chosen(top)) => {
                // This chunk's queries' columns of the choice (whole rows: contiguous).
                let row = top.nb()[1];
                let top_c = ctx.view_2d(top, [top.ne()[0], nc], row, c.first * row)?;
                let chosen = keys.gather_chosen(top_c)?;
                attend_chosen(o, qc, (k, v), c.raw_mask, chosen, sinks, scale, heads)?
            }
        };
        out = ctx.set_rows(out, oc, c.out_rows)?;
    }
    Ok(out)
}

/// The lightning indexer (DSV4.md 3.8): scores every visible compressed row for each query and keeps the
/// `top_k` best (fewer when fewer rows are read); returns their indices, I32 `{k, n}` (unordered).
#[allow(clippy::too_many_arguments)]
fn indexer_top_k<'c>(
    o: &Ops<'c>,
    w: &Indexer<Tensor<'c>>,
    idx_rows: Tensor<'c>,
    qr: Tensor<'c>,
    c: Tensor<'c>,
    comp: &CompInputs<'c>,
    s: &AttnShape,
    rope: &RopeParams,
    inp: &BatchInputs<'c>,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let vis = comp.mask;
    let n = c.ne()[1];
    let n_rows = vis.ne()[0];
    let (ih, id) = (s.indexer_heads as i64, s.indexer_dim as i64);
    let q = ctx.reshape_3d(ctx.mul_mat(w.q_b, qr)?, [id, ih, n])?;
    let q = o.rope_tail(ctx.rope_ext(q, inp.pos, None, rope)?, s.indexer_dim, rope)?;
    // Rotating both queries and keys leaves scores unchanged in exact arithmetic; llama.cpp does it, and matching
    // its rounding keeps top-k ties broken the same way.
    let q = match inp.indexer_rotation {
        Some(rot) => ctx.mul_mat_hadamard(rot, q)?,
        None => q,
    };
    let weights = ctx.scale(
        ctx.mul_mat(w.proj, c)?,
        1.0 / ((s.indexer_dim * s.indexer_heads) as f32).sqrt(),
    )?;
    let k = s.indexer_top_k.min(n_rows as usize);
    let keys = ctx.view_2d(idx_rows, [id, n_rows], idx_rows.nb()[1], 0)?;
    let keys = f32_keys(ctx, keys)?;
    let q = contiguous(ctx, q)?;
    chunked_top_k(ctx, [q, keys, weights, vis], k, comp.indexer_step)
}

/// The `k` best-scoring rows of each query (I32 `{k, n}`, unordered), scoring `step` queries at a time (see
/// [`indexer_scores`] for `[q, keys, weights, vis]`).
fn chunked_top_k<'c>(
    ctx: &'c Context<'c>,
    [q, keys, weights, vis]: [Tensor<'c>; 4],
    k: usize,
    step: usize,
) -> Result<Tensor<'c>> {
    let n = q.ne()[2];
    let step = step.max(1) as i64;
    let mut all: Option<Tensor<'c>> = None;
    for first in (0..n).step_by(step as usize) {
        let nc = step.min(n - first);
        let scores = indexer_scores(ctx, [q, keys, weights, vis], first, nc)?;
        let top = contiguous(ctx, ctx.top_k(scores, k)?)?; // I32 {k, nc}
        if nc == n {
            return Ok(top);
        }
        let dst = match all {
            Some(t) => t,
            None => ctx.new_tensor_2d(GgmlType::I32, k as i64, n)?,
        };
        let row = dst.nb()[1];
        all = Some(ctx.set_2d(dst, top, row, first as usize * row)?);
    }
    all.ok_or_else(|| missing("the indexer's queries"))
}

/// `t`, or a contiguous copy of it.
fn contiguous<'c>(ctx: &'c Context<'c>, t: Tensor<'c>) -> Result<Tensor<'c>> {
    match t.is_contiguous() {
        true => Ok(t),
        false => ctx.cont(t),
    }
}

/// Graph nodes (and context tensors) one chunk of the indexer's queries adds, with room to spare (about 16).
pub const INDEXER_CHUNK_NODES: usize = 24;

/// The indexer's scores of queries `first..first + nc` (DSV4.md 3.8), `{n_rows, nc}`: for each query `t` and row
/// `s`, `sum_h w[h, t]·relu(q[:, h, t]·k[:, s]) + vis[s, t]`, as two products (all heads' dot products in one GEMM,
/// then each query's weighted sum over heads) instead of ggml's fused `lightning_indexer`, which computes the same
/// sums one dot product at a time: about 3x faster on the CPU (`bench/README.md` section 6), and CUDA has no kernel
/// for the fused operator. `q {ID, IH, n}` contiguous, `keys {ID, n_rows}` F32 (see [`f32_keys`]), `weights {IH, n}`
/// (pre-scaled), `vis {n_rows, n}`.
fn indexer_scores<'c>(
    ctx: &'c Context<'c>,
    [q, keys, weights, vis]: [Tensor<'c>; 4],
    first: i64,
    nc: i64,
) -> Result<Tensor<'c>> {
    let [id, ih, ..] = q.ne();
    let n_rows = keys.ne()[1];
    let [_, q1, q2, _] = q.nb();
    let qc = ctx.view_2d(q, [id, ih * nc], q1, first as usize * q2)?; // {ID, IH·nc}
    let w1 = weights.nb()[1];
    let wc = ctx.view_2d(weights, [ih, nc], w1, first as usize * w1)?;
    let kq = ctx.relu(ctx.mul_mat(qc, keys)?)?; // {IH·nc, n_rows}
    let kq = ctx.permute(ctx.reshape_3d(kq, [ih, nc, n_rows])?, [0, 2, 1, 3])?; // {IH, n_rows, nc}
    let score = ctx.mul_mat(kq, ctx.reshape_3d(wc, [ih, 1, nc])?)?; // {n_rows, 1, nc}

    // The mask is an input (host memory under a scheduler): a view only when there are chunks.
    let v1 = vis.nb()[1];
    let vis_c = match nc == vis.ne()[1] {
        true => vis,
        false => ctx.view_2d(vis, [n_rows, nc], v1, first as usize * v1)?,
    };
    ctx.add(ctx.reshape_2d(score, [n_rows, nc])?, vis_c)
}

/// The indexer's keys `{ID, n_rows}` as F32 rows: one conversion per micro-batch (under 1 ms for 16K rows on a
/// 2-core AVX2 host), read by every chunk's product. Products of the cache's own F16 or q8_0 rows would round the
/// queries to that type as well (ggml converts the second operand to the first's): q8_0 that way scores 16K rows in
/// about half the time, but its choices differ from llama.cpp's F32 scores at many positions (median logit error
/// 1.6e-2 against 6.7e-4 on the tiny q8_0 parity model), so the scores stay in F32.
fn f32_keys<'c>(ctx: &'c Context<'c>, keys: Tensor<'c>) -> Result<Tensor<'c>> {
    match keys.ty() {
        Some(GgmlType::F32) => Ok(keys),
        _ => ctx.cast(keys, GgmlType::F32),
    }
}

/// The compressed-row mask `{n_rows, n}` of the rows `top` (I32 `{k, n}`) chose: 0 at chosen visible rows, -inf
/// elsewhere (`vis`: the visibility mask).
fn top_k_mask<'c>(o: &Ops<'c>, top: Tensor<'c>, vis: Tensor<'c>) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let [n_rows, n, ..] = vis.ne();
    let k = top.ne()[0];
    // -inf everywhere, then 0 at the chosen rows (set_rows over rows of one value), then the visibility mask.
    let all = ctx.fill(vis, f32::NEG_INFINITY)?;
    let f = 4;
    let as_rows = ctx.view_4d(
        all,
        [1, n_rows, n, 1],
        [f, n_rows as usize * f, n_rows as usize * n as usize * f],
        0,
    )?;
    let zeros = ctx.fill(ctx.new_tensor_4d(GgmlType::F32, [1, k, n, 1])?, 0.0)?;
    let chosen = ctx.set_rows(as_rows, zeros, ctx.reshape_3d(top, [k, n, 1])?)?;
    let chosen = ctx.reshape_2d(chosen, [n_rows, n])?;
    ctx.add(chosen, vis)
}

/// The grouped output LoRA: heads in `G` groups, each projected by its own `{H·Dh/G, Og}` slice of `wo_a`, then
/// `wo_b` over the concatenation. `out {Dh, H, n}` -> `{D, n}`.
fn grouped_output<'c>(
    o: &Ops<'c>,
    w: &LayerWeights<Tensor<'c>>,
    out: Tensor<'c>,
    s: &AttnShape,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let n = out.ne()[2];
    let (g, og) = (s.o_groups as i64, s.o_lora as i64);
    let group_dim = (s.n_head * s.head_dim) as i64 / g;
    let out = ctx.permute(ctx.reshape_3d(out, [group_dim, g, n])?, [0, 2, 1, 3])?; // {H·Dh/G, n, G}
    let wo_a = ctx.reshape_3d(w.o_a, [group_dim, og, g])?;
    let oa = ctx.permute(ctx.mul_mat(wo_a, out)?, [0, 2, 1, 3])?; // {Og, G, n}
    let oa = ctx.reshape_2d(ctx.cont(oa)?, [og * g, n])?;
    ctx.mul_mat(w.o_b, oa)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::CpuBackend;

    /// Pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The products' scores and top-k equal those of ggml's fused `lightning_indexer` (the operator llama.cpp
    /// runs) for F32, F16 and q8_0 keys, with masked rows, in one chunk and in chunks that do not divide the
    /// queries.
    #[test]
    fn indexer_products_match_the_fused_operator() {
        let (id, ih, n, rows, k) = (32i64, 8i64, 10i64, 40i64, 6usize);
        // Query t sees rows below 8 + 3t (more than k), the rest are masked.
        let vis: Vec<f32> = (0..n)
            .flat_map(|t| {
                (0..rows).map(move |s| {
                    if s < 8 + 3 * t {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let vis16: Vec<u8> = vis
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        for kty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0] {
            for step in [n as usize, 3, 1] {
                let ctx = Context::with_capacity(1024, 1024).unwrap();
                let q = ctx.new_tensor_3d(GgmlType::F32, id, ih, n).unwrap();
                let keys = ctx.new_tensor_2d(kty, id, rows).unwrap();
                let w = ctx.new_tensor_2d(GgmlType::F32, ih, n).unwrap();
                let mask = ctx.new_tensor_2d(GgmlType::F32, rows, n).unwrap();
                let mask16 = ctx.new_tensor_2d(GgmlType::F16, rows, n).unwrap();
                let keys32 = f32_keys(&ctx, keys).unwrap();
                let k3 = ctx.reshape_3d(keys, [id, 1, rows]).unwrap();
                let fused = ctx.lightning_indexer(q, k3, w, mask16).unwrap();
                let fused_top = ctx.top_k(fused, k).unwrap();
                let inputs = [q, keys32, w, mask];
                let ours = indexer_scores(&ctx, inputs, 0, n).unwrap();
                let top = chunked_top_k(&ctx, inputs, k, step).unwrap();
                let mut graph = ctx.new_graph(1024).unwrap();
                for t in [fused, fused_top, ours, top] {
                    graph.expand(t).unwrap();
                }
                ctx.alloc_tensors_host().unwrap();
                q.set_f32(&values((id * ih * n) as usize, 1)).unwrap();
                let kv = values((id * rows) as usize, 2);
                match kty {
                    GgmlType::F32 => keys.set_f32(&kv).unwrap(),
                    GgmlType::F16 => {
                        let b: Vec<u8> = kv
                            .iter()
                            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                            .collect();
                        keys.set_bytes(&b).unwrap()
                    }
                    _ => keys
                        .set_bytes(
                            &crate::ggml::quantize_rows(kty, &kv, id as usize, None).unwrap(),
                        )
                        .unwrap(),
                }
                let wv: Vec<f32> = values((ih * n) as usize, 3)
                    .iter()
                    .map(|v| v.abs())
                    .collect();
                w.set_f32(&wv).unwrap();
                mask.set_f32(&vis).unwrap();
                mask16.set_bytes(&vis16).unwrap();
                CpuBackend::new(2).unwrap().compute(&graph).unwrap();

                let (a, b) = (fused.get_f32().unwrap(), ours.get_f32().unwrap());
                let scale = a
                    .iter()
                    .filter(|v| v.is_finite())
                    .fold(0f32, |m, v| m.max(v.abs()));
                assert!(scale > 0.1, "scores of a real size: {scale}");
                // The fixture keeps each query's k-th and (k+1)-th best rows 1e-3 of the scale apart, so scores
                // within 1e-5 choose the same rows whatever order a host's SIMD sums in.
                for (t, row) in a.chunks(rows as usize).enumerate() {
                    let mut seen: Vec<f32> =
                        row.iter().copied().filter(|v| v.is_finite()).collect();
                    seen.sort_by(|x, y| y.total_cmp(x));
                    assert!(seen[k - 1] - seen[k] > 1e-3 * scale, "query {t}: {seen:?}");
                }
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    let same = match x.is_finite() {
                        true => (x - y).abs() <= 1e-5 * scale,
                        false => x == y,
                    };
                    assert!(same, "{kty} score {i}: fused {x}, products {y}");
                }
                let sorted = |t: Tensor<'_>| -> Vec<Vec<i32>> {
                    let v = t.get_i32().unwrap();
                    v.chunks(k)
                        .map(|c| {
                            let mut c = c.to_vec();
                            c.sort();
                            c
                        })
                        .collect()
                };
                assert_eq!(
                    sorted(top),
                    sorted(fused_top),
                    "{kty}, {step} queries a chunk"
                );
            }
        }
    }
}
