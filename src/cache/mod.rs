//! The per-sequence cache of DeepSeek V4 (DSV4.md section 4): per layer the raw-window ring (the last `window`
//! rows plus a micro-batch), compressed rows and indexer rows for the whole context, and the compressor rings that
//! carry partial blocks between calls. Tensors live in one backend buffer; `plan` does the host bookkeeping.
//!
//! The raw ring and the compressed rows of a layer are one tensor (`kv`, ring rows first), so attention reads both
//! as one view, in the order it needs them. Keys are stored once: attention transposes the rows it reads into its
//! values (decode at depth gathers the rows it reads anyway, see [`plan::RawPlan::read_slots`]), so the cache grows
//! by the DSV4.md figure per token (about 6.7 KiB on Flash in F16; [`cache_bytes`]). Past the indexer's top-k, a
//! gathered ratio-4 layer reads only the rows the indexer chose for each query ([`CompPlan::top_k`]).

pub mod plan;

use gguf::GgmlType;

use crate::ggml::{Context, CpuBackend, Device, GgmlError, Result, Tensor};
use crate::model::config::{Config, LayerKind};

use plan::{
    compress_plan, compressed_mask, compressor_ring_rows, raw_mask, raw_plan, window_rows,
    CompressPlan, Gather, RawPlan, Ring, TopKReads,
};

/// The compressed rows of one layer (or of its indexer) and the ring of its compressor.
#[derive(Clone, Debug)]
pub struct CompCache<T> {
    /// Tokens per compressed row.
    pub ratio: usize,
    /// `{width, rows}`: one row per completed block (for attention rows, a view of the layer's `kv`).
    pub rows: T,
    /// `{coff·width, ring}`: recent tokens' compressor values (the first rows of `src_kv`).
    pub ring_kv: T,
    /// `{coff·width, ring}`: recent tokens' compressor scores, gate + ape (the first rows of `src_score`).
    pub ring_score: T,
    /// `{coff·width, ring + 1}`: the ring and a padding row (0 for values, -inf for scores). A micro-batch's blocks
    /// pool from a copy of these rows with its new rows appended, made in the graph's compute buffer (see
    /// [`plan::CompressPlan`]), so nothing sized by the micro-batch persists.
    pub src_kv: T,
    pub src_score: T,
}

/// The cache of one layer.
#[derive(Clone, Debug)]
pub struct LayerCache<T> {
    /// `{head_dim, raw ring + compressed rows}`: the keys (= values) attention reads, raw ring rows first.
    pub kv: T,
    /// `{head_dim, raw ring}`: the keys of the most recent tokens (a view of the first rows of `kv`).
    pub raw_k: T,
    pub comp: Option<CompCache<T>>,
    pub indexer: Option<CompCache<T>>,
}

impl<T: Copy> CompCache<T> {
    fn map<U>(&self, f: &impl Fn(T) -> U) -> CompCache<U> {
        CompCache {
            ratio: self.ratio,
            rows: f(self.rows),
            ring_kv: f(self.ring_kv),
            ring_score: f(self.ring_score),
            src_kv: f(self.src_kv),
            src_score: f(self.src_score),
        }
    }
}

impl<T: Copy> LayerCache<T> {
    pub fn map<U>(&self, f: &impl Fn(T) -> U) -> LayerCache<U> {
        LayerCache {
            kv: f(self.kv),
            raw_k: f(self.raw_k),
            comp: self.comp.as_ref().map(|c| c.map(f)),
            indexer: self.indexer.as_ref().map(|c| c.map(f)),
        }
    }

    /// The tensors a saved session holds, in file order: the raw ring, then the compressor's and the indexer's
    /// rows and rings (`kv` as its two views).
    /// The tensors a session file holds, each with the tokens per row of its rows that `n_tokens` tokens fill
    /// in order (`Some(ratio)` for compressed rows: the first `n_tokens / ratio`; `None`: all of it is state).
    fn saved(&self) -> Vec<(T, Option<usize>)> {
        let mut out = vec![(self.raw_k, None)];
        for c in [&self.comp, &self.indexer].into_iter().flatten() {
            out.extend([
                (c.rows, Some(c.ratio)),
                (c.ring_kv, None),
                (c.ring_score, None),
            ]);
        }
        out
    }
}

