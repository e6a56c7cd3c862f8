//! Saved sessions: a small binary file with the tokens and the part of every cache tensor they fill (the compressed
//! rows of the completed blocks, the rings), tied to the model and cache sizes it was made with. Written atomically (a temporary file synced and renamed into place); read in place, a chunk at a
//! time, after every size the file claims was checked.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use crate::cache::KvCache;

const MAGIC: &[u8; 8] = b"FERRSES2";

/// Format 1 stored every tensor whole.
const MAGIC_V1: &[u8; 8] = b"FERRSES1";

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

/// Bytes moved between the file and a cache tensor at a time: the only buffer a save or a load holds.
const CHUNK: usize = 4 << 20;

/// Saves `tokens` and `cache` to `path` atomically (see [`gguf::atomic::write_atomically`]), a tensor a chunk at a
/// time.
pub fn save(path: &Path, fp: Fingerprint, cache: &KvCache, tokens: &[u32]) -> Result<()> {
    gguf::atomic::write_atomically(
        path,
        1 << 20,
        |_, out| -> Result<()> {
            out.write_all(MAGIC)?;
            for v in fp.fields() {
                out.write_all(&v.to_le_bytes())?;
            }
            out.write_all(&(tokens.len() as u64).to_le_bytes())?;
            for t in tokens {
                out.write_all(&t.to_le_bytes())?;
            }
            let mut buf = Vec::new();
            for (t, len) in cache.saved_extents(tokens.len()) {
                out.write_all(&(len as u64).to_le_bytes())?;
                let mut at = 0;
                while at < len {
                    let n = CHUNK.min(len - at);
                    buf.resize(n, 0);
                    t.get_bytes_at(at, &mut buf)?;
                    out.write_all(&buf)?;
                    at += n;
                }
            }
            Ok(())
        },
        |_, e| e.into(),
    )
    .with_context(|| format!("cannot save the session to {}", path.display()))
}

/// Whether `path` starts as a ferrite session file does (false for a missing or shorter file).
pub fn is_session_file(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == MAGIC || &magic == MAGIC_V1)
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Bytes of the header: magic, fingerprint, token count.
const HEADER_BYTES: u64 = 8 + 5 * 8 + 8;

/// Reads a session saved by [`save`] into `cache`; returns its tokens. Every size the file claims is checked against
/// the cache and the file's length before anything is read into the cache, which is then filled in place a chunk
/// at a time (the peak is the cache plus one chunk and one layer's transposed keys). An error after those checks
/// (an I/O error half-way) leaves the cache partly overwritten: the caller must reset it.
pub fn load(path: &Path, fp: Fingerprint, cache: &KvCache) -> Result<Vec<u32>> {
    let load = || -> Result<Vec<u32>> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut r = BufReader::new(file);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .context("the file is shorter than a session file's header")?;
        ensure!(
            &magic != MAGIC_V1,
            "it was saved by an earlier ferrite (session format 1), which this one does not read (hint: process the prompt again and save it anew)"
        );
        ensure!(
            &magic == MAGIC,
            "not a ferrite session file (magic {magic:02x?})"
        );
        let mut saved = [0u64; 5];
        for v in &mut saved {
            *v = read_u64(&mut r).context("the file ends inside its header")?;
        }
        if saved != fp.fields() {
            bail!(
                "it was saved with another model or other sizes (model bytes, tensors, -c, --ubatch, cache tensors: saved {saved:?}, now {:?})",
                fp.fields()
            );
        }
        let n_tokens = read_u64(&mut r).context("the file ends inside its header")?;
        ensure!(
            n_tokens <= fp.n_ctx,
            "it claims {n_tokens} tokens, more than the context of {} holds",
            fp.n_ctx
        );
        let extents = cache.saved_extents(n_tokens as usize);
        let sizes: Vec<u64> = extents.iter().map(|&(_, n)| n as u64).collect();
        let expected = sizes
            .iter()
            .fold(HEADER_BYTES + 4 * n_tokens, |sum, &n| sum + 8 + n);
        ensure!(
            file_len == expected,
            "the file has {file_len} bytes, but {n_tokens} tokens and this cache's {} tensors take {expected} (the file is truncated or damaged)",
            sizes.len()
        );
        let mut bytes = vec![0u8; 4 * n_tokens as usize];
        r.read_exact(&mut bytes)?;
        let tokens = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // The tensors' lengths, checked before any byte of the cache is overwritten.
        let mut at = HEADER_BYTES + 4 * n_tokens;
        let mut lens = File::open(path)?;
        for (i, &want) in sizes.iter().enumerate() {
            lens.seek(SeekFrom::Start(at))?;
            let len = read_u64(&mut lens)?;
            ensure!(
                len == want,
                "cache tensor {i} holds {len} bytes, expected {want}"
            );
            at += 8 + want;
        }
        let mut buf = Vec::new();
        for (t, _) in extents {
            let len = read_u64(&mut r)? as usize;
            let mut at = 0;
            while at < len {
                let n = CHUNK.min(len - at);
                buf.resize(n, 0);
                r.read_exact(&mut buf)?;
                t.set_bytes_at(at, &buf)?;
                at += n;
            }
        }
        Ok(tokens)
    };
    load().with_context(|| format!("cannot restore the session from {}", path.display()))
}
