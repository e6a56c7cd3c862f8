//! `ferrite perplexity -m MODEL -f TEXT [-c 512]`: the perplexity of a model over a text, computed as llama.cpp's
//! `llama-perplexity` computes it, so the numbers of the two tools can be compared.
//!
//! The method (llama.cpp's `tools/perplexity`): the whole text is tokenized once (BOS first when the vocabulary adds
//! one, no special-token parsing), cut into chunks of `-c` tokens (the remainder is dropped), and every chunk is
//! evaluated from an empty cache, its first token replaced by BOS when the vocabulary adds one. Only the second half
//! of each chunk is scored, so every scored token sees at least `c/2` tokens of context: the logits at positions
//! `c/2 ..= c-2` predict the tokens at `c/2+1 ..= c-1`, each scored by its negative log-probability (log-softmax in
//! f64). The perplexity is `exp(mean)`, its uncertainty `ppl * sqrt(var / (count - 1))` with `var` the variance of
//! the per-token values, llama.cpp's error propagation.
//!
//! One difference: llama.cpp refuses a text shorter than two chunks; ferrite needs one.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result};
use clap::Args;
use ferrite::engine::Logits;
use serde_json::json;

use super::model_arg::{
    device_plan_json, open_engine, plan_json, stats_json, ModelArgs, PlanReport,
};
use super::Hinted;

/// `-c` when not given (llama-perplexity's default).
const DEFAULT_CTX: usize = 512;
/// The smallest chunk with a scored token: `c/2 <= c-2`.
const MIN_CTX: usize = 3;

#[derive(Args, Debug)]
#[command(
    after_help = "-c defaults to 512 here (llama-perplexity's default), not to the 4096 of the other commands."
)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score: a UTF-8 file, or - for standard input (one trailing line break is dropped, as llama.cpp does).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        allow_hyphen_values = true,
        required_unless_present = "list_devices"
    )]
    pub file: Option<PathBuf>,
    /// Tokens per decode call (llama.cpp's -b): the micro-batch is the smaller of this and --ubatch.
    #[arg(short = 'b', long = "batch-size", value_name = "N", value_parser = parse_positive)]
    pub batch: Option<usize>,
    /// Score at most N chunks [default: all the text holds].
    #[arg(long = "chunks", value_name = "N", value_parser = parse_positive)]
    pub chunks: Option<usize>,
    /// Print one JSON object on stdout instead of the progress line and the estimate (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Running sums of the per-token negative log-likelihoods.
#[derive(Clone, Copy, Debug, Default)]
pub struct NllSums {
    pub count: usize,
    pub nll: f64,
    pub nll2: f64,
}

impl NllSums {
    /// Adds the token `target` scored by one row of logits.
    pub fn add(&mut self, logits: &[f32], target: usize) {
        let v = neg_log_softmax(logits, target);
        self.count += 1;
        self.nll += v;
        self.nll2 += v * v;
    }

    pub fn ppl(&self) -> f64 {
        (self.nll / self.count as f64).exp()
    }

    /// llama.cpp's uncertainty of the perplexity; `None` below two tokens or without spread.
    pub fn ppl_error(&self) -> Option<f64> {
        if self.count < 2 {
            return None;
        }
        let n = self.count as f64;
        let mean = self.nll / n;
        let var = self.nll2 / n - mean * mean;
        (var > 0.0).then(|| (var / (n - 1.0)).sqrt() * self.ppl())
    }
}

/// `-log softmax(logits)[target]` in f64.
fn neg_log_softmax(logits: &[f32], target: usize) -> f64 {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    sum.ln() - (f64::from(logits[target]) - max)
}

