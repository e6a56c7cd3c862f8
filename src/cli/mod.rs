//! Command-line interface: one file per subcommand; `run` dispatches, `print_error` reports failures.

mod info;

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
    /// Show a GGUF file's metadata, tensor table and, for DeepSeek V4, the sizes an expert cache is planned from.
    Info(info::InfoArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info(args) => info::run(&args),
    }
}

/// True when the error is a closed stdout (`ferrite info M | head`): not worth a message.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Prints `ferrite: error: outer: inner: ...` once on stderr, then a hint when one applies.
pub fn print_error(err: &anyhow::Error) {
    let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "ferrite: error: {}", chain.join(": "));
    let hint = err
        .chain()
        .find_map(|e| e.downcast_ref::<gguf::GgufError>())
        .and_then(|e| e.hint());
    if let Some(hint) = hint {
        let _ = writeln!(stderr, "hint: {hint}");
    }
}
