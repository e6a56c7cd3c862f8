//! `ferrite info FILE...`: metadata, tensor table, totals by type and, for DeepSeek V4, the model summary.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ferrite::cache::{cache_bytes, CacheSizes, CacheType};
use ferrite::engine::{resolve_ctx, DEFAULT_UBATCH};
use ferrite::model::config::Config;
use ferrite::model::sizes::{blocks_with_tensors, weight_sizes, WeightSizes, ARCH};
use ferrite::units::{format_bytes, format_params};
use gguf::{Array, Metadata, Model, Value};
use serde_json::{json, Value as Json};

/// Arrays longer than this are summarised (first items and the length) unless --full-arrays.
const ARRAY_PREVIEW: usize = 8;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// GGUF files; a shard of a split model (NAME-00001-of-0000N.gguf) opens the whole model.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// One JSON object per file, each on its own line, for scripts.
    #[arg(long)]
    json: bool,
    /// Print every element of long arrays (the vocabulary, merges, ...).
    #[arg(long)]
    full_arrays: bool,
    /// Leave out the tensor table.
    #[arg(long)]
    no_tensors: bool,
}

pub fn run(args: &InfoArgs) -> Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    for (i, path) in args.files.iter().enumerate() {
        // Errors from the reader already name the file.
        let model = Model::open(path)?;
        let preview = if args.full_arrays {
            usize::MAX
        } else {
            ARRAY_PREVIEW
        };
        if args.json {
            let report = json_report(path, &model, preview, !args.no_tensors);
            writeln!(out, "{}", serde_json::to_string(&report)?)?;
        } else {
            if i > 0 {
                writeln!(out)?;
            }
            write_text(&mut out, path, &model, preview, !args.no_tensors)?;
        }
    }
    Ok(())
}

fn shape(dims: &[u64]) -> String {
    let parts: Vec<String> = dims.iter().map(u64::to_string).collect();
    format!("{{{}}}", parts.join(", "))
}

struct TypeTotal {
    tensors: u64,
    params: u64,
    bytes: u64,
}

fn totals_by_type(model: &Model) -> BTreeMap<gguf::GgmlType, TypeTotal> {
    let mut totals = BTreeMap::new();
    for t in model.tensors() {
        let e = totals.entry(t.info.ty).or_insert(TypeTotal {
            tensors: 0,
            params: 0,
            bytes: 0,
        });
        e.tensors += 1;
        e.params += t.info.n_elements();
        e.bytes += t.info.n_bytes;
    }
    totals
}

fn write_text(
    out: &mut impl Write,
    path: &std::path::Path,
    model: &Model,
    preview: usize,
    tensors: bool,
) -> Result<()> {
    let first = &model.shards()[0];
    let h = first.header();
    writeln!(out, "file:      {}", path.display())?;
    if model.shards().len() > 1 {
        writeln!(out, "shards:    {}", model.shards().len())?;
        for s in model.shards() {
            writeln!(
                out,
                "           {} ({})",
                s.path().display(),
                format_bytes(s.header().file_len)
            )?;
        }
    }
    writeln!(
        out,
        "size:      {} ({} bytes)",
        format_bytes(model.file_bytes()),
        model.file_bytes()
    )?;
    writeln!(
        out,
        "format:    GGUF v{}, alignment {}, {} metadata keys, {} tensors",
        h.version,
        h.alignment,
        model.metadata().len(),
        model.tensors().len()
    )?;

    writeln!(out, "\nmetadata:")?;
    let key_width = model
        .metadata()
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0);
    for (key, value) in model.metadata().iter() {
        let ty = match value {
            Value::Array(a) => format!("{}[]", a.elem_type()),
            v => v.value_type().to_string(),
        };
        writeln!(
            out,
            "  {key:key_width$}  {ty:9}  {}",
            value.summary(preview)
        )?;
    }

    if tensors {
        writeln!(out, "\ntensors:")?;
        let name_width = model
            .tensors()
            .iter()
            .map(|t| t.info.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let split = model.shards().len() > 1;
        writeln!(
            out,
            "  {:name_width$}  {:7}  {:22}  {:>14}  {:>14}{}",
            "name",
            "type",
            "shape",
            "bytes",
            "offset",
            if split { "  shard" } else { "" }
        )?;
        for t in model.tensors() {
            let i = &t.info;
            let shard = if split {
                format!("  {:>5}", t.shard + 1)
            } else {
                String::new()
            };
            writeln!(
                out,
                "  {:name_width$}  {:7}  {:22}  {:>14}  {:>14}{shard}",
                i.name,
                i.ty.name(),
                shape(&i.dims),
                i.n_bytes,
                model.shards()[t.shard].header().data_offset + i.offset,
            )?;
        }
    }

    writeln!(out, "\ntotals by type:")?;
    for (ty, total) in totals_by_type(model) {
        writeln!(
            out,
            "  {:7}  {:>6} tensors  {:>10} params  {:>12}",
            ty.name(),
            total.tensors,
            format_params(total.params),
            format_bytes(total.bytes)
        )?;
    }

    if model.metadata().str("general.architecture").ok() == Some(ARCH) {
        writeln!(out, "\nmodel ({ARCH}):")?;
        write_model_summary(out, model)?;
    }
    Ok(())
}