/// How key rows are stored. Compressor rings always stay F32 (they carry partial sums, as in llama.cpp).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheType {
    /// Half the memory; llama.cpp's default.
    #[default]
    F16,
    /// Exact; what the parity tests use.
    F32,
    /// 8-bit blocks of 32 values with an F16 scale (34 bytes per 32 values: about half of F16), as llama.cpp's
    /// `--cache-type-k q8_0`; keys are rotated by a Hadamard matrix before they are quantized, as llama.cpp does.
    Q8_0,
    /// 4-bit blocks of 32 values with an F16 scale (18 bytes per 32 values: about a quarter of F16), as llama.cpp's
    /// `--cache-type-k q4_0`, with the same rotation as [`CacheType::Q8_0`].
    Q4_0,
}

impl CacheType {
    pub fn ggml(self) -> GgmlType {
        match self {
            CacheType::F16 => GgmlType::F16,
            CacheType::F32 => GgmlType::F32,
            CacheType::Q8_0 => GgmlType::Q8_0,
            CacheType::Q4_0 => GgmlType::Q4_0,
        }
    }

    /// llama.cpp's name (`f16`, `f32`, `q8_0`, `q4_0`).
    pub fn name(self) -> &'static str {
        self.ggml().name()
    }

    /// Parses llama.cpp's names (any case).
    pub fn parse(s: &str) -> Option<CacheType> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Some(CacheType::F16),
            "f32" => Some(CacheType::F32),
            "q8_0" => Some(CacheType::Q8_0),
            "q4_0" => Some(CacheType::Q4_0),
            _ => None,
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, CacheType::Q8_0 | CacheType::Q4_0)
    }

    /// Bytes of a row of `width` values (a multiple of the type's block; see [`CacheType::fits`]).
    pub fn row_bytes(self, width: usize) -> u64 {
        let ty = self.ggml();
        width as u64 / ty.block_size() * ty.type_size()
    }

    /// Whether rows of the model's widths (the head, the indexer head) can be stored in this type.
    pub fn fits(self, cfg: &Config) -> bool {
        let block = self.ggml().block_size() as usize;
        cfg.head_dim % block == 0 && cfg.indexer_dim % block == 0
    }
}

/// Sizes of the cache for a context of `n_ctx` tokens and micro-batches of at most `n_ubatch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSizes {
    pub n_ctx: usize,
    pub n_ubatch: usize,
    pub raw_ring: usize,
    pub cache_type: CacheType,
}

impl CacheSizes {
    pub fn new(cfg: &Config, n_ctx: usize, n_ubatch: usize, cache_type: CacheType) -> CacheSizes {
        CacheSizes {
            n_ctx,
            n_ubatch,
            cache_type,
            raw_ring: (cfg.window + n_ubatch).next_multiple_of(plan::KV_PAD),
        }
    }

    /// Compressed rows a context of `n_ctx` tokens can need for `ratio`.
    pub fn comp_rows(&self, ratio: usize) -> usize {
        self.n_ctx
            .div_ceil(ratio)
            .next_multiple_of(plan::KV_PAD)
            .max(plan::KV_PAD)
    }
}

/// What the cache of one sequence takes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheBytes {
    /// Growth per token of context (DSV4.md section 4): the compressed rows of the ratio-4 and ratio-128 layers and
    /// the indexer rows, one row per block of `ratio` tokens, in the cache type (6880 B on Flash in F16).
    pub per_token: f64,
    /// Bytes the cache buffer holds for the sizes: every tensor [`KvCache::new`] allocates, rows padded as it
    /// pads them, each tensor aligned as ggml's CPU buffers align them. [`KvCache::bytes`] equals it.
    pub total: u64,
}

/// Alignment of each tensor in a ggml CPU buffer (ggml's `TENSOR_ALIGNMENT`).
const TENSOR_ALIGN: u64 = 32;

/// The bytes of the cache for `sizes` (see [`CacheBytes`]); mirrors [`KvCache::new`] tensor by tensor.
pub fn cache_bytes(cfg: &Config, sizes: &CacheSizes) -> CacheBytes {
    cfg.kinds.iter().fold(
        CacheBytes {
            per_token: 0.0,
            total: 0,
        },
        |sum, &kind| {
            let layer = layer_cache_bytes(cfg, kind, sizes);
            CacheBytes {
                per_token: sum.per_token + layer.per_token,
                total: sum.total + layer.total,
            }
        },
    )
}

