//! The compressor (DSV4.md 3.7): pools the attention input of `ratio` tokens into one row (softmax over tokens per
//! feature, gated by `gate + ape`), normalises and rotates it at the block's first position, and stores it. Partial
//! blocks carry over between micro-batches in a ring of recent `(kv, score)` rows.

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

/// Computes the rows of the blocks this micro-batch completes, `{width, n_blocks}` F32 (None when it completes
/// none), and writes the compressor's ring; the caller stores the rows. `c {D, n}` is the normalised attention
/// input.
pub fn compress<'c>(
    o: &Ops<'c>,
    c: Tensor<'c>,
    w: &Compressor<Tensor<'c>>,
    cache: &CompCache<Tensor<'c>>,
    inp: &CompInputs<'c>,
    spec: &RowSpec<'_, 'c>,
) -> Result<Option<Tensor<'c>>> {
    let (width, rope, rotation) = (spec.width, spec.rope, spec.rotation);
    let ctx = o.ctx;
    let kv = ctx.mul_mat(w.kv, c)?;
    let score = ctx.add(ctx.mul_mat(w.gate, c)?, ctx.get_rows(w.ape, inp.ape_pos)?)?;
    // The newest rows go to their ring rows, after every read of this micro-batch (effects run last).
    let n = kv.ne()[1];
    let kept = inp.ring_slots.ne()[0];
    let newest = |t: Tensor<'c>| {
        let row = t.nb()[1];
        ctx.view_2d(t, [t.ne()[0], kept], row, (n - kept) as usize * row)
    };
    o.effect(ctx.set_rows(cache.src_kv, newest(kv)?, inp.ring_slots)?);
    o.effect(ctx.set_rows(cache.src_score, newest(score)?, inp.ring_slots)?);

    let Some(blocks) = &inp.blocks else {
        return Ok(None);
    };
    // Source rows: the ring, the padding row (zero value, -inf score) that stands for the missing block before
    // block 0, then this micro-batch's rows; a copy in the compute buffer, read before the ring is written.
    let src_kv = ctx.concat(cache.src_kv, kv, 1)?;
    let src_score = ctx.concat(cache.src_score, score, 1)?;
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
    Ok(Some(ctx.reshape_2d(
        roped,
        [width as i64, blocks.n_blocks as i64],
    )?))
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
