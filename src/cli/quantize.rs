//! `ferrite quantize IN OUT --type T`: a Hugging Face DeepSeek V4 checkpoint or a `deepseek4` GGUF to a GGUF of a
//! named recipe, in one streaming pass with bounded memory (quantize::convert does the work; this file is the
//! command line, the progress display and the summary).

use std::cell::Cell;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ferrite::ggml::GgmlCodec;
use ferrite::units::format_bytes as human;
use gguf::{GgmlType, Writer};
use indicatif::{ProgressBar, ProgressStyle};
use quantize::convert::{self, ConvertError, Input, Item, Options, Overrides, Plan, Progress};
use quantize::imatrix::ImatrixData;
use quantize::recipe::{Recipe, RECIPES};

use super::bench::peak_rss;
use super::size_arg::parse_size;
use super::Hinted;

#[derive(Args, Debug)]
#[command(after_help = recipes_help())]
pub struct QuantizeArgs {
    /// A Hugging Face DeepSeek V4 folder (config.json, tokenizer.json, safetensors shards) or a deepseek4 GGUF
    /// (any shard of a split one).
    input: PathBuf,
    /// The GGUF to write (with --split-max-size: OUT-00001-of-0000N.gguf, ...).
    output: PathBuf,
    /// Recipe: Q4_K_M, Q8_0, Q2_K, IQ2_XXS, MXFP4, F16, BF16 or F32 (see below).
    #[arg(long = "type", value_name = "RECIPE", value_parser = parse_recipe)]
    recipe: Recipe,
    /// Type of the routed experts (gate, up and down), e.g. Q4_K, Q2_K, IQ2_XXS, MXFP4, Q8_0.
    #[arg(long, value_name = "TYPE", value_parser = parse_type)]
    experts: Option<GgmlType>,
    /// Type of the attention, compressor, indexer and MTP projection weights.
    #[arg(long, value_name = "TYPE", value_parser = parse_type)]
    attention: Option<GgmlType>,
    /// Type of the shared expert.
    #[arg(long, value_name = "TYPE", value_parser = parse_type)]
    shared: Option<GgmlType>,
    /// Type of output.weight (the head).
    #[arg(long = "output", value_name = "TYPE", value_parser = parse_type)]
    output_type: Option<GgmlType>,
    /// Type of token_embd.weight.
    #[arg(long, value_name = "TYPE", value_parser = parse_type)]
    embeddings: Option<GgmlType>,
    /// Importance matrix from llama.cpp's llama-imatrix (GGUF or legacy .dat), used by the K- and IQ-types.
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
    /// Write shards of at most SIZE each (e.g. 50G, 4000M), named as llama.cpp's gguf-split names them.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    split_max_size: Option<u64>,
    /// Print the plan (every tensor: source type -> target type, sizes, the file size) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replace OUT when it exists.
    #[arg(long)]
    overwrite: bool,
    /// Leave out the checkpoint's MTP (next-token prediction) block.
    #[arg(long)]
    no_mtp: bool,
    /// general.name of the output (default: the input's).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long, value_name = "N")]
    threads: Option<usize>,
}

fn recipes_help() -> String {
    let mut s = String::from(
        "Recipes (1-D tensors, hyper-connection mixers, APE, sinks and the router stay F32):\n",
    );
    for (name, what) in RECIPES {
        s.push_str(&format!("  {name:<8} {what}\n"));
    }
    s
}

fn parse_recipe(s: &str) -> std::result::Result<Recipe, String> {
    Recipe::named(s).ok_or_else(|| {
        let names: Vec<&str> = RECIPES.iter().map(|r| r.0).collect();
        format!("unknown recipe {s:?}; expected one of {}", names.join(", "))
    })
}

fn parse_type(s: &str) -> std::result::Result<GgmlType, String> {
    match GgmlType::from_name(s) {
        Some(t) if ferrite::ggml::can_quantize_to(t) => Ok(t),
        Some(t) => Err(format!("ggml cannot make {t} weights")),
        None => Err(format!(
            "unknown ggml type {s:?} (e.g. Q4_K, Q8_0, Q2_K, IQ2_XXS, MXFP4, F16, BF16, F32)"
        )),
    }
}

