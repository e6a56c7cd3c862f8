//! Host-side bookkeeping of the per-sequence cache: which ring slot holds which position, which compressed
//! blocks a micro-batch completes, and the attention masks. Pure arithmetic, so it is unit-tested on its own.

/// Index tensors and masks are built with these values.
pub const MASKED: f32 = f32::NEG_INFINITY;

/// A ring of `cap` rows where position `t` lives in row `t % cap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    pub cap: usize,
}

impl Ring {
    pub fn slot(self, pos: usize) -> usize {
        pos % self.cap
    }

    /// The position in `slot` once positions `0..end` have been written (None: never written).
    pub fn position_in(self, slot: usize, end: usize) -> Option<usize> {
        if end == 0 {
            return None;
        }
        let last = end - 1;
        let back = (last % self.cap + self.cap - slot) % self.cap;
        last.checked_sub(back)
    }
}

/// Key rows attention reads are padded to this many (as llama.cpp does), so the reductions group the same way.
pub const KV_PAD: usize = 256;

/// How attention of few queries reads its key rows (see [`RawPlan::read_slots`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gather {
    /// Every micro-batch reads the first rows of the cache, as llama.cpp does.
    Off,
    /// Micro-batches that see few rows gather aligned blocks of this many rows (see [`window_rows`]): the rows
    /// ggml's dot products of this build keep in their SIMD lanes ([`crate::ggml::dot_lane_rows`]).
    Blocks(usize),
}

/// How gathered attention of a ratio-4 layer reads its compressed rows once its queries see more of them than the
/// indexer keeps (see [`crate::cache::CompPlan::top_k`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopKReads {
    /// Each query reads only the rows the indexer chose for it (the release path).
    Chosen,
    /// Every visible row, the others masked, as llama.cpp does (a diagnostic: the same terms, summed in another
    /// order; the last bits differ).
    Masked,
}

impl Gather {
    /// Gathering in the blocks this build's kernels need, where they are known.
    pub fn for_this_build() -> Gather {
        crate::ggml::dot_lane_rows().map_or(Gather::Off, Gather::Blocks)
    }
}

/// How many of `cap` rows attention reads when `used` of them may hold data: `used` padded to [`KV_PAD`], at
/// least one pad, at most `cap`.
pub fn padded_kv(used: usize, cap: usize) -> usize {
    padded_rows(used, cap, KV_PAD)
}

/// `used` padded to `pad`, at least one pad, at most `cap`.
pub fn padded_rows(used: usize, cap: usize, pad: usize) -> usize {
    used.next_multiple_of(pad).max(pad).min(cap)
}

/// Raw-window attention of one micro-batch: keys are the first `n_kv` ring rows, or the rows `read_slots` lists.
#[derive(Clone, Debug, PartialEq)]
pub struct RawPlan {
    /// Ring row of each new token's key.
    pub write_slots: Vec<i64>,
    /// Ring rows attention reads (`read_slots.len()` when gathered).
    pub n_kv: usize,
    /// When the queries see far fewer rows than the first `n_kv` (decode): the aligned blocks of ring rows that
    /// hold the positions they see (see `gathered_raw`). Attention then gathers these rows instead of
    /// multiplying every query with rows it cannot see.
    pub read_slots: Option<Vec<i32>>,
    /// `[n_kv, n_tokens]` (ggml order: one row of `n_kv` values per query), 0 or -inf.
    pub mask: Vec<f32>,
}

/// Visible raw keys of query `p`: positions in `(p - window, p]`; read gathered when `gather` allows and it pays.
pub fn raw_plan(ring: Ring, window: usize, p0: usize, n: usize, gather: Gather) -> RawPlan {
    let end = p0 + n;
    let write_slots = (p0..end).map(|p| ring.slot(p) as i64).collect();
    let n_kv = padded_kv(end, ring.cap);
    let gathered = match gather {
        Gather::Blocks(block) => gathered_raw(ring, window, p0, n, n_kv, block),
        Gather::Off => None,
    };
    match gathered {
        Some((rows, mask)) => RawPlan {
            write_slots,
            n_kv: rows.len(),
            read_slots: Some(rows),
            mask,
        },
        None => RawPlan {
            write_slots,
            n_kv,
            read_slots: None,
            mask: raw_mask(ring, window, p0, n, n_kv),
        },
    }
}

/// The ring rows of the positions queries `p0..p0 + n` see, and their mask (see [`window_rows`]); None unless
/// that is at most half of `n_kv`.
fn gathered_raw(
    ring: Ring,
    window: usize,
    p0: usize,
    n: usize,
    n_kv: usize,
    block: usize,
) -> Option<(Vec<i32>, Vec<f32>)> {
    let (rows, mask) = window_rows(ring, window, p0, n, p0 + n, block);
    (2 * rows.len() <= n_kv).then_some((rows, mask))
}

