//! Writes a DeepSeek V4 Flash-width `deepseek4` GGUF with random weights, to measure speed at the real matrix sizes
//! (hidden 4096, 256 experts of 2048 top-6, 64 heads of 512, vocabulary 129280; see `TinyConfig::flash`):
//!
//! ```sh
//! cargo run --release --example flash_model -- /tmp/flash2.gguf --layers 2
//! cargo run --release --example flash_model -- OUT.gguf --layers 4 --experts Q2_K --dense Q8_0 --seed 7
//! cargo run --release --example flash_model -- /tmp/flash43.gguf --full --sparse-experts --demo-vocab
//! cargo run --release --example flash_model -- /tmp/flash-attn.gguf --layers 4 --n-expert 8 --expert-ffn 256
//! ```
//!
//! Two layers at Q4_K experts and Q8_0 elsewhere are 8.69 GB (`--dry-run` prints the size of any choice). Tensors are
//! generated and quantized in chunks on every core, so memory stays under 200 MB whatever the size; the time is mostly
//! ggml's Q4_K quantizer: about 30 CPU-minutes for two layers (15 minutes on 2 idle cores). The file appears only when
//! complete; Ctrl-C stops and leaves nothing behind. Exit codes: 0 done, 1 error, 2 bad usage, 130 interrupted.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use ferrite::model::tiny::{
    tiny_model_bytes, write_tiny_model_with, Generation, Progress, TinyConfig, TinyError,
    Vocabulary, WeightTypes,
};
use gguf::GgmlType;

/// Write a DeepSeek V4 Flash-width GGUF with random weights (for benchmarks).
#[derive(Parser, Debug)]
#[command(name = "flash_model")]
struct Args {
    /// Output file (.gguf).
    out: PathBuf,
    /// Layers: layer 0 raw, then ratio 4, 128, 4, ... (one layer: ratio 4); hash routing in the first min(3, N).
    #[arg(long, value_name = "N", default_value_t = 2, conflicts_with = "full")]
    layers: u32,
    /// The published Flash shape: 43 layers with its layer schedule (layers 0-1 raw, then 4 and 128 alternating).
    #[arg(long)]
    full: bool,
    /// Routed experts per layer [default: Flash's 256]; fewer, with --expert-ffn, make a benchmark model whose
    /// attention, compressor, indexer and cache are Flash's and whose experts are small (speed at depth).
    #[arg(long, value_name = "N")]
    n_expert: Option<u32>,
    /// Width of the routed and shared experts [default: Flash's 2048].
    #[arg(long, value_name = "N")]
    expert_ffn: Option<u32>,
    /// Routed experts written as zeros, left as holes of a sparse file: the real layout and file size with only
    /// the other weights on disk (43 layers: about 166 GB apparent, 8 GB on disk). For benchmarks of start-up,
    /// planning, paging and context; the model's answers are meaningless.
    #[arg(long)]
    sparse_experts: bool,
    /// Carry ferrite's demo vocabulary (padded to Flash's 129280 tokens), so `complete` and `chat` take text;
    /// without it the file has no tokenizer (`bench` and `logits` take token ids).
    #[arg(long)]
    demo_vocab: bool,
    /// Type of the routed experts (ffn_{gate,up,down}_exps).
    #[arg(long, value_name = "TYPE", default_value = "Q4_K", value_parser = parse_type)]
    experts: GgmlType,
    /// Type of the attention, compressor, indexer and router weights.
    #[arg(long, value_name = "TYPE", default_value = "Q8_0", value_parser = parse_type)]
    dense: GgmlType,
    /// Type of the shared expert (ffn_{gate,up,down}_shexp).
    #[arg(long, value_name = "TYPE", default_value = "Q8_0", value_parser = parse_type)]
    shared: GgmlType,
    /// Type of token_embd and output.
    #[arg(long, value_name = "TYPE", default_value = "Q8_0", value_parser = parse_type)]
    embed: GgmlType,
    /// Seed of the random weights (same seed and options, same file).
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Threads [default: all cores]; the file does not depend on it.
    #[arg(short = 't', long, value_name = "N", default_value_t = 0)]
    threads: usize,
    /// Replace OUT if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Print the planned file size and stop.
    #[arg(long)]
    dry_run: bool,
}

fn parse_type(s: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(s).ok_or_else(|| {
        format!(
            "unknown ggml type {s:?}; for example Q4_K, Q8_0, Q2_K, IQ2_XXS, MXFP4, F16, BF16, F32"
        )
    })
}

