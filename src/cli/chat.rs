//! `ferrite chat -m MODEL`: a conversation in the terminal (rustyline: history, multi-line input, slash commands),
//! or one user turn per line of standard input when it is not a terminal, answers on stdout. An interactive chat
//! prints the memory plan at start-up (a piped one when the experts are paged); `/stats` adds the expert store's
//! numbers of the last turn and of the whole chat.
//!
//! The cache is kept between turns. The conversation is kept as tokens, exactly as the model read and wrote them
//! (each answer's generated tokens, its reasoning included, closed by the end-of-sentence token), and a new turn
//! appends the tokens of `<｜User｜>text<｜Assistant｜><think>`; only the tokens the session does not already hold
//! are processed. This is the encoder's rendering with `drop_thinking = false` (earlier reasoning stays in the
//! history): dropping it would change the history after every turn and cost a re-prefill of the whole conversation.
//!
//! Nothing is lost on the user's side: an error inside a turn (a context overflow, an I/O error of the expert store)
//! ends that turn with a message, the session is rolled back to the conversation before it, and the chat goes on;
//! a piped chat then exits with code 1 at the end of its input (after answering every other line), an interactive
//! one with 0. `/save FILE` writes the session and FILE.json atomically (temporary file, fsync, rename), refuses to
//! replace a file that is not a ferrite session (or chat transcript) unless given as `/save! FILE`, and Ctrl-C
//! cannot cut it short (it says "saving, please wait").

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use ferrite::chat::{ChatOptions, Message, Role, BOS, THINK_END};
use ferrite::engine::{Logits, Rewind, Session};
use ferrite::experts::StatsSnapshot;
use ferrite::sampler::Sampler;
use ferrite::session_file::is_session_file;
use ferrite::tokenizer::Tokenizer;
use rustyline::error::ReadlineError;

use ferrite::generate::{GenerateOptions, StopReason, Timings};

use super::generate::{self, SamplingArgs, Uninterruptible};
use super::model_arg::{cache_dir, open_engine, ModelArgs, PlanReport};
use super::Hinted;

const HELP: &str = "\
commands:
  /help          this list
  /think         thinking mode on (the model reasons before answering)
  /nothink       thinking mode off
  /reset         forget the conversation (the system prompt stays)
  /stats         tokens in the context, cache size, the last turn's prompt tokens and speeds, expert-cache numbers
  /save FILE     save the session to FILE and the conversation to FILE.json (/save! FILE replaces files that are
                 not ferrite sessions)
  /load FILE     restore a session saved with /save
  /quit          leave (also Ctrl-D, or Ctrl-C on an empty line)
input: end a line with \\ to continue it on the next; or enclose several lines in \"\"\" ... \"\"\"
Ctrl-C while the model answers stops the answer and keeps it in the conversation.";

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system prompt, placed before the first turn.
    #[arg(long = "system", value_name = "TEXT", allow_hyphen_values = true)]
    pub system: Option<String>,
    /// Thinking mode: the model reasons (up to `</think>`) before answering [default].
    #[arg(long, overrides_with = "no_think")]
    pub think: bool,
    /// Answer without reasoning.
    #[arg(long = "no-think", overrides_with = "think")]
    pub no_think: bool,
    /// Most tokens per answer; -1 = until the model ends its answer or the context is full.
    #[arg(short = 'n', long = "n-predict", value_name = "N", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// After each answer, print on stderr how many prompt tokens it processed, the speeds and (when the experts are
    /// paged) the expert cache's hits, misses, bytes read and I/O wait.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run(args: &ChatArgs) -> Result<()> {
    if args.n_predict < -1 {
        bail!(
            "-n {} is not valid: use -1 (no limit) or a count",
            args.n_predict
        );
    }
    let interactive = std::io::stdin().is_terminal();
    let report = if interactive {
        PlanReport::Always
    } else {
        PlanReport::WhenNotable
    };
    let engine = open_engine(&args.model, report)?;
    let tokenizer = generate::load_tokenizer(&engine)?;
    let n_ctx = args.model.n_ctx(&engine);
    let cfg = args.sampling.config();
    let session = engine.session()?;
    if let Some(note) = engine.prompt_format().note() {
        eprintln!("ferrite: note: {note}");
    }
    eprintln!(
        "ferrite: chat with {}, context {n_ctx}, seed {}{}",
        engine.path().display(),
        cfg.seed,
        if interactive {
            "; /help lists the commands, Ctrl-D quits"
        } else {
            ""
        }
    );
    let mut chat = Chat {
        session,
        tokenizer,
        sampler: Sampler::new(cfg),
        options: ChatOptions {
            thinking: !args.no_think,
            drop_thinking: false,
            ..ChatOptions::default()
        },
        system: args.system.clone(),
        messages: Vec::new(),
        conversation: Vec::new(),
        last: None,
        max_tokens: usize::try_from(args.n_predict).ok(),
        verbose: args.verbose,
        interrupt: generate::interrupt_flag()?,
        computing: false,
    };
    chat.clear();
    let mut input: Box<dyn LineSource> = if interactive {
        Box::new(Terminal::new()?)
    } else {
        Box::new(Piped(std::io::stdin().lock()))
    };
    let (mut turns, mut failed) = (0usize, 0usize);
    while let Some(text) = read_turn(input.as_mut())? {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.starts_with('/') {
            if !chat.command(trimmed)? {
                break;
            }
            continue;
        }
        turns += 1;
        if let Err(e) = chat.turn(&text) {
            failed += 1;
            eprintln!(
                "ferrite: error: {}; this turn was dropped, the conversation before it is kept",
                chain(&e)
            );
            chat.roll_back();
        }
    }
    input.close();
    if failed > 0 && !interactive {
        bail!("{failed} of {turns} turns failed (see the errors above); the others were answered");
    }
    Ok(())
}

