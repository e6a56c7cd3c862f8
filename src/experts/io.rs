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

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gguf::{GgmlType, Model};

use super::policy::{ExpertKey, Load, SlotId};
use crate::ggml::{advise_file, FileAdvice};
use crate::model::sizes::{expert_tensor_layer, EXPERT_TENSORS};

/// The parts of an expert, in slot order.
pub const PARTS: [&str; 3] = ["gate", "up", "down"];

/// Alignment of direct reads: file offset, length and memory address (the page size; covers devices with 512-byte
/// and 4096-byte logical blocks).
pub const DIRECT_ALIGN: usize = 4096;

/// Room for one part in a slot that takes direct reads of slabs of up to `max_slab` bytes at any offset within a
/// page: the slab rounded up to pages, plus one page for the bytes before it in its first page and after it in its
/// last.
pub fn direct_room(max_slab: u64) -> u64 {
    max_slab.next_multiple_of(DIRECT_ALIGN as u64) + DIRECT_ALIGN as u64
}

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

/// Where the slabs of one stacked expert tensor lie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlabTensor {
    /// `blk.L.ffn_gate_exps.weight` and so on.
    pub name: String,
    pub ty: GgmlType,
    /// `{n_in, n_out, n_expert}`.
    pub dims: [u64; 3],
    /// Index of the shard file that holds it.
    pub shard: usize,
    /// Byte offset of the tensor's data in that file.
    pub file_offset: u64,
    /// Bytes of one expert's slab.
    pub slab_bytes: u64,
}

impl SlabTensor {
    /// File offset of expert `e`'s slab (checked against `n_expert` at layout time).
    pub fn slab_offset(&self, expert: u32) -> u64 {
        self.file_offset + u64::from(expert) * self.slab_bytes
    }
}

/// The routed experts of one layer: gate, up and down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSlabs {
    pub layer: u32,
    pub n_expert: u32,
    pub parts: [SlabTensor; 3],
}

impl LayerSlabs {
    /// Bytes of one expert (gate + up + down).
    pub fn expert_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.slab_bytes).sum()
    }
}

/// One slab read: `len` bytes at `offset` of shard `shard`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlabRange {
    pub part: usize,
    pub shard: usize,
    pub offset: u64,
    pub len: u64,
}

/// Where every routed expert of a model lies, validated once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertLayout {
    layers: BTreeMap<u32, LayerSlabs>,
    paths: Vec<PathBuf>,
}

impl ExpertLayout {
    /// Finds and checks the stacked expert tensors of `model`: three per layer with the same expert count, 3-D,
    /// sizes matching their type and shape, data inside their file.
    pub fn from_model(model: &Model) -> Result<ExpertLayout, ExpertIoError> {
        let mut found: BTreeMap<u32, [Option<SlabTensor>; 3]> = BTreeMap::new();
        for t in model.tensors() {
            let Some(layer) = expert_tensor_layer(&t.info.name) else {
                continue;
            };
            let part = EXPERT_TENSORS
                .iter()
                .position(|kind| t.info.name.ends_with(&format!(".{kind}.weight")))
                .unwrap_or(0);
            let shard = model
                .shards()
                .get(t.shard)
                .ok_or_else(|| ExpertIoError::Layout {
                    tensor: t.info.name.clone(),
                    why: format!("lies in shard {} of {}", t.shard, model.shards().len()),
                })?;
            let slab = slab_tensor(
                &t.info,
                t.shard,
                shard.header().data_offset,
                shard.header().file_len,
            )?;
            found.entry(layer).or_default()[part] = Some(slab);
        }
        let mut layers = BTreeMap::new();
        for (layer, parts) in found {
            let [gate, up, down] = parts;
            let name = |i: usize| format!("blk.{layer}.{}.weight", EXPERT_TENSORS[i]);
            let missing = |i: usize| {
                ExpertIoError::Layout {
                tensor: name(i),
                why: format!(
                    "is missing while layer {layer} has other routed-expert tensors ({}, {}, {} go together)",
                    EXPERT_TENSORS[0], EXPERT_TENSORS[1], EXPERT_TENSORS[2]
                ),
            }
            };
            let parts = [
                gate.ok_or_else(|| missing(0))?,
                up.ok_or_else(|| missing(1))?,
                down.ok_or_else(|| missing(2))?,
            ];
            let n_expert = parts[0].dims[2];
            if let Some(p) = parts.iter().find(|p| p.dims[2] != n_expert) {
                return Err(ExpertIoError::Layout {
                    tensor: p.name.clone(),
                    why: format!(
                        "has {} experts, {} has {n_expert}",
                        p.dims[2], parts[0].name
                    ),
                });
            }
            let n_expert = u32::try_from(n_expert).map_err(|_| ExpertIoError::Layout {
                tensor: parts[0].name.clone(),
                why: format!("has {n_expert} experts, more than a u32 counts"),
            })?;
            layers.insert(
                layer,
                LayerSlabs {
                    layer,
                    n_expert,
                    parts,
                },
            );
        }
        let paths = model
            .shards()
            .iter()
            .map(|s| s.path().to_path_buf())
            .collect();
        Ok(ExpertLayout { layers, paths })
    }

