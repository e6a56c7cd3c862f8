//! Reading routed experts into slots: where each (layer, expert)'s gate, up and down slabs lie in the model's
//! file(s), and large positioned reads (`pread`) of them into caller-provided buffers, several in parallel.
//!
//! A stacked expert tensor `blk.L.ffn_{gate,up,down}_exps.weight` has the shape `{n_in, n_out, n_expert}`; expert
//! `e`'s slab is contiguous: bytes `[e * slab, (e + 1) * slab)` of the tensor, `slab = row_bytes(n_in) * n_out`.
//! Reads go to owned buffers rather than through the map: page faults read one page at a time at queue depth
//! about 1, while parallel `pread`s of whole slabs keep the device busy (ANCHORS.md (c) item 3: pread slabs about
//! 25 % faster than the page cache as cache; at 9 reads in flight random 9.3 MiB reads match sequential ones).
//!
//! Where the destination allows it (a slot whose room starts on a page boundary, with the slab placed at the same
//! offset within a page as in the file), slabs are read with `O_DIRECT`: the device writes straight into the slot,
//! with no copy through the page cache. That copy cost a core about 0.5-0.9 s per GB read on the 2-core machine of
//! bench/README.md (0.15 s direct), time prompt processing needs for computing.
//!
//! [`ExpertReader`] is `Sync`: a store may read misses on a background thread while hits are computed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gguf::Model;

use super::policy::{ExpertKey, SlotId};
use crate::os::{advise_file, is_invalid_argument, open_direct, FileAdvice};

mod direct;
mod layout;

pub use direct::{direct_room, DIRECT_ALIGN};
use direct::{direct_span, read_direct};
pub use layout::{ExpertLayout, LayerSlabs, SlabRange, SlabTensor};

/// The parts of an expert, in slot order.
pub const PARTS: [&str; 3] = ["gate", "up", "down"];

/// Default read threads: reads mostly wait on the device, so more threads than cores pay; 8 keeps about as many
/// reads in flight as ds4 measured to saturate NVMe.
pub const DEFAULT_READ_THREADS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ExpertIoError {
    #[error("{path}: cannot open the model file for expert reads: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tensor}: {why}")]
    Layout { tensor: String, why: String },
    #[error("{key} is not in the model: {why}")]
    NoSuchExpert { key: ExpertKey, why: String },
    #[error("{key}: the {part} buffer holds {got} bytes, its slab of {tensor} needs {needed}")]
    Destination {
        key: ExpertKey,
        part: &'static str,
        tensor: String,
        needed: u64,
        got: usize,
    },
    #[error("{path}: short read of {tensor} for {key}: {len} bytes at offset {offset}, but the file ends first (was it truncated or replaced after opening?)")]
    ShortRead {
        path: PathBuf,
        tensor: String,
        key: ExpertKey,
        offset: u64,
        len: u64,
    },
    #[error("{path}: reading {tensor} for {key} ({len} bytes at offset {offset}): {source}")]
    Read {
        path: PathBuf,
        tensor: String,
        key: ExpertKey,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start an expert read thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("{key}: the {part} slab in the slot differs from {tensor} in the file at byte {byte} of the slab")]
    Mismatch {
        key: ExpertKey,
        part: &'static str,
        tensor: String,
        byte: usize,
    },
    #[error("{key}: cannot read into slot {slot}: {why}")]
    Slot {
        key: ExpertKey,
        slot: SlotId,
        why: String,
    },
}

/// The buffers of one slot: gate, up and down. Part `i`'s slab goes to `parts[i][at[i]..]`, which must hold it (a
/// slot sized for the largest layer takes any layer's expert). The bytes before `at[i]` and after the slab are
/// the part's own: a direct read may write them (see [`direct_room`]).
#[derive(Debug)]
pub struct SlotBuffers<'a> {
    pub parts: [&'a mut [u8]; 3],
    pub at: [usize; 3],
}

