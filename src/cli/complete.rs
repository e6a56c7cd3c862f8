//! `ferrite complete -m MODEL [-p TEXT | -f FILE | stdin]`: one answer, streamed to stdout as it is generated and
//! nothing else there; start-up lines (the memory plan when the experts are paged, always with `--verbose`), the
//! seed, why it stopped, the speeds and (`--verbose`) the expert store's numbers on stderr. Ctrl-C stops the answer
//! (what was generated is already out) and exits with 130.
//!
//! `--prompt-cache FILE` (llama.cpp's flag): the session is saved to FILE once the prompt is processed, and the next
//! run with the same FILE starts from it, processing only what follows the longest prefix its tokens share with the
//! new prompt (at least the last prompt token, whose logits the answer starts from). A file made by another model
//! or with other sizes (`-c`, `--ubatch`, `--cache-type`), or one that cannot be read, is ignored with a note and
//! replaced; `--prompt-cache-ro` reads it without updating it.

use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Args;
use ferrite::chat::{ChatOptions, Message};
use ferrite::engine::{Rewind, Session};
use ferrite::sampler::Sampler;

use ferrite::generate::{GenerateOptions, StopReason};

use super::generate::{self, SamplingArgs};
use super::model_arg::{open_engine, ModelArgs, PlanReport};
use super::Hinted;

/// Exit code after Ctrl-C, as shells report a process ended by SIGINT.
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Args, Debug)]
pub struct CompleteArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt, used as given [default: -f FILE, else all of standard input].
    #[arg(
        short = 'p',
        long = "prompt",
        value_name = "TEXT",
        allow_hyphen_values = true,
        conflicts_with = "file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from FILE (one trailing line break is dropped, as for standard input).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// A system prompt, placed before the user's turn (chat format only).
    #[arg(
        long = "system",
        value_name = "TEXT",
        allow_hyphen_values = true,
        conflicts_with = "raw"
    )]
    pub system: Option<String>,
    /// Give the prompt to the model as it is, without the chat format.
    #[arg(long)]
    pub raw: bool,
    /// Thinking mode: the model reasons (up to `</think>`) before answering [default].
    #[arg(long, overrides_with = "no_think")]
    pub think: bool,
    /// Answer without reasoning.
    #[arg(long = "no-think", overrides_with = "think")]
    pub no_think: bool,
    /// Most tokens to generate; -1 = until the model ends its answer or the context is full.
    #[arg(short = 'n', long = "n-predict", value_name = "N", default_value_t = 512, allow_negative_numbers = true, value_parser = parse_n_predict)]
    pub n_predict: i64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Keep the session after the prompt in FILE and start from it next time: only what follows the prefix the new
    /// prompt shares with it is processed (llama.cpp's flag).
    #[arg(long = "prompt-cache", value_name = "FILE")]
    pub prompt_cache: Option<PathBuf>,
    /// With --prompt-cache: use the file but do not update it.
    #[arg(long = "prompt-cache-ro", requires = "prompt_cache")]
    pub prompt_cache_ro: bool,
    /// Print the memory plan, the rendered prompt, the prompt's and the answer's token ids, and the expert store's
    /// hits, misses, bytes read and I/O wait on stderr.
    #[arg(long)]
    pub verbose: bool,
}