/// The last turn's numbers, for /stats and --verbose.
#[derive(Clone, Copy, Debug)]
struct TurnStats {
    timings: Timings,
    /// Tokens of the conversation up to the new turn's prompt, all of which the answer needed in the cache.
    n_conversation: usize,
    /// Of those, tokens the cache already held.
    n_reused: usize,
    stop: StopReason,
    /// The expert store's counters over the turn (a rewind's recomputation included).
    experts: StatsSnapshot,
}

struct Chat<'e, 't> {
    session: Session<'e>,
    tokenizer: &'t Tokenizer,
    sampler: Sampler,
    options: ChatOptions,
    system: Option<String>,
    /// The conversation as messages (what /save writes), system prompt first.
    messages: Vec<Message>,
    /// The conversation as the model read and wrote it; the session holds a prefix of it.
    conversation: Vec<u32>,
    last: Option<TurnStats>,
    max_tokens: Option<usize>,
    verbose: bool,
    interrupt: std::sync::Arc<AtomicBool>,
    /// Set while a turn computes: the session may then hold state the conversation does not (see
    /// [`Chat::roll_back`]).
    computing: bool,
}

impl Chat<'_, '_> {
    /// An empty conversation: BOS and the system prompt. The session keeps its cache until the next turn, which
    /// reuses whatever prefix still matches.
    fn clear(&mut self) {
        self.messages = self.system.iter().map(Message::system).collect();
        let format = self.session.engine().prompt_format();
        let text = format.render(&self.messages, &self.options, false);
        self.conversation = self.tokenizer.encode(&text, true);
        self.last = None;
    }

    /// The text of a new user turn: `<｜User｜>text<｜Assistant｜>` and `<think>` or `</think>`, as the renderer
    /// writes it after a history (a one-message conversation without its BOS).
    fn turn_text(&self, text: &str) -> String {
        let options = ChatOptions {
            reasoning_effort: None,
            ..self.options
        };
        let format = self.session.engine().prompt_format();
        let whole = format.render(&[Message::user(text)], &options, true);
        whole.strip_prefix(BOS).unwrap_or(&whole).to_string()
    }