impl<'a> SlotBuffers<'a> {
    /// Slabs at the start of each buffer.
    pub fn new(gate: &'a mut [u8], up: &'a mut [u8], down: &'a mut [u8]) -> SlotBuffers<'a> {
        SlotBuffers {
            parts: [gate, up, down],
            at: [0; 3],
        }
    }

    /// Slab `i` at offset `at[i]` of its buffer.
    pub fn at(self, at: [usize; 3]) -> SlotBuffers<'a> {
        SlotBuffers { at, ..self }
    }

    /// A packed slot (gate | up | down back to back, ANCHORS.md (c) item 4) cut at `part_bytes`, e.g.
    /// [`ExpertLayout::max_slab_bytes`]; `None` when `buf` is shorter than their sum.
    pub fn packed(buf: &'a mut [u8], part_bytes: [u64; 3]) -> Option<SlotBuffers<'a>> {
        let [g, u, _] = part_bytes.map(|b| usize::try_from(b).ok());
        let total = part_bytes.iter().try_fold(0u64, |s, &b| s.checked_add(b))?;
        if (buf.len() as u64) < total {
            return None;
        }
        let (gate, rest) = buf.split_at_mut(g?);
        let (up, down) = rest.split_at_mut(u?);
        Some(SlotBuffers::new(gate, up, down))
    }
}

/// Read `key` into `dest`.
#[derive(Debug)]
pub struct ReadJob<'a> {
    pub key: ExpertKey,
    pub dest: SlotBuffers<'a>,
}

/// What a batch of reads did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadReport {
    pub bytes: u64,
    /// Bytes of slabs read with `O_DIRECT` (straight into their slots).
    pub direct_bytes: u64,
    /// Read calls issued (one per slab, or more with [`ReadOptions::split_bytes`]).
    pub reads: u64,
    pub experts: u64,
    /// Wall time of the whole batch.
    pub elapsed: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOptions {
    /// Reads in flight at most (threads); 1 reads on the calling thread.
    pub threads: usize,
    /// Splits slabs larger than this into reads of this size (more reads in flight for few experts); 0 reads
    /// each slab whole.
    pub split_bytes: u64,
    /// Reads leave no page cache behind: no readahead, and what was read is dropped (when memory is tight the expert
    /// cache is the only copy worth keeping; the OS's would push out the pool or the resident weights).
    pub drop_cache: bool,
    /// Read with `O_DIRECT` where the file system and the destination allow it (see the module's notes).
    pub direct: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            threads: DEFAULT_READ_THREADS,
            split_bytes: 0,
            drop_cache: false,
            direct: true,
        }
    }
}

/// Reads experts from the model's files, opened once.
#[derive(Debug)]
pub struct ExpertReader {
    layout: ExpertLayout,
    files: Vec<File>,
    /// The same files opened with `O_DIRECT`, where the file system allows it.
    direct: Vec<Option<File>>,
    opts: ReadOptions,
}

/// One read call of a batch.
struct Chunk<'a> {
    /// Position in the batch (the error of the first failing chunk is reported, whatever the thread timing).
    order: usize,
    key: ExpertKey,
    part: usize,
    shard: usize,
    offset: u64,
    buf: &'a mut [u8],
    /// A direct read: `buf` and `offset` are aligned, and only the first `must` bytes have to be read (the rest
    /// rounds the read up to a whole page and may lie past the end of the file).
    direct: Option<usize>,
}

impl ExpertReader {
    /// Lays out `model`'s experts and opens its shard files for reading.
    pub fn open(model: &Model, opts: ReadOptions) -> Result<ExpertReader, ExpertIoError> {
        ExpertReader::with_layout(ExpertLayout::from_model(model)?, opts)
    }

