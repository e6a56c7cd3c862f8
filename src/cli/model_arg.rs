//! The `-m MODEL` argument group every command that runs a model flattens in (threads, context, micro-batch,
//! diagnostic switches), `open_engine`, and the generated `-m demo` model in the user's cache folder.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result};
use clap::Args;
use ferrite::cache::CacheType;
use ferrite::engine::{resolve_ctx, Engine, EngineOptions, PagingOptions};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};

use super::Hinted;

/// The word that selects the generated demo model instead of a file.
pub const DEMO: &str = "demo";
/// The demo model's file in the cache folder; bump the version when `TinyConfig::demo()` or the seed changes.
const DEMO_FILE: &str = "demo-v1.gguf";
const DEMO_SEED: u64 = 1;

/// Which model to run and how.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF model file (any shard of a split model), or `demo` for a tiny model ferrite generates (use ./demo for a file named demo).
    #[arg(short = 'm', long = "model", value_name = "MODEL")]
    pub model: PathBuf,
    /// CPU threads [default: all available cores].
    #[arg(short = 't', long = "threads", value_name = "N", value_parser = parse_positive)]
    pub threads: Option<usize>,
    /// Context size in tokens; 0 = the model's trained context [default: min(4096, the model's)].
    #[arg(short = 'c', long = "ctx-size", value_name = "N")]
    pub ctx_size: Option<usize>,
    /// Tokens per micro-batch (one graph computation) while processing a prompt.
    #[arg(long = "ubatch", visible_alias = "ubatch-size", value_name = "N", default_value_t = 512, value_parser = parse_positive)]
    pub ubatch: usize,
    /// Diagnostic: compute with primitive ggml operators instead of the DeepSeek V4 ones (same maths, slower).
    #[arg(long)]
    pub no_fused_ops: bool,
    /// How the context cache stores key rows: f16 (half the memory, llama.cpp's default) or f32.
    #[arg(long = "cache-type", visible_alias = "ctk", value_name = "TYPE", default_value = "f16", value_parser = parse_cache_type)]
    pub cache_type: CacheType,
}

fn parse_cache_type(s: &str) -> Result<CacheType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f16" => Ok(CacheType::F16),
        "f32" => Ok(CacheType::F32),
        other => Err(format!("{other:?} is not a cache type; use f16 or f32")),
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

impl ModelArgs {
    pub fn is_demo(&self) -> bool {
        self.model.as_os_str() == DEMO
    }

    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// The context size for `engine`: `-c`, 0 meaning the model's trained context, by default at most 4096.
    /// Warns on stderr when it exceeds the trained context.
    pub fn n_ctx(&self, engine: &Engine) -> usize {
        let trained = engine.config().n_ctx_train;
        let n_ctx = resolve_ctx(engine.config(), self.ctx_size);
        if trained > 0 && n_ctx > trained {
            eprintln!(
                "ferrite: warning: -c {n_ctx} is beyond the {trained} tokens the model was trained on; quality may suffer"
            );
        }
        n_ctx
    }

    /// The model file: the path given (checked to exist), or the demo model, generated on first use.
    pub fn resolve_path(&self) -> Result<PathBuf> {
        if self.is_demo() {
            return demo_model();
        }
        let path = &self.model;
        if !path.exists() {
            return Err(Hinted::new(
                format!("model file {} does not exist", path.display()),
                "check the path, or pass `-m demo` to run a tiny model ferrite generates itself",
            )
            .into());
        }
        if path.is_dir() {
            return Err(Hinted::new(
                format!("{} is a folder, not a GGUF model file", path.display()),
                "pass the .gguf file (for a split model, any of its shards); to convert a Hugging Face checkpoint use `ferrite quantize`",
            )
            .into());
        }
        Ok(path.clone())
    }
}

/// Opens the model of `args` (generating the demo model if asked for) and prints the model's warnings on stderr.
pub fn open_engine(args: &ModelArgs) -> Result<Engine> {
    let path = args.resolve_path()?;
    let opts = EngineOptions {
        n_threads: args.threads(),
        fused_ops: !args.no_fused_ops,
        cache_type: args.cache_type,
        paging: PagingOptions {
            ctx_size: args.ctx_size,
            n_ubatch: Some(args.ubatch),
            ..PagingOptions::default()
        },
    };
    let engine = Engine::open(&path, opts)?;
    for warning in &engine.config().warnings {
        eprintln!("ferrite: warning: {}: {warning}", path.display());
    }
    Ok(engine)
}

/// ferrite's cache folder: $FERRITE_CACHE_DIR, else $XDG_CACHE_HOME/ferrite, else ~/.cache/ferrite.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("FERRITE_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    // The XDG spec says to ignore relative paths.
    if let Some(xdg) = var("XDG_CACHE_HOME").map(PathBuf::from) {
        if xdg.is_absolute() {
            return Ok(xdg.join("ferrite"));
        }
    }
    match var("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("ferrite")),
        None => Err(Hinted::new(
            "cannot find a cache folder for the demo model: neither FERRITE_CACHE_DIR, XDG_CACHE_HOME nor HOME is set",
            "set FERRITE_CACHE_DIR to a writable folder",
        )
        .into()),
    }
}

/// The demo model's path, generating the file first if it is not there yet.
pub fn demo_model() -> Result<PathBuf> {
    let dir = cache_dir()?;
    let path = dir.join(DEMO_FILE);
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
    eprintln!(
        "ferrite: generating the demo model (once) into {}",
        path.display()
    );
    generate_demo(&path)?;
    Ok(path)
}

/// Writes the demo model under a name unique to this process and call, then renames it into place. Concurrent
/// first uses each write their own file and rename identical bytes over each other: readers only ever see a
/// complete file.
fn generate_demo(path: &Path) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{DEMO_FILE}.gen-{}-{n}", std::process::id()));
    let result = write_tiny_model(&tmp, &TinyConfig::demo(), DEMO_SEED)
        .map_err(anyhow::Error::from)
        .and_then(|_| fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write the demo model to {}", path.display()))
}
