//! The generation loop `complete` and `chat` share: the sampler flags, Ctrl-C as a flag the loop polls, prompt
//! processing in micro-batches, then sample -> stream -> feed until an end-of-generation token, the token limit, a
//! full context or Ctrl-C; and the timings and expert-store numbers both commands report.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Args;
use ferrite::engine::{Engine, Logits, Session};
use ferrite::experts::StatsSnapshot;
use ferrite::sampler::{Sampler, SamplerConfig};
use ferrite::tokenizer::{Tokenizer, TokenizerError};

use super::Hinted;

/// Sampling flags, with llama.cpp's spellings and meanings.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature; 0 = greedy (always the most likely token).
    #[arg(
        long = "temp",
        value_name = "T",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub temp: f32,
    /// Keep only the K most likely tokens; 0 = all.
    #[arg(long = "top-k", value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Keep the most likely tokens up to a total probability P; 1.0 = all.
    #[arg(long = "top-p", value_name = "P", default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one; 0 = off.
    #[arg(long = "min-p", value_name = "P", default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalise repeating the last --repeat-last-n tokens; 1.0 = off.
    #[arg(long = "repeat-penalty", value_name = "X", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at; 0 = off.
    #[arg(long = "repeat-last-n", value_name = "N", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Random seed [default: a random one, printed on stderr].
    #[arg(short = 's', long = "seed", value_name = "N")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The sampler configuration; the seed is `--seed` or a fresh random one.
    pub fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed.unwrap_or_else(random_seed),
        }
    }
}

/// A seed from the clock and the process id (llama.cpp's default is a random seed too).
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    // splitmix64 finaliser, so nearby clocks give unrelated seeds; kept in 32 bits so it is easy to retype.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) & 0xffff_ffff
}

/// Ctrl-C as a flag: the first SIGINT sets it (the loop stops at the next token), a second one while it is still
/// set exits with code 130 at once (for a prompt that takes long to process).
pub fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let sigint = signal_hook::consts::SIGINT;
    // Registered first, so it sees the flag as it was before this signal.
    signal_hook::flag::register_conditional_shutdown(sigint, 130, Arc::clone(&flag))
        .context("cannot install the Ctrl-C handler")?;
    signal_hook::flag::register(sigint, Arc::clone(&flag))
        .context("cannot install the Ctrl-C handler")?;
    Ok(flag)
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The model produced an end-of-generation token (not streamed, not in `Generation::tokens`).
    EndOfGeneration(u32),
    /// `-n` tokens were generated.
    TokenLimit,
    /// The context is full.
    ContextFull,
    /// Ctrl-C.
    Interrupted,
}

impl Stop {
    pub fn describe(self) -> &'static str {
        match self {
            Stop::EndOfGeneration(_) => "end of generation",
            Stop::TokenLimit => "token limit (-n) reached",
            Stop::ContextFull => "context full (raise -c)",
            Stop::Interrupted => "interrupted",
        }
    }
}

/// Counts and times of one prompt + answer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Prompt tokens processed (the ones the cache did not already hold).
    pub n_prompt: usize,
    pub prompt_time: Duration,
    /// Tokens generated (the end-of-generation token included: it was sampled).
    pub n_gen: usize,
    pub gen_time: Duration,
}

fn per_second(n: usize, t: Duration) -> f64 {
    let s = t.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

impl Timings {
    pub fn prompt_speed(&self) -> f64 {
        per_second(self.n_prompt, self.prompt_time)
    }
    pub fn gen_speed(&self) -> f64 {
        per_second(self.n_gen, self.gen_time)
    }
    /// `prompt: N tokens in S s (X tok/s); generation: ...`
    pub fn summary(&self) -> String {
        format!(
            "prompt: {} tokens in {:.2} s ({:.1} tok/s); generation: {} tokens in {:.2} s ({:.1} tok/s)",
            self.n_prompt,
            self.prompt_time.as_secs_f64(),
            self.prompt_speed(),
            self.n_gen,
            self.gen_time.as_secs_f64(),
            self.gen_speed()
        )
    }
}

/// The expert store's counters over the prompt and over the generated tokens of one call.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExpertPhases {
    pub prompt: StatsSnapshot,
    pub generation: StatsSnapshot,
}

/// What one call of [`generate`] produced.
#[derive(Debug)]
pub struct Generation {
    /// The generated tokens, in order, without the end-of-generation token.
    pub tokens: Vec<u32>,
    pub stop: Stop,
    pub timings: Timings,
    pub experts: ExpertPhases,
}