pub fn run(args: &QuantizeArgs) -> Result<()> {
    let start = Instant::now();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let input = Input::open(&args.input).map_err(hint_input)?;
    let imatrix = match &args.imatrix {
        Some(p) => Some(
            ImatrixData::read(p)
                .with_context(|| format!("cannot read the importance matrix {}", p.display()))?,
        ),
        None => None,
    };
    let opts = Options {
        recipe: args.recipe.clone(),
        overrides: Overrides {
            experts: args.experts,
            attention: args.attention,
            shared: args.shared,
            output: args.output_type,
            embeddings: args.embeddings,
        },
        imatrix: imatrix.as_ref(),
        keep_mtp: !args.no_mtp,
        name: args.name.clone(),
    };
    let codec = GgmlCodec;
    let plan = convert::plan(&input, &opts, &codec).map_err(hint_input)?;
    let writer = plan.writer()?;
    let shards = match args.split_max_size {
        Some(max) => writer.split_by_size(max)?,
        None => vec![writer],
    };
    let paths = Writer::shard_paths(&args.output, shards.len())?;
    let total = Writer::planned_total_bytes(&shards)?;

    let mut err = std::io::stderr().lock();
    writeln!(err, "ferrite quantize: {}", input.describe())?;
    writeln!(
        err,
        "ferrite quantize: recipe {} -> {} ({} tensors, {} in {} file(s))",
        args.recipe.name,
        args.output.display(),
        plan.items.len(),
        human(total),
        shards.len()
    )?;
    for note in &plan.notes {
        writeln!(err, "ferrite quantize: note: {note}")?;
    }
    drop(err);

    if args.dry_run {
        print_plan(&plan, &shards, &paths, total)?;
        return Ok(());
    }
    if !args.overwrite {
        if let Some(p) = paths.iter().find(|p| p.exists()) {
            return Err(Hinted::new(
                format!("{} already exists", p.display()),
                "pass --overwrite to replace it, or choose another output name",
            )
            .into());
        }
    }

    let cancel: Arc<AtomicBool> = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&cancel))
        .context("cannot install the Ctrl-C handler")?;
    let progress = Display::new(plan.items.len(), plan.input_bytes());
    let result = convert::execute(
        &plan,
        &input,
        &codec,
        &shards,
        &args.output,
        args.overwrite,
        threads,
        &progress,
        &cancel,
    );
    progress.finish();
    let files = match result {
        Ok(files) => files,
        Err(ConvertError::Cancelled) => {
            eprintln!("ferrite quantize: interrupted (Ctrl-C); nothing was written, the temporary output was removed");
            std::process::exit(130);
        }
        Err(e @ ConvertError::DiskFull { .. }) => {
            return Err(Hinted::new(
                e.to_string(),
                "free some space or write to another disk (see --dry-run for the size)",
            )
            .into())
        }
        Err(e) => return Err(e.into()),
    };
    let secs = start.elapsed().as_secs_f64();
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let stale = Writer::stale_outputs(&args.output, &paths);
    if !stale.is_empty() {
        let names: Vec<String> = stale.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "ferrite quantize: note: {} file(s) of an earlier output of this name with another split are still there: \
             {} (a loader given one of them reads the old model; remove them)",
            stale.len(),
            names.join(", ")
        );
    }
    let written: u64 = files.iter().map(|(_, l)| l.total_bytes).sum();
    let params: u64 = plan
        .items
        .iter()
        .map(|i| i.dims.iter().product::<u64>())
        .sum();
    let tensor_bytes: u64 = plan.items.iter().map(Item::bytes).sum();
    let input_bytes = plan.input_bytes();
    eprintln!(
        "ferrite quantize: wrote {} ({} in {} file(s), {:.2} bits per weight in the tensors) in {:.1} s: {} of input at {:.2} GB/s, \
         {threads} thread(s), peak RSS {}",
        files[0].0.display(),
        human(written),
        files.len(),
        tensor_bytes as f64 * 8.0 / params.max(1) as f64,
        secs,
        human(input_bytes),
        input_bytes as f64 / secs.max(1e-9) / 1e9,
        peak_rss().map_or("unknown".into(), human),
    );
    Ok(())
}