fn parse_n_predict(s: &str) -> Result<i64, String> {
    match s.parse::<i64>() {
        Ok(n) if n >= -1 => Ok(n),
        Ok(_) => Err("must be -1 (no limit) or at least 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

pub fn run(args: &CompleteArgs) -> Result<()> {
    let text = read_prompt(args)?;
    let report = if args.verbose {
        PlanReport::Always
    } else {
        PlanReport::WhenNotable
    };
    let engine = open_engine(&args.model, report)?;
    let tokenizer = generate::load_tokenizer(&engine)?;
    let n_ctx = args.model.n_ctx(&engine);

    let prompt_text = if args.raw {
        text
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::system(system.as_str()));
        }
        messages.push(Message::user(text));
        let options = ChatOptions {
            thinking: !args.no_think,
            ..ChatOptions::default()
        };
        let format = engine.prompt_format();
        if let Some(note) = format.note() {
            eprintln!("ferrite: note: {note}");
        }
        format.render(&messages, &options, true)
    };
    let mut prompt = Vec::new();
    if args.raw && tokenizer.add_bos() {
        prompt.extend(tokenizer.bos());
    }
    prompt.extend(tokenizer.encode(&prompt_text, true));
    if prompt.is_empty() {
        anyhow::bail!("the prompt is empty after tokenization");
    }
    if prompt.len() >= n_ctx {
        return Err(Hinted::new(
            format!(
                "the prompt has {} tokens but the context holds {n_ctx}, leaving no room for an answer",
                prompt.len()
            ),
            format!("raise -c to more than {} or shorten the prompt", prompt.len()),
        )
        .into());
    }

    let cfg = args.sampling.config();
    let mut sampler = Sampler::new(cfg);
    let mut session = engine.session()?;
    eprintln!(
        "ferrite: {} prompt tokens, context {n_ctx}, seed {}, temp {}",
        prompt.len(),
        cfg.seed,
        cfg.temperature
    );
    if args.verbose {
        eprintln!("ferrite: prompt text: {prompt_text:?}");
        eprintln!("ferrite: prompt ids: {}", generate::id_list(&prompt));
    }

    let reused = match &args.prompt_cache {
        Some(path) => start_from_prompt_cache(&mut session, path, &prompt)?,
        None => 0,
    };
    let save = |s: &Session<'_>| {
        if let Some(path) = &args.prompt_cache {
            if let Err(e) = s.save(path) {
                eprintln!("ferrite: warning: --prompt-cache: {e:#}");
            }
        }
    };

    let interrupt = generate::interrupt_flag()?;
    let opts = GenerateOptions {
        max_tokens: usize::try_from(args.n_predict).ok(),
        interrupt: Some(&interrupt),
        after_prompt: (args.prompt_cache.is_some() && !args.prompt_cache_ro)
            .then_some(&save as &dyn Fn(&Session<'_>)),
    };
    let gen = generate::generate_to_stdout(&mut session, &mut sampler, &prompt[reused..], &opts)?;

    // The answer has no final line break of its own: keep the next line off it when both go to one terminal.
    if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
        eprintln!();
    }
    if args.verbose {
        eprintln!("ferrite: answer ids: {}", generate::id_list(&gen.tokens));
    }
    eprintln!("ferrite: stopped: {}", generate::describe(gen.stop_reason));
    eprintln!("ferrite: {}", gen.timings.summary());
    if args.verbose {
        eprintln!("ferrite: prompt {}", gen.experts.prompt);
        eprintln!("ferrite: generation {}", gen.experts.generation);
    }
    if gen.stop_reason == StopReason::Interrupted {
        std::process::exit(EXIT_INTERRUPTED);
    }
    Ok(())
}

/// Restores the session saved in `path` (`--prompt-cache`) and goes back to the longest prefix it shares with
/// `prompt`, leaving at least the prompt's last token to process; returns how many prompt tokens it holds. A missing
/// file, or one that cannot be used, leaves the session empty, with a note.
fn start_from_prompt_cache(
    session: &mut Session<'_>,
    path: &Path,
    prompt: &[u32],
) -> Result<usize> {
    let shown = path.display();
    if !path.exists() {
        eprintln!(
            "ferrite: --prompt-cache: {shown} does not exist yet; it is written after the prompt"
        );
        return Ok(0);
    }
    if let Err(e) = session.load(path) {
        eprintln!(
            "ferrite: note: --prompt-cache: {e:#}; the prompt is processed from an empty cache"
        );
        session.reset()?;
        return Ok(0);
    }
    let saved = session.n_past();
    let common = session
        .tokens()
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    let reused = common.min(prompt.len() - 1);
    let how = session.rewind(reused)?;
    let note = match how {
        Rewind::Recomputed => " (recomputed: the cache could not be rolled back that far)",
        Rewind::Nothing | Rewind::RolledBack => "",
    };
    eprintln!(
        "ferrite: --prompt-cache: {reused} of the prompt's {} tokens reused from {shown} ({saved} saved){note}",
        prompt.len()
    );
    Ok(reused)
}

/// The prompt from -p, -f or standard input. A file's or standard input's one trailing line break is dropped
/// (`echo question |` adds one the user did not mean as part of the question).
fn read_prompt(args: &CompleteArgs) -> Result<String> {
    if let Some(p) = &args.prompt {
        return Ok(p.clone());
    }
    let text = if let Some(path) = &args.file {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the prompt file {}", path.display()))?
    } else {
        let mut stdin = std::io::stdin();
        if stdin.is_terminal() {
            return Err(no_prompt());
        }
        let mut text = String::new();
        stdin
            .read_to_string(&mut text)
            .context("cannot read the prompt from standard input")?;
        text
    };
    let text = strip_line_break(text);
    if text.is_empty() {
        return Err(no_prompt());
    }
    Ok(text)
}

fn no_prompt() -> anyhow::Error {
    Hinted::new(
        "no prompt: -p TEXT, -f FILE and standard input give nothing",
        "pass -p \"your question\", -f FILE, or pipe the text in: echo \"your question\" | ferrite complete -m MODEL",
    )
    .into()
}

fn strip_line_break(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}