/// The ring rows holding the positions queries `q0..q0 + n` see (`q0 + 1 - window ..= q0 + n - 1`), as whole blocks
/// of `block` rows in ring order, and their `[rows, n]` mask, once positions `0..end` are written (`end >= q0 + n`,
/// and the ring holds every position the queries see).
///
/// Whole aligned blocks in ring order keep every row at its index modulo `block` and in its order: when `block` is
/// the rows ggml's dot products spread over their SIMD accumulators ([`Gather::Blocks`]), the softmax and the dot
/// products over rows add the same values in the same lanes as when reading the first `n_kv` rows (the rows left
/// out are masked and add exact zeros there), so both reads give the same bits.
pub fn window_rows(
    ring: Ring,
    window: usize,
    q0: usize,
    n: usize,
    end: usize,
    block: usize,
) -> (Vec<i32>, Vec<f32>) {
    let q_end = q0 + n;
    let first = (q0 + 1).saturating_sub(window);
    let mut blocks = vec![false; ring.cap.div_ceil(block)];
    for t in first..q_end {
        blocks[ring.slot(t) / block] = true;
    }
    let rows: Vec<usize> = (0..blocks.len())
        .filter(|&b| blocks[b])
        .flat_map(|b| b * block..((b + 1) * block).min(ring.cap))
        .collect();
    let mut mask = vec![MASKED; rows.len() * n];
    for (i, p) in (q0..q_end).enumerate() {
        for (k, &slot) in rows.iter().enumerate() {
            if let Some(t) = ring.position_in(slot, end) {
                if t <= p && t + window > p {
                    mask[i * rows.len() + k] = 0.0;
                }
            }
        }
    }
    (rows.into_iter().map(|r| r as i32).collect(), mask)
}

/// `[n_kv, n]` mask of the first `n_kv` ring rows for queries `p0..p0 + n` (see [`raw_plan`]).
pub fn raw_mask(ring: Ring, window: usize, p0: usize, n: usize, n_kv: usize) -> Vec<f32> {
    let end = p0 + n;
    let mut mask = vec![MASKED; n_kv * n];
    for (i, p) in (p0..end).enumerate() {
        for slot in 0..n_kv {
            if let Some(t) = ring.position_in(slot, end) {
                if t <= p && t + window > p {
                    mask[i * n_kv + slot] = 0.0;
                }
            }
        }
    }
    mask
}

/// Compressor work of one micro-batch for one ratio.
///
/// The compressor's source rows are `[ring rows (cap) | one padding row | the micro-batch's n new rows]`: the cache
/// keeps the ring and the padding row (zero for values, -inf for scores; it stands for the missing block before
/// block 0, ratio 4), and the graph appends the new rows to a copy of them, so no rows sized by the micro-batch
/// persist.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressPlan {
    pub ratio: usize,
    /// Blocks completed by this micro-batch: `first_block .. first_block + n_blocks`.
    pub first_block: usize,
    pub n_blocks: usize,
    /// Rows (into the source) each completed block pools, block after block:
    /// ratio 4: `[4 rows of the previous block, 4 rows of this block]`; ratio 128: the block's 128 rows.
    pub read_rows: Vec<i32>,
    /// The position of each completed block's first token (its RoPE position).
    pub block_pos: Vec<i32>,
    /// Ring rows of the newest `min(n, cap)` positions, oldest first: after the micro-batch, the ring holds the
    /// last `cap` positions, each in row `position % cap` (the other rows keep what they hold).
    pub ring_slots: Vec<i32>,
    /// Compressed rows that exist after this micro-batch (all blocks completed so far).
    pub n_rows_after: usize,
}

/// Ring rows a compressor keeps: the current partial block and, for ratio 4, the previous block.
pub fn compressor_ring_rows(ratio: usize) -> usize {
    if ratio == 4 {
        2 * ratio
    } else {
        ratio
    }
}

