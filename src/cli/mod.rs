//! Command-line interface: one file per subcommand; `run` dispatches, `print_error` reports failures.

mod bench;
mod chat;
mod complete;
mod generate;
mod info;
mod logits;
mod model_arg;
mod perplexity;
mod quantize;
mod rpc_server;
mod size_arg;
mod tokenize;

use std::io::Write;

use clap::{Parser, Subcommand};

/// Exit codes: 0 success, 1 an error while running (bad file, I/O, ...), 2 bad command-line usage (from clap).
#[derive(Parser, Debug)]
#[command(name = "ferrite", version, about = "Run DeepSeek V4 from GGUF files on hardware you own", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One answer to a prompt (-p TEXT, -f FILE or standard input), streamed to stdout; timings on stderr.
    Complete(complete::CompleteArgs),
    /// Interactive chat in the terminal (or one user turn per line of standard input when it is not a terminal).
    Chat(chat::ChatArgs),
    /// Show a GGUF file's metadata, tensor table and, for DeepSeek V4, the sizes an expert cache is planned from.
    Info(info::InfoArgs),
    /// Write every position's logits for a list of token ids to a NumPy file (float32 [n_tokens, n_vocab]).
    Logits(logits::LogitsArgs),
    /// Print the tokens of a text (-p TEXT or standard input) as llama.cpp's llama-tokenize does.
    Tokenize(tokenize::TokenizeArgs),
    /// Perplexity of the model over a text file, computed as llama.cpp's llama-perplexity does.
    Perplexity(perplexity::PerplexityArgs),
    /// Prompt-processing and generation speed as llama-bench measures it (--vs-llama: next to llama.cpp).
    Bench(bench::BenchArgs),
    /// Serve a device of this machine to other ferrite (or llama.cpp) processes over ggml's RPC protocol (`--rpc`).
    RpcServer(rpc_server::RpcServerArgs),
    /// Convert a Hugging Face DeepSeek V4 checkpoint or requantize a GGUF to a named recipe (Q4_K_M, Q8_0, ...).
    Quantize(quantize::QuantizeArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Complete(args) => complete::run(&args),
        Command::Chat(args) => chat::run(&args),
        Command::Info(args) => info::run(&args),
        Command::Logits(args) => logits::run(&args),
        Command::Tokenize(args) => tokenize::run(&args),
        Command::Perplexity(args) => perplexity::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Quantize(args) => quantize::run(&args),
        Command::RpcServer(args) => rpc_server::run(&args),
    }
}

/// True when the error is a closed stdout (`ferrite info M | head`): not worth a message.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// An error that comes with advice for the user: `print_error` prints the advice as the hint.
#[derive(Debug)]
pub struct Hinted {
    message: String,
    hint: String,
}

impl Hinted {
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Hinted {
        Hinted {
            message: message.into(),
            hint: hint.into(),
        }
    }
}

impl std::fmt::Display for Hinted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Hinted {}

/// Prints `ferrite: error: outer: inner: ...` once on stderr, then a hint when one applies.
pub fn print_error(err: &anyhow::Error) {
    let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "ferrite: error: {}", chain.join(": "));
    let hint = err.chain().find_map(|e| {
        e.downcast_ref::<Hinted>()
            .map(|h| h.hint.as_str())
            .or_else(|| e.downcast_ref::<gguf::GgufError>().and_then(|g| g.hint()))
    });
    if let Some(hint) = hint {
        let _ = writeln!(stderr, "hint: {hint}");
    }
}