    /// Layers with routed experts, in order.
    pub fn layers(&self) -> impl Iterator<Item = &LayerSlabs> {
        self.layers.values()
    }

    pub fn layer(&self, layer: u32) -> Option<&LayerSlabs> {
        self.layers.get(&layer)
    }

    /// The shard files, in order.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Bytes of one expert of `layer` (gate + up + down).
    pub fn expert_bytes(&self, layer: u32) -> Option<u64> {
        self.layer(layer).map(LayerSlabs::expert_bytes)
    }

    /// The largest slab of each part over all layers: the per-part size of a slot that can hold any expert.
    pub fn max_slab_bytes(&self) -> [u64; 3] {
        let mut m = [0u64; 3];
        for l in self.layers() {
            for (i, p) in l.parts.iter().enumerate() {
                m[i] = m[i].max(p.slab_bytes);
            }
        }
        m
    }

    /// Bytes of a slot that can hold any expert.
    pub fn slot_bytes(&self) -> u64 {
        self.max_slab_bytes().iter().sum()
    }

    /// The layer's slabs, checking `key` is an expert of the model.
    pub fn slabs(&self, key: ExpertKey) -> Result<&LayerSlabs, ExpertIoError> {
        let l = self
            .layer(key.layer)
            .ok_or_else(|| ExpertIoError::NoSuchExpert {
                key,
                why: format!("layer {} has no routed-expert tensors", key.layer),
            })?;
        if key.expert >= l.n_expert {
            return Err(ExpertIoError::NoSuchExpert {
                key,
                why: format!("layer {} has {} experts", key.layer, l.n_expert),
            });
        }
        Ok(l)
    }

    /// The file ranges of `key`'s gate, up and down slabs.
    pub fn ranges(&self, key: ExpertKey) -> Result<[SlabRange; 3], ExpertIoError> {
        let l = self.slabs(key)?;
        Ok(std::array::from_fn(|i| SlabRange {
            part: i,
            shard: l.parts[i].shard,
            offset: l.parts[i].slab_offset(key.expert),
            len: l.parts[i].slab_bytes,
        }))
    }
}