/// The facts of a DeepSeek V4 file that `info` shows, read leniently: a missing key shows as unknown.
struct Deepseek4Facts {
    block_count: Option<u64>,
    ratios: Option<Vec<i64>>,
    hash_layers: Option<u64>,
    n_expert: Option<u64>,
    n_used: Option<u64>,
    n_shared: Option<u64>,
    expert_width: Option<u64>,
    hidden: Option<u64>,
    vocab_rows: Option<u64>,
    has_mtp: bool,
    /// Blocks with tensors in the file (see [`blocks_with_tensors`]).
    blocks_in_file: u64,
}

fn deepseek4_facts(model: &Model) -> Deepseek4Facts {
    let md = model.metadata();
    let u = |k: &str| md.uint(&format!("{ARCH}.{k}")).ok();
    let block_count = u("block_count");
    let ratios = md
        .int_array(&format!("{ARCH}.attention.compress_ratios"))
        .ok();
    let has_mtp = block_count
        .and_then(|n| n.checked_sub(1))
        .is_some_and(|last| {
            model
                .tensor(&format!("blk.{last}.nextn.eh_proj.weight"))
                .is_some()
        });
    Deepseek4Facts {
        block_count,
        ratios,
        hash_layers: u("hash_layer_count"),
        n_expert: u("expert_count"),
        n_used: u("expert_used_count"),
        n_shared: u("expert_shared_count"),
        expert_width: u("expert_feed_forward_length"),
        hidden: u("embedding_length"),
        vocab_rows: model
            .tensor("token_embd.weight")
            .and_then(|t| t.info.dims.get(1).copied()),
        has_mtp,
        blocks_in_file: blocks_with_tensors(model),
    }
}

