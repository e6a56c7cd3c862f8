//! Measures the read bandwidth the paged expert store can get from a model's disk: reads a random sample of routed
//! experts (gate, up and down slabs) with ferrite's [`ExpertReader`], the parallel `pread`s the store uses for
//! cache misses, into owned buffers, and prints GB/s.
//!
//! ```sh
//! sync; echo 3 > /proc/sys/vm/drop_caches     # as root: a cold page cache, or the number measures memory
//! cargo run --release --example disk_read -- /tmp/flash2.gguf
//! cargo run --release --example disk_read -- MODEL.gguf --experts 128 -t 8 --batch 6 --json
//! ```
//!
//! The example drops nothing itself: run it on a cold cache (bench/paging.sh does). Reads go through the page cache
//! as the store's do, so experts read once stay cached until memory pressure or a drop evicts them. Buffers take
//! `--batch` experts at a time (default: the whole sample, about 14 MB per Flash expert at Q4_K). Exit codes: 0
//! measured, 1 error, 2 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use ferrite::experts::{ExpertKey, ExpertReader, ReadJob, ReadOptions, SlotBuffers};
use ferrite::units::format_bytes;
use serde_json::json;

// The binary's size parser (`--split 4M` reads as `--mem` does): the library keeps typed values only.
#[allow(dead_code)]
#[path = "../src/cli/size_arg.rs"]
mod size_arg;
use size_arg::parse_size;

/// Measure the disk bandwidth of random expert reads from a GGUF (run on a cold page cache).
#[derive(Parser, Debug)]
#[command(name = "disk_read")]
struct Args {
    /// GGUF model file (any shard of a split model).
    model: PathBuf,
    /// Experts to read, distinct (layer, expert) pairs drawn at random over every layer.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_count)]
    experts: u64,
    /// Reads in flight at most.
    #[arg(short = 't', long, value_name = "N", default_value_t = ferrite::experts::io::DEFAULT_READ_THREADS as u64,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: u64,
    /// Split slabs into reads of at most SIZE (e.g. 4M); 0 reads each slab whole, as the store does by default.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_split)]
    split: u64,
    /// Experts per batch of reads (one `read` call; buffers for this many) [default: all of them].
    #[arg(long, value_name = "N", value_parser = parse_count)]
    batch: Option<u64>,
    /// Seed of the random sample.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Print one JSON object on stdout instead of a line of text.
    #[arg(long)]
    json: bool,
}

fn parse_count(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn parse_split(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        parse_size(s)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("disk_read: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let path = &args.model;
    let model = gguf::Model::open(path)
        .with_context(|| format!("{}: cannot open the model", path.display()))?;
    let opts = ReadOptions {
        threads: usize::try_from(args.threads).context("--threads is too large")?,
        split_bytes: args.split,
        ..ReadOptions::default()
    };
    let reader = ExpertReader::open(&model, opts)
        .with_context(|| format!("{}: cannot read its routed experts", path.display()))?;
    let layout = reader.layout();
    let all: Vec<ExpertKey> = layout
        .layers()
        .flat_map(|l| (0..l.n_expert).map(move |e| ExpertKey::new(l.layer, e)))
        .collect();
    if all.is_empty() {
        bail!(
            "{}: the model has no routed experts (no blk.N.ffn_{{gate,up,down}}_exps tensors)",
            path.display()
        );
    }
    let n = usize::try_from(args.experts)
        .unwrap_or(usize::MAX)
        .min(all.len());
    if (n as u64) < args.experts {
        eprintln!(
            "disk_read: the model has {} experts in all; reading each once",
            all.len()
        );
    }
    let sample = sample(all, n, args.seed);
    let batch = args
        .batch
        .map_or(n, |b| usize::try_from(b).unwrap_or(usize::MAX))
        .min(n);
    let part_bytes = layout.max_slab_bytes();
    let slot = usize::try_from(layout.slot_bytes())
        .context("an expert is larger than memory can address")?;
    let pool_bytes = slot
        .checked_mul(batch)
        .context("the buffers for one batch are larger than memory can address")?;
    let mut pool = Vec::new();
    pool.try_reserve_exact(pool_bytes).with_context(|| {
        format!(
            "cannot allocate {} of read buffers (try a smaller --batch)",
            format_bytes(pool_bytes as u64)
        )
    })?;
    pool.resize(pool_bytes, 0u8);

    let start = Instant::now();
    let (mut bytes, mut reads) = (0u64, 0u64);
    for keys in sample.chunks(batch) {
        let jobs = keys
            .iter()
            .zip(pool.chunks_exact_mut(slot))
            .map(|(&key, buf)| {
                let dest = SlotBuffers::packed(buf, part_bytes)
                    .context("a read buffer is smaller than an expert")?;
                Ok(ReadJob { key, dest })
            })
            .collect::<Result<Vec<_>>>()?;
        let report = reader
            .read(jobs)
            .with_context(|| format!("{}: reading experts", path.display()))?;
        bytes += report.bytes;
        reads += report.reads;
    }
    let seconds = start.elapsed().as_secs_f64();
    let rate = bytes as f64 / seconds.max(1e-9);

    if args.json {
        let report = json!({
            "model": path,
            "experts": n,
            "experts_in_model": layout.layers().map(|l| u64::from(l.n_expert)).sum::<u64>(),
            "layers": layout.layers().count(),
            "seed": args.seed,
            "threads": opts.threads,
            "split_bytes": opts.split_bytes,
            "batch": batch,
            "bytes": bytes,
            "reads": reads,
            "seconds": seconds,
            "bytes_per_second": rate,
        });
        println!("{report}");
    } else {
        println!(
            "{n} random experts of {}: {} in {reads} reads ({} threads, {}, {} experts per batch): {seconds:.2} s, {:.3} GB/s",
            path.display(),
            format_bytes(bytes),
            opts.threads,
            if opts.split_bytes == 0 {
                "whole slabs".to_string()
            } else {
                format!("reads of at most {}", format_bytes(opts.split_bytes))
            },
            batch,
            rate / 1e9
        );
    }
    Ok(())
}

/// `n` of `keys` in random order (a partial Fisher-Yates shuffle driven by SplitMix64; the same seed, the same sample).
fn sample(mut keys: Vec<ExpertKey>, n: usize, seed: u64) -> Vec<ExpertKey> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in 0..n {
        let left = (keys.len() - i) as u64;
        let j = i + (next() % left) as usize;
        keys.swap(i, j);
    }
    keys.truncate(n);
    keys
}