/// [`cache_bytes`] of one layer of `kind`: what the placement puts on the layer's device.
pub fn layer_cache_bytes(cfg: &Config, kind: LayerKind, sizes: &CacheSizes) -> CacheBytes {
    let row = |width: usize| sizes.cache_type.row_bytes(width);
    let tensor = |bytes: u64| bytes.next_multiple_of(TENSOR_ALIGN);
    // Values and scores, F32, for the ring and the padding row.
    let sources = |width: usize, coff: usize, ratio: usize| {
        let rows = compressor_ring_rows(ratio) + 1;
        2 * tensor((coff * width * rows) as u64 * 4)
    };
    let comp_rows = match kind {
        LayerKind::Raw => 0,
        kind => sizes.comp_rows(kind.ratio()),
    };
    // `kv`: the raw ring, then the compressed rows.
    let mut total = tensor((sizes.raw_ring + comp_rows) as u64 * row(cfg.head_dim));
    let mut per_token = 0.0;
    match kind {
        LayerKind::Raw => {}
        LayerKind::Csa => {
            per_token += (row(cfg.head_dim) + row(cfg.indexer_dim)) as f64 / 4.0;
            total += tensor(comp_rows as u64 * row(cfg.indexer_dim));
            total += sources(cfg.head_dim, 2, 4) + sources(cfg.indexer_dim, 2, 4);
        }
        LayerKind::Hca => {
            per_token += row(cfg.head_dim) as f64 / 128.0;
            total += sources(cfg.head_dim, 1, 128);
        }
    }
    CacheBytes { per_token, total }
}

/// Whether a cache that holds positions `0..end` still holds everything the positions from `n` on need (`n < end`),
/// so a sequence can go back to its first `n` tokens without recomputing them:
/// - the raw ring still holds the keys query `n` sees (positions `n + 1 - window .. n`): position `t` lives in ring
///   row `t % ring` until position `t + ring` overwrites it;
/// - each compressor's ring (per position, see [`plan::compressor_ring_rows`]) still holds the positions the next
///   blocks pool: the partial block of `n` and, for ratio 4, the block before it.
///
/// Rows of positions from `n` on (raw keys, compressed and indexer rows of blocks completed after `n`) stay where
/// they are: masks never show them (visibility follows the positions processed) and they are written again when
/// their positions come again.
pub fn can_roll_back(cfg: &Config, sizes: &CacheSizes, n: usize, end: usize) -> bool {
    // Every position from `first` to `n` is still in a ring of `rows` rows.
    let held = |first: usize, rows: usize| first >= n || first + rows >= end;
    if n == 0 || n >= end {
        return true;
    }
    let raw = held((n + 1).saturating_sub(cfg.window), sizes.raw_ring);
    let kinds = [LayerKind::Csa, LayerKind::Hca];
    let comp = kinds
        .into_iter()
        .filter(|k| cfg.kinds.contains(k))
        .all(|k| {
            let ratio = k.ratio();
            let block = n / ratio;
            let first = match ratio {
                4 => block.saturating_sub(1) * ratio,
                _ => block * ratio,
            };
            held(first, compressor_ring_rows(ratio))
        });
    raw && comp
}

/// The cache tensors of one sequence, allocated in one backend buffer.
pub struct KvCache {
    ctx: Context<'static>,
    layers: Vec<LayerCache<usize>>,
    pub sizes: CacheSizes,
}