/// How one answer is generated.
pub struct GenerateRequest<'a> {
    /// Tokens to process before generating (not yet in the session).
    pub prompt: &'a [u32],
    /// Most tokens to generate; `None` = until end of generation or a full context.
    pub max_tokens: Option<usize>,
    pub interrupt: &'a AtomicBool,
    /// Prompt tokens per `feed` call (the session's micro-batch size): Ctrl-C is noticed between calls.
    pub chunk: usize,
}

/// Processes `req.prompt` after the session's tokens, then generates, handing each piece of complete UTF-8 text to
/// `emit` as soon as it is known. The last generated token is fed to the session too, so the session holds
/// prompt + answer (not the end-of-generation token). An `emit` error (a closed stdout) ends the call with it.
/// Ctrl-C during the prompt returns `Stop::Interrupted` with no tokens; the session then holds part of the prompt.
pub fn generate(
    session: &mut Session<'_>,
    tokenizer: &Tokenizer,
    sampler: &mut Sampler,
    req: &GenerateRequest<'_>,
    emit: &mut dyn FnMut(&str) -> std::io::Result<()>,
) -> Result<Generation> {
    let interrupted = || req.interrupt.load(Ordering::Relaxed);
    let engine = session.engine();
    let mut timings = Timings {
        n_prompt: req.prompt.len(),
        ..Timings::default()
    };
    let mut experts = ExpertPhases::default();
    let done = |tokens: Vec<u32>, stop: Stop, timings: Timings, experts: ExpertPhases| {
        Ok(Generation {
            tokens,
            stop,
            timings,
            experts,
        })
    };

    // The prompt, a micro-batch at a time so Ctrl-C is noticed between them.
    let start = Instant::now();
    let before = engine.expert_stats();
    let mut logits = Vec::new();
    for chunk in req.prompt.chunks(req.chunk.max(1)) {
        if interrupted() {
            timings.prompt_time = start.elapsed();
            experts.prompt = engine.expert_stats().since(&before);
            return done(Vec::new(), Stop::Interrupted, timings, experts);
        }
        logits = session.feed(chunk, Logits::Last)?;
    }
    timings.prompt_time = start.elapsed();
    let after_prompt = engine.expert_stats();
    experts.prompt = after_prompt.since(&before);
    if logits.is_empty() {
        anyhow::bail!("internal error: generation needs at least one prompt token to process");
    }

    let start = Instant::now();
    let mut decoder = tokenizer.stream_decoder();
    let mut tokens = Vec::new();
    let stop = loop {
        if interrupted() {
            break Stop::Interrupted;
        }
        if req.max_tokens.is_some_and(|n| tokens.len() >= n) {
            break Stop::TokenLimit;
        }
        if session.n_past() >= session.n_ctx() {
            break Stop::ContextFull;
        }
        let id = sampler.sample(&logits, session.tokens());
        timings.n_gen += 1;
        if tokenizer.is_eog(id) {
            break Stop::EndOfGeneration(id);
        }
        tokens.push(id);
        let text = decoder.push(id);
        if !text.is_empty() {
            emit(&text)?;
        }
        logits = session.feed(&[id], Logits::Last)?;
    };
    let rest = decoder.flush();
    if !rest.is_empty() {
        emit(&rest)?;
    }
    timings.gen_time = start.elapsed();
    experts.generation = engine.expert_stats().since(&after_prompt);
    done(tokens, stop, timings, experts)
}

/// The model's vocabulary, with a hint when the GGUF has none.
pub fn load_tokenizer(engine: &Engine) -> Result<&Tokenizer> {
    engine
        .tokenizer()
        .map_err(|e| tokenizer_error(e, engine.path()))
}

/// The tokenizer of `model` (read from `path`), with a hint when the model has no vocabulary.
pub fn tokenizer_of(model: &gguf::Model, path: &std::path::Path) -> Result<Tokenizer> {
    Tokenizer::from_gguf(model).map_err(|e| tokenizer_error(e, path))
}

/// `e` with the file it is about, and a hint when the model has no vocabulary.
fn tokenizer_error(e: TokenizerError, path: &std::path::Path) -> anyhow::Error {
    let path = path.display().to_string();
    match e {
        TokenizerError::NoVocabulary { .. } => Hinted::new(
            format!("{path}: {e}"),
            "use a GGUF converted with its tokenizer, or `-m demo`; `ferrite logits --tokens` runs this model from ids",
        )
        .into(),
        _ => anyhow::Error::new(e).context(format!("cannot read the vocabulary of {path}")),
    }
}

/// `[1, 2, 3]`
pub fn id_list(ids: &[u32]) -> String {
    let list: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", list.join(", "))
}
