//! The per-sequence cache of DeepSeek V4 (DSV4.md section 4): per layer the raw-window ring (the last `window`
//! rows plus a micro-batch), compressed rows and indexer rows for the whole context, and the compressor rings that
//! carry partial blocks between calls. Tensors live in one backend buffer; `plan` does the host bookkeeping.

pub mod plan;

use gguf::GgmlType;

use crate::ggml::{Context, CpuBackend, Result, Tensor};
use crate::model::config::{Config, LayerKind};

use plan::{
    compress_plan, compressed_mask, compressor_ring_rows, raw_plan, CompressPlan, RawPlan, Ring,
};

/// The compressed rows of one layer (or of its indexer) and the ring of its compressor.
#[derive(Clone, Debug)]
pub struct CompCache<T> {
    /// `{width, rows}`: one row per completed block.
    pub rows: T,
    /// `{coff·width, ring}`: recent tokens' compressor values.
    pub ring_kv: T,
    /// `{coff·width, ring}`: recent tokens' compressor scores (gate + ape).
    pub ring_score: T,
}

/// The cache of one layer.
#[derive(Clone, Debug)]
pub struct LayerCache<T> {
    /// `{head_dim, raw ring}`: the keys (= values) of the most recent tokens.
    pub raw_k: T,
    pub comp: Option<CompCache<T>>,
    pub indexer: Option<CompCache<T>>,
}

impl<T: Copy> CompCache<T> {
    fn map<U>(&self, f: &impl Fn(T) -> U) -> CompCache<U> {
        CompCache {
            rows: f(self.rows),
            ring_kv: f(self.ring_kv),
            ring_score: f(self.ring_score),
        }
    }
}

impl<T: Copy> LayerCache<T> {
    pub fn map<U>(&self, f: &impl Fn(T) -> U) -> LayerCache<U> {
        LayerCache {
            raw_k: f(self.raw_k),
            comp: self.comp.as_ref().map(|c| c.map(f)),
            indexer: self.indexer.as_ref().map(|c| c.map(f)),
        }
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
}

impl CacheType {
    pub fn ggml(self) -> GgmlType {
        match self {
            CacheType::F16 => GgmlType::F16,
            CacheType::F32 => GgmlType::F32,
        }
    }