impl KvCache {
    /// The cache of a sequence: layer `il`'s tensors in a buffer of `devices[il]` (the CPU's, `backend`, for `None`
    /// or past the end of `devices`).
    pub fn new(
        cfg: &Config,
        sizes: CacheSizes,
        backend: &CpuBackend,
        devices: &[Option<Device>],
    ) -> Result<KvCache> {
        let device_of = |il: usize| devices.get(il).copied().flatten();
        // The CPU's layers first, then each device's, each group allocated in one buffer of its device.
        let mut groups: Vec<Option<Device>> = vec![None];
        for d in devices.iter().flatten() {
            if !groups.contains(&Some(*d)) {
                groups.push(Some(*d));
            }
        }
        let mut slots: Vec<Option<LayerCache<usize>>> = vec![None; cfg.n_layer];
        let per_layer = 14;
        let ctx = Context::with_capacity(cfg.n_layer * per_layer + 8, 0)?;
        let rows_ty = sizes.cache_type.ggml();
        let dh = cfg.head_dim;
        {
            // Tensors are identified by their position in the context (views count too).
            let mut count = 0usize;
            let mut made = |t: Tensor<'_>, name: String| -> Result<usize> {
                t.set_name(&name)?;
                count += 1;
                Ok(count - 1)
            };
            for group in &groups {
                for (il, kind) in cfg.kinds.iter().enumerate() {
                    if device_of(il) != *group {
                        continue;
                    }
                    let cap = match kind {
                        LayerKind::Raw => 0,
                        kind => sizes.comp_rows(kind.ratio()),
                    };
                    let total = sizes.raw_ring + cap;
                    if total.checked_mul(dh).is_none_or(|n| n > i32::MAX as usize) {
                        return Err(GgmlError::Op {
                            op: "cache",
                            detail: format!(
                                "{total} key rows of {dh} values do not fit 32-bit indices"
                            ),
                        });
                    }
                    let kv_t = ctx.new_tensor_2d(rows_ty, dh as i64, total as i64)?;
                    let kv = made(kv_t, format!("cache.{il}.kv"))?;
                    let row = kv_t.nb()[1];
                    let raw_k = made(
                        ctx.view_2d(kv_t, [dh as i64, sizes.raw_ring as i64], row, 0)?,
                        format!("cache.{il}.raw_k"),
                    )?;
                    // `what` is "comp" (attention rows, which live in `kv` after the ring) or "idx" (indexer rows).
                    let mut comp_cache = |width: usize,
                                          coff: usize,
                                          ratio: usize,
                                          what: &str|
                     -> Result<CompCache<usize>> {
                        let ring = compressor_ring_rows(ratio) as i64;
                        let n_rows = sizes.comp_rows(ratio) as i64;
                        let in_kv = what == "comp";
                        let rows = if in_kv {
                            ctx.view_2d(kv_t, [width as i64, n_rows], row, sizes.raw_ring * row)?
                        } else {
                            ctx.new_tensor_2d(rows_ty, width as i64, n_rows)?
                        };
                        let rows = made(rows, format!("cache.{il}.{what}_rows"))?;
                        let features = (coff * width) as i64;
                        let src_rows = ring + 1;
                        let src_kv_t = ctx.new_tensor_2d(GgmlType::F32, features, src_rows)?;
                        let src_kv = made(src_kv_t, format!("cache.{il}.{what}_src_kv"))?;
                        let src_score_t = ctx.new_tensor_2d(GgmlType::F32, features, src_rows)?;
                        let src_score = made(src_score_t, format!("cache.{il}.{what}_src_score"))?;
                        let ring_of = |t| ctx.view_2d(t, [features, ring], Tensor::nb(t)[1], 0);
                        Ok(CompCache {
                            ratio,
                            rows,
                            ring_kv: made(
                                ring_of(src_kv_t)?,
                                format!("cache.{il}.{what}_ring_kv"),
                            )?,
                            ring_score: made(
                                ring_of(src_score_t)?,
                                format!("cache.{il}.{what}_ring_score"),
                            )?,
                            src_kv,
                            src_score,
                        })
                    };
                    let (comp, indexer) = match kind {
                        LayerKind::Raw => (None, None),
                        LayerKind::Csa => (
                            Some(comp_cache(dh, 2, 4, "comp")?),
                            Some(comp_cache(cfg.indexer_dim, 2, 4, "idx")?),
                        ),
                        LayerKind::Hca => (Some(comp_cache(dh, 1, 128, "comp")?), None),
                    };
                    slots[il] = Some(LayerCache {
                        kv,
                        raw_k,
                        comp,
                        indexer,
                    });
                }
                match group {
                    None => ctx.alloc_tensors(backend)?,
                    Some(d) => ctx.alloc_tensors_on(*d, false)?,
                }
            }
        }
        let layers = slots
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| GgmlError::Op {
                op: "cache",
                detail: "a layer has no cache tensors (layer kinds and count disagree)".into(),
            })?;
        let cache = KvCache { ctx, layers, sizes };
        cache.clear()?;
        Ok(cache)
    }

    /// The cache tensors, layer by layer.
    pub fn layers(&self) -> Vec<LayerCache<Tensor<'_>>> {
        let all = self.ctx.tensors();
        self.layers.iter().map(|l| l.map(&|i| all[i])).collect()
    }

    /// Zeroes every row (a fresh sequence), and sets the compressors' padding rows.
    pub fn clear(&self) -> Result<()> {
        for t in self.ctx.tensors() {
            if t.is_view() {
                continue;
            }
            t.set_bytes(&vec![0u8; t.n_bytes()])?;
        }
        for layer in self.layers() {
            for c in [&layer.comp, &layer.indexer].into_iter().flatten() {
                let mut bytes = vec![0u8; c.src_score.n_bytes()];
                let pad = c.src_score.nb()[1];
                let at = bytes.len() - pad;
                for v in bytes[at..].chunks_exact_mut(4) {
                    v.copy_from_slice(&f32::NEG_INFINITY.to_le_bytes());
                }
                c.src_score.set_bytes(&bytes)?;
            }
        }
        Ok(())
    }

    /// Total bytes of the cache buffer.
    pub fn bytes(&self) -> usize {
        self.ctx.allocated_bytes()
    }

    /// The tensors a session file holds, in order.
    pub fn saved(&self) -> Vec<Tensor<'_>> {
        self.layers()
            .iter()
            .flat_map(LayerCache::saved)
            .map(|(t, _)| t)
            .collect()
    }

    /// The tensors a session of `n_tokens` tokens holds, in order, each with the bytes of it in use: the
    /// compressed rows of the blocks those tokens completed (the rows after them are not read before they are
    /// written again), the whole tensor for the raw ring and the compressors' rings. A session file stores these
    /// bytes, so its size follows the tokens, not the context.
    pub fn saved_extents(&self, n_tokens: usize) -> Vec<(Tensor<'_>, usize)> {
        self.layers()
            .iter()
            .flat_map(LayerCache::saved)
            .map(|(t, ratio)| {
                let bytes = match ratio {
                    None => t.n_bytes(),
                    Some(r) => {
                        let rows = (n_tokens / r.max(1)).min(t.ne()[1] as usize);
                        rows * t.nb()[1]
                    }
                };
                (t, bytes)
            })
            .collect()
    }

    /// Every saved tensor's bytes, in order (for saving a session).
    pub fn snapshot(&self) -> Result<Vec<Vec<u8>>> {
        self.saved().into_iter().map(|t| t.get_bytes()).collect()
    }

    /// Restores what [`KvCache::snapshot`] returned (same model and sizes).
    pub fn restore(&self, data: &[Vec<u8>]) -> Result<()> {
        for (t, bytes) in self.saved().into_iter().zip(data) {
            t.set_bytes(bytes)?;
        }
        Ok(())
    }

    /// Tensors a session file holds.
    pub fn n_tensors(&self) -> usize {
        self.layers.iter().map(|l| l.saved().len()).sum()
    }
}