/// Checks one stacked expert tensor and locates it.
fn slab_tensor(
    info: &gguf::TensorInfo,
    shard: usize,
    data_offset: u64,
    file_len: u64,
) -> Result<SlabTensor, ExpertIoError> {
    let err = |why: String| ExpertIoError::Layout {
        tensor: info.name.clone(),
        why,
    };
    let [n_in, n_out, n_expert] = <[u64; 3]>::try_from(info.dims.as_slice()).map_err(|_| {
        err(format!(
            "has shape {:?}; a stacked expert tensor is {{n_in, n_out, n_expert}}",
            info.dims
        ))
    })?;
    if n_expert == 0 {
        return Err(err("has 0 experts".into()));
    }
    let slab_bytes = info
        .ty
        .row_bytes(n_in)
        .and_then(|row| row.checked_mul(n_out))
        .ok_or_else(|| {
            err(format!(
                "rows of {n_in} {} values are not whole blocks",
                info.ty
            ))
        })?;
    let total = slab_bytes.checked_mul(n_expert);
    if total != Some(info.n_bytes) {
        return Err(err(format!(
            "holds {} bytes; {n_expert} experts of {n_out} rows of {n_in} {} values need {slab_bytes} each",
            info.n_bytes, info.ty
        )));
    }
    let file_offset = data_offset
        .checked_add(info.offset)
        .filter(|&o| {
            o.checked_add(info.n_bytes)
                .is_some_and(|end| end <= file_len)
        })
        .ok_or_else(|| {
            err(format!(
                "data at offset {} + {} runs past the end of its file ({file_len} bytes)",
                data_offset, info.offset
            ))
        })?;
    Ok(SlabTensor {
        name: info.name.clone(),
        ty: info.ty,
        dims: [n_in, n_out, n_expert],
        shard,
        file_offset,
        slab_bytes,
    })
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

/// Read jobs for `loads` (a wave's misses) into slot tensors that hold their slots back to back, one tensor per
/// part: slot `s`'s part `i` is `tensors[i][s * part_bytes[i]..(s + 1) * part_bytes[i]]` (e.g. the slot tensors
/// `{n_in, n_out, n_slots}` that the expert matmuls run over, with `part_bytes` their `nb[2]`).
pub fn slot_jobs<'a>(
    loads: &[Load],
    tensors: [&'a mut [u8]; 3],
    part_bytes: [u64; 3],
) -> Result<Vec<ReadJob<'a>>, ExpertIoError> {
    let [g, u, d] = tensors;
    let mut gate = split_slots(g, part_bytes[0], loads)?;
    let mut up = split_slots(u, part_bytes[1], loads)?;
    let mut down = split_slots(d, part_bytes[2], loads)?;
    loads
        .iter()
        .map(|l| {
            let i = l.slot as usize;
            match (gate[i].take(), up[i].take(), down[i].take()) {
                (Some(g), Some(u), Some(d)) => Ok(ReadJob {
                    key: l.key,
                    dest: SlotBuffers::new(g, u, d),
                }),
                _ => Err(slot_error(l, "the slot appears twice among the loads")),
            }
        })
        .collect()
}

/// As [`slot_jobs`] for a pool of packed slots (gate | up | down back to back, `part_bytes` each).
pub fn packed_slot_jobs<'a>(
    loads: &[Load],
    pool: &'a mut [u8],
    part_bytes: [u64; 3],
) -> Result<Vec<ReadJob<'a>>, ExpertIoError> {
    let stride = part_bytes
        .iter()
        .try_fold(0u64, |s, &b| s.checked_add(b))
        .unwrap_or(u64::MAX);
    let mut slots = split_slots(pool, stride, loads)?;
    loads
        .iter()
        .map(|l| {
            let buf = slots[l.slot as usize]
                .take()
                .ok_or_else(|| slot_error(l, "the slot appears twice among the loads"))?;
            let dest = SlotBuffers::packed(buf, part_bytes)
                .ok_or_else(|| slot_error(l, "the slot is smaller than its parts"))?;
            Ok(ReadJob { key: l.key, dest })
        })
        .collect()
}

/// `buf` cut into slots of `stride` bytes, each once; checks that every load's slot is one of them.
fn split_slots<'a>(
    buf: &'a mut [u8],
    stride: u64,
    loads: &[Load],
) -> Result<Vec<Option<&'a mut [u8]>>, ExpertIoError> {
    let stride = usize::try_from(stride).ok().filter(|&s| s > 0);
    let n_slots = stride.map_or(0, |s| buf.len() / s);
    if let Some(l) = loads.iter().find(|l| l.slot as usize >= n_slots) {
        let why = match stride {
            Some(s) => format!("the buffer holds {n_slots} slots of {s} bytes"),
            None => "the slot size is 0 or too large".to_string(),
        };
        return Err(slot_error(l, &why));
    }
    Ok(match stride {
        Some(s) => buf.chunks_exact_mut(s).map(Some).collect(),
        None => Vec::new(),
    })
}