fn gb(bytes: u64) -> String {
    format!(
        "{:.2} GB ({:.2} GiB)",
        bytes as f64 / 1e9,
        bytes as f64 / (1u64 << 30) as f64
    )
}

/// Why the example stopped.
enum Failure {
    /// Bad command line (exit code 2).
    Usage(String),
    Tiny(TinyError),
}

impl From<TinyError> for Failure {
    fn from(e: TinyError) -> Failure {
        Failure::Tiny(e)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("flash_model: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Tiny(TinyError::Cancelled)) => {
            eprintln!(
                "flash_model: interrupted; {} was not written",
                args.out.display()
            );
            ExitCode::from(130)
        }
        Err(Failure::Tiny(e)) => {
            eprintln!("flash_model: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Failure> {
    if !args.full && !(1..=512).contains(&args.layers) {
        return Err(Failure::Usage(format!(
            "--layers {}: expected 1 to 512 (Flash has 43)",
            args.layers
        )));
    }
    let types = WeightTypes {
        dense: args.dense,
        experts: args.experts,
        shared: args.shared,
        embed: args.embed,
    };
    let mut cfg = match args.full {
        true => TinyConfig::flash_published(),
        false => TinyConfig::flash(args.layers),
    }
    .with_types(types);
    if args.demo_vocab {
        cfg.vocab = Vocabulary::Demo;
    }
    if let Some(n) = args.n_expert {
        cfg.n_expert = n;
        cfg.n_expert_used = cfg.n_expert_used.min(n);
    }
    if let Some(n) = args.expert_ffn {
        cfg.expert_ffn = n;
    }
    let planned = match tiny_model_bytes(&cfg) {
        // A weight type ggml cannot store is a bad option.
        Err(TinyError::Config(msg)) => return Err(Failure::Usage(msg)),
        other => other?,
    };
    eprintln!(
        "Flash-width deepseek4, layers: {} (compress ratios {:?}), {} experts of width {} top-{}, experts {}{}, dense {}, shared {}, embeddings {}, seed {}: {}",
        cfg.n_layer,
        cfg.compress_ratios,
        cfg.n_expert,
        cfg.expert_ffn,
        cfg.n_expert_used,
        args.experts,
        if args.sparse_experts { " (zeros, sparse)" } else { "" },
        args.dense,
        args.shared,
        args.embed,
        args.seed,
        gb(planned)
    );
    if args.dry_run {
        println!("{planned}");
        return Ok(());
    }
    let dir = args.out.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir.filter(|d| !d.is_dir()) {
        return Err(Failure::Usage(format!(
            "{}: folder {} does not exist",
            args.out.display(),
            dir.display()
        )));
    }
    if args.out.exists() && !args.overwrite {
        return Err(Failure::Usage(format!(
            "{} already exists (pass --overwrite to replace it)",
            args.out.display()
        )));
    }
    let cancel = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&cancel)) {
        eprintln!(
            "flash_model: cannot catch Ctrl-C ({e}); an interrupted run may leave a temporary file"
        );
    }
    let generation = Generation {
        threads: args.threads,
        zero_experts: args.sparse_experts,
        ..Generation::default()
    };
    let start = Instant::now();
    let mut next_report = 0.0f64;
    let mut progress = |p: &Progress<'_>| {
        let done = p.bytes_done as f64 / p.bytes_total.max(1) as f64;
        if done >= next_report {
            eprintln!(
                "{:5.1}%  {:>4}/{} tensors  {:7.1} s  {}",
                100.0 * done,
                p.tensors_done,
                p.tensors_total,
                start.elapsed().as_secs_f64(),
                p.tensor
            );
            next_report = done + 0.05;
        }
        !cancel.load(Ordering::Relaxed)
    };
    let model = write_tiny_model_with(&args.out, &cfg, args.seed, &generation, &mut progress)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "wrote {}: {} tensors, {} bytes = {} in {:.1} s ({:.0} MB/s)",
        args.out.display(),
        model.n_tensors,
        model.file_bytes,
        gb(model.file_bytes),
        secs,
        model.file_bytes as f64 / 1e6 / secs.max(1e-9)
    );
    if args.sparse_experts {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(&args.out) {
            Ok(m) => println!(
                "on disk: {} (the routed experts are holes)",
                gb(m.blocks() * 512)
            ),
            Err(e) => eprintln!("flash_model: {}: {e}", args.out.display()),
        }
    }
    Ok(())
}