/// Up to this many query rows (tokens × heads), layers with compressed rows attend to the whole raw ring even
/// while part of it is still unused (rows beyond the padded count, all masked): the extra products cost less than
/// joining and copying the key rows each micro-batch (decode); beyond it (prompts), they cost more.
pub const WHOLE_RING_WORK: usize = 64;

/// Queries per chunk when a prompt's micro-batch attends chunk by chunk (see [`UbatchPlan::chunks`]).
pub const QUERY_CHUNK: usize = 64;

/// The fewest queries a chunk has: a micro-batch's last few queries join the chunk before them. ggml's tinyBLAS
/// on Arm NEON (and s390x) takes F32 products of 4 or more columns only and leaves narrower ones to its dot
/// products, which add in another order; with at least 4 queries every chunk's products run the kernel of the full
/// read's, so the chunks give its bits on every ISA (tests/graph_reuse.rs: a prompt of 130 tokens).
const MIN_CHUNK_QUERIES: usize = 4;

/// The most queries a chunk has: [`QUERY_CHUNK`] and a tail of fewer than [`MIN_CHUNK_QUERIES`] (the planner's
/// bound on a chunk's buffers).
pub const MAX_CHUNK_QUERIES: usize = QUERY_CHUNK + MIN_CHUNK_QUERIES - 1;

