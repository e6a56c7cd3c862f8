//! `ferrite logits -m MODEL --tokens ... --out FILE.npy`: every position's logits as float32 [n_tokens, n_vocab],
//! the file engines are compared with. Token ids in, no tokenizer needed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::{ArgGroup, Args};
use ferrite::cache::{cache_bytes, CacheSizes};
use ferrite::engine::Logits;
use ferrite::npy;
use ferrite::units::format_bytes;

use super::model_arg::{open_engine, ModelArgs, PlanReport};
use super::Hinted;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").args(["tokens", "tokens_file"])))]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token ids separated by commas: 0,17,42
    #[arg(long, value_name = "IDS", allow_hyphen_values = true, required_unless_present_any = ["tokens_file", "list_devices"])]
    tokens: Option<String>,
    /// A file of token ids, one per line (blank lines and surrounding whitespace are ignored).
    #[arg(long, value_name = "FILE")]
    tokens_file: Option<PathBuf>,
    /// Output NumPy file, float32 [n_tokens, n_vocab]; an existing file is replaced (atomically).
    #[arg(
        short = 'o',
        long,
        value_name = "FILE.npy",
        required_unless_present = "list_devices"
    )]
    out: Option<PathBuf>,
}

/// The prompt's token ids and where each came from, for error messages.
struct Prompt {
    ids: Vec<u32>,
    /// 1-based item number in --tokens, or line number in --tokens-file.
    places: Vec<usize>,
    file: Option<PathBuf>,
}

impl Prompt {
    fn place(&self, i: usize) -> String {
        match &self.file {
            None => format!("item {} of --tokens", self.places[i]),
            Some(f) => format!("{} line {}", f.display(), self.places[i]),
        }
    }

    fn from_list(list: &str) -> Result<Prompt> {
        if list.trim().is_empty() {
            bail!("--tokens is empty: give at least one token id, e.g. --tokens 0,17,42");
        }
        let items = list.split(',').enumerate().map(|(i, s)| (i + 1, s));
        let (ids, places) = parse_ids(items, |n| format!("item {n} of --tokens"))?;
        Ok(Prompt {
            ids,
            places,
            file: None,
        })
    }

    fn from_file(path: &Path) -> Result<Prompt> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        let lines = text
            .lines()
            .enumerate()
            .map(|(i, s)| (i + 1, s))
            .filter(|(_, s)| !s.trim().is_empty());
        let (ids, places) = parse_ids(lines, |n| format!("{} line {n}", path.display()))?;
        if ids.is_empty() {
            bail!(
                "{} has no token ids: expected one id per line",
                path.display()
            );
        }
        Ok(Prompt {
            ids,
            places,
            file: Some(path.to_path_buf()),
        })
    }
}

/// Parses `(place, text)` items as token ids; the error names the first bad item by `describe(place)`.
fn parse_ids<'a>(
    items: impl Iterator<Item = (usize, &'a str)>,
    describe: impl Fn(usize) -> String,
) -> Result<(Vec<u32>, Vec<usize>)> {
    let mut ids = Vec::new();
    let mut places = Vec::new();
    for (place, item) in items {
        let item = item.trim();
        let Ok(id) = item.parse::<u32>() else {
            bail!(
                "{}: {item:?} is not a token id (expected an integer from 0 to {})",
                describe(place),
                u32::MAX
            );
        };
        ids.push(id);
        places.push(place);
    }
    Ok((ids, places))
}

pub fn run(args: &LogitsArgs) -> Result<()> {
    let prompt = match (&args.tokens, &args.tokens_file) {
        (Some(list), _) => Prompt::from_list(list)?,
        (None, Some(file)) => Prompt::from_file(file)?,
        (None, None) => unreachable!("clap requires --tokens or --tokens-file"),
    };
    let Some(out) = &args.out else {
        return Err(Hinted::new("no output file given", "pass --out FILE.npy").into());
    };
    check_out_folder(out)?;

    // The plan reserves the n_tokens x n_vocab logits this command returns (and refuses what cannot fit).
    let model_args = ModelArgs {
        output_rows: prompt.ids.len(),
        ..args.model.clone()
    };
    let engine = open_engine(&model_args, PlanReport::WhenNotable)?;
    let cfg = engine.config();
    let n_vocab = engine.n_vocab();
    if let Some(i) = prompt.ids.iter().position(|&t| t as usize >= n_vocab) {
        bail!(
            "token id {} ({}) is out of range: the model's vocabulary has {n_vocab} tokens (ids 0 to {})",
            prompt.ids[i],
            prompt.place(i),
            n_vocab - 1
        );
    }
    let n_tokens = prompt.ids.len();
    let n_ctx = args.model.n_ctx(&engine);
    if n_tokens > n_ctx {
        bail!(
            "the prompt has {n_tokens} tokens but the context holds {n_ctx} (-c {n_ctx}): raise -c to at least {n_tokens} (the model was trained on {})",
            cfg.n_ctx_train
        );
    }
    let n_ubatch = args.model.ubatch.min(n_ctx);
    let planned = cache_bytes(
        cfg,
        &CacheSizes::new(cfg, n_ctx, n_ubatch, engine.options().cache_type),
    );
    let mut session = engine.session_sized(n_ctx, n_ubatch)?;

    eprintln!(
        "model:   {} ({} layers, vocabulary {n_vocab}, trained context {})",
        engine.path().display(),
        cfg.n_layer,
        cfg.n_ctx_train
    );
    eprintln!(
        "tokens:  {n_tokens}; context {n_ctx} (-c), micro-batch {n_ubatch}, {} threads{}",
        engine.options().n_threads,
        if engine.options().fused_ops {
            ""
        } else {
            ", primitive ops (--no-fused-ops)"
        }
    );
    eprintln!(
        "cache:   {} per token; {} for {n_ctx} tokens ({} allocated)",
        format_bytes(planned.per_token.round() as u64),
        format_bytes(planned.total),
        format_bytes(session.cache_bytes() as u64)
    );

    let start = Instant::now();
    let logits = session.feed(&prompt.ids, Logits::All)?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        logits.len() == n_tokens * n_vocab,
        "the engine returned {} logits, expected {n_tokens} x {n_vocab}",
        logits.len()
    );
    npy::write_f32(out, &[n_tokens, n_vocab], &logits)
        .with_context(|| format!("cannot write the logits to {}", out.display()))?;
    eprintln!(
        "time:    {secs:.3} s, {:.1} tokens/s",
        n_tokens as f64 / secs.max(1e-9)
    );
    eprintln!(
        "wrote:   {} float32 [{n_tokens}, {n_vocab}] ({})",
        out.display(),
        format_bytes((logits.len() * 4) as u64)
    );
    if engine.is_paged() {
        eprintln!("{}", engine.expert_stats());
    }
    Ok(())
}

/// Fails before any work when the output's folder does not exist (the write happens only at the end).
fn check_out_folder(out: &Path) -> Result<()> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        if !dir.is_dir() {
            bail!(
                "cannot write {}: the folder {} does not exist",
                out.display(),
                dir.display()
            );
        }
    }
    if out.is_dir() {
        bail!("cannot write {}: it is a folder", out.display());
    }
    Ok(())
}
