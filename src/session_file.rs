//! Saved sessions: a small binary file with the tokens and every cache tensor, tied to the model and cache sizes
//! it was made with. Written through a temporary file that is renamed into place.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::cache::KvCache;

const MAGIC: &[u8; 8] = b"FERRSES1";

/// What a saved session must match to be restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    pub model_bytes: u64,
    pub n_tensors: u64,
    pub n_ctx: u64,
    pub n_ubatch: u64,
    pub cache_tensors: u64,
}

impl Fingerprint {
    fn fields(&self) -> [u64; 5] {
        [
            self.model_bytes,
            self.n_tensors,
            self.n_ctx,
            self.n_ubatch,
            self.cache_tensors,
        ]
    }
}

pub fn save(path: &Path, fp: Fingerprint, cache: &KvCache, tokens: &[u32]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut out = BufWriter::new(File::create(&tmp)?);
        out.write_all(MAGIC)?;
        for v in fp.fields() {
            out.write_all(&v.to_le_bytes())?;
        }
        out.write_all(&(tokens.len() as u64).to_le_bytes())?;
        for t in tokens {
            out.write_all(&t.to_le_bytes())?;
        }
        for data in cache.snapshot()? {
            out.write_all(&(data.len() as u64).to_le_bytes())?;
            out.write_all(&data)?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot save the session to {}", path.display()))
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a session saved by [`save`] into `cache`; returns its tokens.
pub fn load(path: &Path, fp: Fingerprint, cache: &KvCache) -> Result<Vec<u32>> {
    let load = || -> Result<Vec<u32>> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut r = BufReader::new(file);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        ensure!(
            &magic == MAGIC,
            "not a ferrite session file (magic {magic:02x?})"
        );
        let mut saved = [0u64; 5];
        for v in &mut saved {
            *v = read_u64(&mut r)?;
        }
        if saved != fp.fields() {
            bail!(
                "it was saved with another model or other sizes (model bytes, tensors, -c, --ubatch, cache tensors: saved {saved:?}, now {:?})",
                fp.fields()
            );
        }
        let n_tokens = read_u64(&mut r)?;
        ensure!(
            n_tokens <= fp.n_ctx && n_tokens * 4 <= file_len,
            "it claims {n_tokens} tokens, more than it can hold"
        );
        let mut tokens = Vec::with_capacity(n_tokens as usize);
        for _ in 0..n_tokens {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)?;
            tokens.push(u32::from_le_bytes(b));
        }
        let expected: Vec<usize> = cache.snapshot()?.iter().map(Vec::len).collect();
        let mut data = Vec::with_capacity(expected.len());
        for (i, &want) in expected.iter().enumerate() {
            let len = read_u64(&mut r)?;
            ensure!(
                len == want as u64,
                "cache tensor {i} holds {len} bytes, expected {want}"
            );
            let mut bytes = vec![0u8; want];
            r.read_exact(&mut bytes)?;
            data.push(bytes);
        }
        cache.restore(&data)?;
        Ok(tokens)
    };
    load().with_context(|| format!("cannot restore the session from {}", path.display()))
}