    /// After a failed turn (nothing of it joined the conversation): the answer's line is closed, and the session,
    /// which may hold part of the turn (and a computation that failed half-way may have written cache rows and
    /// compressor state past what its tokens say), is rolled back to the conversation's prefix it held, recomputed
    /// as a rewind does. Should that fail too, the session is emptied and the next turn processes the whole
    /// conversation.
    fn roll_back(&mut self) {
        self.interrupt.store(false, Ordering::Relaxed);
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout).and_then(|()| stdout.flush());
        drop(stdout);
        if !std::mem::take(&mut self.computing) {
            // Failed before it computed anything (a context overflow): the session is as it was.
            return;
        }
        let held = self.session.tokens();
        let keep = held
            .iter()
            .zip(&self.conversation)
            .take_while(|(a, b)| a == b)
            .count();
        let prefix = self.conversation[..keep].to_vec();
        let redone = self.session.reset().and_then(|()| match prefix.is_empty() {
            true => Ok(()),
            false => self.session.feed(&prefix, Logits::Last).map(drop),
        });
        if let Err(e) = redone {
            eprintln!(
                "ferrite: warning: the cache could not be restored ({}); the next turn processes the whole conversation",
                chain(&e)
            );
            let _ = self.session.reset();
        }
    }

    /// One user turn: process what the cache lacks, stream the answer to stdout, keep it in the conversation. On an
    /// error nothing joins the conversation; the caller then calls [`Chat::roll_back`].
    fn turn(&mut self, text: &str) -> Result<()> {
        let mut target = self.conversation.clone();
        target.extend(self.tokenizer.encode(&self.turn_text(text), true));
        let n_ctx = self.session.n_ctx();
        if target.len() >= n_ctx {
            return Err(Hinted::new(
                format!(
                    "the conversation would have {} tokens but the context holds {n_ctx}",
                    target.len()
                ),
                "/reset, a shorter message, or restart with a larger -c",
            )
            .into());
        }
        let engine = self.session.engine();
        let experts_before = engine.expert_stats();
        // Keep the longest prefix the session shares with the conversation; at least one token is left to process.
        let held = self.session.tokens();
        let mut reuse = held.iter().zip(&target).take_while(|(a, b)| a == b).count();
        reuse = reuse.min(target.len() - 1);
        let mut timings_rewind = Timings::default();
        self.computing = true;
        if reuse < self.session.n_past() {
            let start = std::time::Instant::now();
            if self.session.rewind(reuse)? == Rewind::Recomputed {
                timings_rewind.n_prompt = reuse;
                timings_rewind.prompt_time = start.elapsed();
                if self.verbose {
                    eprintln!("ferrite: the cache diverged: recomputed its first {reuse} tokens");
                }
            }
        }

        self.interrupt.store(false, Ordering::Relaxed);
        let opts = GenerateOptions {
            max_tokens: self.max_tokens,
            interrupt: Some(&self.interrupt),
            ..GenerateOptions::default()
        };
        let gen = generate::generate_to_stdout(
            &mut self.session,
            &mut self.sampler,
            &target[reuse..],
            &opts,
        )?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout)?;
        stdout.flush()?;
        drop(stdout);
        self.interrupt.store(false, Ordering::Relaxed);
        self.computing = false;

        let mut timings = gen.timings;
        // A rewind recomputes the kept prefix: it is prompt processing this turn paid for.
        timings.n_prompt += timings_rewind.n_prompt;
        timings.prompt_time += timings_rewind.prompt_time;
        let stats = TurnStats {
            timings,
            n_conversation: target.len(),
            n_reused: target.len() - timings.n_prompt.min(target.len()),
            stop: gen.stop_reason,
            experts: engine.expert_stats().since(&experts_before),
        };
        self.last = Some(stats);
        if gen.stop_reason == StopReason::Interrupted && gen.timings.n_gen == 0 {
            // Stopped before the answer began: the turn is dropped; the cache keeps what it processed.
            eprintln!("ferrite: interrupted before the answer began; the question was dropped");
            return Ok(());
        }
        match gen.stop_reason {
            StopReason::EndOfGeneration(_) => {}
            stop => eprintln!("ferrite: answer stopped: {}", generate::describe(stop)),
        }
        if self.verbose {
            eprintln!("ferrite: {}", turn_line(&stats));
            if engine.is_paged() {
                eprintln!("ferrite: {}", stats.experts);
            }
        }

        // The answer joins the conversation as generated, closed like a finished turn.
        self.messages.push(Message::user(text));
        self.messages.push(self.answer_message(&gen.tokens));
        self.conversation = target;
        self.conversation.extend_from_slice(&gen.tokens);
        let close = match gen.stop_reason {
            StopReason::EndOfGeneration(id) => Some(id),
            _ => self.tokenizer.eos(),
        };
        self.conversation.extend(close);
        Ok(())
    }

    /// The assistant message for generated tokens: in thinking mode, reasoning up to `</think>`, then the answer.
    fn answer_message(&self, tokens: &[u32]) -> Message {
        let text = self.tokenizer.decode(tokens);
        if !self.options.thinking {
            return Message::assistant(text);
        }
        match text.split_once(THINK_END) {
            Some((reasoning, content)) => Message::assistant_with_reasoning(reasoning, content),
            // Stopped while still reasoning.
            None => Message::assistant_with_reasoning(text, ""),
        }
    }

    /// Runs a slash command; false means quit.
    fn command(&mut self, line: &str) -> Result<bool> {
        let (name, arg) = match line.split_once(char::is_whitespace) {
            Some((n, a)) => (n, a.trim()),
            None => (line, ""),
        };
        match name {
            "/quit" | "/exit" | "/q" => return Ok(false),
            "/help" | "/?" => eprintln!("{HELP}"),
            "/think" => {
                self.options.thinking = true;
                eprintln!("ferrite: thinking mode on");
            }
            "/nothink" | "/no-think" => {
                self.options.thinking = false;
                eprintln!("ferrite: thinking mode off");
            }
            "/reset" => {
                self.session.reset()?;
                self.clear();
                eprintln!("ferrite: conversation cleared");
            }
            "/stats" => eprintln!("{}", self.stats()),
            "/save" | "/save!" | "/load" if arg.is_empty() => {
                eprintln!("ferrite: {name} needs a file name")
            }
            "/save" | "/save!" => match self.save(Path::new(arg), name == "/save!") {
                Ok(()) => eprintln!(
                    "ferrite: saved the session to {arg} and the conversation to {}",
                    json_path(Path::new(arg)).display()
                ),
                Err(e) => eprintln!("ferrite: error: {}", chain(&e)),
            },
            "/load" => match self.load(Path::new(arg)) {
                Ok(()) => eprintln!(
                    "ferrite: loaded {arg}: {} messages, {} tokens in the context",
                    self.messages.len(),
                    self.session.n_past()
                ),
                Err(e) => eprintln!("ferrite: error: {}", chain(&e)),
            },
            _ => eprintln!("ferrite: unknown command {name}; /help lists the commands"),
        }
        Ok(true)
    }

    fn stats(&self) -> String {
        let turns = self
            .messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count();
        let engine = self.session.engine();
        let store = match engine.memory_plan().slots() {
            Some(slots) if engine.is_paged() => format!("experts paged through {slots} slots"),
            _ => "experts resident".to_string(),
        };
        let mut s = format!(
            "context: {} of {} tokens in the cache; conversation: {} tokens, {turns} answers; cache: {:.1} MiB; {store}; thinking {}",
            self.session.n_past(),
            self.session.n_ctx(),
            self.conversation.len(),
            self.session.cache_bytes() as f64 / (1024.0 * 1024.0),
            if self.options.thinking { "on" } else { "off" }
        );
        match &self.last {
            Some(t) => {
                s.push_str("\nlast turn: ");
                s.push_str(&turn_line(t));
                s.push_str(&format!("\nlast turn {}", t.experts));
            }
            None => s.push_str("\nlast turn: none"),
        }
        s.push_str(&format!("\nall turns {}", engine.expert_stats()));
        s
    }

    /// Saves the session to `path` and the conversation to `path.json`, each atomically, refusing to replace files
    /// that are not a ferrite session and chat transcript unless `replace` (`/save!`). Ctrl-C waits for it.
    fn save(&self, path: &Path, replace: bool) -> Result<()> {
        let json = json_path(path);
        if !replace {
            if path.exists() && !is_session_file(path) {
                return Err(Hinted::new(
                    format!("{} exists and is not a ferrite session", path.display()),
                    format!(
                        "choose another name, or /save! {} to replace it",
                        path.display()
                    ),
                )
                .into());
            }
            let is_chat =
                |p: &Path| std::fs::read_to_string(p).is_ok_and(|text| parse_saved(&text).is_ok());
            if json.exists() && !is_chat(&json) {
                return Err(Hinted::new(
                    format!("{} exists and is not a saved ferrite chat", json.display()),
                    format!(
                        "choose another name, or /save! {} to replace it",
                        path.display()
                    ),
                )
                .into());
            }
        }
        if path.is_dir() || json.is_dir() {
            bail!(
                "cannot save to {}: it or {} is a folder",
                path.display(),
                json.display()
            );
        }
        let _guard = Uninterruptible::new();
        eprintln!("ferrite: saving the session to {}", path.display());
        self.session.save(path)?;
        // A test hook: widens the window in which Ctrl-C must not stop the save.
        if let Some(ms) = std::env::var("FERRITE_DEBUG_SAVE_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let messages: Vec<serde_json::Value> = self
            .messages
            .iter()
            .map(|m| {
                serde_json::json!({
                    "role": m.role.as_str(),
                    "content": m.content,
                    "reasoning": m.reasoning,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "ferrite_chat": 1,
            "messages": messages,
            "tokens": self.conversation,
        });
        let text = serde_json::to_string_pretty(&doc)?;
        gguf::atomic::write_atomically(
            &json,
            1 << 16,
            |_, out| out.write_all(text.as_bytes()),
            |_, e| e,
        )
        .with_context(|| format!("cannot write {}", json.display()))
    }

    /// Restores the conversation (FILE.json) and the session (FILE). A session that does not load (another
    /// model, another -c) is dropped: the next turn then processes the whole conversation.
    fn load(&mut self, path: &Path) -> Result<()> {
        let json = json_path(path);
        let text = std::fs::read_to_string(&json)
            .with_context(|| format!("cannot read the conversation {}", json.display()))?;
        let (messages, tokens) = parse_saved(&text)
            .with_context(|| format!("{} is not a saved ferrite chat", json.display()))?;
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.tokenizer.n_vocab())
        {
            bail!(
                "{}: token id {bad} is not in this model's vocabulary",
                json.display()
            );
        }
        let loaded = self.session.load(path);
        self.messages = messages;
        self.conversation = tokens;
        self.last = None;
        if let Err(e) = loaded {
            self.session.reset()?;
            eprintln!(
                "ferrite: warning: the cache in {} did not load ({}); the next turn processes the whole conversation",
                path.display(),
                chain(&e)
            );
        }
        Ok(())
    }
}

fn turn_line(t: &TurnStats) -> String {
    format!(
        "{} prompt tokens processed of {} in the conversation ({} reused); prompt {:.1} tok/s, generation {} tokens at {:.1} tok/s; stopped: {}",
        t.timings.n_prompt,
        t.n_conversation,
        t.n_reused,
        t.timings.prompt_speed(),
        t.timings.n_gen,
        t.timings.gen_speed(),
        generate::describe(t.stop)
    )
}

/// The error and its causes on one line, with the hint of a [`Hinted`] among them.
fn chain(e: &anyhow::Error) -> String {
    let mut line = e
        .chain()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    if let Some(h) = e.chain().find_map(|e| e.downcast_ref::<Hinted>()) {
        line.push_str(&format!(" (hint: {})", h.hint()));
    }
    line
}

/// Where /save writes the messages: FILE.json next to the session FILE.
fn json_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

fn parse_saved(text: &str) -> Result<(Vec<Message>, Vec<u32>)> {
    let doc: serde_json::Value = serde_json::from_str(text)?;
    if doc.get("ferrite_chat").and_then(|v| v.as_u64()) != Some(1) {
        bail!("no \"ferrite_chat\": 1 marker");
    }
    let mut messages = Vec::new();
    for m in doc["messages"].as_array().context("no \"messages\" list")? {
        let role = match m["role"].as_str() {
            Some("system") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => bail!("unknown role {other:?}"),
        };
        messages.push(Message {
            role,
            content: m["content"]
                .as_str()
                .context("a message without \"content\"")?
                .to_string(),
            reasoning: m["reasoning"].as_str().map(str::to_string),
        });
    }
    let tokens = doc["tokens"]
        .as_array()
        .context("no \"tokens\" list")?
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .context("a token id that is not a u32")
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok((messages, tokens))
}

// ---------------------------------------------------------------------------------------------------------------
// Input: rustyline in a terminal, lines of standard input otherwise.

enum Input {
    Line(String),
    /// Ctrl-C at an empty prompt.
    Interrupted,
    /// Ctrl-D or the end of standard input.
    Eof,
}

trait LineSource {
    /// One line; `continued` selects the prompt for a continuation line.
    fn read(&mut self, continued: bool) -> Result<Input>;
    /// Remembers a whole user input (history).
    fn remember(&mut self, _text: &str) {}
    fn close(&mut self) {}
}

/// Reads one user input: a line, lines joined by a trailing `\`, or a `"""` block. `None` means quit.
fn read_turn(src: &mut dyn LineSource) -> Result<Option<String>> {
    let first = match src.read(false)? {
        Input::Line(l) => l,
        Input::Interrupted | Input::Eof => return Ok(None),
    };
    let mut text;
    if first.trim() == "\"\"\"" {
        text = String::new();
        loop {
            match src.read(true)? {
                Input::Line(l) if l.trim() == "\"\"\"" => break,
                Input::Line(l) => {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&l);
                }
                // Ctrl-C drops the unfinished block; the end of input sends what there is.
                Input::Interrupted => return Ok(Some(String::new())),
                Input::Eof => break,
            }
        }
    } else {
        text = first;
        while text.ends_with('\\') {
            text.pop();
            text.push('\n');
            match src.read(true)? {
                Input::Line(l) => text.push_str(&l),
                Input::Interrupted => return Ok(Some(String::new())),
                Input::Eof => break,
            }
        }
    }
    if !text.trim().is_empty() {
        src.remember(&text);
    }
    Ok(Some(text))
}