    /// Opens the files of `layout`.
    pub fn with_layout(
        layout: ExpertLayout,
        opts: ReadOptions,
    ) -> Result<ExpertReader, ExpertIoError> {
        let files = layout
            .paths()
            .iter()
            .map(|p| {
                File::open(p).map_err(|source| ExpertIoError::Open {
                    path: p.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if opts.drop_cache {
            for f in &files {
                advise_file(f, 0, 0, FileAdvice::Random);
            }
        }
        let direct = layout
            .paths()
            .iter()
            .map(|p| opts.direct.then(|| open_direct(p)).flatten())
            .collect();
        Ok(ExpertReader {
            layout,
            files,
            direct,
            opts,
        })
    }

    /// Whether reads of shard `shard` may go direct (its file opened with `O_DIRECT`).
    pub fn can_read_direct(&self, shard: usize) -> bool {
        self.direct.get(shard).is_some_and(Option::is_some)
    }

    pub fn layout(&self) -> &ExpertLayout {
        &self.layout
    }

    pub fn options(&self) -> ReadOptions {
        self.opts
    }

    /// Reads every job's expert into its buffers, up to [`ReadOptions::threads`] reads at a time. Checks every key
    /// and buffer before reading anything. On an error the other reads stop early and the buffers' contents are
    /// unspecified; the error names the file, tensor, expert and range.
    pub fn read(&self, jobs: Vec<ReadJob<'_>>) -> Result<ReadReport, ExpertIoError> {
        self.read_with(jobs, self.opts)
    }

    fn read_with<'b>(
        &self,
        jobs: Vec<ReadJob<'b>>,
        opts: ReadOptions,
    ) -> Result<ReadReport, ExpertIoError> {
        let start = Instant::now();
        let n_experts = jobs.len() as u64;
        let mut chunks = Vec::new();
        let (mut bytes, mut direct_bytes) = (0u64, 0u64);
        for job in jobs {
            let l = self.layout.slabs(job.key)?;
            let dest = job.dest;
            for (part, (buf, t)) in dest.parts.into_iter().zip(&l.parts).enumerate() {
                let at = dest.at[part];
                let need = usize::try_from(t.slab_bytes)
                    .ok()
                    .filter(|&n| at.checked_add(n).is_some_and(|end| end <= buf.len()));
                let Some(need) = need else {
                    return Err(ExpertIoError::Destination {
                        key: job.key,
                        part: PARTS[part],
                        tensor: t.name.clone(),
                        needed: t.slab_bytes,
                        got: buf.len().saturating_sub(at),
                    });
                };
                bytes += t.slab_bytes;
                let piece = match usize::try_from(opts.split_bytes) {
                    Ok(n) if n > 0 => n,
                    _ => need.max(1),
                };
                let offset = t.slab_offset(job.key.expert);
                let mut push = |buf: &'b mut [u8], offset: u64, direct: Option<usize>| {
                    chunks.push(Chunk {
                        order: chunks.len(),
                        key: job.key,
                        part,
                        shard: t.shard,
                        offset,
                        buf,
                        direct,
                    })
                };
                let direct = direct_span(buf.as_ptr() as usize, buf.len(), at, need, offset)
                    .filter(|_| opts.direct && self.can_read_direct(t.shard));
                if let Some((span, lead)) = direct {
                    // Pages of the slot from the page that holds the slab's first byte; pieces of whole pages.
                    let span = &mut buf[span];
                    direct_bytes += t.slab_bytes;
                    let piece = piece.next_multiple_of(DIRECT_ALIGN);
                    let mut must = lead + need;
                    let mut offset = offset - lead as u64;
                    for buf in span.chunks_mut(piece) {
                        let len = buf.len();
                        push(buf, offset, Some(must.min(len)));
                        must = must.saturating_sub(len);
                        offset += len as u64;
                    }
                } else {
                    let mut offset = offset;
                    for buf in buf[at..at + need].chunks_mut(piece) {
                        let len = buf.len() as u64;
                        push(buf, offset, None);
                        offset += len;
                    }
                }
            }
        }
        let reads = chunks.len() as u64;
        let threads = opts.threads.clamp(1, chunks.len().max(1));
        if threads == 1 {
            for c in chunks {
                self.read_chunk(c)?;
            }
        } else {
            self.read_parallel(chunks, threads)?;
        }
        Ok(ReadReport {
            bytes,
            direct_bytes,
            reads,
            experts: n_experts,
            elapsed: start.elapsed(),
        })
    }

    /// Runs `chunks` on `threads` scoped threads that take the next chunk as they finish one.
    fn read_parallel(
        &self,
        mut chunks: Vec<Chunk<'_>>,
        threads: usize,
    ) -> Result<(), ExpertIoError> {
        chunks.reverse(); // popped from the end: issued in batch order
        let queue = Mutex::new(chunks);
        let failed = AtomicBool::new(false);
        let errors: Mutex<Vec<(usize, ExpertIoError)>> = Mutex::new(Vec::new());
        let worker = || loop {
            if failed.load(Ordering::Relaxed) {
                return;
            }
            let next = match queue.lock() {
                Ok(mut q) => q.pop(),
                Err(poisoned) => poisoned.into_inner().pop(),
            };
            let Some(chunk) = next else {
                return;
            };
            let order = chunk.order;
            if let Err(e) = self.read_chunk(chunk) {
                failed.store(true, Ordering::Relaxed);
                match errors.lock() {
                    Ok(mut v) => v.push((order, e)),
                    Err(poisoned) => poisoned.into_inner().push((order, e)),
                }
            }
        };
        let spawned = std::thread::scope(|scope| {
            for i in 0..threads {
                let builder = std::thread::Builder::new().name(format!("expert-read-{i}"));
                if let Err(e) = builder.spawn_scoped(scope, worker) {
                    // The threads already started finish the queue; report the failure only if none started.
                    if i == 0 {
                        return Err(ExpertIoError::Thread(e));
                    }
                    break;
                }
            }
            Ok(())
        });
        spawned?;
        let errors = match errors.into_inner() {
            Ok(v) => v,
            Err(poisoned) => poisoned.into_inner(),
        };
        match errors.into_iter().min_by_key(|(order, _)| *order) {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    fn read_chunk(&self, c: Chunk<'_>) -> Result<(), ExpertIoError> {
        let path = &self.layout.paths()[c.shard];
        let tensor = || {
            self.layout
                .layer(c.key.layer)
                .map_or_else(String::new, |l| l.parts[c.part].name.clone())
        };
        let file = self
            .files
            .get(c.shard)
            .ok_or_else(|| ExpertIoError::Layout {
                tensor: tensor(),
                why: format!(
                    "lies in shard {} but {} files are open",
                    c.shard,
                    self.files.len()
                ),
            })?;
        let len = c.buf.len() as u64;
        let direct = c
            .direct
            .zip(self.direct.get(c.shard).and_then(Option::as_ref));
        let read = match direct {
            Some((must, direct)) => match read_direct(direct, c.buf, c.offset, must) {
                // A file system that takes O_DIRECT opens but refuses the read: the same bytes, buffered.
                Err(e) if is_invalid_argument(&e) => {
                    file.read_exact_at(&mut c.buf[..must], c.offset)
                }
                r => r,
            },
            None => file.read_exact_at(c.buf, c.offset),
        };
        if self.opts.drop_cache && direct.is_none() {
            advise_file(file, c.offset, len, FileAdvice::DontNeed);
        }
        read.map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                ExpertIoError::ShortRead {
                    path: path.clone(),
                    tensor: tensor(),
                    key: c.key,
                    offset: c.offset,
                    len,
                }
            } else {
                ExpertIoError::Read {
                    path: path.clone(),
                    tensor: tensor(),
                    key: c.key,
                    offset: c.offset,
                    len,
                    source,
                }
            }
        })
    }
}