/// `(first, n)` of each query chunk of a micro-batch of `n` queries: [`QUERY_CHUNK`] at a time, the last at least
/// [`MIN_CHUNK_QUERIES`] (or all `n`).
fn chunk_bounds(n: usize) -> Vec<(usize, usize)> {
    let mut bounds: Vec<(usize, usize)> = (0..n)
        .step_by(QUERY_CHUNK)
        .map(|first| (first, QUERY_CHUNK.min(n - first)))
        .collect();
    if let [.., _, (_, tail)] = *bounds.as_slice() {
        if tail < MIN_CHUNK_QUERIES {
            bounds.pop();
            if let Some(last) = bounds.last_mut() {
                last.1 += tail;
            }
        }
    }
    bounds
}

/// The keys one chunk of a micro-batch's queries attends to.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryChunk {
    /// The chunk's first query (index within the micro-batch) and how many it has.
    pub first: usize,
    pub n: usize,
    /// The raw ring rows its queries see (whole aligned blocks, see [`plan::window_rows`]) and their `[rows, n]`
    /// mask.
    pub raw_rows: Vec<i32>,
    pub raw_mask: Vec<f32>,
    /// Per compressed ratio present (ratio 4, ratio 128): the first compressed rows it reads (those its last query
    /// sees, padded to the gather's block; at most the micro-batch's `n_kv`).
    pub csa_rows: Option<usize>,
    pub hca_rows: Option<usize>,
}

/// The host side of one micro-batch: tokens, positions, and every index and mask its graph needs.
#[derive(Clone, Debug)]
pub struct UbatchPlan {
    pub tokens: Vec<i32>,
    pub p0: usize,
    pub raw: RawPlan,
    pub csa: Option<CompPlan>,
    pub hca: Option<CompPlan>,
    /// Rows of the raw ring (the first rows of each layer's `kv`).
    pub raw_ring: usize,
    /// For layers with compressed rows, the `[raw_ring, n]` mask of the whole raw ring, when they read all of it
    /// although `raw.n_kv < raw_ring` rows would do (see [`WHOLE_RING_WORK`]): then their keys and values are single
    /// views of `kv` and `vt`, with nothing copied. Reading more ring rows, all masked, gives the same results bit
    /// for bit: they add exact zeros, in groups of 256 that keep every other value in its SIMD lane.
    pub raw_ring_mask: Option<Vec<f32>>,
    /// When not empty, attention runs chunk by chunk over these query chunks, each over the key rows its queries
    /// see (a prompt's micro-batch: each query sees `window` raw rows and a few compressed ones, far fewer than the
    /// micro-batch's `n_kv`). Row blocks keep their SIMD lanes as in [`plan::window_rows`].
    pub chunks: Vec<QueryChunk>,
    /// Some layers attend to the raw window only.
    pub raw_layers: bool,
}

/// Compressor bookkeeping and visibility for one ratio.
#[derive(Clone, Debug)]
pub struct CompPlan {
    pub compress: CompressPlan,
    /// Compressed rows attention reads (the rows that exist, padded to [`plan::KV_PAD`], or to
    /// the gather's block (see [`Gather::Blocks`]) when the raw rows are gathered; masked beyond them).
    pub n_kv: usize,
    /// `[n_kv, n]` visibility mask.
    pub mask: Vec<f32>,
    /// Compressed rows the cache holds (after the raw ring in `kv`).
    pub cap: usize,
    /// Ratio 4, gathered reads (few queries, or query chunks): when every query sees more rows than the indexer
    /// keeps (`k`), each query attends to its own `k` chosen rows, gathered (see [`sparse_top_k`]), instead of every
    /// visible row under a mask.
    pub top_k: Option<usize>,
    /// Ratio 4: queries the indexer scores per product (see [`indexer_step`]); every query at once otherwise.
    pub indexer_step: usize,
}