pub fn run(args: &PerplexityArgs) -> Result<()> {
    let text = read_text(args)?;
    // -c defaults to 512 here (llama-perplexity's default), not to the other commands' 4096; the memory plan
    // reserves the context this command uses.
    let ctx_args = ModelArgs {
        ctx_size: Some(args.model.ctx_size.unwrap_or(DEFAULT_CTX)),
        ..args.model.clone()
    };
    let engine = open_engine(&ctx_args, PlanReport::WhenNotable)?;
    let tokenizer = super::generate::load_tokenizer(&engine)?;
    let n_ctx = ctx_args.n_ctx(&engine);
    if n_ctx < MIN_CTX {
        return Err(Hinted::new(
            format!("-c {n_ctx} leaves no token to score: perplexity scores positions c/2 to c-2 of each chunk"),
            format!("use -c {MIN_CTX} or more (llama.cpp's default is {DEFAULT_CTX})"),
        )
        .into());
    }
    let n_ubatch = args
        .model
        .ubatch
        .min(args.batch.unwrap_or(usize::MAX))
        .min(n_ctx);

    let bos = if tokenizer.add_bos() {
        tokenizer.bos()
    } else {
        None
    };
    let mut tokens: Vec<u32> = bos.into_iter().collect();
    tokens.extend(tokenizer.encode(&text, false));
    drop(text);
    let available = tokens.len() / n_ctx;
    if available == 0 {
        return Err(Hinted::new(
            format!(
                "the text is too short: it has {} tokens, perplexity with -c {n_ctx} needs at least {n_ctx} (one chunk)",
                tokens.len()
            ),
            format!(
                "use a longer text, or a smaller context (-c {} or less)",
                tokens.len().max(MIN_CTX)
            ),
        )
        .into());
    }
    let n_chunks = args.chunks.map_or(available, |c| c.min(available));
    let first = n_ctx / 2;
    let per_chunk = n_ctx - 1 - first;

    eprintln!(
        "ferrite: {} tokens ({} chunks of {n_ctx} available, scoring {n_chunks}); {per_chunk} tokens scored per chunk \
         (positions {first}..={}); micro-batch {n_ubatch}, {} threads{}",
        tokens.len(),
        available,
        n_ctx - 2,
        engine.options().n_threads,
        if bos.is_some() { ", BOS first in each chunk" } else { "" }
    );

    let mut session = engine.session_sized(n_ctx, n_ubatch)?;
    let n_vocab = engine.n_vocab();
    let mut sums = NllSums::default();
    let mut running = Vec::with_capacity(n_chunks);
    let mut chunk_ppl = Vec::with_capacity(n_chunks);
    let mut stdout = std::io::stdout().lock();
    let start = Instant::now();
    for c in 0..n_chunks {
        let chunk_start = Instant::now();
        let mut chunk: Vec<u32> = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        session.reset()?;
        let mut this = NllSums::default();
        for (j, piece) in chunk.chunks(n_ubatch).enumerate() {
            let p0 = j * n_ubatch;
            if p0 + piece.len() <= first {
                // Context only: no scored position in this micro-batch.
                session.feed(piece, Logits::Last)?;
                continue;
            }
            let logits = session.feed(piece, Logits::All)?;
            anyhow::ensure!(
                logits.len() == piece.len() * n_vocab,
                "the engine returned {} logits, expected {} x {n_vocab}",
                logits.len(),
                piece.len()
            );
            for (r, row) in logits.chunks(n_vocab).enumerate() {
                let pos = p0 + r;
                if pos >= first && pos + 1 < n_ctx {
                    this.add(row, chunk[pos + 1] as usize);
                }
            }
        }
        sums.count += this.count;
        sums.nll += this.nll;
        sums.nll2 += this.nll2;
        running.push(sums.ppl());
        chunk_ppl.push(this.ppl());
        if c == 0 {
            let secs = chunk_start.elapsed().as_secs_f64();
            let eta = secs * (n_chunks - 1) as f64;
            eprintln!(
                "ferrite: {secs:.2} s per chunk, ETA {} min {:.0} s",
                (eta / 60.0).floor(),
                eta % 60.0
            );
        }
        let progress = format!("[{}]{:.4},", c + 1, sums.ppl());
        if args.json {
            eprint!("{progress}");
        } else {
            write!(stdout, "{progress}")?;
            stdout.flush()?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let ppl = sums.ppl();
    let error = sums.ppl_error();
    if args.json {
        eprintln!();
        let mean = sums.nll / sums.count as f64;
        let report = json!({
            "model": engine.path(),
            "n_ctx": n_ctx,
            "n_ubatch": n_ubatch,
            "threads": engine.options().n_threads,
            "add_bos": bos.is_some(),
            "n_tokens": tokens.len(),
            "chunks_available": available,
            "n_chunks": n_chunks,
            "n_scored": sums.count,
            "nll_mean": mean,
            "ppl": ppl,
            "ppl_error": error,
            "running_ppl": running,
            "chunk_ppl": chunk_ppl,
            "seconds": secs,
            "tokens_per_second": (n_chunks * n_ctx) as f64 / secs.max(1e-9),
            "memory_plan": plan_json(engine.memory_plan()),
            "device_plan": device_plan_json(engine.device_plan()),
            "expert_stats": stats_json(&engine.expert_stats())?,
        });
        writeln!(stdout, "{report}")?;
    } else {
        writeln!(stdout)?;
        match error {
            Some(e) => writeln!(stdout, "Final estimate: PPL = {ppl:.4} +/- {e:.5}")?,
            None => writeln!(stdout, "Final estimate: PPL = {ppl:.4} +/- nan")?,
        }
    }
    stdout.flush()?;
    eprintln!(
        "ferrite: {} chunks, {} tokens scored in {secs:.2} s ({:.1} tokens/s evaluated)",
        n_chunks,
        sums.count,
        (n_chunks * n_ctx) as f64 / secs.max(1e-9)
    );
    if engine.is_paged() {
        eprintln!("ferrite: {}", engine.expert_stats());
    }
    Ok(())
}

/// The text of `-f FILE` (or standard input for `-f -`), with one trailing `\n` dropped as llama.cpp's `-f` does.
fn read_text(args: &PerplexityArgs) -> Result<String> {
    let Some(file) = &args.file else {
        return Err(
            Hinted::new("no text given", "pass -f FILE, or -f - for standard input").into(),
        );
    };
    let stdin = file.as_os_str() == "-";
    let bytes = if stdin {
        let mut input = std::io::stdin().lock();
        if input.is_terminal() {
            eprintln!("ferrite: reading the text from standard input (end it with Ctrl-D)");
        }
        let mut bytes = Vec::new();
        input
            .read_to_end(&mut bytes)
            .context("cannot read the text from standard input")?;
        bytes
    } else {
        let path = file;
        if path.is_dir() {
            return Err(Hinted::new(
                format!("{} is a folder, not a text file", path.display()),
                "pass a UTF-8 text file with -f, or - to read standard input",
            )
            .into());
        }
        std::fs::read(path).map_err(|e| {
            Hinted::new(
                format!("cannot read the text file {}: {e}", path.display()),
                "check the path; -f - reads the text from standard input",
            )
        })?
    };
    let source = if stdin {
        "standard input".to_string()
    } else {
        file.display().to_string()
    };
    let mut text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{source} is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.ends_with('\n') {
        text.pop();
    }
    if text.is_empty() {
        return Err(Hinted::new(
            format!("{source} is empty: there is no text to score"),
            "give a text file with -f FILE (llama.cpp uses wikitext-2's wiki.test.raw)",
        )
        .into());
    }
    Ok(text)
}