/// Standard input that is not a terminal: one line per read, no prompt.
struct Piped<R>(R);

impl<R: std::io::BufRead> LineSource for Piped<R> {
    fn read(&mut self, _continued: bool) -> Result<Input> {
        let mut line = String::new();
        if self
            .0
            .read_line(&mut line)
            .context("cannot read standard input")?
            == 0
        {
            return Ok(Input::Eof);
        }
        if line.ends_with('\n') {
            line.pop();
            if line.ends_with('\r') {
                line.pop();
            }
        }
        Ok(Input::Line(line))
    }
}

/// Ctrl-C at the prompt: on an empty line it quits (as an interrupt), on a typed line it clears the line.
struct CtrlC;

impl rustyline::ConditionalEventHandler for CtrlC {
    fn handle(
        &self,
        _evt: &rustyline::Event,
        _n: rustyline::RepeatCount,
        _positive: bool,
        ctx: &rustyline::EventContext,
    ) -> Option<rustyline::Cmd> {
        if ctx.line().is_empty() {
            None
        } else {
            Some(rustyline::Cmd::Kill(rustyline::Movement::WholeBuffer))
        }
    }
}

struct Terminal {
    editor: rustyline::DefaultEditor,
    history: Option<PathBuf>,
}

impl Terminal {
    fn new() -> Result<Terminal> {
        let mut editor =
            rustyline::DefaultEditor::new().context("cannot set up the line editor")?;
        editor.bind_sequence(
            rustyline::KeyEvent::ctrl('C'),
            rustyline::EventHandler::Conditional(Box::new(CtrlC)),
        );
        let history = cache_dir().ok().and_then(|dir| {
            std::fs::create_dir_all(&dir).ok()?;
            Some(dir.join("chat_history.txt"))
        });
        if let Some(path) = &history {
            // A first run has no history yet.
            let _ = editor.load_history(path);
        }
        Ok(Terminal { editor, history })
    }
}

impl LineSource for Terminal {
    fn read(&mut self, continued: bool) -> Result<Input> {
        match self.editor.readline(if continued { "... " } else { "> " }) {
            Ok(line) => Ok(Input::Line(line)),
            Err(ReadlineError::Interrupted) => Ok(Input::Interrupted),
            Err(ReadlineError::Eof) => Ok(Input::Eof),
            Err(e) => Err(e).context("cannot read the terminal"),
        }
    }

    fn remember(&mut self, text: &str) {
        let _ = self.editor.add_history_entry(text);
        if let Some(path) = &self.history {
            let _ = self.editor.append_history(path);
        }
    }

    fn close(&mut self) {
        // append_history already wrote every entry.
    }
}
