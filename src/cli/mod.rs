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

use std::ffi::OsString;
use std::io::Write;

use clap::{CommandFactory, Parser, Subcommand};

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

/// llama.cpp's single-dash long flags and the names ferrite's parser knows them by.
const LLAMA_FLAGS: [(&str, &str); 5] = [
    ("-ngl", "--n-gpu-layers"),
    ("-ot", "--override-tensor"),
    ("-dev", "--device"),
    ("-cmoe", "--cpu-moe"),
    ("-ncmoe", "--n-cpu-moe"),
];

/// The command line with llama.cpp's single-dash long flags (`-ngl 99`, `-ot exps=CPU`, `-dev CUDA0`, `-cmoe`,
/// `-ncmoe 4`) spelled as ferrite's long ones, for the subcommands that have them (clap reads `-ngl` as `-n gl`).
/// A word that is the value of the option before it (`-p -ngl`) and anything after `--` are left alone.
pub fn llama_flags(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let args: Vec<OsString> = args.into_iter().collect();
    let cmd = Cli::command();
    let Some((at, sub)) = args.iter().enumerate().skip(1).find_map(|(i, a)| {
        let a = a.to_str()?;
        cmd.find_subcommand(a).map(|s| (i, s))
    }) else {
        return args;
    };
    let takes_value = |word: &str| -> bool {
        let arg = if let Some(long) = word.strip_prefix("--") {
            if long.contains('=') {
                return false;
            }
            sub.get_arguments().find(|a| {
                a.get_long() == Some(long) || a.get_all_aliases().is_some_and(|v| v.contains(&long))
            })
        } else if let Some(shorts) = word.strip_prefix('-') {
            // A cluster (`-t4`, `-vn 5`): the first short that takes a value takes the rest or the next word.
            let mut found = None;
            for (i, c) in shorts.char_indices() {
                match sub.get_arguments().find(|a| a.get_short() == Some(c)) {
                    Some(a) if a.get_action().takes_values() => {
                        found = (i + c.len_utf8() == shorts.len()).then_some(a);
                        break;
                    }
                    Some(_) => continue,
                    None => break,
                }
            }
            found
        } else {
            None
        };
        arg.is_some_and(|a| a.get_action().takes_values())
    };
    let mut out = args[..=at].to_vec();
    let mut value_next = false;
    let mut rest = args[at + 1..].iter();
    for word in rest.by_ref() {
        let Some(w) = word.to_str() else {
            out.push(word.clone());
            value_next = false;
            continue;
        };
        if value_next {
            out.push(word.clone());
            value_next = false;
            continue;
        }
        if w == "--" {
            out.push(word.clone());
            break;
        }
        let long = LLAMA_FLAGS
            .iter()
            .find(|(short, _)| *short == w)
            .map(|&(_, long)| long)
            .filter(|long| {
                sub.get_arguments()
                    .any(|a| a.get_long() == long.strip_prefix("--"))
            });
        match long {
            Some(long) => {
                out.push(long.into());
                value_next = takes_value(long);
            }
            None => {
                out.push(word.clone());
                value_next = w.starts_with('-') && w != "-" && takes_value(w);
            }
        }
    }
    out.extend(rest.cloned());
    out
}

impl Command {
    /// The device flags of a command that runs the model.
    fn device_args(&self) -> Option<&model_arg::DeviceArgs> {
        match self {
            Command::Complete(a) => Some(&a.model.memory.devices),
            Command::Chat(a) => Some(&a.model.memory.devices),
            Command::Logits(a) => Some(&a.model.memory.devices),
            Command::Perplexity(a) => Some(&a.model.memory.devices),
            Command::Bench(a) => Some(&a.memory.devices),
            Command::Info(_)
            | Command::Tokenize(_)
            | Command::Quantize(_)
            | Command::RpcServer(_) => None,
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(d) = cli.command.device_args().filter(|d| d.list_devices) {
        return model_arg::list_devices(d);
    }
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

    pub fn hint(&self) -> &str {
        &self.hint
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

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(line: &str) -> String {
        let words = line.split(' ').map(OsString::from);
        let out = llama_flags(words);
        let out: Vec<String> = out.into_iter().map(|w| w.into_string().unwrap()).collect();
        out.join(" ")
    }

    #[test]
    fn llama_single_dash_flags() {
        assert_eq!(
            expand("ferrite complete -m demo -ngl 99 -ot exps=CPU -dev CUDA0 -cmoe -ncmoe 4"),
            "ferrite complete -m demo --n-gpu-layers 99 --override-tensor exps=CPU --device CUDA0 --cpu-moe --n-cpu-moe 4"
        );
        // Values of options stay as they are, flags after them are still rewritten.
        assert_eq!(
            expand("ferrite complete -p -ngl -ngl 3 --system -ot -t4 -ot a=CPU"),
            "ferrite complete -p -ngl --n-gpu-layers 3 --system -ot -t4 --override-tensor a=CPU"
        );
        // A flag's value given as the next word is its value even when it looks like a flag.
        assert_eq!(
            expand("ferrite bench -m demo -ot -ngl"),
            "ferrite bench -m demo --override-tensor -ngl"
        );
        // After `--`, and for commands without the flag, nothing changes.
        assert_eq!(
            expand("ferrite complete -- -ngl"),
            "ferrite complete -- -ngl"
        );
        assert_eq!(expand("ferrite info -ngl x"), "ferrite info -ngl x");
        assert_eq!(expand("ferrite -ngl"), "ferrite -ngl");
    }
}
