//! What `complete` and `chat` share around the library's generation loop (`ferrite::generate`): the sampler flags,
//! Ctrl-C as the flag the loop polls, the answer streamed to standard output, the vocabulary with its hints.

use std::io::Write as _;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::Args;
use ferrite::engine::{Engine, Session};
use ferrite::generate::{generate, GenerateOptions, GenerateResult, StopReason};
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

/// Set while a file is being written that Ctrl-C must not cut short (see [`Uninterruptible`]).
static SAVING: AtomicBool = AtomicBool::new(false);

/// Ctrl-C as a flag: the first SIGINT sets it (the loop stops at the next token), a second one while it is still
/// set exits with code 130 at once (for a prompt that takes long to process). While an [`Uninterruptible`] guard
/// lives (a save), Ctrl-C only says "saving, please wait": the save finishes whatever the user presses.
pub fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = Arc::clone(&flag);
    let handler = move || {
        if SAVING.load(Ordering::SeqCst) {
            let msg = b"\nferrite: saving, please wait\n";
            // SAFETY: write(2) is async-signal-safe; the buffer is static.
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
            return;
        }
        if set.swap(true, Ordering::SeqCst) {
            signal_hook::low_level::exit(130);
        }
    };
    // SAFETY: the handler only touches atomics, write(2) and _exit (via low_level::exit): all async-signal-safe.
    unsafe { signal_hook::low_level::register(signal_hook::consts::SIGINT, handler) }
        .context("cannot install the Ctrl-C handler")?;
    Ok(flag)
}

/// While it lives, Ctrl-C cannot stop the process (see [`interrupt_flag`]): around writes that must finish.
pub struct Uninterruptible(());

impl Uninterruptible {
    pub fn new() -> Uninterruptible {
        SAVING.store(true, Ordering::SeqCst);
        Uninterruptible(())
    }
}

impl Drop for Uninterruptible {
    fn drop(&mut self) {
        SAVING.store(false, Ordering::SeqCst);
    }
}

/// Why generation stopped, as the CLI says it.
pub fn describe(stop: StopReason) -> &'static str {
    match stop {
        StopReason::EndOfGeneration(_) => "end of generation",
        StopReason::TokenLimit => "token limit (-n) reached",
        StopReason::ContextFull => "context full (raise -c)",
        StopReason::Interrupted => "interrupted",
        StopReason::Cancelled => "output closed",
    }
}

/// [`generate`] with the answer written to standard output as it comes, a piece at a time. A write error (a closed
/// stdout) stops generation and is returned.
pub fn generate_to_stdout(
    session: &mut Session<'_>,
    sampler: &mut Sampler,
    prompt: &[u32],
    opts: &GenerateOptions<'_>,
) -> Result<GenerateResult> {
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    let result = generate(session, sampler, prompt, opts, |piece| {
        match stdout
            .write_all(piece.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(result),
    }
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
