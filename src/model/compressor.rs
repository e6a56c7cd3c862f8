//! The compressor (DSV4.md 3.7): pools the attention input of `ratio` tokens into one row (softmax over tokens per
//! feature, gated by `gate + ape`), normalises and rotates it at the block's first position, and stores it. Partial
//! blocks carry over between micro-batches in a ring of recent `(kv, score)` rows.

use gguf::GgmlType;

use crate::cache::CompCache;
use crate::ggml::{Result, RopeParams, Tensor};

use super::forward::{CompInputs, Ops};
use super::weights::Compressor;

/// What the finished rows look like: their width (head dim, or indexer dim), their RoPE, and an optional Hadamard
/// matrix they are rotated by (the indexer keys, as llama.cpp does).
pub struct RowSpec<'a, 'c> {
    pub width: usize,
    pub rope: &'a RopeParams,
    pub rotation: Option<Tensor<'c>>,
}

/// Computes this micro-batch's compressed rows and writes them and the ring. `c {D, n}` is the normalised
/// attention input. Returns the compressed rows `{width, cap}` as they are after the write (the node later
/// readers must depend on).
pub fn compress<'c>(
    o: &Ops<'c>,
    c: Tensor<'c>,
    w: &Compressor<Tensor<'c>>,
    cache: &CompCache<Tensor<'c>>,
    inp: &CompInputs<'c>,
    spec: &RowSpec<'_, 'c>,
) -> Result<Tensor<'c>> {
    let (width, rope, rotation) = (spec.width, spec.rope, spec.rotation);
    let ctx = o.ctx;
    let kv = ctx.mul_mat(w.kv, c)?;
    let score = ctx.add(ctx.mul_mat(w.gate, c)?, ctx.get_rows(w.ape, inp.ape_pos)?)?;
    // Source rows: the ring, this micro-batch, and one padding row (zero value, -inf score) that stands for
    // the missing block before block 0.
    let features = kv.ne()[0];
    let pad = |value: f32| -> Result<Tensor<'c>> {
        ctx.fill(ctx.new_tensor_2d(GgmlType::F32, features, 1)?, value)
    };
    let src_kv = ctx.concat(ctx.concat(cache.ring_kv, kv, 1)?, pad(0.0)?, 1)?;
    let src_score = ctx.concat(
        ctx.concat(cache.ring_score, score, 1)?,
        pad(f32::NEG_INFINITY)?,
        1,
    )?;

    let ring_kv = ctx.get_rows(src_kv, inp.persist_rows)?;
    o.effect(ctx.cpy(ring_kv, cache.ring_kv)?);
    let ring_score = ctx.get_rows(src_score, inp.persist_rows)?;
    o.effect(ctx.cpy(ring_score, cache.ring_score)?);

    let Some(blocks) = &inp.blocks else {
        return Ok(cache.rows);
    };
    let values = block_rows(
        o,
        ctx.get_rows(src_kv, blocks.read_rows)?,
        inp.ratio,
        width,
        blocks.n_blocks,
    )?;
    let scores = block_rows(
        o,
        ctx.get_rows(src_score, blocks.read_rows)?,
        inp.ratio,
        width,
        blocks.n_blocks,
    )?;
    // Softmax over the block's tokens, separately for every feature: put tokens first.
    let values = ctx.cont(ctx.permute(values, [1, 0, 2, 3])?)?;
    let scores = ctx.cont(ctx.permute(scores, [1, 0, 2, 3])?)?;
    let weights = ctx.soft_max_ext(scores, None, 1.0, 0.0)?;
    let pooled = ctx.sum_rows(ctx.mul(values, weights)?)?;
    let pooled = ctx.cont(ctx.permute(pooled, [1, 0, 2, 3])?)?; // {width, 1, n_blocks}
    let normed = ctx.mul(ctx.rms_norm(pooled, o.eps)?, w.norm)?;
    let roped = o.rope_tail(
        ctx.rope_ext(normed, blocks.block_pos, None, rope)?,
        width,
        rope,
    )?;
    let roped = match rotation {
        Some(rot) => ctx.mul_mat_hadamard(rot, roped)?,
        None => roped,
    };
    let rows = ctx.reshape_2d(roped, [width as i64, blocks.n_blocks as i64])?;
    ctx.set_rows(cache.rows, rows, blocks.write_rows)
}

/// The rows each block pools, `{width, tokens per block, n_blocks}`: for ratio 4 the previous block's first halves
/// then this block's second halves; for ratio 128 the block's rows as they are.
fn block_rows<'c>(
    o: &Ops<'c>,
    rows: Tensor<'c>,
    ratio: usize,
    width: usize,
    n_blocks: usize,
) -> Result<Tensor<'c>> {
    let ctx = o.ctx;
    let (w, r, nb) = (width as i64, ratio as i64, n_blocks as i64);
    if ratio != 4 {
        return ctx.reshape_3d(rows, [w, r, nb]);
    }
    let row = rows.nb()[1];
    let per_block = 2 * ratio * row;
    let prev = ctx.view_3d(rows, [w, r, nb], [row, per_block], 0)?;
    let cur = ctx.view_3d(rows, [w, r, nb], [row, per_block], ratio * row + width * 4)?;
    ctx.concat(ctx.cont(prev)?, ctx.cont(cur)?, 1)
}