impl Deepseek4Facts {
    /// Per-layer attention kinds: `raw` (window only), `csa` (ratio 4 + indexer), `hca` (ratio 128).
    fn layer_kinds(&self) -> Vec<&'static str> {
        let (Some(n), Some(ratios)) = (self.block_count, &self.ratios) else {
            return Vec::new();
        };
        // Only the entries the array holds: a hostile block_count must not size this list.
        (0..n.min(ratios.len() as u64) as usize)
            .map(|i| match ratios.get(i) {
                Some(0) => "raw",
                Some(4) => "csa",
                Some(128) => "hca",
                _ => "?",
            })
            .collect()
    }

    fn layer_line(&self) -> String {
        let kinds = self.layer_kinds();
        let count = |k: &str| kinds.iter().filter(|&&x| x == k).count();
        let n = self.block_count.map_or("?".into(), |n| n.to_string());
        let mtp = match self.block_count {
            Some(n) if n > self.blocks_in_file => format!(
                " (but the file has tensors for {} blocks only: not loadable)",
                self.blocks_in_file
            ),
            _ if self.has_mtp => " (the last is the MTP block)".into(),
            _ => String::new(),
        };
        format!(
            "{n} layers{mtp}: {} raw-window, {} ratio-4 with indexer, {} ratio-128",
            count("raw"),
            count("csa"),
            count("hca")
        )
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

fn write_model_summary(out: &mut impl Write, model: &Model) -> Result<()> {
    let f = deepseek4_facts(model);
    let sizes = weight_sizes(model);
    writeln!(out, "  layers:      {}", f.layer_line())?;
    let kinds = f.layer_kinds();
    if !kinds.is_empty() {
        writeln!(out, "  schedule:    {}", kinds.join(" "))?;
    }
    writeln!(out, "  hidden:      {}", opt(f.hidden))?;
    writeln!(
        out,
        "  experts:     {} routed per layer, {} used per token, width {}, {} shared; hash routing in the first {} layers",
        opt(f.n_expert),
        opt(f.n_used),
        opt(f.expert_width),
        opt(f.n_shared),
        opt(f.hash_layers)
    )?;
    write_sizes(out, &sizes, &f)?;
    for c in context_caches(model) {
        c.write(out)?;
    }
    Ok(())
}

/// The context cache a session of this model allocates in one cache type (the default micro-batch), at the default
/// and the trained context sizes.
struct ContextCache {
    cache_type: CacheType,
    per_token: f64,
    /// (tokens, bytes): the default `-c` and the trained context (`-c 0`).
    sizes: Vec<(usize, u64)>,
}

/// The cache in F16 (the default) and in Q8_0 (`--cache-type q8_0`, where the model's widths fit its blocks);
/// none when the metadata does not give a model ferrite runs.
fn context_caches(model: &Model) -> Vec<ContextCache> {
    let Ok(cfg) = Config::from_model(model) else {
        return Vec::new();
    };
    let mut ctxs = vec![resolve_ctx(&cfg, None), resolve_ctx(&cfg, Some(0))];
    ctxs.dedup();
    [CacheType::F16, CacheType::Q8_0]
        .into_iter()
        .filter(|t| t.fits(&cfg))
        .map(|cache_type| {
            let bytes = |n_ctx: usize| {
                let sizes = CacheSizes::new(&cfg, n_ctx, DEFAULT_UBATCH.min(n_ctx), cache_type);
                cache_bytes(&cfg, &sizes)
            };
            ContextCache {
                cache_type,
                per_token: bytes(1).per_token,
                sizes: ctxs.iter().map(|&n| (n, bytes(n).total)).collect(),
            }
        })
        .collect()
}

impl ContextCache {
    fn write(&self, out: &mut impl Write) -> Result<()> {
        let at: Vec<String> = self
            .sizes
            .iter()
            .enumerate()
            .map(|(i, &(n, b))| {
                let which = if i == 0 {
                    "-c default"
                } else {
                    "-c 0, trained"
                };
                format!("{} at {n} tokens ({which})", format_bytes(b))
            })
            .collect();
        let (label, rows) = match self.cache_type {
            CacheType::F16 => ("cache:".to_string(), "F16 rows".to_string()),
            t => (
                format!("cache {}:", t.name()),
                format!("--cache-type {}", t.name()),
            ),
        };
        writeln!(
            out,
            "  {label:<13}{} per token of context ({rows}), {}",
            format_bytes(self.per_token.round() as u64),
            at.join(", ")
        )?;
        Ok(())
    }

    fn json(&self) -> Json {
        let at: Vec<Json> = self
            .sizes
            .iter()
            .map(|&(n, b)| json!({"n_ctx": n, "bytes": b}))
            .collect();
        json!({"cache_type": self.cache_type.name(), "bytes_per_token": self.per_token, "sizes": at})
    }
}

fn write_sizes(out: &mut impl Write, s: &WeightSizes, f: &Deepseek4Facts) -> Result<()> {
    let pct = |part: u64| {
        if s.bytes_total == 0 {
            0.0
        } else {
            100.0 * part as f64 / s.bytes_total as f64
        }
    };
    writeln!(
        out,
        "  parameters:  {} total = {} routed experts + {} other",
        format_params(s.params_total),
        format_params(s.params_routed),
        format_params(s.params_other())
    )?;
    writeln!(
        out,
        "  bytes:       {} routed experts ({:.1} %), {} other (resident)",
        format_bytes(s.bytes_routed),
        pct(s.bytes_routed),
        format_bytes(s.bytes_other())
    )?;
    if let Some(per) = s.layers.iter().map(|l| l.bytes_per_expert).max() {
        writeln!(
            out,
            "  per expert:  {} (gate + up + down of one expert in one layer; {} expert layers)",
            format_bytes(per),
            s.layers.len()
        )?;
    }
    if let (Some(used), Some(rows)) = (f.n_used, f.vocab_rows) {
        writeln!(
            out,
            "  per token:   {} of weights read ({} experts per layer)",
            format_bytes(s.active_bytes_per_token(used, rows)),
            used
        )?;
    }
    Ok(())
}

fn value_json(v: &Value, preview: usize) -> Json {
    match v {
        Value::String(s) => json!(s),
        Value::Bool(b) => json!(b),
        Value::F32(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Array(a) => array_json(a, preview),
        other => match other.as_i128().map(|i| (u64::try_from(i), i)) {
            Some((Ok(u), _)) => json!(u),
            Some((Err(_), i)) => json!(i as i64),
            None => Json::Null,
        },
    }
}

fn array_json(a: &Array, preview: usize) -> Json {
    let items: Vec<Json> = (0..a.len().min(preview))
        .filter_map(|i| a.get(i))
        .map(|v| value_json(&v, preview))
        .collect();
    if a.len() > preview {
        json!({"elem_type": a.elem_type().name(), "len": a.len(), "head": items})
    } else {
        Json::Array(items)
    }
}

fn metadata_json(md: &Metadata, preview: usize) -> Json {
    Json::Array(
        md.iter()
            .map(|(k, v)| {
                let ty = match v {
                    Value::Array(a) => format!("array[{}]", a.elem_type()),
                    v => v.value_type().to_string(),
                };
                json!({"key": k, "type": ty, "value": value_json(v, preview)})
            })
            .collect(),
    )
}

fn json_report(path: &std::path::Path, model: &Model, preview: usize, with_tensors: bool) -> Json {
    let h = model.shards()[0].header();
    let shards: Vec<Json> = model
        .shards()
        .iter()
        .map(|s| json!({"path": s.path(), "bytes": s.header().file_len}))
        .collect();
    let tensors: Vec<Json> = model
        .tensors()
        .iter()
        .map(|t| {
            let i = &t.info;
            json!({
                "name": i.name, "type": i.ty.name(), "shape": i.dims, "bytes": i.n_bytes,
                "offset": model.shards()[t.shard].header().data_offset + i.offset, "shard": t.shard,
            })
        })
        .collect();
    let totals: Vec<Json> = totals_by_type(model)
        .into_iter()
        .map(|(ty, t)| json!({"type": ty.name(), "tensors": t.tensors, "params": t.params, "bytes": t.bytes}))
        .collect();
    let mut report = json!({
        "path": path, "shards": shards, "bytes": model.file_bytes(), "version": h.version,
        "alignment": h.alignment, "metadata": metadata_json(model.metadata(), preview),
        "totals_by_type": totals, "model": Json::Null,
    });
    if with_tensors {
        report["tensors"] = Json::Array(tensors);
    }
    if model.metadata().str("general.architecture").ok() == Some(ARCH) {
        let f = deepseek4_facts(model);
        let s = weight_sizes(model);
        let per_token = f
            .n_used
            .zip(f.vocab_rows)
            .map(|(u, r)| s.active_bytes_per_token(u, r));
        let caches = context_caches(model);
        report["model"] = json!({
            "architecture": ARCH, "block_count": f.block_count, "has_mtp": f.has_mtp,
            "layer_kinds": f.layer_kinds(), "hidden": f.hidden, "expert_count": f.n_expert,
            "expert_used_count": f.n_used, "expert_shared_count": f.n_shared,
            "expert_width": f.expert_width, "hash_layer_count": f.hash_layers,
            "params_total": s.params_total, "params_routed": s.params_routed, "params_other": s.params_other(),
            "bytes_routed": s.bytes_routed, "bytes_other": s.bytes_other(),
            "expert_layers": s.layers, "active_bytes_per_token": per_token,
            "cache": caches.first().map(ContextCache::json),
            "caches": caches.iter().map(ContextCache::json).collect::<Vec<_>>(),
        });
    }
    report
}
