//! The `ferrite` command: parses arguments, runs one subcommand, prints an error chain once, sets the exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse_from(cli::llama_flags(std::env::args_os()));
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if cli::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            cli::print_error(&err);
            ExitCode::FAILURE
        }
    }
}
