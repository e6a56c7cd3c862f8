//! `ferrite tokenize -m MODEL [-p TEXT | stdin] [--ids] [--no-parse-special]`: the tokens of a text, printed as
//! llama.cpp's `llama-tokenize` prints them. Reads only the vocabulary, so a vocabulary-only GGUF works too.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use super::model_arg::{demo_model, DEMO};
use super::Hinted;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// GGUF model file (any shard of a split model), or `demo` for the tiny model ferrite generates.
    #[arg(short = 'm', long = "model", value_name = "MODEL")]
    model: PathBuf,
    /// The text to tokenize, used as given (no escape processing) [default: all of standard input].
    #[arg(
        short = 'p',
        long = "prompt",
        value_name = "TEXT",
        allow_hyphen_values = true
    )]
    prompt: Option<String>,
    /// Print only the ids, as one list: [id, id, ...]
    #[arg(long)]
    ids: bool,
    /// Tokenize control tokens such as <｜User｜> as plain text (user-defined ones such as <think> still match).
    #[arg(long)]
    no_parse_special: bool,
}

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let path = resolve_model(&args.model)?;
    let model =
        gguf::Model::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let tokenizer = super::generate::tokenizer_of(&model, &path)?;
    let text = match &args.prompt {
        Some(p) => p.clone(),
        None => read_stdin()?,
    };
    if text.is_empty() {
        bail!("the text to tokenize is empty: give it with -p TEXT or on standard input");
    }

    let mut ids = Vec::new();
    if tokenizer.add_bos() {
        ids.extend(tokenizer.bos());
    }
    ids.extend(tokenizer.encode(&text, !args.no_parse_special));
    if tokenizer.add_eos() {
        ids.extend(tokenizer.eos());
    }

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.ids {
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(out, "[{}]", list.join(", "))?;
    } else {
        for &id in &ids {
            // The piece's raw bytes, as llama-tokenize writes them (part of a UTF-8 character included).
            write!(out, "{id:6} -> '")?;
            out.write_all(tokenizer.token_piece(id))?;
            writeln!(out, "'")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The model file: `demo` (generated on first use) or an existing file. The same checks as the other commands'
/// `-m` (`ModelArgs::resolve_path`), without their engine options.
fn resolve_model(model: &Path) -> Result<PathBuf> {
    if model.as_os_str() == DEMO {
        return demo_model();
    }
    if !model.exists() {
        return Err(Hinted::new(
            format!("model file {} does not exist", model.display()),
            "check the path, or pass `-m demo` to use the tiny model ferrite generates itself",
        )
        .into());
    }
    if model.is_dir() {
        return Err(Hinted::new(
            format!("{} is a folder, not a GGUF model file", model.display()),
            "pass the .gguf file (for a split model, any of its shards)",
        )
        .into());
    }
    Ok(model.to_path_buf())
}

/// Every byte of standard input, which must be UTF-8.
fn read_stdin() -> Result<String> {
    let mut stdin = std::io::stdin().lock();
    if stdin.is_terminal() {
        eprintln!("ferrite: reading the text from standard input (end it with Ctrl-D)");
    }
    let mut bytes = Vec::new();
    stdin
        .read_to_end(&mut bytes)
        .context("cannot read the text from standard input")?;
    if bytes.is_empty() {
        return Err(Hinted::new(
            "no text to tokenize: standard input is empty (or closed)",
            "give the text with -p TEXT, or pipe it in: echo 'Hello' | ferrite tokenize -m MODEL",
        )
        .into());
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "standard input is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}