    /// Bytes of one stored value.
    pub fn bytes(self) -> u64 {
        self.ggml().type_size()
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

/// Bytes of cache per token of context and the constant part (key rows in the cache type, rings in F32).
pub fn cache_bytes(cfg: &Config, sizes: &CacheSizes) -> (f64, u64) {
    let f = sizes.cache_type.bytes();
    let mut per_token = 0.0;
    let mut fixed = 0u64;
    for kind in &cfg.kinds {
        fixed += (cfg.head_dim * sizes.raw_ring) as u64 * f;
        let ring_width = |width: usize, coff: usize, ratio: usize| {
            (2 * coff * width * compressor_ring_rows(ratio)) as u64 * 4
        };
        match kind {
            LayerKind::Raw => {}
            LayerKind::Csa => {
                per_token += ((cfg.head_dim + cfg.indexer_dim) as u64 * f) as f64 / 4.0;
                fixed += ring_width(cfg.head_dim, 2, 4) + ring_width(cfg.indexer_dim, 2, 4);
            }
            LayerKind::Hca => {
                per_token += (cfg.head_dim as u64 * f) as f64 / 128.0;
                fixed += ring_width(cfg.head_dim, 1, 128);
            }
        }
    }
    (per_token, fixed)
}

/// The cache tensors of one sequence, allocated in one backend buffer.
pub struct KvCache {
    ctx: Context<'static>,
    layers: Vec<LayerCache<usize>>,
    pub sizes: CacheSizes,
}

impl KvCache {
    pub fn new(cfg: &Config, sizes: CacheSizes, backend: &CpuBackend) -> Result<KvCache> {
        let per_layer = 7;
        let ctx = Context::with_capacity(cfg.n_layer * per_layer + 8, 0)?;
        let mut count = 0usize;
        let rows_ty = sizes.cache_type.ggml();
        let mut new = |ty: GgmlType, ne0: usize, ne1: usize, name: String| -> Result<usize> {
            let t = ctx.new_tensor_2d(ty, ne0 as i64, ne1 as i64)?;
            t.set_name(&name)?;
            count += 1;
            Ok(count - 1)
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for (il, kind) in cfg.kinds.iter().enumerate() {
            let raw_k = new(
                rows_ty,
                cfg.head_dim,
                sizes.raw_ring,
                format!("cache.{il}.raw_k"),
            )?;
            let mut comp_cache =
                |width: usize, coff: usize, ratio: usize, what: &str| -> Result<CompCache<usize>> {
                    let ring = compressor_ring_rows(ratio);
                    Ok(CompCache {
                        rows: new(
                            rows_ty,
                            width,
                            sizes.comp_rows(ratio),
                            format!("cache.{il}.{what}_rows"),
                        )?,
                        ring_kv: new(
                            GgmlType::F32,
                            coff * width,
                            ring,
                            format!("cache.{il}.{what}_ring_kv"),
                        )?,
                        ring_score: new(
                            GgmlType::F32,
                            coff * width,
                            ring,
                            format!("cache.{il}.{what}_ring_score"),
                        )?,
                    })
                };
            let (comp, indexer) = match kind {
                LayerKind::Raw => (None, None),
                LayerKind::Csa => (
                    Some(comp_cache(cfg.head_dim, 2, 4, "comp")?),
                    Some(comp_cache(cfg.indexer_dim, 2, 4, "idx")?),
                ),
                LayerKind::Hca => (Some(comp_cache(cfg.head_dim, 1, 128, "comp")?), None),
            };
            layers.push(LayerCache {
                raw_k,
                comp,
                indexer,
            });
        }
        ctx.alloc_tensors(backend)?;
        let cache = KvCache { ctx, layers, sizes };
        cache.clear()?;
        Ok(cache)
    }

    /// The cache tensors, layer by layer.
    pub fn layers(&self) -> Vec<LayerCache<Tensor<'_>>> {
        let all = self.ctx.tensors();
        self.layers.iter().map(|l| l.map(&|i| all[i])).collect()
    }

    /// Zeroes every row (a fresh sequence).
    pub fn clear(&self) -> Result<()> {
        for t in self.ctx.tensors() {
            t.set_bytes(&vec![0u8; t.n_bytes()])?;
        }
        Ok(())
    }

    /// Total bytes of the cache buffer.
    pub fn bytes(&self) -> usize {
        self.ctx.allocated_bytes()
    }

    /// Every tensor's bytes, in order (for saving a session).
    pub fn snapshot(&self) -> Result<Vec<Vec<u8>>> {
        self.ctx
            .tensors()
            .into_iter()
            .map(|t| t.get_bytes())
            .collect()
    }

    /// Restores what [`KvCache::snapshot`] returned (same model and sizes).
    pub fn restore(&self, data: &[Vec<u8>]) -> Result<()> {
        for (t, bytes) in self.ctx.tensors().into_iter().zip(data) {
            t.set_bytes(bytes)?;
        }
        Ok(())
    }

    pub fn n_tensors(&self) -> usize {
        self.ctx.tensors().len()
    }
}

/// The host side of one micro-batch: tokens, positions, and every index and mask its graph needs.
pub struct UbatchPlan {
    pub tokens: Vec<i32>,
    pub p0: usize,
    pub raw: RawPlan,
    pub csa: Option<CompPlan>,
    pub hca: Option<CompPlan>,
}

/// Compressor bookkeeping and visibility for one ratio.
pub struct CompPlan {
    pub compress: CompressPlan,
    /// Compressed rows attention reads (the rows that exist, padded; masked beyond them).
    pub n_kv: usize,
    /// `[n_kv, n]` visibility mask.
    pub mask: Vec<f32>,
}

impl UbatchPlan {
    pub fn new(cfg: &Config, sizes: &CacheSizes, tokens: &[u32], p0: usize) -> UbatchPlan {
        let n = tokens.len();
        let comp = |kind: LayerKind| {
            cfg.kinds.contains(&kind).then(|| {
                let ratio = kind.ratio();
                let ring = Ring {
                    cap: compressor_ring_rows(ratio),
                };
                let compress = compress_plan(ratio, ring, p0, n);
                let n_kv = plan::padded_kv(compress.n_rows_after, sizes.comp_rows(ratio));
                let mask = compressed_mask(ratio, n_kv, p0, n);
                CompPlan {
                    compress,
                    n_kv,
                    mask,
                }
            })
        };
        UbatchPlan {
            tokens: tokens.iter().map(|&t| t as i32).collect(),
            p0,
            raw: raw_plan(
                Ring {
                    cap: sizes.raw_ring,
                },
                cfg.window,
                p0,
                n,
            ),
            csa: comp(LayerKind::Csa),
            hca: comp(LayerKind::Hca),
        }
    }
}
