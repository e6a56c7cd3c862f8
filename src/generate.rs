//! The generation loop every front end shares (`complete`, `chat`, a server): a prompt's tokens processed in
//! micro-batches, then sample -> stream text -> feed until a stop condition (an end-of-generation token, the token
//! limit, a full context, an interrupt flag, or the caller); with the timings and expert-store numbers of both phases.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::engine::{Logits, Session};
use crate::experts::StatsSnapshot;
use crate::sampler::Sampler;

/// How one answer is generated.
#[derive(Clone, Copy, Default)]
pub struct GenerateOptions<'a> {
    /// Most tokens to generate; `None`: until an end-of-generation token or a full context.
    pub max_tokens: Option<usize>,
    /// Polled between the prompt's micro-batches and between tokens: once set, generation stops with
    /// [`StopReason::Interrupted`] (a Ctrl-C handler, a server's cancel).
    pub interrupt: Option<&'a AtomicBool>,
    /// Called once the whole prompt is processed, before the first token is sampled (`complete --prompt-cache`
    /// saves the session there).
    pub after_prompt: Option<&'a dyn Fn(&Session<'_>)>,
}

impl std::fmt::Debug for GenerateOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateOptions")
            .field("max_tokens", &self.max_tokens)
            .field("interrupt", &self.interrupt)
            .field("after_prompt", &self.after_prompt.is_some())
            .finish()
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token (not streamed, not in [`GenerateResult::tokens`]).
    EndOfGeneration(u32),
    /// [`GenerateOptions::max_tokens`] tokens were generated.
    TokenLimit,
    /// The session's context is full.
    ContextFull,
    /// The interrupt flag was set.
    Interrupted,
    /// The `on_piece` callback returned [`ControlFlow::Break`].
    Cancelled,
}

/// Counts and times of one prompt + answer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Prompt tokens processed (the ones the session did not already hold).
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
    /// Prompt tokens per second.
    pub fn prompt_speed(&self) -> f64 {
        per_second(self.n_prompt, self.prompt_time)
    }

    /// Generated tokens per second.
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
pub struct GenerateResult {
    /// The generated tokens, in order, without the end-of-generation token.
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
    pub timings: Timings,
    pub experts: ExpertPhases,
}

/// Processes `prompt` after the session's tokens (a micro-batch at a time), then generates with `sampler`, handing
/// each piece of complete UTF-8 text to `on_piece` as soon as it is known. Every generated token is fed to the
/// session, so afterwards it holds prompt + answer (not the end-of-generation token).
///
/// An interrupt during the prompt returns [`StopReason::Interrupted`] with no tokens; the session then holds part
/// of the prompt. When `on_piece` breaks, its token is still fed and no further text is handed out. The prompt
/// must have at least one token; the engine's vocabulary must be readable.
pub fn generate(
    session: &mut Session<'_>,
    sampler: &mut Sampler,
    prompt: &[u32],
    opts: &GenerateOptions<'_>,
    mut on_piece: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<GenerateResult> {
    let interrupted = || opts.interrupt.is_some_and(|f| f.load(Ordering::Relaxed));
    let engine = session.engine();
    let tokenizer = engine.tokenizer()?;
    if prompt.is_empty() {
        bail!("generation needs at least one prompt token to process");
    }
    let mut result = GenerateResult {
        tokens: Vec::new(),
        stop_reason: StopReason::Interrupted,
        timings: Timings {
            n_prompt: prompt.len(),
            ..Timings::default()
        },
        experts: ExpertPhases::default(),
    };

    // The prompt, a micro-batch at a time so an interrupt is noticed between them.
    let start = Instant::now();
    let before = engine.expert_stats();
    let mut logits = Vec::new();
    for chunk in prompt.chunks(session.n_ubatch().max(1)) {
        if interrupted() {
            result.timings.prompt_time = start.elapsed();
            result.experts.prompt = engine.expert_stats().since(&before);
            return Ok(result);
        }
        logits = session.feed(chunk, Logits::Last)?;
    }
    result.timings.prompt_time = start.elapsed();
    let after_prompt = engine.expert_stats();
    result.experts.prompt = after_prompt.since(&before);
    if let Some(hook) = opts.after_prompt {
        hook(session);
    }

    let start = Instant::now();
    let mut decoder = tokenizer.stream_decoder();
    let mut cancelled = false;
    result.stop_reason = loop {
        if cancelled {
            break StopReason::Cancelled;
        }
        if interrupted() {
            break StopReason::Interrupted;
        }
        if opts.max_tokens.is_some_and(|n| result.tokens.len() >= n) {
            break StopReason::TokenLimit;
        }
        if session.n_past() >= session.n_ctx() {
            break StopReason::ContextFull;
        }
        let id = sampler.sample(&logits, session.tokens());
        result.timings.n_gen += 1;
        if tokenizer.is_eog(id) {
            break StopReason::EndOfGeneration(id);
        }
        result.tokens.push(id);
        let text = decoder.push(id);
        if !text.is_empty() {
            cancelled = on_piece(&text).is_break();
        }
        logits = session.feed(&[id], Logits::Last)?;
    };
    if !cancelled {
        let rest = decoder.flush();
        if !rest.is_empty() {
            // Nothing follows the last piece: whether the caller breaks here changes nothing.
            let _ = on_piece(&rest);
        }
    }
    result.timings.gen_time = start.elapsed();
    result.experts.generation = engine.expert_stats().since(&after_prompt);
    Ok(result)
}