/// Bytes of F32 head scores `{heads, queries, rows}` one product of the indexer holds by default (see
/// [`indexer_step`]); at 1M context on Flash, 64 MiB per query.
pub const INDEXER_PRODUCT_BYTES: usize = 128 << 20;

/// Queries per product when the indexer's `heads` heads score `n` queries against `n_rows` rows, so that one
/// product's F32 scores take at most `bytes` (one query at least).
pub fn indexer_step(n: usize, n_rows: usize, heads: usize, bytes: usize) -> usize {
    let per_query = heads.max(1).saturating_mul(n_rows.max(1)).saturating_mul(4);
    (bytes / per_query).clamp(1, n.max(1))
}

/// The indexer's `top_k` when the queries from `p0` of a gathered micro-batch (few queries, see
/// [`plan::RawPlan::read_slots`], or a prompt's attending in query chunks, see [`UbatchPlan::chunks`]) each see more than `top_k` compressed rows of ratio `ratio` (4) and `reads` is
/// [`TopKReads::Chosen`]: attention then reads only the rows the indexer chose for each query, `top_k` per query,
/// instead of all visible rows.
///
/// Visibility only grows with the position, so the first query decides. The chosen rows are all visible (their
/// scores are finite, the others' -inf) and distinct, so the result is the masked read's up to the order of the
/// sums over rows (last bits).
pub fn sparse_top_k(
    ratio: usize,
    top_k: usize,
    p0: usize,
    gathered: bool,
    reads: TopKReads,
) -> Option<usize> {
    let chosen = reads == TopKReads::Chosen && gathered;
    (chosen && ratio == 4 && top_k > 0 && (p0 + 1) / ratio > top_k).then_some(top_k)
}

impl UbatchPlan {
    /// The plan of `tokens` at positions from `p0`; `gather`: attention of few queries may gather the rows they
    /// see (see [`plan::RawPlan::read_slots`]; [`Gather::Off`] reads the first rows, a diagnostic); `top_k_reads`:
    /// whether those queries then read only their indexer's choice (see [`CompPlan::top_k`]); `indexer_bytes`:
    /// the memory one product of the indexer may take (see [`indexer_step`]).
    pub fn new(
        cfg: &Config,
        sizes: &CacheSizes,
        tokens: &[u32],
        p0: usize,
        gather: Gather,
        top_k_reads: TopKReads,
        indexer_bytes: usize,
    ) -> UbatchPlan {
        let n = tokens.len();
        let ring = Ring {
            cap: sizes.raw_ring,
        };
        let raw = raw_plan(ring, cfg.window, p0, n, gather);
        // Gathered reads are padded finely: they exist to read few rows.
        let pad = match (raw.read_slots.is_some(), gather) {
            (true, Gather::Blocks(block)) => block,
            _ => plan::KV_PAD,
        };
        // Prompts' micro-batches attend in query chunks (see `chunks`), each gathering the rows it sees.
        let chunked =
            matches!(gather, Gather::Blocks(_)) && raw.read_slots.is_none() && n >= 2 * QUERY_CHUNK;
        let gathered = raw.read_slots.is_some() || chunked;
        let comp = |kind: LayerKind| {
            cfg.kinds.contains(&kind).then(|| {
                let ratio = kind.ratio();
                let ring = Ring {
                    cap: compressor_ring_rows(ratio),
                };
                let compress = compress_plan(ratio, ring, p0, n);
                let cap = sizes.comp_rows(ratio);
                let n_kv = plan::padded_rows(compress.n_rows_after, cap, pad);
                let mask = compressed_mask(ratio, n_kv, p0, n);
                CompPlan {
                    compress,
                    n_kv,
                    mask,
                    cap,
                    top_k: sparse_top_k(ratio, cfg.indexer_top_k, p0, gathered, top_k_reads),
                    indexer_step: match kind {
                        LayerKind::Csa => indexer_step(n, n_kv, cfg.indexer_heads, indexer_bytes),
                        _ => n,
                    },
                }
            })
        };
        let csa = comp(LayerKind::Csa);
        let hca = comp(LayerKind::Hca);
        let chunks = match gather {
            Gather::Blocks(block) if chunked => query_chunks(cfg, ring, p0, n, [&csa, &hca], block),
            _ => Vec::new(),
        };
        let comp_layers = cfg.kinds.iter().any(|k| *k != LayerKind::Raw);
        let whole_ring = n * cfg.n_head <= WHOLE_RING_WORK && raw.read_slots.is_none();
        let raw_ring_mask = (comp_layers && raw.n_kv < ring.cap && whole_ring)
            .then(|| raw_mask(ring, cfg.window, p0, n, ring.cap));
        UbatchPlan {
            tokens: tokens.iter().map(|&t| t as i32).collect(),
            p0,
            raw,
            csa,
            hca,
            chunks,
            raw_ring: ring.cap,
            raw_ring_mask,
            raw_layers: cfg.kinds.contains(&LayerKind::Raw),
        }
    }
}