/// The compressor's work for positions `p0..p0 + n`.
pub fn compress_plan(ratio: usize, ring: Ring, p0: usize, n: usize) -> CompressPlan {
    let end = p0 + n;
    let pad_row = ring.cap as i32;
    // Source row of position t: new tokens after the ring and the padding row; older ones in their ring slot.
    let src = |t: usize| -> i32 {
        if t >= p0 {
            (ring.cap + 1 + t - p0) as i32
        } else {
            ring.slot(t) as i32
        }
    };
    let first_block = p0 / ratio;
    let n_rows_after = end / ratio;
    let n_blocks = n_rows_after.saturating_sub(first_block);
    let mut read_rows = Vec::new();
    let mut block_pos = Vec::with_capacity(n_blocks);
    for j in first_block..first_block + n_blocks {
        let start = j * ratio;
        if ratio == 4 {
            for t in 0..ratio {
                read_rows.push(if j == 0 {
                    pad_row
                } else {
                    src(start - ratio + t)
                });
            }
        }
        read_rows.extend((start..start + ratio).map(src));
        block_pos.push(start as i32);
    }
    let kept = n.min(ring.cap);
    let ring_slots = (end - kept..end).map(|t| ring.slot(t) as i32).collect();
    CompressPlan {
        ratio,
        first_block,
        n_blocks,
        read_rows,
        block_pos,
        ring_slots,
        n_rows_after,
    }
}