fn slot_error(l: &Load, why: &str) -> ExpertIoError {
    ExpertIoError::Slot {
        key: l.key,
        slot: l.slot,
        why: why.to_string(),
    }
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
            .paths
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
            .paths
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

    /// Reads one expert into `dest` on the calling thread.
    pub fn read_one(
        &self,
        key: ExpertKey,
        dest: SlotBuffers<'_>,
    ) -> Result<ReadReport, ExpertIoError> {
        let opts = ReadOptions {
            threads: 1,
            ..self.opts
        };
        self.read_with(vec![ReadJob { key, dest }], opts)
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
        let path = &self.layout.paths[c.shard];
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
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
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

/// The pages of a buffer (at address `addr`, `len` bytes) that a direct read of the `need` bytes at file `offset`
/// into the buffer from `at` covers, and the slab's offset in its first page; None unless the slab sits at the
/// same offset within a page in memory as in the file and the pages lie within the buffer.
fn direct_span(
    addr: usize,
    len: usize,
    at: usize,
    need: usize,
    offset: u64,
) -> Option<(std::ops::Range<usize>, usize)> {
    let lead = (offset % DIRECT_ALIGN as u64) as usize;
    if addr.checked_add(at)? % DIRECT_ALIGN != lead {
        return None;
    }
    let start = at.checked_sub(lead)?;
    let end = at.checked_add(need)?.next_multiple_of(DIRECT_ALIGN);
    (end <= len).then_some((start..end, lead))
}

/// Opens `path` for reading with `O_DIRECT`; None where the system or the file system does not allow it.
fn open_direct(path: &std::path::Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Fills `buf` (aligned, whole pages) from `offset` of a file opened with `O_DIRECT`; the read may stop at the end
/// of the file after the first `must` bytes.
fn read_direct(file: &File, buf: &mut [u8], offset: u64, must: usize) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        // Past a short read the offsets are no longer aligned: only the end of the file stops one.
        if done % DIRECT_ALIGN != 0 {
            break;
        }
    }
    if done < must {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    Ok(())
}

/// `key`'s gate, up and down slabs as the memory map of `model` holds them (`layout` must come from `model`).
pub fn mapped_slabs<'m>(
    model: &'m Model,
    layout: &ExpertLayout,
    key: ExpertKey,
) -> Result<[&'m [u8]; 3], ExpertIoError> {
    let l = layout.slabs(key)?;
    let mut out: [&[u8]; 3] = [&[]; 3];
    for (i, t) in l.parts.iter().enumerate() {
        let missing = || ExpertIoError::Layout {
            tensor: t.name.clone(),
            why: "is not in this model (the layout was made from another one)".into(),
        };
        let mt = model.tensor(&t.name).ok_or_else(missing)?;
        let data = model.tensor_data(mt);
        let start = u64::from(key.expert) * t.slab_bytes;
        let slab = usize::try_from(start)
            .ok()
            .zip(usize::try_from(t.slab_bytes).ok())
            .and_then(|(s, n)| data.get(s..s.checked_add(n)?))
            .ok_or_else(missing)?;
        out[i] = slab;
    }
    Ok(out)
}

/// Checks that a loaded slot (`parts`: gate, up, down buffers, each at least its slab) holds exactly `key`'s bytes
/// as mapped from `model`.
pub fn verify_slot(
    model: &Model,
    layout: &ExpertLayout,
    key: ExpertKey,
    parts: [&[u8]; 3],
) -> Result<(), ExpertIoError> {
    let l = layout.slabs(key)?;
    let mapped = mapped_slabs(model, layout, key)?;
    for (i, (want, got)) in mapped.iter().zip(parts).enumerate() {
        let tensor = || l.parts[i].name.clone();
        let got = got
            .get(..want.len())
            .ok_or_else(|| ExpertIoError::Destination {
                key,
                part: PARTS[i],
                tensor: tensor(),
                needed: want.len() as u64,
                got: got.len(),
            })?;
        if let Some(byte) = want.iter().zip(got).position(|(a, b)| a != b) {
            return Err(ExpertIoError::Mismatch {
                key,
                part: PARTS[i],
                tensor: tensor(),
                byte,
            });
        }
    }
    Ok(())
}