/// The query chunks of a micro-batch of `n` tokens from `p0` (see [`UbatchPlan::chunks`]); `comp`: the ratio-4 and
/// ratio-128 plans of the micro-batch; `block`: see [`Gather::Blocks`].
fn query_chunks(
    cfg: &Config,
    ring: Ring,
    p0: usize,
    n: usize,
    comp: [&Option<CompPlan>; 2],
    block: usize,
) -> Vec<QueryChunk> {
    let end = p0 + n;
    chunk_bounds(n)
        .into_iter()
        .map(|(first, nc)| {
            let (raw_rows, raw_mask) = window_rows(ring, cfg.window, p0 + first, nc, end, block);
            let last = p0 + first + nc - 1;
            // None of the first compressed rows where each query reads its chosen rows.
            let rows = |c: &Option<CompPlan>| {
                c.as_ref().map(|c| match c.top_k {
                    Some(_) => 0,
                    None => {
                        let seen = (last + 1) / c.compress.ratio;
                        plan::padded_rows(seen, c.n_kv, block)
                    }
                })
            };
            QueryChunk {
                first,
                n: nc,
                raw_rows,
                raw_mask,
                csa_rows: rows(comp[0]),
                hca_rows: rows(comp[1]),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_query_chunk_has_at_least_four_queries() {
        assert_eq!(
            chunk_bounds(300),
            [(0, 64), (64, 64), (128, 64), (192, 64), (256, 44)]
        );
        assert_eq!(chunk_bounds(130), [(0, 64), (64, 66)]);
        assert_eq!(chunk_bounds(131), [(0, 64), (64, 67)]);
        assert_eq!(chunk_bounds(132), [(0, 64), (64, 64), (128, 4)]);
        assert_eq!(chunk_bounds(128), [(0, 64), (64, 64)]);
        // A single chunk keeps whatever it has.
        assert_eq!(chunk_bounds(2), [(0, 2)]);
        assert_eq!(chunk_bounds(0), []);
        // Every query in exactly one chunk, in order, none over the planner's bound.
        for n in 0..1000 {
            let b = chunk_bounds(n);
            let ends: Vec<usize> = b.iter().map(|&(f, c)| f + c).collect();
            assert_eq!(b.first().map_or(0, |c| c.0), 0);
            assert_eq!(ends.last().copied().unwrap_or(0), n);
            assert!(
                b.iter().skip(1).zip(&ends).all(|(&(f, _), &e)| f == e),
                "{n}"
            );
            assert!(b.iter().all(|&(_, c)| c <= MAX_CHUNK_QUERIES), "{n}");
        }
    }

    #[test]
    fn queries_read_only_the_chosen_rows_once_they_see_more_than_top_k() {
        let chosen = TopKReads::Chosen;
        // Ratio 4, top-512: position p sees (p + 1) / 4 rows; more than 512 from p = 2051 on.
        assert_eq!(sparse_top_k(4, 512, 2050, true, chosen), None);
        assert_eq!(sparse_top_k(4, 512, 2051, true, chosen), Some(512));
        assert_eq!(sparse_top_k(4, 512, 65536, true, chosen), Some(512));
        // Not for reads of the first rows, ratio 128, no indexer, or the diagnostic.
        assert_eq!(sparse_top_k(4, 512, 65536, false, chosen), None);
        assert_eq!(sparse_top_k(128, 512, 1 << 20, true, chosen), None);
        assert_eq!(sparse_top_k(4, 0, 65536, true, chosen), None);
        assert_eq!(sparse_top_k(4, 512, 65536, true, TopKReads::Masked), None);
    }
}