/// Adds the hint a user needs to a failed open or plan.
fn hint_input(e: ConvertError) -> anyhow::Error {
    let hint = match &e {
        ConvertError::Hf(_) | ConvertError::Checkpoint(_) => {
            "IN must be a complete Hugging Face DeepSeek V4 folder (config.json, model.safetensors.index.json and every \
             shard it names) or a deepseek4 GGUF; re-download the file named above if it is damaged"
        }
        ConvertError::Gguf(_) => "IN is not a readable GGUF; check the file (ferrite info IN) or re-download it",
        ConvertError::Input { .. } => "IN must be a DeepSeek V4 Hugging Face folder or a deepseek4 GGUF",
        ConvertError::Tensor { .. } => "choose another type for this family (--experts, --attention, ...) or recipe",
        _ => return e.into(),
    };
    Hinted::new(format!("cannot quantize: {e}"), hint).into()
}

fn print_plan(plan: &Plan, shards: &[Writer], paths: &[PathBuf], total: u64) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let width = plan
        .items
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(4)
        .max(6);
    writeln!(
        out,
        "{:<width$}  {:<18}  {:>7} -> {:<7}  {:<8}  {:>11}  {:>11}  note",
        "tensor", "shape", "source", "target", "method", "source size", "size"
    )?;
    for it in &plan.items {
        let shape = it
            .dims
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" x ");
        writeln!(
            out,
            "{:<width$}  {:<18}  {:>7} -> {:<7}  {:<8}  {:>11}  {:>11}  {}",
            it.name,
            shape,
            it.source_type,
            it.ty.name(),
            it.method.name(),
            human(it.source_bytes),
            human(it.bytes()),
            it.note.as_deref().unwrap_or("")
        )?;
    }
    for (shard, path) in shards.iter().zip(paths) {
        writeln!(
            out,
            "file {}: {} tensors, {} bytes",
            path.display(),
            shard.tensors().len(),
            shard.plan()?.total_bytes
        )?;
    }
    writeln!(
        out,
        "total: {} tensors, {total} bytes ({}), input {}",
        plan.items.len(),
        human(total),
        human(plan.input_bytes())
    )?;
    Ok(())
}

/// Progress: a bar on a terminal, one line per tensor otherwise.
struct Display {
    bar: Option<ProgressBar>,
    n_tensors: usize,
    total: u64,
    done: Cell<u64>,
    start: Instant,
}

impl Display {
    fn new(n_tensors: usize, total: u64) -> Display {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Display {
            bar,
            n_tensors,
            total,
            done: Cell::new(0),
            start: Instant::now(),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Display {
    fn tensor(&self, index: usize, item: &Item) {
        let what = format!(
            "[{:>w$}/{}] {} {} -> {}",
            index + 1,
            self.n_tensors,
            item.name,
            item.source_type,
            item.ty.name(),
            w = self.n_tensors.to_string().len()
        );
        match &self.bar {
            Some(bar) => bar.set_message(what),
            None => {
                let secs = self.start.elapsed().as_secs_f64();
                let done = self.done.get();
                let rate = done as f64 / secs.max(1e-9);
                let left = if done > 0 {
                    (self.total - done.min(self.total)) as f64 / rate
                } else {
                    f64::NAN
                };
                let eta = if left.is_finite() {
                    format!("{left:.0} s left")
                } else {
                    "-".into()
                };
                eprintln!("{what}  ({:.0} MB/s, {eta})", rate / 1e6);
            }
        }
    }

    fn advance(&self, input_bytes: u64) {
        self.done.set(self.done.get() + input_bytes);
        if let Some(bar) = &self.bar {
            bar.inc(input_bytes);
        }
    }
}