/// `[n_rows, n_tokens]` mask of compressed rows (`n_rows` may exceed the rows that exist: the rest stay masked):
/// query `p` sees rows `j < (p + 1) / ratio`.
pub fn compressed_mask(ratio: usize, n_rows: usize, p0: usize, n: usize) -> Vec<f32> {
    let mut mask = vec![MASKED; n_rows * n];
    for (i, p) in (p0..p0 + n).enumerate() {
        let visible = ((p + 1) / ratio).min(n_rows);
        mask[i * n_rows..i * n_rows + visible].fill(0.0);
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocks of an AVX2 build.
    const AVX2: Gather = Gather::Blocks(32);

    #[test]
    fn ring_positions() {
        let r = Ring { cap: 8 };
        assert_eq!(r.position_in(3, 0), None);
        assert_eq!(r.position_in(3, 3), None);
        assert_eq!(r.position_in(3, 4), Some(3));
        assert_eq!(r.position_in(3, 20), Some(19));
        assert_eq!(r.position_in(4, 20), Some(12));
    }

    #[test]
    fn raw_window_is_the_last_w_positions() {
        // window 4, ring of 4 + 3, a batch of 3 at positions 10..13.
        let ring = Ring { cap: 7 };
        let plan = raw_plan(ring, 4, 10, 3, AVX2);
        assert_eq!(plan.write_slots, vec![3, 4, 5]);
        for (i, p) in (10..13).enumerate() {
            assert_eq!(plan.n_kv, 7);
            let visible: Vec<usize> = (0..7)
                .filter(|&s| plan.mask[i * 7 + s] == 0.0)
                .map(|s| ring.position_in(s, 13).unwrap())
                .collect();
            let mut visible = visible;
            visible.sort();
            assert_eq!(visible, ((p - 3)..=p).collect::<Vec<_>>(), "query {p}");
        }
    }

    #[test]
    fn raw_window_at_the_start() {
        let plan = raw_plan(Ring { cap: 6 }, 4, 0, 2, AVX2);
        assert_eq!(
            &plan.mask[0..6],
            &[0.0, MASKED, MASKED, MASKED, MASKED, MASKED]
        );
        assert_eq!(
            &plan.mask[6..12],
            &[0.0, 0.0, MASKED, MASKED, MASKED, MASKED]
        );
    }

    #[test]
    fn ratio4_blocks_overlap_the_previous_block() {
        let ring = Ring { cap: 8 };
        // Positions 0..10 in one batch: blocks 0 and 1 complete (block 2 needs position 11).
        let plan = compress_plan(4, ring, 0, 10);
        assert_eq!(
            (plan.first_block, plan.n_blocks, plan.n_rows_after),
            (0, 2, 2)
        );
        // Source rows: the ring 0..8, the padding row 8, the new positions 0..10 in rows 9..19.
        let pad = 8;
        assert_eq!(&plan.read_rows[..8], &[pad, pad, pad, pad, 9, 10, 11, 12]);
        assert_eq!(&plan.read_rows[8..], &[9, 10, 11, 12, 13, 14, 15, 16]);
        assert_eq!(plan.block_pos, vec![0, 4]);
        // Then one token at position 10, one at 11 (completes block 2 from the ring and the new row).
        assert_eq!(
            plan.ring_slots,
            vec![2, 3, 4, 5, 6, 7, 0, 1],
            "positions 2..10"
        );
        let plan = compress_plan(4, ring, 10, 1);
        assert_eq!(plan.n_blocks, 0);
        let plan = compress_plan(4, ring, 11, 1);
        assert_eq!((plan.first_block, plan.n_blocks), (2, 1));
        // Previous block 4..8 in ring slots 4..8; this block 8, 9, 10 in slots 0, 1, 2 and 11 new (row 9, after
        // the padding row).
        assert_eq!(plan.read_rows, vec![4, 5, 6, 7, 0, 1, 2, 9]);
        assert_eq!(plan.block_pos, vec![8]);
        // The ring afterwards holds 4..12: the new 11 goes to slot 3, the other slots keep theirs.
        assert_eq!(plan.ring_slots, vec![3]);
        // The padding row stays right after the ring whatever the micro-batch's size.
        let plan = compress_plan(4, ring, 0, 5);
        assert_eq!(&plan.read_rows[..8], &[8, 8, 8, 8, 9, 10, 11, 12]);
    }

    #[test]
    fn ratio128_block_from_ring_and_batch() {
        let ring = Ring { cap: 128 };
        let plan = compress_plan(128, ring, 100, 40);
        assert_eq!(
            (plan.first_block, plan.n_blocks, plan.n_rows_after),
            (0, 1, 1)
        );
        // Positions 0..100 from the ring, 100..128 from the new rows after the ring and the padding row.
        assert_eq!(plan.read_rows[..100], (0..100).collect::<Vec<i32>>()[..]);
        assert_eq!(plan.read_rows[100..], (129..157).collect::<Vec<i32>>()[..]);
    }

    #[test]
    fn padding() {
        assert_eq!(padded_kv(0, 1000), 256);
        assert_eq!(padded_kv(257, 1000), 512);
        assert_eq!(padded_kv(900, 768), 768);
        assert_eq!(padded_kv(3, 8), 8);
        assert_eq!(padded_rows(33, 1000, 32), 64);
        assert_eq!(padded_rows(0, 1000, 32), 32);
        // A prompt reads the first rows, padded.
        let plan = raw_plan(Ring { cap: 768 }, 16, 0, 300, AVX2);
        assert_eq!(plan.n_kv, 512);
        assert_eq!(plan.read_slots, None);
        assert_eq!(plan.mask.len(), 512 * 300);
        // So does a micro-batch that sees most of the ring.
        let plan = raw_plan(Ring { cap: 768 }, 128, 1000, 512, AVX2);
        assert_eq!((plan.n_kv, plan.read_slots), (768, None));
    }

    #[test]
    fn few_queries_gather_whole_blocks_of_their_window_across_the_wrap() {
        let ring = Ring { cap: 768 };
        // Window 16, queries at 1540 and 1541: positions 1525..=1541, ring rows 757..=767 then 0..=5: the blocks
        // 0..32 and 736..768, in ring order.
        let plan = raw_plan(ring, 16, 1540, 2, AVX2);
        let rows = plan.read_slots.clone().unwrap();
        let want: Vec<i32> = (0..32).chain(736..768).collect();
        assert_eq!(rows, want);
        assert_eq!((plan.n_kv, plan.mask.len()), (64, 128));
        for (i, p) in (1540..1542).enumerate() {
            let mut seen: Vec<usize> = (0..64)
                .filter(|&k| plan.mask[i * 64 + k] == 0.0)
                .map(|k| ring.position_in(rows[k] as usize, 1542).unwrap())
                .collect();
            seen.sort();
            assert_eq!(seen, (p - 15..=p).collect::<Vec<_>>(), "query {p}");
        }
        // Each gathered row's mask is the full read's mask of its ring row.
        let full = raw_mask(ring, 16, 1540, 2, 768);
        for i in 0..2 {
            for (k, &r) in rows.iter().enumerate() {
                assert_eq!(plan.mask[i * 64 + k], full[i * 768 + r as usize]);
            }
        }
        assert_eq!(raw_plan(ring, 16, 1540, 2, Gather::Off).read_slots, None);
        // While the ring fills: the blocks that hold positions.
        let plan = raw_plan(ring, 128, 40, 1, AVX2);
        assert_eq!(plan.read_slots.unwrap(), (0..64).collect::<Vec<i32>>());
        assert_eq!(plan.mask.iter().filter(|&&m| m == 0.0).count(), 41);
        // AVX-512's 64-row lanes: the same window in the blocks 0..64 and 704..768.
        let plan = raw_plan(ring, 16, 1540, 2, Gather::Blocks(64));
        let want: Vec<i32> = (0..64).chain(704..768).collect();
        assert_eq!(plan.read_slots.unwrap(), want);
    }

    #[test]
    fn compressed_visibility() {
        let m = compressed_mask(4, 3, 6, 3);
        // p = 6 sees 1 row, p = 7 sees 2, p = 8 sees 2.
        assert_eq!(&m[0..3], &[0.0, MASKED, MASKED]);
        assert_eq!(&m[3..6], &[0.0, 0.0, MASKED]);
        assert_eq!(&m[6..9], &[0.0, 0.0, MASKED]);
    }
}
